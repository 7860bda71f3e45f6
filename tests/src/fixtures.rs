//! What the test binaries set up alike, written once: moto with the agent's
//! table and the stores over it, lock settings, the registry's init claim,
//! and lock stores that differ from the real one in a call or two.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::retry::RetryConfig;
use aws_config::SdkConfig;
use kubeboot::join_material::JoinStore;
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Claim, LockItem, LockStore, Locker, Owner, Purpose, Settings, StoreError};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{InitClaim, Registry};

use crate::moto::Moto;

/// Values for the add-on manifests' variables, cluster-autoscaler's role
/// included, as a control plane of cluster `addons` in us-east-1 has them.
pub fn addon_variables() -> kubeboot::addons::Variables {
    kubeboot::addons::Variables {
        cluster_name: "addons".into(),
        region: "us-east-1".into(),
        pod_subnet: "10.244.0.0/16".into(),
        cluster_autoscaler_role_arn: Some("arn:aws:iam::123456789012:role/ca".into()),
    }
}

/// A fresh table name, `kubeboot-<uuid>`.
pub fn unique_table() -> String {
    format!("kubeboot-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh cluster name, `c-<8 hex digits>`.
pub fn unique_cluster() -> String {
    format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Creates the agent's table, as `kubeboot table create` does.
pub async fn create_table(client: &aws_sdk_dynamodb::Client, table: &str) {
    kubeboot::table::create(client, table)
        .await
        .expect("create table");
}

/// Creates a plain table keyed by a string `pk` (a table of no particular
/// shape, for tests of the plumbing rather than of the agent's records).
pub async fn create_pk_table(client: &aws_sdk_dynamodb::Client, table: &str) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .expect("key schema"),
        )
        .send()
        .await
        .expect("create table");
}

/// A moto of the test's own with the agent's table created in it, and a
/// cluster name for the records the test writes there.
pub struct MotoTable {
    pub moto: Moto,
    pub sdk: SdkConfig,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub table: String,
    pub cluster: String,
}

impl MotoTable {
    pub async fn start() -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config().await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let table = unique_table();
        create_table(&dynamodb, &table).await;
        MotoTable {
            moto,
            sdk,
            dynamodb,
            table,
            cluster: unique_cluster(),
        }
    }

    /// The lock store on the table, for this cluster.
    pub fn lock_store(&self) -> DynamoLockStore {
        DynamoLockStore::new(self.dynamodb.clone(), &self.table, &self.cluster)
    }

    /// The registry on the table, for this cluster.
    pub fn registry(&self) -> Registry<DynamoRegistryStore> {
        Registry::new(Arc::new(DynamoRegistryStore::new(
            self.dynamodb.clone(),
            &self.table,
            &self.cluster,
        )))
    }

    pub fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.sdk)
    }

    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk)
    }

    /// The join secret's name, as the agent's config derives it.
    pub fn secret_name(&self) -> String {
        format!("kubeboot/{}/join", self.cluster)
    }

    /// A node's view of the join material: its own clients, the names the
    /// config derives.
    pub fn join_store(&self) -> JoinStore {
        self.join_store_with(self.secrets(), self.ssm())
    }

    /// The join material store with the clients given (e.g. through a proxy).
    pub fn join_store_with(
        &self,
        secrets: aws_sdk_secretsmanager::Client,
        ssm: aws_sdk_ssm::Client,
    ) -> JoinStore {
        JoinStore::new(
            secrets,
            ssm,
            self.secret_name(),
            format!("kubeboot/{}/certificate-key", self.cluster),
            format!("/kubeboot/{}", self.cluster),
        )
    }
}

/// `sdk` sent to `endpoint` (an [`crate::awsproxy::AwsProxy`]) with the
/// standard retry mode: `attempts` attempts, backing off from `initial` up
/// to `max`.
pub fn through(
    sdk: &SdkConfig,
    endpoint: &str,
    attempts: u32,
    initial: Duration,
    max: Duration,
) -> SdkConfig {
    sdk.to_builder()
        .endpoint_url(endpoint)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(attempts)
                .with_initial_backoff(initial)
                .with_max_backoff(max),
        )
        .build()
}

/// Every version of secret `name`, deprecated ones too: (VersionId,
/// staging labels).
pub async fn secret_versions(
    secrets: &aws_sdk_secretsmanager::Client,
    name: &str,
) -> Vec<(String, Vec<String>)> {
    secrets
        .list_secret_version_ids()
        .secret_id(name)
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

/// Lock timing on the system clock.
pub fn lock_settings(lease: Duration, margin: Duration, acquire_timeout: Duration) -> Settings {
    Settings {
        lease,
        margin,
        acquire_timeout,
        wall_clock: Arc::new(SystemTime::now),
    }
}

/// A locker for `instance` over `store`.
pub fn locker<S: LockStore>(store: S, instance: &str, settings: Settings) -> Locker<S> {
    Locker::new(Arc::new(store), Owner::new(instance), settings)
}

/// The claim an init makes in the registry, now.
pub fn init_claim(run_id: &str, initialized_by: &str, endpoint: &str) -> InitClaim {
    InitClaim {
        run_id: run_id.into(),
        initialized_by: initialized_by.into(),
        endpoint: endpoint.into(),
        kubernetes_version: "1.31.2".into(),
        wall: SystemTime::now(),
        restored_from: None,
    }
}

/// Now, to the millisecond the wire format keeps, so that material read
/// back compares equal to what was published.
pub fn now_ms() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("fits"))
}

/// How a lock store of a test differs from the store it wraps: each call
/// goes to the wrapped store unless the test says otherwise, so a test's
/// store names only what it changes. Used as [`Intercepted`]'s hooks.
pub trait LockHooks<S: LockStore>: Send + Sync + 'static {
    fn acquire_free(
        &self,
        inner: &S,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        inner.acquire_free(purpose, claim)
    }
    fn take_over(
        &self,
        inner: &S,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        inner.take_over(purpose, observed, claim)
    }
    fn read(
        &self,
        inner: &S,
        purpose: Purpose,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        inner.read(purpose)
    }
    fn heartbeat(
        &self,
        inner: &S,
        purpose: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        inner.heartbeat(purpose, owner, old, new, wall)
    }
    fn release(
        &self,
        inner: &S,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        inner.release(purpose, owner, rvn, wall)
    }
    fn force_release(
        &self,
        inner: &S,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        inner.force_release(purpose, observed, wall)
    }
}

/// A lock store that passes every call to `inner` through `hooks`.
pub struct Intercepted<S, H> {
    pub inner: Arc<S>,
    pub hooks: H,
}

impl<S, H> Intercepted<S, H> {
    pub fn new(inner: S, hooks: H) -> Self {
        Self::shared(Arc::new(inner), hooks)
    }

    /// Over a store the test keeps using directly too.
    pub fn shared(inner: Arc<S>, hooks: H) -> Self {
        Intercepted { inner, hooks }
    }
}

impl<S: LockStore, H: LockHooks<S>> LockStore for Intercepted<S, H> {
    fn acquire_free(
        &self,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        self.hooks.acquire_free(&self.inner, purpose, claim)
    }
    fn take_over(
        &self,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        self.hooks.take_over(&self.inner, purpose, observed, claim)
    }
    fn read(
        &self,
        purpose: Purpose,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        self.hooks.read(&self.inner, purpose)
    }
    fn heartbeat(
        &self,
        purpose: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.hooks
            .heartbeat(&self.inner, purpose, owner, old, new, wall)
    }
    fn release(
        &self,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.hooks.release(&self.inner, purpose, owner, rvn, wall)
    }
    fn force_release(
        &self,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<Option<LockItem>, StoreError>> + Send {
        self.hooks
            .force_release(&self.inner, purpose, observed, wall)
    }
}
