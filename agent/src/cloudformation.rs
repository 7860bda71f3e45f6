//! CloudFormation: a bootstrapped control plane signals its stack.
//!
//! The control-plane group's UpdatePolicy (`AutoScalingRollingUpdate` with
//! `MaxBatchSize` 1 and `WaitOnResourceSignals`) replaces one control plane
//! at a time and waits for a SUCCESS signal from the replacement before the
//! next old one goes. That signal is this node's word that its etcd member
//! is started, voting, healthy and recorded (I2) — so it is sent only after
//! `kubeboot bootstrap` succeeded, never before.
//!
//! **Once per node.** CloudFormation counts any SUCCESS it receives for the
//! group while an update waits, whoever sends it: an *old* control plane
//! that rebooted during the update would count as the replacement and let
//! the next old one go before the new member exists. So the node records
//! its signal in `<paths.state_dir>/stack-signal.json` *before* sending it
//! and what became of it after: once CloudFormation has answered (taken,
//! already counted, or "no signal expected" outside a create or update,
//! logged at info) no later start signals that stack and resource again; a
//! refused signal (certainly not counted) is sent again by the next start;
//! one whose answer never came (maybe counted) only within
//! [`RESEND_WINDOW`] of its first attempt.
//!
//! **Never FAILURE.** A failed bootstrap sends nothing. Most bootstrap
//! failures end in a systemd restart that may well succeed (a lock held by
//! a slow peer, join material being refreshed, etcd busy), and the agent
//! cannot tell those from the permanent ones; a FAILURE is final for the
//! whole update (CloudFormation fails it at once and rolls back, replacing
//! control planes again while one may be half-joined). Silence has the same
//! safe end without the guess: the update waits out its `PauseTime` while
//! systemd retries, and then rolls back.
//!
//! **A failed signal never fails bootstrap**: the node is a good member
//! whatever CloudFormation says. It is a warning with a catalogue code and
//! the `StackSignalFailed` metric; the waiting update times out and rolls
//! back (the safe direction), and `systemctl restart kubeboot-bootstrap`
//! signals again meanwhile.
//!
//! The call uses the SDK's retries and timeouts from `[aws]`, like every
//! other AWS call; nothing loops around it.

use crate::config::model::Role;
use crate::config::Config;
use crate::retry::{classify_sdk_error, RetryClass};
use aws_sdk_cloudformation::error::ProvideErrorMetadata;
use aws_sdk_cloudformation::types::ResourceSignalStatus;

/// The error code CloudFormation answers a signal it does not take with.
pub const VALIDATION_ERROR: &str = "ValidationError";

/// What CloudFormation says when the resource awaits no signal: the stack
/// or resource is not being created or updated ("Stack arn:... is in
/// CREATE_COMPLETE state and cannot be signaled"), or is but not waiting for
/// signals ("... is not in a state to accept signals").
const NOT_EXPECTED_PHRASES: &[&str] = &[
    "cannot be signaled",
    "can not be signaled",
    "not in a state to accept signals",
];

/// What CloudFormation says to a second SUCCESS with a UniqueId it has
/// counted ("Signal with ID i-... already exists. Signals may only be
/// updated with a FAILURE status."; the wording of the API's open
/// implementations, AWS documents none): an earlier answer was lost.
const ALREADY_COUNTED_PHRASE: &str = "already exists";

/// The resource this node signals.
pub struct Stack {
    client: aws_sdk_cloudformation::Client,
    /// The stack's name (`aws.cloudformation_stack`).
    pub stack: String,
    /// The control-plane group's logical id (`aws.cloudformation_resource`).
    pub resource: String,
}

/// How a signal ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signalled {
    /// CloudFormation counted it.
    Taken,
    /// No signal was expected (no create or update waits for one); what
    /// CloudFormation said.
    NotExpected(String),
    /// Counted before (an earlier attempt's answer was lost); what
    /// CloudFormation said.
    AlreadyCounted(String),
}

/// A signal CloudFormation did not take.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CloudFormation refused the signal for {resource} in stack {stack}: {message}")]
    Refused {
        stack: String,
        resource: String,
        message: String,
    },
    #[error("CloudFormation did not answer the signal for {resource} in stack {stack} (after the SDK's retries): {message}")]
    Unavailable {
        stack: String,
        resource: String,
        message: String,
    },
}

/// What one answer means, from its error code, message and retry class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No signal was expected: the usual answer outside a create or update.
    NotExpected,
    /// This UniqueId's SUCCESS was counted before.
    AlreadyCounted,
    /// Refused for good: permissions, a stack or resource that does not
    /// exist (a misnamed key), a malformed request.
    Refused,
    /// Throttled, 5xx or timed out after the SDK's attempts.
    Unavailable,
}

/// Classifies a failed SignalResource. Only the two phrases CloudFormation
/// uses for a resource awaiting no signal mean "not expected"; a
/// ValidationError for a stack or resource that does not exist is a
/// misnamed key (a node's own stack exists while it runs) and is refused.
pub fn verdict(code: Option<&str>, message: Option<&str>, class: RetryClass) -> Verdict {
    let message = message.unwrap_or_default().to_ascii_lowercase();
    if code == Some(VALIDATION_ERROR) {
        if NOT_EXPECTED_PHRASES.iter().any(|p| message.contains(p)) {
            return Verdict::NotExpected;
        }
        if message.contains(ALREADY_COUNTED_PHRASE) {
            return Verdict::AlreadyCounted;
        }
    }
    match class {
        RetryClass::Transient => Verdict::Unavailable,
        RetryClass::Permanent => Verdict::Refused,
    }
}

impl Stack {
    /// The stack to signal, when this node is a control plane configured
    /// with both keys (configuration refuses them anywhere else).
    pub fn from_config(base: &aws_config::SdkConfig, cfg: &Config) -> Option<Stack> {
        if cfg.node.role != Role::ControlPlane {
            return None;
        }
        let (Some(stack), Some(resource)) = (
            cfg.aws.cloudformation_stack.clone(),
            cfg.aws.cloudformation_resource.clone(),
        ) else {
            return None;
        };
        Some(Stack {
            client: crate::aws::cloudformation_client(base, cfg),
            stack,
            resource,
        })
    }

    /// Sends SUCCESS for `unique_id` (the instance id, as CloudFormation
    /// asks for Auto Scaling groups).
    pub async fn signal_success(&self, unique_id: &str) -> Result<Signalled, Error> {
        let sent = self
            .client
            .signal_resource()
            .stack_name(&self.stack)
            .logical_resource_id(&self.resource)
            .unique_id(unique_id)
            .status(ResourceSignalStatus::Success)
            .send()
            .await;
        let err = match sent {
            Ok(_) => return Ok(Signalled::Taken),
            Err(e) => e,
        };
        let message = match err.message() {
            Some(m) => m.to_string(),
            None => aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
        };
        let (stack, resource) = (self.stack.clone(), self.resource.clone());
        match verdict(err.code(), err.message(), classify_sdk_error(&err)) {
            Verdict::NotExpected => Ok(Signalled::NotExpected(message)),
            Verdict::AlreadyCounted => Ok(Signalled::AlreadyCounted(message)),
            Verdict::Refused => Err(Error::Refused {
                stack,
                resource,
                message,
            }),
            Verdict::Unavailable => Err(Error::Unavailable {
                stack,
                resource,
                message,
            }),
        }
    }
}

/// After a successful bootstrap: signal the stack if configured, log the
/// outcome, count a failure. Never fails (see the module's documentation).
pub async fn signal_in_service(base: &aws_config::SdkConfig, cfg: &Config, instance_id: &str) {
    let Some(target) = Stack::from_config(base, cfg) else {
        return;
    };
    let (stack, resource) = (target.stack.as_str(), target.resource.as_str());
    let path = marker_path(cfg);
    let now = unix_now();
    let earlier = Answered::load(&path)
        .filter(|a| a.stack == stack && a.resource == resource && a.unique_id == instance_id);
    let first_attempt = match decide(earlier.as_ref(), now) {
        Decision::Send { first_attempt } => first_attempt,
        Decision::Skip(why) => {
            tracing::info!(
                stack,
                resource,
                unique_id = instance_id,
                "{why}; not signalling again (a later update waits for its new instances only)"
            );
            return;
        }
    };
    let record = |answer: Answer| {
        let done = Answered {
            stack: stack.to_string(),
            resource: resource.to_string(),
            unique_id: instance_id.to_string(),
            answer,
            first_attempt,
        };
        if let Err(e) = done.save(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the stack signal's state; the next start may signal again");
        }
    };
    // Recorded before the call: if the answer never comes (or the agent is
    // stopped), the next start knows CloudFormation may have counted it.
    record(Answer::Pending);
    match target.signal_success(instance_id).await {
        Ok(Signalled::Taken) => {
            record(Answer::Taken);
            tracing::info!(
                stack,
                resource,
                unique_id = instance_id,
                "signalled SUCCESS to the stack: this control plane is in service"
            )
        }
        Ok(Signalled::AlreadyCounted(answer)) => {
            record(Answer::Taken);
            tracing::info!(
                stack,
                resource,
                unique_id = instance_id,
                %answer,
                "the stack had already counted this control plane's signal (an earlier answer was lost)"
            )
        }
        Ok(Signalled::NotExpected(answer)) => {
            record(Answer::NotExpected);
            tracing::info!(
                stack,
                resource,
                unique_id = instance_id,
                %answer,
                "the stack expected no signal (no create or update waits for this group)"
            )
        }
        Err(e) => {
            // A refusal was certainly not counted: the next start may send
            // again. An unanswered signal stays Pending (maybe counted).
            if matches!(e, Error::Refused { .. }) {
                record(Answer::Refused);
            }
            crate::metrics::record(crate::metrics::STACK_SIGNAL_FAILED, 1.0, &[]);
            crate::catalogue::report!(
                warn,
                e,
                stack,
                resource,
                unique_id = instance_id,
                "cannot signal the stack"
            );
        }
    }
}

/// How long after its first attempt a signal whose answer never came may
/// be sent again: CloudFormation's longest `PauseTime` (1 h), the longest
/// a rolling update waits for this instance. Later, a resend could only be
/// counted by a later update waiting for *other* instances.
pub const RESEND_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// What an earlier start recorded about this node's signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Answer {
    /// Sent, no answer yet (lost, or the agent stopped): maybe counted.
    Pending,
    /// Counted.
    Taken,
    /// No create or update waited for it.
    NotExpected,
    /// Refused (denied, misnamed, malformed): certainly not counted.
    Refused,
}

/// Whether this start signals. Pure, so the rule is tested alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Send { first_attempt: u64 },
    Skip(&'static str),
}

fn decide(earlier: Option<&Answered>, now: u64) -> Decision {
    let Some(e) = earlier else {
        return Decision::Send { first_attempt: now };
    };
    match e.answer {
        Answer::Taken => Decision::Skip("the stack counted this control plane's signal at an earlier start"),
        Answer::NotExpected => Decision::Skip("the stack expected no signal at an earlier start"),
        Answer::Refused => Decision::Send { first_attempt: e.first_attempt },
        Answer::Pending if now < e.first_attempt.saturating_add(RESEND_WINDOW.as_secs()) => {
            Decision::Send { first_attempt: e.first_attempt }
        }
        Answer::Pending => Decision::Skip("an earlier start's signal went unanswered more than an hour ago (CloudFormation's longest PauseTime)"),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `<paths.state_dir>/stack-signal.json`: what became of this node's signal.
fn marker_path(cfg: &Config) -> std::path::PathBuf {
    cfg.paths.state_dir.join("stack-signal.json")
}

/// The record of this node's signal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Answered {
    stack: String,
    resource: String,
    unique_id: String,
    answer: Answer,
    /// Unix seconds of the first attempt.
    first_attempt: u64,
}

impl Answered {
    /// The record, if present and readable (an unreadable one counts as
    /// absent: signalling again is the lesser harm than never signalling).
    fn load(path: &std::path::Path) -> Option<Answered> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Written whole (temporary file, then rename).
    fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Refused { .. } => &crate::catalogue::STACK_SIGNAL_REFUSED,
            E::Unavailable { .. } => &crate::catalogue::STACK_SIGNAL_UNAVAILABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_sent_until_answered_and_a_lost_answer_only_within_the_pause_time() {
        let rec = |answer, first_attempt| Answered {
            stack: "prod".into(),
            resource: "ControlPlaneGroup".into(),
            unique_id: "i-0123".into(),
            answer,
            first_attempt,
        };
        let now = 1_000_000;
        assert_eq!(decide(None, now), Decision::Send { first_attempt: now });
        assert!(matches!(
            decide(Some(&rec(Answer::Taken, 10)), now),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(Some(&rec(Answer::NotExpected, 10)), now),
            Decision::Skip(_)
        ));
        assert_eq!(
            decide(Some(&rec(Answer::Refused, 10)), now),
            Decision::Send { first_attempt: 10 },
            "a refusal was not counted: send again, however late"
        );
        let hour = RESEND_WINDOW.as_secs();
        assert_eq!(
            decide(Some(&rec(Answer::Pending, now - hour + 1)), now),
            Decision::Send {
                first_attempt: now - hour + 1
            }
        );
        assert!(
            matches!(
                decide(Some(&rec(Answer::Pending, now - hour)), now),
                Decision::Skip(_)
            ),
            "past the longest PauseTime a resend could only count for another instance"
        );
    }

    #[test]
    fn the_record_round_trips_and_a_torn_one_counts_as_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("stack-signal.json");
        assert_eq!(Answered::load(&path), None);
        let a = Answered {
            stack: "prod".into(),
            resource: "ControlPlaneGroup".into(),
            unique_id: "i-0123".into(),
            answer: Answer::Pending,
            first_attempt: 42,
        };
        a.save(&path).expect("saved");
        assert_eq!(Answered::load(&path), Some(a));
        std::fs::write(&path, b"{ torn").expect("write");
        assert_eq!(Answered::load(&path), None);
    }

    #[test]
    fn only_a_resource_awaiting_no_signal_is_not_expected() {
        let p = RetryClass::Permanent;
        for message in [
            "Stack arn:aws:cloudformation:eu-west-1:123456789012:stack/prod/1 is in CREATE_COMPLETE state and cannot be signaled",
            "Stack arn:aws:cloudformation:eu-west-1:123456789012:stack/prod/1 is in UPDATE_COMPLETE state and cannot be signaled",
            "Resource ControlPlaneGroup is not in a state to accept signals",
            "Resource ControlPlaneGroup is in UPDATE_COMPLETE state and can not be signaled",
        ] {
            assert_eq!(
                verdict(Some("ValidationError"), Some(message), p),
                Verdict::NotExpected,
                "{message}"
            );
        }
        assert_eq!(
            verdict(
                Some("ValidationError"),
                Some("Signal with ID i-0123 already exists. Signals may only be updated with a FAILURE status."),
                p
            ),
            Verdict::AlreadyCounted
        );
        // A misnamed stack or resource never waits for anything: refused.
        for message in [
            "Stack with id prod does not exist",
            "Resource ControlPlaneGroupX does not exist for stack prod",
        ] {
            assert_eq!(
                verdict(Some("ValidationError"), Some(message), p),
                Verdict::Refused,
                "{message}"
            );
        }
        assert_eq!(
            verdict(Some("AccessDenied"), Some("User ... is not authorized to perform: cloudformation:SignalResource ... cannot be signaled"), p),
            Verdict::Refused,
            "only a ValidationError means not expected"
        );
        assert_eq!(
            verdict(
                Some("Throttling"),
                Some("Rate exceeded"),
                RetryClass::Transient
            ),
            Verdict::Unavailable
        );
        assert_eq!(
            verdict(None, None, RetryClass::Transient),
            Verdict::Unavailable
        );
    }

    #[test]
    fn every_failure_says_bootstrap_succeeded_and_the_update_rolls_back() {
        use crate::catalogue::Coded;
        let refused = Error::Refused {
            stack: "prod".into(),
            resource: "ControlPlaneGroup".into(),
            message: "denied".into(),
        };
        let unavailable = Error::Unavailable {
            stack: "prod".into(),
            resource: "ControlPlaneGroup".into(),
            message: "Rate exceeded".into(),
        };
        assert_eq!(refused.code(), "KB-STACK-001");
        assert_eq!(unavailable.code(), "KB-STACK-002");
        for e in [&refused, &unavailable] {
            let hint = e.hint();
            assert!(
                hint.contains("bootstrap still succeeded") && hint.contains("rolls back"),
                "{hint}"
            );
            assert!(
                hint.contains("systemctl restart kubeboot-bootstrap"),
                "{hint}"
            );
        }
        assert!(refused.hint().contains("cloudformation:SignalResource"));
    }
}
