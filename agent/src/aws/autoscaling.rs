//! Auto Scaling: the lifecycle actions of terminating instances (complete,
//! heartbeat) and where Auto Scaling has an instance. The calls only; what a
//! termination means for the cluster is [`crate::lifecycle`]'s.

use crate::retry::{classify_sdk_error, RetryClass};

/// The lifecycle transition of a terminating instance, as Auto Scaling's
/// notifications name it.
pub const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// An Auto Scaling call failed (after the SDK's retries).
#[derive(Debug, thiserror::Error)]
#[error("Auto Scaling {operation} for {instance_id} (group {asg}, hook {hook}): {message}")]
pub struct Error {
    pub operation: &'static str,
    pub instance_id: String,
    pub asg: String,
    pub hook: String,
    pub class: RetryClass,
    pub message: String,
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        &crate::catalogue::LIFE_AUTOSCALING
    }
}

/// One lifecycle action to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub asg: String,
    pub hook: String,
    pub instance_id: String,
    /// The action's token (messages carry it; a node completing its own
    /// action by instance id has none).
    pub token: Option<String>,
}

/// How completing an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Completed,
    /// AWS had no active action: completed before (by us or another path) or timed out.
    AlreadyDone,
    /// The instance was already terminated and no group held it: nothing
    /// to complete, only its Node and member to clean up.
    Gone,
}

/// Which group holds an instance and in which lifecycle state, as Auto
/// Scaling reports it (`InService`, `Terminating:Wait`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub asg: String,
    pub state: String,
}

/// Completes and heartbeats lifecycle actions.
#[derive(Debug, Clone)]
pub struct Hooks {
    client: aws_sdk_autoscaling::Client,
}

impl Hooks {
    pub fn new(client: aws_sdk_autoscaling::Client) -> Self {
        Hooks { client }
    }

    fn error<E>(
        operation: &'static str,
        action: &Action,
        e: &aws_sdk_autoscaling::error::SdkError<
            E,
            aws_smithy_runtime_api::client::orchestrator::HttpResponse,
        >,
    ) -> Error
    where
        E: aws_sdk_autoscaling::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        Error {
            operation,
            instance_id: action.instance_id.clone(),
            asg: action.asg.clone(),
            hook: action.hook.clone(),
            class: classify_sdk_error(e),
            message: aws_sdk_autoscaling::error::DisplayErrorContext(e).to_string(),
        }
    }

    /// CompleteLifecycleAction(CONTINUE).
    pub async fn complete(&self, action: &Action) -> Result<Completion, Error> {
        let result = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&action.asg)
            .lifecycle_hook_name(&action.hook)
            .instance_id(&action.instance_id)
            .set_lifecycle_action_token(action.token.clone())
            .lifecycle_action_result("CONTINUE")
            .send()
            .await;
        match result {
            Ok(_) => Ok(Completion::Completed),
            Err(e) if no_active_action(&e) => Ok(Completion::AlreadyDone),
            Err(e) => Err(Self::error("CompleteLifecycleAction", action, &e)),
        }
    }

    /// RecordLifecycleActionHeartbeat: more time for the work.
    pub async fn heartbeat(&self, action: &Action) -> Result<(), Error> {
        self.client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&action.asg)
            .lifecycle_hook_name(&action.hook)
            .instance_id(&action.instance_id)
            .set_lifecycle_action_token(action.token.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Self::error("RecordLifecycleActionHeartbeat", action, &e))
    }

    /// Auto Scaling's view of `action`'s instance; `None` when no group holds
    /// it (terminated and gone).
    pub async fn placement(&self, action: &Action) -> Result<Option<Placement>, Error> {
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(&action.instance_id)
            .send()
            .await
            .map_err(|e| Self::error("DescribeAutoScalingInstances", action, &e))?;
        Ok(out
            .auto_scaling_instances()
            .iter()
            .find(|i| i.instance_id() == Some(action.instance_id.as_str()))
            .map(|i| Placement {
                asg: i.auto_scaling_group_name().unwrap_or_default().to_string(),
                state: i.lifecycle_state().unwrap_or_default().to_string(),
            }))
    }
}

/// AWS's answer to completing an action that is no longer pending.
fn no_active_action<E: aws_sdk_autoscaling::error::ProvideErrorMetadata>(
    e: &aws_sdk_autoscaling::error::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> bool {
    use aws_sdk_autoscaling::error::ProvideErrorMetadata;
    e.code() == Some("ValidationError")
        && e.message()
            .is_some_and(|m| m.starts_with("No active Lifecycle Action found"))
}
