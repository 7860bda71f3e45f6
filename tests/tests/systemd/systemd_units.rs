//! The units in systemd/ as systemd reads them: `systemd-analyze verify`
//! accepts them, `systemd-analyze security` rates them no worse than agreed,
//! and what they rely on (notify readiness, exit code 2 for configuration
//! errors, the watchdog, the command lines) matches the agent.

use kubeboot_tests::workspace::{kubeboot_bin, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: &[&str] = &[
    "kubeboot-bootstrap.service",
    "kubeboot.service",
    "kubeboot-journal.service",
];

/// The units that run the agent (the journal copy runs journalctl).
const AGENT_UNITS: &[&str] = &["kubeboot-bootstrap.service", "kubeboot.service"];

/// The highest exposure (×10, as `--threshold` counts) each unit may have.
/// The bootstrap unit runs kubeadm, which needs root over much of the host
/// (kubelet config, static Pod manifests, the container runtime), so it is
/// allowed more than the daemon.
/// The journal copy only reads the journal and writes two files.
const EXPOSURE: &[(&str, u32)] = &[
    ("kubeboot-bootstrap.service", 70),
    ("kubeboot.service", 50),
    ("kubeboot-journal.service", 20),
];

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("systemd").join(name))
        .unwrap_or_else(|e| panic!("systemd/{name}: {e}"))
}

/// Copies of the units whose ExecStart points at the binary under test
/// (verify checks that the executable exists).
fn staged(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let text = unit_text(name).replace(
                "ExecStart=/usr/bin/kubeboot",
                &format!("ExecStart={}", kubeboot_bin().display()),
            );
            std::fs::write(&path, text).expect("stage unit");
            path
        })
        .collect()
}

fn directive<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(staged(dir.path()))
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// The score `systemd-analyze security` gives each unit is within its
/// budget and is the one systemd/README.md records.
#[test]
fn systemd_analyze_security_rates_each_unit_within_its_budget() {
    let dir = tempfile::tempdir().expect("dir");
    let staged = staged(dir.path());
    let readme = std::fs::read_to_string(workspace_root().join("systemd/README.md"))
        .expect("systemd/README.md");
    for (name, threshold) in EXPOSURE {
        let path = staged
            .iter()
            .find(|p| p.ends_with(name))
            .expect("staged unit");
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(path)
            .output()
            .expect("systemd-analyze");
        let report = String::from_utf8_lossy(&out.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no overall line");
        assert!(
            out.status.success(),
            "{name} is above {}.{}: {overall}",
            threshold / 10,
            threshold % 10
        );
        // "→ Overall exposure level for X.service: 6.7 MEDIUM 😐"
        let score = overall
            .rsplit(": ")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .expect("a score");
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("systemd/README.md has no row for {name}"));
        assert!(
            row.contains(&format!("| {score} ")),
            "systemd/README.md records another score for {name} than {score}: {row}"
        );
    }
}

/// A failed condition skips a unit silently (no failure, no restart): a
/// node without its configuration must fail instead (KB-CONFIG-002), so
/// no unit is conditioned on the configuration file.
#[test]
fn no_unit_skips_silently_on_a_missing_configuration() {
    for name in UNITS {
        let text = unit_text(name);
        let conditions: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("Condition") || l.starts_with("Assert"))
            .collect();
        assert!(conditions.is_empty(), "{name}: {conditions:?}");
    }
}

#[test]
fn the_units_match_what_the_agent_does() {
    for name in AGENT_UNITS {
        let text = unit_text(name);
        assert_eq!(
            directive(&text, "Type"),
            Some("notify"),
            "{name}: the agent says READY=1"
        );
        assert_eq!(
            directive(&text, "RestartPreventExitStatus"),
            Some(kubeboot::error::EXIT_USAGE.to_string().as_str()),
            "{name}: a configuration error must not restart forever"
        );
        // The command line parses: `<ExecStart> --help` exits 0.
        let exec = directive(&text, "ExecStart").expect("ExecStart");
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/bin/kubeboot"));
        let status = Command::new(kubeboot_bin())
            .args(words)
            .arg("--help")
            .output()
            .expect("kubeboot");
        assert!(status.status.success(), "{name}: {exec} does not parse");
    }
    // kubeadm (under bootstrap) writes /etc/kubernetes: the unit must leave
    // /etc writable (ProtectSystem=full or strict would make it read-only).
    let bootstrap = unit_text("kubeboot-bootstrap.service");
    let protect = directive(&bootstrap, "ProtectSystem").unwrap_or("no");
    let rw = directive(&bootstrap, "ReadWritePaths").unwrap_or("");
    assert!(
        matches!(protect, "no" | "yes" | "true")
            || rw.split_whitespace().any(|p| p == "/etc/kubernetes"),
        "ProtectSystem={protect} makes /etc/kubernetes read-only for kubeadm"
    );
    let daemon = unit_text("kubeboot.service");
    assert!(
        directive(&daemon, "WatchdogSec").is_some(),
        "the daemon's watchdog is fed by its loops"
    );
    assert_eq!(directive(&daemon, "Restart"), Some("always"));
}

/// What the units promise each other and kubeadm (`tests/tests/systemd/systemd_boot.rs`
/// shows the same under real systemd).
#[test]
fn the_units_are_ordered_and_bounded_for_what_bootstrap_runs() {
    let bootstrap = unit_text("kubeboot-bootstrap.service");
    let before: Vec<&str> = directive(&bootstrap, "Before")
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert!(
        !before.contains(&"kubelet.service"),
        "kubeadm restarts the kubelet and waits for it: bootstrap ordered before the kubelet deadlocks"
    );
    assert!(before.contains(&"kubeboot.service"), "{before:?}");

    // The outer bound exceeds the agent's own bounds on its longest path
    // (the arithmetic is in the unit), with room for ~15 AWS calls.
    let default = |key: &str| {
        let literal = kubeboot::config::schema::find(key)
            .and_then(|k| k.default)
            .unwrap_or_else(|| panic!("{key} has a default"));
        kubeboot::config::value::parse_duration(literal.trim_matches('"'))
            .unwrap_or_else(|| panic!("{key} = {literal}"))
    };
    let longest = default("imds.deadline")
        + default("etcd.promote_timeout") // a recorded member's wait before any reset
        + default("lock.acquire_timeout") // the membership lock the reset runs under
        + default("timeouts.kubeadm_reset")
        + default("lock.acquire_timeout") * 2
        + default("timeouts.join_material")
        + default("timeouts.kubeadm_join") * 3
        + default("etcd.promote_timeout")
        + default("aws.operation_timeout") * 15;
    let start = directive(&bootstrap, "TimeoutStartSec").expect("TimeoutStartSec");
    let outer = kubeboot::config::value::parse_duration(&start.replace("min", "m"))
        .unwrap_or_else(|| panic!("TimeoutStartSec={start}"));
    assert!(
        outer > longest,
        "TimeoutStartSec={start} is within the agent's own worst case ({longest:?})"
    );
    // A worker's longest path: instance metadata, the wait for join
    // material, its join, then the wait for its Node: up to
    // timeouts.pod_network while only the network is missing, then
    // timeouts.node_ready for anything else.
    let worker = default("imds.deadline")
        + default("timeouts.join_material")
        + default("timeouts.kubeadm_join")
        + default("timeouts.pod_network")
        + default("timeouts.node_ready")
        + default("aws.operation_timeout") * 15;
    assert!(
        outer > worker,
        "TimeoutStartSec={start} is within a worker's own worst case ({worker:?})"
    );

    // kubeadm token create / upload-certs (the leader's refresh) use netlink.
    let daemon = unit_text("kubeboot.service");
    let families = directive(&daemon, "RestrictAddressFamilies").unwrap_or("");
    assert!(
        families.split_whitespace().any(|f| f == "AF_NETLINK"),
        "{families}"
    );
}
