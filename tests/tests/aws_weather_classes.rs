//! Which AWS failures are weather, seen from outside: a step retried after
//! a write whose answer was lost must not write twice.
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
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::moto::Moto;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
