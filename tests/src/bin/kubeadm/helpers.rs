//! Failures (worded as kubeadm words them) and small helpers.

use crate::SYSTEM_PATHS;
use k8s_openapi::jiff::Timestamp;
use kubeboot_tests::pki;
use kubeboot_tests::standin;
use std::fmt::Display;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

/// A failure, already worded as kubeadm words it.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

pub(crate) type R<T> = Result<T, Failure>;

pub(crate) fn phase_err(phase: &str, msg: impl Display) -> Failure {
    Failure(format!("error execution phase {phase}: {msg}"))
}

pub(crate) fn plain_err(msg: impl Display) -> Failure {
    Failure(msg.to_string())
}

/// Names the init system the stand-in drives, like kubeadm's detection of
/// `systemctl`; only `systemd` is modelled, and unset means none, so tests
/// outside a systemd machine never touch the host's services.
pub(crate) const INIT_SYSTEM_ENV: &str = "KUBEADM_STANDIN_INIT_SYSTEM";

/// kubeadm's kubelet-start: `systemctl daemon-reload`, then `systemctl
/// restart kubelet`, each waited for without a timeout (upstream
/// cmd/kubeadm/app/phases/kubelet/kubelet.go `TryStartKubelet` →
/// cmd/kubeadm/app/util/initsystem/initsystem_unix.go
/// `SystemdInitSystem.ServiceRestart`). Only with
/// `KUBEADM_STANDIN_INIT_SYSTEM=systemd`. kubeadm only warns when systemctl
/// fails and then times out waiting for the kubelet; the stand-in, which
/// has no kubelet to wait for, fails at once with the warning's text.
pub(crate) fn try_start_kubelet(phase: &str) -> R<()> {
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
pub(crate) fn knob(name: &str, default_ms: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_ms),
    )
}

pub(crate) fn wait_timeout() -> Duration {
    knob("KBTEST_KUBEADM_WAIT_TIMEOUT_MS", 20_000)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Go's `hex.DecodeString`, with Go's error texts.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(secs)
        .ok()
        .and_then(|ts| k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", ts).ok())
        .unwrap_or_default()
}

pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let ts: Timestamp = s.parse().ok()?;
    let secs = u64::try_from(ts.as_second()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Go's `time.ParseDuration` for the units kubeadm configs use.
pub(crate) fn parse_go_duration(s: &str) -> Result<Duration, String> {
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
pub(crate) fn check_name(kind: &str, path: &Path) -> String {
    format!("{kind}-{}", path.display().to_string().replace('/', "-"))
}

/// Refuses a real node's paths unless explicitly allowed: a test that
/// forgot to point the agent at a temp dir must fail, not wipe /etc.
pub(crate) fn guard_paths(paths: &[&Path]) -> R<()> {
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

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    pki::write_file(path, contents, mode)
}

pub(crate) fn dir_is_empty(path: &Path) -> bool {
    std::fs::read_dir(path).map_or(true, |mut d| d.next().is_none())
}

/// Removes what is inside `dir`, keeping `dir` (as kubeadm reset does).
pub(crate) fn clear_dir(dir: &Path) -> Result<(), String> {
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

pub(crate) fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A random bootstrap token or certificate key from the OS CSPRNG (UUIDv4).
pub(crate) fn random_string(alphabet: &[u8], n: usize) -> String {
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

pub(crate) fn generate_token() -> String {
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    format!("{}.{}", random_string(A, 6), random_string(A, 16))
}

pub(crate) fn generate_certificate_key() -> String {
    random_string(b"0123456789abcdef", 64)
}
