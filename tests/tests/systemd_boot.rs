//! The repo's units under real systemd (PID 1 of a throwaway machine, see
//! `kubeboot_tests::machine`): ordering against the kubelet that kubeadm
//! restarts, configuration errors, the daemon's watchdog, and a worker's
//! bootstrap end to end. Needs root, like the machine.

use kubeboot_tests::machine::{Machine, Options};
use kubeboot_tests::process::pid_alive;
use std::path::PathBuf;
use std::time::Duration;

const BOOTSTRAP: &str = "kubeboot-bootstrap.service";

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
