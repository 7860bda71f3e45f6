//! kubeadm's leaf certificates on a long-lived control plane: the daemon
//! reports their expiry (status, the `CertificateDaysLeft` metric) and
//! renews them before they lapse, under the membership lock, through the
//! kubeadm stand-in's `certs renew all`, then restarts the control plane's
//! static Pods and confirms etcd.

use kubeboot::lock::Purpose;
use kubeboot_tests::pki;
use kubeboot_tests::simcluster::{assert_ok, log_lines, tail, SimCluster, SimNode};
use kubeboot_tests::workspace::kubeboot_bin;
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
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    stderr
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
    pki::age_node_certificates(&k8s, SystemTime::now() + 10 * DAY).expect("aged certificates");
    let aged = status_json(&sim, node).await;
    let days = soonest_days(&aged);
    assert!((9.5..=10.0).contains(&days), "{aged:#}");
    assert_eq!(aged["certificates"]["problems"], serde_json::json!([]));

    // Another member's change holds the membership lock: no renewal meanwhile.
    let held = sim
        .locker("i-other-member")
        .await
        .acquire(Purpose::Membership)
        .await
        .expect("membership lock");
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
    // The membership lock was taken for it and given back.
    let membership = &renewed["locks"][1];
    assert_eq!(membership["purpose"], "membership", "{renewed:#}");
    let after = status_json(&sim, node).await;
    assert_eq!(after["locks"][1]["status"], "free", "{after:#}");
    assert!(
        after["locks"][1]["fence"].as_u64() > Some(1),
        "the daemon took the lock after the test's holder: {after:#}"
    );
    // The static Pods were restarted and are all back.
    for manifest in ["etcd.yaml", "kube-apiserver.yaml"] {
        assert!(k8s.join("manifests").join(manifest).exists(), "{manifest}");
    }
    let parked = std::fs::read_dir(k8s.join(kubeboot::certs::PARKING_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(parked, 0, "no manifest left parked");
    let logs = log_lines(&stderr);
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
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let node = &sim.nodes[0];
    let k8s = node.dir.join("etc/kubernetes");
    pki::age_node_certificates(&k8s, SystemTime::now() + 5 * DAY).expect("aged certificates");
    // An external cluster CA: its key is not on the node; kubeadm skips
    // what it signs ("Detected external ca") and exits 0.
    std::fs::remove_file(k8s.join("pki/ca.key")).expect("remove ca.key");

    let mut child = daemon(&sim, node);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_values(&sim, "CertificateRenewalFailures").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no CertificateRenewalFailures metric"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
