//! Metrics-sink benchmark driver: figures for bench/metrics/REPORT.md, never
//! assertions.
//!
//! Does a metric sink that is down or slow delay `kubeboot bootstrap`? The
//! real agent binary runs the worker path (the cheapest, so whatever the sink
//! costs shows most) with the kubeadm stand-in in its no-op mode
//! (`KBTEST_KUBEADM_NOOP=1`), once per sink mode per round, the modes
//! interleaved round-robin (each round starting one mode later) so machine
//! noise spreads over all of them:
//!
//! - `file`: `metrics.sink = "file"`, the sim cluster's configuration (baseline);
//! - `agent-up`: a TCP listener on loopback that reads and discards, as a
//!   healthy CloudWatch agent;
//! - `agent-down`: a closed loopback port (connection refused);
//! - `agent-stalled`: a loopback endpoint whose accept queue is full, so a
//!   connect hangs (SYNs are dropped) as a wedged agent's would;
//! - `off`: `metrics.sink = "off"`.
//!
//! The sink is set per run with `KUBEBOOT_METRICS_SINK` and
//! `KUBEBOOT_METRICS_AGENT_ENDPOINT`. Per run: process start → `READY=1` on
//! a notify socket the driver holds (`NOTIFY_SOCKET`; the agent sends it
//! right after logging "node bootstrapped", before the exit-time metrics
//! flush), start → the "node bootstrapped" log line (millisecond stamps),
//! start → exit, and the documents the sink received. Writes Markdown to
//! stdout and, with `--out`, to a file (only once every run succeeded).
//!
//! ```text
//! kubeboot-bench-metrics [--runs N] [--out FILE] [--logs DIR]
//! ```

// Shared by the drivers; this one uses a part of it.
#[allow(dead_code)]
mod bench_common;

use bench_common::{
    args, command_line, date_line, first_line, initialized_cluster, kept_and_succeeded, machine,
    moto_version, ms, percentile, publish, shown, spread, tail, timeline, Interference,
};
use kubeboot::metrics::{FLUSH_GRACE, RECONNECT_AFTER, SINK_TIMEOUT};
use kubeboot_tests::net::{closed_endpoint, stalled_endpoint};
use kubeboot_tests::simcluster::{SimCluster, SimNode};
use kubeboot_tests::standin;
use kubeboot_tests::workspace::kubeboot_bin;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::net::UnixDatagram;

/// The log line the agent writes once the work is done, just before READY=1.
const BOOTSTRAPPED: &str = "node bootstrapped";
/// The warning the metrics writer logs when it gives up on the sink.
const SINK_UNAVAILABLE: &str = "metrics sink unavailable; dropping metrics for a while";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    File,
    AgentUp,
    AgentDown,
    AgentStalled,
    Off,
}

/// Every mode, in the order of the first round (the baseline first).
const MODES: [Mode; 5] = [
    Mode::File,
    Mode::AgentUp,
    Mode::AgentDown,
    Mode::AgentStalled,
    Mode::Off,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::File => "file",
            Mode::AgentUp => "agent-up",
            Mode::AgentDown => "agent-down",
            Mode::AgentStalled => "agent-stalled",
            Mode::Off => "off",
        }
    }

    fn sink(self) -> &'static str {
        match self {
            Mode::File => "a file in the node's directory (the sim cluster's `[metrics]`)",
            Mode::AgentUp => {
                "a TCP listener on 127.0.0.1 that reads and discards (healthy CloudWatch agent)"
            }
            Mode::AgentDown => "a closed port on 127.0.0.1 (connection refused)",
            Mode::AgentStalled => {
                "a listener on 127.0.0.1 whose accept queue is full (connect hangs)"
            }
            Mode::Off => "none",
        }
    }

    /// The environment overrides that select the sink.
    fn envs(self, sinks: &Sinks) -> Vec<(&'static str, String)> {
        let agent = |addr: &str| {
            vec![
                ("KUBEBOOT_METRICS_SINK", "agent".to_string()),
                ("KUBEBOOT_METRICS_AGENT_ENDPOINT", format!("tcp://{addr}")),
            ]
        };
        match self {
            Mode::File => Vec::new(),
            Mode::AgentUp => agent(&sinks.up.addr),
            Mode::AgentDown => agent(&sinks.down),
            Mode::AgentStalled => agent(&sinks.stalled),
            Mode::Off => vec![("KUBEBOOT_METRICS_SINK", "off".to_string())],
        }
    }
}

struct Options {
    runs: usize,
    out: Option<PathBuf>,
    logs: Option<PathBuf>,
}

const USAGE: &str = "usage: kubeboot-bench-metrics [--runs N] [--out FILE] [--logs DIR]\n\
     \n  --runs N    runs per sink mode (default 20), interleaved round-robin\
     \n  --out FILE  also write the report there (after every run succeeded)\
     \n  --logs DIR  keep each run's agent log (JSON lines) there";

fn options() -> Options {
    let a = args(USAGE, &["--runs"]);
    Options {
        runs: a.counts.get("--runs").copied().unwrap_or(20),
        out: a.out,
        logs: a.logs,
    }
}

/// What the healthy agent's listener has seen.
#[derive(Debug, Default, Clone, Copy)]
struct Received {
    accepted: usize,
    closed: usize,
    lines: usize,
}

/// A healthy CloudWatch agent: accepts, reads, counts lines, discards.
struct UpAgent {
    addr: String,
    seen: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl UpAgent {
    async fn start() -> UpAgent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the agent listener");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(Mutex::new(Received::default()));
        let counts = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                counts.lock().expect("counts").accepted += 1;
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let lines = buf[..n].iter().filter(|b| **b == b'\n').count();
                                counts.lock().expect("counts").lines += lines;
                            }
                        }
                    }
                    counts.lock().expect("counts").closed += 1;
                });
            }
        });
        UpAgent { addr, seen, task }
    }

    fn now(&self) -> Received {
        *self.seen.lock().expect("counts")
    }

    /// What arrived since `mark`, once every connection the (exited) agent
    /// opened has been read to its end.
    async fn since(&self, mark: Received) -> Received {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.now();
            if now.closed == now.accepted || Instant::now() > deadline {
                return Received {
                    accepted: now.accepted - mark.accepted,
                    closed: now.closed - mark.closed,
                    lines: now.lines - mark.lines,
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for UpAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The three agent endpoints, alive for the whole benchmark.
struct Sinks {
    up: UpAgent,
    down: String,
    stalled: String,
    /// Connections that fill the stalled endpoint's accept queue.
    stalled_held: usize,
    _stalled: (std::net::TcpListener, Vec<std::net::TcpStream>),
}

impl Sinks {
    async fn start() -> Sinks {
        let up = UpAgent::start().await;
        let down = closed_endpoint();
        let (listener, held, stalled) = stalled_endpoint();
        Sinks {
            up,
            down,
            stalled,
            stalled_held: held.len(),
            _stalled: (listener, held),
        }
    }
}

/// What one timed `kubeboot bootstrap` run produced.
struct Run {
    mode: Mode,
    round: usize,
    /// Process start → exit.
    exit: Duration,
    /// Process start → READY=1 received on the notify socket.
    ready: Duration,
    /// Process start → the "node bootstrapped" log line (millisecond stamps).
    logged: Duration,
    /// Process start → the "metrics sink unavailable" warning, if logged.
    warned: Option<Duration>,
    /// Documents the sink received: lines in the file, lines at the listener;
    /// `None` where nothing can receive (down, stalled, off).
    received: Option<usize>,
    /// Connections the healthy agent's listener accepted (agent-up).
    connections: usize,
}

/// What every run uses: the cluster, the sinks, the notify socket.
#[derive(Clone, Copy)]
struct Bench<'a> {
    sim: &'a SimCluster,
    sinks: &'a Sinks,
    notify: &'a UnixDatagram,
    notify_path: &'a Path,
    logs: Option<&'a Path>,
}

/// Runs `kubeboot bootstrap` on a new worker with the no-op stand-in and
/// the sink of `mode`; panics (with the agent's log) unless it exits 0 and
/// says READY=1.
async fn timed_bootstrap(bench: &Bench<'_>, node: &SimNode, mode: Mode, round: usize) -> Run {
    let Bench {
        sim,
        sinks,
        notify,
        notify_path,
        logs,
    } = *bench;
    let what = format!("{} round {}", mode.name(), round + 1);
    let mut buf = vec![0u8; 4096];
    while notify.try_recv(&mut buf).is_ok() {}
    let mark = sinks.up.now();
    let mut cmd = sim.bootstrap_command(node);
    cmd.env("KBTEST_KUBEADM_NOOP", "1")
        .env("NOTIFY_SOCKET", notify_path)
        .envs(mode.envs(sinks));
    let is_ready = |datagram: &[u8]| {
        String::from_utf8_lossy(datagram)
            .lines()
            .any(|l| l == "READY=1")
    };
    let spawned = SystemTime::now();
    let started = Instant::now();
    let output = cmd.output();
    tokio::pin!(output);
    let mut ready = None;
    let out = loop {
        tokio::select! {
            biased;
            got = notify.recv(&mut buf), if ready.is_none() => {
                if let Ok(n) = got {
                    if is_ready(&buf[..n]) {
                        ready = Some(started.elapsed());
                    }
                }
            }
            out = &mut output => break out.expect("kubeboot runs"),
        }
    };
    let exit = started.elapsed();
    // A READY=1 sent just before the exit may still be queued.
    while ready.is_none() {
        match notify.try_recv(&mut buf) {
            Ok(n) if is_ready(&buf[..n]) => ready = Some(exit),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stderr);
    let name = format!("{}-{:03}", mode.name(), round + 1);
    kept_and_succeeded(out.status, &out.stderr, logs, &name, &what, exit);
    let ready = ready.unwrap_or_else(|| {
        panic!(
            "{what}: no READY=1 on the notify socket; last log lines:\n{}",
            tail(&stderr, 30)
        )
    });
    let lines = timeline(&stderr, spawned);
    let at = |message: &str| lines.iter().find(|(m, _)| m == message).map(|(_, d)| *d);
    let logged = at(BOOTSTRAPPED)
        .unwrap_or_else(|| panic!("{what}: no \"{BOOTSTRAPPED}\" line:\n{}", tail(&stderr, 30)));
    let registered = sim.has_node_object(node);
    assert!(registered, "{what}: no Node object");
    let file = node.metrics_file();
    assert_eq!(
        file.exists(),
        mode == Mode::File,
        "{what}: the metrics file {} exists only in file mode (are the overrides applied?)",
        file.display()
    );
    let (received, connections) = match mode {
        Mode::File => (Some(node.metrics_text().lines().count()), 0),
        Mode::AgentUp => {
            let got = sinks.up.since(mark).await;
            (Some(got.lines), got.accepted)
        }
        Mode::AgentDown | Mode::AgentStalled | Mode::Off => (None, 0),
    };
    Run {
        mode,
        round,
        exit,
        ready,
        logged,
        warned: at(SINK_UNAVAILABLE),
        received,
        connections,
    }
}

/// One cluster initialized (untimed) by a control plane with the full
/// stand-in, one untimed warm-up worker, then `rounds` rounds of one new
/// worker per mode.
async fn measure(rounds: usize, logs: Option<&Path>) -> (Vec<Run>, usize) {
    let sim = initialized_cluster(MODES.len() * rounds + 1).await;
    let sinks = Sinks::start().await;
    let dir = tempfile::Builder::new()
        .prefix("kbbench-notify-")
        .tempdir()
        .expect("notify dir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");

    let warm_up = Bench {
        sim: &sim,
        sinks: &sinks,
        notify: &notify,
        notify_path: &notify_path,
        logs: None,
    };
    // Untimed: the first worker pays for cold caches (binary, moto's paths).
    timed_bootstrap(&warm_up, &sim.nodes[1], Mode::File, 0).await;
    let bench = Bench { logs, ..warm_up };

    let mut runs = Vec::new();
    let mut next = 2;
    for round in 0..rounds {
        for k in 0..MODES.len() {
            let mode = MODES[(round + k) % MODES.len()];
            let run = timed_bootstrap(&bench, &sim.nodes[next], mode, round).await;
            next += 1;
            eprintln!(
                "round {}/{rounds} {:<13} ready {:>9}  exit {:>9}",
                round + 1,
                mode.name(),
                ms(run.ready),
                ms(run.exit)
            );
            runs.push(run);
        }
    }
    let held = sinks.stalled_held;
    drop(sinks);
    // Dropping the cluster checks every metrics file line as EMF and scans
    // every output for published secrets (panics before any report).
    drop(sim);
    (runs, held)
}

/// 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ")
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn msf(ms: f64) -> String {
    format!("{ms:.1} ms")
}

fn signed(ms: f64) -> String {
    // No "-0.0": a difference that rounds to zero is shown as ±0.0.
    if (ms * 10.0).round() == 0.0 {
        "±0.0 ms".to_string()
    } else {
        format!("{ms:+.1} ms")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * 0.5).round() as usize;
    v[i]
}

fn of(runs: &[Run], mode: Mode) -> Vec<&Run> {
    runs.iter().filter(|r| r.mode == mode).collect()
}

fn p(runs: &[&Run], pick: fn(&Run) -> Duration, q: f64) -> Duration {
    let mut s: Vec<Duration> = runs.iter().map(|r| pick(r)).collect();
    s.sort();
    percentile(&s, q)
}

/// Median over rounds of (this mode's run − the file run of the same round).
fn paired(runs: &[Run], mode: Mode, pick: fn(&Run) -> Duration) -> f64 {
    let base = of(runs, Mode::File);
    median(
        of(runs, mode)
            .iter()
            .filter_map(|r| {
                base.iter()
                    .find(|b| b.round == r.round)
                    .map(|b| millis(pick(r)) - millis(pick(b)))
            })
            .collect(),
    )
}

/// Δ p50 vs file, and the median of the per-round paired differences.
fn delta(runs: &[Run], mode: Mode, pick: fn(&Run) -> Duration) -> (f64, f64) {
    let base = millis(p(&of(runs, Mode::File), pick, 0.5));
    let this = millis(p(&of(runs, mode), pick, 0.5));
    (this - base, paired(runs, mode, pick))
}

fn timing_table(out: &mut String, runs: &[Run], pick: fn(&Run) -> Duration) {
    let _ = writeln!(
        out,
        "| mode | runs | min | p50 | p90 | max | Δ p50 vs file | paired Δ vs file (median) |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for mode in MODES {
        let these = of(runs, mode);
        let samples: Vec<Duration> = these.iter().map(|r| pick(r)).collect();
        let (d50, dpair) = delta(runs, mode, pick);
        let (d50, dpair) = if mode == Mode::File {
            ("—".to_string(), "—".to_string())
        } else {
            (signed(d50), signed(dpair))
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {d50} | {dpair} |",
            mode.name(),
            these.len(),
            spread(&samples)
        );
    }
    out.push('\n');
}

fn count_cells(per_run: &[usize]) -> String {
    let mean = per_run.iter().sum::<usize>() as f64 / per_run.len().max(1) as f64;
    let min = per_run.iter().min().copied().unwrap_or(0);
    let max = per_run.iter().max().copied().unwrap_or(0);
    if min == max {
        format!("{min}")
    } else {
        format!("{mean:.2} ({min}–{max})")
    }
}

fn documents_table(out: &mut String, runs: &[Run]) -> Option<usize> {
    let emitted: Vec<usize> = of(runs, Mode::File)
        .iter()
        .filter_map(|r| r.received)
        .collect();
    let emitted_typ = {
        let mut e = emitted.clone();
        e.sort_unstable();
        e.get(e.len() / 2).copied()
    };
    let _ = writeln!(
        out,
        "| mode | documents the sink received per run | dropped per run | runs that logged \"metrics sink unavailable\" | that warning, since process start (p50 / max) |\n\
         |---|---|---|---|---|"
    );
    for mode in MODES {
        let these = of(runs, mode);
        let received: Vec<usize> = these.iter().filter_map(|r| r.received).collect();
        let warned: Vec<Duration> = these.iter().filter_map(|r| r.warned).collect();
        let (received_cell, dropped_cell) = match mode {
            Mode::File => (
                format!("{} (lines in the file)", count_cells(&received)),
                "0 (all written)".to_string(),
            ),
            Mode::AgentUp => {
                let conns: Vec<usize> = these.iter().map(|r| r.connections).collect();
                let dropped: Vec<usize> = received
                    .iter()
                    .map(|&r| emitted_typ.unwrap_or(r).saturating_sub(r))
                    .collect();
                (
                    format!(
                        "{} (lines at the listener, over {} connection(s) per run)",
                        count_cells(&received),
                        count_cells(&conns)
                    ),
                    format!("{} (file-mode count − received)", count_cells(&dropped)),
                )
            }
            Mode::AgentDown | Mode::AgentStalled => (
                "0 (nothing can accept)".to_string(),
                format!(
                    "all: {} (the file-mode count; the agent does not log its drop count)",
                    emitted_typ.map_or("?".to_string(), |e| e.to_string())
                ),
            ),
            Mode::Off => (
                "— (no writer)".to_string(),
                "— (nothing emitted)".to_string(),
            ),
        };
        let warned_cell = if warned.is_empty() {
            "—".to_string()
        } else {
            let mut w = warned.clone();
            w.sort();
            format!(
                "{} / {}",
                ms(percentile(&w, 0.5)),
                ms(*w.last().expect("warned"))
            )
        };
        let _ = writeln!(
            out,
            "| `{}` | {received_cell} | {dropped_cell} | {} of {} | {warned_cell} |",
            mode.name(),
            warned.len(),
            these.len()
        );
    }
    out.push('\n');
    emitted_typ
}

fn interpretation(out: &mut String, runs: &[Run]) {
    let ready = |r: &Run| r.ready;
    let logged = |r: &Run| r.logged;
    let exit = |r: &Run| r.exit;
    let after = |r: &Run| r.exit.saturating_sub(r.ready);
    let _ = writeln!(out, "## Interpretation\n");
    let _ = writeln!(
        out,
        "Differences against the `file` baseline, in ms: Δ of the p50s, and in brackets the median of the \
         per-round differences (each mode's run against the `file` run of the same round).\n"
    );
    let _ = writeln!(
        out,
        "| mode | work done (READY=1) | work done (\"node bootstrapped\" line) | exit | READY=1 → exit |\n\
         |---|---|---|---|---|"
    );
    for mode in MODES.into_iter().filter(|m| *m != Mode::File) {
        let cell = |pick: fn(&Run) -> Duration| {
            let (d50, dpair) = delta(runs, mode, pick);
            format!("{} ({})", signed(d50), signed(dpair))
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            mode.name(),
            cell(ready),
            cell(logged),
            cell(exit),
            cell(after)
        );
    }
    let base = of(runs, Mode::File);
    let spread_ms =
        |pick: fn(&Run) -> Duration| millis(p(&base, pick, 0.9)) - millis(p(&base, pick, 0.5));
    let _ = writeln!(
        out,
        "\nFor scale, the baseline's own spread (p90 − p50 of `file`): {} to READY=1, {} to exit.\n",
        msf(spread_ms(ready)),
        msf(spread_ms(exit))
    );

    let stalled = of(runs, Mode::AgentStalled);
    let base_after = millis(p(&base, after, 0.5));
    let (st50, st90, stmax) = (
        millis(p(&stalled, after, 0.5)),
        millis(p(&stalled, after, 0.9)),
        millis(p(&stalled, after, 1.0)),
    );
    let timeout = millis(SINK_TIMEOUT);
    let verdict = if stmax - base_after <= timeout {
        format!("within one SINK_TIMEOUT ({timeout:.0} ms) in every run, the slowest included")
    } else {
        format!("more than one SINK_TIMEOUT ({timeout:.0} ms) in the slowest run")
    };
    let _ = writeln!(
        out,
        "**What a stalled agent costs at exit.** From READY=1 to exit (the exit-time flush, which may take up \
         to FLUSH_GRACE = {:.0} ms, then teardown) the `agent-stalled` runs took {} at p50, {} at p90 and {} \
         at most; the `file` runs {} at p50. The extra is {} at p50, {} at p90 and {} at most: {verdict}. \
         It is paid once per process: start → exit of `agent-stalled` against `file` is {} at p50.\n",
        millis(FLUSH_GRACE),
        msf(st50),
        msf(st90),
        msf(stmax),
        msf(base_after),
        signed(st50 - base_after),
        signed(st90 - base_after),
        signed(stmax - base_after),
        signed(delta(runs, Mode::AgentStalled, exit).0),
    );

    // Where it comes from, by the agent's own log stamps.
    let warn_p50 = |mode: Mode| {
        let mut w: Vec<Duration> = of(runs, mode).iter().filter_map(|r| r.warned).collect();
        w.sort();
        (!w.is_empty()).then(|| millis(percentile(&w, 0.5)))
    };
    let before = stalled
        .iter()
        .filter(|r| r.warned.is_some_and(|w| w <= r.logged))
        .count();
    let warned_after_work = median(
        stalled
            .iter()
            .filter_map(|r| r.warned.map(|w| millis(w) - millis(r.logged)))
            .collect(),
    );
    let case = if stalled.iter().any(|r| r.warned.is_none()) {
        "In some runs no warning was logged at all; see the documents table.".to_string()
    } else if before == 0 {
        format!(
            "In all {} runs the work was done while the connect still hung (the timeout was logged {} after \
             \"node bootstrapped\" at p50), so the exit-time flush waited for the rest of that one connect's \
             SINK_TIMEOUT; the documents queued meanwhile were then dropped without another connect \
             (RECONNECT_AFTER = {:.0} s outlives the process).",
            stalled.len(),
            msf(warned_after_work),
            RECONNECT_AFTER.as_secs_f64()
        )
    } else if before == stalled.len() {
        format!(
            "In all {} runs the timeout ran out while the agent was still working, so at exit there was \
             nothing left to wait for.",
            stalled.len()
        )
    } else {
        format!(
            "In {before} of {} runs the timeout ran out before the work was done (nothing left to wait for at \
             exit); in the others the exit-time flush waited for the rest of it.",
            stalled.len()
        )
    };
    let _ = writeln!(
        out,
        "Where it comes from, by the agent's log stamps (p50, since process start): the writer connects once \
         per process, at the first document. `agent-down` logged its refused connect at {}, about when the \
         first document goes out; `agent-stalled` logged the connect timing out at {}, so it began about \
         {} in; the work was done (\"node bootstrapped\") at {}. {case}\n",
        warn_p50(Mode::AgentDown).map_or("— (never)".to_string(), msf),
        warn_p50(Mode::AgentStalled).map_or("— (never)".to_string(), msf),
        warn_p50(Mode::AgentStalled).map_or("—".to_string(), |w| msf(w - timeout)),
        msf(millis(p(&stalled, logged, 0.5))),
    );
    let against = |pick: fn(&Run) -> Duration| {
        MODES
            .into_iter()
            .filter(|m| *m != Mode::File)
            .map(|m| {
                let (d50, dpair) = delta(runs, m, pick);
                format!("`{}` {} ({})", m.name(), signed(d50), signed(dpair))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "**Work done** (start → READY=1) against `file`: {}.\n\n**Exit** (start → exit) against `file`: {}.\n\n\
         Read a difference as a cost only where it is well outside the baseline's own spread given above.\n",
        against(ready),
        against(exit)
    );
}

#[tokio::main]
async fn main() {
    let opts = options();
    let agent = kubeboot_bin();
    // Fail before any setup if the stand-in is missing.
    let kubeadm = standin::kubeadm_bin();
    let started = Instant::now();
    let date = k8s_openapi::jiff::Timestamp::now();
    let load_before = load_average();
    let interference = Interference::start();
    eprintln!(
        "metrics sink benchmark: {} runs per mode, {} modes, worker path",
        opts.runs,
        MODES.len()
    );
    let (runs, stalled_held) = measure(opts.runs, opts.logs.as_deref()).await;
    let (others, own) = interference.finish();
    let load_after = load_average();

    let mut out = String::new();
    let _ = writeln!(out, "# Metrics sink benchmark\n");
    let _ = writeln!(
        out,
        "Does a metric sink that is down or slow delay `kubeboot bootstrap`? The worker path (the cheapest, so \
         the sink's share shows most) with kubeadm replaced by a no-op, {} runs per sink mode, the modes \
         interleaved round-robin.\n",
        opts.runs
    );
    let _ = writeln!(
        out,
        "- Machine: {}; load average (1 / 5 / 15 min) {load_before} before, {load_after} after; during the \
         benchmark other processes used {others:.0}% of the machine's CPU time and the benchmark {own:.0}% \
         (the machine is shared: other work shows in the figures)",
        machine()
    );
    let _ = writeln!(out, "{}", date_line(date, started));
    let _ = writeln!(out, "{}", command_line("kubeboot-bench-metrics"));
    let _ = writeln!(
        out,
        "- Agent: `{}` (debug build), source `{}`; its metrics writer as built: SINK_TIMEOUT = {:.0} ms per \
         connect or write, RECONNECT_AFTER = {:.0} s, FLUSH_GRACE = {:.0} ms at exit",
        shown(&agent),
        first_line("git", &["describe", "--always", "--dirty"]),
        millis(SINK_TIMEOUT),
        RECONNECT_AFTER.as_secs_f64(),
        millis(FLUSH_GRACE)
    );
    let _ = writeln!(
        out,
        "- kubeadm: the stand-in `{}` with `KBTEST_KUBEADM_NOOP=1`",
        shown(&kubeadm)
    );
    let _ = writeln!(
        out,
        "- AWS: moto_server {} on loopback (no proxy); the control plane's etcd {}\n",
        moto_version(),
        first_line("etcd", &["--version"]).trim_start_matches("etcd Version: ")
    );

    let _ = writeln!(out, "## Sink modes\n");
    let _ = writeln!(
        out,
        "| mode | sink | overrides on the bootstrap command |\n|---|---|---|"
    );
    for mode in MODES {
        let envs = match mode {
            Mode::File => "none".to_string(),
            Mode::AgentUp | Mode::AgentDown | Mode::AgentStalled => {
                "`KUBEBOOT_METRICS_SINK=agent`, `KUBEBOOT_METRICS_AGENT_ENDPOINT=tcp://127.0.0.1:<port>`"
                    .to_string()
            }
            Mode::Off => "`KUBEBOOT_METRICS_SINK=off`".to_string(),
        };
        let _ = writeln!(out, "| `{}` | {} | {envs} |", mode.name(), mode.sink());
    }
    let _ = writeln!(
        out,
        "\nThe stalled endpoint's accept queue was filled with {stalled_held} held connections before the runs.\n"
    );

    let _ = writeln!(
        out,
        "## Work done: process start → READY=1\n\n\
         READY=1 as the driver's notify socket received it (`NOTIFY_SOCKET`; monotonic clock). The agent \
         sends it right after the \"node bootstrapped\" line, before the exit-time metrics flush.\n"
    );
    timing_table(&mut out, &runs, |r| r.ready);
    let _ = writeln!(
        out,
        "## Work done: process start → the \"node bootstrapped\" log line\n\n\
         The same moment from the agent's own JSON log stamp (millisecond resolution, wall clock).\n"
    );
    timing_table(&mut out, &runs, |r| r.logged);
    let _ = writeln!(out, "## Process start → exit\n");
    timing_table(&mut out, &runs, |r| r.exit);
    let _ = writeln!(
        out,
        "## READY=1 → exit\n\n\
         Per run, exit minus READY=1: the exit-time flush (at most FLUSH_GRACE) and process teardown.\n"
    );
    timing_table(&mut out, &runs, |r| r.exit.saturating_sub(r.ready));

    let _ = writeln!(out, "## Documents per run\n");
    let emitted = documents_table(&mut out, &runs);
    let _ = writeln!(
        out,
        "Documents emitted per worker bootstrap: {} (the `file` count; the same path emits the same \
         documents whatever the sink, plus a `MetricsDropped` document only once a sink takes documents \
         again, which never happens within one run here). The agent does not log how many it sent or \
         dropped, so for `agent-down` and `agent-stalled` the drop count is that number, not a reading.\n",
        emitted.map_or("?".to_string(), |e| e.to_string())
    );

    interpretation(&mut out, &runs);

    let _ = writeln!(
        out,
        "## What is measured\n\n\
- **One cluster, one new worker per run**: initialized once (untimed) by a control plane running the \
full stand-in (real etcd, join material published); then one untimed warm-up worker (`file`), then per \
round one new worker instance per mode, one at a time, the starting mode shifting by one each round. \
Each run: the real `kubeboot bootstrap --config <node>/kubeboot.toml --log-format json` with the no-op \
stand-in (`KBTEST_KUBEADM_NOOP=1`), exit status 0 and the Node object checked.\n\
- **Timed**: from spawning the process to READY=1 arriving on the driver's notify socket, and to the \
process's exit (its output read to the end), on the driver's monotonic clock; the \"node bootstrapped\" \
line from the agent's wall-clock stamp against the spawn time.\n\
- **Sink**: the per-run `KUBEBOOT_METRICS_*` overrides; in every mode but `file` the node's metrics \
file is checked absent, so the override took effect. `agent-up` counts newline-terminated lines on \
every connection it accepted during the run, after the agent's connection closed.\n\
- **Not measured**: real CloudWatch agent, UDP sinks, the daemon (periodic documents), release builds, \
and the rest of a real bootstrap (kubeadm, kubelet, image pulls), which takes tens of seconds and \
would hide any of these differences."
    );

    publish(&out, opts.out.as_deref());
}
