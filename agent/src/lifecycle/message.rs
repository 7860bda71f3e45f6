//! Queue messages, pure: parsing a body, vetting a notice against Auto
//! Scaling's view, and how long an unconfirmed notice is kept and hidden.

use super::Error;
use crate::aws::autoscaling::{Action, Placement, TERMINATING};
use serde::Deserialize;
use std::time::Duration;

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

pub(super) fn hook_heartbeat_timeout() -> Duration {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;

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
