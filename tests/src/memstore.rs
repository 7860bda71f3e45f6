//! An in-memory lock and registry store with DynamoDB's conditional
//! semantics, seeded faults and an audit log, for simulations on virtual time.
//!
//! The lock and registry code under test is the agent's own; only the store
//! is replaced, because a thousand trials of leases measured in seconds can
//! only run on tokio's paused clock, where real network I/O has no place.
//! Each operation mirrors one DynamoDB call of `kubeboot::lock::dynamo` /
//! `kubeboot::registry::dynamo` (same conditions, same fence arithmetic).

use kubeboot::lock::{Claim, Fence, LockItem, LockStore, Purpose, StoreError, StoreErrorClass};
use kubeboot::registry::{
    ClusterState, InitClaim, JoinPointer, MemberRecord, Phase, RefreshRequest, RegistryStore,
    WriteResult,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// SplitMix64: tiny, seedable, good enough to drive a simulation.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform duration in [lo, hi].
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}

/// How often the store misbehaves, per operation.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Fails without applying (throttling after the SDK gave up).
    pub transient: f64,
    /// Applies, then fails as throttled (an attempt whose answer was lost,
    /// then SDK retries throttled): "transient" does not mean "nothing happened".
    pub transient_after: f64,
    /// Times out; did not apply.
    pub lost_before: f64,
    /// Times out; applied.
    pub lost_after: f64,
    /// Applied, but answered as refused (an SDK retry of a lost answer).
    pub refused_after: f64,
    /// The request stalls in flight for `stall` and then still applies, even
    /// if the caller gave up on it (a paused process, a slow network).
    pub stall: f64,
    pub stall_time: (Duration, Duration),
    /// Ordinary latency of every call, before it applies.
    pub latency: (Duration, Duration),
    /// Latency of the answer, after it applied (a slow network back).
    pub answer_latency: (Duration, Duration),
}

impl Faults {
    /// No faults, no latency.
    pub fn none() -> Self {
        Faults {
            transient: 0.0,
            transient_after: 0.0,
            lost_before: 0.0,
            lost_after: 0.0,
            refused_after: 0.0,
            stall: 0.0,
            stall_time: (Duration::ZERO, Duration::ZERO),
            latency: (Duration::ZERO, Duration::ZERO),
            answer_latency: (Duration::ZERO, Duration::ZERO),
        }
    }
}

/// One successful fenced write, for the invariant checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedWrite {
    pub fence: Fence,
    /// The process (owner string) that wrote.
    pub writer: String,
    pub what: &'static str,
}

#[derive(Debug, Default)]
struct World {
    locks: BTreeMap<Purpose, LockItem>,
    state: Option<ClusterState>,
    members: BTreeMap<String, MemberRecord>,
    join: Option<JoinPointer>,
    /// The latest request of each origin.
    refresh: Vec<RefreshRequest>,
    fenced: Vec<FencedWrite>,
    /// Generations that went initializing → initialized.
    initialized: Vec<u64>,
}

/// The shared store. Hand each simulated process a [`MemStore::handle`].
#[derive(Debug)]
pub struct MemStore {
    world: Mutex<World>,
    rng: Mutex<SimRng>,
    faults: Faults,
}

enum Fate {
    Ok,
    Transient,
    TransientAfter,
    LostBefore,
    LostAfter,
    RefusedAfter,
}

impl MemStore {
    pub fn new(seed: u64, faults: Faults) -> Arc<Self> {
        Arc::new(MemStore {
            world: Mutex::new(World::default()),
            rng: Mutex::new(SimRng::new(seed)),
            faults,
        })
    }

    /// A view for one process; fenced writes through it are audited as `writer`'s.
    pub fn handle(self: &Arc<Self>, writer: &str) -> Arc<Handle> {
        Arc::new(Handle {
            store: self.clone(),
            writer: writer.to_string(),
        })
    }

    /// Every successful fenced write so far.
    pub fn fenced_writes(&self) -> Vec<FencedWrite> {
        self.world().fenced.clone()
    }

    /// Generations marked initialized, in order.
    pub fn initialized_generations(&self) -> Vec<u64> {
        self.world().initialized.clone()
    }

    /// The STATE record now.
    pub fn state(&self) -> Option<ClusterState> {
        self.world().state.clone()
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn draw(&self, write: bool) -> (Duration, Duration, Option<Duration>, Fate) {
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = &self.faults;
        let latency = rng.between(f.latency.0, f.latency.1);
        let mut answer = rng.between(f.answer_latency.0, f.answer_latency.1);
        let mut stall = rng
            .chance(f.stall)
            .then(|| rng.between(f.stall_time.0, f.stall_time.1));
        // Half of the long stalls hit the answer instead: applied at once, heard of late.
        if let Some(long) = stall {
            if rng.chance(0.5) {
                answer += long;
                stall = None;
            }
        }
        let roll = rng.unit();
        let mut edge = 0.0;
        let mut hit = |p: f64| {
            edge += p;
            roll < edge
        };
        let fate = if hit(f.transient) {
            Fate::Transient
        } else if hit(f.lost_before) {
            Fate::LostBefore
        } else if write && hit(f.transient_after) {
            Fate::TransientAfter
        } else if write && hit(f.lost_after) {
            Fate::LostAfter
        } else if write && hit(f.refused_after) {
            Fate::RefusedAfter
        } else {
            Fate::Ok
        };
        (latency, answer, stall, fate)
    }

    /// Runs `apply` under the drawn faults. A stalled call applies from a
    /// detached task, so it lands late even if the caller stopped waiting.
    async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        operation: &'static str,
        write: bool,
        refused: T,
        apply: impl FnOnce(&mut World) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (latency, answer, stall, fate) = self.draw(write);
        let err = |class| StoreError {
            class,
            operation,
            message: "simulated".into(),
        };
        tokio::time::sleep(latency).await;
        match fate {
            Fate::Transient => return Err(err(StoreErrorClass::Transient)),
            Fate::LostBefore => return Err(err(StoreErrorClass::OutcomeUnknown)),
            _ => {}
        }
        let store = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = async move {
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
            let out = apply(&mut store.world());
            let _ = tx.send(out);
        };
        if stall.is_some() {
            tokio::spawn(task);
        } else {
            task.await;
        }
        let out = rx.await.map_err(|_| err(StoreErrorClass::OutcomeUnknown))?;
        tokio::time::sleep(answer).await;
        match fate {
            Fate::TransientAfter => Err(err(StoreErrorClass::Transient)),
            Fate::LostAfter => Err(err(StoreErrorClass::OutcomeUnknown)),
            Fate::RefusedAfter => Ok(refused),
            _ => Ok(out),
        }
    }
}

/// One process's view of the store.
#[derive(Debug)]
pub struct Handle {
    store: Arc<MemStore>,
    writer: String,
}

fn fence_ok(world: &World, fence: Fence) -> bool {
    world
        .locks
        .get(&fence.purpose)
        .is_some_and(|l| l.fence == fence.value && !l.released)
}

fn claimed(item: Option<&LockItem>, claim: &Claim<'_>) -> LockItem {
    LockItem {
        owner: claim.owner.to_string(),
        rvn: claim.rvn.to_string(),
        lease: claim.lease,
        fence: item.map_or(0, |i| i.fence) + 1,
        released: false,
        heartbeat_at: Some(claim.wall),
    }
}

impl LockStore for Handle {
    async fn acquire_free(
        &self,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        self.claim("acquire", purpose, claim, |current| {
            current.is_none_or(|i| i.released)
        })
        .await
    }

    async fn take_over(
        &self,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        let seen = observed.to_string();
        self.claim("take over", purpose, claim, move |current| {
            current.is_some_and(|i| i.rvn == seen && !i.released)
        })
        .await
    }

    async fn read(&self, purpose: Purpose) -> Result<Option<LockItem>, StoreError> {
        self.store
            .call("read", false, None, move |w| w.locks.get(&purpose).cloned())
            .await
    }

    async fn heartbeat(
        &self,
        purpose: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        let new = new.to_string();
        self.while_held("heartbeat", purpose, owner, old, wall, move |i| i.rvn = new)
            .await
    }

    async fn release(
        &self,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        self.while_held("release", purpose, owner, rvn, wall, |i| i.released = true)
            .await
    }

    async fn force_release(
        &self,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> Result<Option<LockItem>, StoreError> {
        let seen = observed.to_string();
        self.store
            .call("force release", true, None, move |w| {
                match w.locks.get_mut(&purpose) {
                    Some(i) if i.rvn == seen && !i.released => {
                        i.released = true;
                        i.fence += 1;
                        i.heartbeat_at = Some(wall);
                        Some(i.clone())
                    }
                    _ => None,
                }
            })
            .await
    }
}

impl Handle {
    /// Claims the `purpose` lock for `claim`'s owner when `may_take` allows
    /// it given the current item; `None` when it does not.
    async fn claim(
        &self,
        what: &'static str,
        purpose: Purpose,
        claim: &Claim<'_>,
        may_take: impl FnOnce(Option<&LockItem>) -> bool + Send + 'static,
    ) -> Result<Option<LockItem>, StoreError> {
        let (owner, rvn, lease, wall) = (
            claim.owner.to_string(),
            claim.rvn.to_string(),
            claim.lease,
            claim.wall,
        );
        self.store
            .call(what, true, None, move |w| {
                let claim = Claim {
                    owner: &owner,
                    rvn: &rvn,
                    lease,
                    wall,
                };
                let current = w.locks.get(&purpose);
                if may_take(current) {
                    let item = claimed(current, &claim);
                    w.locks.insert(purpose, item.clone());
                    Some(item)
                } else {
                    None
                }
            })
            .await
    }

    /// Changes the `purpose` lock and stamps it `wall` if `owner` still
    /// holds it with `rvn`; false if not.
    async fn while_held(
        &self,
        what: &'static str,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
        change: impl FnOnce(&mut LockItem) + Send + 'static,
    ) -> Result<bool, StoreError> {
        let (owner, rvn) = (owner.to_string(), rvn.to_string());
        self.store
            .call(what, true, false, move |w| {
                match w.locks.get_mut(&purpose) {
                    Some(i) if i.owner == owner && i.rvn == rvn && !i.released => {
                        change(i);
                        i.heartbeat_at = Some(wall);
                        true
                    }
                    _ => false,
                }
            })
            .await
    }

    async fn fenced(
        &self,
        what: &'static str,
        fence: Fence,
        apply: impl FnOnce(&mut World) -> bool + Send + 'static,
    ) -> Result<WriteResult, StoreError> {
        let writer = self.writer.clone();
        self.store
            .call(what, true, WriteResult::ConditionFailed, move |w| {
                if !fence_ok(w, fence) {
                    return WriteResult::FenceRejected;
                }
                if !apply(w) {
                    return WriteResult::ConditionFailed;
                }
                w.fenced.push(FencedWrite {
                    fence,
                    writer,
                    what,
                });
                WriteResult::Applied
            })
            .await
    }
}

impl RegistryStore for Handle {
    async fn read_state(&self) -> Result<Option<ClusterState>, StoreError> {
        self.store
            .call("read state", false, None, |w| w.state.clone())
            .await
    }

    async fn begin_init(
        &self,
        fence: Fence,
        expected: u64,
        claim: &InitClaim,
    ) -> Result<WriteResult, StoreError> {
        let claim = claim.clone();
        self.fenced("begin init", fence, move |w| {
            let ok = w.state.as_ref().is_none_or(|s| {
                s.generation == expected
                    && (s.phase != Phase::Initialized || claim.restored_from.is_some())
            });
            if ok {
                w.state = Some(ClusterState {
                    phase: Phase::Initializing,
                    generation: expected + 1,
                    endpoint: Some(claim.endpoint),
                    kubernetes_version: Some(claim.kubernetes_version),
                    initialized_by: Some(claim.initialized_by),
                    init_run_id: Some(claim.run_id),
                    fence: Some(fence.value),
                    restored_from: claim.restored_from,
                    updated_at: Some(claim.wall),
                });
            }
            ok
        })
        .await
    }

    async fn finish_init(
        &self,
        fence: Fence,
        generation: u64,
        run_id: &str,
        wall: SystemTime,
    ) -> Result<WriteResult, StoreError> {
        let run_id = run_id.to_string();
        self.fenced("finish init", fence, move |w| match w.state.as_mut() {
            Some(s)
                if s.phase == Phase::Initializing
                    && s.generation == generation
                    && s.init_run_id.as_deref() == Some(run_id.as_str()) =>
            {
                s.phase = Phase::Initialized;
                s.updated_at = Some(wall);
                w.initialized.push(generation);
                true
            }
            _ => false,
        })
        .await
    }

    async fn put_member(
        &self,
        fence: Fence,
        record: &MemberRecord,
    ) -> Result<WriteResult, StoreError> {
        let record = record.clone();
        self.fenced("put member", fence, move |w| {
            w.members.insert(record.instance_id.clone(), record);
            true
        })
        .await
    }

    async fn delete_member(
        &self,
        fence: Fence,
        instance_id: &str,
    ) -> Result<WriteResult, StoreError> {
        let id = instance_id.to_string();
        self.fenced("delete member", fence, move |w| {
            w.members.remove(&id);
            true
        })
        .await
    }

    async fn put_join(
        &self,
        fence: Fence,
        pointer: &JoinPointer,
    ) -> Result<WriteResult, StoreError> {
        let pointer = pointer.clone();
        self.fenced("put join", fence, move |w| {
            // Same condition as DynamoDB: publication seq - 1 must be current.
            let current = w.join.as_ref().map_or(0, |j| j.seq);
            if current != pointer.seq.saturating_sub(1) {
                return false;
            }
            w.join = Some(pointer);
            true
        })
        .await
    }

    async fn read_join(&self) -> Result<Option<JoinPointer>, StoreError> {
        self.store
            .call("read join", false, None, |w| w.join.clone())
            .await
    }

    async fn put_refresh(&self, request: &RefreshRequest) -> Result<(), StoreError> {
        let request = request.clone();
        self.store
            .call("put refresh", true, (), move |w| {
                w.refresh.retain(|r| r.origin != request.origin);
                w.refresh.push(request);
            })
            .await
    }

    async fn read_refresh(&self) -> Result<Vec<RefreshRequest>, StoreError> {
        self.store
            .call("read refresh", false, Vec::new(), |w| w.refresh.clone())
            .await
    }

    async fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        self.store
            .call("list members", false, Vec::new(), |w| {
                w.members.values().cloned().collect()
            })
            .await
    }
}
