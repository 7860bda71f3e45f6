//! SSM weather the `aws_weather` and `aws_weather_classes` scenarios share:
//! the proxy's TooManyUpdates answer, the discovery parameters as moto holds
//! them, and a leader's refresh with SSM behind the proxy, from its start to
//! the repair of SSM.

use kubeboot::registry::JoinPointer;
use kubeboot_tests::awsproxy::{AwsProxy, Handler, ProxyResponse};
use kubeboot_tests::simcluster::{read_stderr, SimCluster};
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// SSM's answer to a parameter updated in quick succession (awsJson 1.1;
/// SSM API reference, PutParameter, Errors: TooManyUpdates, HTTP 400).
pub(crate) fn too_many_updates() -> ProxyResponse {
    ProxyResponse::json(
        400,
        "application/x-amz-json-1.1",
        &serde_json::json!({
            "__type": "TooManyUpdates",
            "message": "There are concurrent updates for a resource that supports one update at a time.",
        }),
    )
}

/// A handler that answers the first `n` PutParameter requests for each
/// parameter name with TooManyUpdates (`usize::MAX`: all of them).
pub(crate) fn refuse_updates(n: usize) -> (Handler, Arc<Mutex<HashMap<String, usize>>>) {
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let counts = seen.clone();
    let handler: Handler = Arc::new(move |req| {
        if req.operation != "PutParameter" {
            return None;
        }
        let name = req
            .json()
            .and_then(|j| j["Name"].as_str().map(str::to_string))
            .unwrap_or_default();
        let mut seen = counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = seen.entry(name).or_insert(0);
        *c += 1;
        (*c <= n).then(too_many_updates)
    });
    (handler, seen)
}

/// The SSM discovery parameters as moto holds them (None: absent).
pub(crate) async fn discovery(sim: &SimCluster) -> (Option<String>, Option<String>) {
    let ssm = aws_sdk_ssm::Client::new(&sim.moto.sdk_config().await);
    let get = |name: &'static str| {
        let ssm = ssm.clone();
        let full = format!("/kubeboot/{}/{name}", sim.name);
        async move {
            ssm.get_parameter()
                .name(full)
                .send()
                .await
                .ok()
                .and_then(|o| o.parameter.and_then(|p| p.value))
        }
    };
    (get("endpoint").await, get("ca-cert-hashes").await)
}

/// What the discovery parameters must hold for the current pointer.
pub(crate) async fn expected_discovery(sim: &SimCluster) -> (Option<String>, Option<String>) {
    let pointer = sim.join_pointer().await;
    (
        Some(pointer.endpoint),
        Some(pointer.ca_cert_hashes.join(",")),
    )
}

/// A refresh by the leader daemon on node 0 with SSM behind `proxy` (two
/// attempts a call): the cluster's join material is published again as
/// expired and the discovery parameters the harness's publisher wrote are
/// taken away, so SSM holds only what the agent manages to write. Returns
/// the daemon (its stderr piped), the pointer its refresh published and
/// when it started.
pub(crate) async fn refresh_through(
    sim: &SimCluster,
    proxy: &AwsProxy,
) -> (tokio::process::Child, JoinPointer, Instant) {
    let expired = sim.expire_join_material("i-old-leader").await;
    let ssm = aws_sdk_ssm::Client::new(&sim.moto.sdk_config().await);
    ssm.delete_parameters()
        .names(format!("/kubeboot/{}/endpoint", sim.name))
        .names(format!("/kubeboot/{}/ca-cert-hashes", sim.name))
        .send()
        .await
        .expect("delete");
    let daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_AWS_ENDPOINTS_SSM", proxy.endpoint())
        .env("KUBEBOOT_AWS_MAX_ATTEMPTS", "2")
        .env("KUBEBOOT_AWS_INITIAL_BACKOFF", "50ms")
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let start = Instant::now();
    let pointer = loop {
        let p = sim.join_pointer().await;
        if p.secret_version != expired {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the leader never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    (daemon, pointer, start)
}

/// Once SSM takes updates again: waits (two minutes from `start` at most)
/// until a later turn of `daemon` repaired the discovery parameters, stops
/// it and returns its stderr (recorded for the cluster's scans).
pub(crate) async fn repaired_then_stopped(
    sim: &SimCluster,
    mut daemon: tokio::process::Child,
    start: Instant,
) -> String {
    let want = expected_discovery(sim).await;
    while discovery(sim).await != want {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the next turns never repaired SSM"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = daemon.kill().await;
    let stderr = read_stderr(&mut daemon).await;
    sim.record_output(&stderr);
    stderr
}
