//! Running the agent (and other programs) for a benchmark: the AWS proxies
//! that count every call, a timed `kubeboot bootstrap` with its peak RSS,
//! the etcd member a no-op `kubeadm init` stands for.

use kubeboot_tests::awsproxy::{AwsProxy, ProxiedRequest};
use kubeboot_tests::kubeapi::KubeRequest;
use kubeboot_tests::process::ChildGuard;
use kubeboot_tests::simcluster::{SimCluster, SimNode};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Every service the agent has an endpoint override for, each behind its own
/// proxy so any call is counted under its service (config key under
/// `aws.endpoints`, name in the report); a service not called is not listed.
pub const SERVICES: &[(&str, &str)] = &[
    ("dynamodb", "DynamoDB"),
    ("secretsmanager", "Secrets Manager"),
    ("ssm", "SSM"),
    ("ec2", "EC2"),
    ("autoscaling", "Auto Scaling"),
    ("sqs", "SQS"),
    ("s3", "S3"),
    ("sts", "STS"),
];

/// (service, operation) → (calls, answered non-2xx).
pub type Calls = BTreeMap<(&'static str, String), (usize, usize)>;

/// The AWS proxies, one per service, in front of one moto.
pub struct Proxies {
    pub by_service: Vec<(&'static str, &'static str, AwsProxy)>,
}

impl Proxies {
    pub async fn start(moto_endpoint: &str) -> Self {
        let mut by_service = Vec::new();
        for (key, name) in SERVICES {
            by_service.push((*key, *name, AwsProxy::start(moto_endpoint).await));
        }
        Proxies { by_service }
    }

    /// `KUBEBOOT_AWS_ENDPOINTS_<SERVICE>` overrides pointing the agent at them.
    pub fn envs(&self) -> Vec<(String, String)> {
        self.by_service
            .iter()
            .map(|(key, _, p)| {
                (
                    format!("KUBEBOOT_AWS_ENDPOINTS_{}", key.to_uppercase()),
                    p.endpoint(),
                )
            })
            .collect()
    }

    /// The proxy of service `key` (`dynamodb`, ...).
    pub fn of(&self, key: &str) -> &AwsProxy {
        self.by_service
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, p)| p)
            .expect("a proxy per service")
    }

    /// Log lengths now, to slice one run's requests out afterwards.
    pub fn marks(&self) -> Vec<usize> {
        self.by_service
            .iter()
            .map(|(_, _, p)| p.log().len())
            .collect()
    }

    /// Requests since `marks`, as (service, request).
    pub fn since(&self, marks: &[usize]) -> Vec<(&'static str, ProxiedRequest)> {
        self.by_service
            .iter()
            .zip(marks)
            .flat_map(|((_, name, p), &m)| {
                p.log()
                    .into_iter()
                    .skip(m)
                    .map(move |r| (*name, r))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// (service, operation) → (calls, answered non-2xx) since `marks`.
    pub fn calls_since(&self, marks: &[usize]) -> Calls {
        let mut aws = Calls::new();
        for (service, r) in self.since(marks) {
            let e = aws.entry((service, r.operation.clone())).or_default();
            e.0 += 1;
            if !r.status.is_some_and(|s| (200..300).contains(&s)) {
                e.1 += 1;
            }
        }
        aws
    }
}

/// A finished process: status, output, wall time and peak RSS.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Spawn to reaped.
    pub elapsed: Duration,
    /// `ru_maxrss` from `wait4`, KiB: the largest peak resident set of the
    /// process and of its children it reaped.
    pub peak_rss_kib: u64,
    /// The process's own `VmHWM` (KiB), when sampled; else 0.
    pub own_peak_rss_kib: u64,
    /// User + system CPU time of the process itself (`wait4`), less
    /// sensitive than wall time to what else the machine runs.
    pub cpu: Duration,
}

impl Finished {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `cmd` to its end with stdout and stderr in files under `scratch`,
/// reaping it with `wait4` for its exact peak RSS (no sampling). Blocking:
/// call from `spawn_blocking` in async code.
///
/// With `sample_every`, the process's own `VmHWM` is also sampled that often
/// (a thread reading `/proc`: too costly for hundreds at once).
pub fn run_measured(mut cmd: Command, scratch: &Path, sample_every: Option<Duration>) -> Finished {
    std::fs::create_dir_all(scratch).expect("scratch directory");
    let name = uuid::Uuid::new_v4().simple().to_string();
    let (out_path, err_path) = (
        scratch.join(format!("{name}.out")),
        scratch.join(format!("{name}.err")),
    );
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let started = Instant::now();
    let child = cmd.spawn().expect("the program starts");
    let pid = child.id() as libc::pid_t;
    // The process's own high-water mark, sampled until it exits (wait4's
    // ru_maxrss also counts its children: a stand-in kubeadm).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_every.map(|every| {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(hwm) = high_water(pid as u32) {
                    peak = peak.max(hwm);
                }
                std::thread::sleep(every);
            }
            peak
        })
    });
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own unreaped child; both pointers are to
        // live locals of the right types.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "wait4: {e}");
    }
    let elapsed = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let own_peak_rss_kib = sampler.map_or(0, |s| s.join().unwrap_or(0));
    // Reaped above: the handle must not wait again.
    std::mem::forget(child);
    let finished = Finished {
        status: ExitStatus::from_raw(status),
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
        elapsed,
        peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        own_peak_rss_kib,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    finished
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

/// `VmHWM` of `pid` in KiB, while it lives.
pub fn high_water(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// [`run_measured`] from async code.
pub async fn run_measured_async(
    cmd: Command,
    scratch: &Path,
    sample_every: Option<Duration>,
) -> Finished {
    let scratch = scratch.to_path_buf();
    tokio::task::spawn_blocking(move || run_measured(cmd, &scratch, sample_every))
        .await
        .expect("the measured run's thread")
}

/// What one timed `kubeboot bootstrap` run produced.
pub struct Run {
    pub elapsed: Duration,
    pub peak_rss_kib: u64,
    pub own_peak_rss_kib: u64,
    pub cpu: Duration,
    /// kubeadm's run time as the agent logged it (`kubeadm succeeded`),
    /// summed over its runs (`kubeadm version`, then `init` or `join`).
    pub kubeadm: Option<Duration>,
    /// Agent log messages and when they were written, since the spawn.
    pub timeline: Vec<(String, Duration)>,
    pub aws: Calls,
    pub imds: BTreeMap<String, usize>,
    pub kube: BTreeMap<String, usize>,
}

pub fn kubeadm_elapsed(stderr: &str) -> Option<Duration> {
    stderr
        .lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "kubeadm succeeded")
                .then(|| v["elapsed_ms"].as_u64().map(Duration::from_millis))
                .flatten()
        })
        .reduce(|sum, run| sum + run)
}

/// `kubeboot bootstrap` on `node` as the benchmarks run it: the no-op
/// stand-in, the bench's own plain-http etcd member, AWS through `proxies`.
pub fn bootstrap_command(sim: &SimCluster, node: &SimNode, proxies: &Proxies) -> Command {
    let mut cmd = sim.bootstrap_command(node);
    // The no-op stand-in makes no PKI; the member it "started" is the
    // bench's own plain-http etcd (`start_node_etcd`).
    cmd.env("KBTEST_KUBEADM_NOOP", "1")
        .env("KUBEBOOT_ETCD_SCHEME", "http")
        .envs(proxies.envs());
    let std = cmd.as_std();
    let mut out = Command::new(std.get_program());
    out.args(std.get_args()).env_clear();
    for (k, v) in std.get_envs() {
        if let Some(v) = v {
            out.env(k, v);
        }
    }
    out
}

/// Runs `kubeboot bootstrap` on `node` with the no-op stand-in and AWS
/// through the proxies; panics (with the agent's log) unless it exits 0.
pub async fn timed_bootstrap(
    sim: &SimCluster,
    node: &SimNode,
    proxies: &Proxies,
    what: &str,
    logs: Option<&Path>,
) -> Run {
    let marks = proxies.marks();
    let (imds_mark, kube_mark) = (
        node.imds.request_log().len(),
        sim.kubeapi.request_log().len(),
    );
    let cmd = bootstrap_command(sim, node, proxies);
    let spawned = SystemTime::now();
    let done = run_measured_async(
        cmd,
        &node.dir.join("bench-output"),
        Some(Duration::from_millis(5)),
    )
    .await;
    let stderr = done.stderr_text();
    super::kept_and_succeeded(
        done.status,
        &done.stderr,
        logs,
        &what.replace(' ', "-"),
        what,
        done.elapsed,
    );
    let aws = proxies.calls_since(&marks);
    let mut imds = BTreeMap::new();
    for r in node.imds.request_log().into_iter().skip(imds_mark) {
        *imds.entry(format!("{} {}", r.method, r.path)).or_default() += 1;
    }
    let hostname = node.imds.identity().local_hostname();
    let mut kube = BTreeMap::new();
    for r in sim.kubeapi.request_log().into_iter().skip(kube_mark) {
        let KubeRequest { method, path, .. } = r;
        *kube
            .entry(format!("{method} {}", path.replace(&hostname, "<node>")))
            .or_default() += 1;
    }
    Run {
        elapsed: done.elapsed,
        peak_rss_kib: done.peak_rss_kib,
        own_peak_rss_kib: done.own_peak_rss_kib,
        cpu: done.cpu,
        kubeadm: kubeadm_elapsed(&stderr),
        timeline: super::timeline(&stderr, spawned),
        aws,
        imds,
        kube,
    }
}

/// A one-member etcd at the node's IP, standard ports, named like the node:
/// the member the agent confirms after a (no-op) `kubeadm init`.
pub async fn start_node_etcd(node: &SimNode) -> ChildGuard {
    let ip = node.ip();
    let name = node.imds.identity().local_hostname();
    let dir = node.dir.join("bench-etcd");
    std::fs::create_dir_all(&dir).expect("etcd dir");
    let bin = std::env::var_os("KBTEST_ETCD_BIN").unwrap_or_else(|| "etcd".into());
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    cmd.arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls=http://{ip}:2379"))
        .arg(format!("--advertise-client-urls=http://{ip}:2379"))
        .arg(format!("--listen-peer-urls=http://{ip}:2380"))
        .arg(format!("--initial-advertise-peer-urls=http://{ip}:2380"))
        .arg(format!("--initial-cluster={name}=http://{ip}:2380"))
        .arg("--initial-cluster-state=new")
        .arg(format!(
            "--initial-cluster-token=kbbench-{}",
            uuid::Uuid::new_v4().simple()
        ));
    let mut guard = ChildGuard::spawn("etcd", cmd, dir.join("etcd.log"))
        .expect("start etcd")
        .with_grace(Duration::from_millis(300));
    let url = format!("http://{ip}:2379");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            guard.is_running(),
            "etcd at {ip} exited:\n{}",
            guard.log_tail(20)
        );
        if let Ok(mut c) = kubeboot_tests::etcd::connect(std::slice::from_ref(&url)).await {
            let ready = c.status().await.is_ok_and(|s| s.leader() != 0)
                && c.get("kbbench-health", None).await.is_ok();
            if ready {
                return guard;
            }
        }
        assert!(
            Instant::now() < deadline,
            "etcd at {ip} not ready within 30s:\n{}",
            guard.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wall time of `program args` from spawn to exit, `n` times.
pub async fn exec_times(program: &Path, args: &[&str], n: usize) -> Vec<Duration> {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let out = tokio::process::Command::new(program)
            .args(args)
            .output()
            .await
            .expect("the command runs");
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    times
}
