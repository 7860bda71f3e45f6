//! The lease lock and the fenced registry against moto_server, through the
//! real DynamoDB client. Leases are short (3 s) so scenarios stay quick;
//! timings asserted here are the algorithm's bounds, not performance.

use kubeboot::catalogue::Coded;
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{
    Claim, Error as LockError, Fence, Guard, LockItem, LockStore, Locker, Owner, Purpose, Settings,
    StoreError,
};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{
    self, InitClaim, MemberRecord, Phase, Registry, RegistryStore, WriteResult,
};
use kubeboot_tests::fixtures::{self, lock_settings, Intercepted, LockHooks, MotoTable};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const LEASE: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(1);

struct Fixture {
    aws: MotoTable,
}

impl Fixture {
    async fn new() -> Self {
        Fixture {
            aws: MotoTable::start().await,
        }
    }

    fn store(&self) -> Arc<DynamoLockStore> {
        Arc::new(self.aws.lock_store())
    }

    fn registry(&self) -> Registry<DynamoRegistryStore> {
        self.aws.registry()
    }

    fn locker(&self, instance: &str) -> Locker<DynamoLockStore> {
        Locker::new(
            self.store(),
            Owner::new(instance),
            settings(SystemTime::now),
        )
    }

    /// `instance`'s guard of `purpose`, taken on a free lock.
    async fn holds(&self, instance: &str, purpose: Purpose, what: &str) -> Guard {
        self.locker(instance).acquire(purpose).await.expect(what)
    }
}

fn settings(clock: fn() -> SystemTime) -> Settings {
    Settings {
        wall_clock: Arc::new(clock),
        ..lock_settings(LEASE, MARGIN, Duration::from_secs(30))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_contenders_race_for_a_free_lock_and_exactly_one_wins_fifty_times() {
    let fx = Fixture::new().await;
    let lockers: Vec<Arc<Locker<DynamoLockStore>>> = (0..16)
        .map(|i| Arc::new(fx.locker(&format!("i-{i:017x}"))))
        .collect();
    let mut last_fence = 0;
    for round in 0..50 {
        let attempts = lockers.iter().map(|l| {
            let l = l.clone();
            tokio::spawn(async move { l.try_acquire(Purpose::Init).await })
        });
        let results = futures_join(attempts).await;
        let mut winners: Vec<kubeboot::lock::Guard> = results
            .into_iter()
            .filter_map(|r| r.expect("no store error"))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let guard = winners.remove(0);
        let fence = guard.fence().expect("winner holds").value;
        assert!(
            fence > last_fence,
            "round {round}: fence {fence} after {last_fence}"
        );
        last_fence = fence;
        guard.release().await.expect("release");
    }
    assert_eq!(last_fence, 50, "one fence per acquisition");
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_holder_is_taken_over_after_one_lease_but_within_two_heartbeats_more() {
    let fx = Fixture::new().await;
    let holder = fx.locker("i-00000000000000001");
    let waiter = fx.locker("i-00000000000000002");
    let guard = holder
        .acquire(Purpose::Init)
        .await
        .expect("holder acquires");
    // Let a couple of heartbeats land, then crash: heartbeats stop, nothing is released.
    tokio::time::sleep(LEASE).await;
    let last_renewal = fx
        .store()
        .read(Purpose::Init)
        .await
        .expect("read")
        .expect("item")
        .heartbeat_at;
    drop(guard);
    let crashed = Instant::now();
    let taken = waiter
        .acquire(Purpose::Init)
        .await
        .expect("waiter takes over");
    let took = crashed.elapsed();
    println!(
        "takeover after crash: {took:?} (lease {LEASE:?}, heartbeat {:?})",
        LEASE / 3
    );
    assert!(took >= LEASE, "took over after {took:?}, before one lease");
    assert!(
        took <= LEASE + 2 * (LEASE / 3) + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(taken.fence().expect("held").value >= 2);
    assert!(last_renewal.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_holder_is_never_taken_over() {
    let fx = Fixture::new().await;
    let holder = fx.locker("i-00000000000000001");
    let guard = holder
        .acquire(Purpose::Membership)
        .await
        .expect("holder acquires");
    let mut waiter_settings = settings(SystemTime::now);
    waiter_settings.acquire_timeout = 3 * LEASE;
    let waiter = Locker::new(
        fx.store(),
        Owner::new("i-00000000000000002"),
        waiter_settings,
    );
    let err = waiter
        .acquire(Purpose::Membership)
        .await
        .expect_err("holder renews, waiter must give up");
    match &err {
        LockError::Timeout {
            holder: Some(h), ..
        } => assert!(h.starts_with("i-00000000000000001/"), "{h}"),
        other => panic!("expected a timeout naming the holder, got {other}"),
    }
    assert!(err.hint().contains("kubeboot status"));
    assert!(guard.is_held(), "three leases later the holder still holds");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn release_lets_the_next_contender_in_at_once() {
    let fx = Fixture::new().await;
    let first = fx
        .holds("i-00000000000000001", Purpose::Leader, "first")
        .await;
    let second = fx.locker("i-00000000000000002");
    let wait = tokio::spawn(async move {
        let started = Instant::now();
        let g = second.acquire(Purpose::Leader).await.expect("second");
        (started.elapsed(), g.fence().expect("held").value)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.release().await.expect("release");
    let (waited, fence) = wait.await.expect("task");
    assert!(
        waited < LEASE,
        "waited {waited:?}: a released lock needs no lease to pass"
    );
    assert_eq!(fence, 2);
}

/// A store whose heartbeats hang while paused: the holder's process is frozen.
struct Pausable {
    paused: AtomicBool,
}

impl LockHooks<DynamoLockStore> for Pausable {
    async fn heartbeat(
        &self,
        inner: &DynamoLockStore,
        p: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        while self.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        inner.heartbeat(p, owner, old, new, wall).await
    }
}

fn init_claim(run: &str) -> InitClaim {
    fixtures::init_claim(run, &format!("owner-of-{run}"), "api:6443")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_holder_is_fenced_out_and_learns_it_lost() {
    let fx = Fixture::new().await;
    let store = Arc::new(Intercepted::new(
        fx.aws.lock_store(),
        Pausable {
            paused: AtomicBool::new(false),
        },
    ));
    let holder = Locker::new(
        store.clone(),
        Owner::new("i-00000000000000001"),
        settings(SystemTime::now),
    );
    let registry = fx.registry();
    let guard = holder
        .acquire(Purpose::Init)
        .await
        .expect("holder acquires");
    let stale: Fence = guard.fence().expect("held");
    let state = registry.state().await.expect("state");
    let generation = registry
        .begin_init(&guard, &state, &init_claim("run-1"))
        .await
        .expect("begin init");

    store.hooks.paused.store(true, Ordering::SeqCst);
    let waiter = fx
        .holds("i-00000000000000002", Purpose::Init, "waiter takes over")
        .await;
    assert_eq!(waiter.fence().expect("held").value, stale.value + 1);
    store.hooks.paused.store(false, Ordering::SeqCst);

    // The holder wakes up. Its own clock says it stopped renewing long ago...
    assert!(
        !guard.is_held(),
        "self-fenced: no renewal within lease - margin"
    );
    let err = registry
        .mark_initialized(&guard, generation, "run-1", SystemTime::now())
        .await
        .expect_err("refused");
    assert!(matches!(err, registry::Error::NotHeld(_)), "{err}");
    // ...and had its clock not noticed, the store refuses the stale fence anyway.
    let raw = DynamoRegistryStore::new(fx.aws.dynamodb.clone(), &fx.aws.table, &fx.aws.cluster);
    let result = raw
        .finish_init(stale, generation, "run-1", SystemTime::now())
        .await
        .expect("store answers");
    assert_eq!(result, WriteResult::FenceRejected);
    assert_eq!(
        registry.state().await.expect("state").phase,
        Phase::Initializing,
        "nothing was initialized"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_holder_whose_fence_moved_behind_its_back_is_refused_and_marked_lost() {
    let fx = Fixture::new().await;
    let guard = fx
        .holds("i-00000000000000001", Purpose::Membership, "acquire")
        .await;
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let record = MemberRecord {
        instance_id: "i-00000000000000001".into(),
        member_id: 0x8e9e_05c5_2164_694d,
        name: "m0".into(),
        peer_url: "https://10.0.0.1:2380".into(),
        confirmed_at: SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms),
    };
    let registry = fx.registry();
    registry
        .record_member(&guard, &record)
        .await
        .expect("fenced write with a good fence");
    // Another node took over while this one was frozen with a clock that did
    // not notice: the fence moved, the holder still believes it holds.
    fx.aws
        .dynamodb
        .update_item()
        .table_name(&fx.aws.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(kubeboot::table::cluster_pk(
                &fx.aws.cluster,
            )),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("LOCK#membership".into()),
        )
        .update_expression("ADD fence :one")
        .expression_attribute_values(
            ":one",
            aws_sdk_dynamodb::types::AttributeValue::N("1".into()),
        )
        .send()
        .await
        .expect("bump fence");
    assert!(guard.is_held(), "the holder has not noticed yet");
    let err = registry
        .forget_member(&guard, "i-00000000000000001")
        .await
        .expect_err("stale fence");
    assert!(matches!(err, registry::Error::LockLost { .. }), "{err}");
    assert!(
        !guard.is_held(),
        "a refused fenced write tells the guard at once"
    );
    assert_eq!(
        registry.members().await.expect("members"),
        vec![record],
        "the record is untouched"
    );
}

fn ahead() -> SystemTime {
    SystemTime::now() + Duration::from_secs(600)
}

fn behind() -> SystemTime {
    SystemTime::now() - Duration::from_secs(600)
}

#[tokio::test(flavor = "multi_thread")]
async fn wall_clocks_ten_minutes_apart_do_not_change_the_lease() {
    let fx = Fixture::new().await;
    let fast = Locker::new(
        fx.store(),
        Owner::new("i-0000000000000fa57"),
        settings(ahead),
    );
    let slow = Locker::new(
        fx.store(),
        Owner::new("i-00000000000005107"),
        settings(behind),
    );
    // A holder whose clock is ahead is not seen as stale by one whose clock is behind...
    let guard = fast.acquire(Purpose::Init).await.expect("fast acquires");
    let mut impatient = settings(behind);
    impatient.acquire_timeout = 2 * LEASE;
    let blocked = Locker::new(fx.store(), Owner::new("i-00000000000005108"), impatient);
    assert!(matches!(
        blocked.acquire(Purpose::Init).await,
        Err(LockError::Timeout { .. })
    ));
    // ...and once it dies, takeover still waits one full lease, whatever the clocks say.
    drop(guard);
    let crashed = Instant::now();
    let taken = slow.acquire(Purpose::Init).await.expect("slow takes over");
    assert!(
        crashed.elapsed() >= LEASE,
        "took over after {:?}",
        crashed.elapsed()
    );
    let item = fx
        .store()
        .read(Purpose::Init)
        .await
        .expect("read")
        .expect("item");
    assert!(
        item.heartbeat_at.expect("stamped") < SystemTime::now(),
        "stamps are the holder's clock, display only"
    );
    taken.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_cannot_force_release_a_live_lock_but_can_a_dead_one() {
    let fx = Fixture::new().await;
    let guard = fx
        .holds("i-00000000000000001", Purpose::Membership, "acquire")
        .await;
    let operator = fx.locker("operator");
    let err = operator
        .force_release(Purpose::Membership)
        .await
        .expect_err("holder renews while we watch");
    assert!(matches!(err, LockError::HolderAlive { .. }), "{err}");
    let fence = guard.fence().expect("still held").value;
    drop(guard);
    let item = operator
        .force_release(Purpose::Membership)
        .await
        .expect("dead holder's lock is released");
    assert!(item.released);
    assert_eq!(
        item.fence,
        fence + 1,
        "a forced release fences out the old holder"
    );
    let next = fx
        .locker("i-00000000000000002")
        .try_acquire(Purpose::Membership)
        .await
        .expect("store");
    assert!(next.is_some(), "free at once after the forced release");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_is_recorded_once_per_generation() {
    let fx = Fixture::new().await;
    let registry = fx.registry();
    let locker = fx.locker("i-00000000000000001");
    let guard = locker.acquire(Purpose::Init).await.expect("acquire");
    let state = registry.state().await.expect("state");
    assert_eq!((state.phase, state.generation), (Phase::Uninitialized, 0));
    // A first attempt crashes after starting generation 1...
    let g1 = registry
        .begin_init(&guard, &state, &init_claim("run-1"))
        .await
        .expect("begin 1");
    assert_eq!(g1, 1);
    // ...the next attempt starts generation 2 and finishes it.
    let state = registry.state().await.expect("state");
    let g2 = registry
        .begin_init(&guard, &state, &init_claim("run-2"))
        .await
        .expect("begin 2");
    assert_eq!(g2, 2);
    let stale = registry
        .mark_initialized(&guard, g1, "run-1", SystemTime::now())
        .await;
    assert!(
        matches!(stale, Err(registry::Error::Conflict { .. })),
        "the crashed generation cannot finish"
    );
    registry
        .mark_initialized(&guard, g2, "run-2", SystemTime::now())
        .await
        .expect("finish 2");
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, Phase::Initialized);
    assert_eq!(state.init_run_id.as_deref(), Some("run-2"));
    assert_eq!(state.fence, Some(guard.fence().expect("held").value));
    let again = registry
        .begin_init(&guard, &state, &init_claim("run-3"))
        .await;
    assert!(
        matches!(again, Err(registry::Error::Conflict { .. })),
        "an initialized cluster is never re-initialized"
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn join_material_becomes_current_only_through_a_fenced_pointer() {
    let fx = Fixture::new().await;
    let registry = fx.registry();
    assert_eq!(registry.join_pointer().await.expect("read"), None);
    let pointer = |version: &str, seq: u64| registry::JoinPointer {
        secret_version: version.into(),
        key_version: None,
        seq,
        endpoint: "api:6443".into(),
        ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
        token_expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        certs_expire_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_007_200)),
        published_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    };
    let old = fx
        .holds("i-00000000000000001", Purpose::Init, "acquire")
        .await;
    registry
        .publish_join(&old, &pointer("v1", 1))
        .await
        .expect("publish v1");
    assert_eq!(
        registry.join_pointer().await.expect("read"),
        Some(pointer("v1", 1))
    );
    // The old holder is frozen and loses the lock; the new holder publishes v2.
    let stale = old.fence().expect("held");
    drop(old);
    let new = fx
        .holds("i-00000000000000002", Purpose::Init, "takeover")
        .await;
    registry
        .publish_join(&new, &pointer("v2", 2))
        .await
        .expect("publish v2");
    // The frozen holder's late pointer write (its secret version "v0") is refused.
    let raw = DynamoRegistryStore::new(fx.aws.dynamodb.clone(), &fx.aws.table, &fx.aws.cluster);
    assert_eq!(
        raw.put_join(stale, &pointer("v0", 3))
            .await
            .expect("answer"),
        WriteResult::FenceRejected
    );
    assert_eq!(
        registry
            .join_pointer()
            .await
            .expect("read")
            .map(|p| p.secret_version),
        Some("v2".into())
    );
    new.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_released_lock_refuses_its_old_holders_fenced_writes() {
    let fx = Fixture::new().await;
    let guard = fx
        .holds("i-00000000000000001", Purpose::Init, "acquire")
        .await;
    let fence = guard.fence().expect("held");
    guard.release().await.expect("release");
    // The fence value is unchanged by a normal release: only `released` stops this write.
    let raw = DynamoRegistryStore::new(fx.aws.dynamodb.clone(), &fx.aws.table, &fx.aws.cluster);
    let result = raw
        .begin_init(fence, 0, &init_claim("late"))
        .await
        .expect("store answers");
    assert_eq!(result, WriteResult::FenceRejected);
    assert_eq!(
        fx.registry().state().await.expect("state").phase,
        Phase::Uninitialized
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_needs_the_record_version_it_watched() {
    let fx = Fixture::new().await;
    let store = fx.store();
    let guard = fx
        .holds("i-00000000000000001", Purpose::Init, "acquire")
        .await;
    let watched = store
        .read(Purpose::Init)
        .await
        .expect("read")
        .expect("item")
        .rvn;
    // The holder renews: the version the waiter watched is gone.
    tokio::time::sleep(LEASE / 3 + Duration::from_millis(500)).await;
    let claim = Claim {
        owner: "i-00000000000000002/x",
        rvn: "r2",
        lease: LEASE,
        wall: SystemTime::now(),
    };
    assert_eq!(
        store
            .take_over(Purpose::Init, &watched, &claim)
            .await
            .expect("answer"),
        None
    );
    assert!(guard.is_held());
    guard.release().await.expect("release");
}

/// A store whose renewals and reads hang for good once `stuck` is set (a
/// connection that stopped answering under one loop of the daemon); calls
/// started after `stuck` is cleared go through.
struct StuckCalls {
    stuck: AtomicBool,
}

impl StuckCalls {
    async fn hang_if_stuck(&self) {
        if self.stuck.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

impl LockHooks<DynamoLockStore> for StuckCalls {
    async fn read(
        &self,
        inner: &DynamoLockStore,
        p: Purpose,
    ) -> Result<Option<LockItem>, StoreError> {
        self.hang_if_stuck().await;
        inner.read(p).await
    }
    async fn heartbeat(
        &self,
        inner: &DynamoLockStore,
        p: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        self.hang_if_stuck().await;
        inner.heartbeat(p, owner, old, new, wall).await
    }
}

/// The daemon's leader loop and its reconciler share one owner. The leader
/// loop's calls hang past its lease, the reconciler takes the membership lock
/// over, and then the leader loop gets to release its (lost) guard: that
/// release is refused and must stay refused, not free the reconciler's lock.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_release_never_frees_the_lock_another_loop_of_the_same_process_took() {
    let fx = Fixture::new().await;
    let owner = Owner::new("i-00000000000000001");
    let leader_store = Arc::new(Intercepted::new(
        fx.aws.lock_store(),
        StuckCalls {
            stuck: AtomicBool::new(false),
        },
    ));
    let leader_loop = Locker::new(
        leader_store.clone(),
        owner.clone(),
        settings(SystemTime::now),
    );
    let reconciler_loop = Locker::new(fx.store(), owner.clone(), settings(SystemTime::now));

    let stale = leader_loop
        .acquire(Purpose::Membership)
        .await
        .expect("leader loop acquires");
    let stale_fence = stale.fence().expect("held").value;
    leader_store.hooks.stuck.store(true, Ordering::SeqCst);
    let taken = reconciler_loop
        .acquire(Purpose::Membership)
        .await
        .expect("the reconciler takes the silent lease over");
    let fence = taken.fence().expect("held").value;
    assert_eq!(fence, stale_fence + 1);
    leader_store.hooks.stuck.store(false, Ordering::SeqCst);

    stale
        .release()
        .await
        .expect("releasing a lock that is no longer ours is not an error");
    let item = fx
        .store()
        .read(Purpose::Membership)
        .await
        .expect("read")
        .expect("item");
    assert!(
        !item.released,
        "the stale guard (fence {stale_fence}) released the lock held by the other loop (fence {fence}): {item:?}"
    );
    assert_eq!(item.fence, fence);
    assert!(taken.is_held());
    // Nobody else gets in while the reconciler holds it.
    assert!(fx
        .locker("i-00000000000000002")
        .try_acquire(Purpose::Membership)
        .await
        .expect("answer")
        .is_none());
    taken.release().await.expect("release");
}

/// The reconciler only ever calls `try_acquire`, once per turn. After the
/// holder crashed (no renewal, no release), a later turn must take the lease
/// over once it stood still for lease + margin on the reconciler's clock; a
/// live holder is never taken over, and no turn blocks for a lease.
#[tokio::test(flavor = "multi_thread")]
async fn try_acquire_takes_over_a_crashed_holders_lease_on_a_later_turn_but_never_a_live_one() {
    let fx = Fixture::new().await;
    let holder = fx.locker("i-00000000000000001");
    let reconciler = fx.locker("i-00000000000000002");
    let turn = Duration::from_millis(500);
    let guard = holder
        .acquire(Purpose::Membership)
        .await
        .expect("holder acquires");

    let live_until = Instant::now() + 2 * (LEASE + MARGIN);
    while Instant::now() < live_until {
        let started = Instant::now();
        let got = reconciler
            .try_acquire(Purpose::Membership)
            .await
            .expect("answer");
        assert!(got.is_none(), "took a live holder's lock: {got:?}");
        assert!(
            started.elapsed() < LEASE / 3,
            "try_acquire blocked for {:?}",
            started.elapsed()
        );
        tokio::time::sleep(turn).await;
    }
    assert!(guard.is_held());

    drop(guard); // crash: renewals stop, nothing is released
    let crashed = Instant::now();
    let taken = loop {
        let started = Instant::now();
        let got = reconciler
            .try_acquire(Purpose::Membership)
            .await
            .expect("answer");
        assert!(started.elapsed() < LEASE / 3, "try_acquire blocked");
        if let Some(g) = got {
            break g;
        }
        assert!(
            crashed.elapsed() < 3 * (LEASE + MARGIN),
            "the reconciler's try_acquire never took over the crashed holder's lease ({:?} after the crash)",
            crashed.elapsed()
        );
        tokio::time::sleep(turn).await;
    };
    let took = crashed.elapsed();
    println!("try_acquire took over {took:?} after the crash");
    assert!(took >= LEASE, "took over after {took:?}, before one lease");
    assert!(
        took <= LEASE + MARGIN + 2 * turn + Duration::from_millis(500),
        "took {took:?}"
    );
    assert_eq!(taken.fence().expect("held").value, 2);
    taken.release().await.expect("release");
}
