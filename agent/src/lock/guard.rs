//! [`Guard`]: a held lock, its renewal task (self-fencing when renewals
//! stop succeeding) and its release.

use super::{
    new_rvn, Error, Fence, LockItem, LockStore, Owner, Purpose, Settings, StoreError,
    StoreErrorClass, WallClock,
};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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
    pub(super) fence: u64,
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
    pub(super) fn start<S: LockStore>(
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

    /// Runs `work` with the lock held, then releases it whatever `work`
    /// returned, so no early return forgets the release. A failed release is
    /// logged and left to the lease, which expires on its own; a caller that
    /// must act on a failed release (the init lock, the leader loop) calls
    /// [`Guard::release`] itself.
    pub async fn scoped<T>(self, work: impl AsyncFnOnce(&Guard) -> T) -> T {
        let out = work(&self).await;
        let purpose = self.purpose;
        if let Err(e) = self.release().await {
            crate::catalogue::report!(warn, e, lock = %purpose, "cannot release the lock; its lease expires on its own");
        }
        out
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
        use crate::retry::Attempt::{Again, Stop};
        let rvn = std::sync::Mutex::new(rvn);
        let store_error = |source| Error::Store {
            purpose: self.purpose,
            source,
        };
        crate::retry::with_attempts("release lock", RELEASE_FIRST_DELAY, RELEASE_ATTEMPTS, || async {
            let current = rvn.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let failed = match self.release.release(&self.owner, &current, wall).await {
                Ok(true) => {
                    tracing::info!(lock = %self.purpose, fence = self.fence, "lock released");
                    return Ok(());
                }
                // The record moved (a renewal in flight): read it back.
                Ok(false) => None,
                Err(e) if e.class == StoreErrorClass::Permanent => {
                    return Err(Stop(store_error(e)))
                }
                // A transaction conflict (the registry's fence check reading
                // this item) or throttling passes in moments: read back, and
                // try again after a pause unless the release had applied.
                Err(e) => Some(e),
            };
            match self.release.read().await {
                Ok(Some(item))
                    if item.owner == self.owner && item.fence == self.fence && !item.released =>
                {
                    *rvn.lock().unwrap_or_else(PoisonError::into_inner) = item.rvn;
                    Err(Again(store_error(failed.unwrap_or(StoreError {
                        class: StoreErrorClass::Transient,
                        operation: "release lock",
                        message: format!(
                            "the lock record moved under the release; still ours after {RELEASE_ATTEMPTS} attempts, it expires after its lease"
                        ),
                    }))))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(Again(store_error(e))),
            }
        })
        .await
    }
}

/// Attempts of a release before it is left to expire with its lease, and
/// the pause after the first, doubled each time.
const RELEASE_ATTEMPTS: usize = 3;
const RELEASE_FIRST_DELAY: Duration = Duration::from_millis(100);

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
