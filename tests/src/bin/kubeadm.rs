//! A test-only `kubeadm` stand-in (the binary is named `kubeadm`).
//!
//! kubeadm cannot be installed on the test machine, yet the agent's value is
//! in how it drives kubeadm: init once, join as learner then voter, reset and
//! remove the member, refresh tokens and uploaded certificates. So this
//! binary answers the argv the agent uses as kubeadm 1.31 would, with the
//! same *effects*: real `etcd` processes that outlive it (like static Pods),
//! cluster state in the Kubernetes API (the [`kubeapi`] double, over plain
//! HTTP), files where kubeadm writes them, kubeadm's progress lines on
//! stdout, and kubeadm's error texts on stderr with exit code 1.
//!
//! What it reads: the `--config` file's documents (JSON objects separated by
//! `---` lines, `kubeadm.k8s.io/v1beta4`), only the fields the agent
//! renders. What it does NOT do: kube-apiserver / controller-manager /
//! scheduler / kubelet processes (their manifests are written, their effects
//! on the API are simulated), CoreDNS/kube-proxy, TLS to the API double.
//!
//! ## What it refuses, as kubeadm does (each cites its upstream source)
//!
//! - etcd is https with client-certificate auth, with kubeadm's PKI
//!   (`kubeboot_tests::pki`): no etcd call without this node's
//!   `apiserver-etcd-client` identity, so a worker, or a control plane
//!   before `download-certs`, cannot reach etcd;
//! - a joining control plane has no `pki/` until `download-certs` opened the
//!   shared CAs with the right certificate key (AES-256-GCM: a wrong key
//!   fails and writes nothing) and `certs` issued its own certificates;
//! - a joiner's etcd runs with the cluster's `etcd.local.extraArgs` (from
//!   the `kubeadm-config` ConfigMap) over its own defaults, so node-specific
//!   URLs there break every later join;
//! - preflight: existing manifests, kubelet.conf, a used etcd data dir or
//!   port, a worker's existing CA (not a control plane's:
//!   `preflight/checks.go` `JoinNodeChecks`);
//! - discovery: an unknown or expired token, a wrong CA pin, expired
//!   uploaded certificates; a stale learner or an unstarted voter in etcd
//!   (`check-etcd`, `member add`: one learner at a time);
//! - `kubelet-start`: with `KUBEADM_STANDIN_INIT_SYSTEM=systemd`, `systemctl
//!   restart kubelet`, blocking, as kubeadm does under systemd.
//!
//! Knobs (environment): `KBTEST_PID_DIR`, `KBTEST_OWNER_PID`,
//! `KBTEST_KUBEADM_LOG` (see `kubeboot_tests::standin`), `KBTEST_ETCD_BIN`,
//! and timeouts in milliseconds: `KBTEST_KUBEADM_WAIT_TIMEOUT_MS` (etcd and
//! API healthy, default 20 000), `KBTEST_KUBEADM_API_TIMEOUT_MS` (retrying an
//! unreachable API, default 10 000), `KBTEST_KUBEADM_DISCOVERY_TIMEOUT_MS`
//! (waiting for a token's signature in cluster-info, default 3 000),
//! `KBTEST_KUBEADM_PROMOTE_TIMEOUT_MS` (learner promotion, default 120 000),
//! `KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS` (etcd refusing membership changes as
//! "unhealthy cluster", default 30 000).
//!
//! ## No-op mode (`KBTEST_KUBEADM_NOOP=1`)
//!
//! For measuring the agent's own overhead (`bench/bootstrap.sh`), `init` and
//! `join` can do only what the agent reads after they return, and nothing
//! slow: no etcd, no waits, no discovery, no preflight.
//!
//! - `init --config F`: writes a fresh self-signed CA to
//!   `<certificatesDir>/ca.crt` and `ca.key` (the agent pins the CA's SPKI)
//!   and nothing else. The etcd member the agent then confirms (peer URL
//!   `http://<advertiseAddress>:2380`, started, voting, healthy) is the
//!   caller's to provide: the benchmark starts a one-member etcd at the
//!   node's IP before timing.
//! - `join --config F` (worker or control plane): writes `kubelet.conf`
//!   next to `caCertPath`'s `pki/`, pointing at
//!   `discovery.bootstrapToken.apiServerEndpoint` over plain HTTP with the
//!   cluster CA read from `cluster-info` (a throwaway CA if there is none),
//!   and registers the Node (`nodeRegistration.name`, `--node-ip`) already
//!   `Ready` in the API double: two requests, no kubelet delay. No
//!   discovery checks: the token, its signature and the CA pin are not
//!   verified. A control plane's etcd member is, again, the caller's.
//!
//! The config documents are still parsed (so an agent rendering bug still
//! fails), system paths are still refused, and every run is still logged to
//! `KBTEST_KUBEADM_LOG`. `reset`, `token` and `version` behave as without the
//! knob.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use etcd_client::{Client, ConnectOptions, Member, MemberAddOptions};
use k8s_openapi::jiff::Timestamp;
use kubeboot_tests::kubeapi;
use kubeboot_tests::net::http_request;
use kubeboot_tests::pki;
use kubeboot_tests::process::pid_alive;
use kubeboot_tests::standin::{
    self, etcd_data_dir_for, etcd_pids_for, forget_pid, is_etcd_for, record_pid, stop_groups,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The kubeadm release this stand-in imitates.
const VERSION: &str = "v1.31.2";
/// The only config API version modelled.
const CONFIG_API: &str = "kubeadm.k8s.io/v1beta4";
/// Where kubeadm keeps things on a real node, refused unless allowed.
const SYSTEM_PATHS: &[&str] = &["/etc/kubernetes", "/var/lib/etcd"];
/// kubeadm's default `--cert-dir`.
const DEFAULT_CERT_DIR: &str = "/etc/kubernetes/pki";
/// Lifetime of the uploaded control-plane certificates (kubeadm: 2 h).
const CERTS_TTL: Duration = Duration::from_secs(2 * 3600);
/// Annotation on `kubeadm-certs`: hex SHA-256 of the certificate key.
const KEY_HASH_ANNOTATION: &str = "kbtest.kubeboot.dev/certificate-key-sha256";
/// Annotation on `kubeadm-certs`: RFC 3339 expiry (now + 2 h at upload).
const CERTS_EXPIRY_ANNOTATION: &str = "kbtest.kubeboot.dev/expires";
/// Annotation on an etcd mirror Pod that real kubeadm reads etcd members from.
const ETCD_URL_ANNOTATION: &str = "kubeadm.kubernetes.io/etcd.advertise-client-urls";
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
const EXCLUDE_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
const DEFAULT_TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
const TOKEN_FORM: &str = r"^([a-z0-9]{6})\.([a-z0-9]{16})$";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// `1` selects the no-op `init` and `join` (see the module docs).
const NOOP_ENV: &str = "KBTEST_KUBEADM_NOOP";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__kbtest-watchdog") {
        watchdog(&args[1..]);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(run(&args)) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("{}", f.0);
            eprintln!("To see the stack trace of this error execute with --v=5 or higher");
            1
        }
    };
    log_invocation(&args, code);
    ExitCode::from(code)
}

// ---------------------------------------------------------------------------
// Failures and small helpers

/// A failure, already worded as kubeadm words it.
#[derive(Debug)]
struct Failure(String);

type R<T> = Result<T, Failure>;

fn phase_err(phase: &str, msg: impl Display) -> Failure {
    Failure(format!("error execution phase {phase}: {msg}"))
}

fn plain_err(msg: impl Display) -> Failure {
    Failure(msg.to_string())
}

/// Names the init system the stand-in drives, like kubeadm's detection of
/// `systemctl`; only `systemd` is modelled, and unset means none, so tests
/// outside a systemd machine never touch the host's services.
const INIT_SYSTEM_ENV: &str = "KUBEADM_STANDIN_INIT_SYSTEM";

/// kubeadm's kubelet-start: `systemctl daemon-reload`, then `systemctl
/// restart kubelet`, each waited for without a timeout (upstream
/// cmd/kubeadm/app/phases/kubelet/kubelet.go `TryStartKubelet` →
/// cmd/kubeadm/app/util/initsystem/initsystem_unix.go
/// `SystemdInitSystem.ServiceRestart`). Only with
/// `KUBEADM_STANDIN_INIT_SYSTEM=systemd`. kubeadm only warns when systemctl
/// fails and then times out waiting for the kubelet; the stand-in, which
/// has no kubelet to wait for, fails at once with the warning's text.
fn try_start_kubelet(phase: &str) -> R<()> {
    if std::env::var(INIT_SYSTEM_ENV).as_deref() != Ok("systemd") {
        return Ok(());
    }
    for args in [&["daemon-reload"][..], &["restart", "kubelet"][..]] {
        let out = Command::new("systemctl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| phase_err(phase, format!("systemctl: {e}")))?;
        if !out.status.success() {
            let why = format!(
                "systemctl {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            println!("[kubelet-start] WARNING: unable to start the kubelet service: [{why}]");
            println!("[kubelet-start] Please ensure kubelet is reloaded and running manually.");
            return Err(phase_err(
                phase,
                format!("the kubelet is not running: {why}"),
            ));
        }
    }
    Ok(())
}

/// Milliseconds from an environment knob, or the default.
fn knob(name: &str, default_ms: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_ms),
    )
}

fn wait_timeout() -> Duration {
    knob("KBTEST_KUBEADM_WAIT_TIMEOUT_MS", 20_000)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Go's `hex.DecodeString`, with Go's error texts.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(secs)
        .ok()
        .and_then(|ts| k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", ts).ok())
        .unwrap_or_default()
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let ts: Timestamp = s.parse().ok()?;
    let secs = u64::try_from(ts.as_second()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Go's `time.ParseDuration` for the units kubeadm configs use.
fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// `-` for every `/`, as kubeadm names its file and directory checks.
fn check_name(kind: &str, path: &Path) -> String {
    format!("{kind}-{}", path.display().to_string().replace('/', "-"))
}

/// Refuses a real node's paths unless explicitly allowed: a test that
/// forgot to point the agent at a temp dir must fail, not wipe /etc.
fn guard_paths(paths: &[&Path]) -> R<()> {
    if std::env::var_os(standin::ALLOW_SYSTEM_PATHS_ENV).is_some() {
        return Ok(());
    }
    for p in paths {
        if SYSTEM_PATHS.iter().any(|s| p.starts_with(s)) {
            return Err(plain_err(format!(
                "refusing to use {}: this kubeadm is the test stand-in and never touches a real node's paths \
                 (point paths.kubernetes_dir and the etcd data dir at a test directory, or set {}=1)",
                p.display(),
                standin::ALLOW_SYSTEM_PATHS_ENV
            )));
        }
    }
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    pki::write_file(path, contents, mode)
}

fn dir_is_empty(path: &Path) -> bool {
    std::fs::read_dir(path).map_or(true, |mut d| d.next().is_none())
}

/// Removes what is inside `dir`, keeping `dir` (as kubeadm reset does).
fn clear_dir(dir: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let p = entry.path();
        let res = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        res.map_err(|e| format!("remove {}: {e}", p.display()))?;
    }
    Ok(())
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A random bootstrap token or certificate key from the OS CSPRNG (UUIDv4).
fn random_string(alphabet: &[u8], n: usize) -> String {
    let mut out = String::new();
    while out.len() < n {
        for b in uuid::Uuid::new_v4().as_bytes() {
            if out.len() < n {
                out.push(char::from(alphabet[usize::from(*b) % alphabet.len()]));
            }
        }
    }
    out
}

fn generate_token() -> String {
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    format!("{}.{}", random_string(A, 6), random_string(A, 16))
}

fn generate_certificate_key() -> String {
    random_string(b"0123456789abcdef", 64)
}

// ---------------------------------------------------------------------------
// Invocation log

fn looks_like_token(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.len() == 23 && b[6] == b'.' && b[..6].iter().all(ok) && b[7..].iter().all(ok)
}

/// Appends `<unix ms> <pid> <argv> exit=<code>` to `$KBTEST_KUBEADM_LOG`,
/// with tokens and certificate keys replaced by `<redacted>`.
fn log_invocation(args: &[String], code: u8) {
    let Some(path) = std::env::var_os(standin::LOG_ENV) else {
        return;
    };
    let mut words = Vec::new();
    let mut secret_next = false;
    for a in args {
        let w = if secret_next {
            "<redacted>".to_string()
        } else if let Some((flag, _)) = a
            .split_once('=')
            .filter(|(f, _)| matches!(*f, "--certificate-key" | "--token" | "--discovery-token"))
        {
            format!("{flag}=<redacted>")
        } else if looks_like_token(a) {
            "<redacted>".into()
        } else {
            a.replace(' ', "%20")
        };
        secret_next = matches!(
            a.as_str(),
            "--certificate-key" | "--token" | "--discovery-token"
        );
        words.push(w);
    }
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let line = format!(
        "{ms} {} {} exit={code}\n",
        std::process::id(),
        words.join(" ")
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// Command line

/// Parsed flags of one subcommand.
#[derive(Debug, Default)]
struct Flags {
    positional: Vec<String>,
    values: BTreeMap<&'static str, String>,
    switches: BTreeSet<&'static str>,
}

impl Flags {
    fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn on(&self, name: &str) -> bool {
        self.switches.contains(name)
    }
}

/// Cobra-like parsing: `--name value`, `--name=value`, boolean switches,
/// `-f`/`-o`/`-v` short forms; unknown flags fail as cobra fails.
fn parse_flags(args: &[String], spec: &[(&'static str, bool)]) -> R<Flags> {
    let mut all: Vec<(&'static str, bool)> = spec.to_vec();
    all.push(("v", true));
    let short = |c: &str| match c {
        "f" => Some("force"),
        "o" => Some("output"),
        "v" => Some("v"),
        _ => None,
    };
    let mut flags = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline) = if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            }
        } else if let Some(s) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let (n, v) = match s.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (s, None),
            };
            match short(n) {
                Some(long) => (long.to_string(), v),
                None => return Err(plain_err(format!("unknown shorthand flag: '{n}' in {a}"))),
            }
        } else {
            flags.positional.push(a.clone());
            continue;
        };
        let Some((key, takes_value)) = all.iter().find(|(n, _)| *n == name) else {
            return Err(plain_err(format!("unknown flag: --{name}")));
        };
        if *takes_value {
            let value = match inline {
                Some(v) => v,
                None => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| plain_err(format!("flag needs an argument: --{name}")))?;
                    i += 1;
                    v.clone()
                }
            };
            flags.values.insert(key, value);
        } else if inline.as_deref() != Some("false") {
            flags.switches.insert(key);
        }
    }
    Ok(flags)
}

async fn run(args: &[String]) -> R<()> {
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            println!("Usage:\n  kubeadm [command]\n\nAvailable Commands:\n  init, join, reset, token, version");
            return Ok(());
        }
    };
    let noop = std::env::var(NOOP_ENV).is_ok_and(|v| v == "1");
    match cmd {
        "init" if noop && rest.first().map(String::as_str) != Some("phase") => {
            noop_init(rest).await
        }
        "join" if noop && rest.first().map(String::as_str) != Some("phase") => {
            noop_join(rest).await
        }
        "init" if rest.first().map(String::as_str) == Some("phase") => init_phase(&rest[1..]).await,
        "init" => init(rest).await,
        "join" if rest.first().map(String::as_str) == Some("phase") => join_phase(&rest[1..]).await,
        "join" => join(rest).await,
        "reset" => reset(rest).await,
        "token" => token(rest).await,
        "certs" => certs(rest).await,
        "version" => version(rest),
        other => Err(plain_err(format!(
            "unknown command {other:?} for \"kubeadm\"\nRun 'kubeadm --help' for usage."
        ))),
    }
}

fn version(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("output", true)])?;
    match flags.value("output").unwrap_or("") {
        "short" => println!("{VERSION}"),
        "json" => println!(
            "{}",
            json!({"clientVersion": {"major": "1", "minor": "31", "gitVersion": VERSION, "gitTreeState": "clean", "goVersion": "go1.22.8", "compiler": "gc", "platform": "linux/amd64"}})
        ),
        "" => println!(
            "kubeadm version: &version.Info{{Major:\"1\", Minor:\"31\", GitVersion:\"{VERSION}\", GitTreeState:\"clean\", GoVersion:\"go1.22.8\", Compiler:\"gc\", Platform:\"linux/amd64\"}}"
        ),
        other => return Err(plain_err(format!("invalid output format: {other}"))),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Configuration documents

/// Known fields per object path, for kubeadm's strict-decoding warnings.
const KNOWN_FIELDS: &[(&str, &[&str])] = &[
    (
        "InitConfiguration",
        &[
            "apiVersion",
            "kind",
            "bootstrapTokens",
            "dryRun",
            "nodeRegistration",
            "localAPIEndpoint",
            "certificateKey",
            "skipPhases",
            "patches",
            "timeouts",
        ],
    ),
    (
        "InitConfiguration.bootstrapTokens[]",
        &["token", "description", "ttl", "expires", "usages", "groups"],
    ),
    (
        "InitConfiguration.localAPIEndpoint",
        &["advertiseAddress", "bindPort"],
    ),
    (
        "ClusterConfiguration",
        &[
            "apiVersion",
            "kind",
            "etcd",
            "networking",
            "kubernetesVersion",
            "controlPlaneEndpoint",
            "apiServer",
            "controllerManager",
            "scheduler",
            "dns",
            "proxy",
            "certificatesDir",
            "imageRepository",
            "featureGates",
            "clusterName",
            "encryptionAlgorithm",
            "certificateValidityPeriod",
            "caCertificateValidityPeriod",
        ],
    ),
    ("ClusterConfiguration.etcd", &["local", "external"]),
    (
        "ClusterConfiguration.etcd.local",
        &[
            "imageRepository",
            "imageTag",
            "dataDir",
            "extraArgs",
            "extraEnvs",
            "serverCertSANs",
            "peerCertSANs",
        ],
    ),
    (
        "ClusterConfiguration.networking",
        &["serviceSubnet", "podSubnet", "dnsDomain"],
    ),
    (
        "ClusterConfiguration.apiServer",
        &["certSANs", "extraArgs", "extraVolumes", "extraEnvs"],
    ),
    (
        "JoinConfiguration",
        &[
            "apiVersion",
            "kind",
            "dryRun",
            "nodeRegistration",
            "caCertPath",
            "discovery",
            "controlPlane",
            "skipPhases",
            "patches",
            "timeouts",
        ],
    ),
    (
        "JoinConfiguration.discovery",
        &["bootstrapToken", "file", "tlsBootstrapToken"],
    ),
    (
        "JoinConfiguration.discovery.bootstrapToken",
        &[
            "token",
            "apiServerEndpoint",
            "caCertHashes",
            "unsafeSkipCAVerification",
        ],
    ),
    (
        "JoinConfiguration.controlPlane",
        &["localAPIEndpoint", "certificateKey"],
    ),
    (
        "JoinConfiguration.controlPlane.localAPIEndpoint",
        &["advertiseAddress", "bindPort"],
    ),
    (
        "*.nodeRegistration",
        &[
            "name",
            "criSocket",
            "taints",
            "kubeletExtraArgs",
            "ignorePreflightErrors",
            "imagePullPolicy",
            "imagePullSerial",
        ],
    ),
    ("*.extraArgs[]", &["name", "value"]),
    ("*.kubeletExtraArgs[]", &["name", "value"]),
];

fn known_fields(path: &str) -> Option<&'static [&'static str]> {
    let tail = |p: &str| p.rsplit_once('.').map(|(_, t)| format!("*.{t}"));
    KNOWN_FIELDS
        .iter()
        .find(|(p, _)| *p == path || Some(p.to_string()) == tail(path))
        .map(|(_, f)| *f)
}

/// kubeadm prints (not fails on) unknown fields: "strict decoding error".
fn warn_unknown_fields(path: &str, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(known) = known_fields(path) {
                for k in map.keys().filter(|k| !known.contains(&k.as_str())) {
                    eprintln!(
                        "W{} {:>7} strict.go:56] strict decoding error: unknown field \"{}\"",
                        klog_stamp(),
                        std::process::id(),
                        format!("{path}.{k}")
                            .split_once('.')
                            .map_or(k.as_str(), |(_, p)| p)
                    );
                }
            }
            for (k, child) in map {
                warn_unknown_fields(&format!("{path}.{k}"), child);
            }
        }
        Value::Array(items) => {
            for item in items {
                warn_unknown_fields(&format!("{path}[]"), item);
            }
        }
        _ => {}
    }
}

fn klog_stamp() -> String {
    let ts = Timestamp::now();
    k8s_openapi::jiff::fmt::strtime::format("%m%d %H:%M:%S%.6f", ts).unwrap_or_default()
}

/// Reads the `---`-separated JSON documents of a kubeadm config file.
fn load_documents(path: &str) -> R<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| plain_err(format!("unable to read config from {path:?} : {e}")))?;
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut chunks = Vec::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            chunks.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    chunks.push(current);
    for (i, chunk) in chunks.iter().enumerate() {
        if chunk.trim().is_empty() {
            continue;
        }
        let doc: Value = serde_json::from_str(chunk).map_err(|e| {
            plain_err(format!(
                "unable to decode config from {path:?}: document {} is not JSON ({e}); the kubeadm stand-in reads JSON documents only",
                i + 1
            ))
        })?;
        let api = doc["apiVersion"].as_str().unwrap_or("");
        let kind = doc["kind"].as_str().unwrap_or("");
        if api != CONFIG_API {
            if api.starts_with("kubeadm.k8s.io/") {
                return Err(plain_err(format!(
                    "your configuration file uses an old API spec: {api:?} (kind: {kind:?}). This kubeadm stand-in models only {CONFIG_API}"
                )));
            }
            eprintln!("[config] WARNING: Ignored configuration document with GroupVersionKind {api}, Kind={kind}");
            continue;
        }
        if !matches!(
            kind,
            "InitConfiguration" | "ClusterConfiguration" | "JoinConfiguration"
        ) {
            return Err(plain_err(format!(
                "no kind {kind:?} is registered for version {api:?} in scheme \"k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme/scheme.go:31\""
            )));
        }
        warn_unknown_fields(kind, &doc);
        docs.push(doc);
    }
    Ok(docs)
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// v1beta4 `[]Arg` (`{name, value}` objects); anything else fails as Go's
/// decoder does.
fn arg_list(v: Option<&Value>, field: &str) -> R<Vec<(String, String)>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let bad = |what: &str| {
        plain_err(format!(
            "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal {what} into Go struct field {field} of type []v1beta4.Arg"
        ))
    };
    let items = v
        .as_array()
        .ok_or_else(|| bad(if v.is_object() { "object" } else { "value" }))?;
    items
        .iter()
        .map(|a| match (a["name"].as_str(), a["value"].as_str()) {
            (Some(n), Some(val)) => Ok((n.to_string(), val.to_string())),
            _ => Err(bad("value")),
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Token {
    id: String,
    secret: String,
}

impl Token {
    fn full(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

fn parse_token(s: &str, field: &str) -> R<Token> {
    if !looks_like_token(s) {
        return Err(plain_err(format!(
            "{field}: Invalid value: {s:?}: the bootstrap token {s:?} was not of the form {TOKEN_FORM:?}"
        )));
    }
    Ok(Token {
        id: s[..6].into(),
        secret: s[7..].into(),
    })
}

fn parse_ip(s: Option<&str>, field: &str) -> R<IpAddr> {
    let s = s.unwrap_or("");
    s.parse()
        .map_err(|_| plain_err(format!("{field}: Invalid value: {s:?}: couldn't use \"{s}\" as \"apiserver-advertise-address\", must be ipv4 or ipv6 address")))
}

// ---------------------------------------------------------------------------
// The API server (the test double), over plain HTTP

#[derive(Debug, Clone)]
struct Api {
    /// `http://host:port`
    base: String,
    /// How long unreachable / 5xx / 429 answers are retried.
    patience: Duration,
}

/// An answer other than 2xx: the status code and the `Status` message.
#[derive(Debug)]
struct ApiFailure {
    code: u16,
    message: String,
}

impl Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Api {
    fn new(endpoint: &str) -> Self {
        let host = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        Api {
            base: format!("http://{host}"),
            patience: knob("KBTEST_KUBEADM_API_TIMEOUT_MS", 10_000),
        }
    }

    /// One call, retried while the server is unreachable or overloaded.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> Result<Value, ApiFailure> {
        let deadline = Instant::now() + self.patience;
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let verb = match method {
            "GET" => "Get",
            "POST" => "Post",
            "PUT" => "Put",
            "PATCH" => "Patch",
            "DELETE" => "Delete",
            m => m,
        };
        loop {
            let headers = [
                ("Content-Type", content_type),
                ("Accept", "application/json"),
            ];
            let attempt = http_request(&self.base, method, path, &headers, &bytes).await;
            let failure = match attempt {
                Ok(resp) if (200..300).contains(&resp.status) => {
                    return Ok(serde_json::from_slice(&resp.body).unwrap_or(Value::Null));
                }
                Ok(resp) => {
                    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                    let message = body["message"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| resp.text());
                    ApiFailure {
                        code: resp.status,
                        message,
                    }
                }
                Err(e) => ApiFailure {
                    code: 0,
                    message: format!("{verb} \"{}{path}\": {e}", self.base),
                },
            };
            let transient = failure.code == 0 || failure.code == 429 || failure.code >= 500;
            if !transient || Instant::now() >= deadline {
                return Err(failure);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn get(&self, path: &str) -> Result<Option<Value>, ApiFailure> {
        match self.call("GET", path, None, "application/json").await {
            Ok(v) => Ok(Some(v)),
            Err(f) if f.code == 404 => Ok(None),
            Err(f) => Err(f),
        }
    }

    async fn create(&self, collection: &str, obj: &Value) -> Result<Value, ApiFailure> {
        self.call("POST", collection, Some(obj), "application/json")
            .await
    }

    /// kubeadm's CreateOrUpdate: POST, and on AlreadyExists a PUT.
    async fn create_or_update(
        &self,
        collection: &str,
        name: &str,
        obj: &Value,
    ) -> Result<Value, ApiFailure> {
        match self.create(collection, obj).await {
            Err(f) if f.code == 409 => {
                let mut obj = obj.clone();
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                self.call(
                    "PUT",
                    &format!("{collection}/{name}"),
                    Some(&obj),
                    "application/json",
                )
                .await
            }
            other => other,
        }
    }

    async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, ApiFailure> {
        self.call("PATCH", path, Some(patch), "application/merge-patch+json")
            .await
    }

    /// Whether the object existed.
    async fn delete(&self, path: &str) -> Result<bool, ApiFailure> {
        match self.call("DELETE", path, None, "application/json").await {
            Ok(_) => Ok(true),
            Err(f) if f.code == 404 => Ok(false),
            Err(f) => Err(f),
        }
    }
}

/// The API server a kubeconfig written by this stand-in (or any JSON
/// kubeconfig) points at.
fn kubeconfig_server(path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JSON kubeconfig: {e}", path.display()))?;
    cfg["clusters"][0]["cluster"]["server"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no clusters[0].cluster.server", path.display()))
}

/// Embeds the client certificate kubeadm's kubeconfig phase gives `file`
/// (its subject, signed by the cluster CA, valid one year), as kubeadm
/// does on init and on a control-plane join.
fn embed_client_certificate(
    path: &std::path::Path,
    pki: &std::path::Path,
    file: &str,
    node: &str,
) -> Result<(), String> {
    let Some((cn, orgs)) = pki::kubeconfig_subject(file, node) else {
        return Ok(());
    };
    let year = std::time::SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    pki::embed_client_certificate(path, pki, &cn, &orgs, year)
}

fn kubeconfig(cluster: &str, server: &str, ca_pem: &str, user: &str) -> Value {
    let context = format!("{user}@{cluster}");
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "certificate-authority-data": B64.encode(ca_pem),
            "server": server,
        }}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
        "users": [{"name": user, "user": {}}],
    })
}

// ---------------------------------------------------------------------------
// Certificates

/// A self-signed cluster CA (`CN=kubernetes`, 10 years), as kubeadm's
/// `certs/ca` phase creates it (see [`pki`]).
fn generate_ca() -> Result<(String, String), String> {
    pki::generate_ca(pki::CLUSTER_CA)
}

/// `sha256:<hex of the DER SubjectPublicKeyInfo>`, kubeadm's CA pin.
fn ca_pin(pem: &str) -> Result<String, String> {
    use x509_cert::der::{DecodePem, Encode};
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| format!("failed to parse the CA certificate: {e}"))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| format!("failed to encode the CA public key: {e}"))?;
    Ok(format!("sha256:{}", hex(&Sha256::digest(&spki))))
}

/// Stores the shared CAs and the service-account key pair, each sealed
/// with the certificate key (AES-256-GCM), in `kube-system/kubeadm-certs`
/// (upstream: `cmd/kubeadm/app/phases/copycerts/copycerts.go`).
async fn upload_certs(api: &Api, pki_dir: &Path, key: &str) -> R<()> {
    let fail = |m: String| phase_err("upload-certs", format!("error uploading certs: {m}"));
    let key_bytes = pki::certificate_key_bytes(key).map_err(fail)?;
    let mut data = serde_json::Map::new();
    for name in pki::SHARED_FILES {
        let path = pki_dir.join(name);
        let content = std::fs::read(&path).map_err(|e| {
            fail(format!(
                "failed to load {name}: open {}: {e}",
                path.display()
            ))
        })?;
        let sealed = pki::seal(&key_bytes, &content).map_err(fail)?;
        data.insert(pki::secret_key_of(name), json!(B64.encode(sealed)));
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": "kubeadm-certs",
            "namespace": "kube-system",
            "annotations": {
                KEY_HASH_ANNOTATION: hex(&Sha256::digest(key.as_bytes())),
                CERTS_EXPIRY_ANNOTATION: rfc3339(SystemTime::now() + CERTS_TTL),
            },
        },
        "data": data,
    });
    println!("[upload-certs] Storing the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace");
    api.create_or_update(
        "/api/v1/namespaces/kube-system/secrets",
        "kubeadm-certs",
        &secret,
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    println!("[upload-certs] Using certificate key:\n{key}");
    Ok(())
}

// ---------------------------------------------------------------------------
// etcd processes

fn etcd_bin() -> PathBuf {
    std::env::var_os("KBTEST_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// One local etcd member as the static Pod manifest describes it.
#[derive(Debug, Clone)]
struct LocalEtcd {
    name: String,
    data_dir: PathBuf,
    /// Client URL advertised (and put on the mirror Pod).
    client_url: String,
    /// Peer URL advertised.
    peer_url: String,
    /// Full etcd argv after the program name.
    args: Vec<String>,
}

impl LocalEtcd {
    /// Reads the stand-in's `manifests/etcd.yaml` (a JSON Pod).
    fn from_manifest(path: &Path) -> Option<Self> {
        let pod: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        let command: Vec<String> = pod["spec"]["containers"][0]["command"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let flag = |name: &str| {
            command
                .iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
        };
        Some(LocalEtcd {
            name: flag("name")?,
            data_dir: PathBuf::from(flag("data-dir")?),
            client_url: flag("advertise-client-urls")?,
            peer_url: flag("initial-advertise-peer-urls")?,
            args: command[1..].to_vec(),
        })
    }

    fn manifest(&self) -> Value {
        let mut command = vec!["etcd".to_string()];
        command.extend(self.args.iter().cloned());
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "etcd",
                "namespace": "kube-system",
                "labels": {"component": "etcd", "tier": "control-plane"},
                "annotations": {ETCD_URL_ANNOTATION: self.client_url},
            },
            "spec": {
                "hostNetwork": true,
                "priorityClassName": "system-node-critical",
                "containers": [{
                    "name": "etcd",
                    "image": "registry.k8s.io/etcd:3.5.15-0",
                    "command": command,
                    "volumeMounts": [{"name": "etcd-data", "mountPath": self.data_dir.display().to_string()}],
                }],
                "volumes": [{"name": "etcd-data", "hostPath": {"path": self.data_dir.display().to_string(), "type": "DirectoryOrCreate"}}],
            },
        })
    }
}

/// The argv of a member: kubeadm's flags, then the user's `extraArgs`.
fn etcd_args(
    name: &str,
    data_dir: &Path,
    urls: &EtcdUrls,
    initial_cluster: &str,
    state: &str,
    extra: &[(String, String)],
) -> Vec<String> {
    let mut flags: Vec<(String, String)> = vec![
        ("name".into(), name.into()),
        ("data-dir".into(), data_dir.display().to_string()),
        ("listen-client-urls".into(), urls.listen_client.join(",")),
        ("advertise-client-urls".into(), urls.client.clone()),
        ("listen-peer-urls".into(), urls.listen_peer.join(",")),
        ("initial-advertise-peer-urls".into(), urls.peer.clone()),
        ("initial-cluster".into(), initial_cluster.into()),
        ("initial-cluster-state".into(), state.into()),
        ("snapshot-count".into(), "10000".into()),
        ("logger".into(), "zap".into()),
        ("log-outputs".into(), "stderr".into()),
    ];
    for (k, v) in extra {
        if matches!(
            k.as_str(),
            "listen-client-urls"
                | "advertise-client-urls"
                | "listen-peer-urls"
                | "initial-advertise-peer-urls"
        ) {
            continue; // already folded into `urls`
        }
        match flags.iter_mut().find(|(n, _)| n == k) {
            Some(f) => f.1 = v.clone(),
            None => flags.push((k.clone(), v.clone())),
        }
    }
    flags
        .into_iter()
        .map(|(k, v)| format!("--{k}={v}"))
        .collect()
}

#[derive(Debug, Clone)]
struct EtcdUrls {
    client: String,
    peer: String,
    listen_client: Vec<String>,
    listen_peer: Vec<String>,
}

/// Parses `scheme://host:port` into its parts.
fn split_url(url: &str) -> Option<(&str, &str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
    Some((scheme, host, port.parse().ok()?))
}

/// Every node of a test shares the host's 127.0.0.1, so a loopback listen
/// URL (which the agent renders, as real nodes want) would collide between
/// "nodes"; each node's own 127.x.y.z address stands in for its loopback.
fn drop_shared_loopback(urls: &[String], advertise: &IpAddr) -> Vec<String> {
    urls.iter()
        .filter(|u| {
            let host = split_url(u).map(|(_, h, _)| h).unwrap_or("");
            host == advertise.to_string() || !(host == "127.0.0.1" || host == "localhost")
        })
        .cloned()
        .collect()
}

/// Starts etcd detached (own session, so it outlives this process like a
/// static Pod), records its pid for the test harness and the reset, and
/// starts the owner watchdog.
///
/// With `KUBEADM_STANDIN_INIT_SYSTEM=systemd` etcd runs in a transient
/// scope of its own (`systemd-run --scope`, which execs etcd in this same
/// child), as the container runtime runs a static Pod's containers: not in
/// the cgroup of whatever unit ran kubeadm, so stopping or restarting that
/// unit (whose KillMode kills what is left in its cgroup) leaves etcd up,
/// as on a node.
fn spawn_etcd(member: &LocalEtcd, state_dir: &Path) -> Result<Child, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("mkdir {}: {e}", state_dir.display()))?;
    std::fs::create_dir_all(&member.data_dir)
        .map_err(|e| format!("mkdir {}: {e}", member.data_dir.display()))?;
    let log_path = state_dir.join("etcd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let mut cmd = if std::env::var(INIT_SYSTEM_ENV).as_deref() == Ok("systemd") {
        let mut cmd = Command::new("systemd-run");
        cmd.args(["--scope", "--quiet", "--collect"])
            .arg(format!("--unit=kubepods-etcd-{}", std::process::id()))
            .arg("--description=etcd (the kubeadm stand-in's static Pod)")
            .arg("--")
            .arg(etcd_bin());
        cmd
    } else {
        Command::new(etcd_bin())
    };
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    cmd.args(&member.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", etcd_bin().display()))?;
    let pid = child.id();
    let pid_file = state_dir.join("etcd.pid");
    std::fs::write(&pid_file, format!("{pid}\n"))
        .map_err(|e| format!("write {}: {e}", pid_file.display()))?;
    record_pid(pid, &member.data_dir).map_err(|e| format!("record etcd pid {pid}: {e}"))?;
    start_watchdog(pid);
    Ok(child)
}

/// If the test declared an owner, a detached watchdog kills this etcd when
/// the owner dies without cleaning up (e.g. killed by a test timeout).
fn start_watchdog(etcd_pid: u32) {
    let Some(owner) = std::env::var(standin::OWNER_PID_ENV).ok() else {
        return;
    };
    let Ok(me) = std::env::current_exe() else {
        return;
    };
    let mut cmd = Command::new(me);
    cmd.arg("__kbtest-watchdog")
        .arg(owner)
        .arg(etcd_pid.to_string())
        .env_remove(standin::LOG_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let _ = cmd.spawn();
}

fn watchdog(args: &[String]) {
    let (Some(owner), Some(etcd)) = (
        args.first().and_then(|a| a.parse::<u32>().ok()),
        args.get(1).and_then(|a| a.parse::<u32>().ok()),
    ) else {
        return;
    };
    loop {
        if !pid_alive(etcd) {
            return;
        }
        if !pid_alive(owner) {
            stop_groups(&[etcd], Duration::from_millis(300));
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The node's `pki/` directory, where kubeadm's etcd client reads its
/// credentials (set once per run by the command that knows it).
static PKI_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn set_pki_dir(pki: &Path) {
    let _ = PKI_DIR.set(pki.to_path_buf());
}

/// An etcd client as kubeadm makes one (`etcdutil.NewFromCluster`): over
/// https with `etcd/ca.crt` and the `apiserver-etcd-client` identity from
/// this node's `pki/`, which must be there (a worker, or a control plane
/// that has not downloaded the certificates, cannot talk to etcd).
async fn etcd_client(urls: &[String]) -> Result<Client, String> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    if urls.iter().any(|u| u.starts_with("https://")) {
        let pki_dir = PKI_DIR
            .get()
            .cloned()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CERT_DIR));
        let files = pki::etcd_client_files(&pki_dir)?;
        opts = opts.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(files.ca))
                .identity(etcd_client::Identity::from_pem(files.cert, files.key)),
        );
    }
    Client::connect(urls, Some(opts))
        .await
        .map_err(|e| etcd_msg(&e))
}

/// The server's own words for a gRPC failure (`etcdserver: …`).
fn etcd_msg(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

/// Refusals etcd lifts by itself shortly (kubeadm retries etcd calls).
fn transient(msg: &str) -> bool {
    [
        "unhealthy cluster",
        "not enough started members",
        "leader changed",
        "no leader",
        "timed out",
        "deadline",
        "transport",
        "connection",
        "Unavailable",
        "unavailable",
    ]
    .iter()
    .any(|t| msg.contains(t))
}

/// Probes one member: a leader is known and, for voters, a linearizable
/// read succeeds.
async fn probe(url: &str, learner: bool) -> Result<(), String> {
    let mut c = etcd_client(&[url.to_string()]).await?;
    let status = c.status().await.map_err(|e| etcd_msg(&e))?;
    if status.leader() == 0 {
        return Err("no leader yet".into());
    }
    if !learner {
        c.get("kbtest-standin-health", None)
            .await
            .map_err(|e| etcd_msg(&e))?;
    }
    Ok(())
}

/// Waits until the local member serves, failing early if it exited.
async fn wait_member(
    child: &mut Child,
    url: &str,
    learner: bool,
    log: &Path,
) -> Result<(), String> {
    let timeout = wait_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the etcd static Pod exited ({status}); its last log lines:\n{}",
                kubeboot_tests::process::log_tail(log, 15)
            ));
        }
        let last = match probe(url, learner).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "etcd at {url} not healthy after {timeout:?} ({last}): timed out waiting for the condition"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Kubelet effects: Node registration and mirror Pods

/// The kubelet's `--provider-id` from kubeletExtraArgs, which the simulated
/// kubelet registers its Node with (`spec.providerID`).
static PROVIDER_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn note_kubelet_args(args: &[(String, String)]) {
    if let Some((_, id)) = args.iter().find(|(k, _)| k == "provider-id") {
        let _ = PROVIDER_ID.set(id.clone());
    }
}

fn node_spec() -> Value {
    match PROVIDER_ID.get() {
        Some(id) => json!({"providerID": id}),
        None => json!({}),
    }
}

/// Registers the Node as a kubelet does (Ready "False" until the double's
/// kubelet reports ready; already "True" with `ready`, for the no-op mode);
/// an existing Node is kept. Returns its uid.
async fn register_node(
    api: &Api,
    name: &str,
    ip: &IpAddr,
    ready: bool,
) -> Result<String, ApiFailure> {
    let ready_condition = if ready {
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"})
    } else {
        json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady",
               "message": "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized"})
    };
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": node_spec(),
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available"},
                ready_condition,
            ],
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": VERSION, "kubeProxyVersion": VERSION, "containerRuntimeVersion": "containerd://1.7.22",
                "operatingSystem": "linux", "architecture": "amd64", "osImage": "Amazon Linux 2023",
                "kernelVersion": "6.1.0", "machineID": "", "systemUUID": "", "bootID": "",
            },
        },
    });
    let created = match api.create("/api/v1/nodes", &node).await {
        Ok(v) => v,
        Err(f) if f.code == 409 => {
            let labels = node["metadata"]["labels"].clone();
            if ready {
                api.merge_patch(
                    &format!("/api/v1/nodes/{name}/status"),
                    &json!({"status": {"conditions": node["status"]["conditions"].clone()}}),
                )
                .await?;
            }
            api.merge_patch(
                &format!("/api/v1/nodes/{name}"),
                &json!({"metadata": {"labels": labels}}),
            )
            .await?
        }
        Err(f) => return Err(f),
    };
    Ok(created["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

async fn mark_control_plane(api: &Api, name: &str) -> R<()> {
    println!("[mark-control-plane] Marking the node {name} as control-plane by adding the labels: [{CONTROL_PLANE_LABEL} {EXCLUDE_LB_LABEL}]");
    println!("[mark-control-plane] Marking the node {name} as control-plane by adding the taints [{CONTROL_PLANE_LABEL}:NoSchedule]");
    api.merge_patch(
        &format!("/api/v1/nodes/{name}"),
        &json!({
            "metadata": {"labels": {CONTROL_PLANE_LABEL: "", EXCLUDE_LB_LABEL: ""}},
            "spec": {"taints": [{"key": CONTROL_PLANE_LABEL, "effect": "NoSchedule"}]},
        }),
    )
    .await
    .map_err(|e| {
        phase_err(
            "mark-control-plane",
            format!("error patching node {name:?} through apiserver: {e}"),
        )
    })?;
    Ok(())
}

/// The etcd mirror Pod the kubelet creates for the static Pod: this is how
/// kubeadm (and the agent) find etcd members through the API.
async fn create_etcd_mirror_pod(
    api: &Api,
    node: &str,
    node_uid: &str,
    ip: &IpAddr,
    member: &LocalEtcd,
) -> Result<(), ApiFailure> {
    let mut pod = member.manifest();
    let name = format!("etcd-{node}");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["annotations"]["kubernetes.io/config.source"] = json!("file");
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"] =
        json!(hex(&Sha256::digest(member.args.join(" ").as_bytes()))[..32]);
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": true,
    }]);
    pod["spec"]["nodeName"] = json!(node);
    let collection = "/api/v1/namespaces/kube-system/pods";
    let created = match api.create(collection, &pod).await {
        Err(f) if f.code == 409 => {
            // A mirror Pod from an earlier incarnation of this node.
            api.delete(&format!("{collection}/{name}")).await?;
            api.create(collection, &pod).await?
        }
        other => other?,
    };
    let mut running = created;
    let now = rfc3339(SystemTime::now());
    running["status"] = json!({
        "phase": "Running",
        "hostIP": ip.to_string(),
        "podIP": ip.to_string(),
        "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    });
    api.call(
        "PUT",
        &format!("{collection}/{name}/status"),
        Some(&running),
        "application/json",
    )
    .await?;
    Ok(())
}

/// The API server, controller-manager and scheduler manifests (the
/// stand-in runs none of them; kubeadm's preflight checks for these files).
fn write_control_plane_manifests(manifests: &Path, phase: &str) -> R<()> {
    for component in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        println!("[control-plane] Creating static Pod manifest for {component:?}");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": component, "namespace": "kube-system", "labels": {"component": component, "tier": "control-plane"}},
            "spec": {"hostNetwork": true, "containers": [{"name": component, "image": format!("registry.k8s.io/{component}:{VERSION}"), "command": [component]}]},
        });
        write_file(
            &manifests.join(format!("{component}.yaml")),
            format!("{pod:#}\n").as_bytes(),
            0o600,
        )
        .map_err(|e| phase_err(phase, e))?;
    }
    Ok(())
}

/// `manifests/etcd.yaml`: a JSON Pod whose command is the member's real
/// argv; `reset` reads the data dir, name and URLs back from it.
fn write_etcd_manifest(manifests: &Path, member: &LocalEtcd, phase: &str) -> R<()> {
    println!(
        "[etcd] Creating static Pod manifest for local etcd in {:?}",
        manifests.display().to_string()
    );
    write_file(
        &manifests.join("etcd.yaml"),
        format!("{:#}\n", member.manifest()).as_bytes(),
        0o600,
    )
    .map_err(|e| phase_err(phase, e))
}

// ---------------------------------------------------------------------------
// Preflight

struct Preflight {
    errors: Vec<String>,
    ignored: BTreeSet<String>,
}

impl Preflight {
    fn new(ignore: Option<&str>) -> Self {
        Preflight {
            errors: Vec::new(),
            ignored: ignore
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    fn fail(&mut self, name: String, msg: String) {
        if self.ignored.contains("all") || self.ignored.contains(&name.to_ascii_lowercase()) {
            println!("\t[WARNING {name}]: {msg}");
        } else {
            self.errors.push(format!("\t[ERROR {name}]: {msg}"));
        }
    }

    fn port(&mut self, ip: &IpAddr, port: u16) {
        if TcpListener::bind((*ip, port)).is_err() {
            self.fail(format!("Port-{port}"), format!("Port {port} is in use"));
        }
    }

    fn file_available(&mut self, path: &Path) {
        if path.exists() {
            self.fail(
                check_name("FileAvailable", path),
                format!("{} already exists", path.display()),
            );
        }
    }

    fn dir_available(&mut self, path: &Path) {
        if !dir_is_empty(path) {
            self.fail(
                check_name("DirAvailable", path),
                format!("{} is not empty", path.display()),
            );
        }
    }

    fn finish(self) -> R<()> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(phase_err(
            "preflight",
            format!(
                "[preflight] Some fatal errors occurred:\n{}\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`",
                self.errors.join("\n")
            ),
        ))
    }
}

fn manifest_files(manifests: &Path) -> Vec<PathBuf> {
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "etcd",
    ]
    .iter()
    .map(|c| manifests.join(format!("{c}.yaml")))
    .collect()
}

// ---------------------------------------------------------------------------
// kubeadm init

#[derive(Debug, Clone)]
struct TokenSpec {
    token: Token,
    ttl: Duration,
    usages: Vec<String>,
    groups: Vec<String>,
    description: String,
}

fn token_secret(spec: &TokenSpec) -> Value {
    let mut data = serde_json::Map::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.into(), json!(B64.encode(v)));
    };
    put("token-id", &spec.token.id);
    put("token-secret", &spec.token.secret);
    if !spec.ttl.is_zero() {
        put("expiration", &rfc3339(SystemTime::now() + spec.ttl));
    }
    for usage in &spec.usages {
        put(&format!("usage-bootstrap-{usage}"), "true");
    }
    if !spec.groups.is_empty() {
        put("auth-extra-groups", &spec.groups.join(","));
    }
    if !spec.description.is_empty() {
        put("description", &spec.description);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kubeapi::BOOTSTRAP_TOKEN_TYPE,
        "metadata": {"name": format!("bootstrap-token-{}", spec.token.id), "namespace": "kube-system"},
        "data": data,
    })
}

fn token_specs(init: &Value) -> R<Vec<TokenSpec>> {
    let Some(list) = init["bootstrapTokens"].as_array() else {
        return Ok(vec![TokenSpec {
            token: parse_token(&generate_token(), "bootstrapTokens[0].token")?,
            ttl: Duration::from_secs(86_400),
            usages: vec!["signing".into(), "authentication".into()],
            groups: vec![DEFAULT_TOKEN_GROUP.into()],
            description: String::new(),
        }]);
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let token = parse_token(
                t["token"].as_str().unwrap_or(""),
                &format!("bootstrapTokens[{i}].token"),
            )?;
            let ttl = match t["ttl"].as_str() {
                Some(s) => parse_go_duration(s)
                    .map_err(|e| plain_err(format!("bootstrapTokens[{i}].ttl: {e}")))?,
                None => Duration::from_secs(86_400),
            };
            let strings = |field: &str, default: &[&str]| -> Vec<String> {
                t[field].as_array().map_or_else(
                    || default.iter().map(|s| s.to_string()).collect(),
                    |a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    },
                )
            };
            Ok(TokenSpec {
                token,
                ttl,
                usages: strings("usages", &["signing", "authentication"]),
                groups: strings("groups", &[DEFAULT_TOKEN_GROUP]),
                description: t["description"].as_str().unwrap_or("").into(),
            })
        })
        .collect()
}

/// `kube-public/cluster-info`: the CA and endpoint joining nodes discover
/// (the double's bootstrap signer adds the token signatures).
fn cluster_info(server: &str, ca_pem: &str) -> Value {
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "", "cluster": {"certificate-authority-data": B64.encode(ca_pem), "server": server}}],
        "contexts": null,
        "current-context": "",
        "preferences": {},
        "users": null,
    });
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cluster-info", "namespace": "kube-public"},
        "data": {"kubeconfig": format!("{kubeconfig:#}\n")},
    })
}

fn check_kubernetes_version(v: &str) -> R<()> {
    let bad = || plain_err(format!("couldn't parse Kubernetes version {v:?}"));
    let rest = v.strip_prefix('v').ok_or_else(bad)?;
    let mut parts = rest.split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    let (major, minor): (u32, u32) = (
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    );
    if major != 1 || minor < 30 {
        return Err(plain_err(format!(
            "this version of kubeadm only supports deploying clusters with the control plane version >= 1.30.0. Current version: {v}"
        )));
    }
    if minor > 32 {
        return Err(plain_err(format!(
            "the specified version to deploy ({v}) is too far from the kubeadm version ({VERSION})"
        )));
    }
    Ok(())
}

async fn init(args: &[String]) -> R<()> {
    let flags = parse_flags(
        args,
        &[
            ("config", true),
            ("upload-certs", false),
            ("skip-token-print", false),
            ("ignore-preflight-errors", true),
            ("certificate-key", true),
        ],
    )?;
    let config = flags.value("config").ok_or_else(|| {
        plain_err("the kubeadm stand-in needs --config (the agent always passes one)")
    })?;
    let docs = load_documents(config)?;
    let empty = json!({});
    let init_doc = find_kind(&docs, "InitConfiguration").unwrap_or(&empty);
    let cluster = find_kind(&docs, "ClusterConfiguration").ok_or_else(|| {
        plain_err(format!(
            "{config}: no ClusterConfiguration document (the stand-in needs controlPlaneEndpoint)"
        ))
    })?;

    let node = str_at(init_doc, "/nodeRegistration/name")
        .ok_or_else(|| plain_err("nodeRegistration.name: Required value: the kubeadm stand-in does not default it to the hostname"))?
        .to_string();
    note_kubelet_args(&arg_list(
        init_doc.pointer("/nodeRegistration/kubeletExtraArgs"),
        "NodeRegistrationOptions.nodeRegistration.kubeletExtraArgs",
    )?);
    let ip = parse_ip(
        str_at(init_doc, "/localAPIEndpoint/advertiseAddress"),
        "localAPIEndpoint.advertiseAddress",
    )?;
    let tokens = token_specs(init_doc)?;
    let endpoint = str_at(cluster, "/controlPlaneEndpoint")
        .ok_or_else(|| plain_err("controlPlaneEndpoint: Required value: the kubeadm stand-in reaches the API server double there"))?
        .to_string();
    let version = str_at(cluster, "/kubernetesVersion").unwrap_or(VERSION);
    check_kubernetes_version(version)?;
    let cluster_name = str_at(cluster, "/clusterName")
        .unwrap_or("kubernetes")
        .to_string();
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    let k8s = parent(&pki);
    let data_dir = PathBuf::from(str_at(cluster, "/etcd/local/dataDir").unwrap_or("/var/lib/etcd"));
    let extra = arg_list(
        cluster.pointer("/etcd/local/extraArgs"),
        "LocalEtcd.etcd.local.extraArgs",
    )?;
    guard_paths(&[&k8s, &data_dir])?;
    let key = match flags
        .value("certificate-key")
        .or_else(|| str_at(init_doc, "/certificateKey"))
    {
        Some(k) => k.to_string(),
        None => generate_certificate_key(),
    };

    let extra_get = |n: &str| extra.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let client = extra_get("advertise-client-urls").unwrap_or_else(|| format!("https://{ip}:2379"));
    let peer =
        extra_get("initial-advertise-peer-urls").unwrap_or_else(|| format!("https://{ip}:2380"));
    let split = |s: Option<String>, default: &str| -> Vec<String> {
        s.unwrap_or_else(|| default.to_string())
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let urls = EtcdUrls {
        listen_client: drop_shared_loopback(&split(extra_get("listen-client-urls"), &client), &ip),
        listen_peer: drop_shared_loopback(&split(extra_get("listen-peer-urls"), &peer), &ip),
        client: client.clone(),
        peer: peer.clone(),
    };
    for u in urls
        .listen_client
        .iter()
        .chain(&urls.listen_peer)
        .chain([&client, &peer])
    {
        if !matches!(split_url(u), Some(("http" | "https", _, _))) {
            return Err(plain_err(format!(
                "etcd URL {u:?} is not scheme://host:port"
            )));
        }
    }
    set_pki_dir(&pki);

    println!("[init] Using Kubernetes version: {version}");
    println!("[preflight] Running pre-flight checks");
    let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
    let manifests = k8s.join("manifests");
    for f in manifest_files(&manifests) {
        pre.file_available(&f);
    }
    for u in [&client, &peer] {
        if let Some((_, host, port)) = split_url(u) {
            if let Ok(h) = host.parse::<IpAddr>() {
                pre.port(&h, port);
            }
        }
    }
    pre.dir_available(&data_dir);
    pre.finish()?;
    println!("[preflight] Pulling images required for setting up a Kubernetes cluster");

    // certs
    println!(
        "[certs] Using certificateDir folder {:?}",
        pki.display().to_string()
    );
    let names = pki::NodeNames {
        node_name: node.clone(),
        advertise: ip,
        api_sans: vec![host_of(&endpoint).to_string()],
    };
    let said = pki::ensure_authorities(&pki)
        .and_then(|mut said| {
            said.extend(pki::ensure_leaves(&pki, &names)?);
            Ok(said)
        })
        .map_err(|e| phase_err("certs", e))?;
    for line in said {
        println!("{line}");
    }
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt"))
        .map_err(|e| phase_err("certs/ca", format!("failure loading ca certificate: {e}")))?;
    let pin = ca_pin(&ca_pem).map_err(|e| phase_err("certs/ca", e))?;

    // kubeconfig
    let server = format!("http://{endpoint}");
    println!(
        "[kubeconfig] Using kubeconfig folder {:?}",
        k8s.display().to_string()
    );
    for (file, user) in [
        ("admin.conf", "kubernetes-admin"),
        ("super-admin.conf", "kubernetes-super-admin"),
        ("kubelet.conf", &format!("system:node:{node}")),
        ("controller-manager.conf", "system:kube-controller-manager"),
        ("scheduler.conf", "system:kube-scheduler"),
    ] {
        println!("[kubeconfig] Writing {file:?} kubeconfig file");
        let cfg = kubeconfig(&cluster_name, &server, &ca_pem, user);
        write_file(&k8s.join(file), format!("{cfg:#}\n").as_bytes(), 0o600)
            .map_err(|e| phase_err("kubeconfig", e))?;
        embed_client_certificate(&k8s.join(file), &pki, file, &node)
            .map_err(|e| phase_err("kubeconfig", e))?;
    }

    // etcd + control plane manifests
    let member = LocalEtcd {
        name: node.clone(),
        data_dir: data_dir.clone(),
        client_url: client.clone(),
        peer_url: peer.clone(),
        args: etcd_args(
            &node,
            &data_dir,
            &urls,
            &format!("{node}={peer}"),
            "new",
            &[pki::etcd_tls_flags(&pki), extra.clone()].concat(),
        ),
    };
    write_control_plane_manifests(&manifests, "control-plane")?;
    write_etcd_manifest(&manifests, &member, "etcd")?;
    println!("[kubelet-start] Writing kubelet environment file with flags to file \"/var/lib/kubelet/kubeadm-flags.env\"");
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut child =
        spawn_etcd(&member, &state_dir).map_err(|e| phase_err("wait-control-plane", e))?;
    println!("[wait-control-plane] Waiting for the kubelet to boot up the control plane as static Pods from directory {:?}", manifests.display().to_string());
    let started = Instant::now();
    wait_member(&mut child, &client, false, &state_dir.join("etcd.log"))
        .await
        .map_err(|e| {
            println!("[wait-control-plane] etcd did not become healthy: timed out waiting for the condition");
            phase_err("wait-control-plane", e)
        })?;
    println!(
        "[kubelet-check] The kubelet is healthy after {:.6}s",
        started.elapsed().as_secs_f64()
    );
    let api = Api::new(&endpoint);
    println!("[api-check] Waiting for a healthy API server. This can take up to 4m0s");
    wait_api(&api)
        .await
        .map_err(|e| phase_err("wait-control-plane", e))?;
    println!(
        "[api-check] The API server is healthy after {:.6}s",
        started.elapsed().as_secs_f64()
    );

    let node_uid = register_node(&api, &node, &ip, false).await.map_err(|e| {
        phase_err(
            "wait-control-plane",
            format!("error registering node {node:?}: {e}"),
        )
    })?;
    create_etcd_mirror_pod(&api, &node, &node_uid, &ip, &member)
        .await
        .map_err(|e| {
            phase_err(
                "wait-control-plane",
                format!("error creating the etcd mirror Pod: {e}"),
            )
        })?;

    println!("[upload-config] Storing the configuration used in ConfigMap \"kubeadm-config\" in the \"kube-system\" Namespace");
    let kubeadm_config = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": format!("{cluster:#}\n")},
    });
    api.create_or_update(
        "/api/v1/namespaces/kube-system/configmaps",
        "kubeadm-config",
        &kubeadm_config,
    )
    .await
    .map_err(|e| {
        phase_err(
            "upload-config/kubeadm",
            format!("error uploading the kubeadm ClusterConfiguration: {e}"),
        )
    })?;
    println!("[kubelet] Creating a ConfigMap \"kubelet-config\" in namespace kube-system with the configuration for the kubelets in the cluster");

    if flags.on("upload-certs") {
        upload_certs(&api, &pki, &key).await?;
    } else {
        println!("[upload-certs] Skipping phase. Please see --upload-certs");
    }
    mark_control_plane(&api, &node).await?;

    for t in &tokens {
        println!("[bootstrap-token] Using token: {}", t.token.full());
    }
    println!("[bootstrap-token] Configuring bootstrap tokens, cluster-info ConfigMap, RBAC Roles");
    for t in &tokens {
        api.create_or_update(
            "/api/v1/namespaces/kube-system/secrets",
            &format!("bootstrap-token-{}", t.token.id),
            &token_secret(t),
        )
        .await
        .map_err(|e| {
            phase_err(
                "bootstrap-token",
                format!("error updating or creating token: {e}"),
            )
        })?;
    }
    println!("[bootstrap-token] Creating the \"cluster-info\" ConfigMap in the \"kube-public\" namespace");
    api.create_or_update(
        "/api/v1/namespaces/kube-public/configmaps",
        "cluster-info",
        &cluster_info(&server, &ca_pem),
    )
    .await
    .map_err(|e| {
        phase_err(
            "bootstrap-token",
            format!("error creating bootstrap ConfigMap: {e}"),
        )
    })?;
    println!("[kubelet-finalize] Updating \"{}\" to point to a rotatable kubelet client certificate and key", k8s.join("kubelet.conf").display());
    println!("[addons] Applied essential addon: CoreDNS");
    println!("[addons] Applied essential addon: kube-proxy");

    let token = tokens.first().map(|t| t.token.full()).unwrap_or_default();
    let admin = k8s.join("admin.conf").display().to_string();
    println!(
        "\nYour Kubernetes control-plane has initialized successfully!\n\n\
To start using your cluster, you need to run the following as a regular user:\n\n  \
mkdir -p $HOME/.kube\n  sudo cp -i {admin} $HOME/.kube/config\n  sudo chown $(id -u):$(id -g) $HOME/.kube/config\n\n\
Alternatively, if you are the root user, you can run:\n\n  export KUBECONFIG={admin}\n\n\
You should now deploy a pod network to the cluster.\n\
Run \"kubectl apply -f [podnetwork].yaml\" with one of the options listed at:\n  https://kubernetes.io/docs/concepts/cluster-administration/addons/\n"
    );
    if flags.on("upload-certs") {
        println!(
            "You can now join any number of control-plane nodes running the following command on each as root:\n\n  \
kubeadm join {endpoint} --token {token} \\\n\t--discovery-token-ca-cert-hash {pin} \\\n\t--control-plane --certificate-key {key}\n\n\
Please note that the certificate-key gives access to cluster sensitive data, keep it secret!\n\
As a safeguard, uploaded-certs will be deleted in two hours; If necessary, you can use\n\
\"kubeadm init phase upload-certs --upload-certs\" to reload certs afterward.\n"
        );
    }
    println!(
        "Then you can join any number of worker nodes by running the following on each as root:\n\n\
kubeadm join {endpoint} --token {token} \\\n\t--discovery-token-ca-cert-hash {pin} "
    );
    Ok(())
}

async fn wait_api(api: &Api) -> Result<(), String> {
    let timeout = wait_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_request(&api.base, "GET", "/readyz", &[], &[]).await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("GET {}/readyz: {} {}", api.base, r.status, r.text().trim()),
            Err(e) => format!("Get \"{}/readyz\": {e}", api.base),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "could not check API server health: {last}: timed out waiting for the condition"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubeadm init phase upload-certs --upload-certs [--certificate-key K]
/// [--config F] [--kubeconfig K]`.
async fn init_phase(args: &[String]) -> R<()> {
    let Some((phase, rest)) = args.split_first() else {
        return Err(plain_err(
            "the kubeadm stand-in implements only `init phase upload-certs`",
        ));
    };
    if phase != "upload-certs" {
        return Err(plain_err(format!(
            "the kubeadm stand-in implements only `init phase upload-certs`, not {phase:?}"
        )));
    }
    let flags = parse_flags(
        rest,
        &[
            ("upload-certs", false),
            ("certificate-key", true),
            ("config", true),
            ("kubeconfig", true),
            ("skip-certificate-key-print", false),
        ],
    )?;
    if !flags.on("upload-certs") {
        println!("[upload-certs] Skipping phase. Please see --upload-certs");
        return Ok(());
    }
    let docs = match flags.value("config") {
        Some(path) => load_documents(path)?,
        None => Vec::new(),
    };
    let empty = json!({});
    let init_doc = find_kind(&docs, "InitConfiguration").unwrap_or(&empty);
    default_advertise_address(Some(init_doc))?;
    let cluster = find_kind(&docs, "ClusterConfiguration").unwrap_or(&empty);
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| parent(&pki).join("admin.conf"));
    guard_paths(&[&pki, &kubeconfig_path])?;
    let server = kubeconfig_server(&kubeconfig_path).map_err(|e| {
        phase_err(
            "upload-certs",
            format!("failed to load admin kubeconfig: {e}"),
        )
    })?;
    let key = match flags
        .value("certificate-key")
        .or_else(|| str_at(init_doc, "/certificateKey"))
    {
        Some(k) => k.to_string(),
        None => generate_certificate_key(),
    };
    let api = Api::new(&server);
    upload_certs(&api, &pki, &key).await
}

// ---------------------------------------------------------------------------
// kubeadm join

/// What discovery established: the trusted CA and the API server.
struct Discovered {
    ca_pem: String,
    server: String,
}

/// kubeadm's token discovery: cluster-info must carry a JWS for the token id
/// (the bootstrap signer only signs with live tokens), the signature must
/// verify with the token secret, and the CA's public key must be pinned.
async fn discover(api: &Api, token: &Token, pins: &[String], unsafe_skip: bool) -> R<Discovered> {
    let fail = |m: String| {
        phase_err(
            "preflight",
            format!("couldn't validate the identity of the API Server: {m}"),
        )
    };
    let timeout = knob("KBTEST_KUBEADM_DISCOVERY_TIMEOUT_MS", 3_000);
    let deadline = Instant::now() + timeout;
    let (kubeconfig_text, jws) = loop {
        let last = match api
            .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
            .await
        {
            Ok(Some(cm)) => {
                let jws = cm["data"][format!("{}{}", kubeapi::JWS_PREFIX, token.id)]
                    .as_str()
                    .map(str::to_string);
                let kc = cm["data"]["kubeconfig"].as_str().map(str::to_string);
                match (kc, jws) {
                    (Some(kc), Some(jws)) if !jws.is_empty() => break (kc, jws),
                    _ => format!("could not find a JWS signature in the cluster-info ConfigMap for token ID {:?}", token.id),
                }
            }
            Ok(None) => "configmaps \"cluster-info\" not found".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(fail(last));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !kubeapi::detached_jws_is_valid(&jws, &kubeconfig_text, &token.id, &token.secret) {
        return Err(fail(
            "failed to verify JWS signature of received cluster info object, can't trust this API Server".into(),
        ));
    }
    let kc: Value = serde_json::from_str(&kubeconfig_text).map_err(|e| {
        fail(format!(
            "couldn't parse the kubeconfig file in the cluster-info ConfigMap: {e}"
        ))
    })?;
    let cluster = &kc["clusters"][0]["cluster"];
    let ca_pem = cluster["certificate-authority-data"]
        .as_str()
        .and_then(|d| B64.decode(d).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            fail("the cluster-info ConfigMap has no certificate-authority-data".into())
        })?;
    let server = cluster["server"].as_str().unwrap_or_default().to_string();
    if !unsafe_skip {
        let actual = ca_pin(&ca_pem).map_err(|e| {
            fail(format!(
                "cluster CA found in cluster-info ConfigMap is invalid: {e}"
            ))
        })?;
        if !pins.iter().any(|p| p.eq_ignore_ascii_case(&actual)) {
            return Err(fail(format!(
                "cluster CA found in cluster-info ConfigMap is invalid: none of the public keys \"{actual}\" are pinned"
            )));
        }
    }
    Ok(Discovered { ca_pem, server })
}

fn validate_pins(pins: &[String], unsafe_skip: bool) -> R<()> {
    if pins.is_empty() && !unsafe_skip {
        return Err(plain_err(
            "discovery.bootstrapToken: Invalid value: \"\": using token-based discovery without caCertHashes can be unsafe. \
             Set unsafeSkipCAVerification as true in your kubeadm config file or pass --discovery-token-unsafe-skip-ca-verification flag to continue",
        ));
    }
    for p in pins {
        match p.split_once(':') {
            Some(("sha256", h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
            Some(("sha256", _)) => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: invalid hash {p:?}, expected a 32 byte SHA-256 hash"
                )))
            }
            Some((f, _)) => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: unknown hash format {f:?}. Known format(s) are: sha256"
                )))
            }
            None => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: invalid hash {p:?}, expected \"format:hex-value\""
                )))
            }
        }
    }
    Ok(())
}

/// What every `kubeadm join` (and its `control-plane-prepare` phases) knows
/// once the config is read and discovery has established trust.
struct JoinContext {
    node: String,
    /// The kubelet's `--node-ip` (the agent always sets it).
    node_ip: IpAddr,
    endpoint: String,
    k8s: PathBuf,
    pki: PathBuf,
    ca_path: PathBuf,
    data_dir: PathBuf,
    /// `controlPlane.localAPIEndpoint.advertiseAddress` of a control-plane join.
    ip: Option<IpAddr>,
    cert_key: Option<String>,
    api: Api,
    found: Discovered,
    /// The cluster's ClusterConfiguration from the `kubeadm-config` ConfigMap.
    cluster_cfg: Value,
    cluster_name: String,
}

/// Reads the JoinConfiguration, runs preflight (the worker's or the control
/// plane's, as kubeadm's `JoinNodeChecks`), discovery, and fetches the
/// cluster's configuration, as `kubeadm join` does before its phases.
async fn join_context(flags: &Flags, preflight: bool) -> R<JoinContext> {
    if !flags.positional.is_empty() {
        return Err(plain_err(
            "the kubeadm stand-in joins with --config only (no endpoint or discovery flags on the command line)",
        ));
    }
    let config = flags.value("config").ok_or_else(|| {
        plain_err("the kubeadm stand-in needs --config (the agent always passes one)")
    })?;
    let docs = load_documents(config)?;
    let jc = find_kind(&docs, "JoinConfiguration")
        .ok_or_else(|| plain_err(format!("{config}: no JoinConfiguration document")))?;
    let node = str_at(jc, "/nodeRegistration/name")
        .ok_or_else(|| plain_err("nodeRegistration.name: Required value: the kubeadm stand-in does not default it to the hostname"))?
        .to_string();
    let kubelet_args = arg_list(
        jc.pointer("/nodeRegistration/kubeletExtraArgs"),
        "NodeRegistrationOptions.nodeRegistration.kubeletExtraArgs",
    )?;
    note_kubelet_args(&kubelet_args);
    let node_ip: IpAddr = kubelet_args
        .iter()
        .find(|(k, _)| k == "node-ip")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let bt = &jc["discovery"]["bootstrapToken"];
    let endpoint = str_at(bt, "/apiServerEndpoint")
        .ok_or_else(|| plain_err("discovery.bootstrapToken.apiServerEndpoint: Required value"))?
        .to_string();
    let token = parse_token(
        bt["token"].as_str().unwrap_or(""),
        "discovery.bootstrapToken.token",
    )?;
    let pins: Vec<String> = bt["caCertHashes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let unsafe_skip = bt["unsafeSkipCAVerification"].as_bool().unwrap_or(false);
    validate_pins(&pins, unsafe_skip)?;
    let ca_path = PathBuf::from(str_at(jc, "/caCertPath").unwrap_or("/etc/kubernetes/pki/ca.crt"));
    let pki = parent(&ca_path);
    let k8s = parent(&pki);
    let control_plane = jc.get("controlPlane").filter(|v| v.is_object());
    let data_dir = etcd_data_dir_for(&k8s);
    guard_paths(&[&k8s, &data_dir])?;
    let ip = match control_plane {
        Some(cp) => Some(parse_ip(
            str_at(cp, "/localAPIEndpoint/advertiseAddress"),
            "controlPlane.localAPIEndpoint.advertiseAddress",
        )?),
        None => None,
    };
    let cert_key = control_plane
        .and_then(|cp| str_at(cp, "/certificateKey"))
        .map(str::to_string);

    if preflight {
        println!("[preflight] Running pre-flight checks");
        let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
        pre.file_available(&k8s.join("kubelet.conf"));
        // kubeadm checks the CA path only for workers: a control plane may
        // have downloaded the certificates already (upstream:
        // cmd/kubeadm/app/preflight/checks.go, JoinNodeChecks).
        if ip.is_none() {
            pre.file_available(&ca_path);
        }
        pre.finish()?;
    }

    let api = Api::new(&endpoint);
    let found = discover(&api, &token, &pins, unsafe_skip).await?;
    println!("[preflight] Reading configuration from the cluster...");
    println!("[preflight] FYI: You can look at this config file with 'kubectl -n kube-system get cm kubeadm-config -o yaml'");
    let kubeadm_config = api
        .get("/api/v1/namespaces/kube-system/configmaps/kubeadm-config")
        .await
        .map_err(|e| phase_err("preflight", format!("unable to fetch the kubeadm-config ConfigMap: failed to get config map: {e}")))?
        .ok_or_else(|| phase_err("preflight", "unable to fetch the kubeadm-config ConfigMap: failed to get config map: configmaps \"kubeadm-config\" not found"))?;
    let cluster_cfg: Value = kubeadm_config["data"]["ClusterConfiguration"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let cluster_name = str_at(&cluster_cfg, "/clusterName")
        .unwrap_or("kubernetes")
        .to_string();
    set_pki_dir(&pki);
    Ok(JoinContext {
        node,
        node_ip,
        endpoint,
        k8s,
        pki,
        ca_path,
        data_dir,
        ip,
        cert_key,
        api,
        found,
        cluster_cfg,
        cluster_name,
    })
}

impl JoinContext {
    /// The control-plane join's advertise address and certificate key, or
    /// kubeadm's refusal when the certificates are neither given nor there.
    fn control_plane(&self) -> R<(IpAddr, Option<&str>)> {
        let ip = self.ip.ok_or_else(|| {
            plain_err("this phase needs a JoinConfiguration with a controlPlane section")
        })?;
        if self.cert_key.is_none() && !self.ca_path.exists() {
            // Without a key kubeadm expects the certificates copied by hand.
            return Err(phase_err(
                "preflight",
                format!(
                    "\nOne or more conditions for hosting a new control plane instance is not satisfied.\n\n\
                     [failure loading certificate for CA: couldn't load the certificate file {}: open {}: no such file or directory]\n\n\
                     Please ensure that:\n* The cluster has a stable controlPlaneEndpoint address.\n\
                     * The certificates that must be shared among control plane instances are provided.",
                    self.ca_path.display(),
                    self.ca_path.display()
                ),
            ));
        }
        Ok((ip, self.cert_key.as_deref()))
    }

    /// control-plane-prepare/download-certs: the shared CAs and keys from
    /// `kube-system/kubeadm-certs`, opened with the certificate key
    /// (upstream: cmd/kubeadm/app/phases/copycerts/copycerts.go, `DownloadCerts`).
    async fn download_certs(&self) -> R<()> {
        let Some(cert_key) = self.control_plane()?.1 else {
            println!("[download-certs] Skipping phase. Please see --certificate-key");
            return Ok(());
        };
        println!("[download-certs] Downloading the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace");
        let certs_fail = |m: String| {
            phase_err(
                "control-plane-prepare/download-certs",
                format!("error downloading certs: {m}"),
            )
        };
        let not_found = || {
            certs_fail(
                "error downloading the secret: Secret \"kubeadm-certs\" was not found in the \"kube-system\" Namespace. \
                 This Secret might have expired. Please, run `kubeadm init phase upload-certs --upload-certs` on a control plane to generate a new one"
                    .into(),
            )
        };
        let secret = self
            .api
            .get("/api/v1/namespaces/kube-system/secrets/kubeadm-certs")
            .await
            .map_err(|e| certs_fail(format!("error downloading the secret: {e}")))?
            .ok_or_else(not_found)?;
        let expired = secret["metadata"]["annotations"][CERTS_EXPIRY_ANNOTATION]
            .as_str()
            .and_then(parse_rfc3339)
            .is_some_and(|t| t <= SystemTime::now());
        if expired {
            return Err(not_found());
        }
        let key_bytes = pki::certificate_key_bytes(cert_key).map_err(certs_fail)?;
        // Open everything before writing anything: a wrong key leaves no file.
        let mut opened = Vec::new();
        for name in pki::SHARED_FILES {
            let sealed = secret["data"][pki::secret_key_of(name)]
                .as_str()
                .and_then(|d| B64.decode(d).ok())
                .ok_or_else(|| {
                    certs_fail(format!(
                        "the Secret does not include the required certificate or key - name: {name}, path: {}",
                        self.pki.join(name).display()
                    ))
                })?;
            let plain = pki::open(&key_bytes, &sealed).map_err(|e| {
                certs_fail(format!("error decoding secret data with provided key: {e}"))
            })?;
            opened.push((name, plain));
        }
        for (name, plain) in opened {
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            write_file(&self.pki.join(name), &plain, mode).map_err(certs_fail)?;
        }
        Ok(())
    }

    /// control-plane-prepare/certs: this node's own certificates, signed by
    /// the CAs downloaded before (refused without them, as kubeadm does).
    fn certs(&self) -> R<()> {
        let (ip, _) = self.control_plane()?;
        println!(
            "[certs] Using certificateDir folder {:?}",
            self.pki.display().to_string()
        );
        let endpoint = str_at(&self.cluster_cfg, "/controlPlaneEndpoint").unwrap_or(&self.endpoint);
        let names = pki::NodeNames {
            node_name: self.node.clone(),
            advertise: ip,
            api_sans: vec![host_of(endpoint).to_string()],
        };
        let said = pki::ensure_leaves(&self.pki, &names)
            .map_err(|e| phase_err("control-plane-prepare/certs", e))?;
        for line in said {
            println!("{line}");
        }
        println!(
            "[certs] Valid certificates and keys now exist in {:?}",
            self.pki.display().to_string()
        );
        Ok(())
    }
}

/// The host of `host:port` (an IPv6 literal keeps its brackets off).
fn host_of(endpoint: &str) -> &str {
    endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// `kubeadm join phase control-plane-prepare download-certs|certs --config F`:
/// what a control plane needs before it can talk to etcd (the agent's
/// health check and stale-member cleanup come between these and the join).
async fn join_phase(args: &[String]) -> R<()> {
    let usage = || {
        plain_err(
            "the kubeadm stand-in implements only `join phase control-plane-prepare download-certs|certs`",
        )
    };
    let (Some("control-plane-prepare"), Some(sub)) = (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
    ) else {
        return Err(usage());
    };
    let flags = parse_flags(&args[2..], &[("config", true)])?;
    let ctx = join_context(&flags, false).await?;
    match sub {
        "download-certs" => ctx.download_certs().await,
        "certs" => ctx.certs(),
        _ => Err(usage()),
    }
}

async fn join(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("config", true), ("ignore-preflight-errors", true)])?;
    let ctx = join_context(&flags, true).await?;
    let Some(ip) = ctx.ip else {
        return join_worker(
            &ctx.api,
            &ctx.node,
            &ctx.node_ip,
            &ctx.k8s,
            &ctx.ca_path,
            &ctx.found,
            &ctx.cluster_name,
        )
        .await;
    };
    ctx.control_plane()?;
    let (node, k8s, api) = (&ctx.node, &ctx.k8s, &ctx.api);

    println!(
        "[preflight] Running pre-flight checks before initializing the new control plane instance"
    );
    let manifests = k8s.join("manifests");
    let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
    for f in manifest_files(&manifests) {
        pre.file_available(&f);
    }
    pre.port(&ip, 2379);
    pre.port(&ip, 2380);
    pre.dir_available(&ctx.data_dir);
    pre.finish()?;

    ctx.download_certs().await?;
    ctx.certs()?;
    let control_plane_endpoint = str_at(&ctx.cluster_cfg, "/controlPlaneEndpoint")
        .unwrap_or(&ctx.endpoint)
        .to_string();
    let server = format!("http://{control_plane_endpoint}");
    println!("[kubeconfig] Generating kubeconfig files");
    println!(
        "[kubeconfig] Using kubeconfig folder {:?}",
        k8s.display().to_string()
    );
    for (file, user) in [
        ("admin.conf", "kubernetes-admin"),
        ("controller-manager.conf", "system:kube-controller-manager"),
        ("scheduler.conf", "system:kube-scheduler"),
    ] {
        println!("[kubeconfig] Writing {file:?} kubeconfig file");
        let cfg = kubeconfig(&ctx.cluster_name, &server, &ctx.found.ca_pem, user);
        write_file(&k8s.join(file), format!("{cfg:#}\n").as_bytes(), 0o600)
            .map_err(|e| phase_err("control-plane-prepare/kubeconfig", e))?;
        embed_client_certificate(&k8s.join(file), &k8s.join("pki"), file, &ctx.node)
            .map_err(|e| phase_err("control-plane-prepare/kubeconfig", e))?;
    }
    write_control_plane_manifests(&manifests, "control-plane-prepare/control-plane")?;

    // check-etcd
    println!("[check-etcd] Checking that the etcd cluster is healthy");
    let members = check_etcd(api)
        .await
        .map_err(|e| phase_err("check-etcd", e))?;

    // kubelet-start
    println!(
        "[kubelet-start] Writing kubelet configuration to file \"/var/lib/kubelet/config.yaml\""
    );
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    println!("[kubelet-start] Waiting for the kubelet to perform the TLS Bootstrap");
    let kubelet = kubeconfig(
        &ctx.cluster_name,
        &ctx.found.server,
        &ctx.found.ca_pem,
        &format!("system:node:{node}"),
    );
    write_file(
        &k8s.join("kubelet.conf"),
        format!("{kubelet:#}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| phase_err("kubelet-start", e))?;
    let node_uid = register_node(api, node, &ip, false).await.map_err(|e| {
        phase_err(
            "kubelet-start",
            format!("error registering node {node:?}: {e}"),
        )
    })?;

    // control-plane-join/etcd
    let extra = arg_list(
        ctx.cluster_cfg.pointer("/etcd/local/extraArgs"),
        "LocalEtcd.etcd.local.extraArgs",
    )?;
    let member = join_etcd(node, &ip, &ctx.data_dir, k8s, &ctx.pki, &members, &extra).await?;
    create_etcd_mirror_pod(api, node, &node_uid, &ip, &member)
        .await
        .map_err(|e| {
            phase_err(
                "control-plane-join/etcd",
                format!("error creating the etcd mirror Pod: {e}"),
            )
        })?;
    mark_control_plane(api, node).await?;
    println!(
        "\nThis node has joined the cluster and a new control plane instance was created:\n\n\
* Certificate signing request was sent to apiserver and approval was received.\n\
* The Kubelet was informed of the new secure connection details.\n\
* Control plane label and taint were applied to the new node.\n\
* The Kubernetes control plane instances scaled up.\n\
* A new etcd member was added to the local/stacked etcd cluster.\n\n\
To start administering your cluster from this node, you need to run the following as a regular user:\n\n\
\tmkdir -p $HOME/.kube\n\tsudo cp -i {} $HOME/.kube/config\n\tsudo chown $(id -u):$(id -g) $HOME/.kube/config\n\n\
Run 'kubectl get nodes' to see this node join the cluster.\n",
        k8s.join("admin.conf").display()
    );
    Ok(())
}

async fn join_worker(
    api: &Api,
    node: &str,
    ip: &IpAddr,
    k8s: &Path,
    ca_path: &Path,
    found: &Discovered,
    cluster_name: &str,
) -> R<()> {
    println!(
        "[kubelet-start] Writing kubelet configuration to file \"/var/lib/kubelet/config.yaml\""
    );
    println!("[kubelet-start] Writing kubelet environment file with flags to file \"/var/lib/kubelet/kubeadm-flags.env\"");
    write_file(ca_path, found.ca_pem.as_bytes(), 0o644)
        .map_err(|e| phase_err("kubelet-start", e))?;
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    let kubelet = kubeconfig(
        cluster_name,
        &found.server,
        &found.ca_pem,
        &format!("system:node:{node}"),
    );
    write_file(
        &k8s.join("kubelet.conf"),
        format!("{kubelet:#}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| phase_err("kubelet-start", e))?;
    println!("[kubelet-check] Waiting for a healthy kubelet at http://127.0.0.1:10248/healthz. This can take up to 4m0s");
    println!("[kubelet-start] Waiting for the kubelet to perform the TLS Bootstrap");
    register_node(api, node, ip, false).await.map_err(|e| {
        phase_err(
            "kubelet-start",
            format!("error registering node {node:?}: {e}"),
        )
    })?;
    println!(
        "\nThis node has joined the cluster:\n\
* Certificate signing request was sent to apiserver and a response was received.\n\
* The Kubelet was informed of the new secure connection details.\n\n\
Run 'kubectl get nodes' on the control-plane to see this node join the cluster.\n"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// No-op mode (KBTEST_KUBEADM_NOOP=1): only what the agent reads afterwards

/// `init` in no-op mode: the cluster CA the agent pins, and nothing else.
async fn noop_init(args: &[String]) -> R<()> {
    let flags = parse_flags(
        args,
        &[
            ("config", true),
            ("upload-certs", false),
            ("skip-token-print", false),
            ("ignore-preflight-errors", true),
            ("certificate-key", true),
        ],
    )?;
    let config = flags.value("config").ok_or_else(|| {
        plain_err("the kubeadm stand-in needs --config (the agent always passes one)")
    })?;
    let docs = load_documents(config)?;
    let cluster = find_kind(&docs, "ClusterConfiguration").ok_or_else(|| {
        plain_err(format!(
            "{config}: no ClusterConfiguration document (the stand-in needs certificatesDir)"
        ))
    })?;
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    guard_paths(&[&pki])?;
    let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
    if ca_crt.exists() && ca_key.exists() {
        println!("[certs] Using existing ca certificate authority");
    } else {
        let (cert, key) = generate_ca().map_err(|e| {
            phase_err(
                "certs/ca",
                format!("failure while creating CA certificate: {e}"),
            )
        })?;
        write_file(&ca_crt, cert.as_bytes(), 0o644).map_err(|e| phase_err("certs/ca", e))?;
        write_file(&ca_key, key.as_bytes(), 0o600).map_err(|e| phase_err("certs/ca", e))?;
    }
    println!(
        "[kbtest] no-op init ({NOOP_ENV}=1): wrote {}; no etcd, no API objects",
        ca_crt.display()
    );
    Ok(())
}

/// `join` in no-op mode: `kubelet.conf` and a Node that is already `Ready`.
async fn noop_join(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("config", true), ("ignore-preflight-errors", true)])?;
    let config = flags.value("config").ok_or_else(|| {
        plain_err("the kubeadm stand-in needs --config (the agent always passes one)")
    })?;
    let docs = load_documents(config)?;
    let jc = find_kind(&docs, "JoinConfiguration")
        .ok_or_else(|| plain_err(format!("{config}: no JoinConfiguration document")))?;
    let node = str_at(jc, "/nodeRegistration/name")
        .ok_or_else(|| plain_err("nodeRegistration.name: Required value: the kubeadm stand-in does not default it to the hostname"))?
        .to_string();
    let kubelet_args = arg_list(
        jc.pointer("/nodeRegistration/kubeletExtraArgs"),
        "NodeRegistrationOptions.nodeRegistration.kubeletExtraArgs",
    )?;
    note_kubelet_args(&kubelet_args);
    let node_ip: IpAddr = kubelet_args
        .iter()
        .find(|(k, _)| k == "node-ip")
        .map(|(_, v)| v.as_str())
        .or_else(|| str_at(jc, "/controlPlane/localAPIEndpoint/advertiseAddress"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let endpoint = str_at(jc, "/discovery/bootstrapToken/apiServerEndpoint")
        .ok_or_else(|| plain_err("discovery.bootstrapToken.apiServerEndpoint: Required value"))?
        .to_string();
    let ca_path = PathBuf::from(str_at(jc, "/caCertPath").unwrap_or("/etc/kubernetes/pki/ca.crt"));
    let k8s = parent(&parent(&ca_path));
    guard_paths(&[&k8s])?;
    // The cluster CA as kubeadm would put it in kubelet.conf (the agent's
    // client loads it; without one it would load the system's roots
    // instead): from cluster-info when there is one, unverified, else a
    // throwaway (plain HTTP: nothing is verified with it).
    let api = Api::new(&endpoint);
    let from_cluster = api
        .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
        .await
        .ok()
        .flatten()
        .and_then(|cm| {
            let kc: Value = serde_json::from_str(cm["data"]["kubeconfig"].as_str()?).ok()?;
            let data = kc["clusters"][0]["cluster"]["certificate-authority-data"].as_str()?;
            String::from_utf8(B64.decode(data).ok()?).ok()
        });
    let ca_pem = match from_cluster {
        Some(pem) => pem,
        None => generate_ca().map_err(|e| phase_err("kubelet-start", e))?.0,
    };
    let kubelet = kubeconfig(
        "kubernetes",
        &format!("http://{endpoint}"),
        &ca_pem,
        &format!("system:node:{node}"),
    );
    let kubelet_conf = k8s.join("kubelet.conf");
    write_file(&kubelet_conf, format!("{kubelet:#}\n").as_bytes(), 0o600)
        .map_err(|e| phase_err("kubelet-start", e))?;
    register_node(&api, &node, &node_ip, true)
        .await
        .map_err(|e| {
            phase_err(
                "kubelet-start",
                format!("error registering node {node:?}: {e}"),
            )
        })?;
    println!(
        "[kbtest] no-op join ({NOOP_ENV}=1): wrote {}, registered node {node:?} Ready; no discovery, no etcd",
        kubelet_conf.display()
    );
    Ok(())
}

/// The client URLs of the etcd members, from the etcd mirror Pods.
async fn etcd_endpoints_from_pods(api: &Api) -> Result<Vec<String>, String> {
    let list = api
        .call(
            "GET",
            "/api/v1/namespaces/kube-system/pods?labelSelector=component%3Detcd%2Ctier%3Dcontrol-plane",
            None,
            "application/json",
        )
        .await
        .map_err(|e| format!("could not retrieve the list of etcd endpoints: {e}"))?;
    Ok(list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["metadata"]["annotations"][ETCD_URL_ANNOTATION].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// The member list through the first endpoint that answers.
async fn member_list_via(endpoints: &[String]) -> Result<Vec<Member>, String> {
    let mut last = "no etcd endpoints".to_string();
    for ep in endpoints {
        match etcd_client(std::slice::from_ref(ep)).await {
            Ok(mut c) => match c.member_list().await {
                Ok(resp) => return Ok(resp.members().to_vec()),
                Err(e) => last = format!("{ep}: {}", etcd_msg(&e)),
            },
            Err(e) => last = format!("{ep}: {e}"),
        }
    }
    Err(last)
}

/// kubeadm's check-etcd: every member that has started must answer its
/// status (learners included); a voter that never started is refused here
/// too (the stand-in is stricter than kubeadm, which would fail later with
/// "unhealthy cluster").
async fn check_etcd(api: &Api) -> Result<Vec<Member>, String> {
    let endpoints = etcd_endpoints_from_pods(api).await?;
    if endpoints.is_empty() {
        return Err("could not retrieve the list of etcd endpoints: no etcd Pods with labels component=etcd,tier=control-plane in the \"kube-system\" Namespace".into());
    }
    let members = member_list_via(&endpoints)
        .await
        .map_err(|e| format!("error syncing endpoints with etcd: {e}"))?;
    for m in &members {
        if m.client_urls().is_empty() || m.name().is_empty() {
            if m.is_learner() {
                continue; // kubeadm's Sync() never sees it; member add will refuse
            }
            return Err(format!(
                "etcd cluster is not healthy: member {:x} ({}) has not started",
                m.id(),
                m.peer_urls().join(",")
            ));
        }
        for url in m.client_urls() {
            let ok = async {
                let mut c = etcd_client(std::slice::from_ref(url)).await?;
                c.status().await.map_err(|e| etcd_msg(&e))
            };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(3), ok)
                .await
                .unwrap_or_else(|_| Err("context deadline exceeded".into()))
            {
                return Err(format!(
                    "etcd cluster is not healthy: failed to dial endpoint {url} with maintenance client: {e}"
                ));
            }
        }
    }
    Ok(members)
}

/// control-plane-join/etcd: add this node as a learner (reusing a member
/// already added for its peer URL), start it, promote it. The member's
/// flags are kubeadm's defaults for this node overridden by the cluster's
/// `etcd.local.extraArgs` (upstream: cmd/kubeadm/app/phases/etcd/local.go,
/// `getEtcdCommand`; the peer URL added is always this node's,
/// `etcdutil.GetPeerURL`), so node-specific URLs in the cluster-wide
/// ClusterConfiguration break every join as they do on real nodes.
async fn join_etcd(
    node: &str,
    ip: &IpAddr,
    data_dir: &Path,
    k8s: &Path,
    pki_dir: &Path,
    members: &[Member],
    extra: &[(String, String)],
) -> R<LocalEtcd> {
    let fail = |m: String| {
        phase_err(
            "control-plane-join/etcd",
            format!("error creating local etcd static pod manifest file: {m}"),
        )
    };
    let peer = format!("https://{ip}:2380");
    let extra_get = |n: &str| extra.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let split = |s: Option<String>, default: String| -> Vec<String> {
        s.unwrap_or(default)
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let client = extra_get("advertise-client-urls").unwrap_or_else(|| format!("https://{ip}:2379"));
    let advertised_peer = extra_get("initial-advertise-peer-urls").unwrap_or_else(|| peer.clone());
    let urls = EtcdUrls {
        listen_client: drop_shared_loopback(
            &split(
                extra_get("listen-client-urls"),
                format!("https://127.0.0.1:2379,https://{ip}:2379"),
            ),
            ip,
        ),
        listen_peer: split(extra_get("listen-peer-urls"), peer.clone()),
        client: client.clone(),
        peer: advertised_peer.clone(),
    };
    let voters: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner())
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    let mut etcd = etcd_client(&voters).await.map_err(fail)?;
    let reconfig = knob("KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS", 30_000);

    let existing = members.iter().find(|m| m.peer_urls().contains(&peer));
    let (id, list, learner) = match existing {
        Some(m) => {
            println!(
                "[etcd] Member {:x} with peer URL {peer} already exists; reusing it",
                m.id()
            );
            (m.id(), members.to_vec(), m.is_learner())
        }
        None => {
            println!("[etcd] Adding etcd member as learner: {peer}");
            let deadline = Instant::now() + reconfig;
            let resp = loop {
                let opts = MemberAddOptions::new().with_is_learner();
                match etcd.member_add([peer.as_str()], Some(opts)).await {
                    Ok(r) => break r,
                    Err(e) => {
                        let msg = etcd_msg(&e);
                        if !transient(&msg) || Instant::now() >= deadline {
                            return Err(fail(msg));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            let id = resp
                .member()
                .map(|m| m.id())
                .ok_or_else(|| fail("member add returned no member".into()))?;
            (id, resp.member_list().to_vec(), true)
        }
    };
    let initial_cluster = list
        .iter()
        .filter_map(|m| {
            let url = m.peer_urls().first()?;
            let name = if m.id() == id {
                node.to_string()
            } else if m.name().is_empty() {
                format!("{:x}", m.id())
            } else {
                m.name().to_string()
            };
            Some(format!("{name}={url}"))
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut flags = pki::etcd_tls_flags(pki_dir);
    flags.extend(extra.iter().cloned());
    let member = LocalEtcd {
        name: node.to_string(),
        data_dir: data_dir.to_path_buf(),
        client_url: client.clone(),
        peer_url: advertised_peer.clone(),
        args: etcd_args(node, data_dir, &urls, &initial_cluster, "existing", &flags),
    };
    println!("[etcd] Announced new etcd member joining to the existing etcd cluster");
    write_etcd_manifest(&k8s.join("manifests"), &member, "control-plane-join/etcd")?;
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut child = spawn_etcd(&member, &state_dir).map_err(fail)?;
    println!("[etcd] Waiting for the new etcd member to join the cluster. This can take up to 40s");
    wait_member(&mut child, &client, learner, &state_dir.join("etcd.log"))
        .await
        .map_err(|e| {
            fail(format!(
                "timeout waiting for etcd cluster to be available: {e}"
            ))
        })?;
    if learner {
        let deadline = Instant::now() + knob("KBTEST_KUBEADM_PROMOTE_TIMEOUT_MS", 120_000);
        loop {
            match etcd.member_promote(id).await {
                Ok(_) => break,
                Err(e) => {
                    let msg = etcd_msg(&e);
                    let retry = msg.contains("in sync with leader") || transient(&msg);
                    if !retry || Instant::now() >= deadline {
                        return Err(fail(format!("error promoting member {id:x}: {msg}")));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        println!("[etcd] The learner {id:x} was promoted to a voting member");
        wait_member(&mut child, &client, false, &state_dir.join("etcd.log"))
            .await
            .map_err(|e| {
                fail(format!(
                    "timeout waiting for etcd cluster to be available: {e}"
                ))
            })?;
    }
    Ok(member)
}

// ---------------------------------------------------------------------------
// kubeadm reset

async fn reset(args: &[String]) -> R<()> {
    let flags = parse_flags(
        args,
        &[
            ("force", false),
            ("cert-dir", true),
            ("kubeconfig", true),
            ("cleanup-tmp-dir", false),
            ("ignore-preflight-errors", true),
            ("cri-socket", true),
            ("dry-run", false),
        ],
    )?;
    let pki = PathBuf::from(flags.value("cert-dir").unwrap_or(DEFAULT_CERT_DIR));
    set_pki_dir(&pki);
    let k8s = parent(&pki);
    let manifests = k8s.join("manifests");
    let local = LocalEtcd::from_manifest(&manifests.join("etcd.yaml"));
    let data_dir = local
        .as_ref()
        .map(|m| m.data_dir.clone())
        .unwrap_or_else(|| etcd_data_dir_for(&k8s));
    guard_paths(&[&k8s, &data_dir])?;
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| k8s.join("admin.conf"));
    let server = kubeconfig_server(&kubeconfig_path)
        .or_else(|_| kubeconfig_server(&k8s.join("kubelet.conf")));
    let api = match &server {
        Ok(s) => {
            println!("[reset] Reading configuration from the cluster...");
            println!("[reset] FYI: You can look at this config file with 'kubectl -n kube-system get cm kubeadm-config -o yaml'");
            let mut api = Api::new(s);
            api.patience = Duration::from_secs(2);
            Some(api)
        }
        Err(e) => {
            eprintln!("W{} {:>7} reset.go:124] [reset] Unable to fetch the kubeadm-config ConfigMap from cluster: failed to get config map: {e}", klog_stamp(), std::process::id());
            None
        }
    };
    if !flags.on("force") {
        print!("[reset] WARNING: Changes made to this host by 'kubeadm init' or 'kubeadm join' will be reverted.\n[reset] Are you sure you want to proceed? [y/N]: ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(plain_err("aborted reset operation"));
        }
    }
    println!("[preflight] Running pre-flight checks");

    // remove-etcd-member
    if let Some(m) = &local {
        remove_own_member(api.as_ref(), m).await;
        if let Some(api) = &api {
            let node = &m.name;
            if let Err(e) = api
                .delete(&format!("/api/v1/namespaces/kube-system/pods/etcd-{node}"))
                .await
            {
                eprintln!("W[reset] Failed to delete the etcd mirror Pod etcd-{node}: {e}");
            }
        }
    } else {
        println!("[reset] No etcd config found. Assuming external etcd");
        println!("[reset] Please, manually reset etcd to prevent further issues");
    }

    // cleanup-node: stop what the kubelet ran, then delete files
    println!("[reset] Stopping the kubelet service");
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut pids: BTreeSet<u32> = etcd_pids_for(&data_dir).into_iter().collect();
    if let Some(pid) = std::fs::read_to_string(state_dir.join("etcd.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|p| is_etcd_for(*p, &data_dir))
    {
        pids.insert(pid);
    }
    let pids: Vec<u32> = pids.into_iter().collect();
    stop_groups(&pids, Duration::from_secs(2));
    for pid in &pids {
        forget_pid(*pid);
    }
    println!("[reset] Unmounting mounted directories in \"/var/lib/kubelet\"");
    let wipe =
        |r: Result<(), String>| r.map_err(|e| plain_err(format!("[reset] Failed to delete: {e}")));
    if data_dir.exists() {
        wipe(clear_dir(&data_dir))?;
        println!(
            "[reset] Deleted contents of the etcd data directory: {}",
            data_dir.display()
        );
    }
    let dirs = [manifests.clone(), pki.clone()];
    println!(
        "[reset] Deleting contents of directories: [{}]",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for d in &dirs {
        wipe(clear_dir(d))?;
    }
    let files: Vec<PathBuf> = [
        "admin.conf",
        "super-admin.conf",
        "kubelet.conf",
        "bootstrap-kubelet.conf",
        "controller-manager.conf",
        "scheduler.conf",
    ]
    .iter()
    .map(|f| k8s.join(f))
    .collect();
    println!(
        "[reset] Deleting files: [{}]",
        files
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for f in &files {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(plain_err(format!(
                    "[reset] Failed to delete {}: {e}",
                    f.display()
                )))
            }
        }
    }
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir).map_err(|e| {
            plain_err(format!(
                "[reset] Failed to delete {}: {e}",
                state_dir.display()
            ))
        })?;
    }
    println!(
        "\nThe reset process does not clean CNI configuration. To do so, you must remove /etc/cni/net.d\n\n\
The reset process does not reset or clean up iptables rules or IPVS tables.\n\
If you wish to reset iptables, you must do so manually by using the \"iptables\" command.\n\n\
The reset process does not clean your kubeconfig files and you must remove them manually.\n\
Please, check the contents of the $HOME/.kube/config file."
    );
    Ok(())
}

/// Removes this node's etcd member through the other members (then its
/// own), as `kubeadm reset` does. Failures are warnings: kubeadm reset
/// carries on and leaves the member for the operator.
async fn remove_own_member(api: Option<&Api>, m: &LocalEtcd) {
    let mut endpoints = match api {
        Some(api) => etcd_endpoints_from_pods(api).await.unwrap_or_default(),
        None => Vec::new(),
    };
    endpoints.retain(|e| *e != m.client_url);
    endpoints.push(m.client_url.clone());
    let warn = |e: String| {
        eprintln!(
            "W{} {:>7} removeetcdmember.go:105] [reset] Failed to remove etcd member: {e}, please manually remove this etcd member using etcdctl",
            klog_stamp(),
            std::process::id()
        );
    };
    let members = match member_list_via(&endpoints).await {
        Ok(list) => list,
        Err(e) => return warn(format!("error syncing endpoints with etcd: {e}")),
    };
    let Some(me) = members.iter().find(|x| x.peer_urls().contains(&m.peer_url)) else {
        println!(
            "[reset] No etcd member with peer URL {} found; nothing to remove",
            m.peer_url
        );
        return;
    };
    if members.len() == 1 {
        println!(
            "[reset] This is the only remaining etcd member in the etcd cluster, skip removing it"
        );
        return;
    }
    let id = me.id();
    let usable: Vec<String> = members
        .iter()
        .filter(|x| x.id() != id && !x.is_learner())
        .flat_map(|x| x.client_urls().to_vec())
        .chain(std::iter::once(m.client_url.clone()))
        .collect();
    let deadline = Instant::now() + knob("KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS", 30_000);
    let mut last = String::new();
    while Instant::now() < deadline {
        for ep in &usable {
            let Ok(mut c) = etcd_client(std::slice::from_ref(ep)).await else {
                continue;
            };
            match c.member_remove(id).await {
                Ok(_) => {
                    println!(
                        "[reset] Removed etcd member {id:x} ({}) from the cluster",
                        m.peer_url
                    );
                    return;
                }
                Err(e) => {
                    last = etcd_msg(&e);
                    if last.contains("member not found") {
                        return;
                    }
                    if !transient(&last) {
                        return warn(last);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    warn(last)
}

// ---------------------------------------------------------------------------
// kubeadm token

/// kubeadm's defaulting of `localAPIEndpoint.advertiseAddress`, which
/// `token create` and `init phase upload-certs` run on their configuration
/// like `init` (upstream `SetAPIEndpointDynamicDefaults` →
/// `ChooseAPIServerBindAddress` → apimachinery's `ResolveBindAddress`):
/// without an address (or with an unspecified or loopback one) kubeadm picks
/// the host's, reading the default routes and then the interfaces' addresses
/// with Go's `net.InterfaceByName`/`Addrs`, which on Linux is a netlink
/// dump (`syscall.NetlinkRIB`: an `AF_NETLINK`/`NETLINK_ROUTE` socket). The
/// stand-in makes the same dump (and ignores the answer); when the socket
/// is refused (`RestrictAddressFamilies=` without `AF_NETLINK` gives
/// `EAFNOSUPPORT`) it fails as kubeadm does, with Go's error.
fn default_advertise_address(init: Option<&Value>) -> R<()> {
    let given = init
        .and_then(|d| str_at(d, "/localAPIEndpoint/advertiseAddress"))
        .filter(|a| !a.is_empty());
    if let Some(address) = given {
        let ip: IpAddr = address.parse().map_err(|_| {
            plain_err(format!(
                "couldn't use \"{address}\" as \"apiserver-advertise-address\", must be ipv4 or ipv6 address"
            ))
        })?;
        if !ip.is_unspecified() && !ip.is_loopback() {
            return Ok(());
        }
    }
    netlink_link_dump().map_err(|e| {
        plain_err(format!(
            "route ip+net: netlinkrib: {}",
            e.desc().to_lowercase()
        ))
    })
}

/// `syscall.NetlinkRIB(RTM_GETLINK, AF_UNSPEC)`: socket, bind, one dump
/// request, read until `NLMSG_DONE`.
fn netlink_link_dump() -> nix::Result<()> {
    use nix::sys::socket::{
        bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd as _;
    const RTM_GETLINK: u16 = 18;
    const NLM_F_REQUEST_DUMP: u16 = 0x301;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // nlmsghdr (len, type, flags, seq, pid) + rtgenmsg (family).
    let mut request = Vec::with_capacity(17);
    request.extend_from_slice(&17u32.to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.push(0);
    send(fd.as_raw_fd(), &request, MsgFlags::empty())?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
            if kind == NLMSG_DONE || kind == NLMSG_ERROR || len < 16 {
                return Ok(());
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

async fn token(args: &[String]) -> R<()> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(plain_err(
            "the kubeadm stand-in implements `token create` and `token delete`",
        ));
    };
    let flags = parse_flags(
        rest,
        &[
            ("kubeconfig", true),
            ("ttl", true),
            ("print-join-command", false),
            ("description", true),
            ("groups", true),
            ("usages", true),
            ("config", true),
            ("certificate-key", true),
            ("dry-run", false),
        ],
    )?;
    let kubeconfig_path = PathBuf::from(
        flags
            .value("kubeconfig")
            .unwrap_or("/etc/kubernetes/admin.conf"),
    );
    let server = kubeconfig_server(&kubeconfig_path)
        .map_err(|e| plain_err(format!("failed to load admin kubeconfig: {e}")))?;
    let api = Api::new(&server);
    match sub.as_str() {
        "create" => {
            // As kubeadm: with --config, the InitConfiguration's first
            // bootstrap token (so the token need not be on the command line).
            let docs = match flags.value("config") {
                Some(path) => load_documents(path)?,
                None => Vec::new(),
            };
            let init_doc = find_kind(&docs, "InitConfiguration");
            default_advertise_address(init_doc)?;
            let from_config = init_doc
                .and_then(|d| str_at(d, "/bootstrapTokens/0/token"))
                .map(str::to_string);
            let token = match from_config
                .as_deref()
                .or(flags.positional.first().map(String::as_str))
            {
                Some(t) => parse_token(t, "token")?,
                None => parse_token(&generate_token(), "token")?,
            };
            let ttl = parse_go_duration(flags.value("ttl").unwrap_or("24h0m0s")).map_err(|e| {
                plain_err(format!(
                    "invalid argument \"{}\" for \"--ttl\" flag: {e}",
                    flags.value("ttl").unwrap_or("")
                ))
            })?;
            let list = |v: Option<&str>, d: &str| -> Vec<String> {
                v.unwrap_or(d)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            let spec = TokenSpec {
                token: token.clone(),
                ttl,
                usages: list(flags.value("usages"), "signing,authentication"),
                groups: list(flags.value("groups"), DEFAULT_TOKEN_GROUP),
                description: flags.value("description").unwrap_or("").into(),
            };
            match api
                .create(
                    "/api/v1/namespaces/kube-system/secrets",
                    &token_secret(&spec),
                )
                .await
            {
                Ok(_) => {}
                Err(f) if f.code == 409 => {
                    return Err(plain_err(format!(
                        "a token with id {:?} already exists",
                        token.id
                    )))
                }
                Err(f) => {
                    return Err(plain_err(format!(
                    "failed to create or update bootstrap token with name bootstrap-token-{}: {f}",
                    token.id
                )))
                }
            }
            if flags.on("print-join-command") {
                let info = api
                    .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
                    .await
                    .map_err(|e| plain_err(format!("failed to get cluster-info: {e}")))?
                    .ok_or_else(|| {
                        plain_err(
                            "failed to get cluster-info: configmaps \"cluster-info\" not found",
                        )
                    })?;
                let kc: Value =
                    serde_json::from_str(info["data"]["kubeconfig"].as_str().unwrap_or("null"))
                        .unwrap_or(Value::Null);
                let cluster = &kc["clusters"][0]["cluster"];
                let ca = cluster["certificate-authority-data"]
                    .as_str()
                    .and_then(|d| B64.decode(d).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let pin = ca_pin(&ca).map_err(plain_err)?;
                let endpoint = cluster["server"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                println!(
                    "kubeadm join {endpoint} --token {} --discovery-token-ca-cert-hash {pin} ",
                    token.full()
                );
            } else {
                println!("{}", token.full());
            }
            Ok(())
        }
        "delete" => {
            if flags.positional.is_empty() {
                return Err(plain_err("missing subcommand; 'token delete' is missing token of form \"[a-z0-9]{6}\" or \"[a-z0-9]{6}\\.[a-z0-9]{16}\""));
            }
            for t in &flags.positional {
                let id = t.split('.').next().unwrap_or("");
                let name = format!("bootstrap-token-{id}");
                match api.delete(&format!("/api/v1/namespaces/kube-system/secrets/{name}")).await {
                    Ok(true) => println!("bootstrap token {id:?} deleted"),
                    Ok(false) => {
                        return Err(plain_err(format!("failed to delete bootstrap token with name {name:?}: secrets {name:?} not found")))
                    }
                    Err(e) => return Err(plain_err(format!("failed to delete bootstrap token with name {name:?}: {e}"))),
                }
            }
            Ok(())
        }
        other => Err(plain_err(format!(
            "the kubeadm stand-in implements `token create` and `token delete`, not `token {other}`"
        ))),
    }
}

// ---------------------------------------------------------------------------
// certs renew all, certs check-expiration

/// One certificate `kubeadm certs` handles: kubeadm's name, its long name
/// for messages, where it lives (a file stem under the cert dir, or a
/// kubeconfig under the kubernetes dir) and the CA that signs it.
struct Handled {
    name: &'static str,
    long: &'static str,
    file: &'static str,
    kubeconfig: bool,
    ca: &'static str,
}

/// kubeadm's renewal handlers, sorted by name as `Manager.Certificates()`
/// returns them (upstream `cmd/kubeadm/app/phases/certs/renewal/manager.go`,
/// long names from `phases/certs/certlist.go`). `kubelet.conf` is not
/// renewed: the kubelet rotates its own client certificate.
const HANDLED: [Handled; 11] = [
    Handled { name: "admin.conf", long: "certificate embedded in the kubeconfig file for the admin to use and for kubeadm itself", file: "admin.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "apiserver", long: "certificate for serving the Kubernetes API", file: "apiserver", kubeconfig: false, ca: "ca" },
    Handled { name: "apiserver-etcd-client", long: "certificate the apiserver uses to access etcd", file: "apiserver-etcd-client", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "apiserver-kubelet-client", long: "certificate for the API server to connect to kubelet", file: "apiserver-kubelet-client", kubeconfig: false, ca: "ca" },
    Handled { name: "controller-manager.conf", long: "certificate embedded in the kubeconfig file for the controller manager to use", file: "controller-manager.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "etcd-healthcheck-client", long: "certificate for liveness probes to healthcheck etcd", file: "etcd/healthcheck-client", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "etcd-peer", long: "certificate for etcd nodes to communicate with each other", file: "etcd/peer", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "etcd-server", long: "certificate for serving etcd", file: "etcd/server", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "front-proxy-client", long: "certificate for the front proxy client", file: "front-proxy-client", kubeconfig: false, ca: "front-proxy-ca" },
    Handled { name: "scheduler.conf", long: "certificate embedded in the kubeconfig file for the scheduler manager to use", file: "scheduler.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "super-admin.conf", long: "certificate embedded in the kubeconfig file for the super-admin", file: "super-admin.conf", kubeconfig: true, ca: "ca" },
];

/// kubeadm's default `certificateValidityPeriod` (v1beta4): one year.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

impl Handled {
    fn path(&self, k8s: &Path, pki: &Path) -> PathBuf {
        if self.kubeconfig {
            k8s.join(self.file)
        } else {
            pki.join(format!("{}.crt", self.file))
        }
    }

    /// Its notAfter, or kubeadm's error text.
    fn not_after(&self, k8s: &Path, pki: &Path) -> Result<SystemTime, String> {
        let path = self.path(k8s, pki);
        let pem = if self.kubeconfig {
            pki::kubeconfig_client_pem(&path)?.ok_or_else(|| {
                format!(
                    "failed to load existing certificate {}: no client certificate in it",
                    self.name
                )
            })?
        } else {
            std::fs::read_to_string(&path)
                .map_err(|e| format!("failed to load existing certificate {}: {e}", self.name))?
        };
        pki::not_after_of(&pem)
    }
}

/// A CA is "external" when its certificate is there without its key
/// (`certsphase.UsingExternalCA`); kubeadm never treats etcd's CA so.
fn externally_managed(pki: &Path, ca: &str) -> bool {
    ca != "etcd/ca"
        && pki.join(format!("{ca}.crt")).exists()
        && !pki.join(format!("{ca}.key")).exists()
}

/// `Jan 02, 2006 15:04 UTC`, as check-expiration prints dates.
fn expiry_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(secs)
        .ok()
        .and_then(|ts| k8s_openapi::jiff::fmt::strtime::format("%b %d, %Y %H:%M UTC", ts).ok())
        .unwrap_or_default()
}

/// apimachinery's `duration.ShortHumanDuration` of the time left.
fn residual(t: SystemTime) -> String {
    let Ok(left) = t.duration_since(SystemTime::now()) else {
        return "<invalid>".into();
    };
    let (s, d) = (left.as_secs(), left.as_secs() / 86_400);
    if d > 365 * 2 {
        format!("{}y", d / 365)
    } else if d >= 1 {
        format!("{d}d")
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

/// `kubeadm certs renew all` and `kubeadm certs check-expiration`
/// (upstream `cmd/kubeadm/app/cmd/certs.go`, `renewCert` and
/// `newCmdCertsExpiration`; `phases/certs/renewal/manager.go`,
/// `RenewUsingLocalCA`). Renewal re-signs each certificate with the local
/// CA, keeping its names and usages, valid for a year from now; a missing
/// certificate is reported `MISSING!` and skipped; one whose CA key is not
/// on the node (an external CA) is reported and skipped (exit 0, as
/// kubeadm); a missing etcd CA key fails, as kubeadm fails loading it.
/// Either reads the certificates of `--cert-dir` and the kubeconfigs next
/// to it; neither restarts anything (kubeadm tells you to).
async fn certs(args: &[String]) -> R<()> {
    let (sub, rest) = match args.split_first() {
        Some((s, r)) => (s.as_str(), r),
        None => return Err(plain_err(
            "Usage:\n  kubeadm certs [command]\n\nAvailable Commands:\n  check-expiration, renew",
        )),
    };
    let (renew, rest) = match (sub, rest.first().map(String::as_str)) {
        ("renew", Some("all")) => (true, &rest[1..]),
        ("renew", other) => {
            return Err(plain_err(format!(
                "the stand-in models only `kubeadm certs renew all`, not {other:?}"
            )))
        }
        ("check-expiration", _) => (false, rest),
        (other, _) => {
            return Err(plain_err(format!(
                "unknown command {other:?} for \"kubeadm certs\""
            )))
        }
    };
    let flags = parse_flags(
        rest,
        &[("cert-dir", true), ("config", true), ("kubeconfig", true)],
    )?;
    let pki = PathBuf::from(flags.value("cert-dir").unwrap_or(DEFAULT_CERT_DIR));
    let k8s = parent(&pki);
    guard_paths(&[&k8s])?;
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| k8s.join("admin.conf"));
    let verb = if renew { "renew" } else { "check-expiration" };
    match kubeconfig_server(&kubeconfig_path) {
        Ok(_) => {
            println!("[{verb}] Reading configuration from the \"kubeadm-config\" ConfigMap in namespace \"kube-system\"...");
            println!("[{verb}] Use 'kubeadm init phase upload-config --config your-config-file' to re-upload it.");
        }
        Err(_) => println!("[{verb}] Error reading configuration from the Cluster. Falling back to default configuration"),
    }
    println!();
    if renew {
        let not_after = SystemTime::now() + LEAF_VALIDITY;
        for h in &HANDLED {
            if !h.path(&k8s, &pki).exists() {
                println!("MISSING! {}", h.long);
                continue;
            }
            if externally_managed(&pki, h.ca) {
                println!("Detected external {}, {} can't be renewed", h.ca, h.long);
                continue;
            }
            let ca_key = pki.join(format!("{}.key", h.ca));
            if !ca_key.exists() {
                return Err(plain_err(format!(
                    "failure loading {} certificate authority: couldn't load the private key file {}: open {}: no such file or directory",
                    h.ca,
                    ca_key.display(),
                    ca_key.display()
                )));
            }
            let renewed = if h.kubeconfig {
                pki::renew_kubeconfig(&h.path(&k8s, &pki), &pki, not_after)
            } else {
                pki::renew_leaf(&pki, h.file, not_after)
            };
            renewed
                .map_err(|e| plain_err(format!("failed to renew certificate {}: {e}", h.name)))?;
            println!("{} renewed", h.long);
        }
        println!();
        println!("Done renewing certificates. You must restart the kube-apiserver, kube-controller-manager, kube-scheduler and etcd, so that they can use the new certificates.");
        return Ok(());
    }
    println!(
        "{:<26} {:<24} {:<15} {:<23} EXTERNALLY MANAGED",
        "CERTIFICATE", "EXPIRES", "RESIDUAL TIME", "CERTIFICATE AUTHORITY"
    );
    for h in &HANDLED {
        if !h.path(&k8s, &pki).exists() {
            println!("!MISSING! {}", h.name);
            continue;
        }
        let at = h.not_after(&k8s, &pki).map_err(plain_err)?;
        let external = if externally_managed(&pki, h.ca) {
            "yes"
        } else {
            "no"
        };
        let ca = h.ca.rsplit('/').next().unwrap_or(h.ca);
        let ca = if h.ca == "etcd/ca" { "etcd-ca" } else { ca };
        println!(
            "{:<26} {:<24} {:<15} {:<23} {external}",
            h.name,
            expiry_date(at),
            residual(at),
            ca
        );
    }
    println!();
    println!(
        "{:<23} {:<24} {:<15} EXTERNALLY MANAGED",
        "CERTIFICATE AUTHORITY", "EXPIRES", "RESIDUAL TIME"
    );
    for (name, stem) in [
        ("ca", "ca"),
        ("etcd-ca", "etcd/ca"),
        ("front-proxy-ca", "front-proxy-ca"),
    ] {
        let path = pki.join(format!("{stem}.crt"));
        let Ok(pem) = std::fs::read_to_string(&path) else {
            println!("!MISSING! {name}");
            continue;
        };
        let at = pki::not_after_of(&pem).map_err(plain_err)?;
        let external = if externally_managed(&pki, stem) {
            "yes"
        } else {
            "no"
        };
        println!(
            "{name:<23} {:<24} {:<15} {external}",
            expiry_date(at),
            residual(at)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_and_print() {
        assert_eq!(
            parse_go_duration("86400s").unwrap(),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_go_duration("24h0m0s").unwrap(),
            Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_go_duration("1h30m").unwrap(),
            Duration::from_secs(5_400)
        );
        assert_eq!(parse_go_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("1d").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn flags_parse_like_cobra() {
        let args: Vec<String> = ["--config", "/x", "--upload-certs", "--v=5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = parse_flags(&args, &[("config", true), ("upload-certs", false)]).unwrap();
        assert_eq!(f.value("config"), Some("/x"));
        assert!(f.on("upload-certs"));
        let bad: Vec<String> = vec!["--nope".into()];
        assert_eq!(
            parse_flags(&bad, &[]).unwrap_err().0,
            "unknown flag: --nope"
        );
        let short: Vec<String> = vec!["-f".into()];
        assert!(parse_flags(&short, &[("force", false)])
            .unwrap()
            .on("force"));
    }

    #[test]
    fn shared_loopback_listen_urls_are_dropped() {
        let ip: IpAddr = "127.3.4.5".parse().unwrap();
        let urls = vec![
            "http://127.3.4.5:2379".to_string(),
            "http://127.0.0.1:2379".to_string(),
        ];
        assert_eq!(
            drop_shared_loopback(&urls, &ip),
            vec!["http://127.3.4.5:2379".to_string()]
        );
    }

    #[test]
    fn the_advertise_address_is_looked_up_over_netlink_only_when_none_is_usable() {
        // None given: the netlink dump, which a test process may make.
        default_advertise_address(None).expect("netlink dump");
        default_advertise_address(Some(&json!({"localAPIEndpoint": {}}))).expect("dump");
        let given = |a: &str| {
            default_advertise_address(Some(&json!({"localAPIEndpoint": {"advertiseAddress": a}})))
        };
        given("10.0.1.5").expect("an address needs no lookup");
        given("127.0.0.1").expect("loopback: looked up");
        let err = given("not-an-ip").expect_err("refused");
        assert!(err.0.contains("must be ipv4 or ipv6 address"), "{}", err.0);
    }
}
