//! `kubeboot restore`: what rebuilding a cluster from a snapshot needs
//! beyond an init (which [`crate::bootstrap::Bootstrap::restore`] runs).
//!
//! The snapshot is downloaded and checked first ([`prepare`]), so a damaged
//! or missing one changes nothing. Then, under the `init` lock, a new
//! cluster generation is started (marked with the snapshot it came from),
//! the node is reset, kubeadm's certificate authorities from the backup are
//! laid down, and etcd's own tool restores the data directory as a
//! one-member cluster of this node ([`lay_down`]); `kubeadm init` runs over
//! both (`--ignore-preflight-errors=DirAvailable-<data dir>`, the
//! documented way to init over restored etcd data). Other control planes
//! join the new generation as usual.

use crate::backup::{pki, Backups, Manifest};
use crate::config::Config;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long etcd's restore tool may take (it writes the database once).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How far `etcdutl --bump-revision` moves the revision: past any a watcher
/// of the old cluster can have seen (etcd's advice for Kubernetes, which
/// then also marks the old revisions compacted so watchers relist).
pub const BUMP_REVISION: u64 = 1_000_000_000;

/// How long a recorded member gets to answer before the restore goes on.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Restore failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the cluster still answers: etcd at {endpoint} {how}; restoring would replace a running cluster")]
    ClusterAnswers { endpoint: String, how: String },
    #[error("no etcd restore tool: {0}")]
    NoTool(String),
    #[error("{tool} failed (exit {code:?}): {tail}")]
    ToolFailed {
        tool: String,
        code: Option<i32>,
        tail: String,
    },
    #[error("{tool} did not finish within {}s; killed", TOOL_TIMEOUT.as_secs())]
    ToolTimedOut { tool: String },
    #[error("{}: {message}", path.display())]
    Local { path: PathBuf, message: String },
    #[error("restore runs on a control plane; this node is a worker")]
    NotControlPlane,
    #[error("a restore from {snapshot} started generation {generation} and did not finish; bootstrap will not initialize an empty cluster over it")]
    Unfinished { snapshot: String, generation: u64 },
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use crate::catalogue as c;
        match self {
            Error::ClusterAnswers { .. } => &c::RESTORE_CLUSTER_ANSWERS,
            Error::NoTool(_) | Error::ToolFailed { .. } | Error::ToolTimedOut { .. } => {
                &c::RESTORE_TOOL
            }
            Error::Local { .. } => &c::RESTORE_LOCAL,
            Error::NotControlPlane => &c::RESTORE_NOT_CONTROL_PLANE,
            Error::Unfinished { .. } => &c::RESTORE_UNFINISHED,
        }
    }
}

/// A snapshot downloaded and checked, with its certificates; the file is
/// removed when this is dropped, however the restore ends.
#[derive(Debug)]
pub struct Prepared {
    pub uri: String,
    pub manifest: Manifest,
    pub file: PathBuf,
    pub certificates: pki::Bundle,
    /// etcd's restore tool, found before anything changed.
    pub tool: Tool,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Resolves `which` (`latest`, a key or an `s3://` URI), downloads it into
/// `<state_dir>/restore/` (0700) and checks it against etcd's trailing
/// sha256, its manifest and this cluster. Nothing outside that directory is
/// touched. `tool` was found first ([`Tool::find`]): a node without one
/// must fail before anything changes.
pub async fn prepare(
    backups: &Backups,
    cfg: &Config,
    which: &str,
    tool: Tool,
) -> Result<Prepared, crate::backup::Error> {
    let key = backups.resolve(which).await?;
    let uri = backups.bucket().uri(&key);
    let dir = cfg.paths.state_dir.join("restore");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
    }
    .map_err(|e| crate::backup::Error::Local {
        path: dir.clone(),
        message: e.to_string(),
    })?;
    let name = key.rsplit('/').next().unwrap_or("snapshot.db");
    let file = dir.join(name);
    tracing::info!(%uri, file = %file.display(), "downloading the snapshot and checking it");
    let (manifest, certificates) = backups.download(&key, &cfg.cluster.name, &file).await?;
    let prepared = Prepared {
        uri,
        manifest,
        file,
        certificates,
        tool,
    };
    tracing::info!(uri = %prepared.uri, revision = prepared.manifest.revision, bytes = prepared.manifest.size, sha256 = %prepared.manifest.sha256, "the snapshot verifies");
    Ok(prepared)
}

/// etcd's restore tool, told by its file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    /// etcd 3.5 and later: `etcdutl snapshot restore` with a revision bump.
    Etcdutl(PathBuf),
    /// etcd 3.4: `etcdctl snapshot restore` (no revision bump there).
    Etcdctl(PathBuf),
}

impl Tool {
    /// `binaries.etcd_restore_tool`, else `etcdutl` then `etcdctl` from `path` (PATH).
    pub fn find(configured: Option<&Path>, path: Option<&std::ffi::OsStr>) -> Result<Tool, Error> {
        if let Some(p) = configured {
            return Tool::named(p).ok_or_else(|| {
                Error::NoTool(format!(
                    "binaries.etcd_restore_tool = {:?} names neither etcdutl nor etcdctl",
                    p.display().to_string()
                ))
            });
        }
        let dirs: Vec<PathBuf> = path
            .map(|p| std::env::split_paths(p).collect())
            .unwrap_or_default();
        for name in ["etcdutl", "etcdctl"] {
            if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
                return Ok(Tool::named(&found).unwrap_or(Tool::Etcdctl(found)));
            }
        }
        Err(Error::NoTool(
            "neither etcdutl nor etcdctl is on PATH and binaries.etcd_restore_tool is not set"
                .into(),
        ))
    }

    fn named(p: &Path) -> Option<Tool> {
        match p.file_name()?.to_str()? {
            n if n.starts_with("etcdutl") => Some(Tool::Etcdutl(p.to_path_buf())),
            n if n.starts_with("etcdctl") => Some(Tool::Etcdctl(p.to_path_buf())),
            _ => None,
        }
    }

    /// Whether this tool takes `--bump-revision` and `--mark-compacted`:
    /// `etcdutl` of an etcd recent enough to list them in its help (older
    /// 3.5 releases do not have them); never etcdctl 3.4.
    pub async fn bumps_revision(&self) -> bool {
        let Tool::Etcdutl(path) = self else {
            return false;
        };
        match crate::kubeadm::run_tool(
            path,
            &["snapshot", "restore", "--help"],
            &[],
            Duration::from_secs(30),
        )
        .await
        {
            Ok(Some(out)) => {
                let help = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                help.contains("--bump-revision") && help.contains("--mark-compacted")
            }
            _ => false,
        }
    }

    pub fn binary(&self) -> &Path {
        match self {
            Tool::Etcdutl(p) | Tool::Etcdctl(p) => p,
        }
    }
}

/// The one member the restored data directory holds: this node, as
/// kubeadm's etcd manifest names it (`--name` is the node name).
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub peer_url: String,
}

/// Where a data directory in the way goes: `<dir>.replaced-<unix seconds>`.
fn aside_name(data_dir: &Path, now: u64) -> PathBuf {
    let mut name = data_dir.as_os_str().to_os_string();
    name.push(format!(".replaced-{now}"));
    PathBuf::from(name)
}

/// The restore tool's arguments (pure: tested without running it); `bump`
/// when the tool takes `--bump-revision` ([`Tool::bumps_revision`]).
pub fn tool_args(file: &Path, member: &Member, data_dir: &Path, bump: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["snapshot".into(), "restore".into(), file.into()];
    for (flag, value) in [
        ("--name", member.name.clone()),
        (
            "--initial-cluster",
            format!("{}={}", member.name, member.peer_url),
        ),
        ("--initial-advertise-peer-urls", member.peer_url.clone()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.push("--data-dir".into());
    args.push(data_dir.into());
    if bump {
        args.push("--bump-revision".into());
        args.push(BUMP_REVISION.to_string().into());
        args.push("--mark-compacted".into());
    }
    args
}

/// kubeadm's preflight check that an init over the restored data must
/// ignore: `DirAvailable-` and the path with `/` as `-` (kubeadm's
/// `DirAvailableCheck.Name`, `cmd/kubeadm/app/preflight/checks.go`).
pub fn data_dir_check(data_dir: &Path) -> String {
    format!(
        "DirAvailable-{}",
        data_dir.display().to_string().replace('/', "-")
    )
}

/// Lays the backup down on this (reset) node: the certificate authorities
/// into kubeadm's `pki/`, the data directory through etcd's tool.
pub async fn lay_down(prepared: &Prepared, cfg: &Config, member: &Member) -> Result<(), Error> {
    let data_dir = &cfg.paths.etcd_data_dir;
    let local = |path: &Path, message: String| Error::Local {
        path: path.to_path_buf(),
        message,
    };
    // etcd's tool refuses an existing data directory. `kubeadm reset`
    // empties it only when it finds this node's etcd configuration (a
    // restore cut short before its `kubeadm init` leaves none): what is
    // left is moved aside, never deleted.
    if data_dir.exists() {
        let entries = std::fs::read_dir(data_dir)
            .map_err(|e| local(data_dir, e.to_string()))?
            .count();
        if entries > 0 {
            let aside = aside_name(data_dir, crate::backup::now_unix());
            std::fs::rename(data_dir, &aside).map_err(|e| local(data_dir, e.to_string()))?;
            tracing::warn!(data_dir = %data_dir.display(), moved_to = %aside.display(), "the etcd data directory was not empty after kubeadm reset; moved aside (delete it once the cluster is whole)");
        } else {
            std::fs::remove_dir(data_dir).map_err(|e| local(data_dir, e.to_string()))?;
        }
    }
    let pki_dir = cfg.paths.kubernetes_dir.join("pki");
    prepared
        .certificates
        .write(&pki_dir)
        .map_err(|e| local(&pki_dir, e.to_string()))?;
    tracing::info!(pki = %pki_dir.display(), "laid down the cluster's certificate authorities from the backup");
    let tool = &prepared.tool;
    let bump = tool.bumps_revision().await;
    if !bump {
        tracing::warn!(tool = %tool.binary().display(), "this etcd restore tool cannot bump the revision: after the restore, restart the kubelets and controllers so their watches relist (docs/RESTORE.md)");
    }
    run_tool(tool, &tool_args(&prepared.file, member, data_dir, bump)).await?;
    tracing::info!(data_dir = %data_dir.display(), tool = %tool.binary().display(), "restored the etcd data directory");
    Ok(())
}

async fn run_tool(tool: &Tool, args: &[OsString]) -> Result<(), Error> {
    let name = tool.binary().display().to_string();
    let out =
        match crate::kubeadm::run_tool(tool.binary(), args, &[("ETCDCTL_API", "3")], TOOL_TIMEOUT)
            .await
        {
            Err(e) => return Err(Error::NoTool(format!("{name}: {e}"))),
            Ok(None) => return Err(Error::ToolTimedOut { tool: name }),
            Ok(Some(out)) => out,
        };
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    Err(Error::ToolFailed {
        tool: name,
        code: out.status.code(),
        tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    })
}

/// Whether the recorded cluster still answers (this node's own member too:
/// a restore run again over a finished one must not replace it): with
/// kubeadm's etcd client certificate on this node, a member that sees a
/// leader; without one (a fresh instance), any member's client port that
/// takes a connection. Restoring over a cluster that answers would replace
/// it, so it needs the operator's explicit word.
pub async fn cluster_answers(
    records: &[crate::registry::MemberRecord],
    settings: &crate::etcd::Settings,
) -> Option<(String, String)> {
    let endpoints = crate::etcd::recorded_endpoints(records, settings);
    let has_client_cert = settings.pki_dir.join("apiserver-etcd-client.key").exists();
    for endpoint in endpoints {
        if has_client_cert {
            let probe = async {
                let etcd = crate::etcd::Etcd::connect(std::slice::from_ref(&endpoint), settings)
                    .await
                    .ok()?;
                etcd.leader().await.ok().filter(|l| *l != 0)
            };
            if let Ok(Some(leader)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                return Some((
                    endpoint,
                    format!("sees a leader ({})", crate::etcd::MemberHex(leader)),
                ));
            }
        } else if let Some(host) = crate::etcd::host_of(&endpoint) {
            let addr = format!("{host}:{}", settings.client_port);
            let connect = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, connect).await {
                return Some((
                    endpoint,
                    "takes connections (this node has no etcd client certificate to ask more)"
                        .into(),
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_tool_that_can_bumps_the_revision_and_one_that_cannot_restores_plainly_as_this_node() {
        let member = Member {
            name: "ip-10-0-1-5".into(),
            peer_url: "https://10.0.1.5:2380".into(),
        };
        let file = Path::new("/var/lib/kubeboot/restore/s.db");
        let dir = Path::new("/var/lib/etcd");
        let plain = strings(&tool_args(file, &member, dir, false));
        assert_eq!(
            plain,
            [
                "snapshot",
                "restore",
                "/var/lib/kubeboot/restore/s.db",
                "--name",
                "ip-10-0-1-5",
                "--initial-cluster",
                "ip-10-0-1-5=https://10.0.1.5:2380",
                "--initial-advertise-peer-urls",
                "https://10.0.1.5:2380",
                "--data-dir",
                "/var/lib/etcd"
            ]
        );
        let bumped = strings(&tool_args(file, &member, dir, true));
        assert_eq!(&bumped[..plain.len()], &plain[..]);
        assert_eq!(
            &bumped[plain.len()..],
            ["--bump-revision", "1000000000", "--mark-compacted"]
        );
    }

    #[test]
    fn the_tool_is_the_configured_one_else_etcdutl_before_etcdctl_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("etcdctl"), "").unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(
            Tool::find(None, Some(&path)).unwrap(),
            Tool::Etcdctl(b.join("etcdctl"))
        );
        std::fs::write(b.join("etcdutl"), "").unwrap();
        assert_eq!(
            Tool::find(None, Some(&path)).unwrap(),
            Tool::Etcdutl(b.join("etcdutl"))
        );
        assert_eq!(
            Tool::find(Some(Path::new("/opt/etcd/etcdctl")), Some(&path)).unwrap(),
            Tool::Etcdctl("/opt/etcd/etcdctl".into())
        );
        assert!(matches!(
            Tool::find(Some(Path::new("/usr/bin/etcd")), None),
            Err(Error::NoTool(_))
        ));
        assert!(matches!(
            Tool::find(None, Some(&std::env::join_paths([&a]).unwrap())),
            Err(Error::NoTool(_))
        ));
    }

    #[test]
    fn a_data_directory_in_the_way_is_moved_beside_itself() {
        assert_eq!(
            aside_name(Path::new("/var/lib/etcd"), 1_796_346_123),
            Path::new("/var/lib/etcd.replaced-1796346123")
        );
    }

    #[test]
    fn the_preflight_check_to_ignore_is_named_as_kubeadm_names_it() {
        assert_eq!(
            data_dir_check(Path::new("/var/lib/etcd")),
            "DirAvailable--var-lib-etcd"
        );
    }
}
