//! The typed configuration the rest of the agent reads.
//!
//! It is built only from a merged, already validated key set (see
//! [`super::merge`]), so deserializing it cannot fail on user input; the
//! shapes here mirror [`super::schema::KEYS`] one to one (a test checks).

use serde::{Deserialize, Deserializer};
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration of one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: Cluster,
    pub node: Node,
    pub aws: Aws,
    pub imds: Imds,
    pub etcd: Etcd,
    pub lock: Lock,
    pub timeouts: Timeouts,
    pub addons: Addons,
    pub daemon: Daemon,
    pub backup: Backup,
    pub metrics: Metrics,
    pub paths: Paths,
    pub binaries: Binaries,
    pub log: Log,
}

fn lowercase_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    Ok(super::value::lowercase_host(&s))
}

/// Which cluster this node belongs to and how it is shaped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub kubernetes_version: String,
    /// Host in lowercase, whatever the source wrote (kubeadm refuses capitals).
    #[serde(deserialize_with = "lowercase_endpoint")]
    pub control_plane_endpoint: String,
    pub pod_subnet: String,
    pub service_subnet: String,
    pub dns_domain: String,
    /// The service-account issuer published for IAM roles for service
    /// accounts (see [`crate::oidc`]); `None`: kubeadm's default.
    pub service_account_issuer: Option<String>,
}

/// What this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
}

impl Role {
    /// The name used in logs, metrics dimensions and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub role: Role,
}

/// AWS resources, retry policy and endpoint overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aws {
    pub region: Option<String>,
    pub table: String,
    pub join_secret: String,
    /// Only the control-plane role can read it: whoever holds the key and
    /// the uploaded certificates owns the cluster's CAs.
    pub certificate_key_secret: String,
    pub ssm_prefix: String,
    pub lifecycle_queue_url: Option<String>,
    pub lifecycle_hook: String,
    /// The stack and the logical id of this node's group, signalled after
    /// bootstrap (control planes only, both or neither).
    pub cloudformation_stack: Option<String>,
    pub cloudformation_resource: Option<String>,
    pub backup_bucket: Option<String>,
    /// Where the issuer's documents are published (control planes).
    pub oidc_bucket: Option<String>,
    pub kms_key_id: Option<String>,
    pub s3_force_path_style: bool,
    pub max_attempts: u32,
    #[serde(deserialize_with = "duration")]
    pub initial_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub attempt_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub operation_timeout: Duration,
    #[serde(default)]
    pub endpoints: Endpoints,
}

/// Per-service endpoint overrides (emulators, VPC endpoints with custom DNS).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    pub dynamodb: Option<String>,
    pub ssm: Option<String>,
    pub secretsmanager: Option<String>,
    pub ec2: Option<String>,
    pub s3: Option<String>,
    pub sqs: Option<String>,
    pub autoscaling: Option<String>,
    pub sts: Option<String>,
    pub cloudformation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imds {
    pub endpoint: String,
    pub user_data: bool,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
}

/// etcd scheme for member URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdScheme {
    Https,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    pub scheme: EtcdScheme,
    #[serde(deserialize_with = "duration")]
    pub dial_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub promote_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    #[serde(deserialize_with = "duration")]
    pub margin: Duration,
    #[serde(deserialize_with = "duration")]
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(deserialize_with = "duration")]
    pub kubeadm_init: Duration,
    #[serde(deserialize_with = "duration")]
    pub kubeadm_join: Duration,
    #[serde(deserialize_with = "duration")]
    pub kubeadm_reset: Duration,
    #[serde(deserialize_with = "duration")]
    pub node_ready: Duration,
    #[serde(deserialize_with = "duration")]
    pub join_material: Duration,
    #[serde(deserialize_with = "duration")]
    pub drain: Duration,
    #[serde(deserialize_with = "duration")]
    pub kube_api: Duration,
    #[serde(deserialize_with = "duration")]
    pub pod_network: Duration,
}

/// The cluster add-ons control planes apply ([`crate::addons`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addons {
    pub directory: PathBuf,
    pub pod_network: PodNetwork,
    pub cluster_autoscaler_role_arn: Option<String>,
}

/// Which pod network kubeboot applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodNetwork {
    Flannel,
    /// The operator installs one.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    #[serde(deserialize_with = "duration")]
    pub period: Duration,
    #[serde(deserialize_with = "duration")]
    pub jitter: Duration,
    #[serde(deserialize_with = "duration")]
    pub reconcile_grace: Duration,
    #[serde(deserialize_with = "duration")]
    pub lifecycle_heartbeat: Duration,
    #[serde(deserialize_with = "duration")]
    pub watchdog_stall: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    pub enabled: bool,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    pub prefix: String,
    #[serde(deserialize_with = "duration")]
    pub keep_all_within: Duration,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub before_membership_change: bool,
}

/// Where EMF documents go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsSink {
    Agent,
    File,
    Stdout,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub sink: MetricsSink,
    pub namespace: String,
    pub agent_endpoint: String,
    pub file: Option<PathBuf>,
    pub log_group: Option<String>,
    pub buffer: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    pub kubernetes_dir: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub etcd_data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binaries {
    pub kubeadm: PathBuf,
    pub etcd_restore_tool: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub level: String,
    pub format: String,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    super::value::parse_duration(&s)
        .ok_or_else(|| serde::de::Error::custom(format!("invalid duration {s:?}")))
}
