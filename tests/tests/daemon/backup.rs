//! etcd backups in S3 (moto) from real etcd over https: `kubeboot backup
//! now|list|verify`, the leader's scheduled backups, retention, and what a
//! damaged object or a leader killed mid-upload leaves.
//!
//! What real S3 and etcd refuse, and the doubles refuse too: moto keeps a
//! multipart upload open (and listed) until it is completed or aborted, as
//! S3 does; a snapshot is read back by the real `etcdctl`, which refuses one
//! whose trailing sha256 does not match (`etcdctl snapshot restore`, etcd
//! 3.4 `clientv3/snapshot/v3_snapshot.go`: "snapshot file integrity check
//! failed").

use kubeboot_tests::simcluster::{assert_ok, log_lines, SimCluster, SimNode};
use kubeboot_tests::termination::wait_leader;
use std::time::{Duration, Instant};

/// Writes `n` keys of about `size` bytes each through node 0's member.
pub(crate) async fn write_keys(sim: &SimCluster, n: usize, size: usize) {
    sim.put_keys(0, "/backup-test/", n, size).await;
}

/// Runs `kubeboot <args>` on a node; (exit code, stdout, stderr).
pub(crate) async fn kubeboot(
    sim: &SimCluster,
    node: &SimNode,
    args: &[&str],
) -> (Option<i32>, String, String) {
    run(sim, sim.command(node, args)).await
}

/// Runs `cmd` (a kubeboot command) to its end, its output kept with the
/// test's; (exit code, stdout, stderr).
pub(crate) async fn run(
    sim: &SimCluster,
    mut cmd: tokio::process::Command,
) -> (Option<i32>, String, String) {
    let out = cmd.output().await.expect("kubeboot runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stdout);
    sim.record_output(&stderr);
    (out.status.code(), stdout, stderr)
}

pub(crate) async fn get_object(sim: &SimCluster, key: &str) -> Vec<u8> {
    let out = sim
        .moto
        .s3()
        .await
        .get_object()
        .bucket(sim.bucket())
        .key(key)
        .send()
        .await
        .expect("get the snapshot");
    out.body.collect().await.expect("body").to_vec()
}

pub(crate) async fn put_object(sim: &SimCluster, key: &str, body: Vec<u8>) {
    sim.moto
        .s3()
        .await
        .put_object()
        .bucket(sim.bucket())
        .key(key)
        .body(body.into())
        .send()
        .await
        .expect("put");
}

/// Every object key in the bucket under `prefix`.
pub(crate) async fn keys_in_bucket(sim: &SimCluster, prefix: &str) -> Vec<String> {
    sim.moto
        .s3()
        .await
        .list_objects_v2()
        .bucket(sim.bucket())
        .prefix(prefix)
        .max_keys(1000)
        .send()
        .await
        .expect("list")
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

pub(crate) async fn open_uploads(sim: &SimCluster) -> usize {
    sim.moto
        .s3()
        .await
        .list_multipart_uploads()
        .bucket(sim.bucket())
        .send()
        .await
        .expect("list uploads")
        .uploads()
        .len()
}

/// `etcdctl snapshot status` of a snapshot file: (revision, total keys).
fn etcdctl_status(file: &std::path::Path) -> (i64, u64) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .output()
        .expect("etcdctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    (
        v["revision"].as_i64().expect("revision"),
        v["totalKey"].as_u64().expect("totalKey"),
    )
}

/// `etcdctl snapshot restore` into a scratch directory: whether etcd's own
/// tool accepts the file (it checks the trailing sha256).
fn etcdctl_restores(file: &std::path::Path) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("scratch");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir.path().join("restored"))
        .output()
        .expect("etcdctl runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_streams_verifies_and_lists_and_a_damaged_or_cut_copy_is_refused() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    // About 24 MiB: three parts of the upload (8 MiB each but the last).
    write_keys(&sim, 2000, 12 * 1024).await;
    let node = &sim.nodes[1];

    let (code, stdout, stderr) = kubeboot(&sim, node, &["backup", "now", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let taken: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let manifest = &taken["manifest"];
    let key = manifest["key"].as_str().expect("key").to_string();
    assert!(
        key.starts_with(&format!("etcd-snapshots/{}/", sim.name)),
        "{key}"
    );
    assert_eq!(taken["uri"], format!("s3://{}/{key}", sim.bucket()));
    assert_eq!(manifest["cluster"], sim.name.as_str());
    assert_eq!(manifest["trigger"], "manual");
    assert_eq!(manifest["generation"], 1);
    assert_eq!(open_uploads(&sim).await, 0, "the upload was completed");
    // A multipart object's ETag ends in its part count, as S3's does.
    let head = sim
        .moto
        .s3()
        .await
        .head_object()
        .bucket(sim.bucket())
        .key(&key)
        .send()
        .await
        .expect("head");
    let parts: u32 = head
        .e_tag()
        .and_then(|t| t.trim_matches('"').rsplit_once('-'))
        .and_then(|(_, n)| n.parse().ok())
        .expect("a multipart ETag");
    assert!(parts >= 3, "{parts} parts");

    // The object is etcd's snapshot, byte for byte as etcd's tools read it.
    let body = get_object(&sim, &key).await;
    assert_eq!(body.len() as u64, manifest["size"].as_u64().expect("size"));
    let file = sim.work.path().join("downloaded.db");
    std::fs::write(&file, &body).expect("write");
    etcdctl_restores(&file).expect("etcdctl restores the snapshot");
    let (revision, keys) = etcdctl_status(&file);
    assert!(keys >= 2000, "{keys} keys in the snapshot");
    assert!(revision >= manifest["revision"].as_i64().expect("revision"));

    let (code, stdout, stderr) =
        kubeboot(&sim, node, &["backup", "list", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let snapshots = listed["snapshots"].as_array().expect("snapshots");
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0]["manifest"]["sha256"], manifest["sha256"]);
    let (code, stdout, _) = kubeboot(&sim, node, &["backup", "list"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("verified") && stdout.contains(&key),
        "{stdout}"
    );

    let (code, stdout, stderr) = kubeboot(&sim, node, &["backup", "verify", "latest"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("verifies"), "{stdout}");
    let (code, _, stderr) = kubeboot(&sim, node, &["status"]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // A flipped byte, then a cut object: refused with the code, by etcd's
    // own tool too.
    let mut flipped = body.clone();
    flipped[body.len() / 2] ^= 0x40;
    let cut = body[..body.len() - 100].to_vec();
    for (what, damaged) in [("a flipped byte", flipped), ("a truncated object", cut)] {
        std::fs::write(&file, &damaged).expect("write");
        assert!(etcdctl_restores(&file).is_err(), "etcdctl restores {what}");
        put_object(&sim, &key, damaged).await;
        let (code, _, stderr) = kubeboot(&sim, node, &["backup", "verify", &key]).await;
        assert_eq!(code, Some(1), "{what}: {stderr}");
        assert!(stderr.contains("KB-BACKUP-004"), "{what}: {stderr}");
    }
    let (code, _, stderr) = kubeboot(
        &sim,
        node,
        &["backup", "verify", "s3://another-bucket/x.db"],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("KB-BACKUP-005"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_exactly_the_tiers_with_synthetic_timestamps() {
    let sim = SimCluster::start(1, 0).await;
    let loaded = kubeboot::config::load_offline(&kubeboot::config::LoadOptions {
        path: sim.nodes[0].config.clone(),
        user_data: kubeboot::config::UserData::Skip,
        env: vec![
            ("KUBEBOOT_NODE_ROLE".into(), "control-plane".into()),
            ("KUBEBOOT_BACKUP_KEEP_ALL_WITHIN".into(), "2h".into()),
            ("KUBEBOOT_BACKUP_KEEP_HOURLY".into(), "6".into()),
            ("KUBEBOOT_BACKUP_KEEP_DAILY".into(), "3".into()),
        ],
    })
    .await
    .expect("config");
    let bucket = kubeboot::aws::s3::Bucket::new(sim.moto.s3().await, sim.bucket(), None);
    let backups = kubeboot::backup::Backups::new(bucket, &loaded.config);
    // A snapshot every 15 minutes for five days, the newest a second before
    // `now`; each with a manifest but those from 20 and 30 hours ago, which
    // never got one (uploads that completed as their writer died).
    let now: u64 = 1_796_342_400;
    let prefix = format!("etcd-snapshots/{}/", sim.name);
    let mut ages = Vec::new();
    for i in 0..5 * 96u64 {
        let age = i * 900 + 1;
        let t = now - age;
        let stamp = kubeboot::backup::rfc3339(t).replace(['-', ':'], "");
        let key = format!("{prefix}{stamp}-00000000000000aa.db");
        put_object(&sim, &key, b"snapshot".to_vec()).await;
        if age != 20 * 3600 + 1 && age != 30 * 3600 + 1 {
            let manifest = serde_json::json!({
                "key": key, "cluster": sim.name, "generation": 1, "revision": 1,
                "member": "00000000000000aa", "sha256": "00", "size": 8,
                "agent_version": "test", "taken_at": kubeboot::backup::rfc3339(t),
                "taken_at_unix": t, "duration_ms": 1, "trigger": "scheduled",
            });
            put_object(
                &sim,
                &format!("{key}.json"),
                manifest.to_string().into_bytes(),
            )
            .await;
        }
        ages.push(age);
    }
    let deleted = backups.apply_retention(now).await.expect("retention");
    let left: Vec<u64> = backups
        .list()
        .await
        .expect("list")
        .iter()
        .map(|e| now - e.taken_at_unix)
        .collect();
    let mut want: Vec<u64> = (0..8).map(|i| i * 900 + 1).collect();
    want.extend((0..6).map(|h| h * 3600 + 1));
    want.extend((0..3).map(|d| d * 86_400 + 1));
    // An unverified one younger than a day's grace stays (its manifest may
    // still be on its way); the older one goes.
    want.push(20 * 3600 + 1);
    // Listed oldest first: ages from the largest down.
    want.sort();
    want.dedup();
    want.reverse();
    assert_eq!(left, want);
    assert_eq!(deleted.len(), ages.len() - want.len());
    // No manifest is left without its snapshot.
    let keys = keys_in_bucket(&sim, &prefix).await;
    for k in keys.iter().filter(|k| k.ends_with(".json")) {
        assert!(
            keys.iter().any(|s| s == k.trim_end_matches(".json")),
            "{k} without its snapshot"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_mid_upload_leaves_no_open_upload_and_the_next_leader_backs_up() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    write_keys(&sim, 500, 0).await;
    let daemon = |index: usize, stall: bool| {
        let mut cmd = sim.daemon_command(&sim.nodes[index]);
        cmd.env("KUBEBOOT_BACKUP_ENABLED", "true")
            .stderr(std::fs::File::create(sim.nodes[index].dir.join("daemon.log")).expect("log"));
        if stall {
            cmd.env("KBTEST_STALL_AT", "backup:after-part");
        }
        cmd.spawn().expect("daemon")
    };

    // The leader's first backup is due at once (none exists); it hangs
    // after uploading its part, and is killed there.
    let mut first = daemon(0, true);
    wait_leader(&sim, 0).await;
    let started = Instant::now();
    while open_uploads(&sim).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no upload started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log0 = sim.nodes[0].dir.join("daemon.log");
    while !std::fs::read_to_string(&log0)
        .unwrap_or_default()
        .contains("stalling on purpose")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never reached the part"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = first.start_kill();
    let _ = first.wait().await;
    assert_eq!(
        open_uploads(&sim).await,
        1,
        "the killed leader's upload is open"
    );

    // The next leader aborts it and takes its own.
    let mut second = daemon(1, false);
    wait_leader(&sim, 1).await;
    let log1 = sim.nodes[1].dir.join("daemon.log");
    let started = Instant::now();
    while !std::fs::read_to_string(&log1)
        .unwrap_or_default()
        .contains("etcd backup taken and verified")
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no backup by the next leader: {}",
            kubeboot_tests::simcluster::tail(&std::fs::read_to_string(&log1).unwrap_or_default())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(open_uploads(&sim).await, 0, "the orphan upload was aborted");
    let text = std::fs::read_to_string(&log1).expect("log");
    assert!(
        text.contains("aborting an upload a previous backup left open"),
        "{}",
        kubeboot_tests::simcluster::tail(&text)
    );
    let taken = log_lines(&text)
        .into_iter()
        .find(|l| l["message"] == "etcd backup taken and verified")
        .expect("taken");
    assert_eq!(taken["trigger"], "scheduled");
    // Its age is reported each period after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let docs = sim.metrics_documents();
    for metric in ["BackupDuration", "BackupSize"] {
        assert!(
            docs.iter().any(|d| d.get(metric).is_some()),
            "no {metric} in the EMF documents"
        );
    }
    // The age: 0 from the backup itself, then the loop's report each period.
    let ages = docs.iter().filter(|d| d.get("BackupAge").is_some()).count();
    assert!(ages >= 2, "{ages} BackupAge documents");
    let _ = second.start_kill();
    let _ = second.wait().await;
}

/// Waits until `log` has a line with `message` (and `trigger`, when given);
/// returns it.
async fn wait_log_line(
    log: &std::path::Path,
    message: &str,
    trigger: Option<&str>,
    within: Duration,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = log_lines(&text)
            .into_iter()
            .find(|l| l["message"] == message && trigger.is_none_or(|t| l["trigger"] == t))
        {
            return line;
        }
        assert!(
            started.elapsed() < within,
            "no {message:?} ({trigger:?}) within {within:?}: {}",
            kubeboot_tests::simcluster::tail(&text)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_snapshots_etcd_before_it_removes_a_dead_member() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let log = sim.nodes[0].dir.join("daemon.log");
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_BACKUP_ENABLED", "true")
        .env("KUBEBOOT_DAEMON_RECONCILE_GRACE", "10s")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("daemon");
    // The first scheduled backup (none exists yet), then node 2's instance
    // is lost with its etcd.
    wait_log_line(
        &log,
        "etcd backup taken and verified",
        Some("scheduled"),
        Duration::from_secs(60),
    )
    .await;
    kubeboot_tests::termination::instance_lost(&sim, 2).await;

    let removed = wait_log_line(&log, "etcd member removed", None, Duration::from_secs(90)).await;
    let before = wait_log_line(
        &log,
        "etcd backup taken and verified",
        Some("membership-change"),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        before["timestamp"].as_str() <= removed["timestamp"].as_str(),
        "the snapshot came after the removal: {before} / {removed}"
    );
    // Taken from a survivor, and verified in the bucket.
    let manifest = kubeboot_tests::simcluster::log_line(
        &std::fs::read_to_string(&log).expect("log"),
        "etcd backup taken and verified",
    );
    assert!(manifest["uri"]
        .as_str()
        .is_some_and(|u| u.starts_with("s3://")));
    let node = &sim.nodes[0];
    let (code, stdout, stderr) =
        kubeboot(&sim, node, &["backup", "list", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let triggers: Vec<&str> = listed["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .filter_map(|s| s["manifest"]["trigger"].as_str())
        .collect();
    assert!(triggers.contains(&"membership-change"), "{triggers:?}");
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_part_s3_refuses_aborts_the_upload_and_writes_no_manifest() {
    use kubeboot_tests::awsproxy::{AwsProxy, ProxyResponse};
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    write_keys(&sim, 100, 0).await;
    // S3 answers every UploadPart with a 500 (the SDK retries, then gives up).
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_handler(std::sync::Arc::new(|req| {
        req.query.contains("partNumber=").then(|| {
            ProxyResponse::new(
                500,
                "application/xml",
                "<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
            )
        })
    }));
    let out = sim
        .command(&sim.nodes[0], &["backup", "now"])
        .env("KUBEBOOT_AWS_ENDPOINTS_S3", proxy.endpoint())
        .env("KUBEBOOT_AWS_MAX_ATTEMPTS", "2")
        .output()
        .await
        .expect("kubeboot runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("KB-BACKUP-003"), "{stderr}");
    assert!(
        stderr.contains("aborted the failed backup's upload"),
        "{stderr}"
    );
    assert_eq!(open_uploads(&sim).await, 0, "no parts are left in S3");
    assert_eq!(
        keys_in_bucket(&sim, "").await,
        Vec::<String>::new(),
        "no snapshot and no manifest"
    );
    // The backup lock was released: the next backup goes ahead at once.
    let (code, _, stderr) = kubeboot(&sim, &sim.nodes[0], &["backup", "now"]).await;
    assert_eq!(code, Some(0), "{stderr}");
}
