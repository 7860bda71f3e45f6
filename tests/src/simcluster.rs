//! A simulated cluster on loopback: what the e2e tests and `kubeboot-sim`
//! boot the real agent against.
//!
//! moto_server is AWS (table created from the agent's own schema), the
//! Kubernetes API double is the API server behind "the load balancer", and
//! each node has its own IMDSv2 double (identity, instance role, user-data
//! with its role), its own loopback address (so etcd members use the
//! standard ports like real nodes), its own directory tree, and the kubeadm
//! stand-in as its kubeadm. The agent is started as the real binary.

use crate::imds::{Imds, ImdsIdentity};
use crate::kubeapi::KubeApi;
use crate::moto::Moto;
use crate::net::fresh_loopback_ip;
use crate::standin::{self, StandinProcesses};
use crate::workspace::kubeboot_bin;
use kubeboot::join_material::{JoinMaterial, JoinStore};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Guard, Locker, Owner, Purpose, Settings};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{JoinPointer, Registry};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// One simulated instance.
pub struct SimNode {
    pub index: usize,
    pub role: &'static str,
    pub imds: Imds,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl SimNode {
    /// The node's private IP (a loopback address of its own).
    pub fn ip(&self) -> String {
        self.imds.identity().private_ip.to_string()
    }

    /// The EC2 instance id.
    pub fn instance_id(&self) -> String {
        self.imds.identity().instance_id.clone()
    }

    /// The EMF file this node's agent writes (`metrics.sink = "file"`).
    pub fn metrics_file(&self) -> PathBuf {
        self.dir.join("metrics.emf")
    }

    /// Every EMF line this node wrote so far.
    pub fn metrics_text(&self) -> String {
        std::fs::read_to_string(self.metrics_file()).unwrap_or_default()
    }
}

/// How one `kubeboot bootstrap` run ended.
#[derive(Debug, Clone)]
pub struct NodeRun {
    pub index: usize,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// The last lines of a process's output, for assertion messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Stops a daemon the way systemd does (SIGTERM), waits up to 20 s for it
/// and returns its exit code and what it wrote on stderr (if piped).
pub async fn sigterm_and_wait(child: &mut tokio::process::Child) -> (Option<i32>, String) {
    let pid = child.id().expect("daemon pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the daemon stops within 20 s of SIGTERM")
        .expect("wait");
    let stderr = read_stderr(child).await;
    (status.code(), stderr)
}

/// What is left of a child's piped stderr, to its end (empty when it was
/// not piped or was taken already).
pub async fn read_stderr(child: &mut tokio::process::Child) -> String {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    stderr
}

/// The JSON log lines of an agent's output (other lines skipped).
pub fn log_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first JSON log line of `text` whose message is `message`; panics
/// with the output's tail when there is none.
pub fn log_line(text: &str, message: &str) -> serde_json::Value {
    log_lines(text)
        .into_iter()
        .find(|l| l["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line in\n{}", tail(text)))
}

/// Every run exited 0; otherwise the failing node's last output.
pub fn assert_ok(runs: &[NodeRun]) {
    for r in runs {
        assert_eq!(
            r.code,
            Some(0),
            "node {} exited {:?} after {:?}:\n{}",
            r.index,
            r.code,
            r.elapsed,
            tail(&r.stderr)
        );
    }
}

/// The whole simulated cluster; everything stops when it drops.
pub struct SimCluster {
    pub name: String,
    pub table: String,
    pub moto: Moto,
    pub kubeapi: KubeApi,
    pub nodes: Vec<SimNode>,
    pub kubeadm_log: PathBuf,
    /// Dropped before `work`, so stand-in etcd members stop before their dirs go.
    pub standin: StandinProcesses,
    pub work: tempfile::TempDir,
    /// Everything the agents printed that the harness saw, for the I6 scan.
    outputs: std::sync::Mutex<Vec<String>>,
}

fn user_data(role: &str) -> Vec<u8> {
    format!(
        "Content-Type: multipart/mixed; boundary=\"//\"\nMIME-Version: 1.0\n\n\
         --//\nContent-Type: text/x-shellscript\n\n#!/bin/bash\nsystemctl start kubeboot-bootstrap\n\
         --//\nContent-Type: application/kubeboot+toml\n\n[node]\nrole = \"{role}\"\n--//--\n"
    )
    .into_bytes()
}

impl SimCluster {
    /// Starts AWS, the API server and `control_planes + workers` node doubles.
    pub async fn start(control_planes: usize, workers: usize) -> SimCluster {
        let name = format!("sim-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let table = format!("kubeboot-{name}");
        SimCluster::start_named(control_planes, workers, &name, &table).await
    }

    /// [`SimCluster::start`] with the cluster and table names given (as
    /// infra/'s templates name them, for a node reading its launch
    /// template's user-data).
    pub async fn start_named(
        control_planes: usize,
        workers: usize,
        name: &str,
        table: &str,
    ) -> SimCluster {
        let (name, table) = (name.to_string(), table.to_string());
        let work = tempfile::Builder::new()
            .prefix("kbtest-sim-")
            .tempdir()
            .expect("sim work dir");
        let moto = Moto::start().await;
        let kubeapi = KubeApi::start().await;
        kubeboot::table::create(&moto.dynamodb().await, &table)
            .await
            .expect("create table");
        // The backup bucket (named as the table: unique per test), versioned as infra/'s is.
        let s3 = moto.s3().await;
        s3.create_bucket()
            .bucket(&table)
            .send()
            .await
            .expect("create the backup bucket");
        s3.put_bucket_versioning()
            .bucket(&table)
            .versioning_configuration(
                aws_sdk_s3::types::VersioningConfiguration::builder()
                    .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .expect("version the backup bucket");
        let kubeadm_log = work.path().join("kubeadm.log");
        let mut sim = SimCluster {
            name,
            table,
            moto,
            kubeapi,
            nodes: Vec::new(),
            kubeadm_log,
            standin: StandinProcesses::new(),
            work,
            outputs: Default::default(),
        };
        for index in 0..control_planes + workers {
            sim.add_node(if index < control_planes {
                "control-plane"
            } else {
                "worker"
            })
            .await;
        }
        sim
    }

    /// A new instance (the ASG launched a replacement): moto knows it, it
    /// has its own loopback address, IMDS double, directory and config.
    /// Returns its index.
    pub async fn add_node(&mut self, role: &'static str) -> usize {
        // Every node is an instance moto knows, so EC2 answers about it as
        // it would about a real node (the reconciler asks).
        let ec2 = aws_sdk_ec2::Client::new(&self.moto.sdk_config().await);
        let launched = ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .expect("moto launches the instance");
        let instance_id = launched
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .expect("an instance id")
            .to_string();
        let index = self.nodes.len();
        let identity = ImdsIdentity {
            instance_id,
            private_ip: fresh_loopback_ip(),
            ..ImdsIdentity::default()
        };
        let imds = Imds::start_with(identity).await;
        imds.set_user_data(Some(user_data(role)));
        let dir = self.work.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let config = dir.join("kubeboot.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nname = \"{name}\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"{api}\"\n\n\
                 [aws]\ntable = \"{table}\"\nmax_attempts = 5\ninitial_backoff = \"50ms\"\n\
                 backup_bucket = \"{table}\"\ns3_force_path_style = true\n\n\
                 [aws.endpoints]\ndynamodb = \"{moto}\"\nssm = \"{moto}\"\nsecretsmanager = \"{moto}\"\n\
                 ec2 = \"{moto}\"\nsqs = \"{moto}\"\nautoscaling = \"{moto}\"\ns3 = \"{moto}\"\nsts = \"{moto}\"\n\n\
                 [imds]\nendpoint = \"{imds}\"\ndeadline = \"20s\"\n\n\
                 [etcd]\npromote_timeout = \"2m\"\n\n\
                 [lock]\nlease = \"6s\"\nmargin = \"2s\"\nacquire_timeout = \"5m\"\n\n\
                 [timeouts]\nkubeadm_init = \"2m\"\nkubeadm_join = \"3m\"\nkubeadm_reset = \"1m\"\n\n\
                 [backup]\nenabled = false\n\n[metrics]\nsink = \"file\"\nfile = \"{d}/metrics.emf\"\n\n\
                 [paths]\nkubernetes_dir = \"{d}/etc/kubernetes\"\nstate_dir = \"{d}/var/lib/kubeboot\"\n\
                 run_dir = \"{d}/run/kubeboot\"\netcd_data_dir = \"{d}/var/lib/etcd\"\n\n\
                 [binaries]\nkubeadm = \"{kubeadm}\"\n\n\
                 [addons]\ndirectory = \"{addons}\"\n",
                name = self.name,
                table = self.table,
                api = self.kubeapi.endpoint(),
                moto = self.moto.endpoint(),
                imds = imds.endpoint(),
                d = dir.display(),
                kubeadm = standin::kubeadm_bin().display(),
                addons = crate::workspace::workspace_root().join("addons").display(),
            ),
        )
        .expect("node config");
        self.nodes.push(SimNode {
            index,
            role,
            imds,
            dir,
            config,
        });
        index
    }

    /// `kubeboot bootstrap` for one node, as systemd would start it.
    pub fn bootstrap_command(&self, node: &SimNode) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(kubeboot_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env(standin::LOG_ENV, &self.kubeadm_log)
            .envs(self.standin.envs())
            .args(["bootstrap", "--log-format", "json", "--config"])
            .arg(&node.config)
            .kill_on_drop(true);
        cmd
    }

    /// `kubeboot <args>` on one node, as an operator would run it there.
    pub fn command(&self, node: &SimNode, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(kubeboot_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .args(args)
            .args(["--log-format", "json", "--config"])
            .arg(&node.config)
            .kill_on_drop(true);
        cmd
    }

    /// `kubeboot <args>` on one node for a command that runs kubeadm
    /// (`restore`): with the stand-in's log and process bookkeeping, as
    /// [`SimCluster::bootstrap_command`] has.
    pub fn kubeadm_command(&self, node: &SimNode, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.command(node, args);
        cmd.env(standin::LOG_ENV, &self.kubeadm_log)
            .envs(self.standin.envs());
        cmd
    }

    /// The backup bucket (aws.backup_bucket of every node).
    pub fn bucket(&self) -> &str {
        &self.table
    }

    /// `kubeboot daemon` for one node, as systemd would start it, with a
    /// one-second period so tests see turns quickly.
    pub fn daemon_command(&self, node: &SimNode) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(kubeboot_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env(standin::LOG_ENV, &self.kubeadm_log)
            .envs(self.standin.envs())
            .env("KUBEBOOT_DAEMON_PERIOD", "1s")
            .env("KUBEBOOT_DAEMON_JITTER", "0s")
            .args(["daemon", "--log-format", "json", "--config"])
            .arg(&node.config)
            .kill_on_drop(true);
        cmd
    }

    /// Boots the given nodes at the same moment and waits for all of them.
    pub async fn bootstrap(&self, indices: &[usize]) -> Vec<NodeRun> {
        let runs = indices.iter().map(|&i| {
            let mut cmd = self.bootstrap_command(&self.nodes[i]);
            async move {
                let started = Instant::now();
                let out = cmd.output().await.expect("kubeboot runs");
                NodeRun {
                    index: i,
                    code: out.status.code(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    elapsed: started.elapsed(),
                }
            }
        });
        let mut handles = Vec::new();
        for run in runs {
            handles.push(tokio::spawn(run));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("bootstrap task"));
        }
        for run in &out {
            self.record_output(&run.stdout);
            self.record_output(&run.stderr);
        }
        out
    }

    /// Keeps an agent's output for the secret scan when the cluster drops
    /// (daemon tests pass their daemons' stderr here).
    pub fn record_output(&self, text: &str) {
        if let Ok(mut outputs) = self.outputs.lock() {
            outputs.push(text.to_string());
        }
    }

    /// Every EMF document every node wrote, each checked against the
    /// specification (a broken line fails the caller).
    pub fn metrics_documents(&self) -> Vec<serde_json::Value> {
        self.nodes
            .iter()
            .flat_map(|n| crate::emf::validate_all(&n.metrics_text()))
            .collect()
    }

    /// Every secret value ever published for this cluster: each version of
    /// the token secret's token, the token's secret half, and each version
    /// of the certificate-key secret's key.
    pub async fn published_secrets(&self) -> Vec<String> {
        let client = aws_sdk_secretsmanager::Client::new(&self.moto.sdk_config().await);
        let mut secrets = Vec::new();
        for id in [
            format!("kubeboot/{}/join", self.name),
            format!("kubeboot/{}/certificate-key", self.name),
        ] {
            let Ok(versions) = client
                .list_secret_version_ids()
                .secret_id(&id)
                .include_deprecated(true)
                .send()
                .await
            else {
                continue;
            };
            for v in versions.versions() {
                let Some(version) = v.version_id() else {
                    continue;
                };
                let Ok(value) = client
                    .get_secret_value()
                    .secret_id(&id)
                    .version_id(version)
                    .send()
                    .await
                else {
                    continue;
                };
                let body: serde_json::Value =
                    serde_json::from_str(value.secret_string().unwrap_or("{}")).unwrap_or_default();
                if let Some(token) = body["token"].as_str() {
                    secrets.push(token.to_string());
                    if let Some((_, half)) = token.split_once('.') {
                        secrets.push(half.to_string());
                    }
                }
                if let Some(key) = body["certificate_key"].as_str() {
                    secrets.push(key.to_string());
                }
            }
        }
        secrets
    }

    /// I6 across every e2e test: no secret this cluster ever published
    /// appears in any output the harness saw or any metrics document.
    fn scan_for_secrets(&self) -> Result<(), String> {
        let secrets = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(self.published_secrets()))
                    .unwrap_or_default()
            })
            .join()
            .unwrap_or_default()
        });
        let mut texts: Vec<(String, String)> = self
            .outputs
            .lock()
            .map(|o| {
                o.iter()
                    .map(|t| ("agent output".to_string(), t.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for n in &self.nodes {
            texts.push((format!("node {} metrics", n.index), n.metrics_text()));
        }
        for secret in secrets.iter().filter(|s| s.len() >= 16) {
            for (what, text) in &texts {
                if text.contains(secret.as_str()) {
                    return Err(format!("a published join secret appears in {what}"));
                }
            }
        }
        Ok(())
    }

    /// Every stand-in invocation so far, one line each (`<ms> <pid> <argv> exit=<code>`).
    pub fn kubeadm_invocations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.kubeadm_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The kubeadm runs whose command (the words before the first flag) is
    /// exactly `command` — `join` is the whole join, not its phases — for
    /// `node` only when given (its config or cert dir is under its directory).
    pub fn kubeadm_runs(&self, command: &str, node: Option<usize>) -> Vec<standin::Invocation> {
        let dir = node.map(|i| format!("{}/", self.nodes[i].dir.display()));
        standin::invocations(&self.kubeadm_log)
            .into_iter()
            .filter(|inv| inv.command() == command)
            .filter(|inv| {
                dir.as_ref()
                    .is_none_or(|d| inv.args.iter().any(|a| a.starts_with(d.as_str())))
            })
            .collect()
    }

    /// The registry as the agent sees it.
    pub async fn registry(&self) -> Registry<DynamoRegistryStore> {
        let client = self.moto.dynamodb().await;
        Registry::new(Arc::new(DynamoRegistryStore::new(
            client,
            &self.table,
            &self.name,
        )))
    }

    /// The join material store, named as the agent's config derives it.
    pub async fn join_store(&self) -> JoinStore {
        let sdk = self.moto.sdk_config().await;
        JoinStore::new(
            aws_sdk_secretsmanager::Client::new(&sdk),
            aws_sdk_ssm::Client::new(&sdk),
            format!("kubeboot/{}/join", self.name),
            format!("kubeboot/{}/certificate-key", self.name),
            format!("/kubeboot/{}", self.name),
        )
    }

    /// A locker on the cluster's table as `owner`, with the sim's lease.
    pub async fn locker(&self, owner: &str) -> Locker<DynamoLockStore> {
        let store = DynamoLockStore::new(self.moto.dynamodb().await, &self.table, &self.name);
        Locker::new(
            Arc::new(store),
            Owner::new(owner),
            Settings {
                lease: Duration::from_secs(6),
                margin: Duration::from_secs(2),
                acquire_timeout: Duration::from_secs(60),
                wall_clock: Arc::new(SystemTime::now),
            },
        )
    }

    /// Takes the `leader` lock as `owner` would (what the daemon that
    /// refreshes join material holds).
    pub async fn leader_lock(&self, owner: &str) -> Guard {
        self.locker(owner)
            .await
            .acquire(Purpose::Leader)
            .await
            .expect("leader lock")
    }

    /// Publishes the cluster's current join material again as already
    /// expired (token and uploaded certificates), as the leader `owner`, so
    /// the next leader turn refreshes it; returns the version published.
    pub async fn expire_join_material(&self, owner: &str) -> String {
        let registry = self.registry().await;
        let (_, material) = self.current_join_material().await;
        let store = self.join_store().await;
        let past = SystemTime::now() - Duration::from_secs(60);
        let guard = self.leader_lock(owner).await;
        let expired = store
            .publish(
                &registry,
                &guard,
                &kubeboot::join_material::JoinMaterial {
                    token_expires_at: past,
                    certs_expire_at: Some(past),
                    ..material
                },
                SystemTime::now(),
            )
            .await
            .expect("publish expired material");
        guard.release().await.expect("release");
        expired.secret_version
    }

    /// How the harness reaches the cluster's etcd: https, as every control
    /// plane does, with a copy of a control plane's etcd client identity
    /// (taken once, so it outlives that node's reset or death).
    pub fn etcd_settings(&self) -> kubeboot::etcd::Settings {
        const FILES: [&str; 3] = [
            "etcd/ca.crt",
            "apiserver-etcd-client.crt",
            "apiserver-etcd-client.key",
        ];
        let dir = self.work.path().join("harness-pki");
        if !dir.join(FILES[2]).exists() {
            let source = self
                .nodes
                .iter()
                .filter(|n| n.role == "control-plane")
                .map(|n| n.dir.join("etc/kubernetes/pki"))
                .find(|pki| FILES.iter().all(|f| pki.join(f).exists()))
                .expect("no control plane has etcd client credentials yet");
            for f in FILES {
                let to = dir.join(f);
                std::fs::create_dir_all(to.parent().expect("parent")).expect("harness pki dir");
                std::fs::copy(source.join(f), &to).expect("copy etcd client credentials");
            }
        }
        kubeboot::etcd::Settings {
            scheme: kubeboot::config::model::EtcdScheme::Https,
            client_port: 2379,
            peer_port: 2380,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            pki_dir: dir,
        }
    }

    /// A raw etcd client through node `via`'s client URL (https, the
    /// harness's copy of a control plane's etcd client identity).
    pub async fn etcd_client(&self, via: usize) -> etcd_client::Client {
        let settings = self.etcd_settings();
        crate::etcd::connect_tls(
            &[settings.client_url(&self.nodes[via].ip())],
            &settings.pki_dir,
        )
        .await
        .expect("etcd client")
    }

    /// Writes `n` keys `<prefix>key-00000`... of about `size` bytes each
    /// through node `via`'s member, up to a hundred and 512 KiB to a
    /// transaction (etcd's defaults refuse more than 128 operations or
    /// 1.5 MiB in one request).
    pub async fn put_keys(&self, via: usize, prefix: &str, n: usize, size: usize) {
        let mut client = self.etcd_client(via).await;
        let keys: Vec<usize> = (0..n).collect();
        for batch in keys.chunks((512 * 1024 / size.max(1)).clamp(1, 100)) {
            let puts: Vec<etcd_client::TxnOp> = batch
                .iter()
                .map(|i| {
                    etcd_client::TxnOp::put(
                        format!("{prefix}key-{i:05}"),
                        format!("value-{i}-{}", "x".repeat(size)),
                        None,
                    )
                })
                .collect();
            client
                .txn(etcd_client::Txn::new().and_then(puts))
                .await
                .expect("put");
        }
    }

    /// Every key under `prefix` with its value, through node `via`'s member.
    pub async fn keys(&self, via: usize, prefix: &str) -> Vec<(String, String)> {
        let mut client = self.etcd_client(via).await;
        let got = client
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get");
        got.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }

    /// What a control-plane join that died right after `member add` leaves:
    /// a learner that never starts. Returns its member id.
    pub async fn add_orphan_learner(&self, via: usize) -> u64 {
        self.etcd_client(via)
            .await
            .member_add(
                ["https://127.9.9.9:2380"],
                Some(etcd_client::MemberAddOptions::new().with_is_learner()),
            )
            .await
            .expect("add a learner that never starts")
            .member()
            .expect("member")
            .id()
    }

    /// etcd's member list, asked through the given nodes' client URLs.
    pub async fn etcd_members(&self, through: &[usize]) -> Vec<kubeboot::etcd::Member> {
        let settings = self.etcd_settings();
        let endpoints: Vec<String> = through
            .iter()
            .map(|&i| settings.client_url(&self.nodes[i].ip()))
            .collect();
        let etcd = kubeboot::etcd::Etcd::connect(&endpoints, &settings)
            .await
            .expect("connect to etcd");
        etcd.members().await.expect("member list")
    }

    /// etcd's members (asked through `live`) are the member records: the
    /// same ids, every member started and voting. Returns the members.
    pub async fn assert_members_are_the_records(
        &self,
        live: &[usize],
        what: &str,
    ) -> Vec<kubeboot::etcd::Member> {
        let members = self.etcd_members(live).await;
        let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        let mut recorded: Vec<u64> = self
            .registry()
            .await
            .members()
            .await
            .expect("records")
            .iter()
            .map(|r| r.member_id)
            .collect();
        ids.sort_unstable();
        recorded.sort_unstable();
        assert_eq!(ids, recorded, "{what}: members == records");
        assert!(
            members.iter().all(|m| m.is_started() && !m.is_learner),
            "{what}: {members:?}"
        );
        members
    }

    /// Whether the API double holds `node`'s Node object.
    pub fn has_node_object(&self, node: &SimNode) -> bool {
        self.kubeapi
            .object(&format!(
                "/api/v1/nodes/{}",
                node.imds.identity().local_hostname()
            ))
            .is_some()
    }

    /// The published join pointer.
    pub async fn join_pointer(&self) -> JoinPointer {
        self.registry()
            .await
            .join_pointer()
            .await
            .expect("pointer")
            .expect("published")
    }

    /// The published join pointer and the material it names.
    pub async fn current_join_material(&self) -> (JoinPointer, JoinMaterial) {
        let pointer = self.join_pointer().await;
        let material = self.join_store().await.read(&pointer).await.expect("read");
        (pointer, material)
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Err(leak) = self.scan_for_secrets() {
            panic!("I6 violated: {leak}");
        }
        // Every EMF line of every e2e run is checked, not only where a test asks.
        for n in &self.nodes {
            for (i, line) in n.metrics_text().lines().enumerate() {
                if let Err(e) = crate::emf::validate(line) {
                    panic!(
                        "node {} metrics line {}: invalid EMF: {e}\n{line}",
                        n.index,
                        i + 1
                    );
                }
            }
        }
    }
}
