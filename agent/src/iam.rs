//! The AWS operations the agent performs, per role: the one list the
//! instance roles in `infra/cluster.json` are checked against.
//!
//! Least privilege is only provable if the agent's surface is written down
//! once. The template test compares each role's policy with [`grants`];
//! every SDK client checks each call against [`permits`] before sending it
//! (see `aws::OperationGuard`), so an operation added to the code but not to
//! this list fails every test that reaches it, long before an instance role
//! denies it in production.

use crate::config::model::Role;
use std::collections::BTreeSet;

const CP: &[Role] = &[Role::ControlPlane];
const BOTH: &[Role] = &[Role::ControlPlane, Role::Worker];

/// What an action is granted on: the template scopes each to the cluster's
/// own resource of this kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    /// The cluster's DynamoDB table, its items limited to the cluster's partition.
    Table,
    /// The same table, limited to the cluster's request partition
    /// (`table::requests_pk`): the only items a worker may write.
    Requests,
    /// The token secret `kubeboot/<cluster>/join` (every node reads it).
    JoinSecret,
    /// The certificate-key secret `kubeboot/<cluster>/certificate-key`: the
    /// control-plane role only, since the key decrypts the uploaded CA keys.
    CertificateKeySecret,
    /// The SSM parameters under `/kubeboot/<cluster>/`.
    SsmPrefix,
    /// The lifecycle queue.
    LifecycleQueue,
    /// The cluster's Auto Scaling groups.
    AutoScalingGroups,
    /// The KMS key of the two join secrets (no other data, no service
    /// principal), only when used by Secrets Manager for them.
    SecretsKey,
    /// Describe calls that have no resource-level permissions (EC2
    /// DescribeInstances, Auto Scaling DescribeAutoScalingInstances).
    AnyInstance,
    /// The cluster's own CloudFormation stack
    /// (`arn:aws:cloudformation:<region>:<account>:stack/<aws.cloudformation_stack>/*`),
    /// which a control plane signals after bootstrap.
    Stack,
    /// The backup bucket itself (listing): `arn:aws:s3:::<aws.backup_bucket>`.
    BackupBucket,
    /// This cluster's snapshots in it:
    /// `arn:aws:s3:::<aws.backup_bucket>/<backup.prefix>/<cluster>/*`.
    Backups,
    /// The KMS key the backups are encrypted with (the cluster key, the
    /// bucket's default), used by S3 on the caller's behalf.
    BackupKey,
    /// The service-account issuer's two documents in the bucket that
    /// serves them: `arn:aws:s3:::<aws.oidc_bucket>/<issuer path>/*`.
    OidcDocuments,
}

/// One IAM permission: an action on one kind of resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// `service:Action` as IAM spells it.
    pub action: &'static str,
    pub resource: Resource,
}

/// One request the agent sends, and what IAM must grant for it.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    /// `service:Operation` as the SDK names it (what the clients check).
    pub call: &'static str,
    pub roles: &'static [Role],
    /// What IAM authorizes for this call. Usually the call itself, but
    /// TransactWriteItems is authorized per item action, and Secrets Manager
    /// uses the secrets key on the caller's behalf.
    pub grants: &'static [Grant],
    /// Granted to the control-plane role only, on top of `grants` (a call
    /// both roles send on resources only one may reach).
    pub control_plane_only: &'static [Grant],
    /// Where and why; read when reviewing a policy change.
    pub why: &'static str,
}

const fn on(action: &'static str, resource: Resource) -> Grant {
    Grant { action, resource }
}

const TABLE: Resource = Resource::Table;

/// Every request the agent sends, for which role, and what it needs granted.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        call: "dynamodb:GetItem",
        roles: BOTH,
        grants: &[
            on("dynamodb:GetItem", TABLE),
            on("dynamodb:GetItem", Resource::Requests),
        ],
        control_plane_only: &[],
        why:
            "read the cluster record, the join pointer, a refresh request, a lock (registry, lock)",
    },
    Operation {
        call: "dynamodb:PutItem",
        roles: BOTH,
        grants: &[on("dynamodb:PutItem", Resource::Requests)],
        control_plane_only: &[],
        why: "a joining node records a request for fresh join material, in the request partition only (registry)",
    },
    Operation {
        call: "dynamodb:UpdateItem",
        roles: CP,
        grants: &[on("dynamodb:UpdateItem", TABLE)],
        control_plane_only: &[],
        why: "acquire, renew, release and take over the init/membership/leader locks (lock)",
    },
    Operation {
        call: "dynamodb:TransactWriteItems",
        roles: CP,
        // The fence check, then one update (cluster record), put (member
        // record, join pointer) or delete (member record).
        grants: &[
            on("dynamodb:ConditionCheckItem", TABLE),
            on("dynamodb:UpdateItem", TABLE),
            on("dynamodb:PutItem", TABLE),
            on("dynamodb:DeleteItem", TABLE),
        ],
        control_plane_only: &[],
        why: "fenced writes: cluster record, member records, join pointer (registry)",
    },
    Operation {
        call: "dynamodb:Query",
        roles: BOTH,
        grants: &[on("dynamodb:Query", TABLE)],
        control_plane_only: &[],
        why: "list the cluster's member records (registry, reconciler; `kubeboot status` on any node)",
    },
    Operation {
        call: "secretsmanager:GetSecretValue",
        roles: BOTH,
        grants: &[
            on("secretsmanager:GetSecretValue", Resource::JoinSecret),
            on("kms:Decrypt", Resource::SecretsKey),
        ],
        control_plane_only: &[on(
            "secretsmanager:GetSecretValue",
            Resource::CertificateKeySecret,
        )],
        why: "read the join-material versions the join pointer names; the certificate key only on control planes (join_material)",
    },
    Operation {
        call: "secretsmanager:PutSecretValue",
        roles: CP,
        grants: &[
            on("secretsmanager:PutSecretValue", Resource::JoinSecret),
            on("secretsmanager:PutSecretValue", Resource::CertificateKeySecret),
            on("kms:GenerateDataKey", Resource::SecretsKey),
        ],
        control_plane_only: &[],
        why: "publish a new join-material version (init, refresh)",
    },
    Operation {
        call: "secretsmanager:CreateSecret",
        roles: CP,
        grants: &[
            on("secretsmanager:CreateSecret", Resource::JoinSecret),
            on("secretsmanager:CreateSecret", Resource::CertificateKeySecret),
            on("kms:GenerateDataKey", Resource::SecretsKey),
        ],
        control_plane_only: &[],
        why: "create the secret when the stack did not (join_material); scoped to its one name",
    },
    Operation {
        call: "ssm:PutParameter",
        roles: CP,
        grants: &[on("ssm:PutParameter", Resource::SsmPrefix)],
        control_plane_only: &[],
        why: "publish the discovery values endpoint and ca-cert-hashes (join_material)",
    },
    Operation {
        call: "sqs:ReceiveMessage",
        roles: CP,
        grants: &[on("sqs:ReceiveMessage", Resource::LifecycleQueue)],
        control_plane_only: &[],
        why: "the leader reads ASG lifecycle events (lifecycle)",
    },
    Operation {
        call: "sqs:DeleteMessage",
        roles: CP,
        grants: &[on("sqs:DeleteMessage", Resource::LifecycleQueue)],
        control_plane_only: &[],
        why: "a handled or irrelevant event is deleted (lifecycle)",
    },
    Operation {
        call: "sqs:ChangeMessageVisibility",
        roles: CP,
        grants: &[on("sqs:ChangeMessageVisibility", Resource::LifecycleQueue)],
        control_plane_only: &[],
        why: "an event being handled is kept invisible while cleanup runs (lifecycle)",
    },
    Operation {
        call: "sqs:SendMessage",
        roles: BOTH,
        grants: &[on("sqs:SendMessage", Resource::LifecycleQueue)],
        control_plane_only: &[],
        why: "a terminating worker asks the leader to drain it (daemon)",
    },
    Operation {
        call: "autoscaling:CompleteLifecycleAction",
        roles: CP,
        grants: &[on(
            "autoscaling:CompleteLifecycleAction",
            Resource::AutoScalingGroups,
        )],
        control_plane_only: &[],
        why: "let a terminating instance go once its member and Node are cleaned up (lifecycle)",
    },
    Operation {
        call: "autoscaling:RecordLifecycleActionHeartbeat",
        roles: CP,
        grants: &[on(
            "autoscaling:RecordLifecycleActionHeartbeat",
            Resource::AutoScalingGroups,
        )],
        control_plane_only: &[],
        why: "keep a termination waiting while a drain runs (lifecycle)",
    },
    Operation {
        call: "autoscaling:DescribeAutoScalingInstances",
        roles: CP,
        grants: &[on(
            "autoscaling:DescribeAutoScalingInstances",
            Resource::AnyInstance,
        )],
        control_plane_only: &[],
        why: "a termination notice is acted on only if Auto Scaling is terminating that instance (lifecycle)",
    },
    Operation {
        call: "ec2:DescribeInstances",
        roles: CP,
        grants: &[on("ec2:DescribeInstances", Resource::AnyInstance)],
        control_plane_only: &[],
        why: "which instances behind etcd members are gone (reconciler)",
    },
    Operation {
        call: "cloudformation:SignalResource",
        roles: CP,
        grants: &[on("cloudformation:SignalResource", Resource::Stack)],
        control_plane_only: &[],
        why: "a bootstrapped control plane tells its stack's rolling update it is in service (cloudformation)",
    },
    Operation {
        call: "s3:CreateMultipartUpload",
        roles: CP,
        grants: &[
            on("s3:PutObject", Resource::Backups),
            on("kms:GenerateDataKey", Resource::BackupKey),
        ],
        control_plane_only: &[],
        why: "an etcd snapshot streams into a multipart upload (backup)",
    },
    Operation {
        call: "s3:UploadPart",
        roles: CP,
        grants: &[
            on("s3:PutObject", Resource::Backups),
            on("kms:GenerateDataKey", Resource::BackupKey),
            on("kms:Decrypt", Resource::BackupKey),
        ],
        control_plane_only: &[],
        why: "each part of a snapshot (backup); SSE-KMS multipart needs the data key",
    },
    Operation {
        call: "s3:CompleteMultipartUpload",
        roles: CP,
        grants: &[
            on("s3:PutObject", Resource::Backups),
            on("kms:Decrypt", Resource::BackupKey),
        ],
        control_plane_only: &[],
        why: "a snapshot whose stream verified becomes an object (backup)",
    },
    Operation {
        call: "s3:AbortMultipartUpload",
        roles: CP,
        grants: &[on("s3:AbortMultipartUpload", Resource::Backups)],
        control_plane_only: &[],
        why: "a failed snapshot, or one a dead leader left open, leaves no parts (backup)",
    },
    Operation {
        call: "s3:ListMultipartUploads",
        roles: CP,
        grants: &[on("s3:ListBucketMultipartUploads", Resource::BackupBucket)],
        control_plane_only: &[],
        why: "finding uploads a dead leader left open (backup)",
    },
    Operation {
        call: "s3:PutObject",
        roles: CP,
        grants: &[
            on("s3:PutObject", Resource::Backups),
            on("kms:GenerateDataKey", Resource::BackupKey),
            on("s3:PutObject", Resource::OidcDocuments),
        ],
        control_plane_only: &[],
        why: "a verified snapshot's manifest (backup); the service-account issuer's documents when the signing keys change (issuer)",
    },
    Operation {
        call: "s3:ListObjectsV2",
        roles: CP,
        grants: &[on("s3:ListBucket", Resource::BackupBucket)],
        control_plane_only: &[],
        why: "the snapshots, for retention, status and `backup list` (backup)",
    },
    Operation {
        call: "s3:GetObject",
        roles: CP,
        grants: &[
            on("s3:GetObject", Resource::Backups),
            on("kms:Decrypt", Resource::BackupKey),
            on("s3:GetObject", Resource::OidcDocuments),
        ],
        control_plane_only: &[],
        why: "manifests, and snapshots read back by `backup verify` and restore (backup); the issuer's published documents, compared before writing (issuer)",
    },
    Operation {
        call: "s3:DeleteObject",
        roles: CP,
        grants: &[on("s3:DeleteObject", Resource::Backups)],
        control_plane_only: &[],
        why: "snapshots retention no longer keeps (backup)",
    },
];

/// What `role`'s policy must grant: each action with its resource kind, sorted.
pub fn grants(role: Role) -> BTreeSet<Grant> {
    OPERATIONS
        .iter()
        .filter(|op| op.roles.contains(&role))
        .flat_map(|op| {
            let extra = if role == Role::ControlPlane {
                op.control_plane_only
            } else {
                &[]
            };
            op.grants.iter().chain(extra).copied()
        })
        .collect()
}

/// The IAM actions `role` needs, sorted.
pub fn actions(role: Role) -> BTreeSet<&'static str> {
    grants(role).into_iter().map(|g| g.action).collect()
}

/// Whether the agent running as `role` may send `call` (`service:Operation`).
pub fn permits(role: Role, call: &str) -> bool {
    OPERATIONS
        .iter()
        .any(|op| op.call == call && op.roles.contains(&role))
}

/// The message when the code sends something this list does not grant.
pub fn refusal(role: Role, call: &str) -> String {
    format!(
        "kubeboot does not perform {call} as a {} node: it is not in the operation list \
         (agent/src/iam.rs), so the instance role in infra/ does not grant it; \
         add it there, with the role and why, if the call is intended",
        role.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reads_join_material_but_never_writes_the_cluster_state() {
        let worker = actions(Role::Worker);
        assert!(worker.contains("secretsmanager:GetSecretValue"));
        let puts: Vec<Resource> = grants(Role::Worker)
            .into_iter()
            .filter(|g| g.action == "dynamodb:PutItem")
            .map(|g| g.resource)
            .collect();
        assert_eq!(puts, [Resource::Requests], "a worker writes requests only");
        let secrets: Vec<Resource> = grants(Role::Worker)
            .into_iter()
            .filter(|g| g.action.starts_with("secretsmanager:"))
            .map(|g| g.resource)
            .collect();
        assert_eq!(
            secrets,
            [Resource::JoinSecret],
            "a worker reads the token secret and never the certificate key"
        );
        assert!(grants(Role::ControlPlane).contains(&on(
            "secretsmanager:GetSecretValue",
            Resource::CertificateKeySecret
        )));
        for forbidden in [
            "dynamodb:UpdateItem",
            "dynamodb:TransactWriteItems",
            "secretsmanager:PutSecretValue",
            "ssm:PutParameter",
            "sqs:ReceiveMessage",
            "ec2:DescribeInstances",
            "cloudformation:SignalResource",
        ] {
            assert!(!worker.contains(forbidden), "{forbidden}");
        }
    }

    fn named_exactly(name: &str) {
        let (service, action) = name.split_once(':').expect("service:Action");
        assert!(
            !service.is_empty()
                && service
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{name}"
        );
        assert!(
            action.starts_with(|c: char| c.is_ascii_uppercase()),
            "{name}"
        );
        assert!(
            action.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}: no wildcards"
        );
    }

    #[test]
    fn every_call_and_grant_is_named_exactly_with_no_wildcards() {
        let mut seen = BTreeSet::new();
        for op in OPERATIONS {
            named_exactly(op.call);
            op.grants.iter().for_each(|g| named_exactly(g.action));
            assert!(!op.roles.is_empty() && !op.grants.is_empty(), "{}", op.call);
            assert!(seen.insert(op.call), "{} listed twice", op.call);
        }
    }

    #[test]
    fn a_transaction_is_sendable_but_its_item_actions_are_only_granted() {
        assert!(permits(Role::ControlPlane, "dynamodb:TransactWriteItems"));
        assert!(!permits(Role::Worker, "dynamodb:TransactWriteItems"));
        assert!(!permits(Role::ControlPlane, "dynamodb:DeleteItem"));
        assert!(!permits(Role::ControlPlane, "kms:Decrypt"));
        let cp = actions(Role::ControlPlane);
        assert!(cp.contains("dynamodb:ConditionCheckItem") && cp.contains("dynamodb:DeleteItem"));
        assert!(
            !cp.contains("dynamodb:TransactWriteItems"),
            "not an IAM action"
        );
    }

    /// The agent's source files (without their unit tests) and their text.
    fn sources() -> Vec<(std::path::PathBuf, String)> {
        let mut out = Vec::new();
        let mut stack = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("iam.rs") {
                    let text = std::fs::read_to_string(&path).expect("read");
                    let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
                    out.push((path, code));
                }
            }
        }
        out
    }

    /// Every listed call appears as an SDK call in the agent's source, so the
    /// list cannot keep a permission the code no longer uses.
    #[test]
    fn every_called_action_is_called_somewhere_in_the_source() {
        let text: String = sources().into_iter().map(|(_, t)| t).collect();
        for op in OPERATIONS {
            let (_, name) = op.call.split_once(':').expect("service:Operation");
            let call = format!(".{}()", snake(name));
            assert!(
                text.contains(&call),
                "{} listed but {call} is not in agent/src",
                op.call
            );
        }
    }

    /// The other way round, for paths no test reaches (the clients' guard
    /// catches the rest): every operation called on an SDK client field
    /// (`client`, `secrets`, `ssm`, in files that use an AWS SDK) is listed.
    #[test]
    fn every_operation_the_source_calls_on_a_client_is_listed() {
        // Tests and the local demo create the table; production uses the template.
        const NOT_AGENT_OPERATIONS: &[&str] = &["create_table", "update_time_to_live"];
        // Fields named like clients (`endpoints.ssm`) that are plain values.
        const NOT_SDK: &[&str] = &["as_deref", "as_ref", "clone", "is_some", "is_none", "take"];
        let listed: BTreeSet<String> = OPERATIONS
            .iter()
            .map(|op| snake(op.call.split_once(':').expect("service:Operation").1))
            .collect();
        let mut found = 0;
        // Only files that use an AWS SDK crate: etcd and kube clients are `client` too.
        for (path, text) in sources()
            .into_iter()
            .filter(|(_, t)| t.contains("aws_sdk_"))
        {
            for receiver in ["client", "secrets", "ssm"] {
                for (at, _) in text.match_indices(receiver) {
                    let before = text[..at].chars().next_back();
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        continue;
                    }
                    let rest = text[at + receiver.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('.') else {
                        continue;
                    };
                    let method: String = rest
                        .trim_start()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if method.is_empty()
                        || !rest.trim_start()[method.len()..].starts_with("()")
                        || NOT_AGENT_OPERATIONS.contains(&method.as_str())
                        || NOT_SDK.contains(&method.as_str())
                    {
                        continue;
                    }
                    found += 1;
                    assert!(
                        listed.contains(&method),
                        "{} calls .{method}() on an SDK client but iam::OPERATIONS does not list it",
                        path.display()
                    );
                }
            }
        }
        assert!(
            found >= OPERATIONS.len(),
            "the scan found only {found} calls"
        );
    }

    fn snake(pascal: &str) -> String {
        let mut out = String::new();
        for (i, c) in pascal.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }
}
