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

use crate::ssm_weather::{refresh_through, refuse_updates, repaired_then_stopped};
use kubeboot::join_material::JoinMaterial;
use kubeboot::lock::Purpose;
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::fixtures::{self, now_ms, MotoTable};
use kubeboot_tests::simcluster::{tail, SimCluster};
use std::process::Stdio;
use std::time::Duration;

const ENDPOINT: &str = "api.cluster.test:6443";

fn pins() -> Vec<String> {
    vec![format!("sha256:{}", "ab".repeat(32))]
}

async fn token_versions(secrets: &aws_sdk_secretsmanager::Client, name: &str) -> Vec<String> {
    fixtures::secret_versions(secrets, name)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_retried_after_a_lost_put_secret_value_answer_adds_one_version() {
    let aws = MotoTable::start().await;
    let sdk = aws.sdk.clone();
    let proxy = AwsProxy::start(&aws.moto.endpoint()).await;
    let registry = aws.registry();
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
    let name = aws.secret_name();
    let store = aws.join_store_with(secrets.clone(), aws.ssm());
    let locker = fixtures::locker(
        aws.lock_store(),
        "i-00000000000000001",
        fixtures::lock_settings(
            Duration::from_secs(30),
            Duration::from_secs(5),
            Duration::from_secs(30),
        ),
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
    // SSM refuses every update from here on.
    proxy.set_handler(refuse_updates(usize::MAX).0);
    let (daemon, _, start) = refresh_through(&sim, &proxy).await;
    // Ten seconds of 1 s turns with SSM refusing: a repair every turn would
    // be ~10 repairs; backing off from one turn, doubling, about 4. A repair
    // writes both discovery parameters at once (2 attempts each, the second
    // often cancelled by the first's refusal), so repairs are counted as
    // bursts of PutParameter, not as calls.
    let repairs = repairs_within(&proxy, Duration::from_secs(10)).await;
    assert!(
        repairs >= 1,
        "the repair was tried at least once while SSM refused: {repairs}"
    );
    assert!(
        repairs <= 5,
        "the repair did not back off while SSM refused: {repairs} repairs in 10 s"
    );
    // SSM takes updates again: a later turn repairs it.
    proxy.clear_handler();
    let stderr = repaired_then_stopped(&sim, daemon, start).await;
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

/// Repairs seen by `proxy` within `window`: bursts of PutParameter calls,
/// one burst being calls less than 400 ms apart (a repair's attempts are
/// 50 ms apart; turns are 1 s apart).
async fn repairs_within(proxy: &AwsProxy, window: Duration) -> usize {
    let started = std::time::Instant::now();
    let mut seen = proxy.log_for("PutParameter").len();
    let mut last_call: Option<std::time::Instant> = None;
    let mut bursts = 0;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = proxy.log_for("PutParameter").len();
        if now > seen {
            let quiet = last_call.is_none_or(|at| at.elapsed() >= Duration::from_millis(400));
            if quiet {
                bursts += 1;
            }
            last_call = Some(std::time::Instant::now());
            seen = now;
        }
    }
    bursts
}
