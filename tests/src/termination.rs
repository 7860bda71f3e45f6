//! Terminations as the ASG delivers them, for the daemon's e2e tests: an
//! SQS queue in moto, the AWS proxy answering the lifecycle actions, and
//! daemons wired to both; plus the host-level events around them.

use crate::awsproxy::AwsProxy;
use crate::lifecycle_actions::{ActionState, LifecycleActions, LifecycleResult, PendingAction};
use crate::simcluster::SimCluster;
pub use crate::simcluster::{log_lines, tail};
use crate::standin;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The lifecycle hook's name in these tests.
pub const HOOK: &str = "kubeboot-terminate";

/// Starts a daemon on node `index`, wired to the queue and the proxy.
pub fn spawn_daemon(
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
pub struct Terminations {
    pub proxy: AwsProxy,
    pub actions: LifecycleActions,
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub drain: String,
    pub daemon: tokio::process::Child,
}

impl Terminations {
    pub async fn start(sim: &SimCluster, drain: &str) -> Terminations {
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
        Terminations {
            proxy,
            actions,
            sqs,
            queue_url,
            drain: drain.to_string(),
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
    pub async fn terminate(&self, asg: &str, instance_id: &str) -> String {
        self.actions.declare_hook(asg, HOOK);
        let token = self
            .actions
            .register(PendingAction::terminating(asg, HOOK, instance_id));
        self.send(asg, instance_id, &token).await;
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

    /// Waits until every message was handled and deleted.
    pub async fn wait_queue_empty(&self) {
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

    /// SIGTERMs the daemon, expects exit 0, and hands its stderr to the
    /// cluster's secret scan as well as to the caller.
    pub async fn stop(mut self, sim: &SimCluster) -> String {
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

/// Waits for a daemon started with `KBTEST_CRASH_AT=point` to die there.
pub async fn crashes_at(child: &mut tokio::process::Child, point: &str) {
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
