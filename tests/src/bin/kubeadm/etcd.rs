//! etcd processes: the static Pods' stand-ins, their watchdog, and the
//! client the stand-in reaches etcd with.

use crate::helpers::{wait_timeout, INIT_SYSTEM_ENV};
use crate::DEFAULT_CERT_DIR;
use crate::ETCD_URL_ANNOTATION;
use etcd_client::Client;
use etcd_client::ConnectOptions;
use kubeboot_tests::pki;
use kubeboot_tests::process::pid_alive;
use kubeboot_tests::standin;
use kubeboot_tests::standin::record_pid;
use kubeboot_tests::standin::stop_groups;
use serde_json::json;
use serde_json::Value;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

pub(crate) fn etcd_bin() -> PathBuf {
    std::env::var_os("KBTEST_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// One local etcd member as the static Pod manifest describes it.
#[derive(Debug, Clone)]
pub(crate) struct LocalEtcd {
    pub(crate) name: String,
    pub(crate) data_dir: PathBuf,
    /// Client URL advertised (and put on the mirror Pod).
    pub(crate) client_url: String,
    /// Peer URL advertised.
    pub(crate) peer_url: String,
    /// Full etcd argv after the program name.
    pub(crate) args: Vec<String>,
}

impl LocalEtcd {
    /// Reads the stand-in's `manifests/etcd.yaml` (a JSON Pod).
    pub(crate) fn from_manifest(path: &Path) -> Option<Self> {
        let pod: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        let command: Vec<String> = pod["spec"]["containers"][0]["command"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let flag = |name: &str| {
            command
                .iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
        };
        Some(LocalEtcd {
            name: flag("name")?,
            data_dir: PathBuf::from(flag("data-dir")?),
            client_url: flag("advertise-client-urls")?,
            peer_url: flag("initial-advertise-peer-urls")?,
            args: command[1..].to_vec(),
        })
    }

    pub(crate) fn manifest(&self) -> Value {
        let mut command = vec!["etcd".to_string()];
        command.extend(self.args.iter().cloned());
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "etcd",
                "namespace": "kube-system",
                "labels": {"component": "etcd", "tier": "control-plane"},
                "annotations": {ETCD_URL_ANNOTATION: self.client_url},
            },
            "spec": {
                "hostNetwork": true,
                "priorityClassName": "system-node-critical",
                "containers": [{
                    "name": "etcd",
                    "image": "registry.k8s.io/etcd:3.5.15-0",
                    "command": command,
                    "volumeMounts": [{"name": "etcd-data", "mountPath": self.data_dir.display().to_string()}],
                }],
                "volumes": [{"name": "etcd-data", "hostPath": {"path": self.data_dir.display().to_string(), "type": "DirectoryOrCreate"}}],
            },
        })
    }
}

/// The argv of a member: kubeadm's flags, then the user's `extraArgs`.
pub(crate) fn etcd_args(
    name: &str,
    data_dir: &Path,
    urls: &EtcdUrls,
    initial_cluster: &str,
    state: &str,
    extra: &[(String, String)],
) -> Vec<String> {
    let mut flags: Vec<(String, String)> = vec![
        ("name".into(), name.into()),
        ("data-dir".into(), data_dir.display().to_string()),
        ("listen-client-urls".into(), urls.listen_client.join(",")),
        ("advertise-client-urls".into(), urls.client.clone()),
        ("listen-peer-urls".into(), urls.listen_peer.join(",")),
        ("initial-advertise-peer-urls".into(), urls.peer.clone()),
        ("initial-cluster".into(), initial_cluster.into()),
        ("initial-cluster-state".into(), state.into()),
        ("snapshot-count".into(), "10000".into()),
        ("logger".into(), "zap".into()),
        ("log-outputs".into(), "stderr".into()),
    ];
    for (k, v) in extra {
        if matches!(
            k.as_str(),
            "listen-client-urls"
                | "advertise-client-urls"
                | "listen-peer-urls"
                | "initial-advertise-peer-urls"
        ) {
            continue; // already folded into `urls`
        }
        match flags.iter_mut().find(|(n, _)| n == k) {
            Some(f) => f.1 = v.clone(),
            None => flags.push((k.clone(), v.clone())),
        }
    }
    flags
        .into_iter()
        .map(|(k, v)| format!("--{k}={v}"))
        .collect()
}

#[derive(Debug, Clone)]
pub(crate) struct EtcdUrls {
    pub(crate) client: String,
    pub(crate) peer: String,
    pub(crate) listen_client: Vec<String>,
    pub(crate) listen_peer: Vec<String>,
}

/// Parses `scheme://host:port` into its parts.
pub(crate) fn split_url(url: &str) -> Option<(&str, &str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
    Some((scheme, host, port.parse().ok()?))
}

/// Every node of a test shares the host's 127.0.0.1, so a loopback listen
/// URL (which the agent renders, as real nodes want) would collide between
/// "nodes"; each node's own 127.x.y.z address stands in for its loopback.
pub(crate) fn drop_shared_loopback(urls: &[String], advertise: &IpAddr) -> Vec<String> {
    urls.iter()
        .filter(|u| {
            let host = split_url(u).map(|(_, h, _)| h).unwrap_or("");
            host == advertise.to_string() || !(host == "127.0.0.1" || host == "localhost")
        })
        .cloned()
        .collect()
}

/// Starts etcd detached (own session, so it outlives this process like a
/// static Pod), records its pid for the test harness and the reset, and
/// starts the owner watchdog.
///
/// With `KUBEADM_STANDIN_INIT_SYSTEM=systemd` etcd runs in a transient
/// scope of its own (`systemd-run --scope`, which execs etcd in this same
/// child), as the container runtime runs a static Pod's containers: not in
/// the cgroup of whatever unit ran kubeadm, so stopping or restarting that
/// unit (whose KillMode kills what is left in its cgroup) leaves etcd up,
/// as on a node.
pub(crate) fn spawn_etcd(member: &LocalEtcd, state_dir: &Path) -> Result<Child, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("mkdir {}: {e}", state_dir.display()))?;
    std::fs::create_dir_all(&member.data_dir)
        .map_err(|e| format!("mkdir {}: {e}", member.data_dir.display()))?;
    let log_path = state_dir.join("etcd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let mut cmd = if std::env::var(INIT_SYSTEM_ENV).as_deref() == Ok("systemd") {
        let mut cmd = Command::new("systemd-run");
        cmd.args(["--scope", "--quiet", "--collect"])
            .arg(format!("--unit=kubepods-etcd-{}", std::process::id()))
            .arg("--description=etcd (the kubeadm stand-in's static Pod)")
            .arg("--")
            .arg(etcd_bin());
        cmd
    } else {
        Command::new(etcd_bin())
    };
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    cmd.args(&member.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", etcd_bin().display()))?;
    let pid = child.id();
    let pid_file = state_dir.join("etcd.pid");
    std::fs::write(&pid_file, format!("{pid}\n"))
        .map_err(|e| format!("write {}: {e}", pid_file.display()))?;
    record_pid(pid, &member.data_dir).map_err(|e| format!("record etcd pid {pid}: {e}"))?;
    start_watchdog(pid);
    Ok(child)
}

/// If the test declared an owner, a detached watchdog kills this etcd when
/// the owner dies without cleaning up (e.g. killed by a test timeout).
pub(crate) fn start_watchdog(etcd_pid: u32) {
    let Some(owner) = std::env::var(standin::OWNER_PID_ENV).ok() else {
        return;
    };
    let Ok(me) = std::env::current_exe() else {
        return;
    };
    let mut cmd = Command::new(me);
    cmd.arg("__kbtest-watchdog")
        .arg(owner)
        .arg(etcd_pid.to_string())
        .env_remove(standin::LOG_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let _ = cmd.spawn();
}

pub(crate) fn watchdog(args: &[String]) {
    let (Some(owner), Some(etcd)) = (
        args.first().and_then(|a| a.parse::<u32>().ok()),
        args.get(1).and_then(|a| a.parse::<u32>().ok()),
    ) else {
        return;
    };
    loop {
        if !pid_alive(etcd) {
            return;
        }
        if !pid_alive(owner) {
            stop_groups(&[etcd], Duration::from_millis(300));
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The node's `pki/` directory, where kubeadm's etcd client reads its
/// credentials (set once per run by the command that knows it).
pub(crate) static PKI_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub(crate) fn set_pki_dir(pki: &Path) {
    let _ = PKI_DIR.set(pki.to_path_buf());
}

/// An etcd client as kubeadm makes one (`etcdutil.NewFromCluster`): over
/// https with `etcd/ca.crt` and the `apiserver-etcd-client` identity from
/// this node's `pki/`, which must be there (a worker, or a control plane
/// that has not downloaded the certificates, cannot talk to etcd).
pub(crate) async fn etcd_client(urls: &[String]) -> Result<Client, String> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    if urls.iter().any(|u| u.starts_with("https://")) {
        let pki_dir = PKI_DIR
            .get()
            .cloned()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CERT_DIR));
        let files = pki::etcd_client_files(&pki_dir)?;
        opts = opts.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(files.ca))
                .identity(etcd_client::Identity::from_pem(files.cert, files.key)),
        );
    }
    Client::connect(urls, Some(opts))
        .await
        .map_err(|e| etcd_msg(&e))
}

/// The server's own words for a gRPC failure (`etcdserver: …`).
pub(crate) fn etcd_msg(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

/// Refusals etcd lifts by itself shortly (kubeadm retries etcd calls).
pub(crate) fn transient(msg: &str) -> bool {
    [
        "unhealthy cluster",
        "not enough started members",
        "leader changed",
        "no leader",
        "timed out",
        "deadline",
        "transport",
        "connection",
        "Unavailable",
        "unavailable",
    ]
    .iter()
    .any(|t| msg.contains(t))
}

/// Probes one member: a leader is known and, for voters, a linearizable
/// read succeeds.
pub(crate) async fn probe(url: &str, learner: bool) -> Result<(), String> {
    let mut c = etcd_client(&[url.to_string()]).await?;
    let status = c.status().await.map_err(|e| etcd_msg(&e))?;
    if status.leader() == 0 {
        return Err("no leader yet".into());
    }
    if !learner {
        c.get("kbtest-standin-health", None)
            .await
            .map_err(|e| etcd_msg(&e))?;
    }
    Ok(())
}

/// Waits until the local member serves, failing early if it exited.
pub(crate) async fn wait_member(
    child: &mut Child,
    url: &str,
    learner: bool,
    log: &Path,
) -> Result<(), String> {
    let timeout = wait_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the etcd static Pod exited ({status}); its last log lines:\n{}",
                kubeboot_tests::process::log_tail(log, 15)
            ));
        }
        let last = match probe(url, learner).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "etcd at {url} not healthy after {timeout:?} ({last}): timed out waiting for the condition"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
