//! Terminations through the lifecycle queue, handled by the leader daemon:
//! a control plane leaves etcd under the quorum guard, its record and Node
//! go, and the action is completed exactly once; a worker is drained
//! (PodDisruptionBudgets honoured until the drain deadline, then the action
//! is completed anyway) and its Node deleted.

use kubeboot_tests::awsproxy::AwsProxy;
use kubeboot_tests::lifecycle_actions::{
    ActionState, LifecycleActions, LifecycleResult, PendingAction,
};
use kubeboot_tests::simcluster::{NodeRun, SimCluster};
use kubeboot_tests::standin;
use std::process::Stdio;
use std::time::{Duration, Instant};

const ASG: &str = "kb-control-plane";
const HOOK: &str = "kubeboot-terminate";

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn assert_ok(runs: &[NodeRun]) {
    for r in runs {
        assert_eq!(r.code, Some(0), "node {}:\n{}", r.index, tail(&r.stderr));
    }
}

fn spawn_daemon(
    sim: &SimCluster,
    index: usize,
    queue_url: &str,
    autoscaling: &str,
    drain: &str,
    crash_at: Option<&str>,
) -> tokio::process::Child {
    let mut cmd = sim.daemon_command(&sim.nodes[index]);
    cmd.env("KUBEBOOT_AWS_LIFECYCLE_QUEUE_URL", queue_url)
        .env("KUBEBOOT_AWS_ENDPOINTS_SQS", sim.moto.endpoint())
        .env("KUBEBOOT_AWS_ENDPOINTS_AUTOSCALING", autoscaling)
        .env("KUBEBOOT_TIMEOUTS_DRAIN", drain)
        .env("KUBEBOOT_DAEMON_LIFECYCLE_HEARTBEAT", "10s")
        .stderr(Stdio::piped());
    if let Some(point) = crash_at {
        cmd.env("KBTEST_CRASH_AT", point);
    }
    cmd.spawn().expect("daemon")
}

/// moto's SQS queue, the proxy answering the lifecycle actions, and the
/// leader daemon on node 0 wired to both.
struct Lifecycle {
    proxy: AwsProxy,
    actions: LifecycleActions,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    drain: String,
    daemon: tokio::process::Child,
}

impl Lifecycle {
    async fn start(sim: &SimCluster, drain: &str) -> Lifecycle {
        let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
        let actions = proxy.enable_lifecycle_actions();
        let sqs = aws_sdk_sqs::Client::new(&sim.moto.sdk_config().await);
        let queue_url = sqs
            .create_queue()
            .queue_name(format!("{}-lifecycle", sim.name))
            .send()
            .await
            .expect("create queue")
            .queue_url
            .expect("queue url");
        let daemon = spawn_daemon(sim, 0, &queue_url, &proxy.endpoint(), drain, None);
        Lifecycle {
            proxy,
            actions,
            sqs,
            queue_url,
            drain: drain.to_string(),
            daemon,
        }
    }

    /// Another daemon wired like the first, on `index`, maybe crashing at a point.
    fn daemon_on(
        &self,
        sim: &SimCluster,
        index: usize,
        crash_at: Option<&str>,
    ) -> tokio::process::Child {
        spawn_daemon(
            sim,
            index,
            &self.queue_url,
            &self.proxy.endpoint(),
            &self.drain,
            crash_at,
        )
    }

    /// Registers a pending termination and sends its EventBridge event.
    async fn terminate(&self, asg: &str, instance_id: &str) -> String {
        self.actions.declare_hook(asg, HOOK);
        let token = self
            .actions
            .register(PendingAction::terminating(asg, HOOK, instance_id));
        self.send(asg, instance_id, &token).await;
        token
    }

    /// Sends the EventBridge event of a termination.
    async fn send(&self, asg: &str, instance_id: &str, token: &str) {
        let body = serde_json::json!({
            "version": "0",
            "id": uuid::Uuid::new_v4().to_string(),
            "detail-type": "EC2 Instance-terminate Lifecycle Action",
            "source": "aws.autoscaling",
            "account": "123456789012",
            "time": "2026-11-22T00:00:00Z",
            "region": "us-east-1",
            "resources": [format!("arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:x:autoScalingGroupName/{asg}")],
            "detail": {
                "LifecycleActionToken": token,
                "AutoScalingGroupName": asg,
                "LifecycleHookName": HOOK,
                "EC2InstanceId": instance_id,
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
                "Origin": "AutoScalingGroup",
                "Destination": "EC2",
            },
        });
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body.to_string())
            .send()
            .await
            .expect("send lifecycle message");
    }

    /// Waits until every message was handled and deleted.
    async fn wait_queue_empty(&self) {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let started = Instant::now();
        loop {
            let attrs = self
                .sqs
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(A::ApproximateNumberOfMessages)
                .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await
                .expect("queue attributes");
            let count = |a: A| {
                attrs
                    .attributes()
                    .and_then(|m| m.get(&a))
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            if count(A::ApproximateNumberOfMessages)
                + count(A::ApproximateNumberOfMessagesNotVisible)
                == 0
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the queue never emptied"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_completed(&self, token: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            match self.actions.state(token) {
                Some(ActionState::Completed(result)) => {
                    assert_eq!(result, LifecycleResult::Continue);
                    return started.elapsed();
                }
                Some(ActionState::Pending) => {}
                other => panic!("action ended as {other:?}"),
            }
            assert!(
                started.elapsed() < within,
                "action not completed within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the action's completion (however many attempts it took).
    async fn wait_completed_or_done(&self, token: &str, within: Duration) {
        self.wait_completed(token, within).await;
    }

    async fn stop(mut self) -> String {
        let pid = self.daemon.id().expect("pid") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.daemon.wait())
            .await
            .expect("daemon stops")
            .expect("wait");
        let mut stderr = String::new();
        if let Some(mut e) = self.daemon.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut stderr).await;
        }
        assert_eq!(status.code(), Some(0), "{}", tail(&stderr));
        drop(self.proxy);
        stderr
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminating_control_plane_leaves_etcd_and_its_action_is_completed_once() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let lifecycle = Lifecycle::start(&sim, "30s").await;
    let victim = &sim.nodes[2];
    assert_eq!(sim.kubeapi.nodes().len(), 3);

    // The ASG terminates node 2: its host goes (etcd stops), the message comes.
    let pids = standin::etcd_pids_for(&victim.dir.join("var/lib/etcd"));
    standin::stop_groups(&pids, Duration::ZERO);
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
    assert_eq!(
        lifecycle
            .actions
            .accepted_completions(&victim.instance_id()),
        1
    );

    // The same message again (a new leader re-receiving it) changes nothing:
    // AWS refuses the second completion, which counts as done.
    lifecycle.send(ASG, &victim.instance_id(), &token).await;
    lifecycle.wait_queue_empty().await;
    assert_eq!(
        lifecycle
            .actions
            .accepted_completions(&victim.instance_id()),
        1
    );
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 2);
    assert_eq!(
        sim.registry().await.members().await.expect("records").len(),
        2
    );
    let stderr = lifecycle.stop().await;
    assert!(
        stderr.contains("lifecycle action completed"),
        "{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_is_drained_past_what_a_disruption_budget_allows_until_the_deadline() {
    use k8s_openapi::api::core::v1::Pod;
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    let worker = &sim.nodes[1];
    let node_name = sim
        .kubeapi
        .nodes()
        .into_iter()
        .find(|n| {
            n["spec"]["providerID"]
                .as_str()
                .is_some_and(|p| p.ends_with(&worker.instance_id()))
        })
        .and_then(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .expect("the worker's Node carries its providerID");

    let mut config = kube::Config::new(sim.kubeapi.url().parse().expect("url"));
    config.default_retry = false;
    let client = kube::Client::try_from(config).expect("kube client");
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, "default");
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
    assert_eq!(
        lifecycle
            .actions
            .accepted_completions(&worker.instance_id()),
        1
    );
    let stderr = lifecycle.stop().await;
    assert!(
        stderr.contains("drain deadline passed; completing the lifecycle action anyway"),
        "{}",
        tail(&stderr)
    );
}

/// The leader lock's owner, if held.
async fn leader(sim: &SimCluster) -> Option<String> {
    let item = sim
        .moto
        .dynamodb()
        .await
        .get_item()
        .table_name(&sim.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("CLUSTER#{}", sim.name)),
        )
        .key(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("LOCK#leader".into()),
        )
        .consistent_read(true)
        .send()
        .await
        .expect("read the leader lock")
        .item?;
    let released = item
        .get("released")
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false);
    (!released)
        .then(|| item.get("owner").and_then(|v| v.as_s().ok()).cloned())
        .flatten()
}

async fn wait_leader(sim: &SimCluster, index: usize) {
    let started = Instant::now();
    let id = sim.nodes[index].instance_id();
    while !leader(sim).await.is_some_and(|o| o.starts_with(&id)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node {index} never led"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    assert_eq!(
        lifecycle
            .actions
            .accepted_completions(&victim.instance_id()),
        1
    );
}

/// Kills node `index`'s host: its etcd member stops.
fn host_dies(sim: &SimCluster, index: usize) {
    let pids = standin::etcd_pids_for(&sim.nodes[index].dir.join("var/lib/etcd"));
    standin::stop_groups(&pids, Duration::ZERO);
}

/// Waits for a daemon started with `KBTEST_CRASH_AT=point` to die there.
async fn crashes_at(child: &mut tokio::process::Child, point: &str) {
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits within 60 s")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert!(
        !status.success() && stderr.contains(point),
        "the daemon should have crashed at {point}:\n{}",
        tail(&stderr)
    );
}

/// The removal path's crash matrix: the leader dies at each step, restarts,
/// and the termination converges with one completion.
async fn leader_crashes_at(point: &str) {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let mut lifecycle = Lifecycle::start(&sim, "30s").await;
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
    lifecycle.stop().await;
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
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let mut lifecycle = Lifecycle::start(&sim, "30s").await;
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
    lifecycle.stop().await;
}
