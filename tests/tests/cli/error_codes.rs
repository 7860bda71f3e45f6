//! Error codes of the failures that need real parts to provoke: the lock and
//! registry (in-memory store with DynamoDB's semantics, and moto for what
//! DynamoDB itself refuses), join material on moto's Secrets Manager and SSM,
//! AWS outages injected by the proxy, a real etcd, bootstrap's own refusals,
//! and the `kubeboot` binary's report. Each failure comes from the real code
//! path; the test checks the catalogue code it carries
//! (`agent/tests/agent/errors.rs` requires one such assertion per code).

use kubeboot::catalogue::Coded;
use kubeboot::join_material::{JoinMaterial, JoinStore};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{LockStore, Locker, Owner, Purpose, Settings};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{InitClaim, MemberRecord, Registry};
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan, ProxyResponse};
use kubeboot_tests::fixtures::{create_table, init_claim, lock_settings, unique_table, MotoTable};
use kubeboot_tests::memstore::{Faults, Handle, MemStore};
use kubeboot_tests::moto::Moto;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const ENDPOINT: &str = "api.cluster.test:6443";

fn mem_locker(store: &Arc<MemStore>, who: &str, s: Settings) -> Locker<Handle> {
    Locker::new(store.handle(who), Owner::new(who), s)
}

fn mem_registry(store: &Arc<MemStore>, who: &str) -> Registry<Handle> {
    Registry::new(store.handle(who))
}

fn quick() -> Settings {
    lock_settings(
        Duration::from_millis(1500),
        Duration::from_millis(500),
        Duration::from_millis(300),
    )
}

fn claim(run_id: &str) -> InitClaim {
    init_claim(run_id, "i-0000000000000000a", ENDPOINT)
}

fn pins() -> Vec<String> {
    vec![format!("sha256:{}", "ab".repeat(32))]
}

/// `sdk` without the SDK's own retries, so an injected fault fails the call at once.
fn no_retries(sdk: &aws_config::SdkConfig) -> aws_config::SdkConfig {
    sdk.to_builder()
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .build()
}

/// `sdk` pointed at `endpoint`.
fn at(sdk: &aws_config::SdkConfig, endpoint: &str) -> aws_config::SdkConfig {
    sdk.to_builder().endpoint_url(endpoint).build()
}

// ---------------------------------------------------------------------------
// The lock and the registry

#[tokio::test(flavor = "multi_thread")]
async fn lock_failures_have_their_codes() {
    let store = MemStore::new(1, Faults::none());
    let a = mem_locker(&store, "i-0000000000000000a", quick());
    let b = mem_locker(&store, "i-0000000000000000b", quick());
    let held = a.acquire(Purpose::Init).await.expect("a acquires");

    let err = b.acquire(Purpose::Init).await.expect_err("a holds it");
    assert_eq!(err.code(), "KB-LOCK-001", "{err}");

    // The holder renews while the operator's release watches: refused.
    let err = b
        .force_release(Purpose::Init)
        .await
        .expect_err("a renews meanwhile");
    assert_eq!(err.code(), "KB-LOCK-005", "{err}");

    let err = b
        .force_release(Purpose::Membership)
        .await
        .expect_err("never taken");
    assert_eq!(err.code(), "KB-LOCK-006", "{err}");

    // The lock is released behind the holder's back (as a forced release
    // does): its next fenced write is refused, and then so is its fence.
    let registry = mem_registry(&store, "i-0000000000000000a");
    let raw = store.handle("operator");
    let item = LockStore::read(&*raw, Purpose::Init)
        .await
        .expect("read")
        .expect("held");
    LockStore::force_release(&*raw, Purpose::Init, &item.rvn, SystemTime::now())
        .await
        .expect("release")
        .expect("rvn unchanged");
    let state = registry.state().await.expect("state");
    let err = registry
        .begin_init(&held, &state, &claim("r1"))
        .await
        .expect_err("fence is stale");
    assert_eq!(err.code(), "KB-LOCK-002", "{err}");
    let err = held.fence().expect_err("lost");
    assert_eq!(err.code(), "KB-LOCK-002", "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_refusals_have_their_codes() {
    let store = MemStore::new(2, Faults::none());
    let locker = mem_locker(&store, "i-0000000000000000a", quick());
    let registry = mem_registry(&store, "i-0000000000000000a");
    let init = locker.acquire(Purpose::Init).await.expect("init lock");
    let before = registry.state().await.expect("state");
    registry
        .begin_init(&init, &before, &claim("r1"))
        .await
        .expect("generation 1");
    // A second start from the stale record: someone moved it meanwhile.
    let err = registry
        .begin_init(&init, &before, &claim("r2"))
        .await
        .expect_err("record moved");
    assert_eq!(err.code(), "KB-REG-001", "{err}");
    init.release().await.expect("release");

    let leader = locker.acquire(Purpose::Leader).await.expect("leader lock");
    let record = MemberRecord {
        instance_id: "i-0000000000000000a".into(),
        member_id: 1,
        name: "m1".into(),
        peer_url: "http://127.0.0.1:2380".into(),
        confirmed_at: SystemTime::now(),
    };
    let err = registry
        .record_member(&leader, &record)
        .await
        .expect_err("members are fenced by init or membership");
    assert_eq!(err.code(), "KB-REG-002", "{err}");
    leader.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_that_refuses_or_throttles_has_its_codes() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config().await;
    let cluster = "c-codes";

    // No such table: DynamoDB refuses every call, retrying cannot help.
    let missing = aws_sdk_dynamodb::Client::new(&sdk);
    let lock_store = Arc::new(DynamoLockStore::new(missing.clone(), "missing", cluster));
    let locker = Locker::new(lock_store.clone(), Owner::new("i-1"), quick());
    let err = locker.acquire(Purpose::Init).await.expect_err("no table");
    assert_eq!(err.code(), "KB-LOCK-003", "{err}");
    let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
        missing.clone(),
        "missing",
        cluster,
    )));
    let err = registry.state().await.expect_err("no table");
    assert_eq!(err.code(), "KB-REG-003", "{err}");
    // `kubeboot status` reads the (working) registry, then the locks.
    let store = MemStore::new(3, Faults::none());
    let err = kubeboot::status::gather(
        cluster,
        "missing",
        &*lock_store,
        &mem_registry(&store, "op"),
    )
    .await
    .expect_err("locks unreadable");
    assert_eq!(err.code(), "KB-STATUS-001", "{err}");

    // A throttled table, after the SDK gave up.
    let table = unique_table();
    create_table(&aws_sdk_dynamodb::Client::new(&sdk), &table).await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    proxy.set_faults(FaultPlan::always(FaultKind::Throttle).only(&["GetItem", "Query"]));
    let throttled = aws_sdk_dynamodb::Client::new(&no_retries(&at(&sdk, &proxy.endpoint())));
    let locker = Locker::new(
        Arc::new(DynamoLockStore::new(throttled.clone(), &table, cluster)),
        Owner::new("operator"),
        quick(),
    );
    let err = locker
        .force_release(Purpose::Init)
        .await
        .expect_err("cannot read the lock");
    assert_eq!(err.code(), "KB-LOCK-004", "{err}");
    let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
        throttled, &table, cluster,
    )));
    let err = registry.state().await.expect_err("throttled");
    assert_eq!(err.code(), "KB-REG-004", "{err}");
}

// ---------------------------------------------------------------------------
// Join material

struct JoinFixture {
    moto: Moto,
    sdk: aws_config::SdkConfig,
    secret: String,
}

impl JoinFixture {
    async fn new() -> Self {
        let moto = Moto::start().await;
        let sdk = moto.sdk_config().await;
        JoinFixture {
            moto,
            sdk,
            secret: format!(
                "kubeboot/c-{}/join",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    fn store_via(&self, sdk: &aws_config::SdkConfig) -> JoinStore {
        JoinStore::new(
            aws_sdk_secretsmanager::Client::new(sdk),
            aws_sdk_ssm::Client::new(sdk),
            self.secret.clone(),
            format!("{}-key", self.secret),
            "/kubeboot/codes",
        )
    }

    /// Writes `body` as a new version of the join secret; returns its id.
    async fn put(&self, body: &str) -> String {
        let client = aws_sdk_secretsmanager::Client::new(&self.sdk);
        let created = client
            .create_secret()
            .name(&self.secret)
            .secret_string(body)
            .send()
            .await;
        match created {
            Ok(out) => out.version_id.expect("version"),
            Err(_) => client
                .put_secret_value()
                .secret_id(&self.secret)
                .secret_string(body)
                .send()
                .await
                .expect("put version")
                .version_id
                .expect("version"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_join_material_has_its_codes() {
    let fx = JoinFixture::new().await;
    let store = fx.store_via(&fx.sdk);
    let material = JoinMaterial::fresh(ENDPOINT, pins(), SystemTime::now(), true);

    // Nothing was ever published under that name.
    let err = store
        .read(&material.pointer("v-none".into(), None, 1, SystemTime::now()))
        .await
        .expect_err("no secret");
    assert_eq!(err.code(), "KB-JOIN-006", "{err}");

    let version = fx.put("not json at all").await;
    let err = store
        .read(&material.pointer(version, None, 1, SystemTime::now()))
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), "KB-JOIN-003", "{err}");

    let version = fx.put("{\"format\": 99}").await;
    let err = store
        .read(&material.pointer(version, None, 1, SystemTime::now()))
        .await
        .expect_err("another version's format");
    assert_eq!(err.code(), "KB-JOIN-004", "{err}");

    let body = kubeboot::join_material::encode_wire(&material).expect("encode");
    let version = fx.put(body.expose()).await;
    let other = JoinMaterial::fresh("api.other.test:6443", pins(), SystemTime::now(), true);
    let err = store
        .read(&other.pointer(version.clone(), None, 1, SystemTime::now()))
        .await
        .expect_err("pointer names another endpoint");
    assert_eq!(err.code(), "KB-JOIN-005", "{err}");

    // Secrets Manager failing after the SDK gave up.
    let proxy = AwsProxy::start(&fx.moto.endpoint()).await;
    proxy.set_faults(FaultPlan::always(FaultKind::ServerError).only(&["GetSecretValue"]));
    let failing = fx.store_via(&no_retries(&at(&fx.sdk, &proxy.endpoint())));
    let err = failing
        .read(&material.pointer(version, None, 1, SystemTime::now()))
        .await
        .expect_err("5xx");
    assert_eq!(err.code(), "KB-JOIN-007", "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unpublishable_join_material_has_its_codes() {
    let fx = JoinFixture::new().await;
    let mem = MemStore::new(4, Faults::none());
    let registry = mem_registry(&mem, "i-0000000000000000a");
    let locker = mem_locker(&mem, "i-0000000000000000a", quick());
    let guard = locker.acquire(Purpose::Init).await.expect("init lock");
    let now = SystemTime::now();

    let bad = JoinMaterial::fresh("not an endpoint", pins(), now, true);
    let err = fx
        .store_via(&fx.sdk)
        .publish(&registry, &guard, &bad, now)
        .await
        .expect_err("endpoint is not host:port");
    assert_eq!(err.code(), "KB-JOIN-002", "{err}");

    let good = JoinMaterial::fresh(ENDPOINT, pins(), now, true);
    let proxy = AwsProxy::start(&fx.moto.endpoint()).await;
    let via_proxy = fx.store_via(&no_retries(&at(&fx.sdk, &proxy.endpoint())));

    // The role may not write the parameter (AWS's answer, as the proxy gives it).
    proxy.set_handler(Arc::new(|req| {
        (req.operation == "PutParameter").then(|| {
            ProxyResponse::json(
                400,
                "application/x-amz-json-1.1",
                &serde_json::json!({
                    "__type": "AccessDeniedException",
                    "message": "User is not authorized to perform: ssm:PutParameter",
                }),
            )
        })
    }));
    let err = via_proxy
        .publish(&registry, &guard, &good, now)
        .await
        .expect_err("denied");
    assert_eq!(err.code(), "KB-JOIN-008", "{err}");
    proxy.clear_handler();

    proxy.set_faults(FaultPlan::always(FaultKind::ServerError).only(&["PutParameter"]));
    let err = via_proxy
        .publish(&registry, &guard, &good, now)
        .await
        .expect_err("5xx");
    assert_eq!(err.code(), "KB-JOIN-009", "{err}");
    guard.release().await.expect("release");
}

// ---------------------------------------------------------------------------
// Lifecycle queue and hooks, EC2

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_and_ec2_failures_have_their_codes() {
    let moto = Moto::start().await;
    let sdk = moto.sdk_config().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    // The proxy answers lifecycle actions as AWS does; none is pending.
    let _actions = proxy.enable_lifecycle_actions();
    let via_proxy = no_retries(&at(&sdk, &proxy.endpoint()));

    let hooks =
        kubeboot::aws::autoscaling::Hooks::new(aws_sdk_autoscaling::Client::new(&via_proxy));
    let action = kubeboot::aws::autoscaling::Action {
        asg: "asg-codes".into(),
        hook: "kubeboot-terminate".into(),
        instance_id: "i-0000000000000000a".into(),
        token: None,
    };
    let err = hooks
        .heartbeat(&action)
        .await
        .expect_err("no active lifecycle action");
    assert_eq!(err.code(), "KB-LIFE-002", "{err}");

    let queue = kubeboot::aws::sqs::Queue::new(
        aws_sdk_sqs::Client::new(&sdk),
        format!("{}/123456789012/no-such-queue", moto.endpoint()),
    );
    let err = queue
        .receive(Duration::from_secs(30))
        .await
        .expect_err("no such queue");
    assert_eq!(err.code(), "KB-LIFE-003", "{err}");

    proxy.set_faults(FaultPlan::always(FaultKind::ServerError).only(&["DescribeInstances"]));
    let instances = kubeboot::aws::ec2::Instances::new(aws_sdk_ec2::Client::new(&via_proxy));
    let err = instances
        .not_running(&["i-0000000000000000a".to_string()], "i-0000000000000000b")
        .await
        .expect_err("EC2 fails");
    assert_eq!(err.code(), "KB-RECON-001", "{err}");
    proxy.clear_faults();
    let err = instances
        .not_running(&["i-0000000000000000a".to_string()], "i-0000000000000000b")
        .await
        .expect_err("EC2 does not know the leader");
    assert_eq!(err.code(), "KB-RECON-002", "{err}");
}

// ---------------------------------------------------------------------------
// etcd

#[tokio::test(flavor = "multi_thread")]
async fn etcd_failures_have_their_codes() {
    let mut cluster = kubeboot_tests::etcd::EtcdCluster::start(1).await;
    let settings = kubeboot::etcd::Settings {
        scheme: kubeboot::config::model::EtcdScheme::Http,
        client_port: 2379,
        peer_port: 2380,
        dial_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        pki_dir: "/nonexistent".into(),
    };
    let etcd = kubeboot::etcd::Etcd::connect(&cluster.endpoints(), &settings)
        .await
        .expect("connect");

    // A peer URL no member has never becomes a confirmed member (I2).
    let err = etcd
        .confirm("http://127.9.9.9:2380", Duration::from_millis(800))
        .await
        .expect_err("not a member");
    assert_eq!(err.code(), "KB-ETCD-004", "{err}");

    let store = MemStore::new(5, Faults::none());
    let target = kubeboot::membership::parse_target("i-0123456789abcdef0").expect("instance id");
    let err = kubeboot::membership::remove(
        &etcd,
        &mem_registry(&store, "op"),
        &mem_locker(&store, "op", quick()),
        &target,
        false,
    )
    .await
    .expect_err("no such member or record");
    assert_eq!(err.code(), "KB-MEMBER-005", "{err}");

    cluster.kill_member(0);
    let err = etcd.members().await.expect_err("etcd is gone");
    assert_eq!(err.code(), "KB-ETCD-003", "{err}");
}

// ---------------------------------------------------------------------------
// Bootstrap

struct Node {
    _dir: tempfile::TempDir,
    cfg: kubeboot::config::Config,
}

async fn node(role: &str, table: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\nname = \"c-codes\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"{ENDPOINT}\"\n\
             [node]\nrole = \"{role}\"\n[aws]\ntable = \"{table}\"\nregion = \"us-east-1\"\n\
             [etcd]\nscheme = \"http\"\n[timeouts]\njoin_material = \"5s\"\n[backup]\nenabled = false\n\
             [paths]\nkubernetes_dir = \"{d}/k8s\"\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n\
             etcd_data_dir = \"{d}/etcd\"\n[binaries]\nkubeadm = \"{kubeadm}\"\n",
            kubeadm = kubeboot_tests::standin::kubeadm_bin().display()
        ),
    )
    .expect("config");
    let loaded = kubeboot::config::load_offline(&kubeboot::config::LoadOptions {
        path,
        user_data: kubeboot::config::UserData::Skip,
        env: vec![],
    })
    .await
    .expect("valid config");
    Node {
        _dir: dir,
        cfg: loaded.config,
    }
}

fn bootstrap(
    n: &Node,
    store: &Arc<MemStore>,
    join: JoinStore,
    aws: &aws_config::SdkConfig,
) -> kubeboot::bootstrap::Bootstrap<Handle, Handle> {
    let id = "i-0000000000000000b";
    kubeboot::bootstrap::Bootstrap {
        ctx: kubeboot::context::Context {
            cfg: n.cfg.clone(),
            identity: kubeboot::identity::Identity {
                instance_id: id.into(),
                private_ip: "127.0.0.1".into(),
                hostname: "node-b".into(),
                availability_zone: "us-east-1a".into(),
                region: "us-east-1".into(),
            },
            locker: mem_locker(store, id, quick()),
            registry: mem_registry(store, id),
            join,
            kubeadm: kubeboot::kubeadm::Kubeadm::from_config(&n.cfg),
            aws: aws.clone(),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_refusals_have_their_codes() {
    let fx = JoinFixture::new().await;

    // A corrupt checkpoint.
    let store = MemStore::new(6, Faults::none());
    let worker = node("worker", "kubeboot-codes").await;
    std::fs::create_dir_all(&worker.cfg.paths.state_dir).expect("state dir");
    std::fs::write(
        worker.cfg.paths.state_dir.join("bootstrap.json"),
        "{not json",
    )
    .expect("write");
    let err = bootstrap(&worker, &store, fx.store_via(&fx.sdk), &fx.sdk)
        .run()
        .await
        .expect_err("corrupt checkpoint");
    assert_eq!(err.code(), "KB-BOOT-001", "{err}");

    // An image whose kubeadm (the stand-in: v1.31.2) is another release
    // than the cluster's: refused before any lock or kubeadm run, exit 2.
    let mut other = node("worker", "kubeboot-codes").await;
    other.cfg.cluster.kubernetes_version = "1.31.3".into();
    let err = bootstrap(&other, &store, fx.store_via(&fx.sdk), &fx.sdk)
        .run()
        .await
        .expect_err("another release");
    assert_eq!(err.code(), "KB-KUBEADM-006", "{err}");
    assert!(err.to_string().contains("v1.31.2"), "{err}");
    assert_eq!(
        kubeboot::error::Error::from(err).exit_code(),
        kubeboot::error::EXIT_USAGE
    );
    assert!(
        !other.cfg.paths.state_dir.join("bootstrap.json").exists(),
        "no checkpoint: nothing was started"
    );

    // A worker of a cluster nobody initializes: no material within 5 s.
    let worker = node("worker", "kubeboot-codes").await;
    let err = bootstrap(&worker, &store, fx.store_via(&fx.sdk), &fx.sdk)
        .run()
        .await
        .expect_err("never initialized");
    assert_eq!(err.code(), "KB-BOOT-003", "{err}");

    // An initialized cluster with fresh material but no recorded etcd member
    // to join through.
    let registry = mem_registry(&store, "i-0000000000000000a");
    let init = mem_locker(&store, "i-0000000000000000a", quick())
        .acquire(Purpose::Init)
        .await
        .expect("init lock");
    let state = registry.state().await.expect("state");
    let generation = registry
        .begin_init(&init, &state, &claim("r1"))
        .await
        .expect("begin");
    let now = SystemTime::now();
    fx.store_via(&fx.sdk)
        .publish(
            &registry,
            &init,
            &JoinMaterial::fresh(ENDPOINT, pins(), now, true),
            now,
        )
        .await
        .expect("publish");
    registry
        .mark_initialized(&init, generation, "r1", SystemTime::now())
        .await
        .expect("initialized");
    init.release().await.expect("release");
    let control_plane = node("control-plane", "kubeboot-codes").await;
    let err = bootstrap(&control_plane, &store, fx.store_via(&fx.sdk), &fx.sdk)
        .run()
        .await
        .expect_err("nothing to join through");
    assert_eq!(err.code(), "KB-BOOT-002", "{err}");
}

// ---------------------------------------------------------------------------
// The binary's report

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reports_codes_for_an_empty_and_a_missing_table() {
    let MotoTable { moto, table, .. } = MotoTable::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |table: &str| {
        let path = dir.path().join(format!("{table}.toml"));
        std::fs::write(
            &path,
            format!(
                "[cluster]\nname = \"c-codes\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"{ENDPOINT}\"\n\
                 [node]\nrole = \"control-plane\"\n[aws]\ntable = \"{table}\"\nregion = \"us-east-1\"\nmax_attempts = 1\n\
                 [aws.endpoints]\ndynamodb = \"{}\"\n[backup]\nenabled = false\n",
                moto.endpoint()
            ),
        )
        .expect("config");
        path
    };
    let run = |args: &[&str], config: &std::path::Path| {
        let out = std::process::Command::new(kubeboot_tests::workspace::kubeboot_bin())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .args(args)
            .args(["--no-user-data", "--log-format", "json", "--config"])
            .arg(config)
            .output()
            .expect("kubeboot runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let last: serde_json::Value = stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .next_back()
            .unwrap_or_else(|| panic!("no JSON line: {stderr}"));
        (out.status.code(), last, stderr)
    };

    // No member records and no --endpoint: nothing to ask.
    let (code, line, stderr) = run(&["etcd", "members"], &config(&table));
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(line["code"], "KB-MEMBER-006", "{stderr}");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[KB-MEMBER-006] ")),
        "{stderr}"
    );

    let (code, line, stderr) = run(&["status"], &config("no-such-table"));
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(line["code"], "KB-REG-003", "{stderr}");
    assert_eq!(line["explain"], "kubeboot explain KB-REG-003", "{stderr}");
}

/// A registry whose join pointer moves on after its first read, as if
/// another publisher (a new generation's init) published meanwhile.
struct Racing {
    inner: Arc<Handle>,
    reads: std::sync::atomic::AtomicUsize,
}

impl kubeboot::registry::RegistryStore for Racing {
    async fn read_state(
        &self,
    ) -> Result<Option<kubeboot::registry::ClusterState>, kubeboot::lock::StoreError> {
        self.inner.read_state().await
    }
    async fn begin_init(
        &self,
        fence: kubeboot::lock::Fence,
        expected_generation: u64,
        claim: &InitClaim,
    ) -> Result<kubeboot::registry::WriteResult, kubeboot::lock::StoreError> {
        self.inner
            .begin_init(fence, expected_generation, claim)
            .await
    }
    async fn finish_init(
        &self,
        fence: kubeboot::lock::Fence,
        generation: u64,
        run_id: &str,
        wall: SystemTime,
    ) -> Result<kubeboot::registry::WriteResult, kubeboot::lock::StoreError> {
        self.inner
            .finish_init(fence, generation, run_id, wall)
            .await
    }
    async fn put_member(
        &self,
        fence: kubeboot::lock::Fence,
        record: &MemberRecord,
    ) -> Result<kubeboot::registry::WriteResult, kubeboot::lock::StoreError> {
        self.inner.put_member(fence, record).await
    }
    async fn delete_member(
        &self,
        fence: kubeboot::lock::Fence,
        instance_id: &str,
    ) -> Result<kubeboot::registry::WriteResult, kubeboot::lock::StoreError> {
        self.inner.delete_member(fence, instance_id).await
    }
    async fn list_members(&self) -> Result<Vec<MemberRecord>, kubeboot::lock::StoreError> {
        self.inner.list_members().await
    }
    async fn put_join(
        &self,
        fence: kubeboot::lock::Fence,
        pointer: &kubeboot::registry::JoinPointer,
    ) -> Result<kubeboot::registry::WriteResult, kubeboot::lock::StoreError> {
        self.inner.put_join(fence, pointer).await
    }
    async fn read_join(
        &self,
    ) -> Result<Option<kubeboot::registry::JoinPointer>, kubeboot::lock::StoreError> {
        let read = self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pointer = self.inner.read_join().await?;
        Ok(pointer.map(|mut p| {
            if read > 0 {
                p.seq += 1;
                p.secret_version = "v-published-meanwhile".into();
            }
            p
        }))
    }
    async fn put_refresh(
        &self,
        request: &kubeboot::registry::RefreshRequest,
    ) -> Result<(), kubeboot::lock::StoreError> {
        self.inner.put_refresh(request).await
    }
    async fn read_refresh(
        &self,
    ) -> Result<Vec<kubeboot::registry::RefreshRequest>, kubeboot::lock::StoreError> {
        self.inner.read_refresh().await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_overtaken_by_another_publication_has_its_code() {
    let fx = JoinFixture::new().await;
    let mem = MemStore::new(7, Faults::none());
    let who = "i-0000000000000000a";
    let guard = mem_locker(&mem, who, quick())
        .acquire(Purpose::Leader)
        .await
        .expect("leader lock");
    // Published material whose token has run out: the leader must refresh.
    let past = SystemTime::now() - Duration::from_secs(60);
    let join = fx.store_via(&fx.sdk);
    join.publish(
        &mem_registry(&mem, who),
        &guard,
        &JoinMaterial {
            token_expires_at: past,
            ..JoinMaterial::fresh(ENDPOINT, pins(), past, true)
        },
        past,
    )
    .await
    .expect("publish");
    let racing = Registry::new(Arc::new(Racing {
        inner: mem.handle(who),
        reads: Default::default(),
    }));
    let leader = node("control-plane", "kubeboot-codes").await;
    let kubeadm = kubeboot::kubeadm::Kubeadm::from_config(&leader.cfg);
    let err = kubeboot::refresh::run_once(&leader.cfg, &kubeadm, &join, &racing, &guard)
        .await
        .expect_err("overtaken");
    assert_eq!(err.code(), "KB-JOIN-010", "{err}");
    assert!(err.to_string().contains("nothing was rotated"), "{err}");
}
