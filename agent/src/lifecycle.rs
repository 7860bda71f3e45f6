//! Instance termination: the ASG's lifecycle hook sends a message (through
//! EventBridge, or straight from the hook) to an SQS queue; the leader
//! daemon takes it, cleans up after the instance, and completes the
//! lifecycle action so the ASG may terminate it.
//!
//! - control plane (the instance has a MEMBER record): its etcd member is
//!   removed under the `membership` lock and the quorum guard, its record
//!   deleted, its Node deleted;
//! - worker: cordon, drain through the eviction API (PodDisruptionBudgets
//!   honoured until `timeouts.drain`), delete the Node.
//!
//! I5: the action is completed (CONTINUE) in every case, after cleanup or,
//! when cleanup fails or is refused, with the failure logged; a heartbeat
//! keeps the action alive while the work takes long. Every step is
//! idempotent, so a new leader that receives the message again (the old one
//! died before deleting it) finishes the job without doing anything twice:
//! AWS refuses a second completion with "No active Lifecycle Action found",
//! which counts as done.

use crate::aws::autoscaling::{self, Action, Completion, Hooks, Placement, TERMINATING};
use crate::aws::ec2::{self, Instances};
use crate::aws::sqs::{self, Queue, Received};
use crate::catalogue::Coded;
use crate::config::Config;
use crate::etcd::{self, Etcd};
use crate::kubernetes::Kubernetes;
use crate::lock::{LockStore, Locker};
use crate::membership::{self, Target};
use crate::metrics;
use crate::registry::{Registry, RegistryStore};
use serde::Deserialize;
use std::time::{Duration, Instant};

/// Lifecycle failures, naming the instance or queue involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lifecycle message is not one kubeboot understands: {reason}")]
    Message { reason: String },
    #[error(transparent)]
    AutoScaling(#[from] autoscaling::Error),
    #[error(
        "lifecycle message says {instance_id} of {claimed_asg} is terminating, but Auto Scaling has it {state} in {asg}: not acted on"
    )]
    NotTerminating {
        instance_id: String,
        claimed_asg: String,
        asg: String,
        state: String,
    },
    #[error(
        "lifecycle message says {instance_id} of {claimed_asg} is terminating, but no Auto Scaling group holds it: not acted on"
    )]
    NotInGroup {
        instance_id: String,
        claimed_asg: String,
    },
    #[error(
        "cannot ask etcd whether {instance_id} (Node {node}) is a control plane without a member record: {source}"
    )]
    MembershipUnknown {
        instance_id: String,
        node: String,
        #[source]
        source: etcd::Error,
    },
    #[error(transparent)]
    Sqs(#[from] sqs::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    /// EC2 could not say whether an instance no group holds is gone.
    #[error(transparent)]
    Instances(#[from] ec2::Error),
}

/// What a queue message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Terminating(Action),
    /// The hook's test notification, sent when the hook is created.
    Test,
    /// A transition kubeboot does not act on (e.g. launching): deleted.
    Ignored(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Notification {
    event: Option<String>,
    lifecycle_transition: Option<String>,
    auto_scaling_group_name: Option<String>,
    lifecycle_hook_name: Option<String>,
    lifecycle_action_token: Option<String>,
    #[serde(rename = "EC2InstanceId")]
    ec2_instance_id: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "detail-type")]
    detail_type: Option<String>,
    detail: Option<Notification>,
}

/// Parses an SQS message body: an EventBridge event (`detail-type` "EC2
/// Instance-terminate Lifecycle Action", the hook's fields in `detail`) or
/// the hook's own notification (the same fields at the top level).
pub fn parse_message(body: &str) -> Result<Event, Error> {
    let bad = |reason: String| Error::Message { reason };
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let notification: Notification = if value.get("detail").is_some() {
        let envelope: Envelope =
            serde_json::from_value(value).map_err(|e| bad(format!("EventBridge event: {e}")))?;
        envelope.detail.ok_or_else(|| {
            bad(format!(
                "EventBridge event {:?} without detail",
                envelope.detail_type.unwrap_or_default()
            ))
        })?
    } else {
        serde_json::from_value(value).map_err(|e| bad(format!("hook notification: {e}")))?
    };
    if notification.event.as_deref() == Some("autoscaling:TEST_NOTIFICATION") {
        return Ok(Event::Test);
    }
    let transition = notification
        .lifecycle_transition
        .ok_or_else(|| bad("no LifecycleTransition".into()))?;
    if transition != TERMINATING {
        return Ok(Event::Ignored(transition));
    }
    let field = |v: Option<String>, name: &str| v.ok_or_else(|| bad(format!("no {name}")));
    let instance_id = field(notification.ec2_instance_id, "EC2InstanceId")?;
    if !instance_id.starts_with("i-") {
        return Err(bad(format!(
            "EC2InstanceId {instance_id:?} is not an instance id"
        )));
    }
    Ok(Event::Terminating(Action {
        asg: field(notification.auto_scaling_group_name, "AutoScalingGroupName")?,
        hook: field(notification.lifecycle_hook_name, "LifecycleHookName")?,
        instance_id,
        token: notification.lifecycle_action_token,
    }))
}

/// AWS's largest `HeartbeatTimeout` for a lifecycle hook (30 to 7200 s,
/// Auto Scaling API Reference, PutLifecycleHook): how long after SQS
/// received it an unconfirmed notice is kept, whatever the hook's own
/// timeout (infra/ sets 900 s; the instance role may not read it). A test
/// build shortens it with `KBTEST_HOOK_HEARTBEAT_TIMEOUT_MS`.
pub const MAX_HOOK_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(7200);

fn hook_heartbeat_timeout() -> Duration {
    crate::failpoint::duration_override("HOOK_HEARTBEAT_TIMEOUT_MS")
        .unwrap_or(MAX_HOOK_HEARTBEAT_TIMEOUT)
}

/// What Auto Scaling's view makes of a termination notice.
#[derive(Debug)]
pub enum Verdict {
    /// `Terminating`, `Terminating:Wait` or `Terminating:Proceed` in the
    /// group the notice names: acted on.
    Confirmed,
    /// Held by that group in another state (`InService`, `Pending*`,
    /// `Standby`, ...): not yet. A real notice can arrive before
    /// DescribeAutoScalingInstances reports the termination, so the notice
    /// is kept and looked at again until the hook's timeout; only then is
    /// it refused (stale or forged). Never acted on before it is confirmed.
    NotYet(Error),
    /// No group holds the instance (or the group holds it `Terminated`,
    /// past its hook): the caller asks EC2 ([`Ec2`]) whether
    /// it is gone (cleaned up after) or running (a forged notice, refused).
    NotInGroup(Error),
    /// Another group holds it: no action of the named group can exist.
    Refused(Error),
}

/// Whether a queued termination may be acted on: the queue accepts messages
/// from any node of the cluster, so a message alone is not proof. Auto
/// Scaling must have the instance terminating in the group the message
/// names (see [`Verdict`]).
pub fn vet(action: &Action, seen: Option<&Placement>) -> Verdict {
    let not_terminating = |p: &Placement| Error::NotTerminating {
        instance_id: action.instance_id.clone(),
        claimed_asg: action.asg.clone(),
        asg: p.asg.clone(),
        state: p.state.clone(),
    };
    match seen {
        None => Verdict::NotInGroup(Error::NotInGroup {
            instance_id: action.instance_id.clone(),
            claimed_asg: action.asg.clone(),
        }),
        Some(p) if p.asg != action.asg => Verdict::Refused(not_terminating(p)),
        Some(p) if is_terminating(&p.state) => Verdict::Confirmed,
        // Past terminating: its hook is over and it will not be confirmed
        // later; like an instance no group holds, EC2 says whether it is
        // gone (cleaned up after) rather than the notice waiting two hours.
        Some(p) if p.state == "Terminated" => Verdict::NotInGroup(Error::NotInGroup {
            instance_id: action.instance_id.clone(),
            claimed_asg: action.asg.clone(),
        }),
        Some(p) => Verdict::NotYet(not_terminating(p)),
    }
}

/// `Terminating`, `Terminating:Wait`, `Terminating:Proceed` (not
/// `Terminated`, nor a warm pool's `Warmed:Terminating*`).
fn is_terminating(state: &str) -> bool {
    state == "Terminating" || state.starts_with("Terminating:")
}

/// When an unconfirmed notice stops being kept: SQS's own receipt time of
/// the message (which the sender cannot forge, and which is never before
/// the real notice's) plus the hook's heartbeat timeout plus `margin` (for
/// clocks). Without a receipt time, `None`: the notice is refused at once.
pub fn notice_deadline(
    sent: Option<std::time::SystemTime>,
    hook_timeout: Duration,
    margin: Duration,
) -> Option<std::time::SystemTime> {
    sent.map(|t| t + hook_timeout + margin)
}

/// How long an unconfirmed notice stays hidden before it is looked at
/// again: as long as it has been kept so far (its age since SQS received it
/// at `sent`), at least `every` and a hundredth of the whole keep (`sent`
/// to `deadline`), never past `deadline`, at least one second. Growing with
/// the notice's age rather than its receive count keeps the looks frequent
/// while the hook may still be waiting (about 0, 1, 2, 5, 10, 19 minutes
/// for AWS's longest hook) even when failed turns inflated the count, and a
/// notice kept that long is received about eight times, within the queue's
/// redrive policy (maxReceiveCount 10).
pub fn deferral(
    sent: std::time::SystemTime,
    every: Duration,
    now: std::time::SystemTime,
    deadline: std::time::SystemTime,
) -> Duration {
    let age = now.duration_since(sent).unwrap_or(Duration::ZERO);
    let span = deadline.duration_since(sent).unwrap_or(Duration::ZERO);
    let grown = age.max(every).max(span / 100);
    let left = deadline.duration_since(now).unwrap_or(Duration::ZERO);
    grown
        .min(left + Duration::from_secs(1))
        .clamp(Duration::from_secs(1), Duration::from_secs(43_200))
}


/// What handling one termination did, for the log and the note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub instance_id: String,
    pub control_plane: bool,
    pub member: Option<String>,
    pub node: Option<String>,
    pub cleanup_failures: Vec<String>,
    pub completion: Completion,
    pub elapsed: Duration,
}

/// How many workers of one batch are drained at once: each drain is mostly
/// waiting on evictions, but every one lists and evicts Pods through the API
/// server.
pub const CONCURRENT_DRAINS: usize = 4;

/// What the handlings of one batch share: control-plane removals go one at a
/// time (each takes the `membership` lock; this process's handlings queue
/// here rather than compete for it), workers' drains at most
/// [`CONCURRENT_DRAINS`] at once.
pub struct Limits {
    removals: tokio::sync::Mutex<()>,
    drains: tokio::sync::Semaphore,
}

impl Limits {
    pub fn new() -> Self {
        Limits {
            removals: tokio::sync::Mutex::new(()),
            drains: tokio::sync::Semaphore::new(CONCURRENT_DRAINS),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `work` with `companion` beside it in the same future, and returns
/// the work's output. No task is spawned: when the work ends, or the caller
/// drops the whole future (a leader that lost its lock drops its turn), the
/// companion stops with it. A heartbeat or a visibility keeper must never
/// outlive the handling it serves.
pub async fn alongside<T>(
    work: impl std::future::Future<Output = T>,
    companion: impl std::future::Future<Output = std::convert::Infallible>,
) -> T {
    tokio::pin!(work, companion);
    tokio::select! {
        biased;
        out = &mut work => out,
        never = &mut companion => match never {},
    }
}

/// Heartbeats `action` at once and then every `every`, forever: run it
/// [`alongside`] the work. The first beat counts from receipt, so an action
/// waiting for its turn in a batch does not reach its heartbeat timeout.
async fn keep_alive(hooks: &Hooks, action: &Action, every: Duration) -> std::convert::Infallible {
    loop {
        match hooks.heartbeat(action).await {
            Ok(()) => {
                tracing::info!(instance_id = %action.instance_id, "lifecycle action heartbeat")
            }
            Err(e) => {
                tracing::warn!(instance_id = %action.instance_id, code = e.code(), error = %e, "lifecycle action heartbeat failed")
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Keeps a message hidden while it is handled, forever: run it
/// [`alongside`] the handling. Once the handling ends or is dropped, the
/// message is visible again within `visibility`.
async fn keep_hidden(
    queue: &Queue,
    receipt: &str,
    visibility: Duration,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(visibility / 2).await;
        if let Err(e) = queue.extend(receipt, visibility).await {
            tracing::warn!(code = e.code(), error = %e, "cannot keep the lifecycle message hidden");
        }
    }
}

/// Cleans up after a terminating instance and completes its action (I5).
pub async fn handle_termination<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    hooks: &Hooks,
    action: &Action,
) -> Result<Report, Error> {
    let limits = Limits::new();
    alongside(
        handle_limited(cfg, registry, locker, hooks, action, &limits),
        keep_alive(hooks, action, cfg.daemon.lifecycle_heartbeat),
    )
    .await
}

/// [`handle_termination`] without its heartbeat (the caller keeps the
/// action alive), within a batch's `limits`; metered.
async fn handle_limited<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    hooks: &Hooks,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let outcome = clean_up_and_complete(cfg, registry, locker, hooks, action, limits).await;
    let counter = match outcome {
        Ok(_) => metrics::LIFECYCLE_ACTIONS_COMPLETED,
        Err(_) => metrics::LIFECYCLE_ACTIONS_FAILED,
    };
    metrics::record(counter, 1.0, &[]);
    outcome
}

/// The etcd member of a control plane that has no MEMBER record (a crash
/// between its join and the record, or a record deleted by hand): kubeadm
/// names a stacked etcd member after its Node. `None` when etcd has no such
/// member (a worker). When etcd cannot be asked, an error: the instance is
/// neither drained as a worker on a guess nor its member left behind; the
/// message comes back and is tried again.
async fn unrecorded_member(
    cfg: &Config,
    records: &[crate::registry::MemberRecord],
    instance_id: &str,
    node: &str,
) -> Result<Option<(Etcd, u64)>, Error> {
    let settings = etcd::Settings::from_config(cfg);
    let endpoints = etcd::recorded_endpoints(records, &settings);
    let found = async {
        let etcd = Etcd::connect_any(&endpoints, &settings).await?;
        let members = etcd.members().await?;
        let id = members.iter().find(|m| m.name == node).map(|m| m.id);
        Ok::<_, etcd::Error>(id.map(|id| (etcd, id)))
    };
    found.await.map_err(|source| Error::MembershipUnknown {
        instance_id: instance_id.to_string(),
        node: node.to_string(),
        source,
    })
}

/// How a terminating control plane is known.
enum Leaving<'a> {
    /// By its MEMBER record.
    Recorded(&'a crate::registry::MemberRecord),
    /// By its Node's name among etcd's members (through that client).
    Unrecorded(Box<Etcd>, u64),
}

/// What cleaning up after an instance did.
struct Cleanup {
    control_plane: bool,
    member: Option<String>,
    node: Option<String>,
    failures: Vec<String>,
}

impl Report {
    /// The report of one handled instance, logged with `message`.
    fn logged(
        action: &Action,
        cleanup: Cleanup,
        completion: Completion,
        started: Instant,
        message: &str,
    ) -> Report {
        let report = Report {
            instance_id: action.instance_id.clone(),
            control_plane: cleanup.control_plane,
            member: cleanup.member,
            node: cleanup.node,
            cleanup_failures: cleanup.failures,
            completion,
            elapsed: started.elapsed(),
        };
        tracing::info!(
            instance_id = %report.instance_id,
            control_plane = report.control_plane,
            member = report.member.as_deref().unwrap_or("-"),
            node = report.node.as_deref().unwrap_or("-"),
            failures = ?report.cleanup_failures,
            completion = ?report.completion,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "{message}"
        );
        report
    }
}

/// How the instance being cleaned up after is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// Still running while its action waits: a worker is drained.
    Terminating,
    /// Already terminated: nothing runs on it to drain.
    Gone,
}

async fn clean_up_and_complete<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    hooks: &Hooks,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let started = Instant::now();
    let cleanup = clean_up(cfg, registry, locker, action, limits, Host::Terminating).await?;
    crate::failpoint::crash_point("lifecycle:after-cleanup");
    let completion = hooks.complete(action).await?;
    Ok(Report::logged(
        action,
        cleanup,
        completion,
        started,
        "lifecycle action completed",
    ))
}

/// Cleans up after an instance EC2 already terminated (its notice was read
/// after the hook's timeout, or no group holds it any more): its member
/// leaves through the guarded path and its Node goes; there is no action to
/// complete. Nobody else deletes the Node.
async fn clean_up_gone<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let started = Instant::now();
    let cleanup = clean_up(cfg, registry, locker, action, limits, Host::Gone).await?;
    Ok(Report::logged(
        action,
        cleanup,
        Completion::Gone,
        started,
        "instance already gone: cleaned up after it",
    ))
}

/// Removes the member of a control plane (or drains a running worker) and
/// deletes the Node; failures of single steps are collected, not fatal.
async fn clean_up<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    action: &Action,
    limits: &Limits,
    host: Host,
) -> Result<Cleanup, Error> {
    let mut failures = Vec::new();
    let records = registry.members().await?;
    let record = records
        .iter()
        .find(|r| r.instance_id == action.instance_id)
        .cloned();
    let kube = match Kubernetes::from_kubeconfig(
        &cfg.paths.kubernetes_dir.join("admin.conf"),
        cfg.timeouts.kube_api,
    )
    .await
    {
        Ok(k) => Some(k),
        Err(e) => {
            failures.push(format!("Kubernetes API: {e}"));
            None
        }
    };
    let mut node = match &kube {
        Some(k) => match k.node_for_instance(&action.instance_id).await {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("finding the Node: {e}"));
                None
            }
        },
        None => None,
    };
    // A control plane is one etcd knows: by its record, else by its Node's
    // name among the members (never drained as a worker, its member left).
    let unrecorded = match (&record, &node) {
        (None, Some(name)) => unrecorded_member(cfg, &records, &action.instance_id, name).await?,
        _ => None,
    };
    let leaving = match (&record, unrecorded) {
        (Some(r), _) => Some(Leaving::Recorded(r)),
        (None, Some((etcd, id))) => Some(Leaving::Unrecorded(Box::new(etcd), id)),
        (None, None) => None,
    };
    let control_plane = leaving.is_some();
    let mut member = None;
    if let Some(leaving) = leaving {
        let _serialized = limits.removals.lock().await;
        crate::systemd::beat(crate::pacing::LEADER_LOOP, crate::pacing::allowance(cfg));
        let removal = async {
            let (etcd, target) = match leaving {
                Leaving::Recorded(r) => {
                    let settings = etcd::Settings::from_config(cfg);
                    let endpoints: Vec<String> = etcd::recorded_endpoints(&records, &settings)
                        .into_iter()
                        .filter(|e| etcd::host_of(e) != etcd::host_of(&r.peer_url))
                        .collect();
                    let etcd = Etcd::connect_any(&endpoints, &settings)
                        .await
                        .map_err(membership::Error::from)?;
                    (etcd, Target::Instance(action.instance_id.clone()))
                }
                Leaving::Unrecorded(etcd, id) => {
                    tracing::warn!(instance_id = %action.instance_id, member_id = %format!("{id:016x}"), "a control plane without a member record: its etcd member is found by its Node's name");
                    (*etcd, Target::Member(id))
                }
            };
            membership::remove_in(
                &etcd,
                registry,
                locker,
                &target,
                crate::quorum::Context::Terminating,
            )
            .await
        };
        if let Some(r) = &record {
            node = node.or_else(|| (!r.name.is_empty()).then(|| r.name.clone()));
        }
        match removal.await {
            Ok(outcome) => {
                member = outcome.removed.map(|r| format!("{:016x}", r.id));
            }
            Err(e) => {
                crate::catalogue::report!(error, e, instance_id = %action.instance_id, "etcd member not removed; the reconciler retries once it is safe");
                failures.push(format!("etcd member: {e}"));
            }
        }
    } else if let (Some(k), Some(name), Host::Terminating) = (&kube, &node, host) {
        let drained = async {
            // Closed only when the batch is dropped; then nothing drains.
            let _slot = limits.drains.acquire().await;
            k.cordon(name).await?;
            k.drain(name, cfg.timeouts.drain).await
        };
        match drained.await {
            Ok(report) if report.blocked.is_empty() => {
                tracing::info!(node = %name, evicted = report.evicted.len(), "node drained");
            }
            Ok(report) => {
                tracing::error!(node = %name, blocked = ?report.blocked, "drain deadline passed; completing the lifecycle action anyway");
                metrics::record(metrics::DRAIN_FAILURES, 1.0, &[]);
                failures.push(format!("drain left {} pods", report.blocked.len()));
            }
            Err(e) => {
                metrics::record(metrics::DRAIN_FAILURES, 1.0, &[]);
                failures.push(format!("drain: {e}"));
            }
        }
    }
    if let (Some(k), Some(name)) = (&kube, &node) {
        if let Err(e) = k.delete_node(name).await {
            failures.push(format!("deleting the Node: {e}"));
        }
    }
    Ok(Cleanup {
        control_plane,
        member,
        node,
        failures,
    })
}

/// What this node does when IMDS says its ASG is terminating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnTermination {
    /// A control plane cleans up after itself (it has the admin credentials
    /// and takes the membership lock like anyone) and completes its action.
    CleanUpAndComplete,
    /// A worker asks the leader through the lifecycle queue.
    AskTheLeader,
}

/// One look at IMDS; `Some` the first time the target state is `Terminated`.
pub async fn own_termination_due(
    imds: &crate::identity::Imds,
    instance_id: &str,
    hook: &str,
) -> Result<Option<Action>, crate::identity::Error> {
    let state = imds.target_lifecycle_state().await?;
    if state.as_deref() != Some("Terminated") {
        return Ok(None);
    }
    let asg = imds.asg_name().await?;
    let asg = asg.unwrap_or_else(|| {
        tracing::error!(hint = "enable InstanceMetadataTags on the launch template", "this instance's ASG name is not in IMDS; its lifecycle action cannot be completed by this node");
        String::new()
    });
    Ok(Some(Action {
        asg,
        hook: hook.to_string(),
        instance_id: instance_id.to_string(),
        token: None,
    }))
}

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
/// receives and `room` messages), deleting what is no termination. A
/// receive that fails after the first is logged and ends the taking: what
/// was taken is handled.
async fn take(
    queue: &Queue,
    visibility: Duration,
    room: usize,
) -> Result<Vec<(Received, Action)>, Error> {
    let mut batch = Vec::new();
    let mut taken = 0;
    for attempt in 0..RECEIVES_PER_BATCH {
        if taken >= room {
            break;
        }
        let messages = match queue.receive_up_to(visibility, room - taken).await {
            Ok(m) => m,
            Err(e) if attempt == 0 => return Err(e.into()),
            Err(e) => {
                crate::catalogue::report!(warn, e, "lifecycle queue receive failed; handling what was taken");
                break;
            }
        };
        if messages.is_empty() {
            break;
        }
        taken += messages.len();
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
    }
    Ok(batch)
}

/// One pass over the queue: every message waiting is taken first (a
/// scale-in larger than one receive too), then the terminations are
/// handled together (each heartbeated and kept hidden from receipt, workers
/// drained concurrently, control planes removed one at a time) and each
/// message deleted once handled; messages that cannot be handled now come
/// back. While a batch lasts, the queue is read again every heartbeat
/// period, so a termination arriving meanwhile is heartbeated in time too.
pub async fn drain_queue<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    queue: &Queue,
    registry: &Registry<R>,
    locker: &Locker<L>,
    hooks: &Hooks,
    ec2: Ec2<'_>,
) -> Result<Vec<Report>, Error> {
    // Short visibility, extended while a message is handled: if this leader
    // dies or stops leading, the next one sees the message again within one
    // heartbeat period.
    let visibility = cfg.daemon.lifecycle_heartbeat;
    let batch = take(queue, visibility, MESSAGES_PER_TURN).await?;
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    // A batch may take a whole drain: that is progress, not a hang.
    crate::systemd::beat(crate::pacing::LEADER_LOOP, crate::pacing::allowance(cfg));
    let limits = Limits::new();
    let limits = &limits;
    let handle = |(message, action): (Received, Action)| async move {
        alongside(
            handle_message(
                cfg, queue, registry, locker, hooks, ec2, &action, &message, limits,
            ),
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
                match take(queue, visibility, MESSAGES_PER_TURN - taken).await {
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
#[allow(clippy::too_many_arguments)]
async fn handle_message<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    queue: &Queue,
    registry: &Registry<R>,
    locker: &Locker<L>,
    hooks: &Hooks,
    ec2: Ec2<'_>,
    action: &Action,
    message: &Received,
    limits: &Limits,
) -> Result<Option<Report>, Error> {
    match hooks.placement(action).await {
        Ok(None) => {
            return handle_unplaced(cfg, queue, registry, locker, ec2, action, message, limits)
                .await
        }
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
        handle_limited(cfg, registry, locker, hooks, action, limits),
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
#[allow(clippy::too_many_arguments)]
async fn handle_unplaced<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    queue: &Queue,
    registry: &Registry<R>,
    locker: &Locker<L>,
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
    match clean_up_gone(cfg, registry, locker, action, limits).await {
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

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
        use self::Error as E;
        match self {
            E::Message { .. } => &crate::catalogue::LIFE_MESSAGE,
            E::AutoScaling(e) => e.entry(),
            E::NotTerminating { .. } => &crate::catalogue::LIFE_NOT_TERMINATING,
            E::NotInGroup { .. } => &crate::catalogue::LIFE_NOT_IN_GROUP,
            E::MembershipUnknown { .. } => &crate::catalogue::LIFE_MEMBERSHIP_UNKNOWN,
            E::Sqs(e) => e.entry(),
            E::Registry(e) => e.entry(),
            E::Instances(e) => e.entry(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &str = r#""LifecycleActionToken":"87654321-4321-4321-4321-210987654321","AutoScalingGroupName":"prod-a-control-plane","LifecycleHookName":"kubeboot-terminate","EC2InstanceId":"i-1234567890abcdef0","LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING","NotificationMetadata":"{}","Origin":"AutoScalingGroup","Destination":"EC2""#;

    fn terminating() -> Event {
        Event::Terminating(Action {
            asg: "prod-a-control-plane".into(),
            hook: "kubeboot-terminate".into(),
            instance_id: "i-1234567890abcdef0".into(),
            token: Some("87654321-4321-4321-4321-210987654321".into()),
        })
    }

    fn action() -> Action {
        Action {
            asg: "prod-a-control-plane".into(),
            hook: "kubeboot-terminate".into(),
            instance_id: "i-1234567890abcdef0".into(),
            token: None,
        }
    }

    fn at(asg: &str, state: &str) -> Placement {
        Placement {
            asg: asg.into(),
            state: state.into(),
        }
    }

    #[test]
    fn a_notice_is_acted_on_only_while_auto_scaling_terminates_the_instance_in_its_group() {
        let a = action();
        for state in ["Terminating", "Terminating:Wait", "Terminating:Proceed"] {
            assert!(
                matches!(
                    vet(&a, Some(&at("prod-a-control-plane", state))),
                    Verdict::Confirmed
                ),
                "{state}"
            );
        }
        let Verdict::NotInGroup(err) = vet(&a, None) else {
            panic!("no group holds it")
        };
        assert_eq!(err.code(), "KB-LIFE-005", "{err}");
        // Terminated in the group: EC2 decides, as for no group.
        assert!(matches!(
            vet(&a, Some(&at("prod-a-control-plane", "Terminated"))),
            Verdict::NotInGroup(_)
        ));
        // Not yet: kept until the hook's timeout, then refused.
        for state in [
            "InService",
            "Pending",
            "Pending:Wait",
            "Pending:Proceed",
            "Standby",
            "Warmed:Terminating:Wait",
        ] {
            let Verdict::NotYet(err) = vet(&a, Some(&at("prod-a-control-plane", state))) else {
                panic!("{state} is not a confirmation")
            };
            assert_eq!(err.code(), "KB-LIFE-004", "{err}");
            assert!(err.to_string().contains(state), "{err}");
        }
        // Another group's instance: never this group's action.
        let Verdict::Refused(err) = vet(&a, Some(&at("prod-a-workers", "Terminating:Wait"))) else {
            panic!("another group")
        };
        assert_eq!(err.code(), "KB-LIFE-004", "{err}");
    }

    #[test]
    fn an_unconfirmed_notice_is_kept_until_the_hooks_timeout_and_looked_at_ever_less_often() {
        use std::time::UNIX_EPOCH;
        let sent = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hook = Duration::from_secs(900);
        let margin = Duration::from_secs(60);
        let deadline = notice_deadline(Some(sent), hook, margin).expect("deadline");
        assert_eq!(deadline, sent + Duration::from_secs(960));
        assert_eq!(notice_deadline(None, hook, margin), None);
        let every = Duration::from_secs(60);
        let looks = |deadline, every| {
            let (mut now, mut looks) = (sent, vec![]);
            while now < deadline {
                looks.push(now.duration_since(sent).unwrap().as_secs());
                now += deferral(sent, every, now, deadline);
            }
            (looks, now)
        };
        let (seen, end) = looks(deadline, every);
        // While the hook may wait (900 s): every few minutes at most.
        assert_eq!(seen, [0, 60, 120, 240, 480]);
        assert!(end <= deadline + Duration::from_secs(1), "{end:?}");
        // Within the lifecycle queue's redrive policy (maxReceiveCount 10)
        // even for AWS's largest hook timeout at the shortest heartbeat.
        let deadline = notice_deadline(Some(sent), MAX_HOOK_HEARTBEAT_TIMEOUT, margin).unwrap();
        for every in [Duration::from_secs(10), every] {
            let (seen, _) = looks(deadline, every);
            assert!(seen.len() < 10, "{seen:?}");
        }
        assert_eq!(
            deferral(sent, every, deadline, deadline),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn eventbridge_events_and_hook_notifications_both_parse() {
        let eventbridge = format!(
            r#"{{"version":"0","id":"12345678-1234-1234-1234-123456789012","detail-type":"EC2 Instance-terminate Lifecycle Action","source":"aws.autoscaling","account":"123456789012","time":"2026-11-22T00:00:00Z","region":"us-east-1","resources":["arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:x"],"detail":{{{FIELDS}}}}}"#
        );
        assert_eq!(
            parse_message(&eventbridge).expect("eventbridge"),
            terminating()
        );
        let direct = format!(
            r#"{{"Service":"AWS Auto Scaling","Time":"2026-11-22T00:00:00.000Z","RequestId":"r","AccountId":"123456789012",{FIELDS}}}"#
        );
        assert_eq!(parse_message(&direct).expect("hook"), terminating());
    }

    #[test]
    fn test_notifications_and_launches_are_not_terminations() {
        let test = r#"{"AccountId":"123456789012","RequestId":"r","AutoScalingGroupARN":"arn","AutoScalingGroupName":"g","Service":"AWS Auto Scaling","Event":"autoscaling:TEST_NOTIFICATION","Time":"2026-11-22T00:00:00.000Z"}"#;
        assert_eq!(parse_message(test).expect("test"), Event::Test);
        let launch = FIELDS.replace("TERMINATING", "LAUNCHING");
        assert_eq!(
            parse_message(&format!("{{{launch}}}")).expect("launch"),
            Event::Ignored("autoscaling:EC2_INSTANCE_LAUNCHING".into())
        );
    }

    #[test]
    fn malformed_messages_say_what_is_missing() {
        for (body, expected) in [
            ("nonsense", "not JSON"),
            (r#"{"detail-type":"x","detail":null}"#, "without detail"),
            (
                r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING"}"#,
                "no EC2InstanceId",
            ),
            (
                r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING","EC2InstanceId":"$(id)"}"#,
                "not an instance id",
            ),
            ("{}", "no LifecycleTransition"),
        ] {
            let e = parse_message(body).expect_err(body);
            assert!(e.to_string().contains(expected), "{body}: {e}");
        }
    }
}
