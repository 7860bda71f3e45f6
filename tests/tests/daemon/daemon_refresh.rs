//! The leader daemon refreshes join material: nodes that boot after the
//! token and the uploaded certificates are gone still join, through the
//! refresh the leader makes; SIGTERM stops the daemon cleanly and releases
//! the leader lock.

use kubeboot_tests::simcluster::{assert_ok, sigterm_and_wait, tail, SimCluster};
use std::process::Stdio;

#[tokio::test(flavor = "multi_thread")]
async fn nodes_booting_after_the_join_material_expired_join_through_the_leaders_refresh() {
    let sim = SimCluster::start(2, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let (_, old) = sim.current_join_material().await;

    // Time passes: the token and the uploaded certificates are gone from the
    // cluster, and the published material says so.
    let token_id = old
        .token
        .expose()
        .split_once('.')
        .map(|(id, _)| id.to_string())
        .expect("token id");
    assert!(sim.kubeapi.delete_object(&format!(
        "/api/v1/namespaces/kube-system/secrets/bootstrap-token-{token_id}"
    )));
    assert!(sim
        .kubeapi
        .delete_object("/api/v1/namespaces/kube-system/secrets/kubeadm-certs"));
    let expired = sim.expire_join_material("i-old-leader").await;

    // Node 0's daemon leads; node 1 (control plane) and node 2 (worker) boot.
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let runs = sim.bootstrap(&[1, 2]).await;
    assert_ok(&runs);

    let (now, fresh) = sim.current_join_material().await;
    assert_ne!(now.secret_version, expired, "fresh material");
    assert_ne!(fresh.token, old.token);
    assert_ne!(fresh.certificate_key, old.certificate_key);
    let kubeadm = sim.kubeadm_invocations();
    assert!(
        kubeadm
            .iter()
            .any(|l| l.contains(" token create ") && l.ends_with("exit=0")),
        "{kubeadm:#?}"
    );
    assert!(
        kubeadm
            .iter()
            .any(|l| l.contains(" init phase upload-certs ") && l.ends_with("exit=0")),
        "{kubeadm:#?}"
    );
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 2);

    let (code, stderr) = sigterm_and_wait(&mut daemon).await;
    sim.record_output(&stderr);
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert!(
        stderr.contains("fresh join material published"),
        "{}",
        tail(&stderr)
    );
    // I6: the fresh secrets are not in the daemon's output.
    for secret in [
        fresh.token.expose(),
        fresh.certificate_key.as_ref().expect("key").expose(),
    ] {
        assert!(
            !stderr.contains(secret.as_str()),
            "the daemon printed a secret"
        );
    }
    assert_eq!(
        kubeboot_tests::termination::leader(&sim).await,
        None,
        "SIGTERM released the leader lock"
    );
}
