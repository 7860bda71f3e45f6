//! Taking one backup, under the `backup` lock: abort what a dead holder
//! left open, stream etcd's snapshot into a multipart upload one part at a
//! time while hashing it, complete the upload only if the stream verified,
//! then write the manifest. Any failure, the deadline or a lost lock aborts
//! the upload, so S3 keeps no orphan parts.

use super::integrity::TrailingHash;
use super::{now_unix, rfc3339, Backups, Error, Manifest, Trigger, PART_SIZE, STALL_TIMEOUT};
use crate::aws::s3::Bucket;
use crate::etcd::{Etcd, MemberHex, SnapshotStream};
use crate::lock::Guard;
use aws_sdk_s3::types::CompletedPart;
use std::collections::HashMap;
use std::time::Instant;

/// Where a snapshot comes from.
pub struct Source<'a> {
    pub etcd: &'a Etcd,
    /// Client URLs to stream from, in preference order (this node's member first).
    pub endpoints: Vec<String>,
    /// The registry's cluster generation, recorded with the snapshot.
    pub generation: u64,
    /// Shutdown (SIGTERM, Ctrl-C): the upload is aborted and the lock
    /// released before the process goes, not left open.
    pub stop: Option<crate::pacing::Stop>,
}

/// Resolves when `stop` says so; never without one.
async fn stopping(stop: &mut Option<crate::pacing::Stop>) {
    match stop {
        Some(stop) => crate::pacing::stopped(stop).await,
        None => std::future::pending().await,
    }
}

/// Takes one backup while `guard` (the `backup` lock) is held; its manifest.
pub async fn take(
    backups: &Backups,
    source: Source<'_>,
    trigger: Trigger,
    guard: &Guard,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    let result = take_inner(backups, source, trigger, guard, started).await;
    let dims = [("Trigger", trigger.as_str())];
    match &result {
        Ok(m) => {
            crate::metrics::record(
                crate::metrics::BACKUP_DURATION,
                started.elapsed().as_millis() as f64,
                &dims,
            );
            crate::metrics::record(crate::metrics::BACKUP_SIZE, m.size as f64, &[]);
            crate::metrics::record(crate::metrics::BACKUP_AGE, 0.0, &[]);
            tracing::info!(
                uri = %backups.bucket.uri(&m.key),
                bytes = m.size,
                revision = m.revision,
                member = %m.member,
                sha256 = %m.sha256,
                duration_ms = m.duration_ms,
                trigger = trigger.as_str(),
                "etcd backup taken and verified"
            );
        }
        Err(_) => crate::metrics::record(crate::metrics::BACKUP_FAILURES, 1.0, &dims),
    }
    result
}

async fn take_inner(
    backups: &Backups,
    mut source: Source<'_>,
    trigger: Trigger,
    guard: &Guard,
    started: Instant,
) -> Result<Manifest, Error> {
    backups.abort_open_uploads().await?;
    let taken_at = now_unix();
    let (from, mut stream) = source
        .etcd
        .snapshot(&source.endpoints, STALL_TIMEOUT)
        .await?;
    let key = backups.key_for(taken_at, from.member);
    let member = MemberHex(from.member).to_string();
    let metadata = HashMap::from([
        ("kubeboot-cluster".to_string(), backups.cluster.clone()),
        (
            "kubeboot-generation".to_string(),
            source.generation.to_string(),
        ),
        ("kubeboot-revision".to_string(), from.revision.to_string()),
        ("kubeboot-member".to_string(), member.clone()),
        ("kubeboot-trigger".to_string(), trigger.as_str().to_string()),
        (
            "kubeboot-agent-version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    tracing::info!(
        uri = %backups.bucket.uri(&key),
        from = %from.endpoint,
        db_size = from.db_size,
        "streaming an etcd snapshot to S3"
    );
    let upload_id = backups.bucket.start_upload(&key, metadata).await?;
    let streamed = tokio::select! {
        r = tokio::time::timeout(backups.timeout, upload_parts(&backups.bucket, &key, &upload_id, &mut stream)) => {
            r.unwrap_or(Err(Error::TimedOut { after: backups.timeout }))
        }
        _ = guard.lost() => Err(Error::LockLost { reason: guard.lost_reason() }),
        _ = stopping(&mut source.stop) => Err(Error::Stopped),
    };
    let completed = match streamed {
        Ok((parts, sha256, size)) => backups
            .bucket
            .complete_upload(&key, &upload_id, parts)
            .await
            .map(|()| (sha256, size))
            .map_err(Error::from),
        Err(e) => Err(e),
    };
    let (sha256, size) = match completed {
        Ok(done) => done,
        Err(e) => {
            abort(&backups.bucket, &key, &upload_id).await;
            return Err(e);
        }
    };
    let pki_sha256 = save_certificates(backups, &key).await?;
    let manifest = Manifest {
        key: key.clone(),
        cluster: backups.cluster.clone(),
        generation: source.generation,
        revision: from.revision,
        member,
        sha256,
        size,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        taken_at: rfc3339(taken_at),
        taken_at_unix: taken_at,
        duration_ms: started.elapsed().as_millis() as u64,
        trigger,
        pki_sha256,
    };
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    backups
        .bucket
        .put_small(&super::manifest_key(&key), body, "application/json")
        .await?;
    Ok(manifest)
}

/// Saves the cluster's certificate authorities beside snapshot `key`; their
/// sha256 for the manifest. A node without them (not a kubeadm control
/// plane) saves none: the snapshot is still worth keeping, and a restore
/// from it is refused with KB-BACKUP-006.
async fn save_certificates(backups: &Backups, key: &str) -> Result<Option<String>, Error> {
    let bundle = match super::pki::Bundle::read(&backups.pki_dir) {
        Ok(bundle) => bundle,
        Err(e) => {
            tracing::warn!(error = %e, "this node has no certificate authorities to save with the snapshot; a restore from it will be refused");
            return Ok(None);
        }
    };
    let body = bundle.to_bytes();
    let sha256 = super::pki::Bundle::sha256(&body);
    backups
        .bucket
        .put_small(&super::pki::key_of(key), body, "application/json")
        .await?;
    Ok(Some(sha256))
}

/// Streams the snapshot into parts of [`PART_SIZE`] (the last one shorter),
/// hashing as it goes: the parts, the database's sha256 and the bytes sent.
async fn upload_parts(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    stream: &mut SnapshotStream,
) -> Result<(Vec<CompletedPart>, String, u64), Error> {
    let mut hash = TrailingHash::new();
    let mut buf = bytes::BytesMut::with_capacity(PART_SIZE);
    let mut parts = Vec::new();
    while let Some(piece) = stream.next().await? {
        hash.update(&piece);
        buf.extend_from_slice(&piece);
        while buf.len() >= PART_SIZE {
            let part = buf.split_to(PART_SIZE).freeze();
            let number = parts.len() as i32 + 1;
            parts.push(bucket.upload_part(key, upload_id, number, part).await?);
            crate::failpoint::stall_point("backup:after-part").await;
        }
    }
    let size = hash.total();
    let sha256 = hash.finish().map_err(|mismatch| Error::Damaged {
        uri: bucket.uri(key),
        mismatch,
    })?;
    if !buf.is_empty() {
        let number = parts.len() as i32 + 1;
        parts.push(
            bucket
                .upload_part(key, upload_id, number, buf.freeze())
                .await?,
        );
        crate::failpoint::stall_point("backup:after-part").await;
    }
    Ok((parts, sha256, size))
}

/// Aborts an upload after a failure; a failed abort is logged (the bucket's
/// lifecycle rule and the next backup's sweep remove it).
async fn abort(bucket: &Bucket, key: &str, upload_id: &str) {
    match bucket.abort_upload(key, upload_id).await {
        Ok(()) => tracing::info!(uri = %bucket.uri(key), "aborted the failed backup's upload"),
        Err(e) => crate::catalogue::report!(
            warn,
            e,
            uri = %bucket.uri(key),
            "cannot abort the failed backup's upload; the next backup aborts it"
        ),
    }
}
