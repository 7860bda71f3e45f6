//! AWS weather during bootstrap and publication (issue 14, items 9 and 10).
//!
//! At hundreds of nodes booting at once, throttling and 5xx answers that
//! outlast the SDK's attempts are normal. A bootstrap step waits them out
//! within its own deadline (`lock.acquire_timeout` for the cluster record,
//! `timeouts.join_material` for join material), counts each exhausted call
//! (`AwsCallsExhausted`, Service and Operation) and fails only when the
//! deadline passes, with KB-BOOT-005. A permanent refusal still fails at once.
//!
//! SSM answers `TooManyUpdates` (HTTP 400, awsJson 1.1 `__type`
//! `TooManyUpdates`, "There are concurrent updates for a resource that
//! supports one update at a time"; SSM API reference, PutParameter, Errors)
//! to a parameter updated in quick succession; the AWS SDKs' default
//! throttling list (aws-runtime `THROTTLING_ERRORS`) does not hold it, so
//! the agent adds it to its SSM client's retry classifiers. The proxy's
//! answer below has exactly that shape; moto never gives it.
//!
//! The AWS proxy sits in front of moto for one service at a time
//! (`KUBEBOOT_AWS_ENDPOINTS_*`), so the rest of the node's AWS stays calm.

use crate::ssm_weather::{
    discovery, expected_discovery, refresh_through, refuse_updates, repaired_then_stopped,
};
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan, ProxyResponse};
use kubeboot_tests::simcluster::{log_lines, tail, SimCluster};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the weather lasts in the "waited out" scenarios: several times
/// the SDK's attempts (2 attempts, 50 ms backoff) and several step retries.
const STRETCH: Duration = Duration::from_secs(20);

/// Runs `kubeboot bootstrap` on node `index` with `envs`, lets `weather`
/// last `stretch` (None: all along), then calls `clear`; returns the exit
/// code, stderr and the elapsed time.
async fn bootstrap_through(
    sim: &SimCluster,
    index: usize,
    envs: &[(&str, String)],
    stretch: Option<Duration>,
    clear: impl FnOnce(),
) -> (Option<i32>, String, Duration) {
    let mut cmd = sim.bootstrap_command(&sim.nodes[index]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bootstrap");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s).await;
        s
    });
    if let Some(stretch) = stretch {
        tokio::select! {
            _ = tokio::time::sleep(stretch) => {}
            _ = child.wait() => {}
        }
        clear();
    }
    let status = tokio::time::timeout(Duration::from_secs(240), child.wait())
        .await
        .expect("bootstrap ends within 240 s")
        .expect("wait");
    let stderr = reader.await.expect("stderr");
    sim.record_output(&stderr);
    (status.code(), stderr, started.elapsed())
}

/// The `AwsCallsExhausted` documents the node wrote, as (Service, Operation).
fn exhausted(sim: &SimCluster) -> Vec<(String, String)> {
    sim.metrics_documents()
        .iter()
        .filter(|d| d["AwsCallsExhausted"].as_f64().is_some())
        .map(|d| {
            (
                d["Service"].as_str().unwrap_or_default().to_string(),
                d["Operation"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The last JSON log line (the error report of a failed run).
fn last_line(stderr: &str) -> serde_json::Value {
    log_lines(stderr).pop().unwrap_or_default()
}

/// Few SDK attempts, short backoff: the SDK gives up quickly, so the
/// bootstrap step's own wait is what carries the node through.
fn few_attempts() -> Vec<(&'static str, String)> {
    vec![
        ("KUBEBOOT_AWS_MAX_ATTEMPTS", "2".into()),
        ("KUBEBOOT_AWS_INITIAL_BACKOFF", "50ms".into()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_waits_out_dynamodb_throttling_and_5xx_and_counts_them() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_faults(FaultPlan {
        throttle: 0.5,
        server_error: 0.5,
        ..FaultPlan::default()
    });
    let mut envs = few_attempts();
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_DYNAMODB", proxy.endpoint()));
    let (code, stderr, elapsed) =
        bootstrap_through(&sim, 0, &envs, Some(STRETCH), || proxy.clear_faults()).await;
    assert_eq!(code, Some(0), "after {elapsed:?}:\n{}", tail(&stderr));
    assert!(elapsed >= STRETCH, "the weather lasted the whole stretch");
    let stats = proxy.stats();
    assert!(stats.throttled > 0 && stats.server_errors > 0, "{stats:?}");
    let counted = exhausted(&sim);
    assert!(
        counted.iter().any(|(s, _)| s == "DynamoDB"),
        "AwsCallsExhausted counted the weather: {counted:?}"
    );
    assert!(
        stderr.contains("AWS is throttling or failing"),
        "a warning says what is waited for:\n{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_init_waits_out_secrets_manager_5xx_while_storing_its_join_material() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_faults(
        FaultPlan::always(FaultKind::ServerError).only(&["PutSecretValue", "CreateSecret"]),
    );
    let mut envs = few_attempts();
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_SECRETSMANAGER", proxy.endpoint()));
    let (code, stderr, elapsed) =
        bootstrap_through(&sim, 0, &envs, Some(STRETCH), || proxy.clear_faults()).await;
    assert_eq!(code, Some(0), "after {elapsed:?}:\n{}", tail(&stderr));
    assert!(proxy.stats().server_errors > 0, "{:?}", proxy.stats());
    let counted = exhausted(&sim);
    assert!(
        counted.iter().any(|(s, _)| s == "SecretsManager"),
        "AwsCallsExhausted counted the weather: {counted:?}"
    );
    // The material published is the one joiners can read.
    sim.current_join_material().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_waits_out_a_throttled_join_secret_within_timeouts_join_material() {
    let sim = SimCluster::start(1, 1).await;
    let cp = sim.bootstrap(&[0]).await;
    assert_eq!(cp[0].code, Some(0), "{}", tail(&cp[0].stderr));
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_faults(FaultPlan::always(FaultKind::Throttle).only(&["GetSecretValue"]));
    let mut envs = few_attempts();
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_SECRETSMANAGER", proxy.endpoint()));
    let (code, stderr, elapsed) =
        bootstrap_through(&sim, 1, &envs, Some(STRETCH), || proxy.clear_faults()).await;
    assert_eq!(code, Some(0), "after {elapsed:?}:\n{}", tail(&stderr));
    assert!(proxy.stats().throttled > 0, "{:?}", proxy.stats());
    let counted = exhausted(&sim);
    assert!(
        counted
            .iter()
            .any(|(s, o)| s == "SecretsManager" && o == "GetSecretValue"),
        "AwsCallsExhausted counted the weather: {counted:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn weather_that_outlasts_the_deadline_fails_with_the_weather_error_and_its_hint() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_faults(FaultPlan::always(FaultKind::Throttle));
    let mut envs = few_attempts();
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_DYNAMODB", proxy.endpoint()));
    envs.push(("KUBEBOOT_LOCK_ACQUIRE_TIMEOUT", "10s".into()));
    let (code, stderr, elapsed) = bootstrap_through(&sim, 0, &envs, None, || {}).await;
    assert_eq!(code, Some(1), "{}", tail(&stderr));
    let line = last_line(&stderr);
    assert_eq!(line["code"], "KB-BOOT-005", "{}", tail(&stderr));
    let text = line.to_string();
    assert!(
        text.contains("lock.acquire_timeout") && text.contains("DynamoDB"),
        "names the deadline and the service: {line:#}"
    );
    assert!(
        elapsed >= Duration::from_secs(10),
        "waited out the deadline first ({elapsed:?})"
    );
    assert!(!exhausted(&sim).is_empty(), "the weather was counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn access_denied_still_fails_at_once_with_its_hint() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    // What DynamoDB answers a role without dynamodb:GetItem: HTTP 400,
    // awsJson 1.0 `__type` com.amazon.coral.service#AccessDeniedException.
    proxy.set_handler(Arc::new(|req| {
        (req.operation == "GetItem").then(|| {
            ProxyResponse::json(
                400,
                "application/x-amz-json-1.0",
                &serde_json::json!({
                    "__type": "com.amazon.coral.service#AccessDeniedException",
                    "Message": "User: arn:aws:sts::123456789012:assumed-role/node/i-0 is not authorized to perform: dynamodb:GetItem on resource: arn:aws:dynamodb:us-east-1:123456789012:table/kubeboot because no identity-based policy allows the dynamodb:GetItem action",
                }),
            )
        })
    }));
    let mut envs = few_attempts();
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_DYNAMODB", proxy.endpoint()));
    let (code, stderr, elapsed) = bootstrap_through(&sim, 0, &envs, None, || {}).await;
    assert_eq!(code, Some(1), "{}", tail(&stderr));
    assert!(
        elapsed < Duration::from_secs(15),
        "failed fast, not after the lock deadline ({elapsed:?})"
    );
    let line = last_line(&stderr);
    assert_ne!(line["code"], "KB-BOOT-005", "{line:#}");
    assert!(
        line.to_string().contains("may call"),
        "the permission hint: {line:#}"
    );
    assert!(exhausted(&sim).is_empty(), "a refusal is not weather");
}

#[tokio::test(flavor = "multi_thread")]
async fn ssm_too_many_updates_for_a_few_attempts_is_retried_by_the_sdk() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    let (handler, seen) = refuse_updates(2);
    proxy.set_handler(handler);
    let envs = [("KUBEBOOT_AWS_ENDPOINTS_SSM", proxy.endpoint())];
    let (code, stderr, _) = bootstrap_through(&sim, 0, &envs, None, || {}).await;
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert!(
        !stderr.contains("left to the leader"),
        "the SDK's retries got the write through:\n{}",
        tail(&stderr)
    );
    let attempts = seen.lock().expect("counts").clone();
    assert_eq!(attempts.len(), 2, "both parameters: {attempts:?}");
    assert!(attempts.values().all(|&n| n == 3), "{attempts:?}");
    let refused = proxy
        .log_for("PutParameter")
        .iter()
        .filter(|r| r.status == Some(400))
        .count();
    assert_eq!(refused, 4, "{:?}", proxy.log_for("PutParameter"));
    assert_eq!(discovery(&sim).await, expected_discovery(&sim).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_whose_ssm_write_keeps_failing_is_complete_for_joiners_and_the_next_turn_repairs_ssm(
) {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    let (handler, _) = refuse_updates(usize::MAX);
    proxy.set_handler(handler);
    // The init's publication: SSM refuses every update.
    let envs = [("KUBEBOOT_AWS_ENDPOINTS_SSM", proxy.endpoint())];
    let (code, stderr, _) = bootstrap_through(&sim, 0, &envs, None, || {}).await;
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    assert_eq!(
        discovery(&sim).await,
        (None, None),
        "SSM refused everything"
    );

    // A refresh's publication, SSM still refusing. (The harness's stand-in
    // publisher of the expired material writes SSM directly: take away
    // what it wrote, so SSM holds only what the agent managed to write.)
    let (daemon, pointer, start) = refresh_through(&sim, &proxy).await;
    // A few more turns with SSM refusing.
    let refused_before = proxy.log_for("PutParameter").len();
    while proxy.log_for("PutParameter").len() < refused_before + 4 {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "after the failed write the leader's next turns never tried SSM again (nothing repairs it)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What joiners use is complete and consistent: the pointer names a
    // secret version that reads back and agrees with it, and the token in
    // it is the one kubeadm created.
    let material = sim
        .join_store()
        .await
        .read(&pointer)
        .await
        .expect("the pointer names readable material");
    let created = sim.kubeadm_runs("token create", None);
    assert_eq!(created.len(), 1, "one token rotated in the cluster");
    assert!(
        material.token_expires_at > std::time::SystemTime::now(),
        "the fresh token is published"
    );
    assert_eq!(discovery(&sim).await, (None, None), "only SSM is behind");

    // SSM takes updates again: the next turn writes the discovery values.
    proxy.clear_handler();
    let stderr = repaired_then_stopped(&sim, daemon, start).await;
    assert!(
        stderr.contains("writing the discovery parameters"),
        "{}",
        tail(&stderr)
    );
}

/// Every fenced registry write of an init (start a generation, forget or
/// record a member, publish the pointer, mark initialized: all
/// TransactWriteItems) is, most of the time, applied by DynamoDB with its
/// answer lost (0.3) or throttled (0.65), with a single SDK attempt. The
/// registry reads a failed write back and tries it again a few times; with
/// this seed (11) starting the generation outlasts those and its bootstrap
/// step runs it again (counted). Each write still lands once: one
/// generation, one kubeadm init, one publication, one member record.
#[tokio::test(flavor = "multi_thread")]
async fn an_init_whose_writes_apply_but_lose_their_answers_lands_each_write_once() {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await.with_seed(11);
    proxy.set_faults(
        FaultPlan {
            drop_after_forward: 0.3,
            throttle: 0.65,
            ..FaultPlan::default()
        }
        .only(&["TransactWriteItems"]),
    );
    // One SDK attempt: a lost answer is the registry's read-back, then the step's.
    let mut envs = vec![("KUBEBOOT_AWS_MAX_ATTEMPTS", "1".to_string())];
    envs.push(("KUBEBOOT_AWS_ENDPOINTS_DYNAMODB", proxy.endpoint()));
    let (code, stderr, elapsed) = bootstrap_through(&sim, 0, &envs, None, || {}).await;
    proxy.clear_faults();
    assert_eq!(code, Some(0), "after {elapsed:?}:\n{}", tail(&stderr));
    let stats = proxy.stats();
    assert!(
        stats.dropped_after_forward > 0 && stats.throttled > 0,
        "with this seed writes were both lost after applying and throttled: {stats:?}"
    );
    let counted = exhausted(&sim);
    assert!(
        counted
            .iter()
            .any(|(s, o)| s == "DynamoDB" && o == "begin init"),
        "with this seed starting the generation outlasted the registry's own attempts and its step ran it again: {counted:?}"
    );
    let registry = sim.registry().await;
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, kubeboot::registry::Phase::Initialized);
    assert_eq!(state.generation, 1, "one generation, not a second start");
    let inits = sim
        .kubeadm_runs("init", None)
        .iter()
        .filter(|r| r.exit == 0)
        .count();
    assert_eq!(inits, 1, "exactly one kubeadm init");
    let pointer = sim.join_pointer().await;
    assert_eq!(pointer.seq, 1, "one publication: {pointer:?}");
    assert_eq!(registry.members().await.expect("records").len(), 1);
}
