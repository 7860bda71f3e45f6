//! Shared pieces of the test-only `kubeadm` stand-in (`src/bin/kubeadm/`)
//! and what tests need to drive it.
//!
//! kubeadm cannot be installed here, so the stand-in reproduces kubeadm's
//! effects on *real* etcd processes and keeps cluster state in the
//! [`crate::kubeapi::KubeApi`] double. Its etcd members must outlive it, as
//! static Pods outlive `kubeadm`, so they are not children a
//! [`crate::process::ChildGuard`] could own. Instead the stand-in records
//! every etcd it starts in `$KBTEST_PID_DIR`, and [`StandinProcesses`] kills
//! them when the test ends (also on panic); a watchdog started with each etcd
//! kills it if the test process itself dies without unwinding
//! (`$KBTEST_OWNER_PID`).
//!
//! ## Directory rule
//!
//! kubeadm finds everything from its config: the kubernetes dir is the parent
//! of `ClusterConfiguration.certificatesDir` (init), the grandparent of
//! `JoinConfiguration.caCertPath` (join) or the parent of `--cert-dir`
//! (reset). A joining node has no `etcd.local.dataDir` in its config, so its
//! etcd data dir comes from [`etcd_data_dir_for`].

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::process::pid_alive;

/// Directory where the stand-in records the etcd processes it starts: one
/// file per pid, named by the pid, holding the member's data dir.
pub const PID_DIR_ENV: &str = "KBTEST_PID_DIR";

/// Pid of the process owning the test: when it dies, a watchdog kills the
/// stand-in's etcd members (crash safety beyond unwinding).
pub const OWNER_PID_ENV: &str = "KBTEST_OWNER_PID";

/// File to which the stand-in appends one line per invocation:
/// `<unix ms> <pid> <argv without secrets> exit=<code>`.
pub const LOG_ENV: &str = "KBTEST_KUBEADM_LOG";

/// Overrides the stand-in binary's path (default: `<target>/debug/kubeadm`).
pub const BIN_ENV: &str = "KBTEST_KUBEADM_BIN";

/// Lets the stand-in act on `/etc/kubernetes` and `/var/lib/etcd`, which it
/// refuses by default so a misconfigured test can never touch a real node.
pub const ALLOW_SYSTEM_PATHS_ENV: &str = "KBTEST_STANDIN_ALLOW_SYSTEM_PATHS";

/// Sub-directory of the kubernetes dir where the stand-in keeps what kubeadm
/// would leave to the kubelet and container runtime (etcd's pid and log).
pub const STATE_DIR: &str = "standin";

/// The etcd data dir of a node that joins (and so never saw
/// `etcd.local.dataDir`): `<node>/var/lib/etcd` when the kubernetes dir is
/// `<node>/etc/kubernetes` — the layout of a real node and of the agent's
/// tests — and `<kubernetes dir>/etcd-data` otherwise.
pub fn etcd_data_dir_for(kubernetes_dir: &Path) -> PathBuf {
    if kubernetes_dir.ends_with("etc/kubernetes") {
        if let Some(node) = kubernetes_dir.parent().and_then(Path::parent) {
            return node.join("var/lib/etcd");
        }
    }
    kubernetes_dir.join("etcd-data")
}

/// Path of the stand-in binary, built by `cargo build --bins` next to the
/// test executables. Panics with the fix if it is missing.
pub fn kubeadm_bin() -> PathBuf {
    let path = match std::env::var_os(BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => crate::workspace::target_debug_dir().join("kubeadm"),
    };
    assert!(
        path.is_file(),
        "kubeadm stand-in not found at {}: run `cargo build -p kubeboot-tests --bins` first",
        path.display()
    );
    path
}

/// Records that the stand-in started etcd `pid` for `data_dir`, in
/// `$KBTEST_PID_DIR` if set.
pub fn record_pid(pid: u32, data_dir: &Path) -> std::io::Result<()> {
    let Some(dir) = std::env::var_os(PID_DIR_ENV) else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(pid.to_string()),
        data_dir.as_os_str().as_encoded_bytes(),
    )
}

/// Forgets a recorded pid (after the stand-in stopped it itself).
pub fn forget_pid(pid: u32) {
    if let Some(dir) = std::env::var_os(PID_DIR_ENV) {
        let _ = std::fs::remove_file(PathBuf::from(dir).join(pid.to_string()));
    }
}

/// Whether `pid` is a live etcd whose command line names `data_dir`, so a
/// recycled pid is never signalled.
pub fn is_etcd_for(pid: u32, data_dir: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let Some(program) = args.first() else {
        return false;
    };
    if !Path::new(OsStr::from_bytes(program)).ends_with("etcd") {
        return false;
    }
    let dir = data_dir.as_os_str().as_bytes();
    let mut flag = b"--data-dir=".to_vec();
    flag.extend_from_slice(dir);
    args.contains(&flag.as_slice())
        || args
            .windows(2)
            .any(|w| w[0] == b"--data-dir" && w[1] == dir)
}

/// Every live etcd whose command line names `data_dir`, found by scanning
/// `/proc` (what `kubeadm reset` achieves by removing the node's containers).
pub fn etcd_pids_for(data_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_etcd_for(*pid, data_dir))
        .collect()
}

/// Stops processes (each the leader of its own process group): SIGTERM,
/// up to `grace` for all of them to exit, then SIGKILL. Returns those that
/// were alive. The caller need not be their parent.
pub fn stop_groups(pids: &[u32], grace: Duration) -> Vec<u32> {
    let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    let signal = |pid: u32, sig: Signal| {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = killpg(Pid::from_raw(raw), sig);
        }
    };
    for pid in &alive {
        signal(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && alive.iter().any(|p| pid_alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in &alive {
        if pid_alive(*pid) {
            signal(*pid, Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && alive.iter().any(|p| pid_alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    alive
}

/// Kills every etcd recorded in `dir` (skipping recycled pids) and deletes
/// the records. Returns the pids that were still running.
pub fn kill_recorded(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let data_dir = std::fs::read(&path)
            .map(|b| PathBuf::from(OsStr::from_bytes(&b)))
            .unwrap_or_default();
        if is_etcd_for(pid, &data_dir) {
            pids.push(pid);
        }
        let _ = std::fs::remove_file(&path);
    }
    // The data is discarded: no need for a graceful stop.
    stop_groups(&pids, Duration::from_millis(300))
}

/// Owns everything the stand-in starts during one test: pass [`Self::envs`]
/// to every `kubeadm` (or agent) command; on drop, every recorded etcd is
/// killed — also during a panic's unwind.
#[derive(Debug)]
pub struct StandinProcesses {
    dir: tempfile::TempDir,
}

impl StandinProcesses {
    /// A fresh, empty pid directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("kbtest-pids-")
                .tempdir()
                .expect("create temp dir for stand-in pids"),
        }
    }

    /// The pid directory (`$KBTEST_PID_DIR`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment for the stand-in: the pid directory and this process as
    /// the owner whose death stops the etcd members.
    pub fn envs(&self) -> Vec<(&'static str, OsString)> {
        vec![
            (PID_DIR_ENV, self.dir.path().as_os_str().to_owned()),
            (OWNER_PID_ENV, std::process::id().to_string().into()),
        ]
    }

    /// Pids recorded and still running etcd.
    pub fn live_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
                let data_dir = PathBuf::from(OsStr::from_bytes(&std::fs::read(e.path()).ok()?));
                is_etcd_for(pid, &data_dir).then_some(pid)
            })
            .collect()
    }

    /// Kills every recorded etcd now; returns those that were running.
    pub fn kill_all(&self) -> Vec<u32> {
        kill_recorded(self.dir.path())
    }
}

impl Default for StandinProcesses {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StandinProcesses {
    fn drop(&mut self) {
        kill_recorded(self.dir.path());
    }
}

/// One line of `$KBTEST_KUBEADM_LOG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Wall clock of the end of the run, in Unix milliseconds.
    pub unix_ms: u128,
    /// Pid of the stand-in process.
    pub pid: u32,
    /// Arguments, secrets replaced by `<redacted>`.
    pub args: Vec<String>,
    /// Exit code.
    pub exit: i32,
}

impl Invocation {
    /// The subcommand path, e.g. `init`, `join`, `token create`.
    pub fn command(&self) -> String {
        self.args
            .iter()
            .take_while(|a| {
                !a.starts_with('-') && a.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Parses a `$KBTEST_KUBEADM_LOG` file (missing file: no invocations), so
/// tests can count `init`s across every node of a scenario.
pub fn invocations(log: &Path) -> Vec<Invocation> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut words: Vec<&str> = line.split(' ').collect();
            let exit = words.pop()?.strip_prefix("exit=")?.parse().ok()?;
            let unix_ms = words.first()?.parse().ok()?;
            let pid = words.get(1)?.parse().ok()?;
            Some(Invocation {
                unix_ms,
                pid,
                args: words[2..].iter().map(|s| s.to_string()).collect(),
                exit,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_nodes_find_etcd_data_next_to_their_kubernetes_dir() {
        assert_eq!(
            etcd_data_dir_for(Path::new("/tmp/n1/etc/kubernetes")),
            PathBuf::from("/tmp/n1/var/lib/etcd")
        );
        assert_eq!(
            etcd_data_dir_for(Path::new("/etc/kubernetes")),
            PathBuf::from("/var/lib/etcd")
        );
        assert_eq!(
            etcd_data_dir_for(Path::new("/tmp/k8s")),
            PathBuf::from("/tmp/k8s/etcd-data")
        );
    }

    #[test]
    fn invocation_lines_parse() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "1700000000000 42 init --config /x --upload-certs exit=0\n1700000000001 43 token create <redacted> exit=1\n").unwrap();
        let inv = invocations(&log);
        assert_eq!(inv.len(), 2);
        assert_eq!(inv[0].command(), "init");
        assert_eq!(inv[0].exit, 0);
        assert_eq!(inv[1].command(), "token create");
        assert_eq!(inv[1].exit, 1);
    }
}
