//! `kubeboot status` and `kubeboot lock release` as an operator runs them:
//! the real binary, its config pointing at moto_server.

use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{LockStore, Locker, Owner, Purpose};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{MemberRecord, Registry};
use kubeboot_tests::fixtures::{init_claim, lock_settings, MotoTable};
use kubeboot_tests::workspace::kubeboot_bin;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The operator's node: a control plane, whose instance role may release locks
/// (a worker's may not: `iam::OPERATIONS`).
fn write_config(dir: &Path, moto: &str, table: &str, cluster: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\nname = \"{cluster}\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"api:6443\"\n\
             [node]\nrole = \"control-plane\"\n[backup]\nenabled = false\n\
             [aws]\ntable = \"{table}\"\nregion = \"us-east-1\"\nmax_attempts = 2\n[aws.endpoints]\ndynamodb = \"{moto}\"\n\
             [lock]\nlease = \"3s\"\nmargin = \"1s\"\n"
        ),
    )
    .expect("write config");
    path.display().to_string()
}

async fn kubeboot(config: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(kubeboot_bin());
    cmd.env_clear()
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args(args)
        .args(["--no-user-data", "--log-format", "text", "--config", config]);
    cmd.output().await.expect("kubeboot runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_record_holders_and_members_and_release_guards_live_locks() {
    let MotoTable {
        moto,
        dynamodb: client,
        table,
        ..
    } = MotoTable::start().await;
    let cluster = "ops";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &moto.endpoint(), &table, cluster);

    let store = Arc::new(DynamoLockStore::new(client.clone(), &table, cluster));
    let settings = lock_settings(
        Duration::from_secs(3),
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let locker = Locker::new(store.clone(), Owner::new("i-0123456789abcdef0"), settings);
    let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
        client.clone(),
        &table,
        cluster,
    )));
    let init = locker.acquire(Purpose::Init).await.expect("init lock");
    let state = registry.state().await.expect("state");
    let claim = init_claim("run-42", "i-0123456789abcdef0", "api:6443");
    let generation = registry
        .begin_init(&init, &state, &claim)
        .await
        .expect("begin");
    registry
        .mark_initialized(&init, generation, "run-42", SystemTime::now())
        .await
        .expect("finish");
    let member = MemberRecord {
        instance_id: "i-0123456789abcdef0".into(),
        member_id: 0x8e9e_05c5_2164_694d,
        name: "ip-10-0-1-2".into(),
        peer_url: "https://10.0.1.2:2380".into(),
        confirmed_at: UNIX_EPOCH + Duration::from_secs(1_790_000_000),
    };
    registry
        .record_member(&init, &member)
        .await
        .expect("member");
    init.release().await.expect("release init");
    let membership = locker
        .acquire(Purpose::Membership)
        .await
        .expect("membership lock");

    let out = kubeboot(&config, &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("phase initialized  generation 1  kubernetes 1.31.2"),
        "{status}"
    );
    assert!(
        status.contains("initialized by i-0123456789abcdef0  run run-42"),
        "{status}"
    );
    assert!(status.contains("init        free"), "{status}");
    assert!(
        status.contains("membership  held by i-0123456789abcdef0/"),
        "{status}"
    );
    assert!(status.contains("leader      never taken"), "{status}");
    assert!(
        status.contains("member 8e9e05c52164694d  ip-10-0-1-2"),
        "{status}"
    );

    let out = kubeboot(&config, &["status", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["state"]["init_run_id"], "run-42");
    assert_eq!(v["locks"][1]["status"], "held");
    assert_eq!(v["members"][0]["member_id"], "8e9e05c52164694d");

    let out = kubeboot(&config, &["lock", "release", "--purpose", "membership"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "no --force is a usage error: {}",
        text(&out)
    );
    assert!(text(&out).contains("without --force"));

    let out = kubeboot(
        &config,
        &["lock", "release", "--purpose", "membership", "--force"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a live holder renews while we watch: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("renewed its lease while we watched"),
        "{}",
        text(&out)
    );
    assert!(membership.is_held());

    let fence = membership.fence().expect("held").value;
    drop(membership); // the holder dies without releasing
    let out = kubeboot(
        &config,
        &["lock", "release", "--purpose", "membership", "--force"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("fence now {}", fence + 1)),
        "{}",
        text(&out)
    );
    let item = store
        .read(Purpose::Membership)
        .await
        .expect("read")
        .expect("item");
    assert!(item.released);
}
