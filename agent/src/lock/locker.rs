//! [`Locker`]: acquiring a free lock, and taking over a dead holder's only
//! after watching its record version stand still for `lease + margin` on
//! our own clock.

use super::{
    new_rvn, Claim, Error, Guard, LockItem, LockStore, Owner, Purpose, Settings, StoreError,
    StoreErrorClass,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

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
