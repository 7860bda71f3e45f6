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

pub use crate::table::{StoreError, StoreErrorClass};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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
}

impl Purpose {
    /// Every purpose, for status output.
    pub const ALL: [Purpose; 3] = [Purpose::Init, Purpose::Membership, Purpose::Leader];

    /// The name used in the item key (`LOCK#init`) and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Init => "init",
            Purpose::Membership => "membership",
            Purpose::Leader => "leader",
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

/// Takes locks for one owner.
pub struct Locker<S> {
    store: Arc<S>,
    owner: Owner,
    settings: Settings,
    /// What [`Locker::try_acquire`] has seen of each lock's holder, kept
    /// across calls: a caller that never waits (the reconciler, once per
    /// turn) can only take over a dead holder's lease by remembering since
    /// when its record version stood still.
    observed: Mutex<HashMap<Purpose, Watch>>,
}

impl<S: LockStore> Locker<S> {
    pub fn new(store: Arc<S>, owner: Owner, settings: Settings) -> Self {
        Locker {
            store,
            owner,
            settings,
            observed: Mutex::new(HashMap::new()),
        }
    }

    /// Who we are.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Waits (up to `acquire_timeout`) for the lock and returns a guard that renews it.
    pub async fn acquire(&self, purpose: Purpose) -> Result<Guard, Error> {
        let started = Instant::now();
        let deadline = started + self.settings.acquire_timeout;
        let mut watch = Watch::default();
        loop {
            if let Some(guard) = self.attempt(purpose, &mut watch).await? {
                tracing::info!(lock = %purpose, fence = guard.fence, waited_ms = started.elapsed().as_millis() as u64, "lock acquired");
                crate::metrics::record(
                    crate::metrics::LOCK_WAIT,
                    crate::metrics::ms(started.elapsed()),
                    &[("Purpose", purpose.as_str())],
                );
                return Ok(guard);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    purpose,
                    waited: now - started,
                    holder: watch.holder,
                });
            }
            tokio::time::sleep_until(
                watch
                    .next_attempt(
                        now,
                        self.settings.heartbeat_interval(),
                        self.settings.margin,
                    )
                    .min(deadline),
            )
            .await;
        }
    }

    /// One attempt without waiting: the guard if the lock was free, or if
    /// its holder's record version has stood still for lease + margin since
    /// an earlier call first saw it (on our monotonic clock); else `None`.
    pub async fn try_acquire(&self, purpose: Purpose) -> Result<Option<Guard>, Error> {
        let mut watch = self.observed().get(&purpose).cloned().unwrap_or_default();
        let result = self.attempt(purpose, &mut watch).await;
        match &result {
            Ok(None) => {
                self.observed().insert(purpose, watch);
            }
            // Ours now, or the store failed for good: start afresh next time.
            _ => {
                self.observed().remove(&purpose);
            }
        }
        result
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, HashMap<Purpose, Watch>> {
        self.observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims the lock if free, or takes it over if the holder's record version
    /// stood still for its lease plus our margin on our clock; otherwise
    /// updates what we have seen of the holder.
    async fn attempt(&self, purpose: Purpose, watch: &mut Watch) -> Result<Option<Guard>, Error> {
        let rvn = new_rvn();
        let claim = self.claim(&rvn);
        // The trust window of a claim starts when it is *sent*: a waiter may
        // have seen our record version at any moment after that.
        let sent = Instant::now();
        let trust = self.settings.trust_window();
        let call = async {
            match watch.expired(Instant::now(), self.settings.margin) {
                Some(seen) => self.store.take_over(purpose, &seen, &claim).await,
                None => self.store.acquire_free(purpose, &claim).await,
            }
        };
        let result = tokio::time::timeout(trust, call)
            .await
            .unwrap_or(Err(StoreError {
                class: StoreErrorClass::OutcomeUnknown,
                operation: "claim lock",
                message: "no answer within lease - margin".into(),
            }));
        let mut claimed = match result {
            Ok(Some(item)) => Some(item),
            // "Held", no answer, or "unavailable": our claim may still have
            // applied (the SDK retries a request whose answer was lost, and
            // the retry fails against our own write), so the read decides.
            Ok(None) => None,
            Err(e) if e.class == StoreErrorClass::Permanent => {
                return Err(Error::Store { purpose, source: e })
            }
            Err(e) => {
                watch.failures += 1;
                tracing::warn!(lock = %purpose, error = %e, failures = watch.failures, "lock claim failed, reading back");
                None
            }
        };
        if claimed.is_none() {
            match self.store.read(purpose).await {
                Ok(Some(item))
                    if item.owner == self.owner.as_str() && item.rvn == rvn && !item.released =>
                {
                    tracing::info!(lock = %purpose, "our claim had applied although its answer said otherwise (read back)");
                    claimed = Some(item);
                }
                Ok(Some(item)) if !item.released => {
                    watch.failures = 0;
                    watch.saw(item, Instant::now());
                }
                Ok(_) => {
                    watch.failures = 0;
                    watch.seen = None;
                }
                Err(e) if e.class == StoreErrorClass::Permanent => {
                    return Err(Error::Store { purpose, source: e })
                }
                Err(e) => {
                    watch.failures += 1;
                    tracing::warn!(lock = %purpose, error = %e, "cannot read lock, retrying");
                }
            }
        }
        let Some(item) = claimed else { return Ok(None) };
        if Instant::now() >= sent + trust {
            // Too late to trust: another node may already be entitled to take
            // over. Give it back (conditioned on our rvn) and try again.
            tracing::warn!(lock = %purpose, "lock claim confirmed only after lease - margin; giving it back");
            let _ = self
                .store
                .release(
                    purpose,
                    self.owner.as_str(),
                    &item.rvn,
                    (self.settings.wall_clock)(),
                )
                .await;
            return Ok(None);
        }
        Ok(Some(self.guard(purpose, item, sent)))
    }

    fn guard(&self, purpose: Purpose, item: LockItem, sent: Instant) -> Guard {
        Guard::start(
            self.store.clone(),
            purpose,
            &self.owner,
            item,
            sent,
            self.settings.clone(),
        )
    }

    fn claim<'a>(&'a self, rvn: &'a str) -> Claim<'a> {
        Claim {
            owner: self.owner.as_str(),
            rvn,
            lease: self.settings.lease,
            wall: (self.settings.wall_clock)(),
        }
    }

    /// Operator override: watches the lock for `lease + margin` on our own
    /// clock and releases it (bumping the fence) only if nobody renewed it.
    pub async fn force_release(&self, purpose: Purpose) -> Result<LockItem, Error> {
        let store_err = |source| Error::Store { purpose, source };
        let first = self.store.read(purpose).await.map_err(store_err)?;
        let Some(first) = first.filter(|i| !i.released) else {
            return Err(Error::NotHeld { purpose });
        };
        tokio::time::sleep(first.lease + self.settings.margin).await;
        let wall = (self.settings.wall_clock)();
        match self
            .store
            .force_release(purpose, &first.rvn, wall)
            .await
            .map_err(store_err)?
        {
            Some(item) => Ok(item),
            None => Err(Error::HolderAlive {
                purpose,
                holder: first.owner,
            }),
        }
    }
}

/// What a waiter has seen of the holder, on its own monotonic clock.
#[derive(Debug, Default, Clone)]
struct Watch {
    /// Record version, the holder's lease, and when we first saw that version.
    seen: Option<(String, Duration, Instant)>,
    holder: Option<String>,
    failures: u32,
}

impl Watch {
    fn saw(&mut self, item: LockItem, now: Instant) {
        self.holder = Some(item.owner.clone());
        match &self.seen {
            Some((rvn, _, _)) if *rvn == item.rvn => {}
            _ => {
                tracing::debug!(holder = %item.owner, "lock held; watching its record version");
                self.seen = Some((item.rvn, item.lease, now));
            }
        }
    }

    /// The record version to take over, if it stood still for lease + margin.
    fn expired(&self, now: Instant, margin: Duration) -> Option<String> {
        match &self.seen {
            Some((rvn, lease, at)) if now >= *at + *lease + margin => Some(rvn.clone()),
            _ => None,
        }
    }

    /// When to look again: at the takeover instant if it comes sooner than the
    /// next poll; with a growing pause while the store fails.
    fn next_attempt(&self, now: Instant, poll: Duration, margin: Duration) -> Instant {
        let backoff = Duration::from_millis(200) * self.failures.min(10);
        match &self.seen {
            Some((_, lease, at)) => (*at + *lease + margin).max(now + backoff).min(now + poll),
            None => now + poll.min(Duration::from_millis(200) + backoff),
        }
    }
}

fn new_rvn() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Held,
    Lost(String),
    Released,
}

#[derive(Debug)]
struct HolderState {
    rvn: String,
    /// When the last successful renewal (or the acquisition) was sent.
    last_ok: Instant,
    status: Status,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<HolderState>,
    changed: watch::Sender<()>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HolderState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_lost(&self, reason: String) {
        let mut s = self.lock();
        if s.status == Status::Held {
            s.status = Status::Lost(reason);
            drop(s);
            self.changed.send_replace(());
        }
    }
}

/// A held lock. Renews itself in the background; check [`Guard::is_held`] or
/// await [`Guard::lost`] around guarded work, and attach [`Guard::fence`] to
/// every write that matters.
pub struct Guard {
    purpose: Purpose,
    owner: String,
    fence: u64,
    settings_lease: Duration,
    trust_window: Duration,
    wall_clock: WallClock,
    shared: Arc<Shared>,
    heartbeat: JoinHandle<()>,
    release: Box<dyn ReleaseFn>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("purpose", &self.purpose)
            .field("owner", &self.owner)
            .field("fence", &self.fence)
            .field("held", &self.is_held())
            .finish_non_exhaustive()
    }
}

trait ReleaseFn: Send + Sync {
    fn release<'a>(
        &'a self,
        owner: &'a str,
        rvn: &'a str,
        wall: SystemTime,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send + 'a>>;
    fn read<'a>(
        &'a self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<LockItem>, StoreError>> + Send + 'a>>;
}

struct StoreRelease<S> {
    store: Arc<S>,
    purpose: Purpose,
}

impl<S: LockStore> ReleaseFn for StoreRelease<S> {
    fn release<'a>(
        &'a self,
        owner: &'a str,
        rvn: &'a str,
        wall: SystemTime,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send + 'a>> {
        Box::pin(self.store.release(self.purpose, owner, rvn, wall))
    }
    fn read<'a>(
        &'a self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<LockItem>, StoreError>> + Send + 'a>>
    {
        Box::pin(self.store.read(self.purpose))
    }
}

impl Guard {
    /// `sent`: when the claim that acquired the lock was sent; the trust window starts there.
    fn start<S: LockStore>(
        store: Arc<S>,
        purpose: Purpose,
        owner: &Owner,
        item: LockItem,
        sent: Instant,
        settings: Settings,
    ) -> Guard {
        let acquired_at = sent;
        let (changed, _) = watch::channel(());
        let shared = Arc::new(Shared {
            state: Mutex::new(HolderState {
                rvn: item.rvn.clone(),
                last_ok: acquired_at,
                status: Status::Held,
            }),
            changed,
        });
        let heartbeat = tokio::spawn(heartbeat_loop(
            store.clone(),
            purpose,
            owner.as_str().to_string(),
            shared.clone(),
            settings.clone(),
            acquired_at,
        ));
        Guard {
            purpose,
            owner: owner.as_str().to_string(),
            fence: item.fence,
            settings_lease: settings.lease,
            trust_window: settings.trust_window(),
            wall_clock: settings.wall_clock.clone(),
            shared,
            heartbeat,
            release: Box::new(StoreRelease { store, purpose }),
        }
    }

    /// Which lock this is.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// Whether we may still act as holder: not lost, not released, and renewed
    /// within `lease - margin` on our own monotonic clock.
    pub fn is_held(&self) -> bool {
        let s = self.shared.lock();
        s.status == Status::Held && Instant::now() < s.last_ok + self.trust_window
    }

    /// The token for fenced writes; an error once the lock is not held.
    pub fn fence(&self) -> Result<Fence, Error> {
        if self.is_held() {
            Ok(Fence {
                purpose: self.purpose,
                value: self.fence,
            })
        } else {
            Err(Error::Lost {
                purpose: self.purpose,
                reason: self.lost_reason(),
            })
        }
    }

    /// Why the lock is not held (or "held").
    pub fn lost_reason(&self) -> String {
        let s = self.shared.lock();
        match &s.status {
            Status::Held if Instant::now() < s.last_ok + self.trust_window => "held".into(),
            Status::Held => format!(
                "no successful renewal within lease - margin ({})",
                crate::config::value::format_duration(self.trust_window)
            ),
            Status::Lost(reason) => reason.clone(),
            Status::Released => "released".into(),
        }
    }

    /// Records that a fenced write was refused: whatever the clock says, we lost.
    pub fn mark_lost(&self, reason: impl Into<String>) {
        self.shared.set_lost(reason.into());
    }

    /// Completes when the lock is lost; race it against the guarded work.
    pub async fn lost(&self) {
        let mut rx = self.shared.changed.subscribe();
        loop {
            let deadline = {
                let s = self.shared.lock();
                if s.status != Status::Held {
                    return;
                }
                s.last_ok + self.trust_window
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The lease this guard was acquired with.
    pub fn lease(&self) -> Duration {
        self.settings_lease
    }

    /// Stops renewing and releases the lock, conditioned on this guard's own
    /// acquisition: the owner is per process and the daemon's loops share
    /// it, so only the fence tells this guard's hold from another loop's.
    pub async fn release(self) -> Result<(), Error> {
        self.heartbeat.abort();
        let rvn = {
            let mut s = self.shared.lock();
            if s.status != Status::Held {
                return Ok(());
            }
            s.status = Status::Released;
            s.rvn.clone()
        };
        let wall = (self.wall_clock)();
        // A renewal already in flight when we stopped the heartbeat can land
        // after this and move the record version: read back and release
        // again with what is there, while the record is still this guard's
        // (our owner *and* our fence: a takeover, even by another loop of
        // this process, bumps the fence).
        let mut rvn = rvn;
        let mut last_error = None;
        for attempt in 0..RELEASE_ATTEMPTS {
            match self.release.release(&self.owner, &rvn, wall).await {
                Ok(true) => {
                    tracing::info!(lock = %self.purpose, fence = self.fence, "lock released");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) if e.class == StoreErrorClass::Permanent => {
                    return Err(Error::Store {
                        purpose: self.purpose,
                        source: e,
                    })
                }
                Err(e) => {
                    // A transaction conflict (the registry's fence check
                    // reading this item) or throttling passes in moments;
                    // attempts back to back would all meet it.
                    last_error = Some(e);
                    if attempt + 1 < RELEASE_ATTEMPTS {
                        tokio::time::sleep(RELEASE_BACKOFF * (1 << attempt)).await;
                    }
                }
            }
            match self.release.read().await {
                Ok(Some(item))
                    if item.owner == self.owner && item.fence == self.fence && !item.released =>
                {
                    rvn = item.rvn
                }
                Ok(_) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        Err(Error::Store {
            purpose: self.purpose,
            source: last_error.unwrap_or(StoreError {
                class: StoreErrorClass::Transient,
                operation: "release lock",
                message: format!(
                    "still ours after {RELEASE_ATTEMPTS} attempts; it expires after its lease"
                ),
            }),
        })
    }
}

/// Attempts of a release before it is left to expire with its lease.
const RELEASE_ATTEMPTS: u32 = 3;
/// Wait after a release that failed transiently, doubled each time.
const RELEASE_BACKOFF: Duration = Duration::from_millis(100);

impl Drop for Guard {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// What a renewal attempt turned out to be.
enum Renewal {
    /// This version (sent at this instant) is in the record: we hold.
    Adopt(String, Instant),
    /// The record still has our previous version: try again soon.
    Retry,
    /// Someone else holds it, or it was released.
    Lost,
}

async fn heartbeat_loop<S: LockStore>(
    store: Arc<S>,
    purpose: Purpose,
    owner: String,
    shared: Arc<Shared>,
    settings: Settings,
    acquired_at: Instant,
) {
    let interval = settings.heartbeat_interval();
    let trust = settings.trust_window();
    let mut next = acquired_at + interval;
    // Renewals sent whose fate we do not know yet: (rvn, when sent).
    let mut pending: Vec<(String, Instant)> = Vec::new();
    loop {
        tokio::time::sleep_until(next).await;
        let (old, last_ok) = {
            let s = shared.lock();
            if s.status != Status::Held {
                return;
            }
            (s.rvn.clone(), s.last_ok)
        };
        let fence_at = last_ok + trust;
        let sent = Instant::now();
        if sent >= fence_at {
            tracing::error!(lock = %purpose, "no successful lock renewal within lease - margin: stepping down");
            shared.set_lost("no successful renewal within lease - margin".into());
            return;
        }
        let new = new_rvn();
        let wall = (settings.wall_clock)();
        let outcome = match tokio::time::timeout(
            fence_at - sent,
            store.heartbeat(purpose, &owner, &old, &new, wall),
        )
        .await
        {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError {
                class: StoreErrorClass::OutcomeUnknown,
                operation: "heartbeat",
                message: "no answer before the self-fencing deadline".into(),
            }),
        };
        let applied = match outcome {
            Ok(true) => Renewal::Adopt(new, sent),
            // Refused, no answer, or "unavailable": a renewal can have applied
            // anyway (answer lost, then the SDK's retry refused by our own
            // write or throttled), so only the record can tell. Any of our
            // pending versions found there is adopted with its own send time.
            other => {
                if let Err(e) = &other {
                    tracing::warn!(lock = %purpose, error = %e, "lock renewal failed; reading back");
                }
                pending.push((new, sent));
                match store.read(purpose).await {
                    Ok(Some(item)) if item.owner == owner && !item.released => {
                        match pending.iter().find(|(rvn, _)| *rvn == item.rvn) {
                            Some((rvn, at)) => Renewal::Adopt(rvn.clone(), *at),
                            None if item.rvn == old => Renewal::Retry,
                            None => Renewal::Lost,
                        }
                    }
                    Ok(_) => Renewal::Lost,
                    Err(_) => Renewal::Retry,
                }
            }
        };
        match applied {
            Renewal::Adopt(rvn, at) => {
                pending.clear();
                let mut s = shared.lock();
                if s.status == Status::Held {
                    s.rvn = rvn;
                    s.last_ok = at;
                }
                next = at + interval;
            }
            Renewal::Lost => {
                tracing::error!(lock = %purpose, "lock renewal refused: another owner holds it now");
                shared.set_lost("renewal refused: another owner holds the lock".into());
                return;
            }
            Renewal::Retry => next = Instant::now() + (interval / 4).max(Duration::from_millis(50)),
        }
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
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
}
