//! Join material on moto_server through the real Secrets Manager, SSM and
//! DynamoDB clients: the secret version readers use is the one the fenced
//! registry pointer names, never merely the newest one.

use kubeboot::catalogue::Coded;
use kubeboot::join_material::{
    self, JoinMaterial, JoinStore, Refresh, SSM_CA_CERT_HASHES, SSM_ENDPOINT,
};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Guard, LockStore, Purpose, StoreError};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{JoinPointer, Registry};
use kubeboot_tests::fixtures::{self, lock_settings, now_ms, Intercepted, LockHooks, MotoTable};
use std::time::{Duration, SystemTime};

const LEASE: Duration = Duration::from_secs(6);
const MARGIN: Duration = Duration::from_secs(1);
const ENDPOINT: &str = "api.cluster.test:6443";

type Fixture = MotoTable;

/// A moto and table of the test's own, and a node's join store and registry.
async fn setup() -> (Fixture, JoinStore, Registry<DynamoRegistryStore>) {
    let fx = MotoTable::start().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    (fx, store, registry)
}

/// Publishes fresh material (with certificates) now as `guard`'s holder:
/// the material, its pointer and the time it was published at.
async fn publish_fresh(
    store: &JoinStore,
    registry: &Registry<DynamoRegistryStore>,
    guard: &Guard,
) -> (JoinMaterial, JoinPointer, SystemTime) {
    let now = now_ms();
    let material = JoinMaterial::fresh(ENDPOINT, pins(), now, true);
    let pointer = store
        .publish(registry, guard, &material, now)
        .await
        .expect("publish");
    (material, pointer, now)
}

/// `instance`'s `purpose` lock over `store`, with short leases.
async fn acquire<S: LockStore>(store: S, instance: &str, purpose: Purpose, what: &str) -> Guard {
    let settings = lock_settings(LEASE, MARGIN, Duration::from_secs(30));
    fixtures::locker(store, instance, settings)
        .acquire(purpose)
        .await
        .expect(what)
}

/// Every version of the join secret: (VersionId, staging labels).
async fn join_versions(fx: &Fixture) -> Vec<(String, Vec<String>)> {
    fixtures::secret_versions(&fx.secrets(), &fx.secret_name()).await
}

/// The first holder of `purpose`.
async fn first_holder(fx: &Fixture, purpose: Purpose) -> Guard {
    acquire(fx.lock_store(), "i-00000000000000001", purpose, "acquire").await
}

/// The first holder of `purpose`, whose renewals never reach the table
/// while it believes they do (see [`Frozen`]).
async fn frozen_holder(fx: &Fixture, purpose: Purpose) -> Guard {
    let store = Intercepted::new(fx.lock_store(), Frozen);
    acquire(store, "i-00000000000000001", purpose, "old acquires").await
}

/// A lock store whose renewals "succeed" without reaching the table: the
/// holder keeps believing it holds the lock (as a paused or partitioned
/// process does) while the record stands still and a waiter takes it over.
struct Frozen;

impl LockHooks<DynamoLockStore> for Frozen {
    async fn heartbeat(
        &self,
        _inner: &DynamoLockStore,
        _purpose: Purpose,
        _owner: &str,
        _old: &str,
        _new: &str,
        _wall: SystemTime,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }
}

fn pins() -> Vec<String> {
    vec![
        format!("sha256:{}", "ab".repeat(32)),
        format!("sha256:{}", "cd".repeat(32)),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn published_material_is_read_back_from_the_pointed_version() {
    let (fx, store, registry) = setup().await;
    assert!(
        store.current(&registry).await.expect("read").is_none(),
        "nothing published yet"
    );
    let guard = first_holder(&fx, Purpose::Init).await;
    // The secret does not exist yet: publish creates it.
    let (material, pointer, now) = publish_fresh(&store, &registry, &guard).await;
    assert_eq!(
        registry.join_pointer().await.expect("pointer"),
        Some(pointer.clone())
    );
    assert_eq!(pointer.endpoint, ENDPOINT);
    assert_eq!(pointer.ca_cert_hashes, pins());
    assert_eq!(pointer.token_expires_at, now + join_material::TOKEN_TTL);
    assert_eq!(
        pointer.certs_expire_at,
        Some(now + join_material::CERTS_TTL)
    );

    // Another node, with its own clients, reads the same material.
    let read = fx
        .join_store()
        .current(&fx.registry())
        .await
        .expect("read")
        .expect("published");
    assert_eq!(read, material);
    assert_eq!(
        join_versions(&fx).await,
        vec![(
            pointer.secret_version.clone(),
            vec!["AWSCURRENT".to_string()]
        )]
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_replaces_the_token_and_readers_see_the_new_one() {
    let (fx, store, registry) = setup().await;
    let guard = first_holder(&fx, Purpose::Leader).await;
    let start = now_ms();
    let first = JoinMaterial::fresh(ENDPOINT, pins(), start, true);
    let p1 = store
        .publish(&registry, &guard, &first, start)
        .await
        .expect("publish first");

    // Near the token's end the refresher asks for a new token only.
    let later = start + join_material::TOKEN_TTL - Duration::from_secs(30 * 60);
    let refresh = first.refresh_needed(later, Duration::from_secs(3600), Duration::ZERO);
    assert!(refresh.token(), "{refresh:?}");
    let second = first.refreshed(Refresh::Token, later);
    let p2 = store
        .publish(&registry, &guard, &second, later)
        .await
        .expect("publish refresh");
    assert_ne!(p1.secret_version, p2.secret_version);

    let read = fx
        .join_store()
        .current(&fx.registry())
        .await
        .expect("read")
        .expect("published");
    assert_eq!(read, second);
    assert_ne!(read.token, first.token, "the token was replaced");
    assert_eq!(
        read.certificate_key, first.certificate_key,
        "the certs were not"
    );
    assert_eq!(read.token_expires_at, later + join_material::TOKEN_TTL);
    assert_eq!(
        registry
            .join_pointer()
            .await
            .expect("pointer")
            .map(|p| p.secret_version),
        Some(p2.secret_version)
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_that_lost_its_lock_cannot_make_its_version_current() {
    let (fx, store, registry) = setup().await;
    // The old holder's renewals never reach the table, but it believes they do.
    let old = frozen_holder(&fx, Purpose::Leader).await;
    let now = now_ms();
    store
        .publish(
            &registry,
            &old,
            &JoinMaterial::fresh(ENDPOINT, pins(), now, true),
            now,
        )
        .await
        .expect("old publishes while it holds");

    // A new holder takes over after one lease and publishes its material.
    let new = acquire(
        fx.lock_store(),
        "i-00000000000000002",
        Purpose::Leader,
        "new takes over",
    )
    .await;
    let current = JoinMaterial::fresh(ENDPOINT, pins(), now_ms(), true);
    let pointer = store
        .publish(&registry, &new, &current, now_ms())
        .await
        .expect("new publishes");

    // The old holder wakes up, still sure it holds the lock, and publishes.
    assert!(
        old.is_held(),
        "the frozen holder believes it holds the lock"
    );
    let stale = JoinMaterial::fresh(ENDPOINT, pins(), now_ms(), true);
    let err = store
        .publish(&registry, &old, &stale, now_ms())
        .await
        .expect_err("a stale publisher must be refused");
    let text = format!("{err} {err:?} {}", err.hint());
    println!("stale publisher: {err} (hint: {})", err.hint());
    assert!(
        matches!(
            err,
            join_material::Error::Registry(kubeboot::registry::Error::LockLost { .. })
        ),
        "{text}"
    );
    assert!(!text.contains(stale.token.expose().as_str()), "{text}");

    // Its secret version was written (and is even AWSCURRENT), but it is an
    // orphan: the pointer did not move and readers get the new holder's.
    assert_eq!(
        registry.join_pointer().await.expect("pointer"),
        Some(pointer.clone())
    );
    let versions = join_versions(&fx).await;
    let orphan = versions
        .iter()
        .find(|(_, stages)| stages.iter().any(|s| s == "AWSCURRENT"))
        .map(|(id, _)| id.clone())
        .expect("a current version");
    assert_ne!(orphan, pointer.secret_version, "{versions:?}");
    let read = store
        .current(&registry)
        .await
        .expect("read")
        .expect("published");
    assert_eq!(read, current);
    assert_ne!(read.token, stale.token);

    // The refused write told the guard; the next attempt fails before writing.
    assert!(!old.is_held());
    let err = store
        .publish(&registry, &old, &stale, now_ms())
        .await
        .expect_err("lost");
    assert!(matches!(err, join_material::Error::Lock(_)), "{err}");
    assert_eq!(
        join_versions(&fx).await.len(),
        versions.len(),
        "nothing written"
    );
    new.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_values_are_in_ssm_and_secrets_are_not() {
    let (fx, store, registry) = setup().await;
    let guard = first_holder(&fx, Purpose::Init).await;
    let (material, _, _) = publish_fresh(&store, &registry, &guard).await;

    assert_eq!(parameter(&fx, &store, SSM_ENDPOINT).await, ENDPOINT);
    assert_eq!(
        parameter(&fx, &store, SSM_CA_CERT_HASHES).await,
        pins().join(",")
    );

    let all = fx
        .ssm()
        .get_parameters_by_path()
        .path(format!("/kubeboot/{}", fx.cluster))
        .recursive(true)
        .with_decryption(true)
        .send()
        .await
        .expect("list parameters");
    let params = all.parameters();
    assert_eq!(params.len(), 2, "{params:?}");
    let token = material.token.expose();
    let key = material.certificate_key.as_ref().expect("key").expose();
    let (token_id, token_secret) = token.split_once('.').expect("token shape");
    for p in params {
        let value = p.value().unwrap_or_default();
        for secret in [token.as_str(), token_id, token_secret, key.as_str()] {
            assert!(
                !value.contains(secret),
                "SSM parameter {:?} holds a secret",
                p.name()
            );
        }
    }
    guard.release().await.expect("release");
}

/// The SSM value of discovery parameter `name`.
async fn parameter(fx: &Fixture, store: &JoinStore, name: &str) -> String {
    fx.ssm()
        .get_parameter()
        .name(store.parameter(name))
        .send()
        .await
        .expect("parameter exists")
        .parameter()
        .and_then(|p| p.value())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_whose_clock_runs_ahead_does_not_block_the_next_publication() {
    let (fx, store, registry) = setup().await;
    let guard = first_holder(&fx, Purpose::Leader).await;
    // A publisher on a host whose clock is two hours ahead.
    let ahead = now_ms() + Duration::from_secs(2 * 3600);
    let first = store
        .publish(
            &registry,
            &guard,
            &JoinMaterial::fresh(ENDPOINT, pins(), ahead, true),
            ahead,
        )
        .await
        .expect("publish with a clock ahead");
    // The next publication, from a host with the right time, is not refused:
    // publications are ordered by their number, not by anyone's clock.
    let now = now_ms();
    let second = store
        .publish(
            &registry,
            &guard,
            &JoinMaterial::fresh(ENDPOINT, pins(), now, true),
            now,
        )
        .await
        .expect("a later publication with an earlier clock");
    assert_eq!(second.seq, first.seq + 1);
    assert_eq!(
        registry.join_pointer().await.expect("read"),
        Some(second.clone())
    );
    // A pointer write that skips or repeats a number is refused.
    let again = JoinMaterial::fresh(ENDPOINT, pins(), now, true).pointer(
        "v-late".into(),
        None,
        second.seq,
        now,
    );
    let err = registry
        .publish_join(&guard, &again)
        .await
        .expect_err("publication number already taken");
    assert!(
        matches!(err, kubeboot::registry::Error::Conflict { .. }),
        "{err}"
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_that_lost_its_lock_cannot_overwrite_the_discovery_values() {
    let (fx, store, registry) = setup().await;
    let old = frozen_holder(&fx, Purpose::Init).await;
    // The new holder initialized a new generation with a new CA.
    let new = acquire(
        fx.lock_store(),
        "i-00000000000000002",
        Purpose::Init,
        "new takes over",
    )
    .await;
    let new_pins = vec![format!("sha256:{}", "12".repeat(32))];
    store
        .publish(
            &registry,
            &new,
            &JoinMaterial::fresh(ENDPOINT, new_pins.clone(), now_ms(), true),
            now_ms(),
        )
        .await
        .expect("new publishes");

    // The stale holder wakes up and publishes its generation's CA pin.
    let stale_endpoint = "stale.cluster.test:6443";
    let err = store
        .publish(
            &registry,
            &old,
            &JoinMaterial::fresh(stale_endpoint, pins(), now_ms(), true),
            now_ms(),
        )
        .await
        .expect_err("stale publisher refused");
    assert!(
        matches!(
            err,
            join_material::Error::Registry(kubeboot::registry::Error::LockLost { .. })
        ),
        "{err}"
    );
    // Operators and tools reading SSM still see the new generation's values.
    assert_eq!(
        parameter(&fx, &store, SSM_CA_CERT_HASHES).await,
        new_pins.join(",")
    );
    assert_eq!(parameter(&fx, &store, SSM_ENDPOINT).await, ENDPOINT);
    new.release().await.expect("release");
}
