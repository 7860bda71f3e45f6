//! Deterministic regressions for lock bugs found in review, on virtual time
//! with the in-memory store (same conditional semantics as DynamoDB).

use kubeboot::lock::{
    Claim, Guard, LockItem, LockStore, Locker, Owner, Purpose, Settings, StoreError,
    StoreErrorClass,
};
use kubeboot_tests::fixtures::{lock_settings, Intercepted, LockHooks};
use kubeboot_tests::memstore::{Faults, Handle, MemStore};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const LEASE: Duration = Duration::from_secs(30);
const MARGIN: Duration = Duration::from_secs(5);

fn settings() -> Settings {
    lock_settings(LEASE, MARGIN, Duration::from_secs(600))
}

/// A store whose first claim applies at once but whose answer arrives late
/// and says "held" (an SDK retry refused by our own write); renewals answer
/// after `renewal_answer`.
struct SlowAnswers {
    claim_answer: Duration,
    armed: AtomicBool,
    renewal_answer: Duration,
    /// Whether renewals reach the table at all (a partition when not).
    renewals_land: bool,
}

impl LockHooks<Handle> for SlowAnswers {
    async fn acquire_free(
        &self,
        inner: &Handle,
        p: Purpose,
        c: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        let r = inner.acquire_free(p, c).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            tokio::time::sleep(self.claim_answer).await;
            return r.map(|_| None);
        }
        r
    }
    async fn heartbeat(
        &self,
        inner: &Handle,
        p: Purpose,
        o: &str,
        a: &str,
        b: &str,
        w: SystemTime,
    ) -> Result<bool, StoreError> {
        if !self.renewals_land {
            tokio::time::sleep(self.renewal_answer).await;
            return Err(StoreError {
                class: StoreErrorClass::OutcomeUnknown,
                operation: "renew lock",
                message: "partitioned".into(),
            });
        }
        let r = inner.heartbeat(p, o, a, b, w).await;
        tokio::time::sleep(self.renewal_answer).await;
        r
    }
}

/// Somebody acquired the lock, and never two believed they held it at once.
fn assert_no_overlap((overlap, someone): (Duration, bool)) {
    assert!(someone, "somebody acquires the lock");
    assert_eq!(
        overlap,
        Duration::ZERO,
        "both believed they held for {overlap:?}"
    );
}

type Slot = Arc<Mutex<Option<Guard>>>;

/// Runs A (slow answers) and B (plain) for two minutes of virtual time and
/// returns how long both believed they held the lock at once.
async fn overlap_with(claim_answer: Duration, renewal_answer: Duration) -> (Duration, bool) {
    overlap_when(claim_answer, renewal_answer, true).await
}

async fn overlap_when(
    claim_answer: Duration,
    renewal_answer: Duration,
    renewals_land: bool,
) -> (Duration, bool) {
    let store = MemStore::new(1, Faults::none());
    let a_store = Arc::new(Intercepted::shared(
        store.handle("A"),
        SlowAnswers {
            claim_answer,
            armed: AtomicBool::new(true),
            renewal_answer,
            renewals_land,
        },
    ));
    let a = Locker::new(a_store, Owner::new("i-a"), settings());
    let b = Locker::new(store.handle("B"), Owner::new("i-b"), settings());
    let (slot_a, slot_b): (Slot, Slot) = (Arc::default(), Arc::default());
    let (sa, sb) = (slot_a.clone(), slot_b.clone());
    tokio::spawn(async move {
        if let Ok(g) = a.acquire(Purpose::Init).await {
            *sa.lock().unwrap() = Some(g);
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::spawn(async move {
        if let Ok(g) = b.acquire(Purpose::Init).await {
            *sb.lock().unwrap() = Some(g);
        }
    });
    let mut overlap = Duration::ZERO;
    let mut someone = false;
    for _ in 0..1200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held = |s: &Slot| s.lock().unwrap().as_ref().is_some_and(Guard::is_held);
        let (ha, hb) = (held(&slot_a), held(&slot_b));
        someone |= ha || hb;
        if ha && hb {
            overlap += Duration::from_millis(100);
        }
    }
    (overlap, someone)
}

#[tokio::test(start_paused = true)]
async fn a_claim_confirmed_late_is_not_trusted_past_its_send_time() {
    // The claim's answer takes 26 s (> lease - margin): trusting it from its
    // answer would overlap with B's takeover at 35 s.
    assert_no_overlap(overlap_with(Duration::from_secs(26), Duration::ZERO).await);
}

#[tokio::test(start_paused = true)]
async fn a_late_claim_that_can_never_renew_stops_trusting_at_send_time_plus_window() {
    // The claim lands at once, its answer comes at 20 s, and no renewal ever
    // lands. B takes over 35 s after it last saw a change (lease + margin);
    // A may trust its claim until 25 s after it was *sent*. Anchored at the
    // answer instead, A would still believe it held until 45 s.
    assert_no_overlap(overlap_when(Duration::from_secs(20), Duration::from_secs(1), false).await);
}

#[tokio::test(start_paused = true)]
async fn a_late_claim_with_slow_renewal_answers_never_overlaps() {
    assert_no_overlap(overlap_with(Duration::from_secs(20), Duration::from_secs(12)).await);
}

#[tokio::test(start_paused = true)]
async fn a_release_racing_an_in_flight_renewal_still_frees_the_lock() {
    let store = MemStore::new(1, Faults::none());
    let a = Locker::new(
        // Renewals land at once but answer after 2 s.
        Arc::new(Intercepted::shared(
            store.handle("A"),
            SlowAnswers {
                claim_answer: Duration::ZERO,
                armed: AtomicBool::new(false),
                renewal_answer: Duration::from_secs(2),
                renewals_land: true,
            },
        )),
        Owner::new("i-a"),
        settings(),
    );
    let b = Locker::new(store.handle("B"), Owner::new("i-b"), settings());
    let g = a.acquire(Purpose::Init).await.expect("A acquires");
    tokio::time::sleep(Duration::from_secs(11)).await; // renewal sent at 10 s, answered at 12 s
    g.release().await.expect("release");
    let item = store
        .handle("x")
        .read(Purpose::Init)
        .await
        .expect("read")
        .expect("item");
    assert!(
        item.released,
        "the renewal that landed after abort() must not keep the lock held"
    );
    let started = tokio::time::Instant::now();
    let gb = b.acquire(Purpose::Init).await.expect("B acquires");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "B waited {:?}",
        started.elapsed()
    );
    assert_eq!(gb.fence().expect("held").value, 2);
}

/// The reconciler's turns call `try_acquire` every 10 s. While the holder
/// lives they never get the lock; once it crashed, the first turn at least
/// lease + margin after a turn first saw its last record version takes over.
#[tokio::test(start_paused = true)]
async fn try_acquire_remembers_a_silent_holder_across_turns_and_takes_over_after_lease_and_margin()
{
    let store = MemStore::new(1, Faults::none());
    let holder = Locker::new(store.handle("A"), Owner::new("i-a"), settings());
    let reconciler = Locker::new(store.handle("R"), Owner::new("i-r"), settings());
    let turn = Duration::from_secs(10);
    let guard = holder
        .acquire(Purpose::Membership)
        .await
        .expect("A acquires");
    for _ in 0..30 {
        let got = reconciler
            .try_acquire(Purpose::Membership)
            .await
            .expect("answer");
        assert!(got.is_none(), "a live holder was taken over");
        tokio::time::sleep(turn).await;
    }
    assert!(guard.is_held());
    drop(guard);
    let crashed = tokio::time::Instant::now();
    let mut turns = 0;
    let taken = loop {
        turns += 1;
        if let Some(g) = reconciler
            .try_acquire(Purpose::Membership)
            .await
            .expect("answer")
        {
            break g;
        }
        assert!(
            turns < 30,
            "after {turns} turns ({:?}) try_acquire has not taken over the crashed holder's lease",
            crashed.elapsed()
        );
        tokio::time::sleep(turn).await;
    };
    let took = crashed.elapsed();
    // The holder's last renewal was sent up to lease / 3 before the crash,
    // and a turn can have seen it then; the takeover comes at the first turn
    // lease + margin after a turn first saw it.
    assert!(
        took >= LEASE + MARGIN - LEASE / 3,
        "took over after {took:?}"
    );
    assert!(took <= LEASE + MARGIN + turn, "took over after {took:?}");
    assert_eq!(taken.fence().expect("held").value, 2);
}
