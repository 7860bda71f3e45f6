//! Real multi-member etcd clusters on loopback.
//!
//! The agent's hardest logic is membership surgery (join as learner, promote,
//! evict dead members), and etcd's own rules — strict reconfiguration checks,
//! one learner at a time, unstarted members without names — are exactly what
//! a fake would get wrong. So tests drive real `etcd` 3.4 processes, one per
//! fresh 127.x.y.z address with the standard ports, like separate nodes.
//!
//! These clusters serve plain http: the tests that use them are about the
//! agent's membership, health and failover logic, not transport. Everything
//! that goes through kubeadm (the simulated cluster, the e2e suite, the
//! demo) runs etcd over https with kubeadm's PKI and client-certificate
//! auth, as a real node does; [`connect_tls`] reaches those.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, MemberAddOptions};
use tempfile::TempDir;

use crate::net::{fresh_loopback_ip, ETCD_CLIENT_PORT, ETCD_PEER_PORT};
use crate::process::{terminate_all, ChildGuard, DEFAULT_GRACE};

/// Overall time a cluster (or a started member) gets to become healthy.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long membership changes are retried while etcd refuses them as
/// transient: a fresh cluster answers "unhealthy cluster" for ~5 s after
/// start (its strict reconfig check wants peers connected for 5 s).
pub const RECONFIG_RETRY: Duration = Duration::from_secs(15);

/// SIGTERM grace when a whole cluster is torn down. Short because the data
/// is discarded anyway, and because members stopping together stall: the
/// leader keeps trying to hand leadership to dying peers (~7 s observed).
pub const CLUSTER_STOP_GRACE: Duration = Duration::from_millis(500);

/// How long a promotion is retried while the learner catches up.
pub const PROMOTE_RETRY: Duration = Duration::from_secs(20);

/// Lines of member log quoted in harness panics.
const TAIL_LINES: usize = 40;

/// Snapshot of one member as the harness created it, for tests that need to
/// point the agent (or a kubeadm stand-in) at a specific node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    /// Harness index, stable for the life of the cluster (also after removal).
    pub index: usize,
    /// etcd `--name`, `m<index>`.
    pub name: String,
    /// etcd member id (0 until known).
    pub id: u64,
    /// The member's own loopback address ("node IP").
    pub ip: Ipv4Addr,
    /// `http://<ip>:2379`.
    pub client_url: String,
    /// `http://<ip>:2380`.
    pub peer_url: String,
    /// `--data-dir`, kept across stop/start so restarts rejoin.
    pub data_dir: PathBuf,
    /// File receiving the member's stdout and stderr.
    pub log_path: PathBuf,
    /// Process id while the harness has it running.
    pub pid: Option<u32>,
    /// Added as a learner and not yet promoted through
    /// [`EtcdCluster::promote_member`]. Learners refuse most RPCs
    /// ("rpc not supported for learner"), so harness clients avoid them.
    pub learner: bool,
    /// Whether the harness removed it from the cluster.
    pub removed: bool,
}

#[derive(Debug)]
struct Slot {
    member: EtcdMember,
    /// `--initial-cluster` for this member's first start.
    initial_cluster: String,
    /// `new` for founding members, `existing` for added ones.
    initial_state: &'static str,
    process: Option<ChildGuard>,
}

/// A running etcd cluster owned by one test; dropping it stops every member
/// (SIGTERM, [`CLUSTER_STOP_GRACE`], then SIGKILL) and deletes all data dirs.
#[derive(Debug)]
pub struct EtcdCluster {
    token: String,
    bin: PathBuf,
    slots: Vec<Slot>,
    /// Declared last so it is removed after the processes are gone.
    root: TempDir,
}

impl EtcdCluster {
    /// Starts `n` founding members (`--initial-cluster-state new`) and waits
    /// until every one of them serves linearizable reads.
    ///
    /// Panics with the members' log tails if that takes over [`READY_TIMEOUT`].
    pub async fn start(n: usize) -> Self {
        assert!(n > 0, "an etcd cluster needs at least one member");
        let root = tempfile::Builder::new()
            .prefix("kbtest-etcd-")
            .tempdir()
            .expect("create temp dir for etcd cluster");
        let mut cluster = Self {
            token: format!("kbtest-{}", uuid::Uuid::new_v4().simple()),
            bin: etcd_bin(),
            slots: Vec::new(),
            root,
        };
        for _ in 0..n {
            cluster.new_slot();
        }
        let initial_cluster = cluster
            .slots
            .iter()
            .map(|s| format!("{}={}", s.member.name, s.member.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..n {
            cluster.slots[i].initial_cluster = initial_cluster.clone();
            cluster.slots[i].initial_state = "new";
            cluster.spawn_member(i);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 0..n {
            cluster.wait_member_ready(i, deadline).await;
        }
        // Learn the member ids so remove_member can address them.
        let list = cluster
            .client()
            .await
            .member_list()
            .await
            .unwrap_or_else(|e| cluster.fail(&format!("member_list after start: {e}")));
        for m in list.members() {
            if let Some(slot) = cluster.slots.iter_mut().find(|s| s.member.name == m.name()) {
                slot.member.id = m.id();
            }
        }
        cluster
    }

    /// Client URLs of the members the harness currently has running.
    pub fn endpoints(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.process.is_some())
            .map(|s| s.member.client_url.clone())
            .collect()
    }

    /// Client URLs of running members other than learners, i.e. those that
    /// serve the full API.
    pub fn voter_endpoints(&self) -> Vec<String> {
        self.voter_endpoints_except(None)
    }

    fn voter_endpoints_except(&self, except: Option<usize>) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.process.is_some() && !s.member.learner)
            .filter(|s| Some(s.member.index) != except)
            .map(|s| s.member.client_url.clone())
            .collect()
    }

    /// A client balanced over all running non-learner members (a learner in
    /// the pool would fail member_list, puts, linearizable reads).
    pub async fn client(&self) -> Client {
        let endpoints = self.voter_endpoints();
        assert!(
            !endpoints.is_empty(),
            "no running voting etcd member to connect to"
        );
        connect(&endpoints)
            .await
            .unwrap_or_else(|e| self.fail(&format!("connect to {endpoints:?}: {e}")))
    }

    /// A client talking to member `i` only, to observe one node's view.
    pub async fn client_for(&self, i: usize) -> Client {
        let url = self.member(i).client_url;
        connect(std::slice::from_ref(&url))
            .await
            .unwrap_or_else(|e| self.fail(&format!("connect to {url}: {e}")))
    }

    /// Snapshot of member `i` (panics on a bad index).
    pub fn member(&self, i: usize) -> EtcdMember {
        let slot = self.slot(i);
        let mut m = slot.member.clone();
        m.pid = slot.process.as_ref().map(ChildGuard::pid);
        m
    }

    /// Number of members the harness ever created (indices `0..len()`).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cluster has no members (never true after [`Self::start`]).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Pids of the members the harness has running, for "nothing survives"
    /// assertions.
    pub fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|s| s.process.as_ref().map(ChildGuard::pid))
            .collect()
    }

    /// The unique `--initial-cluster-token` of this cluster.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Adds a member the way `kubeadm join` does — `member_add` first, then
    /// start the process with `--initial-cluster-state existing` — and waits
    /// until it serves. Returns its index.
    ///
    /// etcd 3.4 allows only one learner at a time, and rejects voter adds
    /// that would risk quorum; such errors panic.
    pub async fn add_member(&mut self, learner: bool) -> usize {
        let i = self.add_unstarted_member(learner).await;
        self.start_member(i).await;
        i
    }

    /// `member_add` only, never started: leaves the nameless, URL-less
    /// "orphan" member a crashed join leaves behind. Returns its index.
    pub async fn add_unstarted_member(&mut self, learner: bool) -> usize {
        let i = self.new_slot();
        let peer_url = self.slots[i].member.peer_url.clone();
        let mut client = self.client().await;
        let deadline = Instant::now() + RECONFIG_RETRY;
        let resp = loop {
            let opts = learner.then(|| MemberAddOptions::new().with_is_learner());
            match client.member_add([peer_url.as_str()], opts).await {
                Ok(resp) => break resp,
                Err(e) if is_transient_reconfig_error(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => self.fail(&format!("member_add {peer_url} (learner={learner}): {e}")),
            }
        };
        let id = resp
            .member()
            .map(|m| m.id())
            .unwrap_or_else(|| self.fail("member_add response without member"));
        // Same string `etcdctl member add` prints for the new member.
        let name = self.slots[i].member.name.clone();
        let initial_cluster = resp
            .member_list()
            .iter()
            .flat_map(|m| {
                let n = if m.id() == id {
                    name.clone()
                } else {
                    m.name().to_string()
                };
                m.peer_urls()
                    .iter()
                    .map(move |u| format!("{n}={u}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join(",");
        let slot = &mut self.slots[i];
        slot.member.id = id;
        slot.member.learner = learner;
        slot.initial_cluster = initial_cluster;
        slot.initial_state = "existing";
        i
    }

    /// Promotes learner `i` to voter, retrying while etcd refuses because
    /// the learner has not caught up with the leader yet (up to
    /// [`PROMOTE_RETRY`]).
    pub async fn promote_member(&mut self, i: usize) {
        let id = self.slot(i).member.id;
        let mut client = self.client().await;
        let deadline = Instant::now() + PROMOTE_RETRY;
        loop {
            match client.member_promote(id).await {
                Ok(_) => break,
                Err(e)
                    if (e.to_string().contains("in sync with leader")
                        || is_transient_reconfig_error(&e))
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => self.fail(&format!("member_promote {id:x} (m{i}): {e}")),
            }
        }
        self.slots[i].member.learner = false;
    }

    /// Starts member `i` (first start of an added member, or a restart of a
    /// stopped one with its existing data dir) and waits until it serves.
    pub async fn start_member(&mut self, i: usize) {
        self.spawn_member(i);
        self.wait_member_ready(i, Instant::now() + READY_TIMEOUT)
            .await;
    }

    /// Starts member `i` without waiting for it to serve, for scenarios
    /// where it cannot (e.g. restarting into a cluster that lost quorum).
    pub fn spawn_member(&mut self, i: usize) {
        let bin = self.bin.clone();
        let token = self.token.clone();
        let slot = &mut self.slots[i];
        assert!(slot.process.is_none(), "etcd member {i} is already running");
        assert!(!slot.member.removed, "etcd member {i} was removed");
        let m = &slot.member;
        let mut cmd = Command::new(&bin);
        // A stray ETCD_* variable in the environment would override flags.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&m.client_url)
            .arg("--advertise-client-urls")
            .arg(&m.client_url)
            .arg("--listen-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-cluster")
            .arg(&slot.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&token)
            .arg("--initial-cluster-state")
            .arg(slot.initial_state)
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        let guard =
            ChildGuard::spawn(format!("etcd {}", m.name), cmd, &m.log_path).unwrap_or_else(|e| {
                panic!("cannot spawn {}: {e} (set KBTEST_ETCD_BIN?)", bin.display())
            });
        slot.process = Some(guard);
    }

    /// Stops member `i`: SIGTERM, a short grace, then SIGKILL (a graceful
    /// node shutdown). Its data dir is kept for [`Self::start_member`].
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut p) = self.slots[i].process.take() {
            p.terminate(DEFAULT_GRACE);
        }
    }

    /// SIGKILLs member `i` (the node vanished). Data dir is kept.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.slots[i].process.take() {
            p.kill();
        }
    }

    /// Removes member `i` from the membership (retrying etcd's transient
    /// refusals) through the other members, then stops its process.
    pub async fn remove_member(&mut self, i: usize) {
        let id = self.slot(i).member.id;
        let others = self.voter_endpoints_except(Some(i));
        let endpoints = if others.is_empty() {
            self.voter_endpoints()
        } else {
            others
        };
        let mut client = connect(&endpoints)
            .await
            .unwrap_or_else(|e| self.fail(&format!("connect to {endpoints:?}: {e}")));
        let deadline = Instant::now() + RECONFIG_RETRY;
        loop {
            match client.member_remove(id).await {
                Ok(_) => break,
                Err(e) if is_transient_reconfig_error(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => self.fail(&format!("member_remove {id:x} (m{i}): {e}")),
            }
        }
        self.stop_member(i);
        self.slots[i].member.removed = true;
    }

    /// Root temp dir holding every member's `m<i>/` directory.
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// Log tails of every member, for assertion messages.
    pub fn log_tails(&self, n: usize) -> String {
        self.slots
            .iter()
            .map(|s| {
                format!(
                    "----- {} ({}) log tail -----\n{}",
                    s.member.name,
                    s.member.ip,
                    crate::process::log_tail(&s.member.log_path, n)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn slot(&self, i: usize) -> &Slot {
        self.slots
            .get(i)
            .unwrap_or_else(|| panic!("no etcd member {i} (cluster has {})", self.slots.len()))
    }

    /// Allocates index, name, address and directories for a new member.
    fn new_slot(&mut self) -> usize {
        let index = self.slots.len();
        let ip = loop {
            let ip = fresh_loopback_ip();
            if self.slots.iter().all(|s| s.member.ip != ip) {
                break ip;
            }
        };
        let name = format!("m{index}");
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(&dir).expect("create etcd member dir");
        self.slots.push(Slot {
            member: EtcdMember {
                index,
                name,
                id: 0,
                ip,
                client_url: format!("http://{ip}:{ETCD_CLIENT_PORT}"),
                peer_url: format!("http://{ip}:{ETCD_PEER_PORT}"),
                data_dir: dir.join("data"),
                log_path: dir.join("etcd.log"),
                pid: None,
                learner: false,
                removed: false,
            },
            initial_cluster: String::new(),
            initial_state: "existing",
            process: None,
        });
        index
    }

    /// Waits until member `i` answers `status` with a known leader and, unless
    /// it is a learner (which refuses linearizable reads), a linearizable get.
    async fn wait_member_ready(&mut self, i: usize, deadline: Instant) {
        let url = self.slots[i].member.client_url.clone();
        loop {
            let running = self.slots[i]
                .process
                .as_mut()
                .is_some_and(ChildGuard::is_running);
            if !running {
                self.fail(&format!("etcd m{i} exited before becoming ready"));
            }
            let Err(last_err) = probe(&url).await else {
                return;
            };
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "etcd m{i} ({url}) not ready within {READY_TIMEOUT:?}: {last_err}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Panics with `msg` and every member's log tail.
    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.log_tails(TAIL_LINES))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        terminate_all(
            self.slots.iter_mut().filter_map(|s| s.process.as_mut()),
            CLUSTER_STOP_GRACE,
        );
    }
}

/// etcd binary: `KBTEST_ETCD_BIN` or `etcd` from `PATH`.
fn etcd_bin() -> PathBuf {
    std::env::var_os("KBTEST_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// Connects with short timeouts so a dead member fails fast instead of
/// hanging a test.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    Client::connect(endpoints, Some(opts)).await
}

/// A client over https as kubeadm's control planes reach etcd: the etcd CA
/// and the `apiserver-etcd-client` identity from a node's `pki/`.
pub async fn connect_tls(
    endpoints: &[String],
    pki_dir: &std::path::Path,
) -> Result<Client, String> {
    let files = crate::pki::etcd_client_files(pki_dir)?;
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(files.ca))
                .identity(etcd_client::Identity::from_pem(files.cert, files.key)),
        );
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| e.to_string())
}

/// One readiness probe of a single member.
async fn probe(url: &str) -> Result<(), String> {
    let mut c = connect(&[url.to_string()])
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let status = c.status().await.map_err(|e| format!("status: {e}"))?;
    if status.leader() == 0 {
        return Err("no leader yet".into());
    }
    if !status.is_learner() {
        c.get("kbtest-health", None)
            .await
            .map_err(|e| format!("linearizable get: {e}"))?;
    }
    Ok(())
}

/// etcd refusals that clear by themselves shortly: the strict reconfig
/// check right after start, or while a member is (re)connecting.
pub fn is_transient_reconfig_error(e: &etcd_client::Error) -> bool {
    let msg = e.to_string();
    msg.contains("unhealthy cluster")
        || msg.contains("not enough started members")
        || msg.contains("leader changed")
        || msg.contains("no leader")
}
