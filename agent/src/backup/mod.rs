//! etcd backups in S3: the leader's scheduled snapshots, `kubeboot backup
//! now|list|verify`, and retention.
//!
//! A snapshot streams from etcd's maintenance API straight into a multipart
//! upload ([`take`]), verified against the sha256 etcd appends as it passes
//! ([`integrity`]); neither memory nor disk ever holds it whole. Only a
//! verified, completed upload gets its manifest (`<key>.json`: cluster,
//! generation, revision, member, sha256, size, agent version), so "verified"
//! means "has a manifest": S3 fixes an object's metadata when its upload
//! starts, before the hash and size are known. A failed or interrupted
//! upload is aborted; one a killed holder left open is aborted by the next
//! holder of the `backup` lock. Retention ([`retention`]) is pure and run by
//! the leader after each scheduled backup.
//!
//! Layout: `<backup.prefix>/<cluster>/<YYYYMMDDTHHMMSSZ>-<member>.db`.

pub mod integrity;
pub mod pki;
pub mod retention;
mod take;

use crate::aws::s3::{self, Bucket};
use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use take::{take, Source};

/// The size of each uploaded part but the last: S3's minimum is 5 MiB, and
/// one part is what the agent holds in memory while it uploads.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// How long the stream may go without a piece before the backup is given up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest manifest read (they are a few hundred bytes).
const MANIFEST_LIMIT: usize = 64 * 1024;

/// Backup failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("backups need aws.backup_bucket, which is not set")]
    NoBucket,
    #[error("etcd snapshot failed: {0}")]
    Etcd(#[from] crate::etcd::Error),
    #[error(transparent)]
    Storage(#[from] s3::Error),
    #[error("snapshot {uri} does not verify: {mismatch}")]
    Damaged {
        uri: String,
        mismatch: integrity::Mismatch,
    },
    #[error("snapshot {uri} does not match its manifest: {what}")]
    NotAsRecorded { uri: String, what: String },
    #[error("no snapshot {what} under {uri}")]
    NotFound { what: String, uri: String },
    #[error("the manifest {uri} cannot be read: {message}")]
    Manifest { uri: String, message: String },
    #[error(
        "no certificates were saved with this snapshot ({uri} is not recorded in its manifest)"
    )]
    NoCertificates { uri: String },
    #[error("{uri}: no bytes for 60 s; the download was given up")]
    Stalled { uri: String },
    #[error("{}: {message}", path.display())]
    Local {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("the backup took longer than backup.timeout ({}); its upload was aborted", crate::config::value::format_duration(*after))]
    TimedOut { after: Duration },
    #[error("the backup lock was lost mid-upload ({reason}); its upload was aborted")]
    LockLost { reason: String },
    #[error("stopping (SIGTERM or Ctrl-C) mid-upload; the upload was aborted")]
    Stopped,
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use crate::catalogue as c;
        match self {
            Error::NoBucket => &c::BACKUP_NO_BUCKET,
            Error::Etcd(_) | Error::TimedOut { .. } | Error::LockLost { .. } | Error::Stopped => {
                &c::BACKUP_STREAM
            }
            Error::Storage(e) => e.entry(),
            Error::Damaged { .. } | Error::NotAsRecorded { .. } | Error::Manifest { .. } => {
                &c::BACKUP_DAMAGED
            }
            Error::NoCertificates { .. } => &c::BACKUP_NO_CERTIFICATES,
            Error::Stalled { .. } => &c::BACKUP_STORAGE,
            Error::Local { .. } => &c::RESTORE_LOCAL,
            Error::NotFound { .. } => &c::BACKUP_NOT_FOUND,
            Error::Lock(e) => e.entry(),
            Error::Registry(e) => e.entry(),
        }
    }
}

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The leader's schedule.
    Scheduled,
    /// `kubeboot backup now`.
    Manual,
    /// Before the agent removed an etcd member.
    MembershipChange,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Manual => "manual",
            Trigger::MembershipChange => "membership-change",
        }
    }
}

/// What a verified backup records about itself (`<key>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot object's key.
    pub key: String,
    pub cluster: String,
    /// The registry's cluster generation when it was taken.
    pub generation: u64,
    /// etcd's revision when the stream opened.
    pub revision: i64,
    /// The member it streamed from (hex).
    pub member: String,
    /// The database's sha256 (hex), which the snapshot's last 32 bytes repeat.
    pub sha256: String,
    /// Bytes of the object: the database and its sha256.
    pub size: u64,
    pub agent_version: String,
    /// When it was taken (RFC 3339) and the same in Unix seconds.
    pub taken_at: String,
    pub taken_at_unix: u64,
    pub duration_ms: u64,
    pub trigger: Trigger,
    /// The sha256 of the certificates bundle saved beside it
    /// (`<key>.pki.json`); absent when the node had none to save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki_sha256: Option<String>,
}

/// The longest a snapshot before a membership change may take: the removal
/// waits for it, under the `membership` lock a joining control plane may be
/// waiting for too.
pub const BEFORE_REMOVAL_LIMIT: Duration = Duration::from_secs(5 * 60);

/// A snapshot through `etcd` before the agent removes a member
/// (`backup.before_membership_change`). Best effort: a removal is never held
/// back by it (a terminating member must leave etcd before its instance
/// goes), so a failure is logged and counted, and a backup already running
/// (the `backup` lock is held) stands in for it.
pub async fn before_removal<L: crate::lock::LockStore, R: crate::registry::RegistryStore>(
    backups: &Backups,
    locker: &crate::lock::Locker<L>,
    registry: &crate::registry::Registry<R>,
    etcd: &crate::etcd::Etcd,
) {
    let attempt = async {
        let generation = registry.state().await?.generation;
        let Some(guard) = locker.try_acquire(crate::lock::Purpose::Backup).await? else {
            tracing::info!("a backup is already running (the backup lock is held); it stands for the snapshot before this membership change");
            return Ok(None);
        };
        let limited = Backups {
            timeout: backups.timeout.min(BEFORE_REMOVAL_LIMIT),
            ..backups.clone()
        };
        let source = Source {
            etcd,
            endpoints: etcd.endpoints().to_vec(),
            generation,
            stop: None,
        };
        guard
            .scoped(async |g| take(&limited, source, Trigger::MembershipChange, g).await)
            .await
            .map(Some)
    };
    if let Err(e) = attempt.await {
        crate::catalogue::report!(
            warn,
            e,
            "the snapshot before this membership change failed; the removal goes ahead"
        );
    }
}

/// How long the leader waits after its `failures`+1-th failed backup in a
/// row: 5 minutes, doubling, at most `interval` (a damaged stream or a
/// refusing bucket must not re-stream the database every period).
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let first = Duration::from_secs(5 * 60);
    first
        .checked_mul(1u32 << failures.min(16))
        .unwrap_or(interval)
        .min(interval)
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `2026-12-04T01:02:03Z` for Unix seconds `t`.
pub fn rfc3339(t: u64) -> String {
    aws_smithy_types::DateTime::from_secs(t as i64)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| t.to_string())
}

/// The key's timestamp, `20261204T010203Z`: sorts as time does.
fn stamp(t: u64) -> String {
    rfc3339(t).replace(['-', ':'], "")
}

/// The Unix time in a snapshot key's file name (`<stamp>-<member>.db`).
pub fn taken_at_of(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    let s = name.get(..16)?;
    if !s.is_ascii() || s.as_bytes()[8] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    let t =
        aws_smithy_types::DateTime::from_str(&text, aws_smithy_types::date_time::Format::DateTime)
            .ok()?;
    u64::try_from(t.secs()).ok()
}

/// A snapshot's manifest key.
pub fn manifest_key(key: &str) -> String {
    format!("{key}.json")
}

/// One snapshot in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub key: String,
    pub uri: String,
    pub taken_at_unix: u64,
    /// The object's size as listed.
    pub size: u64,
    /// Its manifest, when it has one (verified at upload).
    pub manifest: Option<Manifest>,
}

/// The cluster's backups: its bucket, where in it, and the policy.
#[derive(Debug, Clone)]
pub struct Backups {
    bucket: Bucket,
    /// `<backup.prefix>/<cluster>/`.
    prefix: String,
    cluster: String,
    policy: retention::Policy,
    timeout: Duration,
    /// kubeadm's certificates directory, whose authorities each backup keeps.
    pki_dir: std::path::PathBuf,
}

impl Backups {
    /// The cluster's backups; [`Error::NoBucket`] when no bucket is set.
    pub fn from_config(aws: &aws_config::SdkConfig, cfg: &Config) -> Result<Self, Error> {
        let name = cfg.aws.backup_bucket.as_deref().ok_or(Error::NoBucket)?;
        let bucket = Bucket::new(
            crate::aws::s3_client(aws, cfg),
            name,
            cfg.aws.kms_key_id.clone(),
        );
        Ok(Self::new(bucket, cfg))
    }

    pub fn new(bucket: Bucket, cfg: &Config) -> Self {
        Backups {
            bucket,
            prefix: format!(
                "{}/{}/",
                cfg.backup.prefix.trim_end_matches('/'),
                cfg.cluster.name
            ),
            cluster: cfg.cluster.name.clone(),
            policy: retention::Policy {
                keep_all_within: cfg.backup.keep_all_within,
                keep_hourly: cfg.backup.keep_hourly,
                keep_daily: cfg.backup.keep_daily,
            },
            timeout: cfg.backup.timeout,
            pki_dir: cfg.paths.kubernetes_dir.join("pki"),
        }
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// Where this cluster's snapshots live, `s3://bucket/prefix/cluster/`.
    pub fn location(&self) -> String {
        self.bucket.uri(&self.prefix)
    }

    /// The key of a snapshot taken at `t` from `member`.
    fn key_for(&self, t: u64, member: u64) -> String {
        format!(
            "{}{}-{}.db",
            self.prefix,
            stamp(t),
            crate::etcd::MemberHex(member)
        )
    }

    /// Aborts every upload left open under this cluster's prefix. Only for
    /// the holder of the `backup` lock: no other upload can be live.
    pub async fn abort_open_uploads(&self) -> Result<usize, Error> {
        let open = self.bucket.open_uploads(&self.prefix).await?;
        for u in &open {
            tracing::warn!(
                uri = %self.bucket.uri(&u.key),
                upload_id = %u.upload_id,
                "aborting an upload a previous backup left open (its holder died or lost the lock mid-upload)"
            );
            self.bucket.abort_upload(&u.key, &u.upload_id).await?;
        }
        Ok(open.len())
    }

    /// Every snapshot, oldest first, with its manifest when it has one.
    pub async fn list(&self) -> Result<Vec<Entry>, Error> {
        let objects = self.bucket.list(&self.prefix).await?;
        let manifests: std::collections::BTreeSet<&str> = objects
            .iter()
            .filter(|o| o.key.ends_with(".db.json"))
            .map(|o| o.key.as_str())
            .collect();
        let mut entries = Vec::new();
        for o in objects.iter().filter(|o| o.key.ends_with(".db")) {
            let Some(taken_at_unix) = taken_at_of(&o.key) else {
                continue;
            };
            let manifest = if manifests.contains(manifest_key(&o.key).as_str()) {
                Some(self.manifest(&o.key).await?)
            } else {
                None
            };
            entries.push(Entry {
                key: o.key.clone(),
                uri: self.bucket.uri(&o.key),
                taken_at_unix,
                size: o.size,
                manifest,
            });
        }
        entries.sort_by(|a, b| {
            a.taken_at_unix
                .cmp(&b.taken_at_unix)
                .then(a.key.cmp(&b.key))
        });
        Ok(entries)
    }

    /// The newest snapshot with a manifest.
    pub async fn newest_verified(&self) -> Result<Option<Manifest>, Error> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .rev()
            .find_map(|e| e.manifest))
    }

    /// The manifest of snapshot `key`.
    pub async fn manifest(&self, key: &str) -> Result<Manifest, Error> {
        let mkey = manifest_key(key);
        let body = self.bucket.get_small(&mkey, MANIFEST_LIMIT).await?;
        serde_json::from_slice(&body).map_err(|e| Error::Manifest {
            uri: self.bucket.uri(&mkey),
            message: e.to_string(),
        })
    }

    /// The key `which` names: `latest` (the newest verified snapshot), an
    /// `s3://<bucket>/<key>` URI in this bucket, or a key.
    pub async fn resolve(&self, which: &str) -> Result<String, Error> {
        if which == "latest" {
            return self
                .newest_verified()
                .await?
                .map(|m| m.key)
                .ok_or_else(|| Error::NotFound {
                    what: "with a manifest".into(),
                    uri: self.location(),
                });
        }
        let in_bucket = format!("s3://{}/", self.bucket.name());
        match which.strip_prefix(&in_bucket) {
            Some(key) => Ok(key.to_string()),
            None if which.starts_with("s3://") => Err(Error::NotFound {
                what: which.to_string(),
                uri: self.location(),
            }),
            None => Ok(which.to_string()),
        }
    }

    /// Reads snapshot `key` back whole (streaming) and checks it: its
    /// trailing sha256, and the manifest's hash and size.
    pub async fn verify(&self, key: &str) -> Result<Manifest, Error> {
        let manifest = self.manifest(key).await?;
        self.read_checked(&manifest, |_| Ok(())).await?;
        Ok(manifest)
    }

    /// Downloads snapshot `key` of cluster `cluster` to `to`, checked as
    /// [`Backups::verify`] checks it, with its certificates bundle (checked
    /// against the manifest). The manifest is checked before any byte of
    /// the snapshot is read. The file appears only when everything verified (it is
    /// written beside, as `<to>.partial`, and renamed); nothing is left
    /// behind otherwise.
    pub async fn download(
        &self,
        key: &str,
        cluster: &str,
        to: &std::path::Path,
    ) -> Result<(Manifest, pki::Bundle), Error> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let manifest = self.manifest(key).await?;
        if manifest.key != key {
            return Err(Error::NotAsRecorded {
                uri: self.bucket.uri(&manifest_key(key)),
                what: format!("the manifest describes {}, not {key}", manifest.key),
            });
        }
        if manifest.cluster != cluster {
            return Err(Error::NotAsRecorded {
                uri: self.bucket.uri(key),
                what: format!(
                    "it is cluster {:?}'s, this node is in {cluster:?}",
                    manifest.cluster
                ),
            });
        }
        let certificates = self.certificates(&manifest).await?;
        let partial = to.with_extension("partial");
        let local = |path: &std::path::Path, e: std::io::Error| Error::Local {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let written = async {
            // The snapshot holds every Secret of the cluster: 0600.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .map_err(|e| local(&partial, e))?;
            self.read_checked(&manifest, |piece| {
                file.write_all(piece).map_err(|e| local(&partial, e))
            })
            .await?;
            file.sync_all().map_err(|e| local(&partial, e))?;
            std::fs::rename(&partial, to).map_err(|e| local(to, e))
        }
        .await;
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok((manifest, certificates))
    }

    /// The certificates bundle saved with the snapshot `manifest` describes.
    pub async fn certificates(&self, manifest: &Manifest) -> Result<pki::Bundle, Error> {
        let key = pki::key_of(&manifest.key);
        let uri = self.bucket.uri(&key);
        let Some(want) = &manifest.pki_sha256 else {
            return Err(Error::NoCertificates { uri });
        };
        let body = self.bucket.get_small(&key, pki::LIMIT).await?;
        let got = pki::Bundle::sha256(&body);
        if &got != want {
            return Err(Error::NotAsRecorded {
                uri,
                what: format!("sha256 {got}, the manifest says {want}"),
            });
        }
        pki::Bundle::parse(&body).map_err(|e| Error::NotAsRecorded {
            uri,
            what: e.to_string(),
        })
    }

    /// Streams the snapshot `manifest` describes through `sink`, checking
    /// its trailing sha256 and the manifest's hash and size; a stream that
    /// stalls for [`STALL_TIMEOUT`] is given up.
    async fn read_checked(
        &self,
        manifest: &Manifest,
        mut sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let uri = self.bucket.uri(&manifest.key);
        let mut reader = self.bucket.open(&manifest.key).await?;
        let mut hash = integrity::TrailingHash::new();
        loop {
            let piece = tokio::time::timeout(STALL_TIMEOUT, reader.next())
                .await
                .map_err(|_| Error::Stalled { uri: uri.clone() })??;
            let Some(piece) = piece else { break };
            hash.update(&piece);
            sink(&piece)?;
        }
        let size = hash.total();
        let sha256 = hash.finish().map_err(|mismatch| Error::Damaged {
            uri: uri.clone(),
            mismatch,
        })?;
        if sha256 != manifest.sha256 || size != manifest.size {
            return Err(Error::NotAsRecorded {
                uri,
                what: format!(
                    "sha256 {sha256} and {size} bytes, the manifest says {} and {} bytes",
                    manifest.sha256, manifest.size
                ),
            });
        }
        Ok(())
    }

    /// Deletes what retention says to (each snapshot with its manifest);
    /// the keys deleted.
    pub async fn apply_retention(&self, now: u64) -> Result<Vec<String>, Error> {
        let entries = self.list().await?;
        let listed: Vec<retention::Listed> = entries
            .iter()
            .map(|e| retention::Listed {
                key: e.key.clone(),
                taken_at: e.taken_at_unix,
                verified: e.manifest.is_some(),
            })
            .collect();
        let delete = retention::plan(&listed, now, self.policy);
        for key in &delete {
            // The manifest first: a snapshot that lost its manifest is
            // unverified and goes next time, never the other way round.
            self.bucket.delete(&manifest_key(key)).await?;
            self.bucket.delete(&pki::key_of(key)).await?;
            self.bucket.delete(key).await?;
            tracing::info!(uri = %self.bucket.uri(key), "retention deleted a snapshot");
        }
        Ok(delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backup_backs_off_from_five_minutes_up_to_the_interval() {
        let hour = Duration::from_secs(3600);
        let mins = |m: u64| Duration::from_secs(m * 60);
        let waits: Vec<Duration> = (0..6).map(|n| retry_delay(n, hour)).collect();
        assert_eq!(waits, [mins(5), mins(10), mins(20), mins(40), hour, hour]);
        assert_eq!(retry_delay(u32::MAX, hour), hour);
        assert_eq!(retry_delay(0, mins(5)), mins(5));
    }

    #[test]
    fn a_key_carries_its_time_and_sorts_as_time_does() {
        let t = 1_796_346_123;
        let s = stamp(t);
        assert_eq!(s, "20261204T010203Z");
        let key = format!("etcd-snapshots/prod/{s}-8e9e05c52164694d.db");
        assert_eq!(taken_at_of(&key), Some(t));
        assert!(stamp(t) < stamp(t + 1) && stamp(t + 1) < stamp(t + 86_400 * 400));
        for bad in [
            "x/prod/2026-12-04T01:02:03Z.db",
            "x/short.db",
            "x/20261204X005203Z-1.db",
            "",
        ] {
            assert_eq!(taken_at_of(bad), None, "{bad}");
        }
    }
}
