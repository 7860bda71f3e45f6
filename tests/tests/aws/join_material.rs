//! Join material on moto_server through the real Secrets Manager, SSM and
//! DynamoDB clients: the secret version readers use is the one the fenced
//! registry pointer names, never merely the newest one.

use kubeboot::join_material::{
    self, JoinMaterial, JoinStore, Refresh, SSM_CA_CERT_HASHES, SSM_ENDPOINT,
};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Claim, LockItem, LockStore, Locker, Owner, Purpose, Settings, StoreError};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::Registry;
use kubeboot_tests::moto::Moto;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LEASE: Duration = Duration::from_secs(6);
const MARGIN: Duration = Duration::from_secs(1);
const ENDPOINT: &str = "api.cluster.test:6443";

struct Fixture {
    _moto: Moto,
    sdk: aws_config::SdkConfig,
    dynamodb: aws_sdk_dynamodb::Client,
    table: String,
    cluster: String,
}

impl Fixture {
    async fn new() -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config().await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let table = format!("kubeboot-{}", uuid::Uuid::new_v4().simple());
        kubeboot::table::create(&dynamodb, &table)
            .await
            .expect("create table");
        Fixture {
            _moto: moto,
            sdk,
            dynamodb,
            table,
            cluster: format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        }
    }

    fn lock_store(&self) -> DynamoLockStore {
        DynamoLockStore::new(self.dynamodb.clone(), &self.table, &self.cluster)
    }

    fn registry(&self) -> Registry<DynamoRegistryStore> {
        Registry::new(Arc::new(DynamoRegistryStore::new(
            self.dynamodb.clone(),
            &self.table,
            &self.cluster,
        )))
    }

    /// A node's view: its own clients, the names the config derives.
    fn join_store(&self) -> JoinStore {
        JoinStore::new(
            self.secrets(),
            self.ssm(),
            self.secret_name(),
            format!("kubeboot/{}/certificate-key", self.cluster),
            format!("/kubeboot/{}", self.cluster),
        )
    }

    fn secret_name(&self) -> String {
        format!("kubeboot/{}/join", self.cluster)
    }

    fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.sdk)
    }

    fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk)
    }

    fn locker<S: LockStore>(&self, store: S, instance: &str) -> Locker<S> {
        Locker::new(
            Arc::new(store),
            Owner::new(instance),
            Settings {
                lease: LEASE,
                margin: MARGIN,
                acquire_timeout: Duration::from_secs(30),
                wall_clock: Arc::new(SystemTime::now),
            },
        )
    }

    /// Every version of the join secret: (VersionId, staging labels).
    async fn versions(&self) -> Vec<(String, Vec<String>)> {
        self.secrets()
            .list_secret_version_ids()
            .secret_id(self.secret_name())
            .include_deprecated(true)
            .send()
            .await
            .expect("list versions")
            .versions()
            .iter()
            .map(|v| {
                (
                    v.version_id().unwrap_or_default().to_string(),
                    v.version_stages().to_vec(),
                )
            })
            .collect()
    }
}

/// A lock store whose renewals "succeed" without reaching the table: the
/// holder keeps believing it holds the lock (as a paused or partitioned
/// process does) while the record stands still and a waiter takes it over.
struct Frozen(DynamoLockStore);

impl LockStore for Frozen {
    async fn acquire_free(
        &self,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        self.0.acquire_free(purpose, claim).await
    }
    async fn take_over(
        &self,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        self.0.take_over(purpose, observed, claim).await
    }
    async fn read(&self, purpose: Purpose) -> Result<Option<LockItem>, StoreError> {
        self.0.read(purpose).await
    }
    async fn heartbeat(
        &self,
        _purpose: Purpose,
        _owner: &str,
        _old: &str,
        _new: &str,
        _wall: SystemTime,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn release(
        &self,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        self.0.release(purpose, owner, rvn, wall).await
    }
    async fn force_release(
        &self,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> Result<Option<LockItem>, StoreError> {
        self.0.force_release(purpose, observed, wall).await
    }
}

/// Now, to the millisecond the wire format keeps, so that material read
/// back compares equal to what was published.
fn now_ms() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("fits"))
}

fn pins() -> Vec<String> {
    vec![
        format!("sha256:{}", "ab".repeat(32)),
        format!("sha256:{}", "cd".repeat(32)),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn published_material_is_read_back_from_the_pointed_version() {
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    assert!(
        store.current(&registry).await.expect("read").is_none(),
        "nothing published yet"
    );
    let guard = fx
        .locker(fx.lock_store(), "i-00000000000000001")
        .acquire(Purpose::Init)
        .await
        .expect("acquire");
    let now = now_ms();
    let material = JoinMaterial::fresh(ENDPOINT, pins(), now, true);
    // The secret does not exist yet: publish creates it.
    let pointer = store
        .publish(&registry, &guard, &material, now)
        .await
        .expect("publish");
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
        fx.versions().await,
        vec![(
            pointer.secret_version.clone(),
            vec!["AWSCURRENT".to_string()]
        )]
    );
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_replaces_the_token_and_readers_see_the_new_one() {
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    let guard = fx
        .locker(fx.lock_store(), "i-00000000000000001")
        .acquire(Purpose::Leader)
        .await
        .expect("acquire");
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
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    // The old holder's renewals never reach the table, but it believes they do.
    let old = fx
        .locker(Frozen(fx.lock_store()), "i-00000000000000001")
        .acquire(Purpose::Leader)
        .await
        .expect("old acquires");
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
    let new = fx
        .locker(fx.lock_store(), "i-00000000000000002")
        .acquire(Purpose::Leader)
        .await
        .expect("new takes over");
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
    let versions = fx.versions().await;
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
    assert_eq!(fx.versions().await.len(), versions.len(), "nothing written");
    new.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_values_are_in_ssm_and_secrets_are_not() {
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    let guard = fx
        .locker(fx.lock_store(), "i-00000000000000001")
        .acquire(Purpose::Init)
        .await
        .expect("acquire");
    let now = now_ms();
    let material = JoinMaterial::fresh(ENDPOINT, pins(), now, true);
    store
        .publish(&registry, &guard, &material, now)
        .await
        .expect("publish");

    let ssm = fx.ssm();
    let get = |name: String| {
        let ssm = ssm.clone();
        async move {
            ssm.get_parameter()
                .name(name)
                .send()
                .await
                .expect("parameter exists")
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_string()
        }
    };
    assert_eq!(get(store.parameter(SSM_ENDPOINT)).await, ENDPOINT);
    assert_eq!(
        get(store.parameter(SSM_CA_CERT_HASHES)).await,
        pins().join(",")
    );

    let all = ssm
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
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    let guard = fx
        .locker(fx.lock_store(), "i-00000000000000001")
        .acquire(Purpose::Leader)
        .await
        .expect("acquire");
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
    let fx = Fixture::new().await;
    let (store, registry) = (fx.join_store(), fx.registry());
    let old = fx
        .locker(Frozen(fx.lock_store()), "i-00000000000000001")
        .acquire(Purpose::Init)
        .await
        .expect("old acquires");
    // The new holder initialized a new generation with a new CA.
    let new = fx
        .locker(fx.lock_store(), "i-00000000000000002")
        .acquire(Purpose::Init)
        .await
        .expect("new takes over");
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
