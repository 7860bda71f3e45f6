//! systemd's side of the agent, seen from the notify socket: bootstrap and
//! the daemon say READY=1; the daemon pings the watchdog while its loops make
//! progress, and trips it (and stops pinging) when a loop hangs.

use kubeboot_tests::simcluster::{read_stderr, tail, SimCluster};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

/// One notification datagram.
struct Note {
    text: String,
}

/// Reads notifications for `window`, or until `stop` matches one.
async fn listen(socket: &UnixDatagram, window: Duration, stop: impl Fn(&str) -> bool) -> Vec<Note> {
    let deadline = Instant::now() + window;
    let mut notes = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = stop(&text);
                notes.push(Note { text });
                if done {
                    break;
                }
            }
            _ => break,
        }
    }
    notes
}

fn count(notes: &[Note], line: &str) -> usize {
    notes
        .iter()
        .filter(|n| n.text.lines().any(|l| l == line))
        .count()
}

fn bind(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    (socket, path.display().to_string())
}

async fn sigterm(mut child: tokio::process::Child, sim: &SimCluster) -> String {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let stderr = read_stderr(&mut child).await;
    sim.record_output(&stderr);
    stderr
}

/// Bootstraps the first node with systemd's notify socket at `path`: its
/// exit code and stderr.
async fn bootstrap(sim: &SimCluster, path: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = sim
        .bootstrap_command(&sim.nodes[0])
        .env("NOTIFY_SOCKET", path)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("bootstrap");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stderr);
    (out.status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_says_ready_and_a_hung_daemon_loop_trips_the_watchdog() {
    let sim = SimCluster::start(1, 0).await;
    let dir = tempfile::tempdir().expect("dir");
    let (socket, path) = bind(dir.path());

    // Bootstrap: READY=1 once the node is bootstrapped, with the path.
    let (code, stderr) = bootstrap(&sim, &path, &[]).await;
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    let notes = listen(&socket, Duration::from_secs(2), |t| t.contains("READY=1")).await;
    let ready = notes
        .iter()
        .find(|n| n.text.contains("READY=1"))
        .expect("bootstrap said READY=1");
    assert!(
        ready.text.contains("STATUS=bootstrapped (init)"),
        "{}",
        ready.text
    );

    let daemon = |stall: Option<&str>| {
        let mut cmd = sim.daemon_command(&sim.nodes[0]);
        cmd.env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "1000000")
            .env("KUBEBOOT_DAEMON_WATCHDOG_STALL", "6s")
            .env("KUBEBOOT_TIMEOUTS_DRAIN", "5s")
            .stderr(Stdio::piped());
        if let Some(point) = stall {
            cmd.env("KBTEST_STALL_AT", point);
        }
        cmd.spawn().expect("daemon")
    };

    // A healthy daemon: READY=1, then pings every half interval and no trip,
    // well past the stall limit.
    let healthy = daemon(None);
    let notes = listen(&socket, Duration::from_secs(9), |_| false).await;
    let stderr = sigterm(healthy, &sim).await;
    assert_eq!(count(&notes, "READY=1"), 1, "{}", tail(&stderr));
    assert!(
        count(&notes, "WATCHDOG=1") >= 10,
        "pings while healthy: {}",
        count(&notes, "WATCHDOG=1")
    );
    assert_eq!(count(&notes, "WATCHDOG=trigger"), 0, "{}", tail(&stderr));
    assert!(
        notes
            .iter()
            .any(|n| n.text.contains("STATUS=leader: etcd 1/1 healthy")),
        "the health monitor's status line reached systemd"
    );

    // The leader's turn hangs: pings go on until the loop overruns its
    // allowance (stall + period), then the watchdog trips and pings stop.
    let hung = daemon(Some("daemon:leader-turn"));
    let notes = listen(&socket, Duration::from_secs(30), |t| {
        t.contains("WATCHDOG=trigger")
    })
    .await;
    let trip = notes
        .iter()
        .find(|n| n.text.contains("WATCHDOG=trigger"))
        .expect("the watchdog tripped");
    assert!(trip.text.contains("STATUS=stuck: leader"), "{}", trip.text);
    assert!(
        count(&notes, "WATCHDOG=1") >= 3,
        "pinged before the hang showed"
    );
    let after = listen(&socket, Duration::from_secs(3), |_| false).await;
    assert_eq!(
        count(&after, "WATCHDOG=1"),
        0,
        "no ping after the trip, so systemd restarts the unit even if trigger were lost"
    );
    let stderr = sigterm(hung, &sim).await;
    assert!(
        stderr.contains("daemon loop stuck; tripping the watchdog"),
        "{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_bootstrap_tells_systemd_why_with_its_code_and_never_says_ready() {
    let sim = SimCluster::start(1, 0).await;
    let dir = tempfile::tempdir().expect("dir");
    let (socket, path) = bind(dir.path());

    // kubeadm exits 1 without a word: the node cannot bootstrap.
    let (code, stderr) =
        bootstrap(&sim, &path, &[("KUBEBOOT_BINARIES_KUBEADM", "/bin/false")]).await;
    assert_ne!(code, Some(0), "{}", tail(&stderr));
    let logged = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["code"].as_str().map(str::to_string))
        .next_back()
        .unwrap_or_else(|| panic!("the failure is logged with its code: {}", tail(&stderr)));

    // systemd shows the same code the log has, so `systemctl status` leads
    // straight to `kubeboot explain`; and the unit never became ready.
    // The process has exited: read every notification it sent.
    let notes = listen(&socket, Duration::from_secs(1), |_| false).await;
    assert_eq!(count(&notes, "STATUS=bootstrapping"), 1);
    assert_eq!(count(&notes, "READY=1"), 0);
    let failed = notes
        .iter()
        .find(|n| n.text.contains("STATUS=bootstrap failed"))
        .unwrap_or_else(|| panic!("a failure STATUS line: {}", tail(&stderr)));
    assert!(
        failed.text.contains(&format!("[{logged}]")),
        "{} (logged {logged})",
        failed.text
    );
    assert!(logged.starts_with("KB-KUBEADM-"), "{logged}");
}

/// The code on the agent's last error line.
fn last_code(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["code"].as_str().map(str::to_string))
        .next_back()
        .unwrap_or_else(|| panic!("no error line with a code: {}", tail(stderr)))
}

/// `systemctl stop` (SIGTERM to the main process, KillMode=mixed) while
/// kubeadm runs. Before: tokio's default left SIGTERM fatal, the agent died
/// at once and kubeadm ran on until systemd's final SIGKILL, mid-phase. Now
/// kubeadm is sent SIGTERM first, the step fails with KB-KUBEADM-005, the
/// init lock is released (the next start does not wait out a lease), and
/// systemd hears STOPPING=1.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_bootstrap_stops_kubeadm_first_and_releases_its_lock() {
    let sim = SimCluster::start(1, 0).await;
    let dir = tempfile::tempdir().expect("dir");
    let (socket, path) = bind(dir.path());
    let started_marker = dir.path().join("kubeadm-started");
    let term_marker = dir.path().join("kubeadm-got-sigterm");
    let fake = dir.path().join("kubeadm");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1\" = version ] && {{ echo v1.31.2; exit 0; }}\n\
             trap 'echo yes > {}; exit 143' TERM\necho started > {}\n\
             echo '[init] Using Kubernetes version: v1.31.2'\nsleep 120 >/dev/null 2>&1 &\nwait\n",
            term_marker.display(),
            started_marker.display()
        ),
    )
    .expect("fake kubeadm");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let child = sim
        .bootstrap_command(&sim.nodes[0])
        .env("NOTIFY_SOCKET", &path)
        .env("KUBEBOOT_BINARIES_KUBEADM", &fake)
        .stderr(Stdio::piped())
        .spawn()
        .expect("bootstrap");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started_marker.exists() {
        assert!(Instant::now() < deadline, "kubeadm never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = Instant::now();
    let stderr = sigterm(child, &sim).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "stopped in {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&term_marker)
            .unwrap_or_default()
            .trim(),
        "yes",
        "kubeadm got SIGTERM: {}",
        tail(&stderr)
    );
    assert_eq!(last_code(&stderr), "KB-KUBEADM-005");
    let notes = listen(&socket, Duration::from_secs(1), |_| false).await;
    assert_eq!(count(&notes, "STOPPING=1"), 1);
    assert_eq!(count(&notes, "READY=1"), 0);

    // The init lock was released, not left to expire.
    let free = sim
        .locker("i-harness")
        .await
        .try_acquire(kubeboot::lock::Purpose::Init)
        .await
        .expect("lock store");
    assert!(
        free.is_some(),
        "the stopped bootstrap left the init lock held"
    );
    if let Some(g) = free {
        g.release().await.expect("release");
    }
    // The next start resets the unfinished attempt and initializes.
    let runs = sim.bootstrap(&[0]).await;
    assert_eq!(runs[0].code, Some(0), "{}", tail(&runs[0].stderr));
    assert_eq!(sim.kubeadm_runs("reset", Some(0)).len(), 1, "reset first");
}

/// SIGTERM while a worker waits for join material (no kubeadm running):
/// the wait is abandoned at once with KB-BOOT-004.
#[tokio::test(flavor = "multi_thread")]
async fn a_bootstrap_stopped_while_waiting_ends_at_once_with_its_code() {
    let sim = SimCluster::start(0, 1).await;
    let child = sim
        .bootstrap_command(&sim.nodes[0])
        .stderr(Stdio::piped())
        .spawn()
        .expect("bootstrap");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopping = Instant::now();
    let stderr = sigterm(child, &sim).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        stopping.elapsed()
    );
    assert_eq!(last_code(&stderr), "KB-BOOT-004", "{}", tail(&stderr));
}
