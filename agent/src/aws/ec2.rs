//! EC2: which instances are pending or running. The call only; what a
//! gone instance means for etcd is [`crate::reconciler`]'s and
//! [`crate::lifecycle`]'s.

use std::collections::HashSet;

/// EC2 could not answer, or its answer cannot be believed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("EC2 DescribeInstances: {message}")]
    Describe { message: String },
    #[error(
        "EC2 does not report this leader's own instance {instance_id} running (it reported {reported} of {asked} instances asked): not trusting its answer"
    )]
    LeaderNotRunning {
        instance_id: String,
        reported: usize,
        asked: usize,
    },
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        match self {
            Error::Describe { .. } => &crate::catalogue::RECON_EC2,
            Error::LeaderNotRunning { .. } => &crate::catalogue::RECON_LEADER_NOT_RUNNING,
        }
    }
}

/// EC2's view of instances.
#[derive(Debug, Clone)]
pub struct Instances {
    client: aws_sdk_ec2::Client,
}

impl Instances {
    pub fn new(client: aws_sdk_ec2::Client) -> Self {
        Instances { client }
    }

    /// Of `ids`, those EC2 does not report pending or running (terminated,
    /// stopping, stopped, or unknown). Filters, unlike `InstanceIds`, do not
    /// fail the whole call for an id EC2 has forgotten, so an empty answer
    /// (wrong region or endpoint, stale data) would say "all gone": the
    /// leader's own instance is asked too, and an answer that does not show
    /// it running is refused.
    pub async fn not_running(
        &self,
        ids: &[String],
        leader: &str,
    ) -> Result<HashSet<String>, Error> {
        let mut asked: Vec<String> = ids.to_vec();
        if !asked.iter().any(|id| id == leader) {
            asked.push(leader.to_string());
        }
        let running = self.running(&asked).await?;
        if !running.contains(leader) {
            return Err(Error::LeaderNotRunning {
                instance_id: leader.to_string(),
                reported: running.len(),
                asked: asked.len(),
            });
        }
        Ok(ids
            .iter()
            .filter(|id| !running.contains(*id))
            .cloned()
            .collect())
    }

    /// Of `ids`, those EC2 reports pending or running.
    async fn running(&self, ids: &[String]) -> Result<HashSet<String>, Error> {
        let mut running = HashSet::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .describe_instances()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("instance-id")
                        .set_values(Some(ids.to_vec()))
                        .build(),
                )
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| Error::Describe {
                    message: aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
                })?;
            for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default();
                if state == "pending" || state == "running" {
                    if let Some(id) = instance.instance_id() {
                        running.insert(id.to_string());
                    }
                }
            }
            match out.next_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(running)
    }
}
