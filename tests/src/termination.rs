//! Terminations as the ASG delivers them, for the daemon's e2e tests: an
//! SQS queue in moto, the AWS proxy answering the lifecycle actions, and
//! daemons wired to both; plus the host-level events around them.

use crate::awsproxy::AwsProxy;
use crate::lifecycle_actions::{
    ActionState, LifecycleActions, LifecycleCall, LifecycleOperation, LifecycleResult,
    PendingAction,
};
pub use crate::simcluster::{log_line, log_lines, tail};
use crate::simcluster::{read_stderr, SimCluster};
use crate::standin;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The lifecycle hook's name in these tests.
pub const HOOK: &str = "kubeboot-terminate";

/// How a test wires its daemons beyond the queue and the lifecycle actions.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// `daemon.lifecycle_heartbeat` (also the queue's visibility period).
    pub lifecycle_heartbeat: &'static str,
    /// AWS services (`dynamodb`, `ec2`, ...) whose requests go through the
    /// proxy too, so a test can break them with faults or answer them.
    pub through_proxy: Vec<&'static str>,
    /// Further `KUBEBOOT_*` settings.
    pub env: Vec<(&'static str, String)>,
}

impl Default for Wiring {
    fn default() -> Self {
        Wiring {
            lifecycle_heartbeat: "10s",
            through_proxy: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// Starts a daemon on node `index`, wired to the queue and the proxy
/// (`autoscaling`) as the test's [`Wiring`] says.
pub fn spawn_daemon_with(
    sim: &SimCluster,
    index: usize,
    queue_url: &str,
    autoscaling: &str,
    drain: &str,
    crash_at: Option<&str>,
    wiring: &Wiring,
) -> tokio::process::Child {
    let mut cmd = sim.daemon_command(&sim.nodes[index]);
    cmd.env("KUBEBOOT_AWS_LIFECYCLE_QUEUE_URL", queue_url)
        .env("KUBEBOOT_AWS_ENDPOINTS_SQS", sim.moto.endpoint())
        .env("KUBEBOOT_AWS_ENDPOINTS_AUTOSCALING", autoscaling)
        .env("KUBEBOOT_TIMEOUTS_DRAIN", drain)
        .env(
            "KUBEBOOT_DAEMON_LIFECYCLE_HEARTBEAT",
            wiring.lifecycle_heartbeat,
        )
        .stderr(Stdio::piped());
    for service in &wiring.through_proxy {
        cmd.env(
            format!("KUBEBOOT_AWS_ENDPOINTS_{}", service.to_ascii_uppercase()),
            autoscaling,
        );
    }
    for (key, value) in &wiring.env {
        cmd.env(key, value);
    }
    if let Some(point) = crash_at {
        cmd.env("KBTEST_CRASH_AT", point);
    }
    cmd.spawn().expect("daemon")
}

/// moto's SQS queue, the proxy answering the lifecycle actions, and the
/// leader daemon on node 0 wired to both.
pub struct Terminations {
    pub proxy: AwsProxy,
    pub actions: LifecycleActions,
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub drain: String,
    pub wiring: Wiring,
    pub daemon: tokio::process::Child,
}

impl Terminations {
    pub async fn start(sim: &SimCluster, drain: &str) -> Terminations {
        Self::start_with(sim, drain, Wiring::default()).await
    }

    /// [`Terminations::start`] with the daemons wired as `wiring` says.
    pub async fn start_with(sim: &SimCluster, drain: &str, wiring: Wiring) -> Terminations {
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
        let daemon = spawn_daemon_with(sim, 0, &queue_url, &proxy.endpoint(), drain, None, &wiring);
        Terminations {
            proxy,
            actions,
            sqs,
            queue_url,
            drain: drain.to_string(),
            wiring,
            daemon,
        }
    }

    /// Another daemon wired like the first, on `index`, maybe crashing at a point.
    pub fn daemon_on(
        &self,
        sim: &SimCluster,
        index: usize,
        crash_at: Option<&str>,
    ) -> tokio::process::Child {
        spawn_daemon_with(
            sim,
            index,
            &self.queue_url,
            &self.proxy.endpoint(),
            &self.drain,
            crash_at,
            &self.wiring,
        )
    }

    /// A scale-in as cluster-autoscaler makes it (its AWS provider's
    /// `DeleteInstances`): `TerminateInstanceInAutoScalingGroup` with
    /// `ShouldDecrementDesiredCapacity`, through the real SDK client, on an
    /// instance `InService` in `asg`, whose termination hook holds it in
    /// `Terminating:Wait`; then the EventBridge event AWS emits for that
    /// action reaches the queue. Returns the action's token.
    pub async fn scale_in(&self, sim: &SimCluster, asg: &str, instance_id: &str) -> String {
        self.actions.declare_hook(asg, HOOK);
        self.actions.in_service(asg, instance_id);
        let sdk = sim
            .moto
            .sdk_config()
            .await
            .to_builder()
            .endpoint_url(self.proxy.endpoint())
            .build();
        let activity = aws_sdk_autoscaling::Client::new(&sdk)
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .expect("TerminateInstanceInAutoScalingGroup")
            .activity
            .expect("an activity");
        assert_eq!(
            activity.status_code().map(|c| c.as_str()),
            Some("InProgress")
        );
        let token = self
            .actions
            .statuses_for_instance(instance_id)
            .into_iter()
            .last()
            .map(|s| s.action.token)
            .expect("the hook holds the instance");
        self.send(asg, instance_id, &token).await;
        token
    }

    /// Registers a pending termination and sends its EventBridge event.
    pub async fn terminate(&self, asg: &str, instance_id: &str) -> String {
        self.actions.declare_hook(asg, HOOK);
        let token = self
            .actions
            .register(PendingAction::terminating(asg, HOOK, instance_id));
        self.send(asg, instance_id, &token).await;
        token
    }

    /// Registers `action` (the test's hook timeouts) and sends its event.
    pub async fn terminate_action(&self, action: PendingAction) -> String {
        let (asg, instance_id) = (action.asg_name.clone(), action.instance_id.clone());
        let token = self.actions.register(action);
        self.send(&asg, &instance_id, &token).await;
        token
    }

    /// Sends the EventBridge event of a termination.
    pub async fn send(&self, asg: &str, instance_id: &str, token: &str) {
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

    /// Messages a receiver could take now (not hidden by a handler).
    pub async fn visible_messages(&self) -> u32 {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        self.count_messages(&[A::ApproximateNumberOfMessages]).await
    }

    /// Messages in the queue, visible or hidden by a handler (not deleted).
    pub async fn queued(&self) -> u32 {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        self.count_messages(&[
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
        ])
        .await
    }

    /// The sum of SQS's `counts` for the queue.
    async fn count_messages(&self, counts: &[aws_sdk_sqs::types::QueueAttributeName]) -> u32 {
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .set_attribute_names(Some(counts.to_vec()))
            .send()
            .await
            .expect("queue attributes");
        counts
            .iter()
            .filter_map(|a| attrs.attributes().and_then(|m| m.get(a)))
            .filter_map(|v| v.parse::<u32>().ok())
            .sum()
    }

    /// Heartbeats sent for `instance_id` after `since` (on the actions' clock).
    pub fn heartbeats_after(&self, instance_id: &str, since: Duration) -> Vec<LifecycleCall> {
        self.actions
            .calls_for(LifecycleOperation::Heartbeat, instance_id)
            .into_iter()
            .filter(|c| c.at > since)
            .collect()
    }

    /// How many completions for `instance_id` Auto Scaling accepted.
    pub fn accepted_completions(&self, instance_id: &str) -> usize {
        self.actions.accepted_completions(instance_id)
    }

    /// Completions attempted for `instance_id`, accepted or not.
    pub fn completions(&self, instance_id: &str) -> Vec<LifecycleCall> {
        self.actions
            .calls_for(LifecycleOperation::Complete, instance_id)
    }

    /// Waits until every message was handled and deleted.
    pub async fn wait_queue_empty(&self) {
        let started = Instant::now();
        while self.queued().await > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the queue never emptied"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_completed(&self, token: &str, within: Duration) -> Duration {
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
    pub async fn wait_completed_or_done(&self, token: &str, within: Duration) {
        self.wait_completed(token, within).await;
    }

    /// Freezes (`true`) or thaws the daemon (SIGSTOP/SIGCONT), so a test can
    /// queue several messages that the next turn then finds all at once.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.daemon.id().expect("pid") as i32;
        let signal = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal");
    }

    /// SIGTERMs the daemon, expects exit 0, and hands its stderr to the
    /// cluster's secret scan as well as to the caller.
    pub async fn stop(mut self, sim: &SimCluster) -> String {
        let pid = self.daemon.id().expect("pid") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.daemon.wait()).await;
        if status.is_err() {
            let _ = self.daemon.start_kill();
            let _ = self.daemon.wait().await;
        }
        let stderr = read_stderr(&mut self.daemon).await;
        let status = match status {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "the daemon did not stop within 20 s of SIGTERM:\n{}",
                tail(&stderr)
            ),
        };
        sim.record_output(&stderr);
        assert_eq!(status.code(), Some(0), "{}", tail(&stderr));
        drop(self.proxy);
        stderr
    }
}

/// The leader lock's owner, if held.
pub async fn leader(sim: &SimCluster) -> Option<String> {
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

pub async fn wait_leader(sim: &SimCluster, index: usize) {
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

/// Kills node `index`'s host: its etcd member stops.
pub fn host_dies(sim: &SimCluster, index: usize) {
    let pids = standin::etcd_pids_for(&sim.nodes[index].dir.join("var/lib/etcd"));
    standin::stop_groups(&pids, Duration::ZERO);
}

/// Node `index`'s instance is terminated with no lifecycle message: its
/// etcd dies with its host, and EC2 (moto) reports it terminated.
pub async fn instance_lost(sim: &SimCluster, index: usize) {
    host_dies(sim, index);
    aws_sdk_ec2::Client::new(&sim.moto.sdk_config().await)
        .terminate_instances()
        .instance_ids(sim.nodes[index].instance_id())
        .send()
        .await
        .expect("terminate in moto");
}

/// Waits for a daemon started with `KBTEST_CRASH_AT=point` to die there.
pub async fn crashes_at(child: &mut tokio::process::Child, point: &str) {
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits within 60 s")
        .expect("wait");
    let stderr = read_stderr(child).await;
    assert!(
        !status.success() && stderr.contains(point),
        "the daemon should have crashed at {point}:\n{}",
        tail(&stderr)
    );
}

/// A worker the test makes up for the drain path: its Node (named after the
/// instance, with its providerID) and one Pod on it that a disruption budget
/// keeps from being evicted, so its drain lasts until `timeouts.drain`.
/// Returns the Node's name.
pub async fn blocked_worker(sim: &SimCluster, instance_id: &str) -> String {
    use k8s_openapi::api::core::v1::{Node, Pod};
    let name = format!("worker-{instance_id}");
    let mut config = kube::Config::new(sim.kubeapi.url().parse().expect("url"));
    config.default_retry = false;
    let client = kube::Client::try_from(config).expect("kube client");
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"providerID": format!("aws:///us-east-1a/{instance_id}")},
    }))
    .expect("node");
    kube::Api::<Node>::all(client.clone())
        .create(&kube::api::PostParams::default(), &node)
        .await
        .expect("create node");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("db-{instance_id}"),
            "namespace": "default",
            "annotations": {crate::kubeapi::EVICTION_BLOCKED_ANNOTATION: "blocked"},
        },
        "spec": {"nodeName": name, "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod");
    kube::Api::<Pod>::namespaced(client, "default")
        .create(&kube::api::PostParams::default(), &pod)
        .await
        .expect("create pod");
    name
}

/// EC2 terminates `instance_id` (moto forgets nothing: it reports the
/// instance terminated from now on), as the ASG does once a lifecycle
/// action has ended.
pub async fn instance_terminated(sim: &SimCluster, instance_id: &str) {
    let ec2 = aws_sdk_ec2::Client::new(&sim.moto.sdk_config().await);
    ec2.terminate_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .expect("moto terminates the instance");
}

/// Nothing of the three control planes was removed: every etcd member,
/// member record and Node is still there.
pub async fn assert_nothing_removed(sim: &SimCluster) {
    assert_eq!(sim.etcd_members(&[0, 1, 2]).await.len(), 3);
    assert_eq!(
        sim.registry().await.members().await.expect("records").len(),
        3
    );
    assert_eq!(sim.kubeapi.nodes().len(), 3, "no Node deleted");
}

/// The daemon refused a lifecycle message and deleted it, with `code` and
/// an error that says `because`.
pub fn assert_refused(stderr: &str, code: &str, because: &str) {
    let refused = log_line(stderr, "lifecycle message refused and deleted");
    assert_eq!(refused["code"], code, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains(because)),
        "{refused}"
    );
}
