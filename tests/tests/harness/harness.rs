//! The harness itself works: real etcd clusters form and change membership,
//! moto serves the real SDK, the IMDS double speaks IMDSv2, and no process
//! outlives its test — not even when the test panics.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use kubeboot_tests::etcd::EtcdCluster;
use kubeboot_tests::imds::{Imds, TOKEN_HEADER, TTL_HEADER};
use kubeboot_tests::moto::Moto;
use kubeboot_tests::net::http_request;
use kubeboot_tests::process::{pid_alive, ChildGuard};

/// Waits (bounded) for every pid to be gone; guards reap synchronously, so
/// this should succeed on the first check.
fn assert_all_dead(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    assert!(
        alive.is_empty(),
        "processes survived their guards: {alive:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_cluster_forms() {
    let cluster = EtcdCluster::start(3).await;
    let mut client = cluster.client().await;

    let list = client.member_list().await.expect("member_list");
    let members = list.members();
    assert_eq!(members.len(), 3, "{members:?}");
    for m in members {
        assert!(!m.name().is_empty(), "unnamed member {m:?}");
        assert!(
            !m.client_urls().is_empty(),
            "member without client URL {m:?}"
        );
        assert!(!m.is_learner(), "founding member is a learner {m:?}");
    }
    let mut names: Vec<&str> = members.iter().map(|m| m.name()).collect();
    names.sort_unstable();
    assert_eq!(names, ["m0", "m1", "m2"]);

    client.put("kbtest/key", "value", None).await.expect("put");
    let got = client.get("kbtest/key", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_can_be_added_stopped_and_killed() {
    let mut cluster = EtcdCluster::start(3).await;
    let learner = cluster.add_member(true).await;
    let info = cluster.member(learner);
    assert!(info.learner);
    let mut client = cluster.client().await;

    let list = client.member_list().await.expect("member_list");
    let added = list
        .members()
        .iter()
        .find(|m| m.id() == info.id)
        .expect("added member listed");
    assert!(added.is_learner());
    assert_eq!(added.name(), info.name);

    // Promotion waits (inside the harness) until the learner caught up.
    cluster.promote_member(learner).await;
    assert!(!cluster.member(learner).learner);
    // member_list is served from the answering member's (non-linearizable)
    // view, so a follower may show the promotion a moment late.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = client.member_list().await.expect("member_list");
        assert_eq!(list.members().len(), 4);
        if list.members().iter().all(|m| !m.is_learner()) {
            break;
        }
        assert!(Instant::now() < deadline, "promotion not visible: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stop the new member, bring it back from its data dir.
    let pid = info.pid.expect("added member runs");
    cluster.stop_member(learner);
    assert!(!pid_alive(pid), "stopped member {pid} still alive");
    assert_eq!(cluster.endpoints().len(), 3);
    cluster.start_member(learner).await;
    assert!(cluster.member(learner).pid.is_some());

    // Kill a founding member; 3 of 4 voters keep quorum.
    let victim = cluster.member(0).pid.expect("m0 runs");
    cluster.kill_member(0);
    assert!(!pid_alive(victim), "killed member {victim} still alive");
    // A put racing the leader's death is silently dropped by raft and times
    // out; etcd clients must retry, and so does this check.
    let mut client = cluster.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = client.put("kbtest/after-kill", "ok", None).await {
        assert!(
            Instant::now() < deadline,
            "no quorum after losing one of four voters: {e}\n{}",
            cluster.log_tails(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstarted_learner_shows_empty_name() {
    let mut cluster = EtcdCluster::start(1).await;
    let orphan = cluster.add_unstarted_member(true).await;
    let info = cluster.member(orphan);
    assert_eq!(info.pid, None);

    let list = cluster
        .client()
        .await
        .member_list()
        .await
        .expect("member_list");
    assert_eq!(list.members().len(), 2);
    let m = list
        .members()
        .iter()
        .find(|m| m.id() == info.id)
        .expect("orphan listed");
    assert!(m.is_learner());
    assert_eq!(m.name(), "", "an unstarted member has no name");
    assert!(m.client_urls().is_empty(), "{m:?}");
    assert_eq!(m.peer_urls(), [info.peer_url]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_on_moto_creates_and_lists_a_table() {
    let moto = Moto::start().await;
    let ddb = moto.dynamodb().await;
    let table = format!("kbtest-{}", uuid::Uuid::new_v4().simple());
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("attribute definition")
    };
    let key = |name: &str, kind| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .expect("key schema element")
    };
    ddb.create_table()
        .table_name(&table)
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create_table: {e:?}\n{}", moto.log_tail(20)));

    let tables = ddb.list_tables().send().await.expect("list_tables");
    assert!(
        tables.table_names().contains(&table),
        "{table} not in {:?}",
        tables.table_names()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_double_serves_identity_to_aws_config_imds_client() {
    let imds = Imds::start().await;
    let id = imds.identity().clone();
    let client = aws_config::imds::Client::builder()
        .endpoint(imds.endpoint())
        .expect("IMDS endpoint URL")
        .build();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let v = client
                .get(path)
                .await
                .unwrap_or_else(|e| panic!("IMDS get {path}: {e}"));
            v.as_ref().to_string()
        }
    };

    assert_eq!(get("/latest/meta-data/instance-id").await, id.instance_id);
    assert!(id.instance_id.starts_with("i-") && id.instance_id.len() == 19);
    assert_eq!(
        get("/latest/meta-data/local-ipv4").await,
        id.private_ip.to_string()
    );
    assert_eq!(
        get("/latest/meta-data/placement/availability-zone").await,
        id.availability_zone
    );
    assert_eq!(
        get("/latest/meta-data/autoscaling/target-lifecycle-state").await,
        "InService"
    );
    imds.set_lifecycle_state("Terminated");
    assert_eq!(
        get("/latest/meta-data/autoscaling/target-lifecycle-state").await,
        "Terminated"
    );
    imds.set_user_data(Some(b"#cloud-config\nkubeboot: {}\n".to_vec()));
    assert_eq!(
        get("/latest/user-data").await,
        "#cloud-config\nkubeboot: {}\n"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&get("/latest/dynamic/instance-identity/document").await)
            .expect("identity document is JSON");
    assert_eq!(doc["instanceId"], id.instance_id.as_str());
    assert_eq!(doc["region"], "us-east-1");
    assert_eq!(doc["version"], "2017-09-30");

    // Raw wire checks the SDK would never let us make.
    let ep = imds.endpoint();
    let r = http_request(&ep, "GET", "/latest/meta-data/instance-id", &[], b"")
        .await
        .expect("raw GET");
    assert_eq!(r.status, 401);
    assert!(r.body.is_empty());
    let r = http_request(&ep, "PUT", "/latest/api/token", &[], b"")
        .await
        .expect("raw PUT");
    assert_eq!(r.status, 400, "PUT without TTL header");
    for bad in ["0", "21601", "x"] {
        let r = http_request(&ep, "PUT", "/latest/api/token", &[(TTL_HEADER, bad)], b"")
            .await
            .expect("raw PUT");
        assert_eq!(r.status, 400, "TTL {bad}");
    }
    let r = http_request(
        &ep,
        "PUT",
        "/latest/api/token",
        &[(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.9")],
        b"",
    )
    .await
    .expect("raw PUT");
    assert_eq!(r.status, 403, "proxied token request");
    let r = http_request(&ep, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")], b"")
        .await
        .expect("raw PUT");
    assert_eq!(r.status, 200);
    assert_eq!(r.header(TTL_HEADER), Some("60"));
    let token = r.text();
    let with_token = [(TOKEN_HEADER, token.as_str())];
    let r = http_request(&ep, "GET", "/latest/meta-data/", &with_token, b"")
        .await
        .expect("raw GET");
    assert_eq!(r.status, 200);
    let listing = r.text();
    for key in ["instance-id", "local-ipv4", "placement/", "iam/"] {
        assert!(listing.lines().any(|l| l == key), "{key} in {listing:?}");
    }
    let r = http_request(&ep, "GET", "/latest/meta-data/nope", &with_token, b"")
        .await
        .expect("raw GET");
    assert_eq!(r.status, 404);
    let r = http_request(
        &ep,
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &with_token,
        b"",
    )
    .await
    .expect("raw GET");
    assert_eq!(r.text(), id.iam_role);
    imds.set_user_data(None);
    let r = http_request(&ep, "GET", "/latest/user-data", &with_token, b"")
        .await
        .expect("raw GET");
    assert_eq!(r.status, 404, "no user-data");
    imds.expire_tokens();
    let r = http_request(
        &ep,
        "GET",
        "/latest/meta-data/instance-id",
        &with_token,
        b"",
    )
    .await
    .expect("raw GET");
    assert_eq!(r.status, 401, "expired token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_double_fail_next_simulates_early_boot() {
    let imds = Imds::start().await;
    let ep = imds.endpoint();
    imds.fail_next(1);
    let r = http_request(&ep, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")], b"")
        .await
        .expect("raw PUT");
    assert_eq!(r.status, 503);

    imds.fail_next(2);
    let client = aws_config::imds::Client::builder()
        .endpoint(&ep)
        .expect("IMDS endpoint URL")
        .build();
    let id = client
        .get("/latest/meta-data/instance-id")
        .await
        .expect("the SDK retries through early-boot 503s");
    assert_eq!(id.as_ref(), imds.identity().instance_id);
    let statuses: Vec<u16> = imds.request_log().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&200));
    assert_eq!(imds.requests(), statuses.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_survives_its_guard() {
    let moto = Moto::start().await;
    let cluster = EtcdCluster::start(3).await;
    let mut pids = cluster.pids();
    pids.push(moto.pid());
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|p| pid_alive(*p)), "{pids:?}");

    drop(cluster);
    drop(moto);
    assert_all_dead(&pids);
}

#[test]
fn processes_die_even_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let cluster = EtcdCluster::start(3).await;
            tx.send(cluster.pids()).expect("send pids");
            panic!("deliberate panic while the cluster runs");
        })
    });
    assert!(worker.join().is_err(), "the worker was meant to panic");
    let pids = rx.recv().expect("pids were sent before the panic");
    assert_eq!(pids.len(), 3);
    assert_all_dead(&pids);
}

#[test]
fn child_guard_kills_the_whole_group_even_if_sigterm_is_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("sh.log");
    let mut cmd = std::process::Command::new("sh");
    // Ignored signals stay ignored across exec, so the grandchild `sleep`
    // shrugs off SIGTERM too: only the SIGKILL escalation can end them.
    cmd.args(["-c", "trap '' TERM; sleep 300 & echo $!; wait"]);
    let guard = ChildGuard::spawn("sh", cmd, &log)
        .expect("spawn sh")
        .with_grace(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(5);
    let grandchild: u32 = loop {
        if let Ok(pid) = guard.log_tail(1).trim().parse() {
            break pid;
        }
        assert!(Instant::now() < deadline, "sh never printed the sleep pid");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pids = [guard.pid(), grandchild];
    assert!(pids.iter().all(|p| pid_alive(*p)));

    let started = Instant::now();
    drop(guard);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "grace not honoured"
    );
    assert_all_dead(&pids);
}

/// The demo (`scripts/demo.sh` runs `kubeboot-sim`) with its restore act:
/// a backup, every control plane lost, `kubeboot restore` on a fresh one,
/// and every key counted back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_loses_its_control_planes_and_restores_every_key() {
    let sim = kubeboot_tests::workspace::target_debug_dir().join("kubeboot-sim");
    let out = tokio::process::Command::new(&sim)
        .env("KBSIM_CONTROL_PLANES", "1")
        .env("KBSIM_WORKERS", "1")
        .env("KBSIM_RESTORE", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("kubeboot-sim runs (cargo build --bins builds it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10000 of 10000 keys are back") && stdout.contains("every value intact"),
        "{stdout}"
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
}
