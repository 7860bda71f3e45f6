//! The repo's units under real systemd (PID 1 of a throwaway machine, see
//! `kubeboot_tests::machine`): ordering against the kubelet that kubeadm
//! restarts, configuration errors, the daemon's watchdog, and a worker's
//! bootstrap end to end. Needs root, like the machine.

use kubeboot_tests::machine::{Machine, Options};
use kubeboot_tests::process::pid_alive;
use kubeboot_tests::simcluster::{assert_ok, tail, SimCluster};
use kubeboot_tests::standin;
use std::path::PathBuf;
use std::time::Duration;

const BOOTSTRAP: &str = "kubeboot-bootstrap.service";
const DAEMON: &str = "kubeboot.service";
/// Where the machine sees the simulated cluster's directory (not under
/// /tmp: the units have PrivateTmp=yes).
const GUEST_SIM: &str = "/var/lib/kbtest-sim";

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

/// The stand-in's knobs for a unit, as a drop-in's `[Service]` lines.
fn standin_environment(sim: &SimCluster) -> String {
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
    machine.install_repo_unit(BOOTSTRAP);
    machine.install_repo_unit(DAEMON);
    // Bootstrap already ran (outside): its checkpoint says done.
    machine.install_drop_in(
        BOOTSTRAP,
        "test",
        &format!("[Service]\n{}", standin_environment(&sim)),
    );
    machine.install_drop_in(
        DAEMON,
        "test",
        &format!(
            "[Service]\nWatchdogSec=3s\nRestartSec=1s\n{}\
             Environment=KUBEBOOT_DAEMON_PERIOD=1s KUBEBOOT_DAEMON_JITTER=0s\n\
             Environment=KUBEBOOT_DAEMON_WATCHDOG_STALL=6s KUBEBOOT_TIMEOUTS_DRAIN=5s\n",
            standin_environment(&sim)
        ),
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
    let waited = machine.wait_until(BOOTSTRAP, Duration::from_secs(120), |active, _| {
        active == "active" || active == "failed"
    });
    let journal = machine.journal(BOOTSTRAP);
    sim.record_output(&journal);
    let took = waited.unwrap_or_else(|(active, sub)| {
        panic!(
            "{BOOTSTRAP} is {active}/{sub}:\n{}",
            machine.report(BOOTSTRAP)
        )
    });
    assert_eq!(
        machine.show(BOOTSTRAP, "ActiveState"),
        "active",
        "{}\n{}",
        machine.report(BOOTSTRAP),
        machine.report("kubelet.service")
    );
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
