//! What the benchmark drivers share: percentiles, the machine and how busy it
//! was, the agent's log timeline, moto's warm-up and writing the report.
//!
//! A module of the drivers, not of the library (`mod bench_common;` in each
//! driver; Cargo builds no binary from a directory without `main.rs`): the
//! tests do not time things, so nothing here belongs in the harness.

pub mod runs;

use kubeboot_tests::simcluster::SimCluster;
use kubeboot_tests::workspace::workspace_root;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A driver's command line: the counts given (each above 0), `--out FILE`
/// and `--logs DIR`.
pub struct Args {
    pub counts: BTreeMap<&'static str, usize>,
    pub out: Option<PathBuf>,
    pub logs: Option<PathBuf>,
}

/// Parses the command line of a driver that takes the count flags `counts`
/// (e.g. `--runs N`), `--out FILE` and `--logs DIR`. `-h`/`--help` prints
/// `usage` and exits 0; anything else prints it and exits 2.
pub fn args(usage: &str, counts: &[&'static str]) -> Args {
    let fail = |code: i32| -> ! {
        eprintln!("{usage}");
        std::process::exit(code);
    };
    let mut parsed = Args {
        counts: BTreeMap::new(),
        out: None,
        logs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(flag) = counts.iter().find(|f| **f == a) {
            let n = args
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| fail(2));
            parsed.counts.insert(flag, n);
            continue;
        }
        match a.as_str() {
            "--out" => parsed.out = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "--logs" => {
                parsed.logs = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2)))
            }
            "-h" | "--help" => fail(0),
            _ => fail(2),
        }
    }
    parsed
}

/// Keeps a run's agent log as `<logs>/<name>.log` when `logs` is given,
/// then checks the run succeeded (its last log lines otherwise).
pub fn kept_and_succeeded(
    status: std::process::ExitStatus,
    stderr: &[u8],
    logs: Option<&Path>,
    name: &str,
    what: &str,
    took: Duration,
) {
    if let Some(dir) = logs {
        std::fs::create_dir_all(dir).expect("logs directory");
        std::fs::write(dir.join(format!("{name}.log")), stderr).expect("write agent log");
    }
    assert!(
        status.success(),
        "{what}: kubeboot bootstrap exited {:?} after {took:?}; last log lines:\n{}",
        status.code(),
        tail(&String::from_utf8_lossy(stderr), 30)
    );
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `| min | p50 | p90 | max |` cells of some samples.
pub fn spread(samples: &[Duration]) -> String {
    let mut s = samples.to_vec();
    s.sort();
    format!(
        "{} | {} | {} | {}",
        ms(s[0]),
        ms(percentile(&s, 0.5)),
        ms(percentile(&s, 0.9)),
        ms(*s.last().expect("samples"))
    )
}

/// Text of one line of a command's output, or a placeholder.
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("?".to_string(), |kb| format!("{:.1}", kb / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    format!("{model}, {cores} cores available, {mem_gib} GiB RAM, Linux {kernel}")
}

/// CPU clock ticks: (busy, total) over all CPUs since boot (`/proc/stat`).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU clock ticks used by this process and its reaped children (the agent
/// runs, moto, etcd, the stand-in), from `/proc/self/stat`.
fn own_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // Fields 14-17 (utime, stime, cutime, cstime) are 12-15 after the name.
    after_name
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum()
}

/// How busy the machine was with other work while the benchmark ran: the
/// machine is shared (a concurrent build shows here, and in the figures).
pub struct Interference {
    start: (u64, u64),
    own_start: u64,
}

impl Interference {
    pub fn start() -> Self {
        Interference {
            start: machine_ticks(),
            own_start: own_ticks(),
        }
    }

    /// `(others, own)` as percentages of the machine's CPU time meanwhile.
    pub fn finish(&self) -> (f64, f64) {
        let (busy, total) = machine_ticks();
        let own = own_ticks().saturating_sub(self.own_start) as f64;
        let busy = busy.saturating_sub(self.start.0) as f64;
        let total = total.saturating_sub(self.start.1).max(1) as f64;
        (100.0 * (busy - own).max(0.0) / total, 100.0 * own / total)
    }
}

pub fn moto_version() -> String {
    let python = std::env::var_os("KBTEST_MOTO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/moto/bin/python"));
    first_line(
        &python.display().to_string(),
        &["-c", "import moto; print(moto.__version__)"],
    )
}

/// Each distinct log message (first occurrence) with its time since the
/// process was spawned, from the lines' wall-clock stamps (millisecond
/// resolution).
pub fn timeline(stderr: &str, spawned: SystemTime) -> Vec<(String, Duration)> {
    let spawned_ms = spawned
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let mut out: Vec<(String, Duration)> = Vec::new();
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(message), Some(stamp)) = (v["message"].as_str(), v["timestamp"].as_str()) else {
            continue;
        };
        let Ok(ts) = stamp.parse::<k8s_openapi::jiff::Timestamp>() else {
            continue;
        };
        if out.iter().any(|(m, _)| m == message) {
            continue;
        }
        let offset = (ts.as_millisecond() as f64 - spawned_ms).max(0.0);
        out.push((
            message.to_string(),
            Duration::from_secs_f64(offset / 1000.0),
        ));
    }
    out
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A cluster of one control plane and `workers` workers, initialized
/// (untimed) by the control plane with the full stand-in, and moto warmed
/// up: what every timed worker run starts from.
pub async fn initialized_cluster(workers: usize) -> SimCluster {
    initialized_cluster_with(workers, &[]).await
}

/// [`initialized_cluster`] with settings added to every node's
/// configuration file: `(section, key, TOML value as a string)`.
pub async fn initialized_cluster_with(
    workers: usize,
    settings: &[(&str, &str, &str)],
) -> SimCluster {
    let sim = SimCluster::start(1, workers).await;
    for node in &sim.nodes {
        let mut text = std::fs::read_to_string(&node.config).expect("node config");
        for (section, key, value) in settings {
            let header = format!("[{section}]\n");
            assert!(
                text.contains(&header),
                "no [{section}] in {}",
                node.config.display()
            );
            text = text.replacen(&header, &format!("{header}{key} = \"{value}\"\n"), 1);
        }
        std::fs::write(&node.config, text).expect("node config");
    }
    let setup = sim.bootstrap(&[0]).await;
    assert!(
        setup.iter().all(|r| r.code == Some(0)),
        "the control plane did not initialize the cluster:\n{}",
        setup
            .iter()
            .map(|r| tail(&r.stderr, 30))
            .collect::<Vec<_>>()
            .join("\n")
    );
    warm_up_moto(&sim).await;
    // The init applied flannel; the simulated kubelets then report a
    // worker's Node Ready at once: their start-up delay is the
    // simulation's, not the agent's, and would swamp the worker path.
    sim.kubeapi.set_node_ready_delay(Duration::ZERO);
    sim
}

/// First use of a service in a fresh moto_server costs moto, not the agent,
/// a one-off initialization (SSM's has been seen to take ~0.8 s): one
/// untimed read per service, straight to moto, before timing. Returns how
/// long the SSM read took.
pub async fn warm_up_moto(sim: &SimCluster) -> Duration {
    let sdk = sim.moto.sdk_config().await;
    let t = Instant::now();
    let _ = aws_sdk_ssm::Client::new(&sdk)
        .get_parameter()
        .name("/kbbench/warm-up")
        .send()
        .await;
    let ssm = t.elapsed();
    let _ = aws_sdk_secretsmanager::Client::new(&sdk)
        .describe_secret()
        .secret_id("kbbench/warm-up")
        .send()
        .await;
    ssm
}

/// The report's `- Command:` line: the script that ran the driver (from
/// `KBBENCH_COMMAND`, set by bench/*.sh) and the driver's own command line.
pub fn command_line(driver: &str) -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect();
    let driver = format!("target/debug/{driver} {}", args.join(" "));
    match std::env::var("KBBENCH_COMMAND") {
        Ok(script) => format!("- Command: `{script}`, which ran `{}`", driver.trim_end()),
        Err(_) => format!("- Command: `{}`", driver.trim_end()),
    }
}

/// The report's `- Date:` line.
pub fn date_line(date: k8s_openapi::jiff::Timestamp, started: Instant) -> String {
    format!(
        "- Date: {} (UTC); the benchmark took {:.0} s",
        k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%d %H:%M", date).unwrap_or_default(),
        started.elapsed().as_secs_f64()
    )
}

/// `path` relative to the workspace, as a report shows it.
pub fn shown(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Prints the report and, with `out`, writes it there (atomically).
pub fn publish(report: &str, out: Option<&Path>) {
    print!("{report}");
    if let Some(path) = out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("report directory");
        }
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, report).expect("write report");
        std::fs::rename(&tmp, path).expect("move report into place");
        eprintln!("report written to {}", path.display());
    }
}
