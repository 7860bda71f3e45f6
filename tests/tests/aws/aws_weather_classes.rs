//! Which AWS failures are weather, seen from outside: a step retried after
//! a write whose answer was lost must not write twice; a refresh whose SSM
//! write keeps failing after its pointer moved is not a failed refresh, and
//! its repair backs off.
//!
//! The double: moto behind the fault-injecting proxy
//! ([`kubeboot_tests::awsproxy`]). `DropAfterForward` forwards the request
//! (the write happens upstream) and closes the connection unanswered, as a
//! lost answer does. moto's PutSecretValue, like Secrets Manager, treats a
//! ClientRequestToken it already holds with the same content as the same
//! request and adds no version (Secrets Manager API reference,
//! PutSecretValue, ClientRequestToken: "If a version with this value already
//! exists and that version's SecretString and SecretBinary values are the
//! same as those in the request, then the request is ignored"; moto
//! `secretsmanager/models.py` `_check_with_existing_secrets_and_versions`),
//! and refuses the same token with other content (ResourceExistsException).

use kubeboot::join_material::{JoinMaterial, JoinStore};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Locker, Owner, Purpose, Settings};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::Registry;
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan, Handler, ProxyResponse};
use kubeboot_tests::moto::Moto;
use kubeboot_tests::simcluster::{tail, SimCluster};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ENDPOINT: &str = "api.cluster.test:6443";

fn now_ms() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("fits"))
}

fn pins() -> Vec<String> {
    vec![format!("sha256:{}", "ab".repeat(32))]
}

async fn token_versions(secrets: &aws_sdk_secretsmanager::Client, name: &str) -> Vec<String> {
    secrets
        .list_secret_version_ids()
        .secret_id(name)
        .include_deprecated(true)
        .send()
        .await
        .expect("list versions")
        .versions()
        .iter()
        .map(|v| v.version_id().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_retried_after_a_lost_put_secret_value_answer_adds_one_version() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let table = format!("kubeboot-{}", uuid::Uuid::new_v4().simple());
    kubeboot::table::create(&dynamodb, &table)
        .await
        .expect("create table");
    let cluster = format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
        dynamodb.clone(),
        &table,
        &cluster,
    )));
    // Secrets Manager through the proxy, two attempts per call, short
    // attempt timeout: the whole call fails when every answer is lost.
    let secrets = aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::config::Builder::from(&sdk)
            .endpoint_url(proxy.endpoint())
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .build(),
            )
            .build(),
    );
    let name = format!("kubeboot/{cluster}/join");
    let store = JoinStore::new(
        secrets.clone(),
        aws_sdk_ssm::Client::new(&sdk),
        name.clone(),
        format!("kubeboot/{cluster}/certificate-key"),
        format!("/kubeboot/{cluster}"),
    );
    let locker = Locker::new(
        Arc::new(DynamoLockStore::new(dynamodb.clone(), &table, &cluster)),
        Owner::new("i-00000000000000001"),
        Settings {
            lease: Duration::from_secs(30),
            margin: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(30),
            wall_clock: Arc::new(SystemTime::now),
        },
    );
    let guard = locker.acquire(Purpose::Init).await.expect("acquire");
    // The secret exists with one version (the stack creates it).
    let first = JoinMaterial::fresh(ENDPOINT, pins(), now_ms(), false);
    let pointer = store
        .publish(&registry, &guard, &first, now_ms())
        .await
        .expect("first publish");
    assert_eq!(token_versions(&secrets, &name).await.len(), 1);

    // The next publication's PutSecretValue applies but its answers are lost.
    let next = JoinMaterial::fresh(ENDPOINT, pins(), now_ms(), false);
    proxy.set_faults(FaultPlan::always(FaultKind::DropAfterForward).only(&["PutSecretValue"]));
    let lost = store
        .stage(&guard, &next, Some(&pointer), None, now_ms())
        .await;
    assert!(lost.is_err(), "every answer was dropped: {lost:?}");
    assert!(
        !proxy.log_for("PutSecretValue").is_empty(),
        "the write reached moto"
    );
    assert_eq!(
        token_versions(&secrets, &name).await.len(),
        2,
        "the lost write applied upstream"
    );

    // The step's retry of the same material: the same token, no new version.
    proxy.clear_faults();
    let staged = store
        .stage(&guard, &next, Some(&pointer), None, now_ms())
        .await
        .expect("retried stage");
    let versions = token_versions(&secrets, &name).await;
    assert_eq!(
        versions.len(),
        2,
        "the retry of an applied write added another version: {versions:?}"
    );
    assert!(versions.contains(&staged.secret_version));
    assert_eq!(
        store
            .read_token(&staged)
            .await
            .expect("read staged")
            .token
            .expose(),
        next.token.expose()
    );
    let _ = guard.release().await;
}

/// SSM's answer to a parameter updated in quick succession (awsJson 1.1;
/// SSM API reference, PutParameter, Errors: TooManyUpdates, HTTP 400).
/// Copied from `aws_weather.rs`.
fn too_many_updates() -> ProxyResponse {
    ProxyResponse::json(
        400,
        "application/x-amz-json-1.1",
        &serde_json::json!({
            "__type": "TooManyUpdates",
            "message": "There are concurrent updates for a resource that supports one update at a time.",
        }),
    )
}

/// Every PutParameter answered with TooManyUpdates.
fn refuse_updates() -> Handler {
    Arc::new(|req| (req.operation == "PutParameter").then(too_many_updates))
}

/// The SSM discovery parameters as moto holds them (None: absent).
async fn discovery(sim: &SimCluster) -> (Option<String>, Option<String>) {
    let ssm = aws_sdk_ssm::Client::new(&sim.moto.sdk_config().await);
    let mut out = Vec::new();
    for name in ["endpoint", "ca-cert-hashes"] {
        out.push(
            ssm.get_parameter()
                .name(format!("/kubeboot/{}/{name}", sim.name))
                .send()
                .await
                .ok()
                .and_then(|o| o.parameter.and_then(|p| p.value)),
        );
    }
    (out[0].clone(), out[1].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_whose_ssm_write_fails_after_the_pointer_moved_is_no_failed_refresh_and_its_repair_backs_off(
) {
    let sim = SimCluster::start(1, 0).await;
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    let mut bootstrap = sim.bootstrap_command(&sim.nodes[0]);
    let status = bootstrap
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .expect("bootstrap");
    assert!(status.success(), "bootstrap");
    let expired = sim.expire_join_material("i-old-leader").await;
    let ssm = aws_sdk_ssm::Client::new(&sim.moto.sdk_config().await);
    ssm.delete_parameters()
        .names(format!("/kubeboot/{}/endpoint", sim.name))
        .names(format!("/kubeboot/{}/ca-cert-hashes", sim.name))
        .send()
        .await
        .expect("delete");
    // SSM refuses every update from here on.
    proxy.set_handler(refuse_updates());
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_AWS_ENDPOINTS_SSM", proxy.endpoint())
        .env("KUBEBOOT_AWS_MAX_ATTEMPTS", "2")
        .env("KUBEBOOT_AWS_INITIAL_BACKOFF", "50ms")
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let registry = sim.registry().await;
    let start = Instant::now();
    loop {
        let p = registry
            .join_pointer()
            .await
            .expect("read")
            .expect("published");
        if p.secret_version != expired {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the leader never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ten seconds of 1 s turns with SSM refusing: a repair every turn would
    // send ~20 PutParameter (2 attempts each); backing off from one turn,
    // doubling, about 4 repairs.
    let before = proxy.log_for("PutParameter").len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = proxy.log_for("PutParameter").len() - before;
    assert!(
        during >= 2,
        "the repair was tried at least once while SSM refused: {during}"
    );
    assert!(
        during <= 12,
        "the repair did not back off while SSM refused: {during} PutParameter in 10 s"
    );
    // SSM takes updates again: a later turn repairs it.
    proxy.clear_handler();
    let pointer = registry
        .join_pointer()
        .await
        .expect("read")
        .expect("published");
    let want = (
        Some(pointer.endpoint.clone()),
        Some(pointer.ca_cert_hashes.join(",")),
    );
    while discovery(&sim).await != want {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the next turns never repaired SSM"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = daemon.kill().await;
    let mut stderr = String::new();
    if let Some(mut e) = daemon.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    sim.record_output(&stderr);
    assert!(
        stderr.contains("fresh join material published"),
        "{}",
        tail(&stderr)
    );
    assert!(
        !stderr.contains("join material refresh failed"),
        "a refresh whose pointer moved was logged as failed: {}",
        tail(&stderr)
    );
}
