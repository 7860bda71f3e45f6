//! This node's own termination, seen in IMDS.

use crate::aws::autoscaling::Action;

/// What this node does when IMDS says its ASG is terminating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnTermination {
    /// A control plane cleans up after itself (it has the admin credentials
    /// and takes the membership lock like anyone) and completes its action.
    CleanUpAndComplete,
    /// A worker asks the leader through the lifecycle queue.
    AskTheLeader,
}

/// One look at IMDS; `Some` the first time the target state is `Terminated`.
pub async fn own_termination_due(
    imds: &crate::identity::Imds,
    instance_id: &str,
    hook: &str,
) -> Result<Option<Action>, crate::identity::Error> {
    let state = imds.target_lifecycle_state().await?;
    if state.as_deref() != Some("Terminated") {
        return Ok(None);
    }
    let asg = imds.asg_name().await?;
    let asg = asg.unwrap_or_else(|| {
        tracing::error!(hint = "enable InstanceMetadataTags on the launch template", "this instance's ASG name is not in IMDS; its lifecycle action cannot be completed by this node");
        String::new()
    });
    Ok(Some(Action {
        asg,
        hook: hook.to_string(),
        instance_id: instance_id.to_string(),
        token: None,
    }))
}
