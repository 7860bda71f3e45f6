//! Who can reach the cluster's CA keys through the join material, and who can
//! make the leader rotate it (issue 13, items 1, 2 and 14).
//!
//! kubeadm's `--upload-certs` stores `ca.key`, `etcd/ca.key` and `sa.key` in
//! the `kube-system/kubeadm-certs` Secret, encrypted with the certificate key,
//! and binds the bootstrap-token group to a Role that may read that Secret
//! (upstream `cmd/kubeadm/app/phases/copycerts/copycerts.go`: `createRBAC`).
//! So a worker that could read the certificate key as well as its token would
//! own the cluster. These scenarios run the real agent against moto and the
//! kubeadm stand-in.

use kubeboot::registry::{Origin, RefreshRequest};
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::simcluster::{assert_ok, sigterm_and_wait, tail, SimCluster};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

/// Every body ever stored in one of the cluster's secrets.
async fn secret_bodies(sim: &SimCluster, name: &str) -> Vec<serde_json::Value> {
    let client = aws_sdk_secretsmanager::Client::new(&sim.moto.sdk_config().await);
    let id = format!("kubeboot/{}/{name}", sim.name);
    let versions = client
        .list_secret_version_ids()
        .secret_id(&id)
        .include_deprecated(true)
        .send()
        .await
        .expect("list versions");
    let mut bodies = Vec::new();
    for v in versions.versions() {
        let value = client
            .get_secret_value()
            .secret_id(&id)
            .version_id(v.version_id().expect("version id"))
            .send()
            .await
            .expect("read version");
        bodies.push(serde_json::from_str(value.secret_string().unwrap_or("{}")).expect("json"));
    }
    bodies
}

/// Count of kubeadm runs of `command` so far.
fn runs(sim: &SimCluster, command: &str) -> usize {
    sim.kubeadm_runs(command, None).len()
}

/// Waits up to `within` for the join pointer to move past `version`;
/// returns the new version, or `None` if it did not move.
async fn pointer_moves(sim: &SimCluster, version: &str, within: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < within {
        let now = sim.join_pointer().await;
        if now.secret_version != version {
            return Some(now.secret_version);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn current_version(sim: &SimCluster) -> String {
    sim.join_pointer().await.secret_version
}

async fn ask(sim: &SimCluster, origin: Origin, what: &str) {
    let version = current_version(sim).await;
    sim.registry()
        .await
        .request_refresh(&RefreshRequest {
            origin,
            requested_by: "i-0requester0000000".into(),
            what: kubeboot::registry::Wants::parse(what),
            stale_version: version,
            requested_at: SystemTime::now(),
        })
        .await
        .expect("request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_joins_without_any_secret_it_can_read_holding_the_certificate_key() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await);

    // The secret every node reads holds the token and never the key.
    let token_bodies = secret_bodies(&sim, "join").await;
    assert!(!token_bodies.is_empty());
    for body in &token_bodies {
        assert!(body["token"].is_string(), "{body}");
        assert!(
            body.get("certificate_key").is_none(),
            "the worker-readable secret holds the certificate key: {}",
            body.as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        );
    }
    // The key is in the control-plane-only secret.
    let key_bodies = secret_bodies(&sim, "certificate-key").await;
    assert_eq!(key_bodies.len(), 1);
    assert!(key_bodies[0]["certificate_key"].is_string());

    // A worker never even asks for that secret: with it gone, it still joins.
    let client = aws_sdk_secretsmanager::Client::new(&sim.moto.sdk_config().await);
    client
        .delete_secret()
        .secret_id(format!("kubeboot/{}/certificate-key", sim.name))
        .force_delete_without_recovery(true)
        .send()
        .await
        .expect("delete the key secret");
    let runs = sim.bootstrap(&[1]).await;
    assert_ok(&runs);
    let join = sim.kubeadm_runs("join", Some(1));
    assert_eq!(join.len(), 1, "{join:?}");
    assert!(
        !join[0].args.iter().any(|a| a.contains("certificate-key")),
        "{:?}",
        join[0].args
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_uploads_certificates_only_for_a_control_plane_and_rotates_at_most_every_ten_minutes(
) {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    // 1. The material runs out with nobody asking: the leader renews the
    //    token on schedule and does not upload the certificates. (Expired
    //    before the daemon starts: publishing takes the leader lock, which
    //    a running daemon never lets go.)
    let expired = sim.expire_join_material("i-old-leader").await;
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let quiet = Duration::from_secs(6); // six leader turns
    let v1 = pointer_moves(&sim, &expired, Duration::from_secs(60))
        .await
        .expect("the token is renewed");
    assert_eq!(runs(&sim, "token create"), 1);
    assert_eq!(
        runs(&sim, "init phase upload-certs"),
        0,
        "certificates uploaded with no control plane joining"
    );

    // 2. A request from the worker partition asks for everything: the token
    //    was just renewed (rate limit) and workers get no certificates.
    ask(&sim, Origin::Worker, "both").await;
    assert_eq!(
        pointer_moves(&sim, &v1, quiet).await,
        None,
        "rotated on a worker's request"
    );
    assert_eq!(runs(&sim, "init phase upload-certs"), 0);
    assert_eq!(runs(&sim, "token create"), 1);

    // 3. A control plane asks for certificates (they expired in step 1):
    //    uploaded under a new key, published.
    ask(&sim, Origin::ControlPlane, "certs").await;
    let v2 = pointer_moves(&sim, &v1, Duration::from_secs(60))
        .await
        .expect("certificates uploaded for the control plane");
    assert_eq!(runs(&sim, "init phase upload-certs"), 1);
    assert_eq!(
        runs(&sim, "token create"),
        1,
        "the token was not part of it"
    );

    // 4. Asking again at once changes nothing: a rotation per ten minutes.
    ask(&sim, Origin::ControlPlane, "both").await;
    assert_eq!(
        pointer_moves(&sim, &v2, quiet).await,
        None,
        "rotated twice in a row"
    );
    assert_eq!(runs(&sim, "init phase upload-certs"), 1);

    let (code, stderr) = sigterm_and_wait(&mut daemon).await;
    sim.record_output(&stderr);
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert!(
        stderr.contains("workers are given a token only"),
        "the refused part is logged:\n{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_that_cannot_store_its_secrets_rotates_nothing_in_the_cluster() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    // Secrets Manager refuses every write the leader makes.
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_faults(FaultPlan::always(FaultKind::ServerError).only(&["PutSecretValue"]));
    let expired = sim.expire_join_material("i-old-leader").await;
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_AWS_ENDPOINTS_SECRETSMANAGER", proxy.endpoint())
        .env("KUBEBOOT_AWS_MAX_ATTEMPTS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    // Several turns try and fail to store the new token.
    let start = Instant::now();
    while proxy.log_for("PutSecretValue").len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the leader never tried"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = daemon.kill().await;
    assert_eq!(
        current_version(&sim).await,
        expired,
        "nothing was published"
    );
    assert_eq!(
        runs(&sim, "token create"),
        0,
        "kubeadm created a token that could never be published"
    );
    assert_eq!(runs(&sim, "init phase upload-certs"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_upgraded_from_the_single_secret_format_gets_new_material_from_its_leader() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let registry = sim.registry().await;
    let current = sim.join_pointer().await;
    // What the previous kubeboot published: format 1, the key beside the token.
    let old_body = serde_json::json!({
        "format": 1,
        "token": "abcdef.0123456789abcdef",
        "certificate_key": "0f".repeat(32),
        "ca_cert_hashes": current.ca_cert_hashes,
        "endpoint": current.endpoint,
        "token_expires_at": 4_000_000_000_000u64,
        "certs_expire_at": 4_000_000_000_000u64,
    });
    let client = aws_sdk_secretsmanager::Client::new(&sim.moto.sdk_config().await);
    let version = client
        .put_secret_value()
        .secret_id(format!("kubeboot/{}/join", sim.name))
        .secret_string(old_body.to_string())
        .send()
        .await
        .expect("put the old version")
        .version_id
        .expect("version id");
    let guard = sim.leader_lock("i-old-agent").await;
    registry
        .publish_join(
            &guard,
            &kubeboot::registry::JoinPointer {
                secret_version: version.clone(),
                key_version: None,
                seq: current.seq + 1,
                ..current.clone()
            },
        )
        .await
        .expect("point at the old format");
    guard.release().await.expect("release");

    // The new leader cannot read it, and replaces it instead of failing forever.
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let replaced = pointer_moves(&sim, &version, Duration::from_secs(60)).await;
    let (code, stderr) = sigterm_and_wait(&mut daemon).await;
    sim.record_output(&stderr);
    assert!(
        replaced.is_some(),
        "the old format was never replaced:\n{}",
        tail(&stderr)
    );
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert!(
        stderr.contains("published by an older kubeboot"),
        "{}",
        tail(&stderr)
    );
    let bodies = secret_bodies(&sim, "join").await;
    assert!(bodies
        .iter()
        .any(|b| b["format"] == 2 && b.get("certificate_key").is_none()));
    // Nodes join with it.
    assert_ok(&sim.bootstrap(&[1]).await);
}
