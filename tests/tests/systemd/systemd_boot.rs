//! The repo's units under real systemd (PID 1 of a throwaway machine, see
//! `kubeboot_tests::machine`): ordering against the kubelet that kubeadm
//! restarts, configuration errors, the daemon's watchdog, and a worker's
//! bootstrap end to end. Needs root, like the machine.

use kubeboot_tests::machine::{Machine, Options};
use kubeboot_tests::process::pid_alive;
use kubeboot_tests::simcluster::{assert_ok, tail, SimCluster};
use kubeboot_tests::standin;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BOOTSTRAP: &str = "kubeboot-bootstrap.service";
const DAEMON: &str = "kubeboot.service";
/// Where the machine sees the simulated cluster's directory (not under
/// /tmp: the units have PrivateTmp=yes).
pub(crate) const GUEST_SIM: &str = "/var/lib/kbtest-sim";

/// Node `index`'s config as the machine needs it at
/// /etc/kubeboot/config.toml: the kubeadm stand-in at /usr/bin/kubeadm, the
/// sim's directory at [`GUEST_SIM`], and with `node_paths` the node's own
/// directories where a real node has them (inside the machine's overlay).
fn machine_config(sim: &SimCluster, index: usize, node_paths: bool) -> String {
    let node = &sim.nodes[index];
    let mut text = std::fs::read_to_string(&node.config).expect("node config");
    text = text.replace(
        &standin::kubeadm_bin().display().to_string(),
        "/usr/bin/kubeadm",
    );
    if node_paths {
        let d = node.dir.display().to_string();
        for path in [
            "/etc/kubernetes",
            "/var/lib/kubeboot",
            "/run/kubeboot",
            "/var/lib/etcd",
        ] {
            text = text.replace(&format!("\"{d}{path}\""), &format!("\"{path}\""));
        }
    }
    text.replace(&sim.work.path().display().to_string(), GUEST_SIM)
}

/// A machine that can see the sim's directory, with `config` installed.
fn sim_machine(sim: &SimCluster, config: &str) -> Machine {
    let machine = Machine::boot(Options::node().bind_rw(sim.work.path(), GUEST_SIM));
    machine.write_file("/etc/kubeboot/config.toml", config.as_bytes(), 0o600);
    machine
}

/// A machine for node `index` with its own directories bound at a node's
/// paths (`/etc/kubernetes`, `/var/lib/kubeboot`, `/var/lib/etcd`; the
/// harness reads its PKI and etcd through them) and the sim's directory,
/// its config installed with those paths.
fn node_machine(sim: &SimCluster, index: usize) -> Machine {
    use std::os::unix::fs::PermissionsExt as _;
    let node = &sim.nodes[index];
    let mut options = Options::node().bind_rw(sim.work.path(), GUEST_SIM);
    for path in ["/etc/kubernetes", "/var/lib/kubeboot", "/var/lib/etcd"] {
        let host = node.dir.join(&path[1..]);
        std::fs::create_dir_all(&host).expect("node dir");
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o700))
            .expect("node dir mode");
        options = options.bind_rw(host, path);
    }
    let machine = Machine::boot(options);
    machine.write_file(
        "/etc/kubeboot/config.toml",
        machine_config(sim, index, true).as_bytes(),
        0o600,
    );
    machine
}

/// Installs both repo units with the drop-ins a control plane's test
/// needs: the stand-in's knobs (system paths allowed), and for the daemon
/// a one-second period.
fn install_control_plane_units(machine: &Machine, sim: &SimCluster) {
    let standin = format!(
        "{}Environment={}=1\n",
        standin_environment(sim),
        standin::ALLOW_SYSTEM_PATHS_ENV
    );
    install_units(machine, &standin, "");
}

/// Installs both repo units with the test's drop-ins: `standin` (the
/// stand-in's knobs) for both, and for the daemon a one-second period,
/// a quick restart and `daemon_extra`.
fn install_units(machine: &Machine, standin: &str, daemon_extra: &str) {
    machine.install_repo_unit(BOOTSTRAP);
    machine.install_repo_unit(DAEMON);
    machine.install_drop_in(BOOTSTRAP, "test", &format!("[Service]\n{standin}"));
    machine.install_drop_in(
        DAEMON,
        "test",
        &format!(
            "[Service]\nRestartSec=1s\n{standin}\
             Environment=KUBEBOOT_DAEMON_PERIOD=1s KUBEBOOT_DAEMON_JITTER=0s\n{daemon_extra}"
        ),
    );
}

/// Waits (two minutes at most) until the bootstrap unit is `settled`,
/// records its journal for the cluster's scans, and returns how long that
/// took and the journal; panics with the unit's state if it never settles.
pub(crate) fn bootstrap_settles(
    machine: &Machine,
    sim: &SimCluster,
    settled: impl Fn(&str, &str) -> bool,
) -> (Duration, String) {
    let waited = machine.wait_until(BOOTSTRAP, Duration::from_secs(120), settled);
    let journal = machine.journal(BOOTSTRAP);
    sim.record_output(&journal);
    let took = waited.unwrap_or_else(|(active, sub)| {
        panic!(
            "{BOOTSTRAP} is {active}/{sub}:\n{}",
            machine.report(BOOTSTRAP)
        )
    });
    (took, journal)
}

/// Waits for the bootstrap unit to settle and requires it active (with
/// both its and the kubelet's state otherwise): how long it took, and its
/// journal.
pub(crate) fn bootstrap_becomes_active(machine: &Machine, sim: &SimCluster) -> (Duration, String) {
    let (took, journal) = bootstrap_settles(machine, sim, |active, _| {
        active == "active" || active == "failed"
    });
    assert_eq!(
        machine.show(BOOTSTRAP, "ActiveState"),
        "active",
        "{}\n{}",
        machine.report(BOOTSTRAP),
        machine.report("kubelet.service")
    );
    (took, journal)
}

/// Waits for the bootstrap unit to settle (active or failed) and the
/// daemon to lead; panics with both units' state otherwise. Returns how
/// long bootstrap took.
fn wait_bootstrapped_and_leading(machine: &Machine, sim: &SimCluster) -> Duration {
    let (took, _) = bootstrap_settles(machine, sim, |active, sub| {
        active == "failed" || (active == "active" && sub == "exited")
    });
    assert_eq!(
        machine.show(BOOTSTRAP, "ActiveState"),
        "active",
        "{}",
        machine.report(BOOTSTRAP)
    );
    let leading = machine.wait_until(DAEMON, Duration::from_secs(60), |active, _| {
        active == "failed"
            || (active == "active"
                && machine
                    .show(DAEMON, "StatusText")
                    .starts_with("leader: etcd"))
    });
    sim.record_output(&machine.journal(DAEMON));
    if let Err((active, sub)) = leading {
        panic!("{DAEMON} is {active}/{sub}:\n{}", machine.report(DAEMON));
    }
    took
}

/// The machine's etcd (started by kubeadm): its pid inside the machine
/// and its cgroup there, or why not.
fn local_etcd(machine: &Machine) -> Result<(String, String), String> {
    let pid = machine
        .read_file("/etc/kubernetes/standin/etcd.pid")
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .ok_or("no etcd.pid")?;
    let cgroup = machine
        .read_file(&format!("/proc/{pid}/cgroup"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .ok_or_else(|| format!("etcd {pid} is not running"))?;
    let comm = machine
        .read_file(&format!("/proc/{pid}/comm"))
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if comm != "etcd" {
        return Err(format!("pid {pid} is {comm:?}, not etcd"));
    }
    let unit = cgroup
        .lines()
        .find(|l| l.contains("name=systemd") || l.starts_with("0::"))
        .and_then(|l| l.rsplit(':').next())
        .unwrap_or("")
        .to_string();
    Ok((pid, unit))
}

/// "Restarts" the node as far as the units go: both stopped, then started
/// again as at boot; waits until bootstrap has run again.
fn restart_units(machine: &Machine) {
    let before: Vec<String> = [BOOTSTRAP, DAEMON]
        .iter()
        .map(|u| machine.show(u, "InvocationID"))
        .collect();
    machine.systemctl_ok(&["stop", DAEMON, BOOTSTRAP]);
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP, DAEMON]);
    for (unit, before) in [BOOTSTRAP, DAEMON].iter().zip(before) {
        machine
            .wait_until(unit, Duration::from_secs(60), |_, _| {
                machine.show(unit, "InvocationID") != before
            })
            .unwrap_or_else(|(active, sub)| panic!("{unit} not started again: {active}/{sub}"));
    }
}

/// Polls `unit`'s journal until it holds `needle` `times` times; whether it
/// did within `timeout`.
fn wait_journal(
    machine: &Machine,
    unit: &str,
    needle: &str,
    times: usize,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if machine.journal(unit).matches(needle).count() >= times {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Etcd's members as the harness sees them: every one started and voting.
async fn assert_voters(sim: &SimCluster, through: &[usize], count: usize) -> Vec<u64> {
    let members = sim.etcd_members(through).await;
    assert_eq!(members.len(), count, "{members:?}");
    assert!(
        members.iter().all(|m| m.is_started() && !m.is_learner),
        "{members:?}"
    );
    let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    ids
}

/// The stand-in's knobs for a unit, as a drop-in's `[Service]` lines.
pub(crate) fn standin_environment(sim: &SimCluster) -> String {
    let log = sim
        .kubeadm_log
        .display()
        .to_string()
        .replace(&sim.work.path().display().to_string(), GUEST_SIM);
    format!(
        "Environment=KUBEADM_STANDIN_INIT_SYSTEM=systemd\n\
         Environment={}={log}\n",
        standin::LOG_ENV
    )
}

fn mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .map(str::to_string)
        .collect()
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{name}")).unwrap_or_default()
}

/// The unit file with its `ExecStart` replaced, everything else as shipped.
fn with_exec_start(unit: &str, exec: &str) -> String {
    let path = kubeboot_tests::workspace::workspace_root()
        .join("systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).expect("unit file");
    let mut replaced = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                replaced += 1;
                format!("ExecStart={exec}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(replaced, 1, "{unit} has one ExecStart");
    out.join("\n") + "\n"
}

#[test]
fn a_machine_boots_and_leaves_nothing_behind_on_the_host() {
    let host_canary = tempfile::Builder::new()
        .prefix("kbtest-canary-")
        .tempfile_in("/tmp")
        .expect("canary in /tmp");
    let target = kubeboot_tests::workspace::target_debug_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    let target_canary = tempfile::Builder::new()
        .prefix("kbtest-canary-")
        .tempfile_in(&target)
        .expect("canary in the target dir");
    let mounts_before = mounts();
    let sysctls = ["fs/nr_open", "fs/file-max", "net/unix/max_dgram_qlen"];
    let sysctls_before: Vec<String> = sysctls.iter().map(|s| sysctl(s)).collect();

    let machine = Machine::boot(Options::node());
    let (pid1, unshare, cgroups) = (
        machine.pid1(),
        machine.unshare_pid(),
        machine.cgroups().to_vec(),
    );
    assert!(
        machine.booted_in() < Duration::from_secs(20),
        "boot took {:?}",
        machine.booted_in()
    );
    assert_eq!(
        machine.show("kubelet.service", "ActiveState"),
        "active",
        "{}",
        machine.report("kubelet.service")
    );
    // Inside, the host's /tmp is not there, and what the machine deletes or
    // writes anywhere stays inside.
    let host_tmp = host_canary.path().display().to_string();
    assert!(
        machine.read_file(&host_tmp).is_none(),
        "host /tmp is hidden"
    );
    let target_path = target_canary.path().display().to_string();
    let rm = machine.exec(&[
        "sh",
        "-c",
        "rm -rf /tmp/* \"$1\"; : > /etc/kbtest-written",
        "rm",
        &target_path,
    ]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(!PathBuf::from("/etc/kbtest-written").exists());
    // systemd raises these on a host; the machine cannot.
    let write = machine.exec(&["sh", "-c", "echo 1048576 > /proc/sys/fs/nr_open"]);
    assert!(!write.status.success(), "/proc/sys is read-only inside");
    drop(machine);

    assert!(host_canary.path().exists(), "the host's /tmp survived");
    assert!(target_canary.path().exists(), "the checkout survived");
    assert!(!pid_alive(pid1), "systemd is gone");
    assert!(!pid_alive(unshare), "unshare is gone");
    for cg in &cgroups {
        assert!(!cg.exists(), "cgroup {} removed", cg.display());
    }
    assert_eq!(mounts(), mounts_before, "no mount leaked to the host");
    let sysctls_after: Vec<String> = sysctls.iter().map(|s| sysctl(s)).collect();
    assert_eq!(sysctls_after, sysctls_before, "host sysctls untouched");
}

/// kubeadm's kubelet-start runs `systemctl restart kubelet` and waits for
/// it; the bootstrap unit is Type=notify and says READY=1 only after
/// kubeadm returned. Were the unit ordered before kubelet.service, systemd
/// would hold kubelet's start job until bootstrap is up: a deadlock.
#[test]
fn bootstrap_restarting_the_kubelet_becomes_ready() {
    let machine = Machine::boot(Options::node());
    machine.write_file("/etc/kubeboot/config.toml", b"# condition only\n", 0o600);
    let kubelet_before = machine.show("kubelet.service", "InvocationID");
    machine.install_unit(
        BOOTSTRAP,
        &with_exec_start(
            BOOTSTRAP,
            "/bin/sh -c 'systemctl restart kubelet && systemd-notify --ready'",
        ),
    );
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP]);
    let waited = machine.wait_state(BOOTSTRAP, "active", Duration::from_secs(30));
    let took = waited.unwrap_or_else(|(active, sub)| {
        panic!(
            "{BOOTSTRAP} is {active}/{sub} after 30 s:\n{}\n{}",
            machine.report(BOOTSTRAP),
            machine.report("kubelet.service")
        )
    });
    eprintln!("{BOOTSTRAP} active after {took:?}");
    assert_eq!(machine.show("kubelet.service", "ActiveState"), "active");
    assert_ne!(
        machine.show("kubelet.service", "InvocationID"),
        kubelet_before,
        "the kubelet was restarted"
    );
}

/// A configuration error exits 2, which the unit does not restart.
#[test]
fn a_configuration_error_fails_the_bootstrap_unit_without_restarts() {
    let machine = Machine::boot(Options::node());
    // No user-data (IMDS is not needed to see the file is wrong).
    machine.write_file(
        "/etc/kubeboot/config.toml",
        b"[imds]\nuser_data = false\n\n[cluster]\nname = \"Not_A_Label\"\n",
        0o600,
    );
    machine.install_repo_unit(BOOTSTRAP);
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP]);
    machine
        .wait_state(BOOTSTRAP, "failed", Duration::from_secs(30))
        .unwrap_or_else(|(active, sub)| {
            panic!(
                "{BOOTSTRAP} is {active}/{sub}:\n{}",
                machine.report(BOOTSTRAP)
            )
        });
    assert_eq!(machine.show(BOOTSTRAP, "ExecMainStatus"), "2");
    assert_eq!(machine.show(BOOTSTRAP, "NRestarts"), "0");
    let journal = machine.journal(BOOTSTRAP);
    assert!(journal.contains("KB-CONFIG-"), "{}", tail(&journal));
}

/// The daemon runs under its real unit's sandbox (READY=1, the leader's
/// health in STATUS=, no restarts); when a loop then hangs it stops feeding
/// the watchdog and systemd kills and restarts it. The unit file is the
/// repo's; drop-ins only shorten the watchdog, the restart delay and the
/// daemon's period, and set the hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_runs_under_its_unit_and_systemd_restarts_it_when_a_loop_hangs() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let machine = sim_machine(&sim, &machine_config(&sim, 0, false));
    // Bootstrap already ran (outside): its checkpoint says done.
    install_units(
        &machine,
        &standin_environment(&sim),
        "WatchdogSec=3s\n\
         Environment=KUBEBOOT_DAEMON_WATCHDOG_STALL=6s KUBEBOOT_TIMEOUTS_DRAIN=5s\n",
    );
    machine.systemctl_ok(&["start", "--no-block", DAEMON]);
    let healthy = machine.wait_until(DAEMON, Duration::from_secs(60), |active, _| {
        active == "failed"
            || (active == "active"
                && machine
                    .show(DAEMON, "StatusText")
                    .starts_with("leader: etcd"))
    });
    let record = |machine: &Machine| sim.record_output(&machine.journal(DAEMON));
    if let Err((active, sub)) = healthy {
        record(&machine);
        panic!("{DAEMON} is {active}/{sub}:\n{}", machine.report(DAEMON));
    }
    assert_eq!(machine.show(BOOTSTRAP, "ActiveState"), "active");
    // Healthy turns for longer than the watchdog interval: no restart.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        machine.show(DAEMON, "ActiveState"),
        "active",
        "{}",
        machine.report(DAEMON)
    );
    assert_eq!(
        machine.show(DAEMON, "NRestarts"),
        "0",
        "{}",
        machine.report(DAEMON)
    );

    // The leader's turn hangs.
    machine.install_drop_in(
        DAEMON,
        "stall",
        "[Service]\nEnvironment=KBTEST_STALL_AT=daemon:leader-turn\n",
    );
    machine.systemctl_ok(&["restart", "--no-block", DAEMON]);
    let restarted = machine.wait_until(DAEMON, Duration::from_secs(90), |active, _| {
        active == "failed"
            || machine
                .show(DAEMON, "NRestarts")
                .parse::<u32>()
                .unwrap_or(0)
                >= 1
    });
    record(&machine);
    let journal = machine.journal(DAEMON);
    let took = restarted.unwrap_or_else(|(active, sub)| {
        panic!(
            "{DAEMON} is {active}/{sub}, never restarted:\n{}",
            machine.report(DAEMON)
        )
    });
    assert_ne!(
        machine.show(DAEMON, "NRestarts"),
        "0",
        "{}",
        machine.report(DAEMON)
    );
    eprintln!("{DAEMON} restarted by systemd {took:?} after the hang was set");
    assert!(
        journal.contains("stuck: leader"),
        "the daemon said which loop hung:\n{}",
        tail(&journal)
    );
    assert!(
        journal.contains("Watchdog request") || journal.contains("Watchdog timeout"),
        "systemd acted on the watchdog:\n{}",
        tail(&journal)
    );
}

/// A worker bootstraps under the real unit: kubeadm (the stand-in) restarts
/// the kubelet through systemd, the Node becomes Ready, the unit says
/// READY=1 and the daemon starts after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_bootstraps_under_the_real_unit() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let machine = sim_machine(&sim, &machine_config(&sim, 1, true));
    machine.install_repo_unit(BOOTSTRAP);
    machine.install_drop_in(
        BOOTSTRAP,
        "test",
        &format!(
            "[Service]\n{}Environment={}=1\n",
            standin_environment(&sim),
            standin::ALLOW_SYSTEM_PATHS_ENV
        ),
    );
    let kubelet_before = machine.show("kubelet.service", "InvocationID");
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP]);
    let (took, journal) = bootstrap_becomes_active(&machine, &sim);
    eprintln!("worker bootstrapped under systemd in {took:?}");
    assert_ne!(
        machine.show("kubelet.service", "InvocationID"),
        kubelet_before,
        "kubeadm restarted the kubelet"
    );
    assert_eq!(machine.show("kubelet.service", "ActiveState"), "active");
    // Real node paths inside the machine, written by kubeadm and the agent.
    assert!(machine.read_file("/etc/kubernetes/kubelet.conf").is_some());
    assert!(journal.contains("bootstrap complete"), "{}", tail(&journal));
}

/// The first control plane initializes the cluster under the real units:
/// kubeadm init (its etcd over https with kubeadm's PKI) restarts the
/// kubelet, the unit says READY=1 and the daemon then leads. kubeadm's etcd
/// outlives the agent's exit and the daemon's start. Then the units are
/// restarted as on a reboot: bootstrap finds its checkpoint done, nothing
/// is reset, and the same member serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_control_plane_initializes_under_the_real_units_and_a_restart_resets_nothing() {
    let sim = SimCluster::start(1, 0).await;
    let machine = node_machine(&sim, 0);
    install_control_plane_units(&machine, &sim);
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP, DAEMON]);
    let took = wait_bootstrapped_and_leading(&machine, &sim);
    eprintln!("first control plane initialized under systemd in {took:?}");
    let journal = machine.journal(BOOTSTRAP);
    assert!(
        journal.contains("cluster initialized"),
        "{}",
        tail(&journal)
    );
    assert!(journal.contains("bootstrap complete"), "{}", tail(&journal));
    // (The machine's kubeadm arguments are node paths, not the sim's: the
    // runs are counted cluster-wide.)
    assert_eq!(sim.kubeadm_runs("init", None).len(), 1);
    let etcd = local_etcd(&machine);
    eprintln!("etcd after bootstrap and the daemon's start: {etcd:?}");
    let (pid, _) = etcd.unwrap_or_else(|e| panic!("{e}\n{}", machine.report(BOOTSTRAP)));
    let members = assert_voters(&sim, &[0], 1).await;

    restart_units(&machine);
    let took = wait_bootstrapped_and_leading(&machine, &sim);
    eprintln!("restarted units active again in {took:?}");
    let journal = machine.journal(BOOTSTRAP);
    assert!(
        journal.contains("already bootstrapped; nothing to do"),
        "{}",
        tail(&journal)
    );
    let etcd = local_etcd(&machine);
    eprintln!("etcd after the units' restart: {etcd:?}");
    assert_eq!(
        etcd.map(|e| e.0),
        Ok(pid),
        "kubeadm's etcd outlives the units' restart"
    );
    assert!(sim.kubeadm_runs("reset", None).is_empty(), "no reset");
    assert_eq!(
        assert_voters(&sim, &[0], 1).await,
        members,
        "the same member"
    );
}

/// A second control plane joins the cluster (initialized by node 0 outside
/// the machine) under the real units: it downloads the certificates, its
/// etcd joins as a learner and is promoted, the unit says READY=1 and its
/// daemon leads. A restart of the units then resets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_control_plane_joins_under_the_real_units_and_a_restart_resets_nothing() {
    let sim = SimCluster::start(2, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let machine = node_machine(&sim, 1);
    install_control_plane_units(&machine, &sim);
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP, DAEMON]);
    let took = wait_bootstrapped_and_leading(&machine, &sim);
    eprintln!("second control plane joined under systemd in {took:?}");
    let journal = machine.journal(BOOTSTRAP);
    assert!(journal.contains("ControlPlaneJoin"), "{}", tail(&journal));
    assert!(journal.contains("bootstrap complete"), "{}", tail(&journal));
    assert_eq!(sim.kubeadm_runs("join", None).len(), 1);
    let members = assert_voters(&sim, &[0, 1], 2).await;
    let etcd = local_etcd(&machine);
    eprintln!("etcd after the join and the daemon's start: {etcd:?}");
    let (pid, _) = etcd.unwrap_or_else(|e| panic!("{e}\n{}", machine.report(BOOTSTRAP)));

    restart_units(&machine);
    wait_bootstrapped_and_leading(&machine, &sim);
    let journal = machine.journal(BOOTSTRAP);
    assert!(
        journal.contains("already bootstrapped; nothing to do"),
        "{}",
        tail(&journal)
    );
    assert_eq!(local_etcd(&machine).map(|e| e.0), Ok(pid));
    assert!(sim.kubeadm_runs("reset", None).is_empty(), "no reset");
    assert_eq!(assert_voters(&sim, &[0, 1], 2).await, members);
}

/// The agent dies (abort, as kill -9: no cleanup) right after `kubeadm
/// join` of a control plane returned; systemd's Restart=on-failure starts it
/// again, and it adopts the member kubeadm made instead of resetting it:
/// kubeadm's etcd outlived the crash and the unit's cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_plane_join_killed_after_kubeadm_is_converged_by_systemd_without_reset() {
    const CRASH: &str = "/etc/systemd/system/kubeboot-bootstrap.service.d/crash.conf";
    let sim = SimCluster::start(2, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let machine = node_machine(&sim, 1);
    install_control_plane_units(&machine, &sim);
    machine.install_drop_in(BOOTSTRAP, "restart", "[Service]\nRestartSec=2s\n");
    machine.install_drop_in(
        BOOTSTRAP,
        "crash",
        "[Service]\nEnvironment=KBTEST_CRASH_AT=join:after-kubeadm\n",
    );
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP]);
    // Once the agent runs (its environment fixed at exec), the crash
    // drop-in goes: systemd's restart is a plain start, however late the
    // test sees the crash.
    machine
        .wait_until(BOOTSTRAP, Duration::from_secs(60), |active, _| {
            active != "inactive" && machine.show(BOOTSTRAP, "ExecMainPID") != "0"
        })
        .unwrap_or_else(|(active, sub)| panic!("{BOOTSTRAP} did not start: {active}/{sub}"));
    let rm = machine.exec(&["rm", CRASH]);
    assert!(rm.status.success(), "{rm:?}");
    machine.systemctl_ok(&["daemon-reload"]);
    bootstrap_settles(&machine, &sim, |active, _| {
        active == "failed" || machine.show(BOOTSTRAP, "NRestarts") != "0"
    });
    let after_crash = local_etcd(&machine);
    eprintln!("crashed and restarted by systemd; etcd: {after_crash:?}");
    machine.systemctl_ok(&["start", "--no-block", DAEMON]);
    let took = wait_bootstrapped_and_leading(&machine, &sim);
    eprintln!("converged by systemd's restart in {took:?}");
    let journal = machine.journal(BOOTSTRAP);
    // systemd saw the abort and restarted the unit once.
    for seen in [
        "crashing on purpose",
        "status=6/ABRT",
        "Scheduled restart job",
    ] {
        assert!(journal.contains(seen), "{seen}:\n{}", tail(&journal));
    }
    assert!(
        journal.contains("its member is adopted"),
        "{}",
        tail(&journal)
    );
    assert_eq!(machine.show(BOOTSTRAP, "NRestarts"), "1");
    assert!(sim.kubeadm_runs("reset", None).is_empty(), "no reset");
    assert_eq!(sim.kubeadm_runs("join", None).len(), 1, "one join");
    assert_eq!(
        local_etcd(&machine).map(|e| e.0),
        after_crash.map(|e| e.0),
        "the etcd kubeadm started survived the crash"
    );
    assert_voters(&sim, &[0, 1], 2).await;
}

/// What a joining control plane writes when it finds the uploaded
/// certificates gone: a request from the control-plane partition.
async fn ask_for_certificates(
    registry: &kubeboot::registry::Registry<kubeboot::registry::dynamo::DynamoRegistryStore>,
    stale_version: &str,
) {
    registry
        .request_refresh(&kubeboot::registry::RefreshRequest {
            origin: kubeboot::registry::Origin::ControlPlane,
            requested_by: "i-0joiningcontrolpl".into(),
            what: kubeboot::registry::Wants::Both,
            stale_version: stale_version.into(),
            requested_at: std::time::SystemTime::now(),
        })
        .await
        .expect("request");
}

/// The leader under the real kubeboot.service refreshes join material:
/// `kubeadm token create` and `init phase upload-certs` find the node's
/// address over netlink (the agent's configs for them name none), which
/// the unit allows. With `AF_NETLINK` taken out of RestrictAddressFamilies
/// (a drop-in) the same refresh fails and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_refreshes_join_material_under_its_unit_and_not_without_af_netlink() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let machine = sim_machine(&sim, &machine_config(&sim, 0, false));
    install_units(&machine, &standin_environment(&sim), "");
    let registry = sim.registry().await;
    let version = |p: Option<kubeboot::registry::JoinPointer>| p.expect("published").secret_version;

    // As shipped (AF_NETLINK allowed): refreshed. The token runs out on its
    // own; the certificates are uploaded only because a joining control
    // plane asks for them.
    let expired = sim.expire_join_material("i-harness").await;
    ask_for_certificates(&registry, &expired).await;
    machine.systemctl_ok(&["start", "--no-block", DAEMON]);
    let published = wait_journal(
        &machine,
        DAEMON,
        "fresh join material published",
        1,
        Duration::from_secs(60),
    );
    sim.record_output(&machine.journal(DAEMON));
    assert!(published, "{}", machine.report(DAEMON));
    let now = version(registry.join_pointer().await.expect("pointer"));
    assert_ne!(now, expired, "fresh material");
    let ok = |cmd: &str| {
        sim.kubeadm_runs(cmd, None)
            .iter()
            .filter(|r| r.exit == 0)
            .count()
    };
    assert_eq!(ok("token create"), 1);
    assert_eq!(ok("init phase upload-certs"), 1);

    // Without AF_NETLINK: kubeadm cannot find the address, nothing is published.
    machine.systemctl_ok(&["stop", DAEMON]);
    machine.install_drop_in(
        DAEMON,
        "no-netlink",
        "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n",
    );
    let expired = sim.expire_join_material("i-harness").await;
    ask_for_certificates(&registry, &expired).await;
    machine.systemctl_ok(&["start", "--no-block", DAEMON]);
    let failed = wait_journal(
        &machine,
        DAEMON,
        "join material refresh failed",
        2,
        Duration::from_secs(60),
    );
    let journal = machine.journal(DAEMON);
    sim.record_output(&journal);
    assert!(failed, "{}", machine.report(DAEMON));
    let refused = journal
        .lines()
        .find(|l| l.contains("join material refresh failed"))
        .unwrap_or("");
    eprintln!("without AF_NETLINK: {refused}");
    eprintln!(
        "the daemon's STATUS= meanwhile: {:?}",
        machine.show(DAEMON, "StatusText")
    );
    assert!(
        refused.contains("address family not supported by protocol"),
        "kubeadm's error reaches the log:\n{}",
        tail(&journal)
    );
    let refused = sim
        .kubeadm_runs("token create", None)
        .iter()
        .filter(|r| r.exit != 0)
        .count();
    assert!(refused >= 2, "token create refused on each turn");
    assert_eq!(ok("token create"), 1, "no token created since");
    assert_eq!(
        version(registry.join_pointer().await.expect("pointer")),
        expired,
        "nothing published"
    );
    assert_eq!(machine.show(DAEMON, "ActiveState"), "active");
}

/// Power is lost mid-bootstrap: the first control plane's agent dies right
/// after the registry marked the cluster initialized (the unit is not
/// restarted), then the machine is killed outright, etcd with it. The next
/// boot (a new machine over the same node directories, a fresh `/run`)
/// starts etcd from its static Pod manifest, as the kubelet does, and the
/// bootstrap unit resumes from its checkpoint: it adopts its recorded
/// member instead of running `kubeadm reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_power_loss_mid_bootstrap_the_next_boot_adopts_the_member_without_reset() {
    let sim = SimCluster::start(1, 0).await;
    let machine = node_machine(&sim, 0);
    install_control_plane_units(&machine, &sim);
    machine.install_drop_in(
        BOOTSTRAP,
        "crash",
        "[Service]\nRestart=no\nEnvironment=KBTEST_CRASH_AT=init:after-mark\n",
    );
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP]);
    let (_, journal) = bootstrap_settles(&machine, &sim, |active, _| {
        active == "failed" || active == "active"
    });
    assert!(
        journal.contains("crashing on purpose"),
        "{}",
        tail(&journal)
    );
    let members = assert_voters(&sim, &[0], 1).await;
    drop(machine);

    let machine = node_machine(&sim, 0);
    assert!(
        wait_journal(
            &machine,
            "kubelet.service",
            "started the static etcd",
            1,
            Duration::from_secs(30)
        ),
        "the kubelet double starts etcd at boot:\n{}",
        machine.report("kubelet.service")
    );
    install_control_plane_units(&machine, &sim);
    machine.systemctl_ok(&["start", "--no-block", BOOTSTRAP, DAEMON]);
    let took = wait_bootstrapped_and_leading(&machine, &sim);
    eprintln!("resumed after the reboot in {took:?}");
    let journal = machine.journal(BOOTSTRAP);
    assert!(
        journal.contains("its member is adopted"),
        "{}",
        tail(&journal)
    );
    assert!(sim.kubeadm_runs("reset", None).is_empty(), "no reset");
    assert_eq!(sim.kubeadm_runs("init", None).len(), 1, "one init");
    assert_eq!(
        assert_voters(&sim, &[0], 1).await,
        members,
        "the same member"
    );
}
