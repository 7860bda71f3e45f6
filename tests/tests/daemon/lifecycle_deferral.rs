//! Termination notices Auto Scaling has not confirmed yet (issue 14 item 11).
//!
//! A real notice (the EventBridge "EC2 Instance-terminate Lifecycle Action"
//! event, or the hook's own SQS message) can be read before
//! DescribeAutoScalingInstances reports the instance `Terminating:Wait`:
//! the leader keeps such a notice on the queue (hidden for a while, then
//! looked at again) until AWS's longest hook heartbeat timeout (2 h; these
//! tests shorten it with `KBTEST_HOOK_HEARTBEAT_TIMEOUT_MS`) counted from
//! when SQS received it, and acts only once Auto Scaling confirms. A forged
//! notice for a healthy instance is never confirmed: it is kept until that
//! bound, never acts, and is then deleted with KB-LIFE-004.

use kubeboot_tests::lifecycle_actions::{LifecycleOperation, PendingAction};
use kubeboot_tests::simcluster::{assert_ok, SimCluster};
use kubeboot_tests::termination::{
    assert_nothing_removed, assert_refused, host_dies, log_lines, tail, Terminations as Lifecycle,
    Wiring, HOOK,
};
use std::time::{Duration, Instant};

const ASG: &str = "kb-control-plane";

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_read_before_auto_scaling_reports_the_termination_is_handled_once_it_does() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    let victim = sim.nodes[2].instance_id();
    lifecycle.actions.declare_hook(ASG, HOOK);
    lifecycle.actions.in_service(ASG, &victim);

    // The notice comes first; Auto Scaling still says InService.
    let token = uuid::Uuid::new_v4().to_string();
    lifecycle.send(ASG, &victim, &token).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        lifecycle.queued().await,
        1,
        "the unconfirmed notice must stay on the queue"
    );
    assert_eq!(
        sim.etcd_members(&[0, 1, 2]).await.len(),
        3,
        "nothing removed yet"
    );
    assert!(
        lifecycle.completions(&victim).is_empty(),
        "nothing completed before Auto Scaling confirmed"
    );

    // 20 s later Auto Scaling reports it Terminating:Wait (the action the
    // notice announced), and the host goes.
    lifecycle.actions.register(
        PendingAction::terminating(ASG, HOOK, &victim)
            .with_token(&token)
            .with_heartbeat_timeout(Duration::from_secs(300)),
    );
    host_dies(&sim, 2);
    let took = lifecycle
        .wait_completed(&token, Duration::from_secs(90))
        .await;
    eprintln!("confirmation to completion: {took:?}");

    let members = sim.etcd_members(&[0, 1]).await;
    assert_eq!(members.len(), 2, "{members:?}");
    let records = sim.registry().await.members().await.expect("records");
    assert!(
        records.iter().all(|r| r.instance_id != victim),
        "{records:?}"
    );
    assert_eq!(sim.kubeapi.nodes().len(), 2, "the Node is deleted");
    assert_eq!(lifecycle.accepted_completions(&victim), 1);
    lifecycle.wait_queue_empty().await;
    let stderr = lifecycle.stop(&sim).await;
    let lines = log_lines(&stderr);
    assert!(
        lines.iter().any(|l| l["message"]
            == "termination notice not confirmed by Auto Scaling yet; kept and looked at again"),
        "{}",
        tail(&stderr)
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["message"] == "lifecycle message refused and deleted"),
        "{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_notice_for_a_healthy_control_plane_is_kept_until_the_hooks_timeout_and_never_acts(
) {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    // AWS's longest hook timeout (2 h) shortened to 30 s.
    let hook_timeout = Duration::from_secs(30);
    let wiring = Wiring {
        env: vec![(
            "KBTEST_HOOK_HEARTBEAT_TIMEOUT_MS",
            hook_timeout.as_millis().to_string(),
        )],
        ..Wiring::default()
    };
    let lifecycle = Lifecycle::start_with(&sim, "30s", wiring).await;
    let victim = sim.nodes[2].instance_id();
    lifecycle.actions.declare_hook(ASG, HOOK);
    lifecycle.actions.in_service(ASG, &victim);

    // Any node may send to the queue; this notice names a healthy control
    // plane that Auto Scaling is not terminating.
    let sent = Instant::now();
    lifecycle
        .send(ASG, &victim, "11111111-2222-3333-4444-555555555555")
        .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        lifecycle.queued().await,
        1,
        "a notice must not be refused before the hook's timeout"
    );
    while lifecycle.queued().await > 0 {
        if sent.elapsed() > Duration::from_secs(90) {
            let stderr = lifecycle.stop(&sim).await;
            let lifecycle_lines: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("lifecycle") || l.contains("notice"))
                .collect();
            panic!(
                "the forged notice was never deleted:\n{}",
                lifecycle_lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = sent.elapsed();
    assert!(kept >= hook_timeout, "deleted after only {kept:?}");

    assert_nothing_removed(&sim).await;
    for operation in [LifecycleOperation::Complete, LifecycleOperation::Heartbeat] {
        assert!(
            lifecycle.actions.calls_for(operation, &victim).is_empty(),
            "no {operation:?} for an unconfirmed notice"
        );
    }
    let stderr = lifecycle.stop(&sim).await;
    let lines = log_lines(&stderr);
    let looks = lines
        .iter()
        .filter(|l| {
            l["message"]
                == "termination notice not confirmed by Auto Scaling yet; kept and looked at again"
        })
        .count();
    assert!(
        (1..6).contains(&looks),
        "kept and looked at {looks} times:\n{}",
        tail(&stderr)
    );
    // Auto Scaling still reports the instance InService.
    assert_refused(&stderr, "KB-LIFE-004", "InService");
}
