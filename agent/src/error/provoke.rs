//! Failures provoked through the real functions with bad input (a missing
//! file, a refusing server, an impossible removal), each checked for its
//! catalogue code. The meta-test in `agent/tests/agent/errors.rs` requires every
//! code to be asserted on a provoked error somewhere; these are the ones a
//! unit test reaches without etcd, moto or the binary.

use crate::catalogue::Coded;
use crate::config::{self, LoadOptions, UserData};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 server: answers each request from `respond(method, path)`
// with (status, content type, body), then closes the connection.

type Respond = Arc<dyn Fn(&str, &str) -> (u16, &'static str, Vec<u8>) + Send + Sync>;

async fn serve(respond: Respond) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let mut first = head.lines().next().unwrap_or("").split(' ');
                let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                let (status, content_type, body) = respond(method, path);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(&body);
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

fn respond(
    f: impl Fn(&str, &str) -> (u16, &'static str, Vec<u8>) + Send + Sync + 'static,
) -> Respond {
    Arc::new(f)
}

// ---------------------------------------------------------------------------
// Configuration

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn worker_toml() -> String {
    std::fs::read_to_string(examples().join("worker.toml")).expect("examples/worker.toml")
}

async fn load_text(
    dir: &Path,
    text: &str,
    user_data: Option<&str>,
    env: &[(&str, &str)],
) -> Result<config::Loaded, config::Error> {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let user_data = match user_data {
        Some(ud) => {
            let ud_path = dir.join("user-data");
            std::fs::write(&ud_path, ud).expect("write user-data");
            UserData::File(ud_path)
        }
        None => UserData::Skip,
    };
    config::load_offline(&LoadOptions {
        path,
        user_data,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .await
}

/// The one problem `text` (plus user-data, env) has, after checking the
/// command's error is the invalid-configuration one.
async fn only_problem(
    text: &str,
    user_data: Option<&str>,
    env: &[(&str, &str)],
) -> config::Problem {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = load_text(dir.path(), text, user_data, env)
        .await
        .expect_err("the configuration must be refused");
    assert_eq!(err.code(), "KB-CONFIG-001");
    let config::Error::Invalid { mut problems, .. } = err else {
        unreachable!("KB-CONFIG-001 is Invalid")
    };
    assert_eq!(problems.len(), 1, "{problems:#?}");
    problems.remove(0)
}

#[tokio::test]
async fn every_kind_of_configuration_problem_has_its_code() {
    let base = worker_toml();
    let p = only_problem(&format!("{base}\n[lock\nlease = \"30s\"\n"), None, &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-010", "{p}");
    let p = only_problem(&format!("{base}\n[lock]\nleese = \"30s\"\n"), None, &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-011", "{p}");
    let p = only_problem(&format!("{base}\n[lock]\nlease = 30\n"), None, &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-012", "{p}");
    let p = only_problem(&format!("{base}\n[lock]\nlease = \"11m\"\n"), None, &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-013", "{p}");
    let p = only_problem(&base, None, &[("KUBEBOOT_DAEMON_PERIOD", "often")]).await;
    assert_eq!(p.code(), "KB-CONFIG-014", "{p}");
    let p = only_problem(&base.replace("role = \"worker\"", ""), None, &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-015", "{p}");
    let p = only_problem(&base, Some("[cluster]\nname = \"prod-b\"\n"), &[]).await;
    assert_eq!(p.code(), "KB-CONFIG-016", "{p}");
    let p = only_problem(
        &format!("{base}\n[lock]\nlease = \"30s\"\nmargin = \"20s\"\n"),
        None,
        &[],
    )
    .await;
    assert_eq!(p.code(), "KB-CONFIG-017", "{p}");
}

#[tokio::test]
async fn unreadable_configuration_sources_have_their_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = config::load_offline(&LoadOptions {
        path: dir.path().join("nope.toml"),
        user_data: UserData::Skip,
        env: vec![],
    })
    .await
    .expect_err("missing file");
    assert_eq!(missing.code(), "KB-CONFIG-002", "{missing}");

    // config.d is a file, not a directory.
    std::fs::write(dir.path().join("config.d"), "").expect("write");
    let err = load_text(dir.path(), &worker_toml(), None, &[])
        .await
        .expect_err("config.d is not a directory");
    assert_eq!(err.code(), "KB-CONFIG-003", "{err}");
}

#[tokio::test]
async fn user_data_from_an_unreachable_imds_has_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    // Nothing listens on port 9; the shortest deadline keeps the test quick.
    std::fs::write(
        &path,
        format!(
            "{}\n[imds]\nendpoint = \"http://127.0.0.1:9\"\ndeadline = \"1s\"\nrequest_timeout = \"200ms\"\n",
            worker_toml()
        ),
    )
    .expect("write");
    let err = config::load_with(
        &LoadOptions {
            path,
            user_data: UserData::FromImds,
            env: vec![],
        },
        &crate::identity::UserDataFromImds,
    )
    .await
    .expect_err("IMDS is unreachable");
    assert_eq!(err.code(), "KB-CONFIG-004", "{err}");
}

#[test]
fn a_configuration_the_model_refuses_is_a_bug_with_its_code() {
    // Last resort, constructed directly: `Internal` means the schema accepted
    // what the typed model refuses, which `config::tests` proves cannot
    // happen (it sets every key); no input reaches it.
    let err = config::Error::Internal("unknown field `x`".into());
    assert_eq!(err.code(), "KB-CONFIG-005");
}

// ---------------------------------------------------------------------------
// Logging

#[test]
fn an_invalid_log_level_has_its_code() {
    let err = crate::telemetry::init_with_writer(
        crate::telemetry::LogFormat::Text,
        "loud",
        std::io::sink,
    )
    .expect_err("loud is no level");
    assert_eq!(err.code(), "KB-LOG-001");
}

// ---------------------------------------------------------------------------
// IMDS

fn imds_settings(endpoint: String, deadline: Duration) -> config::model::Imds {
    config::model::Imds {
        endpoint,
        user_data: true,
        request_timeout: Duration::from_millis(500),
        deadline,
    }
}

/// An IMDS whose token endpoint answers `token` and whose other paths answer `get`.
async fn imds(
    token: (u16, Vec<u8>),
    get: (u16, Vec<u8>),
    deadline: Duration,
) -> crate::identity::Imds {
    let addr = serve(respond(move |method, _path| {
        let (status, body) = if method == "PUT" {
            token.clone()
        } else {
            get.clone()
        };
        (status, "text/plain", body)
    }))
    .await;
    crate::identity::Imds::new(&imds_settings(format!("http://{addr}"), deadline))
        .expect("plain http endpoint")
}

#[tokio::test]
async fn imds_failures_have_their_codes() {
    let err = crate::identity::Imds::new(&imds_settings(
        "https://169.254.169.254".into(),
        Duration::from_secs(1),
    ))
    .expect_err("https is refused");
    assert_eq!(err.code(), "KB-IMDS-001", "{err}");

    let long = Duration::from_secs(30);
    let ok_token = (200, b"token".to_vec());

    let not_text = imds((200, vec![0xff, 0xfe]), (200, vec![]), long).await;
    let err = not_text.identity().await.expect_err("token is not text");
    assert_eq!(err.code(), "KB-IMDS-002", "{err}");

    let refused = imds((403, vec![]), (200, vec![]), long).await;
    let err = refused.identity().await.expect_err("403");
    assert_eq!(err.code(), "KB-IMDS-003", "{err}");

    let bad_request = imds((400, vec![]), (200, vec![]), long).await;
    let err = bad_request.identity().await.expect_err("400");
    assert_eq!(err.code(), "KB-IMDS-004", "{err}");

    let not_ec2 = imds(ok_token.clone(), (404, vec![]), long).await;
    let err = not_ec2.identity().await.expect_err("404");
    assert_eq!(err.code(), "KB-IMDS-005", "{err}");

    let failing = imds((500, vec![]), (200, vec![]), Duration::from_millis(300)).await;
    let err = failing
        .identity()
        .await
        .expect_err("5xx until the deadline");
    assert_eq!(err.code(), "KB-IMDS-006", "{err}");
}

// ---------------------------------------------------------------------------
// AWS

#[tokio::test]
async fn an_imds_endpoint_the_sdk_cannot_use_has_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = load_text(dir.path(), &worker_toml(), None, &[])
        .await
        .expect("the example is valid")
        .config;
    // Validation refuses such a value; the SDK's own check is what is tested.
    cfg.imds.endpoint = "http://[::1".into();
    let err = crate::aws::sdk_config(&cfg, "eu-west-1")
        .await
        .expect_err("not a URI");
    assert_eq!(err.code(), "KB-AWS-001", "{err}");
}

// ---------------------------------------------------------------------------
// kubeadm (spawn, timeout and failure are provoked in kubeadm's own tests)

#[tokio::test]
async fn an_unwritable_run_dir_has_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let k = crate::kubeadm::Kubeadm::new(
        dir.path().join("kubeadm"),
        file.join("run"),
        dir.path().join("k8s"),
        Duration::from_secs(1),
    );
    let rendered = crate::secret::Secret::new("{}\n".to_string());
    let err = k
        .init(&rendered, &[], None)
        .await
        .expect_err("run dir under a file");
    assert_eq!(err.code(), "KB-KUBEADM-002", "{err}");
}

/// A kubeadm of another release than the cluster's: KB-KUBEADM-006, exit 2
/// (the image and the cluster disagree; systemd must not restart it).
#[tokio::test]
async fn a_kubeadm_of_another_release_exits_2() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("kubeadm");
    std::fs::write(&bin, "#!/bin/sh\necho v1.30.9\n").expect("fake");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let k = crate::kubeadm::Kubeadm::new(
        bin,
        dir.path().join("run"),
        dir.path().join("k8s"),
        Duration::from_secs(10),
    );
    let err = k
        .check_version("1.31.2")
        .await
        .expect_err("another release");
    assert_eq!(err.code(), "KB-KUBEADM-006", "{err}");
    let top: crate::error::Error = crate::bootstrap::Error::from(err).into();
    assert_eq!(top.exit_code(), crate::error::EXIT_USAGE);
}

// ---------------------------------------------------------------------------
// etcd (requests and confirmation need a real etcd: tests/tests/cli/error_codes.rs)

fn etcd_settings(scheme: config::model::EtcdScheme, pki_dir: PathBuf) -> crate::etcd::Settings {
    crate::etcd::Settings {
        scheme,
        client_port: 2379,
        peer_port: 2380,
        dial_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        pki_dir,
    }
}

#[tokio::test]
async fn etcd_without_certificates_or_listener_has_its_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let https = etcd_settings(config::model::EtcdScheme::Https, dir.path().join("pki"));
    let err = crate::etcd::Etcd::connect(&["https://127.0.0.1:9".into()], &https)
        .await
        .err()
        .expect("no certificates");
    assert_eq!(err.code(), "KB-ETCD-001", "{err}");

    let http = etcd_settings(config::model::EtcdScheme::Http, dir.path().join("pki"));
    let err = crate::etcd::Etcd::connect_any(&["http://127.0.0.1:9".into()], &http)
        .await
        .err()
        .expect("nothing listens");
    assert_eq!(err.code(), "KB-ETCD-002", "{err}");
}

// ---------------------------------------------------------------------------
// Kubernetes API

/// A kubeconfig for an API server at `addr`, plain http, no credentials.
fn kubeconfig(dir: &Path, addr: SocketAddr) -> PathBuf {
    let path = dir.join("kubelet.conf");
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": format!("http://{addr}")}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    });
    std::fs::write(&path, body.to_string()).expect("write kubeconfig");
    path
}

fn status_body(code: u16, reason: &str) -> Vec<u8> {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("provoked {code}"), "reason": reason, "code": code,
    })
    .to_string()
    .into_bytes()
}

async fn api(dir: &Path, respond: Respond) -> crate::kubernetes::Kubernetes {
    let addr = serve(respond).await;
    crate::kubernetes::Kubernetes::from_kubeconfig(&kubeconfig(dir, addr), Duration::from_secs(2))
        .await
        .expect("kubeconfig is valid")
}

#[tokio::test]
async fn kubernetes_api_failures_have_their_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = crate::kubernetes::Kubernetes::from_kubeconfig(
        &dir.path().join("missing.conf"),
        Duration::from_secs(1),
    )
    .await
    .err()
    .expect("no kubeconfig");
    assert_eq!(err.code(), "KB-KUBE-001", "{err}");

    let denied = api(
        dir.path(),
        respond(|_, _| (403, "application/json", status_body(403, "Forbidden"))),
    )
    .await;
    let err = denied.node_readiness("n1").await.expect_err("403");
    assert_eq!(err.code(), "KB-KUBE-002", "{err}");

    let failing = api(
        dir.path(),
        respond(|_, _| (500, "application/json", status_body(500, "InternalError"))),
    )
    .await;
    let err = failing.node_readiness("n1").await.expect_err("500");
    assert_eq!(err.code(), "KB-KUBE-003", "{err}");

    // A Node whose Ready condition is False with `message`.
    fn not_ready_node(path: &str, message: &str) -> (u16, &'static str, Vec<u8>) {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": path.rsplit('/').next().unwrap_or("n1")},
            "status": {"conditions": [{"type": "Ready", "status": "False",
                "reason": "KubeletNotReady", "message": message}]},
        });
        (200, "application/json", node.to_string().into_bytes())
    }
    let not_ready = api(
        dir.path(),
        respond(|_, path| not_ready_node(path, "container runtime network not ready")),
    )
    .await;
    let nothing = |_: &str| {};
    let err = not_ready
        .wait_node_ready(
            "n1",
            Duration::from_millis(300),
            Duration::from_millis(300),
            &nothing,
        )
        .await
        .expect_err("never Ready");
    assert_eq!(err.code(), "KB-KUBE-004", "{err}");

    // NotReady only for want of a pod network: the longer bound applies,
    // and the waiting is told the reason once.
    let no_network = api(
        dir.path(),
        respond(|_, path| {
            not_ready_node(path, "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized")
        }),
    )
    .await;
    let told = std::sync::Mutex::new(Vec::<String>::new());
    let waiting = |why: &str| told.lock().unwrap().push(why.to_string());
    let started = std::time::Instant::now();
    let err = no_network
        .wait_node_ready(
            "n1",
            Duration::from_millis(100),
            Duration::from_millis(1500),
            &waiting,
        )
        .await
        .expect_err("no network");
    assert_eq!(err.code(), "KB-KUBE-005", "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the network bound, not timeouts.node_ready, ended the wait: {err}"
    );
    let told = told.lock().unwrap().clone();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains("cni plugin not initialized"), "{told:?}");
}

// ---------------------------------------------------------------------------
// Join material, quorum guard, lifecycle messages, explain

#[test]
fn a_ca_file_that_is_no_certificate_has_its_code() {
    let err = crate::join_material::ca_cert_hash(b"not a certificate").expect_err("not PEM");
    assert_eq!(err.code(), "KB-JOIN-001", "{err}");
}

fn member(id: u64, learner: bool) -> crate::etcd::Member {
    if learner {
        crate::testing::learner(id)
    } else {
        crate::testing::member(id)
    }
}

fn health(id: u64, healthy: bool) -> crate::etcd::Health {
    let m = member(id, false);
    if healthy {
        crate::testing::health(m, true)
    } else {
        crate::testing::down(m, "down")
    }
}

#[test]
fn every_quorum_refusal_has_its_code() {
    use crate::quorum::check_removal;
    let three = [health(1, true), health(2, true), health(3, true)];
    let err = check_removal(&three, 9, false).expect_err("not a member");
    assert_eq!(err.code(), "KB-MEMBER-001", "{err}");
    let err = check_removal(&[health(1, true)], 1, true).expect_err("last voter");
    assert_eq!(err.code(), "KB-MEMBER-002", "{err}");
    let err = check_removal(&[health(1, true), health(2, true)], 2, false).expect_err("two voters");
    assert_eq!(err.code(), "KB-MEMBER-003", "{err}");
    let one_down = [health(1, true), health(2, true), health(3, false)];
    let err = check_removal(&one_down, 1, false).expect_err("below quorum");
    assert_eq!(err.code(), "KB-MEMBER-004", "{err}");
    // Through the membership error that carries it to the operator.
    let err = crate::membership::Error::from(err);
    assert_eq!(err.code(), "KB-MEMBER-004", "{err}");
}

#[test]
fn a_lifecycle_message_that_is_not_one_has_its_code() {
    let err = crate::lifecycle::parse_message("hello").expect_err("not JSON");
    assert_eq!(err.code(), "KB-LIFE-001", "{err}");
}

#[test]
fn an_unknown_code_given_to_explain_has_its_code() {
    let err =
        crate::error::Error::from(crate::catalogue::lookup("kb-nope-1").expect_err("no such area"));
    assert_eq!(err.code(), "KB-CLI-004", "{err}");
    assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
}

// ---------------------------------------------------------------------------
// Backups (streaming, verification and retention need etcd and moto:
// tests/tests/daemon/backup.rs)

/// An S3 client on `addr` with static credentials and one attempt.
fn s3_at(addr: SocketAddr) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "provoke",
        ))
        .endpoint_url(format!("http://{addr}"))
        .force_path_style(true)
        .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

#[tokio::test]
async fn backup_failures_have_their_codes() {
    // Backups on a node whose configuration names no bucket.
    let dir = tempfile::tempdir().expect("tempdir");
    let loaded = load_text(dir.path(), &worker_toml(), None, &[])
        .await
        .expect("the worker example loads");
    let err = crate::backup::Backups::from_config(
        &aws_config::SdkConfig::builder().build(),
        &loaded.config,
    )
    .expect_err("no bucket");
    assert_eq!(err.code(), "KB-BACKUP-001", "{err}");

    // No etcd member opens a snapshot stream.
    let settings = etcd_settings(config::model::EtcdScheme::Http, dir.path().join("pki"));
    let etcd = crate::etcd::Etcd::connect(&["http://127.0.0.1:9".into()], &settings).await;
    if let Ok(etcd) = etcd {
        let err = etcd
            .snapshot(&["http://127.0.0.1:9".into()], Duration::from_secs(1))
            .await
            .err()
            .expect("nothing listens");
        assert_eq!(crate::backup::Error::from(err).code(), "KB-BACKUP-002");
    }
    let stalled = crate::backup::Error::TimedOut {
        after: Duration::from_secs(1800),
    };
    assert_eq!(stalled.code(), "KB-BACKUP-002");

    // S3 refuses (403), then has no such key (404).
    let addr = serve(respond(|_, path| {
        if path.contains("missing") {
            (
                404,
                "application/xml",
                b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>".to_vec(),
            )
        } else {
            (
                403,
                "application/xml",
                b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>".to_vec(),
            )
        }
    }))
    .await;
    let bucket = crate::aws::s3::Bucket::new(s3_at(addr), "backups", None);
    let err = crate::backup::Error::from(bucket.list("etcd-snapshots/").await.expect_err("403"));
    assert_eq!(err.code(), "KB-BACKUP-003", "{err}");
    let err = crate::backup::Error::from(
        bucket
            .open("etcd-snapshots/missing.db")
            .await
            .err()
            .expect("404"),
    );
    assert_eq!(err.code(), "KB-BACKUP-005", "{err}");
}

#[tokio::test]
async fn restore_failures_on_this_node_have_their_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("k8s/pki");
    let data = dir.path().join("etcd");
    let k8s = dir.path().join("k8s").display().to_string();
    let data_text = data.display().to_string();
    let env = [
        ("KUBEBOOT_NODE_ROLE", "control-plane"),
        ("KUBEBOOT_PATHS_KUBERNETES_DIR", k8s.as_str()),
        ("KUBEBOOT_PATHS_ETCD_DATA_DIR", data_text.as_str()),
    ];
    let loaded = load_text(
        dir.path(),
        &std::fs::read_to_string(examples().join("control-plane.toml")).expect("example"),
        None,
        &env,
    )
    .await
    .expect("the control-plane example loads");
    let files: std::collections::BTreeMap<&str, &str> = crate::backup::pki::SHARED
        .iter()
        .map(|n| (*n, "pem"))
        .collect();
    let bundle = crate::backup::pki::Bundle::parse(
        serde_json::json!({ "files": files }).to_string().as_bytes(),
    )
    .expect("bundle");
    let file = dir.path().join("snapshot.db");
    std::fs::write(&file, b"not an etcd database").expect("write");
    let prepared = crate::restore::Prepared {
        uri: "s3://b/k.db".into(),
        manifest: serde_json::from_value(serde_json::json!({
            "key": "k.db", "cluster": "c", "generation": 1, "revision": 1,
            "member": "00", "sha256": "00", "size": 1, "agent_version": "t",
            "taken_at": "t", "taken_at_unix": 1, "duration_ms": 1, "trigger": "manual",
        }))
        .expect("manifest"),
        file,
        certificates: bundle,
        tool: crate::restore::Tool::Etcdctl("/usr/bin/etcdctl".into()),
    };
    let member = crate::restore::Member {
        name: "cp-0".into(),
        peer_url: "https://127.0.0.1:2380".into(),
    };

    // kubeadm's certificates directory cannot be written (a file stands
    // where pki/ goes).
    std::fs::create_dir_all(dir.path().join("k8s")).expect("mkdir");
    std::fs::write(&pki, b"not a directory").expect("write");
    let err = crate::restore::lay_down(&prepared, &loaded.config, &member)
        .await
        .expect_err("pki/ is a file");
    assert_eq!(err.code(), "KB-RESTORE-003", "{err}");
    std::fs::remove_file(&pki).expect("rm");

    // A data directory kubeadm reset left something in is moved aside, not
    // deleted, and not in the way.
    std::fs::create_dir_all(data.join("member")).expect("mkdir");

    // etcd's own tool refuses a file that is no snapshot.
    let err = crate::restore::lay_down(&prepared, &loaded.config, &member)
        .await
        .expect_err("etcdctl refuses");
    assert_eq!(err.code(), "KB-RESTORE-002", "{err}");
    assert!(
        matches!(err, crate::restore::Error::ToolFailed { .. }),
        "{err}"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("etcd.replaced-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the old data directory moved aside");
    assert!(aside[0].path().join("member").is_dir());

    // No tool at all.
    let err = crate::restore::Tool::find(None, Some(dir.path().as_os_str())).expect_err("none");
    assert_eq!(err.code(), "KB-RESTORE-002", "{err}");
}
