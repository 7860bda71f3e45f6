//! Side-by-side benchmark driver: the agent against the bash + aws-cli
//! reference it replaces (bench/baseline/), figures for bench/compare/
//! REPORT.md, never assertions.
//!
//! - **Orchestration, A/B interleaved:** pairs of the agent's `kubeboot
//!   bootstrap` (no-op kubeadm) and the reference script doing the same
//!   coordination against the same moto_server through the same AWS
//!   proxies, on the init path (a fresh simulated cluster per pair) and the
//!   worker path (one initialized cluster); which goes first alternates.
//! - **Join storm:** N workers started at the same moment against one
//!   moto_server, whose proxies answer as AWS's default request quotas would
//!   (a token bucket per quota, a throttling error beyond it): completion
//!   times, failures, AWS calls per node, throttled requests; the reference
//!   at the sizes given.
//! - **Footprint:** the agent binary's size, `--version`'s wall time, each
//!   bootstrap's peak RSS (`wait4`), and `kubeboot daemon` idle on the
//!   initialized cluster's control plane: RSS and CPU over a window.
//!
//! Writes Markdown to stdout, with `--out` to a file, and with `--json` the
//! headline figures for bench/run.sh's summary.
//!
//! ```text
//! kubeboot-bench-compare [--init-pairs N] [--worker-pairs N] [--storm N]... [--reference-storm N]
//!                        [--idle-seconds N] [--out FILE] [--json FILE] [--logs DIR]
//! ```

// Shared by the drivers; this one uses a part of it.
#[allow(dead_code)]
mod bench_common;

use bench_common::runs::{
    bootstrap_command, exec_times, run_measured_async, start_node_etcd, timed_bootstrap, Calls,
    Finished, Proxies, Run,
};
use bench_common::{
    command_line, date_line, first_line, initialized_cluster, initialized_cluster_with, machine,
    moto_version, ms, percentile, publish, shown, spread, tail, warm_up_moto, Interference,
};
use kubeboot::registry::Phase;
use kubeboot_tests::awsproxy::{Handler, IncomingRequest, ProxyResponse};
use kubeboot_tests::simcluster::{SimCluster, SimNode};
use kubeboot_tests::workspace::{kubeboot_bin, workspace_root};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: kubeboot-bench-compare [options]\n\
     \n  --init-pairs N        agent/reference pairs on the init path (default 10)\
     \n  --worker-pairs N      agent/reference pairs on the worker path (default 20)\
     \n  --storm N             a join storm of N workers (repeatable; default 100 and 300)\
     \n  --reference-storm N   run the reference storm at sizes up to N (default 100; 0: never)\
     \n  --idle-seconds N      the daemon's idle window (default 60)\
     \n  --out FILE            also write the report there\
     \n  --json FILE           write the headline figures there (for bench/run.sh)\
     \n  --logs DIR            keep each agent run's log (JSON lines) there\
     \n\nThe reference is bench/baseline/{init,worker-join}.sh with the aws CLI from\
     \n.venv/awscli (bench/baseline/setup.sh), or KBBENCH_AWS_CLI.";

struct Options {
    init_pairs: usize,
    worker_pairs: usize,
    storms: Vec<usize>,
    reference_storm: usize,
    idle: Duration,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
    logs: Option<PathBuf>,
}

fn options() -> Options {
    let fail = |code: i32| -> ! {
        eprintln!("{USAGE}");
        std::process::exit(code);
    };
    let mut o = Options {
        init_pairs: 10,
        worker_pairs: 20,
        storms: Vec::new(),
        reference_storm: 100,
        idle: Duration::from_secs(60),
        out: None,
        json: None,
        logs: None,
    };
    let mut args = std::env::args().skip(1);
    let count = |v: Option<String>, zero_ok: bool| -> usize {
        v.and_then(|v| v.parse::<usize>().ok())
            .filter(|n| zero_ok || *n > 0)
            .unwrap_or_else(|| fail(2))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--init-pairs" => o.init_pairs = count(args.next(), false),
            "--worker-pairs" => o.worker_pairs = count(args.next(), false),
            "--storm" => o.storms.push(count(args.next(), false)),
            "--reference-storm" => o.reference_storm = count(args.next(), true),
            "--idle-seconds" => o.idle = Duration::from_secs(count(args.next(), false) as u64),
            "--out" => o.out = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "--json" => o.json = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "--logs" => o.logs = Some(args.next().map(PathBuf::from).unwrap_or_else(|| fail(2))),
            "-h" | "--help" => fail(0),
            _ => fail(2),
        }
    }
    if o.storms.is_empty() {
        o.storms = vec![100, 300];
    }
    o
}

/// The reference: bench/baseline/'s scripts and the aws CLI they call.
struct Reference {
    aws: PathBuf,
    scripts: PathBuf,
    /// A cluster CA for `init.sh --pki-dir` (it hashes the public key).
    pki: PathBuf,
    /// `HOME` for the CLI (no profile, no cache from the machine).
    home: PathBuf,
    _work: tempfile::TempDir,
}

impl Reference {
    fn new() -> Reference {
        let aws = std::env::var_os("KBBENCH_AWS_CLI")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".venv/awscli/bin/aws"));
        assert!(
            aws.is_file(),
            "the reference needs the aws CLI at {}: run bench/baseline/setup.sh (bench/run.sh does)",
            aws.display()
        );
        let work = tempfile::Builder::new()
            .prefix("kbbench-reference-")
            .tempdir()
            .expect("reference work dir");
        let pki = work.path().join("pki");
        let home = work.path().join("home");
        std::fs::create_dir_all(&pki).expect("pki dir");
        std::fs::create_dir_all(&home).expect("home dir");
        // kubeadm's CA: RSA 2048, self-signed.
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=kubernetes"])
            .arg("-keyout")
            .arg(pki.join("ca.key"))
            .arg("-out")
            .arg(pki.join("ca.crt"))
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "openssl: {made:?}");
        Reference {
            aws,
            scripts: workspace_root().join("bench/baseline"),
            pki,
            home,
            _work: work,
        }
    }

    fn version(&self) -> String {
        first_line(&self.aws.display().to_string(), &["--version"])
    }

    /// `bash <script> <args>` as the bench runs it: a clean environment,
    /// AWS through `proxies` (botocore's per-service endpoint variables).
    fn command(&self, script: &str, proxies: &Proxies, args: &[String]) -> Command {
        let mut cmd = Command::new("bash");
        let bin = self.aws.parent().map(Path::to_path_buf).unwrap_or_default();
        cmd.env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("HOME", &self.home)
            .env("AWS_CLI", &self.aws)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env(
                "AWS_ENDPOINT_URL_DYNAMODB",
                proxies.of("dynamodb").endpoint(),
            )
            .env("AWS_ENDPOINT_URL_SSM", proxies.of("ssm").endpoint())
            .env(
                "AWS_ENDPOINT_URL_SECRETS_MANAGER",
                proxies.of("secretsmanager").endpoint(),
            )
            .arg(self.scripts.join(script))
            .args(args);
        cmd
    }

    /// The arguments both scripts take, `--out` a directory of the node's.
    fn common_args(sim: &SimCluster, cluster: &str, node: &SimNode, out: &str) -> Vec<String> {
        vec![
            "--table".into(),
            sim.table.clone(),
            "--cluster".into(),
            cluster.into(),
            "--instance-id".into(),
            node.instance_id(),
            "--out".into(),
            node.dir.join(out).display().to_string(),
        ]
    }

    fn init(&self, sim: &SimCluster, proxies: &Proxies, cluster: &str, node: &SimNode) -> Command {
        let mut args = Self::common_args(sim, cluster, node, "reference-init");
        args.extend([
            "--pki-dir".into(),
            self.pki.display().to_string(),
            "--endpoint".into(),
            sim.kubeapi.endpoint(),
        ]);
        self.command("init.sh", proxies, &args)
    }

    fn join(&self, sim: &SimCluster, proxies: &Proxies, cluster: &str, node: &SimNode) -> Command {
        let args = Self::common_args(sim, cluster, node, "reference-join");
        self.command("worker-join.sh", proxies, &args)
    }
}

/// One reference run: wall time and its AWS calls.
struct RefRun {
    elapsed: Duration,
    aws: Calls,
}

fn succeeded(done: &Finished, what: &str) {
    assert!(
        done.status.success(),
        "{what} exited {:?} after {:?}:\n{}",
        done.status.code(),
        done.elapsed,
        tail(&done.stderr_text(), 30)
    );
}

async fn reference_run(proxies: &Proxies, cmd: Command, scratch: &Path, what: &str) -> RefRun {
    let marks = proxies.marks();
    let done = run_measured_async(cmd, scratch, None).await;
    succeeded(&done, what);
    RefRun {
        elapsed: done.elapsed,
        aws: proxies.calls_since(&marks),
    }
}

/// One pair: the agent's run and the reference's.
struct Pair {
    agent: Run,
    reference: RefRun,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.reference.elapsed.as_secs_f64() / self.agent.elapsed.as_secs_f64()
    }

    /// Against the agent's time without its no-op kubeadm runs: the
    /// reference runs no kubeadm at all.
    fn ratio_like_for_like(&self) -> f64 {
        let kubeadm = self.agent.kubeadm.unwrap_or_default();
        self.reference.elapsed.as_secs_f64()
            / self.agent.elapsed.saturating_sub(kubeadm).as_secs_f64()
    }
}

async fn init_pairs(n: usize, reference: &Reference, logs: Option<&Path>) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for i in 1..=n {
        let sim = SimCluster::start(1, 0).await;
        warm_up_moto(&sim).await;
        let proxies = Proxies::start(&sim.moto.endpoint()).await;
        let node = &sim.nodes[0];
        let etcd = start_node_etcd(node).await;
        let cluster = format!("{}-reference", sim.name);
        let scratch = node.dir.join("bench-output");
        let what = format!("init pair {i}");
        let (agent, reference) = if i % 2 == 1 {
            let a = timed_bootstrap(&sim, node, &proxies, &what, logs).await;
            let r = reference_run(
                &proxies,
                reference.init(&sim, &proxies, &cluster, node),
                &scratch,
                &what,
            )
            .await;
            (a, r)
        } else {
            let r = reference_run(
                &proxies,
                reference.init(&sim, &proxies, &cluster, node),
                &scratch,
                &what,
            )
            .await;
            let a = timed_bootstrap(&sim, node, &proxies, &what, logs).await;
            (a, r)
        };
        let state = sim.registry().await.state().await.expect("cluster state");
        assert_eq!(state.phase, Phase::Initialized, "init pair {i}: {state:?}");
        eprintln!(
            "init pair {i}/{n}: agent {}, reference {}",
            ms(agent.elapsed),
            ms(reference.elapsed)
        );
        pairs.push(Pair { agent, reference });
        drop(etcd);
    }
    pairs
}

/// Worker pairs on one cluster the agent initialized (and one the reference
/// initialized under another name, in the same table), and the cluster for
/// the daemon's idle figures.
async fn worker_pairs(
    n: usize,
    reference: &Reference,
    logs: Option<&Path>,
) -> (Vec<Pair>, SimCluster) {
    let sim = initialized_cluster(n).await;
    let proxies = Proxies::start(&sim.moto.endpoint()).await;
    let cluster = format!("{}-reference", sim.name);
    let scratch = sim.nodes[0].dir.join("bench-output");
    reference_run(
        &proxies,
        reference.init(&sim, &proxies, &cluster, &sim.nodes[0]),
        &scratch,
        "reference init (setup)",
    )
    .await;
    let mut pairs = Vec::new();
    for i in 1..=n {
        let node = &sim.nodes[i];
        let what = format!("worker pair {i}");
        let join = reference.join(&sim, &proxies, &cluster, node);
        let (agent, reference) = if i % 2 == 1 {
            let a = timed_bootstrap(&sim, node, &proxies, &what, logs).await;
            (a, reference_run(&proxies, join, &scratch, &what).await)
        } else {
            let r = reference_run(&proxies, join, &scratch, &what).await;
            (timed_bootstrap(&sim, node, &proxies, &what, logs).await, r)
        };
        assert!(sim.has_node_object(node), "worker pair {i}: no Node object");
        eprintln!(
            "worker pair {i}/{n}: agent {}, reference {}",
            ms(agent.elapsed),
            ms(reference.elapsed)
        );
        pairs.push(Pair { agent, reference });
    }
    (pairs, sim)
}

/// AWS's default request quotas that a join storm can meet (per account and
/// region unless said): a token bucket each, refilled continuously, holding
/// one second's worth.
const QUOTAS: &[(&str, &[&str], f64)] = &[
    // Parameter Store standard throughput, shared by these actions.
    (
        "SSM GetParameter/GetParameters/GetParametersByPath: 40/s",
        &["GetParameter", "GetParameters", "GetParametersByPath"],
        40.0,
    ),
    // Secrets Manager, combined with DescribeSecret.
    (
        "Secrets Manager GetSecretValue + DescribeSecret: 10,000/s",
        &["GetSecretValue", "DescribeSecret"],
        10_000.0,
    ),
    // One partition (every record of a cluster shares its partition key);
    // a consistent read of an item under 4 KB is one read unit.
    (
        "DynamoDB reads of one partition: 3,000 read units/s",
        &["GetItem", "Query"],
        3_000.0,
    ),
    (
        "DynamoDB writes of one partition: 1,000 write units/s",
        &["PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems"],
        1_000.0,
    ),
];

struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

/// The quota handler on every proxy: throttles beyond a quota as AWS does,
/// counting what it refused.
fn quota_handler(throttled: Arc<AtomicU64>) -> Handler {
    let buckets: Arc<Mutex<Vec<Bucket>>> = Arc::new(Mutex::new(
        QUOTAS
            .iter()
            .map(|(_, _, rate)| Bucket {
                rate: *rate,
                tokens: *rate,
                at: Instant::now(),
            })
            .collect(),
    ));
    Arc::new(move |req: &IncomingRequest| {
        let i = QUOTAS
            .iter()
            .position(|(_, ops, _)| ops.contains(&req.operation.as_str()))?;
        let mut buckets = buckets.lock().expect("quota buckets");
        let b = &mut buckets[i];
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.rate).min(b.rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return None;
        }
        throttled.fetch_add(1, Ordering::Relaxed);
        Some(ProxyResponse::throttling_for(req))
    })
}

/// One storm: who, how many, when each finished, what AWS saw.
struct Storm {
    who: &'static str,
    nodes: usize,
    /// Completion of each successful node since the common start, sorted.
    done: Vec<Duration>,
    failures: usize,
    first_failure: Option<String>,
    calls: usize,
    throttled: u64,
    peak_rss_kib: Vec<u64>,
    /// Spawning all `nodes` processes took this long.
    launched: Duration,
}

/// `cluster.pod_subnet` of the storm clusters: the node IPAM controller
/// gives each Node a /24 of it, so the default /16 holds 256 Nodes and a
/// 300-worker cluster needs more (as on AWS: with the default, the 45th
/// Node past 256 never gets a pod CIDR and stays NotReady, which the first
/// run of this benchmark showed).
const STORM_POD_SUBNET: &str = "10.240.0.0/14";

async fn storm(size: usize, reference: Option<&Reference>) -> Storm {
    let sim = initialized_cluster_with(size, &[("cluster", "pod_subnet", STORM_POD_SUBNET)]).await;
    let proxies = Proxies::start(&sim.moto.endpoint()).await;
    let throttled = Arc::new(AtomicU64::new(0));
    let handler = quota_handler(throttled.clone());
    for (_, _, p) in &proxies.by_service {
        p.set_handler(handler.clone());
    }
    let cluster = format!("{}-reference", sim.name);
    let scratch = sim.nodes[0].dir.join("bench-output");
    if let Some(r) = reference {
        reference_run(
            &proxies,
            r.init(&sim, &proxies, &cluster, &sim.nodes[0]),
            &scratch,
            "reference init (setup)",
        )
        .await;
    }
    let marks = proxies.marks();
    let before = throttled.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for node in &sim.nodes[1..=size] {
        let cmd = match reference {
            Some(r) => r.join(&sim, &proxies, &cluster, node),
            None => bootstrap_command(&sim, node, &proxies),
        };
        let scratch = node.dir.join("bench-output");
        tasks.push(tokio::spawn(async move {
            let done = run_measured_async(cmd, &scratch, None).await;
            (start.elapsed(), done)
        }));
    }
    let launched = start.elapsed();
    let mut storm = Storm {
        who: if reference.is_some() {
            "reference"
        } else {
            "agent"
        },
        nodes: size,
        done: Vec::new(),
        failures: 0,
        first_failure: None,
        calls: 0,
        throttled: 0,
        peak_rss_kib: Vec::new(),
        launched,
    };
    for t in tasks {
        let (at, done) = t.await.expect("storm task");
        if done.status.success() {
            storm.done.push(at);
            storm.peak_rss_kib.push(done.peak_rss_kib);
        } else {
            storm.failures += 1;
            storm
                .first_failure
                .get_or_insert_with(|| tail(&done.stderr_text(), 10));
        }
    }
    storm.done.sort();
    storm.calls = proxies.calls_since(&marks).values().map(|c| c.0).sum();
    storm.throttled = throttled.load(Ordering::Relaxed) - before;
    if reference.is_none() {
        let nodes = sim.kubeapi.nodes().len();
        eprintln!("storm of {size}: {nodes} Nodes registered (control plane included)");
    }
    eprintln!(
        "{} storm of {size}: {} done, {} failed, last at {}",
        storm.who,
        storm.done.len(),
        storm.failures,
        storm.done.last().map(|d| ms(*d)).unwrap_or_default()
    );
    storm
}

/// `VmRSS` (KiB) and utime + stime (clock ticks) of a live process.
fn rss_and_ticks(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((rss, f.iter().sum()))
}

struct Idle {
    window: Duration,
    rss_kib: Vec<u64>,
    cpu_percent: f64,
    leader: bool,
}

/// `kubeboot daemon` on the control plane of `sim`, at its default period:
/// after a settling minute's first part (start-up, the first turn), RSS
/// every second and CPU over `window`.
async fn daemon_idle(sim: &SimCluster, window: Duration) -> Idle {
    let mut cmd = sim.daemon_command(&sim.nodes[0]);
    // The default period and jitter, as a node runs it.
    cmd.env_remove("KUBEBOOT_DAEMON_PERIOD")
        .env_remove("KUBEBOOT_DAEMON_JITTER")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("the daemon starts");
    let pid = child.id().expect("daemon pid");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, ticks0) = rss_and_ticks(pid).expect("the daemon runs");
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (r, _) = rss_and_ticks(pid).expect("the daemon keeps running");
        rss.push(r);
    }
    let (_, ticks1) = rss_and_ticks(pid).expect("the daemon runs");
    let elapsed = t0.elapsed();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let leader = kubeboot_tests::termination::leader(sim).await.is_some();
    let _ = child.start_kill();
    let _ = child.wait().await;
    rss.sort();
    Idle {
        window: elapsed,
        rss_kib: rss,
        cpu_percent: 100.0 * (ticks1 - ticks0) as f64 / hz / elapsed.as_secs_f64(),
        leader,
    }
}

fn ratio_cells(pairs: &[Pair], ratio: fn(&Pair) -> f64) -> (String, f64) {
    let mut r: Vec<f64> = pairs.iter().map(ratio).collect();
    r.sort_by(f64::total_cmp);
    let p50 = r[(r.len() - 1) / 2];
    (
        format!("{:.1}× | {:.1}× | {:.1}×", r[0], p50, r[r.len() - 1]),
        p50,
    )
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    percentile(&s, 0.5)
}

fn calls_summary(maps: &[&Calls]) -> String {
    let mut per_op: BTreeMap<String, usize> = BTreeMap::new();
    for m in maps {
        for ((service, op), (n, _)) in m.iter() {
            *per_op.entry(format!("{service} {op}")).or_default() += n;
        }
    }
    let runs = maps.len().max(1);
    let total: usize = per_op.values().sum();
    let parts: Vec<String> = per_op
        .iter()
        .map(|(k, n)| {
            let mean = *n as f64 / runs as f64;
            if mean.fract() == 0.0 {
                format!("{mean:.0} {k}")
            } else {
                format!("{mean:.2} {k}")
            }
        })
        .collect();
    format!("{:.2} ({})", total as f64 / runs as f64, parts.join(", "))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    let opts = options();
    let agent = kubeboot_bin();
    let reference = Reference::new();
    let started = Instant::now();
    let date = k8s_openapi::jiff::Timestamp::now();
    let interference = Interference::start();
    let logs = opts.logs.as_deref();

    eprintln!("compare: {} init pairs", opts.init_pairs);
    let init = init_pairs(opts.init_pairs, &reference, logs).await;
    eprintln!("compare: {} worker pairs", opts.worker_pairs);
    let (worker, idle_sim) = worker_pairs(opts.worker_pairs, &reference, logs).await;
    eprintln!("compare: daemon idle for {:?}", opts.idle);
    let idle = daemon_idle(&idle_sim, opts.idle).await;
    drop(idle_sim);
    let mut storms = Vec::new();
    for &size in &opts.storms {
        eprintln!("compare: agent storm of {size}");
        storms.push(storm(size, None).await);
        if size <= opts.reference_storm {
            eprintln!("compare: reference storm of {size}");
            storms.push(storm(size, Some(&reference)).await);
        }
    }
    let version = exec_times(&agent, &["--version"], 200).await;
    let size = std::fs::metadata(&agent).map(|m| m.len()).unwrap_or(0);
    let stripped = first_line("file", &["-b", &agent.display().to_string()]);

    let mut out = String::new();
    let _ = writeln!(out, "# kubeboot against the bash + aws-cli reference\n");
    let (others, own) = interference.finish();
    let _ = writeln!(
        out,
        "- Machine: {}; during the benchmark other processes used {others:.0}% of the machine's CPU time \
         and the benchmark {own:.0}%",
        machine()
    );
    let _ = writeln!(out, "{}", date_line(date, started));
    let _ = writeln!(out, "{}", command_line("kubeboot-bench-compare"));
    let _ = writeln!(
        out,
        "- Agent: `{}`, {:.1} MB ({}), source `{}`",
        shown(&agent),
        size as f64 / 1e6,
        stripped
            .split(',')
            .filter(|p| p.contains("stripped"))
            .collect::<Vec<_>>()
            .join(",")
            .trim(),
        first_line("git", &["describe", "--always", "--dirty"])
    );
    let _ = writeln!(
        out,
        "- Reference: `bench/baseline/init.sh` and `worker-join.sh`, bash with `{}`",
        reference.version()
    );
    let _ = writeln!(
        out,
        "- AWS: moto_server {} on loopback, behind one in-process AWS proxy per service; etcd {}\n",
        moto_version(),
        first_line("etcd", &["--version"]).trim_start_matches("etcd Version: ")
    );

    let _ = writeln!(out, "## Orchestration, A/B interleaved\n");
    let _ = writeln!(
        out,
        "Each pair runs the agent and the reference back to back against the same moto_server and proxies; \
         odd pairs run the agent first, even pairs the reference. Wall time from spawning the process to its exit.\n"
    );
    let _ = writeln!(
        out,
        "| path | pairs | who | min | p50 | p90 | max |\n|---|---|---|---|---|---|---|"
    );
    let mut json = serde_json::Map::new();
    for (path, pairs) in [("init", &init), ("worker", &worker)] {
        let a: Vec<Duration> = pairs.iter().map(|p| p.agent.elapsed).collect();
        let r: Vec<Duration> = pairs.iter().map(|p| p.reference.elapsed).collect();
        let without: Vec<Duration> = pairs
            .iter()
            .filter_map(|p| p.agent.kubeadm.map(|k| p.agent.elapsed.saturating_sub(k)))
            .collect();
        let _ = writeln!(
            out,
            "| {path} | {} | agent (no-op kubeadm included) | {} |",
            pairs.len(),
            spread(&a)
        );
        if without.len() == pairs.len() {
            let _ = writeln!(out, "| | | agent − no-op kubeadm | {} |", spread(&without));
        }
        let cpu: Vec<Duration> = pairs.iter().map(|p| p.agent.cpu).collect();
        let _ = writeln!(
            out,
            "| | | agent CPU time (user + system, its own process) | {} |",
            spread(&cpu)
        );
        let _ = writeln!(out, "| | | reference | {} |", spread(&r));
        let (cells, p50) = ratio_cells(pairs, Pair::ratio);
        let _ = writeln!(
            out,
            "| | | **ratio, reference ÷ agent, per pair** (min, p50, max) | {cells} | |"
        );
        let (cells, like) = ratio_cells(pairs, Pair::ratio_like_for_like);
        let _ = writeln!(
            out,
            "| | | ratio, reference ÷ (agent − no-op kubeadm), per pair | {cells} | |"
        );
        json.insert(
            format!("{path}_ratio_p50"),
            serde_json::json!((p50 * 10.0).round() / 10.0),
        );
        json.insert(
            format!("{path}_ratio_like_for_like_p50"),
            serde_json::json!((like * 10.0).round() / 10.0),
        );
        json.insert(
            format!("{path}_agent_p50_ms"),
            serde_json::json!((median(&a).as_secs_f64() * 1e4).round() / 10.0),
        );
        json.insert(
            format!("{path}_reference_p50_ms"),
            serde_json::json!((median(&r).as_secs_f64() * 1e4).round() / 10.0),
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "| path | AWS calls per run, agent | AWS calls per run, reference |\n|---|---|---|"
    );
    for (path, pairs) in [("init", &init), ("worker", &worker)] {
        let a: Vec<_> = pairs.iter().map(|p| &p.agent.aws).collect();
        let r: Vec<_> = pairs.iter().map(|p| &p.reference.aws).collect();
        let _ = writeln!(
            out,
            "| {path} | {} | {} |",
            calls_summary(&a),
            calls_summary(&r)
        );
    }
    let worker_calls: Vec<usize> = worker
        .iter()
        .map(|p| p.agent.aws.values().map(|c| c.0).sum())
        .collect();
    json.insert(
        "worker_calls_max".into(),
        serde_json::json!(worker_calls.iter().max().copied().unwrap_or(0)),
    );
    out.push('\n');

    let _ = writeln!(out, "## Join storm\n");
    let _ = writeln!(
        out,
        "All workers of one initialized cluster started at the same moment (each `kubeboot bootstrap`, no-op \
         kubeadm, its own instance metadata), against one moto_server whose proxies enforce AWS's default \
         request quotas:\n"
    );
    for (name, _, _) in QUOTAS {
        let _ = writeln!(out, "- {name}");
    }
    let _ = writeln!(
        out,
        "\n| who | nodes | failures | completion p50 | p90 | p99 | last | AWS calls per node | throttled requests | peak RSS per process with its no-op kubeadm (`wait4`), max | spawning all took |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &storms {
        let pick = |p: f64| {
            if s.done.is_empty() {
                "–".to_string()
            } else {
                ms(percentile(&s.done, p))
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} |",
            s.who,
            s.nodes,
            s.failures,
            pick(0.5),
            pick(0.9),
            pick(0.99),
            pick(1.0),
            s.calls as f64 / s.nodes as f64,
            s.throttled,
            if s.who == "agent" {
                mib(s.peak_rss_kib.iter().max().copied().unwrap_or(0))
            } else {
                "(bash)".into()
            },
            ms(s.launched)
        );
        if s.who == "agent" {
            json.insert(
                format!("storm_{}_failures", s.nodes),
                serde_json::json!(s.failures),
            );
            json.insert(
                format!("storm_{}_calls_per_node", s.nodes),
                serde_json::json!(s.calls as f64 / s.nodes as f64),
            );
            json.insert(
                format!("storm_{}_last_ms", s.nodes),
                serde_json::json!(s.done.last().map_or(0.0, |d| d.as_secs_f64() * 1e3).round()),
            );
        }
    }
    for s in storms.iter().filter(|s| s.failures > 0) {
        let _ = writeln!(
            out,
            "\nFirst failure of the {} storm of {}:\n\n```\n{}\n```",
            s.who,
            s.nodes,
            s.first_failure.as_deref().unwrap_or_default()
        );
    }
    out.push('\n');

    let _ = writeln!(out, "## Footprint\n");
    let mut version_sorted = version.clone();
    version_sorted.sort();
    let rss_init: Vec<u64> = init.iter().map(|p| p.agent.own_peak_rss_kib).collect();
    let rss_worker: Vec<u64> = worker.iter().map(|p| p.agent.own_peak_rss_kib).collect();
    let max_of = |v: &[u64]| v.iter().max().copied().unwrap_or(0);
    let idle_rss_max = idle.rss_kib.last().copied().unwrap_or(0);
    let _ = writeln!(out, "| figure | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| agent binary | {:.2} MB ({size} bytes) |",
        size as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "| `kubeboot --version`, 200 runs: min / p50 / p90 / max | {} |",
        spread(&version).replace(" | ", " / ")
    );
    let _ = writeln!(
        out,
        "| bootstrap peak RSS (the agent's own `VmHWM`, sampled every 5 ms), init path, max of {} | {} |",
        rss_init.len(),
        mib(max_of(&rss_init))
    );
    let _ = writeln!(
        out,
        "| bootstrap peak RSS, worker path, max of {} | {} |",
        rss_worker.len(),
        mib(max_of(&rss_worker))
    );
    let _ = writeln!(
        out,
        "| daemon idle ({}), RSS sampled each second over {:.0} s: min / max | {} / {} |",
        if idle.leader {
            "the cluster's leader"
        } else {
            "not the leader"
        },
        idle.window.as_secs_f64(),
        mib(idle.rss_kib.first().copied().unwrap_or(0)),
        mib(idle_rss_max)
    );
    let _ = writeln!(
        out,
        "| daemon idle CPU over the same window | {:.2}% of one core |\n",
        idle.cpu_percent
    );
    json.insert("binary_bytes".into(), serde_json::json!(size));
    json.insert(
        "version_p50_ms".into(),
        serde_json::json!((percentile(&version_sorted, 0.5).as_secs_f64() * 1e4).round() / 10.0),
    );
    json.insert(
        "bootstrap_peak_rss_kib".into(),
        serde_json::json!(max_of(&rss_init).max(max_of(&rss_worker))),
    );
    json.insert("idle_rss_kib".into(), serde_json::json!(idle_rss_max));
    json.insert(
        "idle_cpu_percent".into(),
        serde_json::json!((idle.cpu_percent * 100.0).round() / 100.0),
    );

    let _ = writeln!(out, "## Where the agent's time goes (p50 over the pairs)\n");
    for (path, pairs) in [("Init", &init), ("Worker", &worker)] {
        let _ = writeln!(out, "{path} path:\n");
        let _ = writeln!(
            out,
            "| log line (or event) | since process start, p50 |\n|---|---|"
        );
        let order: Vec<String> = pairs[0]
            .agent
            .timeline
            .iter()
            .map(|(m, _)| m.clone())
            .collect();
        for m in order {
            let at: Vec<Duration> = pairs
                .iter()
                .filter_map(|p| {
                    p.agent
                        .timeline
                        .iter()
                        .find(|(x, _)| *x == m)
                        .map(|(_, d)| *d)
                })
                .collect();
            let _ = writeln!(out, "| `{m}` | {} |", ms(median(&at)));
        }
        let exits: Vec<Duration> = pairs.iter().map(|p| p.agent.elapsed).collect();
        let _ = writeln!(out, "| process exit | {} |\n", ms(median(&exits)));
    }

    let _ = writeln!(
        out,
        "## What is measured\n\n\
- **The agent**: the real `kubeboot bootstrap` (the binary above) with the kubeadm stand-in in its \
no-op mode: configuration, instance metadata (IMDSv2 double), credentials, every AWS call, the no-op \
kubeadm, the etcd member check (init; a one-member etcd started before the pair) and the Node's \
readiness (worker). \"agent − no-op kubeadm\" subtracts the kubeadm run times the agent logs (`kubeadm version`, then `init` or `join`).\n\
- **The reference**: `bash bench/baseline/<script>` with the aws CLI, doing the same coordination \
against the same table, secret and parameter kinds (see bench/baseline/README.md): it runs no kubeadm, \
checks no etcd member and waits for no Node, so the comparison leaves the agent's extra work in the \
agent's figure.\n\
- **Ratio** is the reference's wall time over the agent's, per pair; the p50 of those ratios is the \
headline figure.\n\
- **Storm**: spawned from this driver all at once (2 cores: the processes share them, and so do \
moto and the doubles); completion since the common start. Every request above the quotas is answered \
with the service's throttling error, which each client retries as its SDK does.\n\
- **Daemon idle**: `kubeboot daemon` on the initialized cluster's control plane at its default period \
(10 s of start-up excluded), the real leader lock, lifecycle queue polling and health checks against \
moto and the API double.\n"
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
