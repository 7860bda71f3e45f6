//! Terminations through the lifecycle queue, handled by the leader daemon:
//! a control plane leaves etcd under the quorum guard, its record and Node
//! go, and the action is completed exactly once; a worker is drained
//! (PodDisruptionBudgets honoured until the drain deadline, then the action
//! is completed anyway) and its Node deleted.

use kubeboot_tests::simcluster::{assert_ok, SimCluster};
use kubeboot_tests::termination::{
    assert_nothing_removed, assert_refused, crashes_at, host_dies, log_line, log_lines, tail,
    wait_leader, Terminations as Lifecycle,
};
use std::time::{Duration, Instant};

const ASG: &str = "kb-control-plane";

/// The name of node `index`'s Node, found by the providerID that names its
/// instance.
fn node_of(sim: &SimCluster, index: usize) -> String {
    let instance = sim.nodes[index].instance_id();
    sim.kubeapi
        .nodes()
        .into_iter()
        .find(|n| {
            n["spec"]["providerID"]
                .as_str()
                .is_some_and(|p| p.ends_with(&instance))
        })
        .and_then(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .expect("the Node carries its instance's providerID")
}

/// The `default` namespace's Pods, through a kube client of the API double
/// (kube's own retries off, as the agent has them).
fn default_pods(sim: &SimCluster) -> kube::Api<k8s_openapi::api::core::v1::Pod> {
    let mut config = kube::Config::new(sim.kubeapi.url().parse().expect("url"));
    config.default_retry = false;
    kube::Api::namespaced(
        kube::Client::try_from(config).expect("kube client"),
        "default",
    )
}

/// Three bootstrapped control planes and the terminations machinery, its
/// leader daemon on node 0 draining for up to 30 s.
async fn three_control_planes() -> (SimCluster, Lifecycle) {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    (sim, lifecycle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminating_control_plane_leaves_etcd_and_its_action_is_completed_once() {
    let (sim, lifecycle) = three_control_planes().await;
    let victim = &sim.nodes[2];
    assert_eq!(sim.kubeapi.nodes().len(), 3);

    // The ASG terminates node 2: its host goes (etcd stops), the message comes.
    host_dies(&sim, 2);
    let token = lifecycle.terminate(ASG, &victim.instance_id()).await;
    let took = lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    eprintln!("message to completion: {took:?}");

    let members = sim.etcd_members(&[0, 1]).await;
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members
        .iter()
        .all(|m| !m.peer_urls[0].contains(&victim.ip())));
    let records = sim.registry().await.members().await.expect("records");
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.instance_id != victim.instance_id()));
    assert_eq!(sim.kubeapi.nodes().len(), 2, "the Node is deleted");
    assert_eq!(lifecycle.accepted_completions(&victim.instance_id()), 1);

    // The same message again (a new leader re-receiving it) changes nothing:
    // AWS refuses the second completion, which counts as done.
    lifecycle.send(ASG, &victim.instance_id(), &token).await;
    lifecycle.wait_queue_empty().await;
    assert_eq!(lifecycle.accepted_completions(&victim.instance_id()), 1);
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 2);
    assert_eq!(
        sim.registry().await.members().await.expect("records").len(),
        2
    );
    let stderr = lifecycle.stop(&sim).await;
    assert!(
        stderr.contains("lifecycle action completed"),
        "{}",
        tail(&stderr)
    );
    // Metered: both handlings (the completion and the re-delivery AWS
    // refused as already done) count as completed; none failed.
    let docs = sim.metrics_documents();
    assert_eq!(sum(&docs, "LifecycleActionsCompleted"), 2.0);
    assert_eq!(sum(&docs, "LifecycleActionsFailed"), 0.0);
}

/// Between its turns the leader long-polls the queue: a termination is
/// handled when its event arrives, not at the next turn (here 10 minutes
/// away), as the Lambda this replaces ran on the event.
#[tokio::test(flavor = "multi_thread")]
async fn a_termination_is_handled_on_arrival_while_the_next_turn_is_minutes_away() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let wiring = kubeboot_tests::termination::Wiring {
        env: vec![
            ("KUBEBOOT_DAEMON_PERIOD", "10m".into()),
            ("KUBEBOOT_DAEMON_JITTER", "0s".into()),
        ],
        ..Default::default()
    };
    let lifecycle = Lifecycle::start_with(&sim, "30s", wiring).await;
    wait_leader(&sim, 0).await;
    // The first whole turn ran when it started leading; the next is 10
    // minutes off. Give the first turn time to end (the wait starts then).
    tokio::time::sleep(Duration::from_secs(3)).await;

    host_dies(&sim, 2);
    let token = lifecycle.terminate(ASG, &sim.nodes[2].instance_id()).await;
    lifecycle
        .wait_completed(&token, Duration::from_secs(90))
        .await;
    assert_removed_once(&sim, &lifecycle, 2, &[0, 1]).await;
    let stderr = lifecycle.stop(&sim).await;
    let arrived = log_lines(&stderr)
        .into_iter()
        .filter(|l| l["message"] == "lifecycle messages arrived between turns; handling them now")
        .count();
    assert_eq!(arrived, 1, "{}", tail(&stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_notice_for_a_control_plane_in_service_is_refused_and_nothing_is_removed() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    // An unconfirmed notice is kept until AWS's longest hook timeout (2 h),
    // shortened here to 5 s (tests/tests/daemon/lifecycle_deferral.rs).
    let wiring = kubeboot_tests::termination::Wiring {
        env: vec![("KBTEST_HOOK_HEARTBEAT_TIMEOUT_MS", "5000".into())],
        ..Default::default()
    };
    let lifecycle = Lifecycle::start_with(&sim, "30s", wiring).await;
    let victim = sim.nodes[2].instance_id();
    lifecycle.actions.in_service(ASG, &victim);

    // Any node may send to the queue; this notice names a healthy control
    // plane that Auto Scaling is not terminating.
    lifecycle
        .send(ASG, &victim, "11111111-2222-3333-4444-555555555555")
        .await;
    lifecycle.wait_queue_empty().await;

    assert_nothing_removed(&sim).await;
    assert!(
        lifecycle.completions(&victim).is_empty(),
        "no completion attempted"
    );
    let stderr = lifecycle.stop(&sim).await;
    // Auto Scaling still reports the instance InService.
    assert_refused(&stderr, "KB-LIFE-004", "InService");
}

/// The total of `metric` over documents.
fn sum(docs: &[serde_json::Value], metric: &str) -> f64 {
    docs.iter().filter_map(|d| d[metric].as_f64()).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_completions_are_retried_by_the_sdk_counted_and_completed_once_aws_answers() {
    use kubeboot_tests::awsproxy::{FaultKind, FaultPlan};
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let lifecycle = Lifecycle::start(&sim, "5s").await;
    lifecycle
        .proxy
        .set_faults(FaultPlan::always(FaultKind::Throttle).only(&["CompleteLifecycleAction"]));
    let worker = sim.nodes[1].instance_id();
    let token = lifecycle.terminate("kb-workers", &worker).await;
    let started = Instant::now();
    loop {
        let docs = kubeboot_tests::emf::validate_all(&sim.nodes[0].metrics_text());
        if sum(&docs, "LifecycleActionsFailed") >= 1.0 {
            assert!(
                docs.iter().any(|d| d["Kind"] == "aws" && d["Retries"] == 1),
                "the SDK's retries of the throttled call are counted"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no failure counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lifecycle.proxy.set_faults(FaultPlan::default());
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    assert_eq!(lifecycle.accepted_completions(&worker), 1);
    let stderr = lifecycle.stop(&sim).await;
    let docs = sim.metrics_documents();
    assert!(sum(&docs, "LifecycleActionsCompleted") >= 1.0);
    // The failed turn's error line carries its catalogue code for `kubeboot explain`.
    let failed: Vec<serde_json::Value> = log_lines(&stderr)
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("termination not completed"))
        })
        .collect();
    assert!(
        !failed.is_empty(),
        "no failed-turn line in\n{}",
        tail(&stderr)
    );
    for line in &failed {
        assert_eq!(line["code"], "KB-LIFE-002", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_is_drained_past_what_a_disruption_budget_allows_until_the_deadline() {
    use k8s_openapi::api::core::v1::Pod;
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let worker = &sim.nodes[1];
    let node_name = node_of(&sim, 1);
    let pods = default_pods(&sim);
    let pod = |name: &str, extra: serde_json::Value| -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]},
        });
        kubeboot_tests::kubeapi::merge_patch(&mut v, &extra);
        serde_json::from_value(v).expect("pod")
    };
    for p in [
        pod("web", serde_json::json!({})),
        pod(
            "db",
            serde_json::json!({"metadata": {"annotations": {kubeboot_tests::kubeapi::EVICTION_BLOCKED_ANNOTATION: "blocked"}}}),
        ),
        pod(
            "logs",
            serde_json::json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "logs", "uid": "u1", "controller": true}]}}),
        ),
    ] {
        pods.create(&kube::api::PostParams::default(), &p)
            .await
            .expect("create pod");
    }

    let lifecycle = Lifecycle::start(&sim, "5s").await;
    let token = lifecycle
        .terminate("kb-workers", &worker.instance_id())
        .await;
    let took = lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    assert!(
        took >= Duration::from_secs(5),
        "the drain kept trying until its deadline ({took:?})"
    );
    let names: Vec<String> = pods
        .list(&kube::api::ListParams::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(!names.contains(&"web".to_string()), "evicted: {names:?}");
    assert!(
        names.contains(&"db".to_string()),
        "the budget held: {names:?}"
    );
    assert!(
        names.contains(&"logs".to_string()),
        "DaemonSet pods stay: {names:?}"
    );
    assert!(
        sim.kubeapi
            .object(&format!("/api/v1/nodes/{node_name}"))
            .is_none(),
        "the Node is deleted"
    );
    assert_eq!(lifecycle.accepted_completions(&worker.instance_id()), 1);
    let stderr = lifecycle.stop(&sim).await;
    assert!(
        stderr.contains("drain deadline passed; completing the lifecycle action anyway"),
        "{}",
        tail(&stderr)
    );
    assert_eq!(
        sum(&sim.metrics_documents(), "DrainFailures"),
        1.0,
        "the drain that left a Pod behind is counted"
    );
}

/// After a control plane's termination: etcd, the records and the Nodes no
/// longer have it, and its action was completed exactly once.
async fn assert_removed_once(
    sim: &SimCluster,
    lifecycle: &Lifecycle,
    victim: usize,
    survivors: &[usize],
) {
    let victim = &sim.nodes[victim];
    let members = sim.etcd_members(survivors).await;
    assert_eq!(members.len(), survivors.len(), "{members:?}");
    assert!(members
        .iter()
        .all(|m| !m.peer_urls[0].contains(&victim.ip())));
    let records = sim.registry().await.members().await.expect("records");
    assert_eq!(records.len(), survivors.len(), "{records:?}");
    assert!(records
        .iter()
        .all(|r| r.instance_id != victim.instance_id()));
    assert_eq!(
        sim.kubeapi.nodes().len(),
        survivors.len(),
        "the Node is deleted"
    );
    assert_eq!(lifecycle.accepted_completions(&victim.instance_id()), 1);
}

/// The removal path's crash matrix: the leader dies at each step, restarts,
/// and the termination converges with one completion.
async fn leader_crashes_at(point: &str) {
    let (sim, mut lifecycle) = three_control_planes().await;
    // Replace the plain daemon by one that crashes at `point`.
    let _ = lifecycle.daemon.start_kill();
    let _ = lifecycle.daemon.wait().await;
    lifecycle.daemon = lifecycle.daemon_on(&sim, 0, Some(point));
    host_dies(&sim, 2);
    let token = lifecycle.terminate(ASG, &sim.nodes[2].instance_id()).await;
    crashes_at(&mut lifecycle.daemon, point).await;
    lifecycle.daemon = lifecycle.daemon_on(&sim, 0, None);
    lifecycle
        .wait_completed_or_done(&token, Duration::from_secs(90))
        .await;
    lifecycle.wait_queue_empty().await;
    assert_removed_once(&sim, &lifecycle, 2, &[0, 1]).await;
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_crashes_after_removing_the_member() {
    leader_crashes_at("membership:after-etcd-remove").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_crashes_after_cleanup_before_completing() {
    leader_crashes_at("lifecycle:after-cleanup").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_crashes_after_completing_before_deleting_the_message() {
    leader_crashes_at("lifecycle:after-complete").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_daemon_takes_over_when_the_leader_dies_mid_removal() {
    let (sim, mut lifecycle) = three_control_planes().await;
    let _ = lifecycle.daemon.start_kill();
    let _ = lifecycle.daemon.wait().await;
    lifecycle.daemon = lifecycle.daemon_on(&sim, 0, Some("membership:after-etcd-remove"));
    wait_leader(&sim, 0).await;
    let mut follower = lifecycle.daemon_on(&sim, 1, None);

    host_dies(&sim, 2);
    let sent = Instant::now();
    let token = lifecycle.terminate(ASG, &sim.nodes[2].instance_id()).await;
    crashes_at(&mut lifecycle.daemon, "membership:after-etcd-remove").await;
    lifecycle
        .wait_completed_or_done(&token, Duration::from_secs(90))
        .await;
    eprintln!(
        "message to completion across a leader failover: {:?}",
        sent.elapsed()
    );
    wait_leader(&sim, 1).await;
    lifecycle.wait_queue_empty().await;
    assert_removed_once(&sim, &lifecycle, 2, &[0, 1]).await;

    // The new leader stops cleanly; the dead one's place is taken by it.
    std::mem::swap(&mut lifecycle.daemon, &mut follower);
    let _ = follower.start_kill();
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_that_sees_its_own_termination_in_imds_cleans_up_and_completes() {
    let (sim, lifecycle) = three_control_planes().await;
    let mut own = lifecycle.daemon_on(&sim, 2, None);
    let victim = &sim.nodes[2];
    lifecycle
        .actions
        .declare_hook(ASG, kubeboot_tests::termination::HOOK);
    let token = lifecycle.actions.register(
        kubeboot_tests::lifecycle_actions::PendingAction::terminating(
            ASG,
            kubeboot_tests::termination::HOOK,
            &victim.instance_id(),
        ),
    );
    // No queue message: only IMDS tells the node.
    victim.imds.set_tag("aws:autoscaling:groupName", ASG);
    victim.imds.set_lifecycle_state("Terminated");
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 2);
    let records = sim.registry().await.members().await.expect("records");
    assert!(records
        .iter()
        .all(|r| r.instance_id != victim.instance_id()));
    assert_eq!(sim.kubeapi.nodes().len(), 2, "its Node is deleted");
    assert_eq!(lifecycle.accepted_completions(&victim.instance_id()), 1);
    let _ = own.start_kill();
    let _ = own.wait().await;
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_sees_its_own_termination_asks_the_leader_to_drain_it() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    let mut own = lifecycle.daemon_on(&sim, 1, None);
    let worker = &sim.nodes[1];
    lifecycle
        .actions
        .declare_hook("kb-workers", kubeboot_tests::termination::HOOK);
    let token = lifecycle.actions.register(
        kubeboot_tests::lifecycle_actions::PendingAction::terminating(
            "kb-workers",
            kubeboot_tests::termination::HOOK,
            &worker.instance_id(),
        ),
    );
    worker
        .imds
        .set_tag("aws:autoscaling:groupName", "kb-workers");
    worker.imds.set_lifecycle_state("Terminated");
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    assert_eq!(sim.kubeapi.nodes().len(), 1, "the worker's Node is deleted");
    assert_eq!(lifecycle.accepted_completions(&worker.instance_id()), 1);
    let _ = own.start_kill();
    let _ = own.wait().await;
    lifecycle.stop(&sim).await;
}

/// Lifecycle tests whose daemon heartbeats every 10 s (the least allowed;
/// also the queue's visibility period) with some AWS services behind the
/// proxy.
fn wired(through_proxy: &[&'static str]) -> kubeboot_tests::termination::Wiring {
    kubeboot_tests::termination::Wiring {
        lifecycle_heartbeat: "10s",
        through_proxy: through_proxy.to_vec(),
        ..Default::default()
    }
}

/// The daemon's heartbeat (and visibility) period in these tests.
const PERIOD: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn a_termination_that_fails_early_leaves_no_heartbeat_behind() {
    use kubeboot_tests::awsproxy::{FaultKind, FaultPlan};
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let lifecycle = Lifecycle::start_with(&sim, "5s", wired(&["dynamodb"])).await;
    let worker = "i-0a1b2c3d4e5f60718";
    kubeboot_tests::termination::blocked_worker(&sim, worker).await;

    // Every read of the member records fails (500): each handling of the
    // message fails right after it began, turn after turn.
    lifecycle
        .proxy
        .set_faults(FaultPlan::always(FaultKind::ServerError).only(&["Query"]));
    let token = lifecycle.terminate("kb-workers", worker).await;
    let started = Instant::now();
    while lifecycle.proxy.stats().server_errors == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no Query failed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    lifecycle.proxy.clear_faults();
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    let completed = lifecycle
        .completions(worker)
        .iter()
        .find(|c| c.accepted())
        .map(|c| c.at)
        .expect("the accepted completion");

    // Nothing of the failed handlings still runs: no heartbeat comes after
    // the completion (a request already in flight may land just after it).
    tokio::time::sleep(2 * PERIOD + Duration::from_secs(2)).await;
    let late = lifecycle.heartbeats_after(worker, completed + Duration::from_secs(1));
    assert!(
        late.is_empty(),
        "heartbeats after the completion: {late:#?}"
    );
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_loses_its_lock_mid_drain_stops_heartbeating_and_lets_the_message_go() {
    use kubeboot_tests::awsproxy::{FaultKind, FaultPlan};
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let lifecycle = Lifecycle::start_with(&sim, "60s", wired(&["dynamodb"])).await;
    let worker = "i-0b1b2c3d4e5f60718";
    kubeboot_tests::termination::blocked_worker(&sim, worker).await;
    let token = lifecycle.terminate("kb-workers", worker).await;
    // The drain is under way (a budget holds its Pod) once heartbeats come.
    let started = Instant::now();
    while lifecycle
        .heartbeats_after(worker, Duration::ZERO)
        .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no heartbeat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // DynamoDB stops answering the leader's renewals (they time out; a
    // partition, not a refusal, so the daemon's log stays quiet and its
    // piped stderr never fills): after lease - margin (4 s) the daemon is no
    // leader any more and its turn is dropped mid-drain.
    lifecycle
        .proxy
        .set_faults(FaultPlan::always(FaultKind::Timeout).only(&["UpdateItem"]));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let lost = lifecycle.actions.now();
    let dropped = Instant::now();
    while lifecycle.visible_messages().await == 0 {
        assert!(
            dropped.elapsed() < PERIOD + Duration::from_secs(2),
            "the message is still hidden one period after the turn was lost"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep((2 * PERIOD + Duration::from_secs(1)).saturating_sub(dropped.elapsed()))
        .await;
    let late = lifecycle.heartbeats_after(worker, lost);
    assert!(late.is_empty(), "heartbeats after the lost turn: {late:#?}");
    assert_eq!(
        lifecycle.actions.state(&token),
        Some(kubeboot_tests::lifecycle_actions::ActionState::Pending),
        "not completed by a daemon that no longer leads"
    );
    lifecycle.proxy.clear_faults();
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_terminating_workers_is_heartbeated_from_receipt_and_drained_together() {
    use kubeboot_tests::lifecycle_actions::PendingAction;
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let lifecycle = Lifecycle::start_with(&sim, "6s", wired(&[])).await;
    let workers = [
        "i-0c1b2c3d4e5f60711",
        "i-0c1b2c3d4e5f60712",
        "i-0c1b2c3d4e5f60713",
        "i-0c1b2c3d4e5f60714",
    ];
    for w in workers {
        kubeboot_tests::termination::blocked_worker(&sim, w).await;
    }
    // A scale-in of four: each drain lasts its whole 6 s deadline (a budget
    // holds a Pod), and each action dies 14 s after its last heartbeat (the
    // daemon's period is 10 s): one after another, the third and fourth
    // would start after their actions had died.
    let mut tokens = Vec::new();
    for w in workers {
        tokens.push(
            lifecycle
                .terminate_action(
                    PendingAction::terminating("kb-workers", kubeboot_tests::termination::HOOK, w)
                        .with_heartbeat_timeout(Duration::from_secs(14)),
                )
                .await,
        );
    }
    let started = Instant::now();
    for token in &tokens {
        lifecycle
            .wait_completed(token, Duration::from_secs(60))
            .await;
    }
    let took = started.elapsed();
    eprintln!("four drains of 6 s each: {took:?}");
    assert!(
        took < Duration::from_secs(18),
        "drained together, not one after another: {took:?}"
    );
    for w in workers {
        assert_eq!(lifecycle.accepted_completions(w), 1, "{w}");
    }
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_terminated_from_two_leaves_etcd_first_and_the_survivor_keeps_quorum() {
    let sim = SimCluster::start(2, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    let victim = &sim.nodes[1];
    // The ASG terminates node 1 (scale-in or replacement): it still runs
    // while its action waits.
    let token = lifecycle.terminate(ASG, &victim.instance_id()).await;
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    let members = sim.etcd_members(&[0]).await;
    assert_eq!(
        members.len(),
        1,
        "the terminating member left before its action was completed: {members:?}"
    );
    // Then the instance goes; the survivor alone is the cluster and writes.
    host_dies(&sim, 1);
    let mut etcd = sim.etcd_client(0).await;
    let died = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), etcd.put("kb-test", "alive", None)).await
        {
            Ok(Ok(_)) => break,
            other => {
                let status = tokio::time::timeout(Duration::from_secs(2), etcd.status()).await;
                eprintln!(
                    "put after {:?}: {other:?}; status {status:?}",
                    died.elapsed()
                );
                assert!(
                    died.elapsed() < Duration::from_secs(30),
                    "the survivor never commits"
                );
            }
        }
    }
    eprintln!(
        "the survivor commits {:?} after the other host died",
        died.elapsed()
    );
    let records = sim.registry().await.members().await.expect("records");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(lifecycle.accepted_completions(&victim.instance_id()), 1);
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_for_an_instance_no_auto_scaling_group_holds_is_refused() {
    let (sim, lifecycle) = three_control_planes().await;
    let victim = sim.nodes[2].instance_id();
    lifecycle
        .actions
        .declare_hook(ASG, kubeboot_tests::termination::HOOK);
    // Auto Scaling does not know the instance at all (launched outside any
    // group, or the notice is made up).
    lifecycle
        .send(ASG, &victim, "11111111-2222-3333-4444-555555555555")
        .await;
    lifecycle.wait_queue_empty().await;
    assert_nothing_removed(&sim).await;
    let stderr = lifecycle.stop(&sim).await;
    let refused = log_line(&stderr, "lifecycle message refused and deleted");
    assert_eq!(refused["code"], "KB-LIFE-005", "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminating_control_plane_without_a_member_record_still_leaves_etcd() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let victim = sim.nodes[2].instance_id();
    // Its record is gone (deleted by hand, or never written: a crash
    // between the join and the record).
    {
        let registry = sim.registry().await;
        let guard = sim
            .locker("test-operator")
            .await
            .acquire(kubeboot::lock::Purpose::Membership)
            .await
            .expect("membership lock");
        registry
            .forget_member(&guard, &victim)
            .await
            .expect("forget the record");
        guard.release().await.expect("release");
    }
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    host_dies(&sim, 2);
    let token = lifecycle.terminate(ASG, &victim).await;
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    let members = sim.etcd_members(&[0, 1]).await;
    assert_eq!(members.len(), 2, "its member is removed: {members:?}");
    assert_eq!(sim.kubeapi.nodes().len(), 2, "its Node is deleted");
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_terminated_while_no_leader_read_the_queue_still_leaves_etcd_and_its_node_goes(
) {
    let (sim, lifecycle) = three_control_planes().await;
    let victim = sim.nodes[2].instance_id();
    lifecycle
        .actions
        .declare_hook(ASG, kubeboot_tests::termination::HOOK);
    // No leader read the queue for longer than the hook's heartbeat timeout:
    // the ASG went on, EC2 terminated the instance, and Auto Scaling no
    // longer knows it when a leader finally reads the message.
    host_dies(&sim, 2);
    kubeboot_tests::termination::instance_terminated(&sim, &victim).await;
    lifecycle
        .send(ASG, &victim, "11111111-2222-3333-4444-555555555555")
        .await;
    lifecycle.wait_queue_empty().await;
    assert_eq!(
        sim.kubeapi.nodes().len(),
        2,
        "the Node of an instance EC2 terminated is deleted"
    );
    let members = sim.etcd_members(&[0, 1]).await;
    assert_eq!(members.len(), 2, "its member is removed: {members:?}");
    let records = sim.registry().await.members().await.expect("records");
    assert!(
        records.iter().all(|r| r.instance_id != victim),
        "{records:?}"
    );
    assert!(
        lifecycle.completions(&victim).is_empty(),
        "no lifecycle action to complete"
    );
    let stderr = lifecycle.stop(&sim).await;
    let gone = log_line(&stderr, "instance already gone: cleaned up after it");
    assert_eq!(gone["instance_id"], victim.as_str(), "{gone}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scale_in_larger_than_one_receive_and_a_late_arrival_are_all_heartbeated_from_receipt() {
    use kubeboot_tests::lifecycle_actions::PendingAction;
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let lifecycle = Lifecycle::start_with(&sim, "6s", wired(&[])).await;
    let workers: Vec<String> = (10..23).map(|n| format!("i-0e1b2c3d4e5f607{n}")).collect();
    for w in &workers {
        kubeboot_tests::termination::blocked_worker(&sim, w).await;
    }
    let terminate = |w: &String| {
        lifecycle.terminate_action(
            PendingAction::terminating("kb-workers", kubeboot_tests::termination::HOOK, w)
                .with_heartbeat_timeout(Duration::from_secs(14)),
        )
    };
    // Twelve at once (one receive takes at most ten), each drain held for
    // its whole 6 s deadline, four at a time: 18 s for the batch, while
    // each action dies 14 s after its last heartbeat. The daemon finds all
    // twelve in the queue at its next turn.
    lifecycle.freeze(true);
    let mut tokens = Vec::new();
    for w in &workers[..12] {
        tokens.push(terminate(w).await);
    }
    lifecycle.freeze(false);
    // The batch is under way; a thirteenth arrives during it.
    let started = Instant::now();
    while lifecycle
        .heartbeats_after(&workers[0], Duration::ZERO)
        .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no heartbeat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokens.push(terminate(&workers[12]).await);
    for (w, token) in workers.iter().zip(&tokens) {
        lifecycle
            .wait_completed(token, Duration::from_secs(90))
            .await;
        assert_eq!(lifecycle.accepted_completions(w), 1, "{w}");
    }
    lifecycle.stop(&sim).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_etcd_cannot_be_asked_about_is_not_drained_as_a_worker_and_its_message_comes_back() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let lifecycle = Lifecycle::start(&sim, "5s").await;
    let instance = "i-0f1b2c3d4e5f60718";
    let node = kubeboot_tests::termination::blocked_worker(&sim, instance).await;
    // etcd does not answer: whether this instance is a control plane
    // without a record (its member named after the Node) cannot be known.
    host_dies(&sim, 0);
    let token = lifecycle.terminate("kb-workers", instance).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        lifecycle.actions.state(&token),
        Some(kubeboot_tests::lifecycle_actions::ActionState::Pending),
        "not completed on a guess"
    );
    assert!(
        sim.kubeapi
            .nodes()
            .iter()
            .any(|n| n["metadata"]["name"] == node.as_str()),
        "its Node is kept"
    );
    let stderr = lifecycle.stop(&sim).await;
    let deferred = log_line(&stderr, "termination not completed; the message comes back");
    assert_eq!(deferred["code"], "KB-LIFE-006", "{deferred}");
}

/// cluster-autoscaler's scale-in is a termination like any other: its
/// `TerminateInstanceInAutoScalingGroup` (decrementing the desired
/// capacity, as its AWS provider's DeleteInstances does) puts the worker
/// in `Terminating:Wait` under the group's hook, and the leader drains it,
/// deletes its Node and completes the action once, through the same
/// lifecycle path as a scale-in by hand.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_scaled_in_by_cluster_autoscaler_is_drained_removed_and_completed_once() {
    use k8s_openapi::api::core::v1::Pod;
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let worker = &sim.nodes[1];
    let node_name = node_of(&sim, 1);
    let pods = default_pods(&sim);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod");
    pods.create(&kube::api::PostParams::default(), &pod)
        .await
        .expect("create pod");

    // What cluster-autoscaler does before it calls AWS (its scale-down
    // actuator): taint the node ToBeDeletedByClusterAutoscaler and cordon
    // it; kubeboot's drain must take a node already cordoned.
    sim.kubeapi
        .patch_object(
            &format!("/api/v1/nodes/{node_name}"),
            &serde_json::json!({"spec": {"unschedulable": true, "taints": [
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733270400", "effect": "NoSchedule"}]}}),
        )
        .expect("taint and cordon");
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    let token = lifecycle
        .scale_in(&sim, "kb-workers", &worker.instance_id())
        .await;
    assert_eq!(
        lifecycle.actions.scale_ins(),
        vec![("kb-workers".to_string(), worker.instance_id(), true)]
    );
    lifecycle
        .wait_completed(&token, Duration::from_secs(60))
        .await;
    assert!(
        pods.get_opt("web").await.expect("get").is_none(),
        "the Pod was evicted"
    );
    assert!(
        sim.kubeapi
            .object(&format!("/api/v1/nodes/{node_name}"))
            .is_none(),
        "the Node is deleted"
    );
    assert_eq!(lifecycle.accepted_completions(&worker.instance_id()), 1);
    let stderr = lifecycle.stop(&sim).await;
    assert!(!stderr.contains("KB-LIFE-001"), "{}", tail(&stderr));
}
