//! The dead-member reconciler, run by the leader daemon: an instance that
//! vanished without a lifecycle message loses its member after the grace
//! period (not before); an orphan learner goes at once.

use kubeboot_tests::simcluster::{assert_ok, SimCluster};
use std::time::{Duration, Instant};

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_lost_without_a_message_is_removed_after_the_grace_period() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_DAEMON_RECONCILE_GRACE", "10s")
        .spawn()
        .expect("daemon");

    // Node 2's instance is terminated with no message: its etcd dies with it.
    let victim = &sim.nodes[2];
    kubeboot_tests::termination::instance_lost(&sim, 2).await;
    let lost = Instant::now();

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        sim.etcd_members(&[0, 1]).await.len(),
        3,
        "nothing is removed before the grace period"
    );
    let registry = sim.registry().await;
    wait_for(
        "the dead member removed",
        Duration::from_secs(60),
        async || sim.etcd_members(&[0, 1]).await.len() == 2,
    )
    .await;
    let took = lost.elapsed();
    eprintln!("instance lost to member removed: {took:?}");
    assert!(took >= Duration::from_secs(10), "{took:?}");
    // The record goes right after the member (removal first, so a crash in
    // between leaves a record the next pass cleans up, never a member
    // without one): wait for it too, not only for etcd.
    wait_for(
        "the dead member's record removed",
        Duration::from_secs(10),
        async || registry.members().await.expect("records").len() == 2,
    )
    .await;
    let records = registry.members().await.expect("records");
    assert!(records
        .iter()
        .all(|r| r.instance_id != victim.instance_id()));

    // An orphan learner (a join that died after member add) goes at once.
    sim.add_orphan_learner(0).await;
    let took = wait_for(
        "the orphan learner removed",
        Duration::from_secs(30),
        async || sim.etcd_members(&[0, 1]).await.len() == 2,
    )
    .await;
    assert!(
        took < Duration::from_secs(10),
        "no grace for orphan learners: {took:?}"
    );
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ec2_answer_that_does_not_show_the_leader_running_removes_nothing() {
    use kubeboot_tests::awsproxy::{AwsProxy, ProxyResponse};
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    // EC2 answers DescribeInstances with no reservations at all, as it does
    // when asked in the wrong region or by a lagging replica.
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    proxy.set_handler(std::sync::Arc::new(|req| {
        (req.param("Action") == Some("DescribeInstances")).then(|| {
            ProxyResponse::xml(
                200,
                "<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                 <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>\
                 <reservationSet/></DescribeInstancesResponse>",
            )
        })
    }));
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_DAEMON_RECONCILE_GRACE", "10s")
        .env("KUBEBOOT_AWS_ENDPOINTS_EC2", proxy.endpoint())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("daemon");
    let started = Instant::now();
    // Well past the grace period (10 s, the least allowed).
    while started.elapsed() < Duration::from_secs(25) {
        assert_eq!(
            sim.etcd_members(&[0, 1, 2]).await.len(),
            3,
            "a member was removed on EC2's empty answer"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        sim.registry().await.members().await.expect("records").len(),
        3
    );
    let _ = daemon.start_kill();
    let out = daemon.wait_with_output().await.expect("daemon output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&stderr);
    assert!(
        kubeboot_tests::simcluster::log_lines(&stderr)
            .iter()
            .any(|l| l["code"] == "KB-RECON-002"),
        "no KB-RECON-002 line in\n{}",
        kubeboot_tests::simcluster::tail(&stderr)
    );
    assert!(!proxy.log_for("DescribeInstances").is_empty());
}

/// The leader stopped (SIGTERM) while its reconciler holds the membership
/// lock, waiting on EC2: the turn is let finish within the stop grace, so
/// the lock is released, not left to block the next join or removal until
/// its lease runs out.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_mid_reconcile_releases_the_membership_lock() {
    use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    // EC2 holds every DescribeInstances until the agent's attempt times out.
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    let mut plan = FaultPlan::always(FaultKind::Timeout).only(&["DescribeInstances"]);
    plan.timeout_duration = Duration::from_secs(30);
    proxy.set_faults(plan);
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_AWS_ENDPOINTS_EC2", proxy.endpoint())
        .env("KUBEBOOT_AWS_ATTEMPT_TIMEOUT", "4s")
        .env("KUBEBOOT_AWS_MAX_ATTEMPTS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("daemon");
    let started = Instant::now();
    while proxy.log_for("DescribeInstances").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the reconciler never asked EC2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The reconciler is inside its locked section now.
    let (code, stderr) = kubeboot_tests::simcluster::sigterm_and_wait(&mut daemon).await;
    sim.record_output(&stderr);
    assert_eq!(
        code,
        Some(0),
        "{}",
        kubeboot_tests::simcluster::tail(&stderr)
    );
    let lock = kubeboot::lock::LockStore::read(
        &kubeboot::lock::dynamo::DynamoLockStore::new(
            sim.moto.dynamodb().await,
            &sim.table,
            &sim.name,
        ),
        kubeboot::lock::Purpose::Membership,
    )
    .await
    .expect("read the lock")
    .expect("the reconciler took it");
    assert!(
        lock.released,
        "the membership lock was left held after SIGTERM: {lock:?}\n{}",
        kubeboot_tests::simcluster::tail(&stderr)
    );
}
