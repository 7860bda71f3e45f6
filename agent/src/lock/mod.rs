//! Lease locks with fencing tokens: one `kubeadm init` per cluster generation,
//! one etcd membership change at a time, one daemon leader.
//!
//! After amazon-dynamodb-lock-client, with its known holes closed:
//! - Acquire a free (absent or released) lock with a conditional write that
//!   also adds 1 to its `fence`; the new fence is the holder's token.
//! - A held lock is never judged by its holder's wall clock. A waiter reads the
//!   record version (`rvn`), notes *its own* monotonic time, and takes over only
//!   if the rvn is still the same `lease + margin` later, with a write
//!   conditioned on that rvn (bumping the fence again).
//! - The holder renews every `lease / 3` with a new rvn conditioned on owner and
//!   current rvn. A failed condition means the lock is gone: stop at once.
//! - Self-fencing: with no successful renewal within `lease - margin` (measured
//!   from when that renewal was *sent*), the holder steps down by itself.
//! - Every write that matters (registry) checks the fence in the same
//!   transaction, so a holder that was paused and did not notice is refused.
//! - A write whose outcome is unknown (timeout) is resolved by a consistent
//!   read-back, never by retrying blindly.
//!
//! Monotonic time is `tokio::time::Instant`, so the seeded simulation in the
//! tests drives this very code on a paused, virtual clock.

pub mod dynamo;
mod guard;
mod locker;

pub use guard::Guard;
pub use locker::Locker;

pub use crate::table::{StoreError, StoreErrorClass};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What a lock serializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// `kubeadm init` and marking the cluster initialized.
    Init,
    /// etcd member add/remove and their records.
    Membership,
    /// The daemon's singleton tasks.
    Leader,
    /// Taking an etcd backup: one upload at a time, so whoever holds it may
    /// abort the uploads a dead holder left open.
    Backup,
}

impl Purpose {
    /// Every purpose, for status output.
    pub const ALL: [Purpose; 4] = [
        Purpose::Init,
        Purpose::Membership,
        Purpose::Leader,
        Purpose::Backup,
    ];

    /// The name used in the item key (`LOCK#init`) and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Init => "init",
            Purpose::Membership => "membership",
            Purpose::Leader => "leader",
            Purpose::Backup => "backup",
        }
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who holds or wants a lock: the instance id and a per-process uuid, so two
/// processes on one node (systemd's and an operator's) are never confused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    /// A fresh owner identity for this process.
    pub fn new(instance_id: &str) -> Self {
        Owner(format!("{instance_id}/{}", uuid::Uuid::new_v4().simple()))
    }

    /// As stored in the lock item.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A lock item as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockItem {
    pub owner: String,
    /// Record version: changes on every write; what waiters watch.
    pub rvn: String,
    /// The holder's lease.
    pub lease: Duration,
    /// Fencing token: +1 on every acquisition, takeover and forced release.
    pub fence: u64,
    pub released: bool,
    /// Holder's wall clock at its last write: for display only, never compared.
    pub heartbeat_at: Option<SystemTime>,
}

/// What a contender writes when it takes a lock.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub owner: &'a str,
    pub rvn: &'a str,
    pub lease: Duration,
    pub wall: SystemTime,
}

/// The conditional writes the algorithm needs. DynamoDB implements it for
/// real ([`dynamo::DynamoLockStore`]); the tests implement it in memory with
/// the same semantics to run seeded simulations on virtual time.
pub trait LockStore: Send + Sync + 'static {
    /// Takes the lock if absent or released, adding 1 to the fence; `None` if held.
    fn acquire_free(
        &self,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send;
    /// Takes a held lock whose rvn is still `observed`, adding 1 to the fence; `None` if it changed.
    fn take_over(
        &self,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send;
    /// Consistent read.
    fn read(
        &self,
        purpose: Purpose,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send;
    /// Replaces `old` rvn with `new` if `owner` still holds with `old`; false if not.
    fn heartbeat(
        &self,
        purpose: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Marks released if `owner` still holds with `rvn`; false if not.
    fn release(
        &self,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Operator's release of a lock whose rvn is still `observed`, adding 1 to
    /// the fence so a holder that is merely slow is fenced out; `None` if it changed.
    fn force_release(
        &self,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send;
}

/// Source of wall-clock time, injectable so tests can skew it.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Lock timing.
#[derive(Clone)]
pub struct Settings {
    pub lease: Duration,
    pub margin: Duration,
    pub acquire_timeout: Duration,
    pub wall_clock: WallClock,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("lease", &self.lease)
            .field("margin", &self.margin)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// From `[lock]`, with the system wall clock.
    pub fn from_config(lock: &crate::config::model::Lock) -> Self {
        Settings {
            lease: lock.lease,
            margin: lock.margin,
            acquire_timeout: lock.acquire_timeout,
            wall_clock: Arc::new(SystemTime::now),
        }
    }

    /// Renewal period: three chances per lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    /// How long after a renewal was sent the holder still trusts it holds.
    pub fn trust_window(&self) -> Duration {
        self.lease.saturating_sub(self.margin)
    }
}

/// The proof of holding a lock, attached to every write that matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fence {
    pub purpose: Purpose,
    pub value: u64,
}

/// Lock failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("timed out after {} waiting for the {purpose} lock held by {}", crate::config::value::format_duration(*waited), holder.as_deref().unwrap_or("nobody (store unreachable?)"))]
    Timeout {
        purpose: Purpose,
        waited: Duration,
        holder: Option<String>,
    },
    #[error("the {purpose} lock was lost: {reason}")]
    Lost { purpose: Purpose, reason: String },
    #[error("{purpose} lock: {source}")]
    Store {
        purpose: Purpose,
        source: StoreError,
    },
    #[error("the {purpose} lock holder {holder} renewed its lease while we watched; refusing to force a release of a live lock")]
    HolderAlive { purpose: Purpose, holder: String },
    #[error("the {purpose} lock is not held by anyone")]
    NotHeld { purpose: Purpose },
}

impl Error {
    /// The AWS call behind this error when it is weather, not a refusal.
    pub fn weather(&self) -> Option<crate::retry::AwsCall> {
        match self {
            Error::Store { source, .. } => source.weather(),
            _ => None,
        }
    }
}

/// A new record version, unique per write.
fn new_rvn() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::{Error as E, StoreErrorClass as C};
        match self {
            E::Timeout { .. } => &crate::catalogue::LOCK_TIMEOUT,
            E::Lost { .. } => &crate::catalogue::LOCK_LOST,
            E::Store { source, .. } => match source.class {
                C::Permanent => &crate::catalogue::LOCK_STORE_DENIED,
                C::Transient | C::OutcomeUnknown => &crate::catalogue::LOCK_STORE_UNAVAILABLE,
            },
            E::HolderAlive { .. } => &crate::catalogue::LOCK_HOLDER_ALIVE,
            E::NotHeld { .. } => &crate::catalogue::LOCK_NOT_HELD,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::Timeout { purpose, .. } => Some(format!(
                "the lock is `{purpose}` (`kubeboot lock release --purpose {purpose} --force`)"
            )),
            _ => None,
        }
    }
}
