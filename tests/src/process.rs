//! Ownership of the OS processes a test starts.
//!
//! A test that leaves an `etcd` or `moto_server` behind poisons every later
//! test (ports taken, stale members answering), so each child is wrapped in a
//! [`ChildGuard`] that kills its whole process group on drop — including
//! during a panic unwind — and reaps it so no zombie is left.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Default time a process gets to exit after SIGTERM before it is SIGKILLed.
///
/// Short on purpose: tests must not stall on slow shutdowns (the last etcd
/// member of a cluster can take ~10 s to give up on SIGTERM).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// How often exit is polled while waiting out a grace period.
const POLL: Duration = Duration::from_millis(20);

/// A child process that is guaranteed not to outlive its guard.
///
/// The child runs in its own process group (so the whole tree can be
/// signalled at once and a terminal Ctrl-C does not race the guard), with
/// `PR_SET_PDEATHSIG = SIGKILL` as a backstop should the test process itself
/// die without unwinding. Its stdout and stderr go to a log file whose tail a
/// failing test can print with [`ChildGuard::log_tail`].
///
/// Note: the parent-death signal fires when the *thread* that spawned the
/// child exits, so spawn from a thread that lives as long as the child is
/// needed (the test thread or a runtime worker, not a `spawn_blocking` one).
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    pid: u32,
    log_path: PathBuf,
    grace: Duration,
    reaped: bool,
}

impl ChildGuard {
    /// Spawns `cmd` with output appended to `log_path`; `name` labels errors.
    ///
    /// Stdin is `/dev/null` so a child can never block the test on input.
    pub fn spawn(
        name: impl Into<String>,
        mut cmd: Command,
        log_path: impl Into<PathBuf>,
    ) -> std::io::Result<Self> {
        let name = name.into();
        let log_path = log_path.into();
        let log = File::options().create(true).append(true).open(&log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let parent = nix::unistd::getpid();
        // SAFETY: the closure only makes async-signal-safe syscalls (prctl,
        // getppid) and allocates nothing, as required between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid() != parent {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok(Self {
            name,
            child,
            pid,
            log_path,
            grace: DEFAULT_GRACE,
            reaped: false,
        })
    }

    /// Sets the SIGTERM grace used on drop, for processes known to need more
    /// (or less) time to shut down cleanly.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Label given at spawn time, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// OS process id, also the id of its process group; tests record it to
    /// prove later that the process is gone (see [`pid_alive`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the file receiving the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Last `n` lines of the child's output, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// Whether the child is still running (an exited child is reaped here).
    pub fn is_running(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        match self.child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) | Err(_) => {
                self.reaped = true;
                false
            }
        }
    }

    /// SIGKILLs the process group now and reaps the child: the "node lost
    /// power" case, and the last resort of every shutdown.
    pub fn kill(&mut self) {
        self.terminate(Duration::ZERO);
    }

    /// SIGTERMs the process group, waits up to `grace` for the child to exit,
    /// then SIGKILLs the group and reaps the child.
    ///
    /// The group is SIGKILLed even when the child exited in time, so helper
    /// processes it forked die too; this happens before reaping, while the
    /// unreaped child still pins its pid and process-group id, so the signal
    /// can never hit an unrelated process that reused the id.
    pub fn terminate(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        if !grace.is_zero() {
            self.signal_group(Signal::SIGTERM);
            self.wait_exited(grace);
        }
        self.signal_group(Signal::SIGKILL);
        // Reap; SIGKILL cannot be ignored so this returns promptly.
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Sends `sig` to the child's process group (errors mean it is gone).
    fn signal_group(&self, sig: Signal) {
        if !self.reaped {
            let _ = killpg(self.nix_pid(), sig);
        }
    }

    /// Polls without reaping until the child has exited or `grace` elapsed.
    fn wait_exited(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if self.has_exited_unreaped() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// `waitid(WNOWAIT)`: observes exit but leaves the zombie in place so the
    /// pid stays reserved until [`ChildGuard::terminate`] reaps it.
    fn has_exited_unreaped(&self) -> bool {
        if self.reaped {
            return true;
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(
            waitid(Id::Pid(self.nix_pid()), flags),
            Ok(WaitStatus::StillAlive)
        )
    }

    /// The child's pid, which is also its process-group id.
    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).expect("pid fits in i32"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(self.grace);
    }
}

/// Stops many children with one shared grace period instead of one each:
/// SIGTERM to all, wait until all exited or `grace` elapsed, then SIGKILL and
/// reap. Keeps teardown of an N-member cluster at `grace`, not `N × grace`.
pub fn terminate_all<'a>(guards: impl IntoIterator<Item = &'a mut ChildGuard>, grace: Duration) {
    let mut guards: Vec<&mut ChildGuard> = guards.into_iter().filter(|g| !g.reaped).collect();
    if !grace.is_zero() {
        for g in &guards {
            g.signal_group(Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !guards.iter().all(|g| g.has_exited_unreaped()) {
            std::thread::sleep(POLL);
        }
    }
    for g in &mut guards {
        g.kill();
    }
}

/// Whether `pid` names a live (non-zombie) process, so tests can assert that
/// nothing they started survived.
///
/// `kill(pid, 0)` alone is not enough: an exited but unreaped child still
/// "exists", so `/proc/<pid>/stat` is checked for the zombie/dead states.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match kill(Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ...": comm may contain spaces and parens, so the
    // state is the first field after the *last* ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | Some("x") | None)
}

/// Last `n` lines of a log file (at most the last 64 KiB are read), or a note
/// saying why it could not be read; used in harness panic messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Whether process `pid` itself holds a listening TCP socket on
/// 127.0.0.1:`port` (its `/proc/<pid>/fd` socket inodes against
/// `/proc/net/tcp`'s LISTEN rows). A server that answers on a port is not
/// necessarily the one a test started: when two tests draw the same free
/// port, the second server fails to bind and exits while the first one
/// answers for it, until its own test ends.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: std::collections::BTreeSet<String> = fds
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().to_string();
            t.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // local_address is "0100007F:PORT" (hex), st 0A is LISTEN, inode is field 9.
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|row| {
        let f: Vec<&str> = row.split_whitespace().collect();
        f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A" && inodes.contains(f[9])
    })
}

#[cfg(test)]
mod tests {
    use super::listens_on;

    #[test]
    fn a_listener_is_found_on_its_own_process_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(listens_on(std::process::id(), port));
        // Not another process's, not another port.
        assert!(!listens_on(1, port) || std::process::id() == 1);
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }
}
