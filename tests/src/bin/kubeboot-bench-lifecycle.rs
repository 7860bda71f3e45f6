//! Lifecycle benchmark driver: from a control plane's termination event on
//! the queue to its etcd member removed and its lifecycle action completed,
//! with a live leader and across a leader failover. Figures for
//! bench/lifecycle/REPORT.md, never assertions.
//!
//! Each trial is a fresh simulated cluster of three control planes
//! bootstrapped with the full stand-in (real etcd over https), the leader
//! daemon on node 0 at the default period (30 s) and, for failover trials,
//! a follower on node 1. Node 2's host dies and Auto Scaling's event for it
//! reaches the queue (moto's SQS; the lifecycle actions answered by the AWS
//! proxy); the driver polls etcd's member list and the action's state.
//!
//! - **live leader:** the leader is idle between turns (its first turn
//!   ended 3 s before the event), long-polling the queue.
//! - **failover:** the leader is killed (SIGKILL, no release) just before
//!   the event; the follower takes the leader lock once the dead one's
//!   lease has run out, and its first turn reads the queue.
//!
//! ```text
//! kubeboot-bench-lifecycle [--runs N] [--failover-runs N] [--out FILE] [--json FILE]
//! ```

// Shared by the drivers; this one uses a part of it.
#[allow(dead_code)]
mod bench_common;

use bench_common::{command_line, date_line, machine, moto_version, ms, publish, shown, spread};
use kubeboot_tests::lifecycle_actions::ActionState;
use kubeboot_tests::simcluster::{assert_ok, SimCluster};
use kubeboot_tests::termination::{host_dies, wait_leader, Terminations, Wiring};
use kubeboot_tests::workspace::kubeboot_bin;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: kubeboot-bench-lifecycle [--runs N (5)] [--failover-runs N (3)] [--out FILE] [--json FILE]";
const ASG: &str = "kb-control-plane";
/// The simulated nodes' `lock.lease` and `lock.margin` (simcluster's config).
const LEASE: Duration = Duration::from_secs(6);
const MARGIN: Duration = Duration::from_secs(2);

struct Options {
    runs: usize,
    failover_runs: usize,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn options() -> Options {
    let fail = |code: i32| -> ! {
        eprintln!("{USAGE}");
        std::process::exit(code);
    };
    let mut o = Options {
        runs: 5,
        failover_runs: 3,
        out: None,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    let count =
        |v: Option<String>| -> usize { v.and_then(|v| v.parse().ok()).unwrap_or_else(|| fail(2)) };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => o.runs = count(args.next()),
            "--failover-runs" => o.failover_runs = count(args.next()),
            "--out" => o.out = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "--json" => o.json = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "-h" | "--help" => fail(0),
            _ => fail(2),
        }
    }
    o
}

struct Trial {
    removed: Duration,
    completed: Duration,
}

/// One trial; `failover` kills the leader just before the event.
async fn trial(failover: bool) -> Trial {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    // The default period, as a node runs the daemon.
    let wiring = Wiring {
        env: vec![("KUBEBOOT_DAEMON_PERIOD", "30s".into())],
        ..Default::default()
    };
    let mut lifecycle = Terminations::start_with(&sim, "30s", wiring).await;
    wait_leader(&sim, 0).await;
    let mut follower = failover.then(|| lifecycle.daemon_on(&sim, 1, None));
    // The leader's first turn ends; it then waits for the next, 30 s off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if failover {
        let _ = lifecycle.daemon.start_kill();
        let _ = lifecycle.daemon.wait().await;
    }
    host_dies(&sim, 2);
    let victim = sim.nodes[2].ip();
    let sent = Instant::now();
    let token = lifecycle.terminate(ASG, &sim.nodes[2].instance_id()).await;
    let (mut removed, mut completed) = (None, None);
    while removed.is_none() || completed.is_none() {
        assert!(
            sent.elapsed() < Duration::from_secs(120),
            "no removal within 120 s (removed {removed:?}, completed {completed:?})"
        );
        if removed.is_none() {
            let members = sim.etcd_members(&[0, 1]).await;
            if members.iter().all(|m| !m.peer_urls[0].contains(&victim)) {
                removed = Some(sent.elapsed());
            }
        }
        if completed.is_none() {
            if let Some(ActionState::Completed(_)) = lifecycle.actions.state(&token) {
                completed = Some(sent.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(mut f) = follower.take() {
        let _ = f.start_kill();
        let _ = f.wait().await;
    }
    let _ = lifecycle.daemon.start_kill();
    let _ = lifecycle.daemon.wait().await;
    let t = Trial {
        removed: removed.unwrap_or_default(),
        completed: completed.unwrap_or_default(),
    };
    eprintln!(
        "{} trial: member removed at {}, action completed at {}",
        if failover { "failover" } else { "live-leader" },
        ms(t.removed),
        ms(t.completed)
    );
    t
}

#[tokio::main]
async fn main() {
    let opts = options();
    let agent = kubeboot_bin();
    let started = Instant::now();
    let date = k8s_openapi::jiff::Timestamp::now();
    let mut live = Vec::new();
    for _ in 0..opts.runs {
        live.push(trial(false).await);
    }
    let mut failover = Vec::new();
    for _ in 0..opts.failover_runs {
        failover.push(trial(true).await);
    }

    let mut out = String::new();
    let _ = writeln!(out, "# Lifecycle benchmark\n");
    let _ = writeln!(
        out,
        "A control plane's termination event → its etcd member removed and its lifecycle action completed.\n"
    );
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(out, "{}", date_line(date, started));
    let _ = writeln!(out, "{}", command_line("kubeboot-bench-lifecycle"));
    let _ = writeln!(
        out,
        "- Agent: `{}` (`kubeboot daemon`, `daemon.period` 30 s, `lock.lease` {} s, `lock.margin` {} s)",
        shown(&agent),
        LEASE.as_secs(),
        MARGIN.as_secs()
    );
    let _ = writeln!(
        out,
        "- AWS: moto_server {} on loopback (SQS), lifecycle actions answered by the AWS proxy; three control planes with real etcd over https\n",
        moto_version()
    );
    let _ = writeln!(
        out,
        "| case | trials | from the event to | min | p50 | p90 | max |\n|---|---|---|---|---|---|---|"
    );
    let mut json = serde_json::Map::new();
    for (case, trials, key) in [
        ("live leader", &live, "live"),
        ("leader killed just before the event", &failover, "failover"),
    ] {
        if trials.is_empty() {
            continue;
        }
        let removed: Vec<Duration> = trials.iter().map(|t| t.removed).collect();
        let completed: Vec<Duration> = trials.iter().map(|t| t.completed).collect();
        let _ = writeln!(
            out,
            "| {case} | {} | etcd member removed | {} |",
            trials.len(),
            spread(&removed)
        );
        let _ = writeln!(out, "| | | action completed | {} |", spread(&completed));
        let worst = completed.iter().max().copied().unwrap_or_default();
        json.insert(
            format!("{key}_completed_max_ms"),
            serde_json::json!((worst.as_secs_f64() * 1e3).round()),
        );
    }
    let _ = writeln!(
        out,
        "\n## Reading\n\n\
- **Live leader:** between its turns the leader long-polls the queue (`lifecycle::wait_for_messages`), \
so the event is handled on arrival, not at the next turn up to `daemon.period` later. The time is the \
quorum check, the removal under the membership lock, the record and Node deleted, and \
`CompleteLifecycleAction`.\n\
- **Failover:** the dead leader never released its lock: the follower takes it a lease plus the margin \
after it first saw the last renewal (bench/lock/REPORT.md). The kill comes up to lease/3 after that \
renewal, and the follower, watching, sees a renewal up to lease/3 after it is written: the takeover \
lands {}–{} s after the kill here, then its first whole turn reads the queue.\n\
- The event is sent by the driver straight to the queue (as EventBridge would); moto's long poll is \
answered within 20 ms of a message (tests/support/moto_linearizable.py); real SQS answers a long poll \
as soon as a message is available.\n",
        (LEASE - LEASE / 3 + MARGIN).as_secs(),
        (LEASE + LEASE / 3 + MARGIN).as_secs()
    );
    publish(&out, opts.out.as_deref());
    if let Some(path) = opts.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("json"),
        )
        .expect("write json");
    }
}
