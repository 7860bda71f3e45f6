//! SQS: the lifecycle queue (receive, keep hidden, send, delete). The calls
//! only; what a message means is [`crate::lifecycle`]'s.

use super::autoscaling::{Action, TERMINATING};
use std::time::Duration;

/// An SQS call failed (after the SDK's retries).
#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} on {queue}: {message}")]
pub struct Error {
    pub operation: &'static str,
    pub queue: String,
    pub message: String,
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        &crate::catalogue::LIFE_SQS
    }
}

/// One received queue message.
#[derive(Debug, Clone)]
pub struct Received {
    pub receipt: String,
    pub body: String,
    /// When SQS received the message (`SentTimestamp`), if it said.
    pub sent: Option<std::time::SystemTime>,
    /// How often it was received, this time included (`ApproximateReceiveCount`).
    pub receives: u32,
}

/// The lifecycle queue.
#[derive(Debug, Clone)]
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Queue {
            client,
            url: url.into(),
        }
    }

    /// Up to 10 messages, hidden from other receivers for `visibility`.
    pub async fn receive(&self, visibility: Duration) -> Result<Vec<Received>, Error> {
        self.receive_up_to(visibility, 10).await
    }

    /// Up to `max` (1 to 10) messages, hidden for `visibility`; none waited for.
    pub async fn receive_up_to(
        &self,
        visibility: Duration,
        max: usize,
    ) -> Result<Vec<Received>, Error> {
        self.receive_waiting(visibility, max, Duration::ZERO).await
    }

    /// [`Queue::receive_up_to`], but a long poll: when the queue is empty,
    /// SQS holds the request up to `wait` (whole seconds, at most 20) and
    /// answers as soon as a message arrives. `wait` must stay below the
    /// SDK's attempt timeout.
    pub async fn receive_waiting(
        &self,
        visibility: Duration,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Received>, Error> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .visibility_timeout(visibility.as_secs().clamp(1, 43_200) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::SentTimestamp,
            )
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await
            .map_err(|e| Error {
                operation: "ReceiveMessage",
                queue: self.url.clone(),
                message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            })?;
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                use aws_sdk_sqs::types::MessageSystemAttributeName as A;
                let attribute = |a: A| m.attributes().and_then(|all| all.get(&a));
                Some(Received {
                    receipt: m.receipt_handle()?.to_string(),
                    body: m.body()?.to_string(),
                    sent: attribute(A::SentTimestamp)
                        .and_then(|ms| ms.parse::<u64>().ok())
                        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)),
                    receives: attribute(A::ApproximateReceiveCount)
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1),
                })
            })
            .collect())
    }

    /// Keeps a message hidden for another `visibility` while it is handled.
    pub async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), Error> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility.as_secs().clamp(1, 43_200) as i32)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error {
                operation: "ChangeMessageVisibility",
                queue: self.url.clone(),
                message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            })
    }

    /// Sends this instance's own termination notice (a worker cannot drain
    /// itself: its kubelet credentials may not evict Pods; the leader does).
    pub async fn send_own(&self, action: &Action) -> Result<(), Error> {
        let body = serde_json::json!({
            "Origin": "AutoScalingGroup",
            "Destination": "EC2",
            "Service": "kubeboot",
            "AutoScalingGroupName": action.asg,
            "LifecycleHookName": action.hook,
            "EC2InstanceId": action.instance_id,
            "LifecycleTransition": TERMINATING,
        });
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body.to_string())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error {
                operation: "SendMessage",
                queue: self.url.clone(),
                message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            })
    }

    /// Deletes a handled message.
    pub async fn delete(&self, receipt: &str) -> Result<(), Error> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error {
                operation: "DeleteMessage",
                queue: self.url.clone(),
                message: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            })
    }
}
