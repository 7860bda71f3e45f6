//! Seeded randomized simulation of the lock and the fenced registry.
//!
//! Each trial: 2-6 processes race to initialize one cluster, the way
//! bootstrap does (init lock → read state → begin a generation → "kubeadm
//! init" → mark initialized → release). The store answers slowly, throttles,
//! loses answers before and after applying, reports applied writes as
//! refused, and stalls writes in flight for whole leases before applying
//! them (a paused process). Processes crash at random and come back as new
//! processes. Time is tokio's paused clock, so a trial of minutes takes
//! milliseconds.
//!
//! Invariants, checked after every trial:
//! - no fence value carries successful fenced writes from two processes;
//! - at most one generation ever becomes initialized, and it does (liveness);
//! - the STATE record agrees with the one initialized generation;
//! - at no sampled instant do two processes both believe they hold the lock
//!   (the lease itself, not only the fencing behind it).
//!
//! `KBTEST_SIM_TRIALS` (default 1000) sets the count for a soak;
//! `KBTEST_SIM_SEED` replays one trial.

use kubeboot::lock::{Guard, Locker, Owner, Purpose};
use kubeboot::registry::{Phase, Registry};
use kubeboot_tests::fixtures::{init_claim, lock_settings};
use kubeboot_tests::memstore::{Faults, MemStore, SimRng};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

const LEASE: Duration = Duration::from_secs(30);
const MARGIN: Duration = Duration::from_secs(5);
/// Virtual time after which a trial that has not initialized fails liveness.
const TRIAL_DEADLINE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
struct TrialPlan {
    processes: usize,
    crash: f64,
    faults: Faults,
    init_time: (Duration, Duration),
}

fn plan(rng: &mut SimRng) -> TrialPlan {
    let scale = rng.unit();
    TrialPlan {
        processes: 2 + (rng.next_u64() % 5) as usize,
        crash: 0.4 * rng.unit(),
        faults: Faults {
            transient: 0.10 * scale,
            transient_after: 0.03 * scale,
            lost_before: 0.05 * scale,
            lost_after: 0.05 * scale,
            refused_after: 0.05 * scale,
            stall: 0.03 * scale,
            stall_time: (LEASE / 2, 3 * LEASE),
            latency: (Duration::from_millis(1), Duration::from_millis(200)),
            answer_latency: (Duration::ZERO, Duration::from_millis(200)),
        },
        init_time: (Duration::from_secs(1), 2 * LEASE),
    }
}

/// Guards of live processes, for the monitor that samples who believes it holds.
type Beliefs = Arc<Mutex<Vec<(String, Weak<Guard>)>>>;

/// One process's life: bootstrap until the cluster is initialized.
async fn process(
    store: Arc<MemStore>,
    name: String,
    mut rng: SimRng,
    init_time: (Duration, Duration),
    beliefs: Beliefs,
) {
    let handle = store.handle(&name);
    let settings = lock_settings(LEASE, MARGIN, TRIAL_DEADLINE);
    let locker = Locker::new(handle.clone(), Owner::new(&name), settings);
    let registry = Registry::new(handle);
    loop {
        let step: Result<bool, String> = async {
            let guard = Arc::new(
                locker
                    .acquire(Purpose::Init)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            if let Ok(mut b) = beliefs.lock() {
                b.push((name.clone(), Arc::downgrade(&guard)));
            }
            let release = |guard: Arc<Guard>| async move {
                if let Ok(g) = Arc::try_unwrap(guard) {
                    let _ = g.release().await;
                }
            };
            let state = registry.state().await.map_err(|e| e.to_string())?;
            if state.phase == Phase::Initialized {
                release(guard).await;
                return Ok(true);
            }
            let run = format!("{name}-{}", rng.next_u64());
            let claim = init_claim(&run, &name, "api:6443");
            let generation = registry
                .begin_init(&guard, &state, &claim)
                .await
                .map_err(|e| e.to_string())?;
            // "kubeadm init", abandoned at once if the lock is lost meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(rng.between(init_time.0, init_time.1)) => {}
                _ = guard.lost() => return Err("lost the lock during init".into()),
            }
            registry
                .mark_initialized(&guard, generation, &run, SystemTime::now())
                .await
                .map_err(|e| e.to_string())?;
            release(guard).await;
            Ok(true)
        }
        .await;
        match step {
            Ok(true) => return,
            Ok(false) | Err(_) => {
                tokio::time::sleep(rng.between(Duration::from_millis(10), Duration::from_secs(2)))
                    .await
            }
        }
    }
}

/// Runs one trial; `Err` names the violated invariant.
fn trial(seed: u64) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let mut rng = SimRng::new(seed);
        let plan = plan(&mut rng);
        let store = MemStore::new(rng.next_u64(), plan.faults);
        let started = tokio::time::Instant::now();
        let beliefs: Beliefs = Arc::default();
        let overlap: Arc<Mutex<Option<String>>> = Arc::default();
        let monitor = {
            let (beliefs, overlap) = (beliefs.clone(), overlap.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Ok(mut b) = beliefs.lock() else { return };
                    b.retain(|(_, g)| g.strong_count() > 0);
                    let holders: Vec<&str> = b
                        .iter()
                        .filter(|(_, g)| g.upgrade().is_some_and(|g| g.is_held()))
                        .map(|(n, _)| n.as_str())
                        .collect();
                    if holders.len() > 1 {
                        if let Ok(mut o) = overlap.lock() {
                            o.get_or_insert_with(|| {
                                format!(
                                    "{holders:?} all believed they held the lock at {:?}",
                                    started.elapsed()
                                )
                            });
                        }
                    }
                }
            })
        };
        let mut slots = Vec::new();
        for slot in 0..plan.processes {
            let (store, beliefs) = (store.clone(), beliefs.clone());
            let mut rng = SimRng::new(rng.next_u64());
            slots.push(tokio::spawn(async move {
                // A supervisor: the process may crash (abort) and restart as a new process.
                for incarnation in 0.. {
                    let name = format!("i-{slot:017x}/p{incarnation}");
                    let mut task = tokio::spawn(process(
                        store.clone(),
                        name,
                        SimRng::new(rng.next_u64()),
                        plan.init_time,
                        beliefs.clone(),
                    ));
                    if rng.chance(plan.crash) {
                        let crash_at = rng.between(Duration::ZERO, 3 * LEASE);
                        tokio::select! {
                            done = &mut task => { if done.is_ok() { return; } }
                            _ = tokio::time::sleep(crash_at) => task.abort(),
                        }
                        tokio::time::sleep(rng.between(Duration::from_secs(1), LEASE)).await;
                    } else {
                        let _ = task.await;
                        return;
                    }
                }
            }));
        }
        let all = async {
            for s in slots {
                let _ = s.await;
            }
        };
        if tokio::time::timeout(TRIAL_DEADLINE, all).await.is_err() {
            return Err(format!(
                "liveness: not initialized after {TRIAL_DEADLINE:?} of virtual time ({plan:?})"
            ));
        }
        // Writes still stalled in flight land now, and must be refused too.
        tokio::time::sleep(4 * LEASE).await;
        monitor.abort();
        if let Some(o) = overlap.lock().ok().and_then(|o| o.clone()) {
            return Err(format!("lease violated: {o} ({plan:?})"));
        }

        let mut writers: BTreeMap<(Purpose, u64), String> = BTreeMap::new();
        for w in store.fenced_writes() {
            if let Some(other) = writers.insert((w.fence.purpose, w.fence.value), w.writer.clone())
            {
                if other != w.writer {
                    return Err(format!(
                        "fence {:?} used by {other} and {} ({})",
                        w.fence, w.writer, w.what
                    ));
                }
            }
        }
        let initialized = store.initialized_generations();
        if initialized.len() != 1 {
            return Err(format!(
                "initialized generations {initialized:?}, expected exactly one ({plan:?})"
            ));
        }
        let state = store.state().ok_or("no state record")?;
        if state.phase != Phase::Initialized || state.generation != initialized[0] {
            return Err(format!(
                "state {state:?} disagrees with initialized generation {}",
                initialized[0]
            ));
        }
        Ok(format!(
            "processes {} generations {} fenced writes {} virtual {:?}",
            plan.processes,
            state.generation,
            writers.len(),
            started.elapsed()
        ))
    })
}

#[test]
fn a_thousand_seeded_trials_never_break_fencing_or_init_once() {
    if let Some(seed) = std::env::var("KBTEST_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        match trial(seed) {
            Ok(summary) => println!("seed {seed}: {summary}"),
            Err(violation) => panic!("seed {seed}: {violation}"),
        }
        return;
    }
    let trials: u64 = std::env::var("KBTEST_SIM_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let base = SimRng::new(0x6b75_6265_626f_6f74).next_u64();
    let mut max_generations = 0;
    for t in 0..trials {
        let seed = base.wrapping_add(t);
        match trial(seed) {
            Ok(summary) => {
                if let Some(g) = summary.split_whitespace().nth(3).and_then(|g| g.parse::<u64>().ok()) {
                    max_generations = max_generations.max(g);
                }
            }
            Err(violation) => panic!(
                "trial {t} failed: {violation}\nreplay: KBTEST_SIM_SEED={seed} cargo nextest run -p kubeboot-tests --test lock lock_simulation::"
            ),
        }
    }
    println!("{trials} trials passed; most generations needed in one trial: {max_generations}");
}
