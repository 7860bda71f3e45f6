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

mod cleanup;
mod message;
mod own;
mod queue;

pub use cleanup::handle_termination;
pub use message::{
    deferral, notice_deadline, parse_message, vet, Event, Verdict, MAX_HOOK_HEARTBEAT_TIMEOUT,
};
pub use own::{own_termination_due, OwnTermination};
pub use queue::{
    drain_queue, long_poll_wait, wait_for_messages, Ec2, MESSAGES_PER_TURN, RECEIVES_PER_BATCH,
};

use crate::aws::autoscaling::{self, Action, Completion, Hooks};
use crate::aws::ec2;
use crate::aws::sqs::{self, Queue};
use crate::catalogue::Coded;
use crate::etcd;
use crate::lock::{LockStore, Locker};
use crate::registry::{Registry, RegistryStore};
use std::time::Duration;

/// What handling a termination works with, borrowed from the daemon for a
/// turn (its configuration, registry, locker and Auto Scaling hooks): one
/// argument through the handlers instead of four.
pub struct Parts<'a, L: LockStore, R: RegistryStore> {
    pub cfg: &'a crate::config::Config,
    pub registry: &'a Registry<R>,
    pub locker: &'a Locker<L>,
    pub hooks: &'a Hooks,
    /// A snapshot before each removal, when backups and
    /// `backup.before_membership_change` are on.
    pub backups: Option<&'a crate::backup::Backups>,
}

impl<L: LockStore, R: RegistryStore> Clone for Parts<'_, L, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<L: LockStore, R: RegistryStore> Copy for Parts<'_, L, R> {}

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

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
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
