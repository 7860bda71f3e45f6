//! Every configuration key kubeboot knows, in one table.
//!
//! The table is the single source of truth: it drives validation of every
//! source (file, drop-ins, user-data, environment), the `KUBEBOOT_*` variable
//! names, the defaults that `config show` prints, and the reference in the
//! README (a test keeps that in sync). A key that is not here is a typo.

/// What a key holds and which values are acceptable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Cluster name: lowercase DNS label, 1-40 chars (it becomes part of AWS names).
    ClusterName,
    /// Kubernetes version as kubeadm accepts it: `1.31.2` or `v1.31.2`.
    KubeVersion,
    /// `host:port`, e.g. the API load balancer.
    HostPort,
    /// IPv4 CIDR block.
    Cidr,
    /// AWS region code, e.g. `eu-west-1`.
    Region,
    /// An AWS endpoint or queue URL: `https://`, or `http://` to a loopback
    /// host only (a local emulator or proxy); plain http off the machine
    /// would carry the join token from Secrets Manager in the clear.
    AwsUrl,
    /// The instance metadata service: `http://` only (IMDS serves no TLS).
    ImdsUrl,
    /// A service-account issuer published as an OIDC provider: `https://`
    /// only (the API server and AWS STS refuse anything else), no trailing
    /// `/` (the JWKS URI is `<issuer>/keys.json`).
    IssuerUrl,
    /// Metrics sink address: `tcp://host:port` or `udp://host:port`.
    SocketUrl,
    /// Absolute filesystem path.
    AbsPath,
    /// Non-empty single-line text.
    Text,
    /// DynamoDB table name.
    TableName,
    /// S3 bucket name.
    BucketName,
    /// SSM parameter path prefix (`/a/b`, no trailing slash).
    SsmPrefix,
    /// Secrets Manager secret name.
    SecretName,
    /// CloudFormation stack name: a letter, then letters, digits and `-`,
    /// 1-128 characters.
    StackName,
    /// CloudFormation logical resource id: 1-255 letters and digits.
    LogicalId,
    /// An IAM role ARN: `arn:<partition>:iam::<12 digits>:role/<path/name>`.
    RoleArn,
    /// Whole number within bounds (inclusive).
    Int { min: i64, max: i64 },
    /// `true` or `false`.
    Bool,
    /// Duration such as `500ms`, `30s`, `5m`, `6h`, `1h30m`; bounds in milliseconds.
    Duration { min_ms: u64, max_ms: u64 },
    /// One of a fixed set of words.
    OneOf(&'static [&'static str]),
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted path, e.g. `cluster.name`.
    pub path: &'static str,
    pub kind: Kind,
    /// Default as a TOML literal; `None` when the key has no default.
    pub default: Option<&'static str>,
    /// Must be set by some source after merging.
    pub required: bool,
    /// Value never printed: redacted in `config show` and in error messages.
    pub secret: bool,
    /// Names the cluster; sources that set it must agree (a node must never
    /// silently join another cluster because two sources disagree).
    pub identity: bool,
    /// Cannot come from user-data: it is needed to fetch user-data.
    pub not_from_user_data: bool,
    /// One line for the reference.
    pub doc: &'static str,
}

const fn key(
    path: &'static str,
    kind: Kind,
    default: Option<&'static str>,
    doc: &'static str,
) -> Key {
    Key {
        path,
        kind,
        default,
        required: false,
        secret: false,
        identity: false,
        not_from_user_data: false,
        doc,
    }
}

const fn required(mut k: Key) -> Key {
    k.required = true;
    k
}

const fn identity(mut k: Key) -> Key {
    k.identity = true;
    k
}

const fn local_only(mut k: Key) -> Key {
    k.not_from_user_data = true;
    k
}

const SEC: u64 = 1000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

const fn dur(min_ms: u64, max_ms: u64) -> Kind {
    Kind::Duration { min_ms, max_ms }
}

/// Every key, grouped by section. Order is the order of the reference.
#[rustfmt::skip]
pub const KEYS: &[Key] = &[
    // [cluster]
    identity(required(key("cluster.name", Kind::ClusterName, None,
        "Cluster name; scopes the lock, records, SSM paths and secret names."))),
    required(key("cluster.kubernetes_version", Kind::KubeVersion, None,
        "Kubernetes version kubeadm installs, e.g. `1.31.2`.")),
    required(key("cluster.control_plane_endpoint", Kind::HostPort, None,
        "API server load balancer as `host:port` (kubeadm's controlPlaneEndpoint).")),
    key("cluster.pod_subnet", Kind::Cidr, Some("\"10.244.0.0/16\""), "Pod network CIDR."),
    key("cluster.service_subnet", Kind::Cidr, Some("\"10.96.0.0/12\""), "Service network CIDR."),
    key("cluster.dns_domain", Kind::Text, Some("\"cluster.local\""), "Cluster DNS domain."),
    key("cluster.service_account_issuer", Kind::IssuerUrl, None,
        "The API server's service-account issuer as a public OIDC provider for IAM roles for service accounts, e.g. `https://<bucket>.s3.<region>.amazonaws.com/<cluster>`: kubeadm gets `--service-account-issuer` and `--service-account-jwks-uri` (`<issuer>/keys.json`), and control planes publish the discovery document and the JWKS to `aws.oidc_bucket` under the issuer's path. Unset: kubeadm's default issuer, nothing published."),
    // [node]
    required(key("node.role", Kind::OneOf(&["control-plane", "worker"]), None,
        "What this node is: `control-plane` (stacked etcd) or `worker`.")),
    // [aws]
    key("aws.region", Kind::Region, None, "AWS region; read from IMDS when unset."),
    identity(required(key("aws.table", Kind::TableName, None,
        "DynamoDB table holding the lock, cluster and member records."))),
    key("aws.join_secret", Kind::SecretName, None,
        "Secrets Manager secret for the bootstrap token (every node reads it); default `kubeboot/<cluster>/join`."),
    key("aws.certificate_key_secret", Kind::SecretName, None,
        "Secrets Manager secret for the certificate key that decrypts kubeadm's uploaded CA keys (control planes only); default `kubeboot/<cluster>/certificate-key`."),
    key("aws.ssm_prefix", Kind::SsmPrefix, None,
        "SSM parameter prefix for discovery values; default `/kubeboot/<cluster>`."),
    key("aws.lifecycle_queue_url", Kind::AwsUrl, None,
        "SQS queue receiving ASG lifecycle events (control planes only)."),
    key("aws.lifecycle_hook", Kind::Text, Some("\"kubeboot-terminate\""),
        "Name of the ASGs' termination lifecycle hook, for a node completing its own action."),
    key("aws.backup_bucket", Kind::BucketName, None, "S3 bucket for etcd snapshots."),
    key("aws.oidc_bucket", Kind::BucketName, None,
        "S3 bucket serving `cluster.service_account_issuer`'s two documents (control planes write them); required with the issuer on control planes."),
    key("aws.kms_key_id", Kind::Text, None, "KMS key for SSE-KMS on backups; bucket default when unset."),
    key("aws.cloudformation_stack", Kind::StackName, None,
        "The CloudFormation stack that launched this control plane: signalled once bootstrap has confirmed its etcd member, so a rolling update replaces control planes one at a time (control planes only; with aws.cloudformation_resource)."),
    key("aws.cloudformation_resource", Kind::LogicalId, None,
        "Logical id of this node's Auto Scaling group in aws.cloudformation_stack, the resource the signal is for (control planes only; with aws.cloudformation_stack)."),
    key("aws.s3_force_path_style", Kind::Bool, Some("false"),
        "Path-style S3 addressing (needed by S3 emulators)."),
    key("aws.max_attempts", Kind::Int { min: 1, max: 10 }, Some("5"),
        "SDK retry attempts per AWS call (standard retry mode)."),
    key("aws.initial_backoff", dur(10, 10 * SEC), Some("\"500ms\""), "SDK retry initial backoff."),
    key("aws.max_backoff", dur(100, 5 * MIN), Some("\"20s\""), "SDK retry backoff cap."),
    key("aws.attempt_timeout", dur(100, 5 * MIN), Some("\"10s\""), "Timeout of one attempt of an AWS call."),
    key("aws.operation_timeout", dur(SEC, 10 * MIN), Some("\"60s\""),
        "Timeout of an AWS call including its retries."),
    key("aws.endpoints.dynamodb", Kind::AwsUrl, None, "Endpoint override for DynamoDB."),
    key("aws.endpoints.ssm", Kind::AwsUrl, None, "Endpoint override for SSM."),
    key("aws.endpoints.secretsmanager", Kind::AwsUrl, None, "Endpoint override for Secrets Manager."),
    key("aws.endpoints.ec2", Kind::AwsUrl, None, "Endpoint override for EC2."),
    key("aws.endpoints.s3", Kind::AwsUrl, None, "Endpoint override for S3."),
    key("aws.endpoints.sqs", Kind::AwsUrl, None, "Endpoint override for SQS."),
    key("aws.endpoints.autoscaling", Kind::AwsUrl, None, "Endpoint override for Auto Scaling."),
    key("aws.endpoints.sts", Kind::AwsUrl, None, "Endpoint override for STS."),
    key("aws.endpoints.cloudformation", Kind::AwsUrl, None, "Endpoint override for CloudFormation."),
    // [imds]
    local_only(key("imds.endpoint", Kind::ImdsUrl, Some("\"http://169.254.169.254\""),
        "Instance metadata service (IMDSv2) endpoint.")),
    local_only(key("imds.user_data", Kind::Bool, Some("true"),
        "Merge the kubeboot TOML part of the instance user-data.")),
    local_only(key("imds.request_timeout", dur(100, MIN), Some("\"2s\""), "Timeout of one IMDS request.")),
    local_only(key("imds.deadline", dur(SEC, 30 * MIN), Some("\"5m\""),
        "How long to keep retrying IMDS in the early-boot window.")),
    // [etcd]
    key("etcd.scheme", Kind::OneOf(&["https", "http"]), Some("\"https\""),
        "How the agent reaches etcd. kubeadm's stacked etcd is always https with client certificates on ports 2379/2380; `http` is for tests against plain etcd."),
    key("etcd.dial_timeout", dur(100, MIN), Some("\"5s\""), "Timeout to connect to an etcd member."),
    key("etcd.request_timeout", dur(100, 5 * MIN), Some("\"10s\""), "Timeout of one etcd request."),
    key("etcd.promote_timeout", dur(SEC, 30 * MIN), Some("\"2m\""),
        "How long a new learner may take to catch up and be promoted."),
    // [lock]
    key("lock.lease", dur(3 * SEC, 10 * MIN), Some("\"30s\""),
        "Lease of the DynamoDB locks; a silent holder loses the lock after it."),
    key("lock.margin", dur(500, 5 * MIN), Some("\"5s\""),
        "Safety margin: a holder steps down when it has not renewed within lease - margin."),
    key("lock.acquire_timeout", dur(SEC, 24 * HOUR), Some("\"20m\""),
        "How long bootstrap waits for a lock before failing."),
    // [timeouts]
    key("timeouts.kubeadm_init", dur(10 * SEC, 2 * HOUR), Some("\"10m\""), "Deadline of `kubeadm init`."),
    key("timeouts.kubeadm_join", dur(10 * SEC, 2 * HOUR), Some("\"10m\""), "Deadline of `kubeadm join`."),
    key("timeouts.kubeadm_reset", dur(5 * SEC, HOUR), Some("\"2m\""), "Deadline of `kubeadm reset`."),
    key("timeouts.node_ready", dur(5 * SEC, 2 * HOUR), Some("\"10m\""),
        "How long a joined node may take to become Ready."),
    key("timeouts.join_material", dur(5 * SEC, DAY), Some("\"20m\""),
        "How long a joining node waits for usable join material (cluster initialized, token and certificate key not about to expire) before failing."),
    key("timeouts.drain", dur(5 * SEC, 2 * HOUR), Some("\"5m\""), "Deadline of a node drain."),
    key("timeouts.kube_api", dur(100, 5 * MIN), Some("\"30s\""), "Timeout of one Kubernetes API request."),
    key("timeouts.pod_network", dur(5 * SEC, 6 * HOUR), Some("\"45m\""),
        "How long a joined worker whose Node is NotReady only for want of a pod network (no CNI configuration yet: the control planes apply the add-on, then its Pod starts here) keeps waiting, from the end of its join; timeouts.node_ready bounds every other NotReady."),
    // [daemon]
    key("daemon.period", dur(SEC, HOUR), Some("\"30s\""), "Period of the daemon's loops."),
    key("daemon.jitter", dur(0, 10 * MIN), Some("\"5s\""), "Random extra delay per loop turn (< period)."),
    key("daemon.reconcile_grace", dur(10 * SEC, DAY), Some("\"5m\""),
        "How long an instance must be gone before its etcd member is removed."),
    key("daemon.lifecycle_heartbeat", dur(10 * SEC, 2 * HOUR), Some("\"60s\""),
                "Interval of lifecycle-action heartbeats while cleanup runs."),
    key("daemon.watchdog_stall", dur(2 * SEC, DAY), Some("\"15m\""),
        "A daemon turn running longer than this is stuck: the systemd watchdog trips and the unit restarts."),
    // [backup]
    key("backup.enabled", Kind::Bool, Some("true"), "Take etcd snapshots to S3 (control planes, leader only)."),
    key("backup.interval", dur(5 * MIN, 7 * DAY), Some("\"1h\""), "Time between scheduled snapshots (the leader's; jittered by daemon.jitter)."),
    key("backup.prefix", Kind::Text, Some("\"etcd-snapshots\""), "S3 key prefix for snapshots (then <cluster>/)."),
    key("backup.keep_all_within", dur(0, 30 * DAY), Some("\"6h\""), "Every snapshot younger than this is kept."),
    key("backup.keep_hourly", Kind::Int { min: 0, max: 720 }, Some("24"), "The newest snapshot of each of this many newest hours is kept."),
    key("backup.keep_daily", Kind::Int { min: 0, max: 3650 }, Some("14"), "The newest snapshot of each of this many newest days is kept."),
    key("backup.timeout", dur(MIN, DAY), Some("\"30m\""), "A snapshot not uploaded and verified within this is aborted (its upload too)."),
    key("backup.before_membership_change", Kind::Bool, Some("true"),
        "Snapshot before the agent removes an etcd member."),
    // [addons]
    key("addons.directory", Kind::AbsPath, Some("\"/usr/share/kubeboot/addons\""),
        "Where the image keeps the add-on manifests (`<name>.yaml`, the repository's addons/); control planes apply them."),
    key("addons.pod_network", Kind::OneOf(&["flannel", "none"]), Some("\"flannel\""),
        "The pod network control planes apply after init and on leader turns: `flannel` (VXLAN, UDP 8472; its Network is cluster.pod_subnet), or `none` to install one yourself (Nodes stay NotReady until you do)."),
    key("addons.cluster_autoscaler_role_arn", Kind::RoleArn, None,
        "Set: control planes also apply cluster-autoscaler, assuming this role through the service-account issuer (infra/'s ClusterAutoscalerRoleArn output; needs cluster.service_account_issuer). Unset: no cluster-autoscaler."),
    // [metrics]
    key("metrics.sink", Kind::OneOf(&["agent", "file", "stdout", "off"]), Some("\"agent\""),
        "Where EMF metrics go: CloudWatch agent socket, a file, stdout, or nowhere."),
    key("metrics.namespace", Kind::Text, Some("\"Kubeboot\""), "CloudWatch metrics namespace."),
    key("metrics.agent_endpoint", Kind::SocketUrl, Some("\"tcp://127.0.0.1:25888\""),
        "CloudWatch agent EMF endpoint."),
    key("metrics.file", Kind::AbsPath, None, "EMF output file when sink = \"file\"."),
    key("metrics.log_group", Kind::Text, None, "LogGroupName sent to the CloudWatch agent."),
    key("metrics.buffer", Kind::Int { min: 16, max: 100_000 }, Some("1024"),
        "Metric documents buffered before new ones are dropped (and counted)."),
    // [paths]
    key("paths.kubernetes_dir", Kind::AbsPath, Some("\"/etc/kubernetes\""),
        "kubeadm's configuration root. Keep the default on a node: kubeadm takes only its `pki/` from here (certificatesDir) and always writes its kubeconfigs and manifests to /etc/kubernetes; other values are for tests and the simulation."),
    key("paths.state_dir", Kind::AbsPath, Some("\"/var/lib/kubeboot\""), "Checkpoints and local state."),
    key("paths.run_dir", Kind::AbsPath, Some("\"/run/kubeboot\""), "Runtime files (rendered kubeadm configs)."),
    key("paths.etcd_data_dir", Kind::AbsPath, Some("\"/var/lib/etcd\""), "Stacked etcd data directory."),
    // [binaries]
    key("binaries.kubeadm", Kind::AbsPath, Some("\"/usr/bin/kubeadm\""), "kubeadm executable."),
    key("binaries.etcd_restore_tool", Kind::AbsPath, None,
        "etcd's snapshot restore tool for `kubeboot restore`, told by its file name: `etcdutl` (etcd 3.5 and later; the revision is bumped and marked compacted) or `etcdctl` (3.4). Unset: `etcdutl`, then `etcdctl`, from PATH."),
    // [log]
    key("log.level", Kind::OneOf(&["trace", "debug", "info", "warn", "error"]), Some("\"info\""),
        "Log level."),
    key("log.format", Kind::OneOf(&["auto", "json", "text"]), Some("\"auto\""),
        "Log format; `auto` is text on a terminal, JSON otherwise."),
];

/// Keys kubeboot once had and no longer reads, with what replaced them. A
/// source still setting one is refused by name, its value never shown (these
/// held secrets).
pub const RETIRED: &[(&str, &str)] = &[
    ("join.token", JOIN_RETIRED),
    ("join.certificate_key", JOIN_RETIRED),
    ("join.ca_cert_hashes", JOIN_RETIRED),
];

const JOIN_RETIRED: &str = "no [join] section: join material (token, certificate key, CA pins) \
    comes from Secrets Manager and the cluster record, which the control planes keep fresh; \
    delete it (kubeboot never read it)";

/// What replaced a retired key, if `path` is one.
pub fn retired(path: &str) -> Option<&'static str> {
    RETIRED
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, why)| *why)
}

/// What replaced a section whose keys are all retired, if `section` is one.
pub fn retired_section(section: &str) -> Option<&'static str> {
    let prefix = format!("{section}.");
    RETIRED
        .iter()
        .find(|(p, _)| p.starts_with(&prefix))
        .map(|(_, why)| *why)
}

/// Looks a key up by its dotted path.
pub fn find(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// Whether `path` names a section (a table) rather than a key, e.g. `aws.endpoints`.
pub fn is_section(path: &str) -> bool {
    let prefix = format!("{path}.");
    KEYS.iter().any(|k| k.path.starts_with(&prefix))
        || RETIRED.iter().any(|(p, _)| p.starts_with(&prefix))
}

/// The keys directly inside a section, for "expected one of" hints.
pub fn children(section: &str) -> Vec<&'static str> {
    let prefix = if section.is_empty() {
        String::new()
    } else {
        format!("{section}.")
    };
    let mut out: Vec<&'static str> = Vec::new();
    for k in KEYS {
        if let Some(rest) = k.path.strip_prefix(prefix.as_str()) {
            let first = rest.split('.').next().unwrap_or(rest);
            let child = &k.path[..prefix.len() + first.len()];
            if !out.contains(&child) {
                out.push(child);
            }
        }
    }
    out
}

/// The environment variable that overrides a key: `cluster.name` → `KUBEBOOT_CLUSTER_NAME`.
pub fn env_var(path: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.replace('.', "_").to_ascii_uppercase()
    )
}

/// Prefix of every kubeboot environment variable.
pub const ENV_PREFIX: &str = "KUBEBOOT_";

/// `KUBEBOOT_*` variables that are not key overrides.
pub const ENV_RESERVED: &[&str] = &["KUBEBOOT_CONFIG"];

/// The closest known key to a misspelt one, for "did you mean" hints.
pub fn suggest(path: &str) -> Option<&'static str> {
    KEYS.iter()
        .filter(|k| near_in_length(path, k.path))
        .map(|k| (edit_distance(path, k.path), k.path))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, p)| p)
}

/// The closest known override variable to a misspelt `KUBEBOOT_*` name.
pub fn suggest_env(var: &str) -> Option<String> {
    KEYS.iter()
        .map(|k| env_var(k.path))
        .filter(|name| near_in_length(var, name))
        .map(|name| (edit_distance(var, &name), name))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Strings whose lengths differ by more than 3 are more than 3 edits apart:
/// skipping them keeps a 500,000-character key from costing seconds.
fn near_in_length(a: &str, b: &str) -> bool {
    a.len().abs_diff(b.len()) <= 3
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The configuration reference as Markdown, one table per section; the
/// README embeds it between markers and a test keeps the two identical.
pub fn reference_markdown() -> String {
    let mut out = String::new();
    let mut section = "";
    for k in KEYS {
        let this = k.path.rsplit_once('.').map_or("", |(s, _)| s);
        if this != section {
            section = this;
            out.push_str(&format!("\n#### `[{section}]`\n\n| key | accepted values | default | notes |\n|---|---|---|---|\n"));
        }
        let default = match k.default {
            Some(d) => format!("`{d}`"),
            None if k.required => "**required**".into(),
            None => "unset".into(),
        };
        let mut notes = k.doc.to_string();
        if k.secret {
            notes.push_str(" Secret: never printed.");
        }
        if k.identity {
            notes.push_str(" Sources must agree.");
        }
        if k.not_from_user_data {
            notes.push_str(" Not settable from user-data.");
        }
        let name = k.path.rsplit_once('.').map_or(k.path, |(_, n)| n);
        out.push_str(&format!(
            "| `{name}` (`{}`) | {} | {default} | {notes} |\n",
            env_var(k.path),
            super::value::expected_form(k.kind).replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_unique() {
        let mut names: Vec<String> = KEYS.iter().map(|k| env_var(k.path)).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(
            before,
            names.len(),
            "two keys map to one KUBEBOOT_ variable"
        );
    }

    #[test]
    fn keys_are_unique_and_sections_are_not_keys() {
        for (i, k) in KEYS.iter().enumerate() {
            assert!(
                KEYS[i + 1..].iter().all(|o| o.path != k.path),
                "{} twice",
                k.path
            );
            assert!(!is_section(k.path), "{} is both key and section", k.path);
        }
    }

    #[test]
    fn children_of_sections() {
        assert_eq!(children("")[0], "cluster");
        assert!(children("aws").contains(&"aws.endpoints"));
        assert!(children("aws.endpoints").contains(&"aws.endpoints.dynamodb"));
    }

    #[test]
    fn suggests_near_misses_only() {
        assert_eq!(suggest("cluster.nmae"), Some("cluster.name"));
        assert_eq!(suggest("lock.leese"), Some("lock.lease"));
        assert_eq!(suggest("totally.unrelated.thing"), None);
    }
}
