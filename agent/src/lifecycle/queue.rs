//! The leader's turn on the lifecycle queue: taking messages, handling
//! each (act, defer or refuse) and deleting what is done.

use super::cleanup::{clean_up_gone, handle_limited};
use super::message::{
    deferral, hook_heartbeat_timeout, notice_deadline, parse_message, vet, Event, Verdict,
};
use super::{alongside, keep_alive, keep_hidden, Error, Limits, Parts, Report};
use crate::aws::autoscaling::Action;
use crate::aws::ec2::Instances;
use crate::aws::sqs::{Queue, Received};
use crate::catalogue::Coded;
use crate::config::Config;
use crate::lock::LockStore;
use crate::registry::RegistryStore;
use std::time::Duration;

/// At most this many receives before a batch is handled: enough to find a
/// whole scale-in (10 messages a receive), bounded so a flooded queue still
/// lets the turn end.
pub const RECEIVES_PER_BATCH: usize = 10;
/// At most this many messages taken in one turn (the first receives and
/// those during the batch).
pub const MESSAGES_PER_TURN: usize = 100;

/// EC2, to tell an instance already gone from a live one outside every group.
#[derive(Debug, Clone, Copy)]
pub struct Ec2<'a> {
    pub instances: &'a Instances,
    /// This leader's own instance: EC2 must report it running for its
    /// answer about another to be believed.
    pub leader: &'a str,
}

/// Receives until the queue answers empty (at most [`RECEIVES_PER_BATCH`]
/// receives and `room` messages), deleting what is no termination, after
/// sorting `first` (messages a long poll already received) the same way. A
/// receive that fails after the first is logged and ends the taking: what
/// was taken is handled.
async fn take(
    queue: &Queue,
    visibility: Duration,
    room: usize,
    first: Vec<Received>,
) -> Result<Vec<(Received, Action)>, Error> {
    let mut batch = Vec::new();
    let mut taken = first.len();
    sort_in(queue, first, &mut batch).await?;
    for attempt in 0..RECEIVES_PER_BATCH {
        if taken >= room {
            break;
        }
        let messages = match queue.receive_up_to(visibility, room - taken).await {
            Ok(m) => m,
            Err(e) if attempt == 0 && batch.is_empty() => return Err(e.into()),
            Err(e) => {
                crate::catalogue::report!(
                    warn,
                    e,
                    "lifecycle queue receive failed; handling what was taken"
                );
                break;
            }
        };
        if messages.is_empty() {
            break;
        }
        taken += messages.len();
        sort_in(queue, messages, &mut batch).await?;
    }
    Ok(batch)
}

/// Terminations go into `batch`; test notifications, other transitions and
/// unreadable messages are deleted.
async fn sort_in(
    queue: &Queue,
    messages: Vec<Received>,
    batch: &mut Vec<(Received, Action)>,
) -> Result<(), Error> {
    for message in messages {
        match parse_message(&message.body) {
            Ok(Event::Terminating(action)) => batch.push((message, action)),
            Ok(Event::Test) => {
                tracing::info!("lifecycle hook test notification");
                queue.delete(&message.receipt).await?;
            }
            Ok(Event::Ignored(transition)) => {
                tracing::info!(%transition, "lifecycle message ignored");
                queue.delete(&message.receipt).await?;
            }
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "unreadable lifecycle message deleted");
                queue.delete(&message.receipt).await?;
            }
        }
    }
    Ok(())
}

/// How long one long poll between leader turns may wait, with `left` until
/// the next turn: whole seconds, at most SQS's 20, and a second under the
/// SDK's attempt timeout (a longer wait would be cut off as a timed-out
/// attempt and retried). Zero when under 2 s are left: then a plain sleep
/// is as good and keeps short test periods exact.
pub fn long_poll_wait(left: Duration, attempt_timeout: Duration) -> Duration {
    let secs = left
        .as_secs()
        .min(20)
        .min(attempt_timeout.as_secs().saturating_sub(1));
    if secs < 2 {
        Duration::ZERO
    } else {
        Duration::from_secs(secs)
    }
}

/// Between the leader's turns: waits on the queue (long polls) until a
/// message arrives, returned at once so a termination is handled within
/// seconds of its event, not at the next turn; or until `due`, then empty.
/// A failed receive is reported and the rest of the time slept.
pub async fn wait_for_messages(
    queue: &Queue,
    cfg: &Config,
    due: tokio::time::Instant,
) -> Vec<Received> {
    loop {
        let left = due.saturating_duration_since(tokio::time::Instant::now());
        let wait = long_poll_wait(left, cfg.aws.attempt_timeout);
        if wait.is_zero() {
            tokio::time::sleep_until(due).await;
            return Vec::new();
        }
        match queue
            .receive_waiting(cfg.daemon.lifecycle_heartbeat, 10, wait)
            .await
        {
            Ok(messages) if messages.is_empty() => continue,
            Ok(messages) => return messages,
            Err(e) => {
                crate::catalogue::report!(
                    warn,
                    Error::from(e),
                    "cannot wait on the lifecycle queue; it is read at the next turn"
                );
                tokio::time::sleep_until(due).await;
                return Vec::new();
            }
        }
    }
}

/// One pass over the queue: every message waiting is taken first (a
/// scale-in larger than one receive too), then the terminations are
/// handled together (each heartbeated and kept hidden from receipt, workers
/// drained concurrently, control planes removed one at a time) and each
/// message deleted once handled; messages that cannot be handled now come
/// back. While a batch lasts, the queue is read again every heartbeat
/// period, so a termination arriving meanwhile is heartbeated in time too.
///
/// `first` are messages already received (by [`wait_for_messages`]), with
/// the same visibility: they are handled with the rest.
pub async fn drain_queue<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    queue: &Queue,
    ec2: Ec2<'_>,
    first: Vec<Received>,
) -> Result<Vec<Report>, Error> {
    let cfg = parts.cfg;
    // Short visibility, extended while a message is handled: if this leader
    // dies or stops leading, the next one sees the message again within one
    // heartbeat period.
    let visibility = cfg.daemon.lifecycle_heartbeat;
    let batch = take(queue, visibility, MESSAGES_PER_TURN, first).await?;
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    // A batch may take a whole drain: that is progress, not a hang.
    crate::systemd::beat(crate::pacing::LEADER_LOOP, crate::pacing::allowance(cfg));
    let limits = Limits::new();
    let limits = &limits;
    let handle = |(message, action): (Received, Action)| async move {
        alongside(
            handle_message(parts, queue, ec2, &action, &message, limits),
            keep_hidden(queue, &message.receipt, visibility),
        )
        .await
    };
    let mut taken = batch.len();
    let mut handlings: Vec<_> = batch.into_iter().map(|m| Box::pin(handle(m))).collect();
    let mut reports = Vec::new();
    let mut failed = None;
    let mut next_receive = tokio::time::Instant::now() + visibility;
    while !handlings.is_empty() {
        tokio::select! {
            outcome = next_done(&mut handlings) => match outcome {
                Ok(Some(report)) => reports.push(report),
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            },
            _ = tokio::time::sleep_until(next_receive), if taken < MESSAGES_PER_TURN => {
                next_receive = tokio::time::Instant::now() + visibility;
                match take(queue, visibility, MESSAGES_PER_TURN - taken, Vec::new()).await {
                    Ok(more) if more.is_empty() => {}
                    Ok(more) => {
                        tracing::info!(messages = more.len(), "more terminations arrived during the batch");
                        crate::systemd::beat(crate::pacing::LEADER_LOOP, crate::pacing::allowance(cfg));
                        taken += more.len();
                        handlings.extend(more.into_iter().map(|m| Box::pin(handle(m))));
                    }
                    Err(e) => {
                        crate::catalogue::report!(warn, e, "lifecycle queue receive during the batch failed");
                    }
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// The output of the first of `futures` to finish, which is removed; the
/// others run on within the caller's task (dropping the caller drops them).
/// Pending forever when there is none.
async fn next_done<F: std::future::Future + Unpin>(futures: &mut Vec<F>) -> F::Output {
    use std::task::Poll;
    std::future::poll_fn(|cx| {
        for i in 0..futures.len() {
            if let Poll::Ready(out) = std::pin::Pin::new(&mut futures[i]).poll(cx) {
                drop(futures.swap_remove(i));
                return Poll::Ready(out);
            }
        }
        Poll::Pending
    })
    .await
}

/// One termination of a batch: vetted with Auto Scaling (and EC2 when no
/// group holds the instance), handled while its action is heartbeated, its
/// message deleted. `None` when it was refused or comes back later.
async fn handle_message<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    queue: &Queue,
    ec2: Ec2<'_>,
    action: &Action,
    message: &Received,
    limits: &Limits,
) -> Result<Option<Report>, Error> {
    let Parts { cfg, hooks, .. } = parts;
    match hooks.placement(action).await {
        Ok(None) => return handle_unplaced(parts, queue, ec2, action, message, limits).await,
        Ok(Some(seen)) => match vet(action, Some(&seen)) {
            Verdict::Confirmed => {}
            Verdict::NotYet(e) => {
                return defer_or_refuse(cfg, queue, action, message, e).await;
            }
            Verdict::Refused(e) | Verdict::NotInGroup(e) => {
                crate::catalogue::report!(warn, e, "lifecycle message refused and deleted");
                queue.delete(&message.receipt).await?;
                return Ok(None);
            }
        },
        Err(e) => {
            crate::catalogue::report!(error, e, instance_id = %action.instance_id, "cannot check the termination with Auto Scaling; the message comes back");
            return Ok(None);
        }
    }
    tracing::info!(instance_id = %action.instance_id, asg = %action.asg, "instance terminating");
    let handled = alongside(
        handle_limited(parts, action, limits),
        keep_alive(hooks, action, cfg.daemon.lifecycle_heartbeat),
    )
    .await;
    match handled {
        Ok(report) => {
            crate::failpoint::crash_point("lifecycle:after-complete");
            queue.delete(&message.receipt).await?;
            Ok(Some(report))
        }
        Err(e) => {
            crate::catalogue::report!(error, e, instance_id = %action.instance_id, "termination not completed; the message comes back");
            Ok(None)
        }
    }
}

/// A notice Auto Scaling does not confirm (yet): kept on the queue, hidden
/// for a while ([`deferral`]), until its [`notice_deadline`]; refused and
/// deleted after it. Nothing is removed or drained for it meanwhile, and its
/// action is not heartbeated (it may not exist).
async fn defer_or_refuse(
    cfg: &Config,
    queue: &Queue,
    action: &Action,
    message: &Received,
    refusal: Error,
) -> Result<Option<Report>, Error> {
    let now = std::time::SystemTime::now();
    let deadline = notice_deadline(
        message.sent,
        hook_heartbeat_timeout(),
        cfg.daemon.lifecycle_heartbeat,
    )
    .filter(|d| now < *d);
    let Some(deadline) = deadline else {
        crate::catalogue::report!(warn, refusal, "lifecycle message refused and deleted");
        queue.delete(&message.receipt).await?;
        return Ok(None);
    };
    let sent = message.sent.unwrap_or(now);
    let hidden = deferral(sent, cfg.daemon.lifecycle_heartbeat, now, deadline);
    queue.extend(&message.receipt, hidden).await?;
    let until = deadline.duration_since(now).unwrap_or(Duration::ZERO);
    tracing::info!(
        instance_id = %action.instance_id,
        asg = %action.asg,
        error = %refusal,
        receives = message.receives,
        next_look_s = hidden.as_secs(),
        kept_for_s = until.as_secs(),
        "termination notice not confirmed by Auto Scaling yet; kept and looked at again"
    );
    Ok(None)
}

/// A notice for an instance no Auto Scaling group holds: cleaned up after
/// when EC2 no longer runs it (the ASG went on past the hook's timeout, or
/// the leader read the notice late), refused when EC2 runs it (forged).
async fn handle_unplaced<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    queue: &Queue,
    ec2: Ec2<'_>,
    action: &Action,
    message: &Received,
    limits: &Limits,
) -> Result<Option<Report>, Error> {
    let id = std::slice::from_ref(&action.instance_id);
    let not_running = match ec2.instances.not_running(id, ec2.leader).await {
        Ok(n) => n,
        Err(e) => {
            let e = Error::from(e);
            crate::catalogue::report!(error, e, instance_id = %action.instance_id, "no group holds the instance and EC2 cannot say whether it is gone; the message comes back");
            return Ok(None);
        }
    };
    // EC2 does not report it pending or running: terminated, shutting down,
    // stopped (an ASG replaces a stopped instance) or forgotten.
    if !not_running.contains(&action.instance_id) {
        let refusal = Error::NotInGroup {
            instance_id: action.instance_id.clone(),
            claimed_asg: action.asg.clone(),
        };
        crate::catalogue::report!(warn, refusal, "lifecycle message refused and deleted");
        queue.delete(&message.receipt).await?;
        return Ok(None);
    }
    tracing::info!(instance_id = %action.instance_id, asg = %action.asg, "no group holds the instance and EC2 no longer runs it");
    match clean_up_gone(parts, action, limits).await {
        Ok(report) if report.cleanup_failures.is_empty() => {
            queue.delete(&message.receipt).await?;
            Ok(Some(report))
        }
        // Nobody else deletes a gone instance's Node (or its member, when
        // etcd refused): keep the message, it comes back and is tried again
        // (the queue's redrive policy ends a hopeless one in the DLQ).
        Ok(report) => {
            tracing::error!(instance_id = %action.instance_id, failures = ?report.cleanup_failures, "cleanup after a gone instance is incomplete; the message comes back");
            Ok(Some(report))
        }
        Err(e) => {
            crate::catalogue::report!(error, e, instance_id = %action.instance_id, "cleanup after a gone instance failed; the message comes back");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::long_poll_wait;
    use std::time::Duration;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_long_poll_waits_whole_seconds_within_sqs_and_the_attempt_timeout() {
        // The default attempt timeout (10 s) bounds a 30 s period's wait.
        assert_eq!(long_poll_wait(S(30), S(10)), S(9));
        // SQS answers at most 20 s later.
        assert_eq!(long_poll_wait(S(300), S(60)), S(20));
        // Never past the next turn; fractions are dropped.
        assert_eq!(long_poll_wait(Duration::from_millis(4_900), S(10)), S(4));
    }

    #[test]
    fn under_two_seconds_left_or_a_short_attempt_timeout_means_a_plain_sleep() {
        assert_eq!(
            long_poll_wait(Duration::from_millis(1_999), S(10)),
            Duration::ZERO
        );
        assert_eq!(long_poll_wait(S(30), S(2)), Duration::ZERO);
        assert_eq!(
            long_poll_wait(S(30), Duration::from_millis(500)),
            Duration::ZERO
        );
    }
}
