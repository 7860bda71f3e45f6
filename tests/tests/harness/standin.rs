//! The kubeadm stand-in and the Kubernetes API double, driven with the very
//! configs the agent renders: the contract the agent's end-to-end tests rely
//! on. Every etcd the stand-in starts is killed when the test ends (even on
//! panic) through [`StandinProcesses`].

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kubeboot::kubeadm::config::{
    render_init, render_join, write_private, InitParams, JoinParams, Node,
};
use kubeboot::secret::Secret;
use kubeboot_tests::etcd::connect_tls;
use kubeboot_tests::kubeapi::{KubeApi, EVICTION_BLOCKED_ANNOTATION};
use kubeboot_tests::net::{fresh_loopback_ip, http_request};
use kubeboot_tests::process::pid_alive;
use kubeboot_tests::standin::{invocations, kubeadm_bin, StandinProcesses, LOG_ENV};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One test's cluster: the API double, a root dir with one sub-dir per node
/// (`<root>/<node>/etc/kubernetes`, `<root>/<node>/var/lib/etcd`, like the
/// agent's tests), and ownership of every etcd the stand-in starts.
struct Scenario {
    api: KubeApi,
    procs: StandinProcesses,
    root: tempfile::TempDir,
    token: Secret<String>,
    key: Secret<String>,
}

/// A "node": a name, its own loopback IP and its directories.
#[derive(Debug, Clone)]
struct TestNode {
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
}

impl TestNode {
    fn k8s(&self) -> PathBuf {
        self.dir.join("etc/kubernetes")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("var/lib/etcd")
    }

    fn client_url(&self) -> String {
        format!("https://{}:2379", self.ip)
    }

    fn peer_url(&self) -> String {
        format!("https://{}:2380", self.ip)
    }

    fn pki(&self) -> PathBuf {
        self.k8s().join("pki")
    }

    fn agent_node(&self) -> Node {
        Node {
            name: self.name.clone(),
            ip: self.ip.to_string(),
            provider_id: kubeboot::kubeadm::config::provider_id(
                "us-east-1a",
                "i-0123456789abcdef0",
            ),
        }
    }
}

impl Scenario {
    async fn start() -> Self {
        Self {
            api: KubeApi::start().await,
            procs: StandinProcesses::new(),
            root: tempfile::Builder::new()
                .prefix("kbtest-standin-")
                .tempdir()
                .expect("temp dir"),
            token: kubeboot::join_material::generate_token(),
            key: kubeboot::join_material::generate_certificate_key(),
        }
    }

    fn node(&self, name: &str) -> TestNode {
        TestNode {
            name: format!("ip-{name}.ec2.internal"),
            ip: fresh_loopback_ip(),
            dir: self.root.path().join(name),
        }
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("kubeadm.log")
    }

    fn init_config(&self, n: &TestNode) -> PathBuf {
        let rendered = render_init(&InitParams {
            node: n.agent_node(),
            cluster_name: "kbtest".into(),
            kubernetes_version: "1.31.2".into(),
            control_plane_endpoint: self.api.endpoint(),
            pod_subnet: "10.244.0.0/16".into(),
            service_subnet: "10.96.0.0/12".into(),
            dns_domain: "cluster.local".into(),
            service_account_issuer: None,
            etcd_data_dir: n.data_dir().display().to_string(),
            kubernetes_dir: n.k8s().display().to_string(),
            token: self.token.clone(),
            token_ttl: Duration::from_secs(86_400),
            certificate_key: self.key.clone(),
        });
        let path = n.dir.join("run/kubeadm-init.yaml");
        write_private(&path, &rendered).expect("write init config");
        path
    }

    fn join_config(
        &self,
        n: &TestNode,
        token: &Secret<String>,
        pins: Vec<String>,
        key: Option<&Secret<String>>,
    ) -> PathBuf {
        let rendered = render_join(&JoinParams {
            node: n.agent_node(),
            api_server_endpoint: self.api.endpoint(),
            token: token.clone(),
            ca_cert_hashes: pins,
            certificate_key: key.cloned(),
            kubernetes_dir: n.k8s().display().to_string(),
        });
        let path = n.dir.join("run/kubeadm-join.yaml");
        write_private(&path, &rendered).expect("write join config");
        path
    }

    /// Runs the stand-in with the harness environment (pid dir, owner,
    /// invocation log) plus `env`, capturing its output.
    async fn kubeadm(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = tokio::process::Command::new(kubeadm_bin());
        cmd.args(args)
            .envs(self.procs.envs())
            .env(LOG_ENV, self.log())
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .expect("kubeadm stand-in finished within 90 s")
            .expect("run the kubeadm stand-in")
    }

    async fn init(&self, n: &TestNode) -> Output {
        let cfg = self.init_config(n);
        let out = self
            .kubeadm(&["init", "--config", path(&cfg), "--upload-certs"], &[])
            .await;
        assert_success(&out, "init");
        out
    }

    async fn join(&self, n: &TestNode, key: Option<&Secret<String>>) -> Output {
        let cfg = self.join_config(n, &self.token, vec![self.pin()], key);
        let out = self.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
        assert_success(&out, "join");
        out
    }

    /// The CA pin, computed by the agent's own code from the CA in
    /// cluster-info (the contract: the agent publishes this value).
    fn pin(&self) -> String {
        let pem = ca_from_cluster_info(&self.api);
        kubeboot::join_material::ca_cert_hash(pem.as_bytes()).expect("CA pin")
    }

    /// Members as etcd reports them through `via`'s client URL.
    async fn members(&self, via: &TestNode) -> Vec<(String, bool, Vec<String>)> {
        let mut c = connect_tls(&[via.client_url()], &via.pki())
            .await
            .expect("connect etcd");
        let list = c.member_list().await.expect("member list");
        let mut members: Vec<(String, bool, Vec<String>)> = list
            .members()
            .iter()
            .map(|m| (m.name().to_string(), m.is_learner(), m.peer_urls().to_vec()))
            .collect();
        members.sort();
        members
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_success(out: &Output, what: &str) {
    let (stdout, stderr) = text(out);
    assert!(
        out.status.success(),
        "kubeadm {what} failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// Asserts kubeadm's failure convention: exit 1 and `phrases` on stderr.
fn assert_fails_with(out: &Output, phrases: &[&str]) {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for p in phrases {
        assert!(stderr.contains(p), "stderr lacks {p:?}:\n{stderr}");
    }
}

fn ca_from_cluster_info(api: &KubeApi) -> String {
    let info = api
        .object("/api/v1/namespaces/kube-public/configmaps/cluster-info")
        .expect("cluster-info ConfigMap");
    let kc: Value = serde_json::from_str(info["data"]["kubeconfig"].as_str().expect("kubeconfig"))
        .expect("JSON kubeconfig");
    let data = kc["clusters"][0]["cluster"]["certificate-authority-data"]
        .as_str()
        .expect("certificate-authority-data");
    String::from_utf8(b64(data)).expect("PEM")
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    B64.decode(s).expect("base64")
}

fn b64_encode(s: &str) -> String {
    use base64::Engine as _;
    B64.encode(s)
}

fn secret_field(secret: &Value, field: &str) -> String {
    String::from_utf8(b64(secret["data"][field]
        .as_str()
        .unwrap_or_else(|| panic!("no data.{field}"))))
    .expect("UTF-8")
}

/// The Node waits for a pod network (the stand-in runs no add-on: the agent
/// applies them), then, with one laid in, reports `Ready` = `"True"`.
async fn wait_ready(api: &KubeApi, node: &str) {
    let condition = |api: &KubeApi| {
        api.object(&format!("/api/v1/nodes/{node}"))
            .and_then(|n| {
                n["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")
                    .cloned()
            })
            .unwrap_or_default()
    };
    let before = condition(api);
    assert_eq!(before["status"], "False", "{before}");
    assert_eq!(
        before["message"],
        kubeboot_tests::kubeapi::NETWORK_NOT_READY,
        "a kubelet without CNI configuration says why: {before}"
    );
    api.install_pod_network();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = api
            .object(&format!("/api/v1/nodes/{node}"))
            .and_then(|n| {
                n["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")
                    .map(|c| c["status"] == "True")
            })
            .unwrap_or(false);
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} never became Ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pin `openssl` computes, when openssl is installed: proves the CA pin
/// is kubeadm's (SPKI DER SHA-256) independently of our code.
fn openssl_pin(ca: &Path) -> Option<String> {
    let pubkey = std::process::Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in", path(ca)])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mut child = std::process::Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "der"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    use std::io::Write as _;
    child.stdin.take()?.write_all(&pubkey.stdout).ok()?;
    let der = child.wait_with_output().ok()?.stdout;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(&der);
    Some(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_starts_one_etcd_member_and_publishes_cluster_state() {
    let s = Scenario::start().await;
    let cp = s.node("cp0");
    let out = s.init(&cp).await;
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("Your Kubernetes control-plane has initialized successfully!"),
        "{stdout}"
    );
    // Like kubeadm, the output carries the token and key: the agent scrubs it.
    assert!(
        stdout.contains(&format!("--token {}", s.token.expose())),
        "{stdout}"
    );
    assert!(stdout.contains(s.key.expose()), "{stdout}");

    // One voting member, named after the node, on the node's own address.
    assert_eq!(
        s.members(&cp).await,
        vec![(cp.name.clone(), false, vec![cp.peer_url()])]
    );
    let pids = s.procs.live_pids();
    assert_eq!(pids.len(), 1, "one recorded etcd: {pids:?}");

    // Files where kubeadm writes them.
    let k8s = cp.k8s();
    let ca = k8s.join("pki/ca.crt");
    assert!(ca.is_file());
    let key_mode = std::fs::metadata(k8s.join("pki/ca.key"))
        .expect("ca.key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(k8s.join("manifests/etcd.yaml").is_file());
    let admin = kube::config::Kubeconfig::read_from(k8s.join("admin.conf"))
        .expect("admin.conf is a kubeconfig");
    assert_eq!(
        admin.clusters[0]
            .cluster
            .as_ref()
            .and_then(|c| c.server.clone()),
        Some(s.api.url())
    );

    // The CA pin: the agent's computation, openssl's, and the one kubeadm prints agree.
    let pin = s.pin();
    assert!(
        stdout.contains(&format!("--discovery-token-ca-cert-hash {pin}")),
        "{stdout}"
    );
    if let Some(openssl) = openssl_pin(&ca) {
        assert_eq!(openssl, pin);
    }
    assert_eq!(
        ca_from_cluster_info(&s.api),
        std::fs::read_to_string(&ca).expect("ca.crt")
    );

    // Cluster state where kubeadm keeps it.
    let info = s
        .api
        .object("/api/v1/namespaces/kube-public/configmaps/cluster-info")
        .expect("cluster-info");
    let id = &s.token.expose()[..6];
    assert!(
        info["data"][format!("jws-kubeconfig-{id}")].is_string(),
        "signed for the token: {info:#}"
    );
    let token = s
        .api
        .object(&format!(
            "/api/v1/namespaces/kube-system/secrets/bootstrap-token-{id}"
        ))
        .expect("token secret");
    assert_eq!(token["type"], "bootstrap.kubernetes.io/token");
    assert_eq!(secret_field(&token, "token-id"), id);
    assert_eq!(secret_field(&token, "token-secret"), &s.token.expose()[7..]);
    assert_eq!(
        secret_field(&token, "usage-bootstrap-authentication"),
        "true"
    );
    assert_eq!(secret_field(&token, "usage-bootstrap-signing"), "true");
    assert_eq!(
        secret_field(&token, "auth-extra-groups"),
        "system:bootstrappers:kubeadm:default-node-token"
    );
    let expiration: k8s_openapi::jiff::Timestamp = secret_field(&token, "expiration")
        .parse()
        .expect("RFC 3339 expiration");
    let left = expiration.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
    assert!((86_000..=86_400).contains(&left), "ttl 24 h: {left}");
    let certs = s
        .api
        .object("/api/v1/namespaces/kube-system/secrets/kubeadm-certs")
        .expect("kubeadm-certs");
    assert!(certs["data"]["ca.key"].is_string());
    let config = s
        .api
        .object("/api/v1/namespaces/kube-system/configmaps/kubeadm-config")
        .expect("kubeadm-config");
    let cluster: Value = serde_json::from_str(
        config["data"]["ClusterConfiguration"]
            .as_str()
            .expect("ClusterConfiguration"),
    )
    .expect("JSON");
    assert_eq!(cluster["controlPlaneEndpoint"], s.api.endpoint());
    let pod = s
        .api
        .object(&format!(
            "/api/v1/namespaces/kube-system/pods/etcd-{}",
            cp.name
        ))
        .expect("etcd mirror Pod");
    assert_eq!(
        pod["metadata"]["labels"],
        json!({"component": "etcd", "tier": "control-plane"})
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubeadm.kubernetes.io/etcd.advertise-client-urls"],
        cp.client_url()
    );
    assert_eq!(pod["status"]["phase"], "Running");
    let node = s
        .api
        .object(&format!("/api/v1/nodes/{}", cp.name))
        .expect("Node");
    assert_eq!(
        node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
        ""
    );
    wait_ready(&s.api, &cp.name).await;

    // A second init on the same node fails kubeadm's preflight.
    let again = s
        .kubeadm(
            &[
                "init",
                "--config",
                path(&s.init_config(&cp)),
                "--upload-certs",
            ],
            &[],
        )
        .await;
    assert_fails_with(
        &again,
        &[
            "error execution phase preflight",
            "[ERROR Port-2379]: Port 2379 is in use",
            &format!(
                "[ERROR DirAvailable-{}]: {} is not empty",
                cp.data_dir().display().to_string().replace('/', "-"),
                cp.data_dir().display()
            ),
            "etc-kubernetes-manifests-etcd.yaml]",
        ],
    );
    assert_eq!(
        kubeboot::kubeadm::diagnose(&text(&again).1),
        kubeboot::kubeadm::diagnose("[ERROR Port-2379]: Port 2379 is in use")
    );

    // The invocation log counts both, without secrets.
    let inits: Vec<_> = invocations(&s.log())
        .into_iter()
        .filter(|i| i.command() == "init")
        .collect();
    assert_eq!(inits.iter().map(|i| i.exit).collect::<Vec<_>>(), vec![0, 1]);
    let log = std::fs::read_to_string(s.log()).expect("log");
    assert!(
        !log.contains(s.token.expose()) && !log.contains(s.key.expose()),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joins_with_the_token_and_ca_pin_and_its_node_becomes_ready() {
    let s = Scenario::start().await;
    s.api.set_node_ready_delay(Duration::from_millis(200));
    let cp = s.node("cp0");
    s.init(&cp).await;

    let w0 = s.node("w0");
    let out = s.join(&w0, None).await;
    assert!(
        text(&out).0.contains("This node has joined the cluster"),
        "{}",
        text(&out).0
    );
    assert!(w0.k8s().join("kubelet.conf").is_file());
    assert_eq!(
        std::fs::read(w0.k8s().join("pki/ca.crt")).expect("worker CA"),
        std::fs::read(cp.k8s().join("pki/ca.crt")).expect("cp CA")
    );
    let node = s
        .api
        .object(&format!("/api/v1/nodes/{}", w0.name))
        .expect("worker Node");
    assert!(node["metadata"]["labels"]
        .get("node-role.kubernetes.io/control-plane")
        .is_none());
    assert_eq!(
        node["status"]["addresses"][0]["address"],
        w0.ip.to_string(),
        "kubelet's --node-ip"
    );
    wait_ready(&s.api, &w0.name).await;
    // A worker runs no etcd.
    assert_eq!(s.members(&cp).await.len(), 1);
    assert!(!w0.data_dir().exists());

    // A token made later with `kubeadm token create` admits another worker.
    let fresh = kubeboot::join_material::generate_token();
    let admin = cp.k8s().join("admin.conf");
    let out = s
        .kubeadm(
            &[
                "token",
                "create",
                fresh.expose(),
                "--ttl",
                "1h0m0s",
                "--kubeconfig",
                path(&admin),
            ],
            &[],
        )
        .await;
    assert_success(&out, "token create");
    assert_eq!(text(&out).0.trim(), fresh.expose());
    let w1 = s.node("w1");
    let cfg = s.join_config(&w1, &fresh, vec![s.pin()], None);
    assert_success(
        &s.kubeadm(&["join", "--config", path(&cfg)], &[]).await,
        "join with a created token",
    );
    wait_ready(&s.api, &w1.name).await;
}

/// What the agent used to render: this node's etcd URLs in the
/// ClusterConfiguration's `etcd.local.extraArgs`. That document is
/// cluster-wide (the `kubeadm-config` ConfigMap) and a joiner applies its
/// extraArgs over its own defaults (upstream: phases/etcd/local.go), so the
/// second control plane's etcd advertises and listens on the first node's
/// address and the join fails. The agent renders none now
/// (`kubeadm::config` unit test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_specific_etcd_urls_in_the_cluster_configuration_break_the_next_join() {
    let s = Scenario::start().await;
    let cp0 = s.node("cp0");
    let cfg = s.init_config(&cp0);
    let text = std::fs::read_to_string(&cfg).expect("init config");
    let mut docs: Vec<Value> = text
        .split("---\n")
        .map(|d| serde_json::from_str(d).expect("JSON document"))
        .collect();
    docs[1]["etcd"]["local"]["extraArgs"] = json!([
        {"name": "listen-client-urls", "value": cp0.client_url()},
        {"name": "advertise-client-urls", "value": cp0.client_url()},
        {"name": "listen-peer-urls", "value": cp0.peer_url()},
        {"name": "initial-advertise-peer-urls", "value": cp0.peer_url()},
    ]);
    let rendered: Vec<String> = docs.iter().map(|d| format!("{d:#}\n")).collect();
    write_private(&cfg, &Secret::new(rendered.join("---\n"))).expect("write");
    let out = s
        .kubeadm(&["init", "--config", path(&cfg), "--upload-certs"], &[])
        .await;
    assert_success(&out, "init");
    let cp1 = s.node("cp1");
    let join = s.join_config(&cp1, &s.token, vec![s.pin()], Some(&s.key));
    // cp1's etcd cannot serve as cp0: its learner never catches up, and
    // the promotion gives up (as kubeadm's retries do, sooner here).
    let out = s
        .kubeadm(
            &["join", "--config", path(&join)],
            &[("KBTEST_KUBEADM_PROMOTE_TIMEOUT_MS", "3000")],
        )
        .await;
    assert_fails_with(&out, &["error execution phase control-plane-join/etcd"]);
    assert_eq!(
        s.members(&cp0).await.len(),
        2,
        "cp0 and cp1's learner that never started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_join_as_learners_then_voters() {
    let s = Scenario::start().await;
    let nodes = [s.node("cp0"), s.node("cp1"), s.node("cp2")];
    s.init(&nodes[0]).await;
    for n in &nodes[1..] {
        let out = s.join(n, Some(&s.key)).await;
        let (stdout, _) = text(&out);
        assert!(
            stdout.contains("[etcd] Adding etcd member as learner"),
            "{stdout}"
        );
        assert!(
            stdout.contains("was promoted to a voting member"),
            "{stdout}"
        );
        assert!(
            stdout.contains("a new control plane instance was created"),
            "{stdout}"
        );
        assert!(n.k8s().join("admin.conf").is_file() && n.k8s().join("pki/ca.key").is_file());
    }
    let mut expected: Vec<(String, bool, Vec<String>)> = nodes
        .iter()
        .map(|n| (n.name.clone(), false, vec![n.peer_url()]))
        .collect();
    expected.sort();
    for via in &nodes {
        assert_eq!(s.members(via).await, expected, "as seen by {}", via.name);
    }
    let pods = s.api.list("pods", Some("kube-system"));
    let mut urls: Vec<&str> = pods
        .iter()
        .filter_map(|p| {
            p["metadata"]["annotations"]["kubeadm.kubernetes.io/etcd.advertise-client-urls"]
                .as_str()
        })
        .collect();
    urls.sort_unstable();
    let mut want: Vec<String> = nodes.iter().map(TestNode::client_url).collect();
    want.sort();
    assert_eq!(urls, want);
    for n in &nodes {
        let node = s
            .api
            .object(&format!("/api/v1/nodes/{}", n.name))
            .expect("Node");
        assert_eq!(
            node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
            ""
        );
    }
    assert_eq!(s.procs.live_pids().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_pin_or_unknown_token_fails_like_kubeadm() {
    let s = Scenario::start().await;
    let cp = s.node("cp0");
    s.init(&cp).await;
    let w = s.node("w0");
    let fast = [("KBTEST_KUBEADM_DISCOVERY_TIMEOUT_MS", "300")];

    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let cfg = s.join_config(&w, &s.token, vec![wrong_pin], None);
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &fast).await;
    assert_fails_with(
        &out,
        &[
            "error execution phase preflight: couldn't validate the identity of the API Server: cluster CA found in cluster-info ConfigMap is invalid",
            &format!("none of the public keys \"{}\" are pinned", s.pin()),
        ],
    );
    assert!(kubeboot::kubeadm::diagnose(&text(&out).1).contains("CA public-key pin"));

    let unknown = Secret::new("zzzzzz.0123456789abcdef".to_string());
    let cfg = s.join_config(&w, &unknown, vec![s.pin()], None);
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &fast).await;
    assert_fails_with(
        &out,
        &["could not find a JWS signature in the cluster-info ConfigMap for token ID \"zzzzzz\""],
    );

    let wrong_secret = Secret::new(format!("{}.zzzzzzzzzzzzzzzz", &s.token.expose()[..6]));
    let cfg = s.join_config(&w, &wrong_secret, vec![s.pin()], None);
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &fast).await;
    assert_fails_with(
        &out,
        &["failed to verify JWS signature of received cluster info object"],
    );

    // An expired token is cleaned up, so its signature disappears.
    let id = &s.token.expose()[..6];
    let past = b64_encode("2000-01-01T00:00:00Z");
    s.api
        .patch_object(
            &format!("/api/v1/namespaces/kube-system/secrets/bootstrap-token-{id}"),
            &json!({"data": {"expiration": past}}),
        )
        .expect("token secret");
    let cfg = s.join_config(&w, &s.token, vec![s.pin()], None);
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &fast).await;
    assert_fails_with(&out, &[&format!("for token ID \"{id}\"")]);
    assert!(s
        .api
        .object(&format!(
            "/api/v1/namespaces/kube-system/secrets/bootstrap-token-{id}"
        ))
        .is_none());

    // Nothing was written and no Node registered by the failed joins.
    assert!(!w.k8s().join("kubelet.conf").exists());
    assert!(s.api.object(&format!("/api/v1/nodes/{}", w.name)).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_key_fails_the_control_plane_join() {
    let s = Scenario::start().await;
    let cp = s.node("cp0");
    s.init(&cp).await;
    let cp1 = s.node("cp1");
    let certs = "/api/v1/namespaces/kube-system/secrets/kubeadm-certs";

    // Two hours later: kubeadm-certs has expired.
    s.api
        .patch_object(certs, &json!({"metadata": {"annotations": {"kbtest.kubeboot.dev/expires": "2000-01-01T00:00:00Z"}}}))
        .expect("kubeadm-certs");
    let cfg = s.join_config(&cp1, &s.token, vec![s.pin()], Some(&s.key));
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
    assert_fails_with(
        &out,
        &[
            "error execution phase control-plane-prepare/download-certs: error downloading certs: error downloading the secret: \
             Secret \"kubeadm-certs\" was not found in the \"kube-system\" Namespace. This Secret might have expired.",
        ],
    );
    assert!(kubeboot::kubeadm::diagnose(&text(&out).1).contains("certificates are gone"));
    assert!(s.api.delete_object(certs));
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
    assert_fails_with(&out, &["Secret \"kubeadm-certs\" was not found"]);
    assert_eq!(
        s.members(&cp).await.len(),
        1,
        "no member added by a failed join"
    );

    // The leader refreshes the certificates with a new key.
    let new_key = kubeboot::join_material::generate_certificate_key();
    let out = s
        .kubeadm(
            &[
                "init",
                "phase",
                "upload-certs",
                "--upload-certs",
                "--certificate-key",
                new_key.expose(),
                "--config",
                path(&s.init_config(&cp)),
            ],
            &[],
        )
        .await;
    assert_success(&out, "init phase upload-certs");
    assert!(text(&out).0.contains(new_key.expose()));

    // The old key no longer decrypts them; the new one does.
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
    assert_fails_with(
        &out,
        &["error decoding secret data with provided key: cipher: message authentication failed"],
    );
    assert_eq!(s.members(&cp).await.len(), 1);
    s.join(&cp1, Some(&new_key)).await;
    assert_eq!(s.members(&cp).await.len(), 2);
    let log = std::fs::read_to_string(s.log()).expect("log");
    assert!(!log.contains(new_key.expose()), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_removes_the_member_and_wipes_the_node() {
    let s = Scenario::start().await;
    let cp0 = s.node("cp0");
    let cp1 = s.node("cp1");
    s.init(&cp0).await;
    s.join(&cp1, Some(&s.key)).await;
    assert_eq!(s.members(&cp0).await.len(), 2);
    let pid: u32 = std::fs::read_to_string(cp1.k8s().join("standin/etcd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");

    let cert_dir = cp1.k8s().join("pki");
    let reset = ["reset", "--force", "--cert-dir", path(&cert_dir)];
    let out = s.kubeadm(&reset, &[]).await;
    assert_success(&out, "reset");
    assert_eq!(
        s.members(&cp0).await,
        vec![(cp0.name.clone(), false, vec![cp0.peer_url()])],
        "member removed\n{}",
        text(&out).0
    );
    assert!(!pid_alive(pid), "etcd stopped");
    assert!(
        cp1.data_dir().is_dir()
            && std::fs::read_dir(cp1.data_dir())
                .expect("data dir")
                .next()
                .is_none()
    );
    for gone in [
        "admin.conf",
        "kubelet.conf",
        "manifests/etcd.yaml",
        "pki/ca.crt",
        "pki/ca.key",
        "standin",
    ] {
        assert!(!cp1.k8s().join(gone).exists(), "{gone} left behind");
    }
    assert!(s
        .api
        .object(&format!(
            "/api/v1/namespaces/kube-system/pods/etcd-{}",
            cp1.name
        ))
        .is_none());
    assert!(
        s.api
            .object(&format!("/api/v1/nodes/{}", cp1.name))
            .is_some(),
        "reset keeps the Node"
    );

    // Idempotent: again, and on a node that never joined.
    assert_success(&s.kubeadm(&reset, &[]).await, "second reset");
    let never = s.node("never");
    let never_certs = never.k8s().join("pki");
    assert_success(
        &s.kubeadm(&["reset", "--force", "--cert-dir", path(&never_certs)], &[])
            .await,
        "reset of a clean node",
    );

    // A reset node can join again.
    s.join(&cp1, Some(&s.key)).await;
    assert_eq!(s.members(&cp0).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_double_serves_a_kube_client() {
    use k8s_openapi::api::core::v1::{Node as KNode, Pod};
    use kube::api::{Api, EvictParams, ListParams, PostParams};

    let api = KubeApi::start().await;
    api.set_node_ready_delay(Duration::from_millis(100));
    let mut config = kube::Config::new(api.url().parse().expect("URL"));
    // kube 5 retries 429/503 by default (15 times, exponential backoff: minutes),
    // which would turn a PDB-refused eviction into a long silent stall.
    config.default_retry = false;
    let client = kube::Client::try_from(config).expect("kube client");

    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "31")
    );

    let nodes: Api<KNode> = Api::all(client.clone());
    let node: KNode = serde_json::from_value(json!({
        "metadata": {"name": "n1"},
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
            "message": kubeboot_tests::kubeapi::NETWORK_NOT_READY}]},
    }))
    .expect("node");
    let created = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create Node");
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let err = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect_err("exists");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    nodes.cordon("n1").await.expect("cordon (merge patch)");
    // As strict as a kubelet: no pod network, no Ready, however long.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let waiting = nodes.get("n1").await.expect("get Node");
    assert!(
        waiting
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False"),
        "Ready without a pod network"
    );
    assert!(
        api.network_report("n1")
            .contains("no DaemonSet installs a CNI configuration"),
        "{}",
        api.network_report("n1")
    );
    api.install_pod_network();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = nodes.get("n1").await.expect("get Node");
        assert_eq!(n.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
        let ready = n
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kubelet never reported Ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, node, blocked) in [("a", "n1", false), ("b", "n1", true), ("c", "n2", false)] {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        }))
        .expect("pod");
        if blocked {
            pod.metadata.annotations = Some(
                [(
                    EVICTION_BLOCKED_ANNOTATION.to_string(),
                    "blocked".to_string(),
                )]
                .into(),
            );
        }
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create Pod");
    }
    let all: Api<Pod> = Api::all(client.clone());
    let on_n1 = all
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .expect("list by node");
    let mut names: Vec<String> = on_n1
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    pods.evict("a", &EvictParams::default())
        .await
        .expect("evict a");
    let err = pods
        .evict("b", &EvictParams::default())
        .await
        .expect_err("PDB");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 429),
        "{err:?}"
    );
    assert!(pods.get_opt("a").await.expect("get").is_none());
    nodes
        .delete("n1", &Default::default())
        .await
        .expect("delete Node");
    let err = nodes.get("n1").await.expect_err("gone");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );

    // An outage answers 503 everywhere; raw Status shape checked on the wire.
    api.set_unavailable(true);
    let resp = http_request(&api.url(), "GET", "/readyz", &[], b"")
        .await
        .expect("request");
    assert_eq!(resp.status, 503);
    api.set_unavailable(false);
    let resp = http_request(
        &api.url(),
        "GET",
        "/api/v1/namespaces/x/configmaps/nope",
        &[],
        b"",
    )
    .await
    .expect("request");
    let status: Value = serde_json::from_slice(&resp.body).expect("Status JSON");
    assert_eq!(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "configmaps \"nope\" not found", "reason": "NotFound",
               "details": {"name": "nope", "kind": "configmaps"}, "code": 404})
    );
    assert!(api.request_log().iter().any(|r| r.status == 503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_fails_like_kubeadm_when_the_api_server_is_down_and_reset_cleans_up() {
    let s = Scenario::start().await;
    s.api.set_unavailable(true);
    let cp = s.node("cp0");
    let cfg = s.init_config(&cp);
    let out = s
        .kubeadm(
            &["init", "--config", path(&cfg), "--upload-certs"],
            &[("KBTEST_KUBEADM_WAIT_TIMEOUT_MS", "1000")],
        )
        .await;
    assert_fails_with(
        &out,
        &[
            "error execution phase wait-control-plane",
            "timed out waiting for the condition",
        ],
    );
    assert!(kubeboot::kubeadm::diagnose(&text(&out).1).contains("control plane did not come up"));
    // Like a static Pod, the etcd kubeadm started keeps running: the node
    // must be reset before init can run again.
    let pids = s.procs.live_pids();
    assert_eq!(pids.len(), 1);
    s.api.set_unavailable(false);
    let again = s
        .kubeadm(&["init", "--config", path(&cfg), "--upload-certs"], &[])
        .await;
    assert_fails_with(&again, &["[ERROR Port-2379]"]);
    let cert_dir = cp.k8s().join("pki");
    assert_success(
        &s.kubeadm(&["reset", "--force", "--cert-dir", path(&cert_dir)], &[])
            .await,
        "reset",
    );
    assert!(!pid_alive(pids[0]));
    s.init(&cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_learner_blocks_the_control_plane_join_like_kubeadm() {
    let s = Scenario::start().await;
    let cp0 = s.node("cp0");
    s.init(&cp0).await;
    // A join that crashed after `member add`: a learner that never started.
    let mut etcd = connect_tls(&[cp0.client_url()], &cp0.pki())
        .await
        .expect("connect");
    let ghost = format!("https://{}:2380", fresh_loopback_ip());
    etcd.member_add(
        [ghost.as_str()],
        Some(etcd_client::MemberAddOptions::new().with_is_learner()),
    )
    .await
    .expect("add learner");

    let cp1 = s.node("cp1");
    let cfg = s.join_config(&cp1, &s.token, vec![s.pin()], Some(&s.key));
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
    assert_fails_with(
        &out,
        &[
            "error execution phase control-plane-join/etcd",
            "etcdserver: too many learner members in cluster",
        ],
    );
    assert!(kubeboot::kubeadm::diagnose(&text(&out).1).contains("stale member"));
    assert_eq!(s.members(&cp0).await.len(), 2, "cp0 and the ghost learner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_fails_check_etcd_like_kubeadm() {
    let s = Scenario::start().await;
    let cp0 = s.node("cp0");
    let cp1 = s.node("cp1");
    s.init(&cp0).await;
    s.join(&cp1, Some(&s.key)).await;
    // cp1's instance vanishes: its etcd dies, its member stays.
    let pid: u32 = std::fs::read_to_string(cp1.k8s().join("standin/etcd.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    kubeboot_tests::standin::stop_groups(&[pid], Duration::ZERO);

    let cp2 = s.node("cp2");
    let cfg = s.join_config(&cp2, &s.token, vec![s.pin()], Some(&s.key));
    let out = s.kubeadm(&["join", "--config", path(&cfg)], &[]).await;
    assert_fails_with(
        &out,
        &[
            "error execution phase check-etcd: etcd cluster is not healthy: failed to dial endpoint",
            &cp1.client_url(),
        ],
    );
    assert!(kubeboot::kubeadm::diagnose(&text(&out).1).contains("stale member"));
    assert_eq!(s.members(&cp0).await.len(), 2, "nothing added");
}

/// The stand-in's control plane is as strict as kube-apiserver about the
/// service-account flags kubeboot renders: a JWKS URI that is not https
/// keeps the API server from starting (pkg/kubeapiserver/options/
/// authentication.go), so init fails at wait-control-plane; and the `sa`
/// key it generates is RSA, kubeadm's default, which the issuer's JWKS
/// must describe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_jwks_uri_fails_init_and_the_sa_key_is_rsa() {
    let s = Scenario::start().await;
    let cp = s.node("cp0");
    let cfg = s.init_config(&cp);
    let rendered = std::fs::read_to_string(&cfg).expect("config");
    let mut docs: Vec<serde_json::Value> = rendered
        .split("\n---\n")
        .map(|d| serde_json::from_str(d).expect("JSON document"))
        .collect();
    let cluster = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterConfiguration")
        .expect("ClusterConfiguration");
    cluster["apiServer"]["extraArgs"] = json!([
        {"name": "service-account-issuer", "value": "http://oidc.example.com/a"},
        {"name": "service-account-jwks-uri", "value": "http://oidc.example.com/a/keys.json"},
    ]);
    let bad = cp.dir.join("run/kubeadm-init-http.yaml");
    std::fs::write(
        &bad,
        docs.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n---\n"),
    )
    .expect("write");
    let out = s
        .kubeadm(&["init", "--config", path(&bad), "--upload-certs"], &[])
        .await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("service-account-jwks-uri requires https scheme"),
        "{stderr}"
    );
    assert!(s.procs.live_pids().is_empty(), "no etcd left running");

    // (A failed init leaves its files, as kubeadm's does: another node.)
    let good = s.node("cp1");
    s.init(&good).await;
    let key = std::fs::read_to_string(good.k8s().join("pki/sa.pub")).expect("sa.pub");
    let der = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        key.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>(),
    )
    .expect("PEM");
    // SubjectPublicKeyInfo with the rsaEncryption OID 1.2.840.113549.1.1.1.
    let rsa_oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    assert!(
        der.windows(rsa_oid.len()).any(|w| w == rsa_oid),
        "sa.pub is not an RSA key"
    );
}
