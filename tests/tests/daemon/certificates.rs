//! kubeadm's leaf certificates on a long-lived control plane: the daemon
//! reports their expiry (status, the `CertificateDaysLeft` metric) and
//! renews them before they lapse, under the membership lock, through the
//! kubeadm stand-in's `certs renew all`, then restarts the control plane's
//! static Pods and confirms etcd.

use kubeboot::lock::Purpose;
use kubeboot_tests::pki;
use kubeboot_tests::simcluster::{assert_ok, log_lines, read_stderr, tail, SimCluster, SimNode};
use kubeboot_tests::termination::host_dies;
use kubeboot_tests::workspace::kubeboot_bin;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

const DAY: Duration = Duration::from_secs(86_400);

/// `kubeboot status --output json` on `node`, as an operator runs it there.
async fn status_json(sim: &SimCluster, node: &SimNode) -> serde_json::Value {
    let out = tokio::process::Command::new(kubeboot_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .args(["status", "--output", "json", "--config"])
        .arg(&node.config)
        .output()
        .await
        .expect("kubeboot status runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stderr);
    assert_eq!(out.status.code(), Some(0), "{}", tail(&stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn soonest_days(status: &serde_json::Value) -> f64 {
    status["certificates"]["soonest"]["days_left"]
        .as_f64()
        .unwrap_or_else(|| panic!("no soonest certificate in {status:#}"))
}

/// The daemon for `node` with a kubelet file-check period of half a second.
fn daemon(sim: &SimCluster, node: &SimNode) -> tokio::process::Child {
    sim.daemon_command(node)
        .env("KBTEST_KUBELET_FILE_CHECK_MS", "500")
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon")
}

async fn stop(child: &mut tokio::process::Child) -> String {
    let pid = child.id().expect("daemon pid") as i32;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    read_stderr(child).await
}

fn metric_values(sim: &SimCluster, name: &str) -> Vec<f64> {
    sim.metrics_documents()
        .iter()
        .filter_map(|d| d[name].as_f64())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_whose_certificates_expire_soon_renews_them_under_the_membership_lock() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let node = &sim.nodes[0];
    let k8s = node.dir.join("etc/kubernetes");

    // Fresh from init: a year left, nothing due.
    let fresh = status_json(&sim, node).await;
    assert!(soonest_days(&fresh) > 300.0, "{fresh:#}");

    // Eleven months later: every leaf and kubeconfig expires in ten days.
    age(node, 10);
    let aged = status_json(&sim, node).await;
    let days = soonest_days(&aged);
    assert!((9.5..=10.0).contains(&days), "{aged:#}");
    assert_eq!(aged["certificates"]["problems"], serde_json::json!([]));

    // Another member's change holds the membership lock: no renewal meanwhile.
    let held = membership_held_elsewhere(&sim).await;
    let mut child = daemon(&sim, node);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        sim.kubeadm_runs("certs renew all", Some(0)).is_empty(),
        "renewed while another node held the membership lock"
    );
    held.release().await.expect("release");

    let deadline = Instant::now() + Duration::from_secs(90);
    let renewed = loop {
        let s = status_json(&sim, node).await;
        if soonest_days(&s) > 300.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "not renewed in time: {s:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Let the daemon finish its turn (the restart, etcd's confirmation).
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_values(&sim, "CertificateRenewals").is_empty() {
        assert!(Instant::now() < deadline, "no CertificateRenewals metric");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stderr = stop(&mut child).await;
    sim.record_output(&stderr);

    let runs = sim.kubeadm_runs("certs renew all", Some(0));
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].exit, 0);
    // The membership lock was taken for it (after the test's holder) and
    // given back. Judged on the renewal's own acquisition: the leader's
    // reconciler takes the same lock every turn, and a reconciler turn cut
    // short by SIGTERM may leave its lease to expire, so the lock's state
    // after the stop says nothing about the renewal.
    let membership = &renewed["locks"][1];
    assert_eq!(membership["purpose"], "membership", "{renewed:#}");
    let logs = log_lines(&stderr);
    let fences: Vec<u64> = logs
        .iter()
        .filter(|l| l["message"] == "certificate renewal holds the membership lock")
        .filter_map(|l| l["fence"].as_u64())
        .collect();
    assert_eq!(
        fences.len(),
        1,
        "one renewal: {fences:?}\n{}",
        tail(&stderr)
    );
    assert!(fences[0] > 1, "taken after the test's holder: {fences:?}");
    assert!(
        logs.iter().any(|l| l["message"] == "lock released"
            && l["lock"] == "membership"
            && l["fence"].as_u64() == Some(fences[0])),
        "the renewal's membership lock (fence {}) was not released:\n{}",
        fences[0],
        tail(&stderr)
    );
    // The static Pods were restarted and are all back.
    for manifest in ["etcd.yaml", "kube-apiserver.yaml"] {
        assert!(k8s.join("manifests").join(manifest).exists(), "{manifest}");
    }
    let parked = std::fs::read_dir(k8s.join(kubeboot::certs::PARKING_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(parked, 0, "no manifest left parked");
    assert!(
        logs.iter().any(|l| l["message"]
            == "kubeadm certificates renewed; the control plane restarted with them"),
        "{}",
        tail(&stderr)
    );
    // Still one healthy etcd member, serving with the renewed certificates.
    assert_eq!(sim.etcd_members(&[0]).await.len(), 1);

    // The metric: ten days before, a year after.
    let days_left = metric_values(&sim, "CertificateDaysLeft");
    assert!(
        days_left.iter().any(|d| (9.5..=10.0).contains(d)),
        "{days_left:?}"
    );
    assert!(days_left.iter().any(|d| *d > 300.0), "{days_left:?}");
    assert!(metric_values(&sim, "CertificateRenewalFailures").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_kubeadm_cannot_renew_are_reported_with_a_code_and_metered() {
    let (sim, mut child) = external_ca_renewal_failed().await;
    let node = &sim.nodes[0];
    let stderr = stop(&mut child).await;
    sim.record_output(&stderr);
    let failure = log_lines(&stderr)
        .into_iter()
        .find(|l| l["code"] == "KB-CERT-003")
        .unwrap_or_else(|| panic!("no KB-CERT-003 line:\n{}", tail(&stderr)));
    let text = failure.to_string();
    assert!(text.contains("apiserver"), "{text}");
    assert!(text.contains("external CA"), "{text}");
    // The etcd leaves (own CA, key present) were renewed all the same.
    let status = status_json(&sim, node).await;
    let all = status["certificates"]["all"].as_array().expect("all");
    let peer = all
        .iter()
        .find(|e| e["name"] == "etcd/peer")
        .expect("etcd/peer");
    assert!(peer["days_left"].as_f64() > Some(300.0), "{status:#}");
    assert!(soonest_days(&status) < 6.0, "{status:#}");
}

/// Ages `node`'s certificates (as eleven months and more of a long-lived
/// control plane would) so that they expire `days` from now; returns the
/// node's `/etc/kubernetes`.
fn age(node: &SimNode, days: u32) -> PathBuf {
    let k8s = node.dir.join("etc/kubernetes");
    pki::age_node_certificates(&k8s, SystemTime::now() + days * DAY).expect("aged certificates");
    k8s
}

/// One bootstrapped control plane whose certificates expire in five days
/// and whose cluster CA is external: its key is not on the node; kubeadm
/// skips what it signs ("Detected external ca") and exits 0. Returns once
/// its daemon (returned too) metered the first renewal it could not make.
async fn external_ca_renewal_failed() -> (SimCluster, tokio::process::Child) {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let k8s = age(&sim.nodes[0], 5);
    std::fs::remove_file(k8s.join("pki/ca.key")).expect("remove ca.key");
    let child = daemon(&sim, &sim.nodes[0]);
    wait_until(
        Duration::from_secs(60),
        "no CertificateRenewalFailures metric",
        || !metric_values(&sim, "CertificateRenewalFailures").is_empty(),
    )
    .await;
    (sim, child)
}

/// The membership lock, held by another member (its change in progress).
async fn membership_held_elsewhere(sim: &SimCluster) -> kubeboot::lock::Guard {
    sim.locker("i-other-member")
        .await
        .acquire(Purpose::Membership)
        .await
        .expect("membership lock")
}

/// Waits (up to `within`) until `done` holds, polling every half second.
async fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_that_would_cost_etcd_quorum_is_deferred_without_restarting_anything() {
    // Three control planes; node 2's host is dead (awaiting its replacement).
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    host_dies(&sim, 2);
    // Node 1 reaches its renewal window: restarting it would leave node 0
    // alone, 1 healthy of 3 voters, and etcd would lose quorum.
    let node = &sim.nodes[1];
    let k8s = age(node, 10);

    let mut child = daemon(&sim, node);
    wait_until(
        Duration::from_secs(90),
        "neither a deferral nor a renewal",
        || {
            !metric_values(&sim, "CertificateRenewalsDeferred").is_empty()
                || !sim.kubeadm_runs("certs renew all", Some(1)).is_empty()
        },
    )
    .await;
    // A few more turns: still deferred, never restarted.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let parked = std::fs::read_dir(k8s.join(kubeboot::certs::PARKING_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    let stderr = stop(&mut child).await;
    sim.record_output(&stderr);

    let runs = sim.kubeadm_runs("certs renew all", Some(1));
    assert!(
        runs.is_empty(),
        "renewed (and restarted) with a member dead: {runs:?}\n{}",
        tail(&stderr)
    );
    assert_eq!(parked, 0, "manifests parked with a member dead");
    for manifest in ["etcd.yaml", "kube-apiserver.yaml"] {
        assert!(k8s.join("manifests").join(manifest).exists(), "{manifest}");
    }
    let deferrals: Vec<serde_json::Value> = log_lines(&stderr)
        .into_iter()
        .filter(|l| l["code"] == "KB-CERT-006")
        .collect();
    assert!(
        !deferrals.is_empty(),
        "no KB-CERT-006 line:\n{}",
        tail(&stderr)
    );
    assert!(
        deferrals.iter().all(|d| d["level"] == "WARN"),
        "{deferrals:?}"
    );
    // The first turn can come while the survivors elect a leader (node 2
    // may have led): then no member is healthy. Once one leads, restarting
    // node 1 would leave node 0 alone.
    assert!(
        deferrals
            .iter()
            .any(|d| d.to_string().contains("1 healthy of 3")),
        "{deferrals:?}"
    );
    assert!(metric_values(&sim, "CertificateRenewalFailures").is_empty());
    assert!(metric_values(&sim, "CertificateRenewalsDeferred").len() >= 2);
    // The cluster kept its quorum: both survivors still answer.
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kubeadm_left_certificates_unrenewed_the_next_turns_back_off_instead_of_renewing_again(
) {
    // External cluster CA: kubeadm renews the etcd leaves only (KB-CERT-003).
    let (sim, mut child) = external_ca_renewal_failed().await;
    // Turns come every second or so: several of them within the back-off.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let stderr = stop(&mut child).await;
    sim.record_output(&stderr);

    let runs = sim.kubeadm_runs("certs renew all", Some(0));
    assert_eq!(
        runs.len(),
        1,
        "kubeadm certs renew all ran again within the back-off: {runs:?}"
    );
    assert_eq!(
        metric_values(&sim, "CertificateRenewalFailures").len(),
        1,
        "one failed renewal, then backing off"
    );
    // The etcd leaves it did renew were loaded by one restart: etcd is back.
    assert_eq!(sim.etcd_members(&[0]).await.len(), 1);
    let logs = log_lines(&stderr);
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("backing off"))),
        "{}",
        tail(&stderr)
    );
}

/// A daemon stopped while its certificate renewal waits for the membership
/// lock (another member's change holds it) stops at once: the wait is up to
/// `lock.acquire_timeout` (5 min here, 20 by default), far past the unit's
/// 60 s stop timeout, after which systemd would kill it.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_stopped_while_its_renewal_waits_for_the_lock_stops_at_once() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let node = &sim.nodes[0];
    let k8s = age(node, 10);
    let held = membership_held_elsewhere(&sim).await;
    let mut child = daemon(&sim, node);
    // The renewal is due and waits for the lock.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stopped = Instant::now();
    let (code, stderr) = kubeboot_tests::simcluster::sigterm_and_wait(&mut child).await;
    sim.record_output(&stderr);
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "took {:?} to stop",
        stopped.elapsed()
    );
    assert!(sim.kubeadm_runs("certs renew all", Some(0)).is_empty());
    for manifest in ["etcd.yaml", "kube-apiserver.yaml"] {
        assert!(k8s.join("manifests").join(manifest).exists(), "{manifest}");
    }
    held.release().await.expect("release");
}
