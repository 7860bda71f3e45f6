//! The cluster's certificate authorities, saved beside each snapshot
//! (`<key>.pki.json`, SSE-KMS like the snapshot).
//!
//! A restored etcd is only half a cluster without them: its ServiceAccount
//! tokens are signed by `sa.key`, and every kubelet's kubeconfig trusts
//! `ca.crt`. They are the files kubeadm itself hands a joining control
//! plane (`certsToTransfer`, kubernetes/kubernetes
//! `cmd/kubeadm/app/phases/copycerts/copycerts.go`, stacked etcd). The
//! `kubeadm-certs` Secret inside the snapshot is no substitute: it is
//! garbage-collected with its bootstrap token after two hours. The snapshot
//! already holds every Secret of the cluster, so these add no new class of
//! secret to the bucket.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The files kept, relative to kubeadm's certificates directory.
pub const SHARED: &[&str] = &[
    "ca.crt",
    "ca.key",
    "sa.key",
    "sa.pub",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "etcd/ca.crt",
    "etcd/ca.key",
];

/// The largest bundle read back (the eight files are a few KiB).
pub const LIMIT: usize = 256 * 1024;

/// The certificates object of snapshot `key`.
pub fn key_of(snapshot_key: &str) -> String {
    format!("{snapshot_key}.pki.json")
}

/// The eight files' contents. Its `Debug` names the files only: the keys
/// are never printed or logged.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    files: BTreeMap<String, String>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A bundle that cannot be read or laid down.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the certificates bundle is not as written: {0}")]
    Malformed(String),
}

impl Bundle {
    /// Reads the shared files from `dir` (kubeadm's `pki/`); every one must be there.
    pub fn read(dir: &Path) -> Result<Bundle, Error> {
        let mut files = BTreeMap::new();
        for name in SHARED {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            files.insert((*name).to_string(), text);
        }
        Ok(Bundle { files })
    }

    /// Parses a bundle read back, refusing one without every shared file
    /// or with any other name (a path outside `pki/` is never written).
    pub fn parse(body: &[u8]) -> Result<Bundle, Error> {
        let bundle: Bundle =
            serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))?;
        let names: Vec<&str> = bundle.files.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = SHARED.to_vec();
        want.sort_unstable();
        if names != want {
            return Err(Error::Malformed(format!(
                "it holds {names:?}, expected {want:?}"
            )));
        }
        Ok(bundle)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The sha256 (hex) of [`Bundle::to_bytes`], which the manifest records.
    pub fn sha256(body: &[u8]) -> String {
        super::integrity::hex(&Sha256::digest(body))
    }

    /// Writes the files into `dir` as kubeadm does: keys 0600, the rest
    /// 0644, directories 0755.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        for (name, text) in &self.files {
            let path = dir.join(name);
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io)?;
            }
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_keeps_key_modes_and_never_prints_a_key() {
        let from = tempfile::tempdir().unwrap();
        for name in SHARED {
            let path = from.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("SECRET-{name}")).unwrap();
        }
        let bundle = Bundle::read(from.path()).unwrap();
        assert!(!format!("{bundle:?}").contains("SECRET"));
        let body = bundle.to_bytes();
        let back = Bundle::parse(&body).unwrap();
        let to = tempfile::tempdir().unwrap();
        back.write(to.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for name in SHARED {
            let path = to.path().join(name);
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("SECRET-{name}")
            );
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode,
                if name.ends_with(".key") { 0o600 } else { 0o644 },
                "{name}"
            );
        }
    }

    #[test]
    fn a_bundle_missing_a_file_or_naming_another_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Bundle::read(dir.path()), Err(Error::Io { .. })));
        let mut files: BTreeMap<String, String> =
            SHARED.iter().map(|n| (n.to_string(), "x".into())).collect();
        files.remove("sa.key");
        let short = serde_json::to_vec(&Bundle {
            files: files.clone(),
        })
        .unwrap();
        assert!(matches!(Bundle::parse(&short), Err(Error::Malformed(_))));
        files.insert("sa.key".into(), "x".into());
        files.insert("../../etc/passwd".into(), "x".into());
        let escaping = serde_json::to_vec(&Bundle { files }).unwrap();
        assert!(matches!(Bundle::parse(&escaping), Err(Error::Malformed(_))));
        assert!(Bundle::parse(b"not json").is_err());
    }
}
