//! Join material a joiner must not use: about to expire (it asks the leader
//! for a refresh and waits, or fails clearly at its deadline), or malformed
//! and malicious (refused before kubeadm runs, nothing written).

use kubeboot::join_material::JoinMaterial;
use kubeboot::registry::JoinPointer;
use kubeboot_tests::simcluster::{assert_ok, tail, SimCluster};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `kubeadm join` invocations (successful or not) so far.
fn joins(sim: &SimCluster) -> Vec<String> {
    sim.kubeadm_runs("join", None)
        .into_iter()
        .map(|r| {
            format!(
                "{} {} {} exit={}",
                r.unix_ms,
                r.pid,
                r.args.join(" "),
                r.exit
            )
        })
        .collect()
}

fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// A cluster of one initialized control plane (node 0) plus `cps` more
/// control planes and `workers` workers, not yet booted.
async fn initialized(cps: usize, workers: usize) -> SimCluster {
    let sim = SimCluster::start(1 + cps, workers).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    sim
}

/// Publishes `material` as the leader would; returns its pointer.
async fn publish(sim: &SimCluster, material: &JoinMaterial) -> JoinPointer {
    let guard = sim.leader_lock("i-leader-under-test").await;
    let pointer = sim
        .join_store()
        .await
        .publish(&sim.registry().await, &guard, material, SystemTime::now())
        .await
        .expect("publish");
    guard.release().await.expect("release");
    pointer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_never_joins_with_a_token_about_to_expire_and_waits_for_the_refresh() {
    let sim = initialized(0, 1).await;
    let (_, good) = sim.current_join_material().await;
    let stale = publish(
        &sim,
        &JoinMaterial {
            token_expires_at: SystemTime::now() + Duration::from_secs(60),
            ..good.clone()
        },
    )
    .await;

    let worker = &sim.nodes[1];
    let mut cmd = sim.bootstrap_command(worker);
    cmd.env("KUBEBOOT_TIMEOUTS_JOIN_MATERIAL", "3m");
    let run = tokio::spawn(async move { cmd.output().await.expect("worker runs") });

    // The worker asks for fresh material and does not run kubeadm meanwhile.
    let registry = sim.registry().await;
    let asked = Instant::now();
    let request = loop {
        if let Some(r) = registry.refresh_request().await.expect("read") {
            break r;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "no refresh request"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(request.what, kubeboot::registry::Wants::Token);
    assert_eq!(request.stale_version, stale.secret_version);
    assert_eq!(request.requested_by, worker.instance_id());
    assert!(!request.fulfilled_by(Some(&stale)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(joins(&sim).is_empty(), "kubeadm ran with stale material");
    let status = tokio::process::Command::new(kubeboot_tests::workspace::kubeboot_bin())
        .env_clear()
        .args(["status", "--config"])
        .arg(&worker.config)
        .output()
        .await
        .expect("status runs");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!(
            "refresh of token requested by {}",
            worker.instance_id()
        )) && status.contains("PENDING"),
        "the operator sees the pending request:\n{status}"
    );

    // The leader refreshes; the worker joins with the fresh version only.
    let fresh_at = epoch_ms(SystemTime::now());
    let fresh = publish(&sim, &good).await;
    assert!(request.fulfilled_by(Some(&fresh)));
    let out = run.await.expect("worker task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", tail(&stderr));
    assert!(
        stderr.contains("refresh requested"),
        "the wait is visible in the log:\n{}",
        tail(&stderr)
    );
    let joins = joins(&sim);
    assert_eq!(joins.len(), 1, "{joins:?}");
    let joined_at: u128 = joins[0]
        .split_whitespace()
        .next()
        .and_then(|ms| ms.parse().ok())
        .expect("invocation time");
    assert!(
        joined_at >= fresh_at,
        "kubeadm join ran before fresh material was published"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_certificate_key_stops_a_control_plane_at_its_deadline_but_not_a_worker() {
    let sim = initialized(1, 1).await;
    let (_, good) = sim.current_join_material().await;
    let stale = publish(
        &sim,
        &JoinMaterial {
            certs_expire_at: Some(SystemTime::now() + Duration::from_secs(30)),
            ..good
        },
    )
    .await;

    let mut control_plane = sim.bootstrap_command(&sim.nodes[1]);
    control_plane.env("KUBEBOOT_TIMEOUTS_JOIN_MATERIAL", "6s");
    let (cp, worker) = tokio::join!(control_plane.output(), async { sim.bootstrap(&[2]).await });
    let cp = cp.expect("control plane runs");
    let cp_err = String::from_utf8_lossy(&cp.stderr);
    assert_eq!(cp.status.code(), Some(1), "{}", tail(&cp_err));
    assert!(
        cp_err.contains("no usable join material within 6s (timeouts.join_material)")
            && cp_err.contains("certificate key"),
        "a clear error names the deadline and why:\n{}",
        tail(&cp_err)
    );
    assert!(
        cp_err.contains("hint"),
        "the error carries a hint:\n{}",
        tail(&cp_err)
    );
    assert_ok(&worker);

    let joins = joins(&sim);
    assert_eq!(
        joins.len(),
        1,
        "only the worker ran kubeadm join: {joins:?}"
    );
    assert!(!joins[0].contains("--control-plane"), "{joins:?}");
    let request = sim
        .registry()
        .await
        .refresh_request()
        .await
        .expect("read")
        .expect("requested");
    assert_eq!(
        (request.what.as_str(), request.stale_version.as_str()),
        ("certs", stale.secret_version.as_str())
    );
    assert_eq!(sim.etcd_members(&[0]).await.len(), 1, "no member was added");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_or_malicious_join_material_is_refused_before_kubeadm_runs() {
    let sim = initialized(0, 1).await;
    let (pointer, good) = sim.current_join_material().await;
    let good_body = kubeboot::join_material::encode_wire(&good)
        .expect("encode")
        .expose()
        .clone();
    let token = good.token.expose().clone();
    let pin = good.ca_cert_hashes[0].clone();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "shell metacharacters in the token",
            good_body.replace(&token, "abcdef.0123456789ab$(id)"),
            "field `token`",
        ),
        (
            "a token of the wrong shape",
            good_body.replace(&token, "not-a-token"),
            "field `token`",
        ),
        (
            "a garbage CA hash",
            good_body.replace(&pin, "sha256:zz;rm -rf /"),
            "field `ca_cert_hashes`",
        ),
        (
            "an endpoint that smuggles flags",
            good_body.replace(&good.endpoint, "api:6443 --ignore-preflight-errors=all"),
            "field `endpoint`",
        ),
        (
            "an oversized body",
            format!("{good_body}{}", " ".repeat(20 * 1024)),
            "bytes",
        ),
        ("not JSON", format!("token={token}"), "not valid JSON"),
    ];
    let secrets = aws_sdk_secretsmanager::Client::new(&sim.moto.sdk_config().await);
    let store = sim.join_store().await;
    let worker = &sim.nodes[1];
    let registry = sim.registry().await;
    for (name, body, expected) in cases {
        let version = secrets
            .put_secret_value()
            .secret_id(store.secret_name())
            .secret_string(body)
            .send()
            .await
            .expect("put a version")
            .version_id
            .expect("version id");
        let guard = sim.leader_lock("i-leader-under-test").await;
        // The next publication after whatever is current.
        let seq = registry
            .join_pointer()
            .await
            .expect("read")
            .map_or(0, |p| p.seq)
            + 1;
        registry
            .publish_join(
                &guard,
                &JoinPointer {
                    secret_version: version,
                    seq,
                    published_at: SystemTime::now(),
                    ..pointer.clone()
                },
            )
            .await
            .expect("point at it");
        guard.release().await.expect("release");

        let run = sim.bootstrap(&[1]).await.remove(0);
        assert_eq!(run.code, Some(1), "{name}:\n{}", tail(&run.stderr));
        assert!(
            run.stderr.contains(expected) && run.stderr.contains(store.secret_name()),
            "{name}: the error names the secret and what is wrong:\n{}",
            tail(&run.stderr)
        );
        assert!(
            !run.stderr.contains("0123456789ab$(id)") && !run.stderr.contains(&token),
            "{name}: the error does not echo the material"
        );
        assert!(joins(&sim).is_empty(), "{name}: kubeadm ran");
        let kubernetes_dir = worker.dir.join("etc/kubernetes");
        assert!(
            !kubernetes_dir.exists()
                || std::fs::read_dir(&kubernetes_dir)
                    .expect("dir")
                    .next()
                    .is_none(),
            "{name}: nothing written under {}",
            kubernetes_dir.display()
        );
        assert!(
            !worker.dir.join("run/kubeboot/kubeadm-join.yaml").exists(),
            "{name}: no kubeadm configuration was rendered"
        );
    }
}
