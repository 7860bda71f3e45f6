//! The error catalogue: every failure an operator can meet has a stable code
//! (`KB-<AREA>-<NNN>`), a title, its probable cause and what to check.
//! `kubeboot explain <code>` prints an entry; `docs/errors.md` is generated
//! from [`ENTRIES`] (a test fails when it drifts).
//!
//! A code names a *condition*, not a Rust variant: variants that mean the same
//! thing to an operator share one (an etcd member that never became voting is
//! KB-ETCD-004 whether one check or the whole wait failed), and a wrapper
//! takes the code of what it wraps (bootstrap's lock error is the lock's).
//!
//! The mapping is an exhaustive `match` per error enum with no wildcard arm:
//! a new variant does not compile until it has a code.
//!
//! **Codes are stable.** Runbooks, alarms and search engines remember them:
//! never renumber a code, never reuse a retired one, never change what one
//! means. A new condition gets the next free number of its area; a condition
//! that cannot happen any more keeps its entry (say so in its cause).

/// One catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// `KB-<AREA>-<NNN>`, upper case; stable forever.
    pub code: &'static str,
    /// What failed, in a few words.
    pub title: &'static str,
    /// The usual reasons, most likely first.
    pub cause: &'static str,
    /// What to look at, in order.
    pub check: &'static str,
}

/// The areas, in the order `docs/errors.md` lists them: (area, what it covers).
pub const AREAS: &[(&str, &str)] = &[
    ("CLI", "the command line itself (usage, output, runtime)"),
    ("LOG", "setting up logging"),
    ("CONFIG", "loading and validating the configuration"),
    ("IMDS", "the instance metadata service (IMDSv2)"),
    ("AWS", "preparing AWS access"),
    ("LOCK", "the DynamoDB lease locks"),
    ("REG", "the cluster and member records (registry)"),
    ("STATUS", "`kubeboot status`"),
    ("BOOT", "`kubeboot bootstrap`"),
    ("MEMBER", "etcd membership changes and the quorum guard"),
    ("JOIN", "join material (token, CA pins, certificate key)"),
    ("KUBEADM", "running kubeadm"),
    ("ETCD", "talking to etcd"),
    ("KUBE", "the Kubernetes API"),
    ("LIFE", "ASG lifecycle hooks and the lifecycle queue"),
    ("RECON", "the dead-member reconciler"),
    ("CERT", "kubeadm's certificates: expiry and renewal"),
    ("STACK", "signalling the CloudFormation stack"),
    ("BACKUP", "etcd backups in S3"),
    (
        "RESTORE",
        "`kubeboot restore`: a cluster rebuilt from a snapshot",
    ),
    (
        "OIDC",
        "the service-account issuer's public documents (IAM roles for service accounts)",
    ),
    (
        "ADDON",
        "the cluster add-ons: the pod network, cluster-autoscaler",
    ),
];

/// Declares each entry as a `pub static` and lists them all in [`ENTRIES`],
/// so an entry the mapping returns is always one `explain` and the docs know.
macro_rules! catalogue {
    ($( $(#[$doc:meta])* $name:ident = $code:literal, $title:literal,
        cause: $cause:literal,
        check: $check:literal; )*) => {
        $(
            $(#[$doc])*
            pub static $name: Entry = Entry { code: $code, title: $title, cause: $cause, check: $check };
        )*
        /// Every entry, in catalogue order.
        pub static ENTRIES: &[&Entry] = &[$(&$name),*];
    };
}

catalogue! {
    /// `Error::Usage`.
    CLI_USAGE = "KB-CLI-001", "the command was used wrongly",
        cause: "The command refused to start: a required flag is missing (`kubeboot lock release` without --force), an argument does not have the expected form (an instance or member id), or something the command needs is not configured (aws.region off EC2).",
        check: "The message names the argument or key and the form expected; `kubeboot <command> --help` shows the options.";
    /// `Error::Runtime`.
    CLI_RUNTIME = "KB-CLI-002", "cannot start the async runtime or signal handling",
        cause: "The host refused the threads or file descriptors the agent needs: a low open-files limit, the unit's TasksMax, or memory pressure.",
        check: "`ulimit -n` for the service user, `systemctl show <unit> -p LimitNOFILE -p TasksMax`, free memory (`free -m`), and the journal for OOM kills.";
    /// `Error::Output`.
    CLI_OUTPUT = "KB-CLI-003", "cannot write the command's output",
        cause: "stdout was closed or is full: a pipe whose reader exited early (`| head`), or a redirect to a full disk.",
        check: "Run the command again without the pipe, or make room on the file system the output goes to.";
    /// `Error::UnknownCode`.
    CLI_UNKNOWN_CODE = "KB-CLI-004", "unknown error code",
        cause: "`kubeboot explain` was given a value that is not a code in this version's catalogue: a typo, or a code from a newer kubeboot.",
        check: "Codes look like KB-LOCK-001 (the error line's `code` field); `kubeboot explain --list` lists every code this version knows.";

    LOG_LEVEL = "KB-LOG-001", "invalid log level",
        cause: "log.level is not one of trace, debug, info, warn, error. Configuration validation refuses such a value first, so this means a caller bypassed it.",
        check: "`kubeboot config show` for log.level and where it came from.";
    LOG_TWICE = "KB-LOG-002", "logging was set up twice",
        cause: "A kubeboot bug: one process initialized logging twice.",
        check: "Report it with the command line that produced it.";

    CONFIG_INVALID = "KB-CONFIG-001", "the configuration is invalid",
        cause: "One or more configuration sources hold problems. Each problem is logged on its own line with its own code (KB-CONFIG-010 to KB-CONFIG-018), naming the source, key, value and the form expected.",
        check: "`kubeboot config check` lists every problem at once; `kubeboot config show` prints the merged result and where each value came from.";
    CONFIG_READ = "KB-CONFIG-002", "a configuration file cannot be read",
        cause: "The configuration file (or a drop-in, or the --user-data file) does not exist or is not readable: --config / KUBEBOOT_CONFIG points elsewhere, or the AMI build did not install /etc/kubeboot/config.toml.",
        check: "The path in the message: `ls -l` it as the service user; pass --config or set KUBEBOOT_CONFIG to the right file.";
    CONFIG_DROPIN_DIR = "KB-CONFIG-003", "the drop-in directory cannot be listed",
        cause: "config.d next to the configuration file exists but is not a readable directory (a file of that name, or permissions).",
        check: "`ls -ld <dir>/config.d`: it must be a directory readable by the service user, or absent.";
    CONFIG_USERDATA = "KB-CONFIG-004", "user-data cannot be read from instance metadata",
        cause: "The kubeboot part of the user-data is read through IMDSv2 and IMDS did not answer: metadata disabled, hop limit 1 inside a container, or the command runs off EC2.",
        check: "On EC2: IMDSv2 enabled and reachable (`aws ec2 describe-instances` MetadataOptions). Off EC2: pass --user-data FILE or --no-user-data, or set imds.user_data = false.";
    CONFIG_INTERNAL = "KB-CONFIG-005", "validated configuration does not load (kubeboot bug)",
        cause: "The configuration passed every check but the typed model refused it: the schema and the model disagree.",
        check: "Report it with the output of `kubeboot config show`.";
    CONFIG_NOT_REGULAR = "KB-CONFIG-006", "a configuration path is not a regular file",
        cause: "--config / KUBEBOOT_CONFIG (or --user-data) names a directory, a device such as /dev/zero, a FIFO or a socket. kubeboot refuses it before reading: a pipe or device may never end.",
        check: "The path in the message: `ls -l` it; write a generated configuration to a file first.";
    CONFIG_TOO_LARGE = "KB-CONFIG-007", "a configuration file is too large",
        cause: "The configuration file, a drop-in or the --user-data file is larger than 1 MiB; real ones are a few KiB. It is refused whole, never read in part.",
        check: "The path in the message: is it the right file (not a log or a dump)?";
    CONFIG_SYNTAX = "KB-CONFIG-010", "configuration syntax error",
        cause: "A source is not valid TOML, or the user-data cannot be decoded (broken MIME, gzip or base64, or not UTF-8). A document with a syntax error reports only that.",
        check: "The line and column in the problem; for user-data, the launch template's user-data as the instance received it.";
    CONFIG_UNKNOWN_KEY = "KB-CONFIG-011", "unknown configuration key",
        cause: "A key (or a KUBEBOOT_* environment variable) that kubeboot does not know: usually a typo, or a key from another version.",
        check: "The \"did you mean\" in the problem, and the configuration reference in the README.";
    CONFIG_WRONG_TYPE = "KB-CONFIG-012", "configuration value of the wrong type",
        cause: "A value of the wrong TOML type, such as a number where a duration string (\"30s\") or a string is expected.",
        check: "The expected form in the problem and the README reference.";
    CONFIG_OUT_OF_RANGE = "KB-CONFIG-013", "configuration value out of range",
        cause: "A number or duration outside the bounds kubeboot accepts.",
        check: "The bounds in the problem (\"from 3s to 10m\").";
    CONFIG_INVALID_VALUE = "KB-CONFIG-014", "configuration value not in the accepted form",
        cause: "The type is right but the value is not: an unknown role, a name that is not a DNS label, a malformed URL, CIDR or duration.",
        check: "The expected form in the problem.";
    CONFIG_MISSING = "KB-CONFIG-015", "required configuration key not set",
        cause: "A key without a default (cluster.name, node.role, aws.table, ...) is set by no source.",
        check: "Set it in the file, a drop-in, the user-data or its KUBEBOOT_* variable (the problem names it).";
    CONFIG_CONFLICT = "KB-CONFIG-016", "configuration sources conflict",
        cause: "Two sources set an identity key (cluster.name, aws.table) to different values, a source sets a key it may not (imds.* from user-data), or the user-data holds two kubeboot parts. kubeboot refuses rather than guess which cluster the node belongs to.",
        check: "Make the launch template's user-data agree with the baked configuration; `kubeboot config show` names the source of each value.";
    CONFIG_INCONSISTENT = "KB-CONFIG-017", "configuration keys do not fit together",
        cause: "Keys that are fine alone but not together: lock.margin above lock.lease / 3, daemon.jitter not below daemon.period, metrics.sink = \"file\" without metrics.file, a control plane with backups but no bucket.",
        check: "The rule quoted in the problem.";
    CONFIG_RETIRED = "KB-CONFIG-018", "a configuration key kubeboot no longer reads",
        cause: "A source sets a key kubeboot retired, such as join.token, join.certificate_key or join.ca_cert_hashes (or their KUBEBOOT_JOIN_* variables): join material comes from Secrets Manager and the cluster record. Its value is never printed.",
        check: "Delete the key from the file, drop-ins, user-data or environment; the problem says what replaced it.";

    IMDS_ENDPOINT = "KB-IMDS-001", "the IMDS endpoint is not usable",
        cause: "imds.endpoint is not a plain http:// URL (IMDS is never served over https).",
        check: "imds.endpoint; on EC2 leave it at http://169.254.169.254.";
    IMDS_REQUEST = "KB-IMDS-002", "an IMDS request failed and retrying cannot help",
        cause: "Something answered at imds.endpoint that is not IMDS: an answer too large, or a session token that is not text.",
        check: "`curl -sS -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' <imds.endpoint>/latest/api/token` from the node; look for a proxy in between.";
    IMDS_FORBIDDEN = "KB-IMDS-003", "IMDS refused the request (403)",
        cause: "Instance metadata access is disabled for the instance, or a proxy adds X-Forwarded-For (IMDSv2 refuses those).",
        check: "The instance's MetadataOptions (HttpEndpoint enabled, HttpTokens), and that no HTTP proxy handles 169.254.169.254 (NO_PROXY).";
    IMDS_STATUS = "KB-IMDS-004", "IMDS answered with an unexpected status",
        cause: "IMDS (or what answers at imds.endpoint) refused the request as malformed, e.g. 400 when a proxy strips the token TTL header.",
        check: "The status and path in the message; anything between the agent and 169.254.169.254.";
    IMDS_MISSING = "KB-IMDS-005", "IMDS lacks a value every instance has",
        cause: "IMDS answered 404 for an identity path (instance-id, local-ipv4, placement): imds.endpoint points at something that is not EC2's metadata service.",
        check: "imds.endpoint; `curl` the path in the message with a token.";
    IMDS_DEADLINE = "KB-IMDS-006", "IMDS did not answer within imds.deadline",
        cause: "IMDS is unreachable or keeps failing: disabled, hop limit 1 while running in a container, a firewall rule, or a very slow early boot.",
        check: "IMDSv2 enabled with hop limit >= 2 for containers; the last failure in the message; raise imds.deadline if the instance is just slow.";

    AWS_IMDS_ENDPOINT = "KB-AWS-001", "the IMDS endpoint is not usable for instance-role credentials",
        cause: "The AWS SDK could not use imds.endpoint to fetch the instance role's credentials.",
        check: "imds.endpoint must be a plain http:// URL such as http://169.254.169.254.";

    LOCK_TIMEOUT = "KB-LOCK-001", "timed out waiting for a lock",
        cause: "Another node holds the lock for longer than lock.acquire_timeout (a long kubeadm init or join, or a stuck holder), or the table could not be read at all (holder \"nobody\").",
        check: "`kubeboot status` shows the holder and its last renewal. A dead holder loses the lock after one lease; a live but stuck one must be fixed or stopped; as a last resort `kubeboot lock release --purpose <p> --force`.";
    LOCK_LOST = "KB-LOCK-002", "the lock was lost while working",
        cause: "The lease ran out or another node took over: DynamoDB slow or throttled for longer than lease - margin, a paused or starved instance, or an operator's forced release. Fenced writes by the old holder are refused; the work stops and is retried from its checkpoint.",
        check: "DynamoDB latency and throttling (CloudWatch), CPU steal and pauses on the node, `kubeboot status` for the new holder; lock.lease if the environment is slow.";
    LOCK_STORE_DENIED = "KB-LOCK-003", "the lock table refused the request",
        cause: "The table does not exist in that region, the instance role may not use it, or the endpoint override points elsewhere. Retrying cannot help.",
        check: "aws.table, aws.region, aws.endpoints.dynamodb, and that the role may call dynamodb:GetItem and UpdateItem on the table.";
    LOCK_STORE_UNAVAILABLE = "KB-LOCK-004", "the lock table is unavailable",
        cause: "DynamoDB throttled, failed or timed out after the SDK's retries (or a release could not be confirmed; the lock then expires after its lease).",
        check: "DynamoDB throttling and errors in CloudWatch, network to DynamoDB; aws.max_attempts and aws.operation_timeout.";
    LOCK_HOLDER_ALIVE = "KB-LOCK-005", "refused to force the release of a live lock",
        cause: "`kubeboot lock release --force` watched the lock for its lease plus lock.margin and the holder renewed it meanwhile: the holder is alive.",
        check: "Find the holder with `kubeboot status` and stop or fix it first.";
    LOCK_NOT_HELD = "KB-LOCK-006", "the lock is not held",
        cause: "A release was asked for a lock that nobody holds.",
        check: "Nothing to do; `kubeboot status` shows the locks.";

    REG_CONFLICT = "KB-REG-001", "the cluster record changed under us",
        cause: "A conditional write found the record in another state than expected: another node started a generation or initialized the cluster meanwhile.",
        check: "`kubeboot status`; the step is retried from the current record.";
    REG_WRONG_LOCK = "KB-REG-002", "a record write was fenced by the wrong lock (kubeboot bug)",
        cause: "A registry write was attempted under a lock that may not fence it.",
        check: "Report it with the log lines before it.";
    REG_STORE_DENIED = "KB-REG-003", "the registry table refused the request",
        cause: "The table does not exist in that region, or the instance role may not read or write it. Retrying cannot help.",
        check: "aws.table, aws.region, aws.endpoints.dynamodb, and that the role may call dynamodb:GetItem, Query and TransactWriteItems on the table.";
    REG_STORE_UNAVAILABLE = "KB-REG-004", "the registry table is unavailable",
        cause: "DynamoDB throttled, failed or timed out after the SDK's retries, and reading back could not show the write applied.",
        check: "DynamoDB throttling and errors in CloudWatch; the step is retried.";

    STATUS_LOCK_READ = "KB-STATUS-001", "cannot read the locks for status",
        cause: "The lock items could not be read: wrong table or region, missing permissions, or DynamoDB unavailable.",
        check: "aws.table, aws.region, and that this role may call dynamodb:GetItem on the table.";

    BOOT_CHECKPOINT = "KB-BOOT-001", "the local bootstrap state is unusable",
        cause: "<paths.state_dir>/bootstrap.json cannot be read, parsed or written (a corrupt file, a read-only or full disk), or kubeadm init finished without leaving the cluster CA.",
        check: "paths.state_dir is writable by root and has space; delete a corrupt bootstrap.json to start over; for the CA, kubeadm's output and paths.kubernetes_dir/pki.";
    BOOT_NOT_READY = "KB-BOOT-002", "the cluster is not ready for this node",
        cause: "A control plane cannot join yet: no etcd member is recorded to join through, or etcd is not healthy enough to add a member (I3: a member is down, or a stale one could not be removed).",
        check: "`kubeboot status` and `kubeboot etcd members`; bring unhealthy members back or remove dead ones; systemd retries bootstrap.";
    BOOT_NO_MATERIAL = "KB-BOOT-003", "no usable join material in time",
        cause: "Within timeouts.join_material the cluster was not initialized, nothing was published, or the material stayed too close to expiry (token or uploaded certificates) because no leader refreshed it.",
        check: "The leader's daemon (`journalctl -u kubeboot`) and `kubeboot status`: is the cluster initialized, is a REFRESH request pending? systemd restarts bootstrap.";
    BOOT_STOPPED = "KB-BOOT-004", "bootstrap was stopped before it finished",
        cause: "SIGTERM or SIGINT reached `kubeboot bootstrap` (`systemctl stop`, a shutdown) while it waited for a lock, join material or etcd (abandoned at once), or a stopped kubeadm step did not end within 20 s.",
        check: "Nothing when the stop was intended: the next start resumes from the checkpoint (an unfinished kubeadm step is reset first); locks it held expire after their lease.";
    BOOT_AWS_WEATHER = "KB-BOOT-005", "AWS kept throttling or failing past a bootstrap step's deadline",
        cause: "A bootstrap step (reading the cluster record, a fenced write under a lock, storing or reading join material) kept meeting throttling, 5xx answers, attempt timeouts or connection failures after the SDK's attempts for longer than its deadline (lock.acquire_timeout, or timeouts.join_material for join material). Each such call was counted as AwsCallsExhausted (Service, Operation) while the step waited. Usually many nodes booting at once against a table or API rate quota, or a regional service event.",
        check: "The message names the service, operation and deadline. CloudWatch: the AwsCallsExhausted metric, the table's ThrottledRequests and SystemErrors, the account's API quotas in Service Quotas, the AWS Health Dashboard. If the calls never got through (connection failures, attempt timeouts), check the node's network path to the service: the VPC endpoint (interface endpoint and its policy) or NAT route, the security groups (HTTPS 443 to the endpoint), DNS resolution of the service name, and the aws.endpoints.* overrides. Raise the deadline or aws.max_attempts to wait longer; systemd restarts bootstrap.";

    MEMBER_NOT_A_MEMBER = "KB-MEMBER-001", "the member is not in etcd's member list",
        cause: "The member to remove is not (or no longer) a member: already removed, or the id is wrong.",
        check: "`kubeboot etcd members` shows the current members and their records.";
    MEMBER_LAST_VOTER = "KB-MEMBER-002", "refused to remove the last voting member",
        cause: "Removing the only voting member would destroy the cluster.",
        check: "To rebuild the cluster, restore from a backup instead of removing members.";
    MEMBER_TWO_VOTERS = "KB-MEMBER-003", "refused to shrink a two-member cluster",
        cause: "With two voters, removing one leaves no tolerance for any further failure.",
        check: "Add a third control plane first; if the member is certainly gone for good, repeat with --force.";
    MEMBER_BELOW_QUORUM = "KB-MEMBER-004", "removal would break quorum",
        cause: "After the removal fewer healthy voters would remain than quorum of the new size; etcd could not commit the change, and trying makes things worse.",
        check: "`kubeboot etcd members`: bring unhealthy members back, or remove dead ones first, so enough healthy voters remain.";
    MEMBER_UNKNOWN_TARGET = "KB-MEMBER-005", "no member or record matches the target",
        cause: "The instance id or member id names neither an etcd member nor a MEMBER record.",
        check: "`kubeboot etcd members` lists member ids (16 hex digits) and instance ids.";
    MEMBER_NO_ENDPOINTS = "KB-MEMBER-006", "no etcd endpoint to ask",
        cause: "The registry has no member records to find etcd through, and no --endpoint was given.",
        check: "Pass --endpoint with a member's client URL (e.g. https://10.0.1.2:2379); `kubeboot status` shows the records.";

    JOIN_CA_CERT = "KB-JOIN-001", "cannot compute the CA public-key pin",
        cause: "The cluster CA file is not a PEM certificate: kubeadm init did not finish writing it, or paths.kubernetes_dir points elsewhere.",
        check: "<paths.kubernetes_dir>/pki/ca.crt exists and is kubeadm's CA (`openssl x509 -in ... -noout -subject`).";
    JOIN_INVALID = "KB-JOIN-002", "join material is not publishable (kubeboot bug)",
        cause: "Material about to be published failed its own checks (endpoint, CA pins, token or certificate key shape).",
        check: "Report it with the log lines before it; cluster.control_plane_endpoint must be host:port.";
    JOIN_MALFORMED = "KB-JOIN-003", "the join secret's content is malformed",
        cause: "The secret version the registry points at is not what kubeboot writes: edited by hand, or overwritten by another tool.",
        check: "Do not edit the join secret by hand; the leader publishes fresh material on its next refresh (a joiner's REFRESH request asks for it).";
    JOIN_FORMAT = "KB-JOIN-004", "the join secret is in another kubeboot version's format",
        cause: "The secret was written by a kubeboot that uses another wire format: nodes of different versions during an upgrade.",
        check: "Run the same kubeboot version on every node of the cluster (the AMI), or let the leader republish.";
    JOIN_POINTER_MISMATCH = "KB-JOIN-005", "the join secret disagrees with the registry",
        cause: "The secret version's endpoint or CA pins differ from the registry's join pointer: aws.join_secret may name another cluster's secret.",
        check: "aws.join_secret and cluster.name: the secret must be this cluster's.";
    JOIN_SECRETS_DENIED = "KB-JOIN-006", "Secrets Manager refused the request",
        cause: "The join secret does not exist, the instance role may not read or write it or use its KMS key, or the endpoint override points elsewhere.",
        check: "The secret named in the message (the CloudFormation stack creates it), aws.join_secret, aws.endpoints.secretsmanager, and secretsmanager:GetSecretValue, PutSecretValue, CreateSecret and kms:Decrypt for the role.";
    JOIN_SECRETS_UNAVAILABLE = "KB-JOIN-007", "Secrets Manager is unavailable",
        cause: "Secrets Manager throttled, failed or timed out after the SDK's retries.",
        check: "Throttling and errors in CloudWatch, network to Secrets Manager; aws.max_attempts, aws.operation_timeout. The step is retried.";
    JOIN_SSM_DENIED = "KB-JOIN-008", "SSM Parameter Store refused the request",
        cause: "The discovery parameter cannot be written: the role may not call ssm:PutParameter on it, or the name under aws.ssm_prefix is not allowed.",
        check: "aws.ssm_prefix, aws.endpoints.ssm, and ssm:PutParameter / GetParameter for the role on the parameter in the message.";
    JOIN_SSM_UNAVAILABLE = "KB-JOIN-009", "SSM Parameter Store is unavailable",
        cause: "SSM throttled, failed or timed out after the SDK's retries.",
        check: "SSM throttling in CloudWatch, network to SSM. The step is retried.";
    JOIN_SUPERSEDED = "KB-JOIN-010", "join material was published by someone else during a refresh",
        cause: "While the leader refreshed, another publication moved the join pointer (an init of a new generation, or a leader before a takeover). The refresh rotated nothing in the cluster.",
        check: "Nothing, usually: the next turn refreshes from the new material. If it repeats, `kubeboot status` for the lock holders (two leaders?).";

    KUBEADM_SPAWN = "KB-KUBEADM-001", "cannot start kubeadm",
        cause: "binaries.kubeadm does not exist or is not executable.",
        check: "binaries.kubeadm points at the kubeadm the AMI build installed (`ls -l`, `kubeadm version`).";
    KUBEADM_WRITE_CONFIG = "KB-KUBEADM-002", "cannot write the kubeadm configuration",
        cause: "The 0600 configuration file for kubeadm cannot be written under paths.run_dir.",
        check: "paths.run_dir exists (or can be created) and is writable by root, and the disk is not full.";
    KUBEADM_TIMED_OUT = "KB-KUBEADM-003", "kubeadm did not finish in time and was killed",
        cause: "kubeadm ran past its timeout: a slow node or image pulls, or a control-plane component that never starts.",
        check: "kubeadm's last output in the message, `journalctl -u kubelet`, `crictl ps -a`; raise timeouts.kubeadm_<command> if the node is just slow.";
    KUBEADM_FAILED = "KB-KUBEADM-004", "kubeadm failed",
        cause: "kubeadm exited non-zero. The hint says what its output points to: leftovers of an earlier attempt, an unknown or expired token, a CA pin mismatch, uploaded certificates gone, an unhealthy etcd, or an unreachable API endpoint.",
        check: "The hint and kubeadm's last output in the message; `journalctl -u kubelet`.";
    KUBEADM_STOPPED = "KB-KUBEADM-005", "kubeadm was stopped because the agent was asked to stop",
        cause: "SIGTERM or SIGINT reached the agent while kubeadm ran (`systemctl stop`, a shutdown, Ctrl-C): kubeadm got SIGTERM, and SIGKILL if it had not exited within 10 s.",
        check: "Nothing when the stop was intended: the next start resets this node's unfinished attempt (`kubeadm reset`) and runs again. Otherwise, who stopped the unit (`journalctl -u kubeboot-bootstrap`).";
    KUBEADM_VERSION = "KB-KUBEADM-006", "the image's kubeadm is not the cluster's Kubernetes version",
        cause: "`kubeadm version -o short` names another release than cluster.kubernetes_version (or nothing kubeboot can read): the AMI was built for another Kubernetes version than the stack's KubernetesVersion, or binaries.kubeadm points at another kubeadm. kubeadm would install a control plane the image did not pre-pull, beside a kubelet of the image's version. Nothing was started; restarting cannot help (exit 2).",
        check: "`kubeadm version -o short` on the node, the AMI's `kubeboot:k8s` tag and the stack's KubernetesVersion: build an AMI with `-var kubernetes_version=<the cluster's>` (packer/) or set KubernetesVersion to the AMI's.";

    ETCD_CERTIFICATE = "KB-ETCD-001", "cannot read the etcd client certificates",
        cause: "kubeadm's etcd CA or the API server's etcd client certificate is missing: init or join did not get that far, or paths.kubernetes_dir is wrong.",
        check: "<paths.kubernetes_dir>/pki/etcd/ca.crt and pki/apiserver-etcd-client.{crt,key}.";
    ETCD_CONNECT = "KB-ETCD-002", "cannot reach etcd",
        cause: "No endpoint answered: etcd is not running, the port or scheme is wrong, or the security groups block the client port.",
        check: "`crictl ps --name etcd`, etcd.scheme, the client port 2379, security groups between control planes.";
    ETCD_REQUEST = "KB-ETCD-003", "an etcd request failed",
        cause: "etcd refused or timed out a request: no leader (an election, lost quorum), permission denied, or an overloaded member.",
        check: "`kubeboot etcd members` and `etcdctl endpoint status --cluster`; the etcd logs (`crictl logs` of the etcd container).";
    ETCD_NOT_CONFIRMED = "KB-ETCD-004", "the etcd member did not become a started, voting, healthy member",
        cause: "After init or join, etcd does not report this node's member started (name and client URLs), voting (not a learner) and healthy within etcd.promote_timeout; it is not recorded (I2).",
        check: "This node's etcd log (`crictl logs` of the etcd container), peer connectivity on port 2380, `kubeboot etcd members`.";

    KUBE_KUBECONFIG = "KB-KUBE-001", "cannot use the kubeconfig",
        cause: "The kubeconfig kubeadm writes (kubelet.conf or admin.conf) is missing or unreadable: kubeadm did not get that far, or paths.kubernetes_dir is wrong.",
        check: "kubeadm's output, and the file named in the message under paths.kubernetes_dir.";
    KUBE_API_DENIED = "KB-KUBE-002", "the API server refused the node's credentials",
        cause: "The API server answered 401 or 403: the kubelet's client certificate is not (yet) approved or valid, or RBAC/the Node authorizer denies the request.",
        check: "The node's credentials: `kubectl get csr`, the kubelet's client certificate, and the Node authorizer / RBAC for the request in the message.";
    KUBE_API = "KB-KUBE-003", "a Kubernetes API request failed",
        cause: "The API server did not answer or failed: the load balancer has no healthy target, security groups block 6443, or the API server is overloaded.",
        check: "cluster.control_plane_endpoint answers from this node (`curl -k https://<endpoint>/readyz`), the load balancer's target health.";
    KUBE_NODE_NOT_READY = "KB-KUBE-004", "the Node did not become Ready",
        cause: "The kubelet registered no Node or reports it not Ready within timeouts.node_ready: kubelet, container runtime or CNI plugin not working.",
        check: "`journalctl -u kubelet`, the CNI plugin's pods, `kubectl describe node` (the Ready condition's message); raise timeouts.node_ready if the node is just slow.";
    KUBE_NO_NETWORK = "KB-KUBE-005", "no pod network ran on the Node",
        cause: "The Node stayed NotReady for timeouts.pod_network only because its container runtime has no network (no CNI configuration in /etc/cni/net.d): the pod network add-on is not applied (a control plane's KB-ADDON-* errors), or its Pods cannot start on this node (image pull without NAT, a taint it does not tolerate, no pod CIDR).",
        check: "On a control plane: `kubectl -n kube-flannel get ds,pods -o wide` and `journalctl -u kubeboot` (KB-ADDON-*); addons.pod_network; on this node: `crictl ps -a`, `ls /etc/cni/net.d`, `journalctl -u kubelet`.";

    LIFE_MESSAGE = "KB-LIFE-001", "a lifecycle queue message is not understood",
        cause: "The queue received a message that is neither an ASG lifecycle hook notification nor its EventBridge event; it is deleted.",
        check: "Only the ASG termination hook (directly or through an EventBridge rule) should send to aws.lifecycle_queue_url.";
    LIFE_AUTOSCALING = "KB-LIFE-002", "an Auto Scaling lifecycle call failed",
        cause: "DescribeAutoScalingInstances, CompleteLifecycleAction or RecordLifecycleActionHeartbeat failed: the role may not call it on this group, or Auto Scaling is throttling. The ASG applies the hook's default result at its timeout.",
        check: "autoscaling:DescribeAutoScalingInstances, CompleteLifecycleAction and RecordLifecycleActionHeartbeat for the role, aws.lifecycle_hook, aws.endpoints.autoscaling.";
    LIFE_SQS = "KB-LIFE-003", "a lifecycle queue call failed",
        cause: "Receiving, hiding, sending or deleting a message failed: wrong queue URL, missing permissions, or SQS unavailable.",
        check: "aws.lifecycle_queue_url, aws.endpoints.sqs, and sqs:ReceiveMessage, ChangeMessageVisibility, SendMessage and DeleteMessage for the role.";

    LIFE_NOT_TERMINATING = "KB-LIFE-004", "a termination notice for an instance Auto Scaling is not terminating",
        cause: "A lifecycle message names an instance that Auto Scaling holds in another state or group: an old duplicate, or a notice forged by a principal that may send to the queue (any node of the cluster). It is deleted, nothing is drained or removed.",
        check: "CloudTrail for sqs:SendMessage on the lifecycle queue around the time, and the sending node's instance role.";

    LIFE_NOT_IN_GROUP = "KB-LIFE-005", "a termination notice for an instance no Auto Scaling group holds",
        cause: "A lifecycle message names an instance that Auto Scaling does not know and EC2 reports pending or running: a notice forged by a principal that may send to the queue. It is deleted, nothing is drained or removed. (An instance EC2 no longer runs, e.g. terminated after the hook's timeout, is cleaned up after instead: its Node and etcd member go.)",
        check: "`aws autoscaling describe-auto-scaling-instances --instance-ids <id>`, `aws ec2 describe-instances --instance-ids <id>`, CloudTrail for sqs:SendMessage on the lifecycle queue around the time.";

    LIFE_MEMBERSHIP_UNKNOWN = "KB-LIFE-006", "etcd cannot say whether a terminating instance is a control plane",
        cause: "The instance has no MEMBER record and no recorded etcd member answered whether one is named after its Node: it could be a control plane whose record is missing. It is neither drained as a worker nor removed; its message comes back after its visibility timeout, and the ASG applies the hook's default result at its heartbeat timeout.",
        check: "the control planes' etcd health (`kubeboot status`, `etcdctl endpoint health`) and the MEMBER records in the registry table.";

    RECON_EC2 = "KB-RECON-001", "cannot ask EC2 which instances run",
        cause: "EC2 DescribeInstances failed (permissions, throttling); the reconciler removes nothing while it cannot ask.",
        check: "ec2:DescribeInstances for the role, aws.endpoints.ec2.";
    RECON_LEADER_NOT_RUNNING = "KB-RECON-002", "EC2 does not report this leader running: its answer is not trusted",
        cause: "DescribeInstances did not list the leader's own instance as running: the agent asks the wrong region or endpoint, or EC2 answered from stale or partial data. The reconciler removes nothing on such an answer.",
        check: "the region the agent uses (IMDS placement, aws.endpoints.ec2) against the instances' region; `aws ec2 describe-instances --instance-ids <this instance>`.";

    CERT_READ = "KB-CERT-001", "cannot read a kubeadm certificate",
        cause: "A leaf certificate, CA or kubeconfig kubeadm writes on every control plane is missing or unreadable under paths.kubernetes_dir: the node's init or join did not finish, or paths.kubernetes_dir is wrong. Its expiry is unknown, so it is neither reported nor renewed.",
        check: "The file in the message; `kubeadm certs check-expiration` on the node. A missing file means the node's init or join did not finish.";
    CERT_PARSE = "KB-CERT-002", "a kubeadm certificate cannot be parsed",
        cause: "The file is not a PEM X.509 certificate, or the kubeconfig's client-certificate-data is not base64 PEM: a hand edit or a truncated write.",
        check: "`kubeadm certs check-expiration`; `kubeadm certs renew <name>` rewrites the certificate.";
    CERT_NOT_RENEWED = "KB-CERT-003", "renewal left certificates about to expire",
        cause: "`kubeadm certs renew all` exited 0 but some certificates still expire within the renewal window: their CA key is not on the node (an external CA: kubeadm says \"Detected external ca, ... can't be renewed\" and skips them), or the CA itself expires first.",
        check: "kubeadm's output in the log; renew the listed certificates with the external CA, or replace the node before they lapse. Retried every turn.";
    CERT_RESTART = "KB-CERT-004", "cannot move the static Pod manifests to restart the control plane",
        cause: "After renewing, the control plane's static Pod manifests are moved out of <paths.kubernetes_dir>/manifests and back (the restart kubeadm's documentation prescribes); a move failed (permissions, a full or read-only file system).",
        check: "<paths.kubernetes_dir>/manifests and kubeboot-parked-manifests next to it: every manifest must end up back in manifests/ (the next turn moves parked ones back).";
    CERT_ETCD_AFTER_RESTART = "KB-CERT-005", "etcd did not come back healthy after the certificate restart",
        cause: "After the renewed certificates' restart, this node's etcd member did not answer as started, voting and healthy within etcd.promote_timeout: the kubelet did not restart it, or it refuses the renewed certificates.",
        check: "`crictl ps -a --name etcd` and its logs, `kubeadm certs check-expiration`, `kubeboot etcd members`.";
    CERT_DEFERRED = "KB-CERT-006", "renewal deferred: restarting would cost quorum",
        cause: "The certificates are due, but restarting this control plane (about a minute without its etcd member) would leave fewer healthy voters than quorum of the full cluster: another control plane is dead or unhealthy (awaiting replacement), the cluster has only two voters, or etcd could not be asked. Nothing was renewed or restarted; a warning, not a failure.",
        check: "`kubeboot etcd members` and `kubeboot status`: bring the unhealthy member back or replace it; the renewal is retried every turn and goes ahead once the others keep quorum. Metric CertificateRenewalsDeferred.";

    STACK_SIGNAL_REFUSED = "KB-STACK-001", "CloudFormation refused the control plane's signal",
        cause: "After a successful bootstrap the agent signals SUCCESS to aws.cloudformation_resource in aws.cloudformation_stack, and CloudFormation refused it: the role may not call cloudformation:SignalResource on the stack, or a key names a stack or logical id that does not exist. A warning, not a failure: bootstrap succeeded, and a rolling update waiting for this control plane times out after its PauseTime and rolls back. Metric StackSignalFailed.",
        check: "aws.cloudformation_stack and aws.cloudformation_resource against the stack (`aws cloudformation describe-stack-resource`), the control-plane role's policy (cloudformation:SignalResource on the stack); `systemctl restart kubeboot-bootstrap` signals again. The node is up (bootstrap still succeeded), but a rolling update waiting for this control plane rolls back after its PauseTime.";
    STACK_SIGNAL_UNAVAILABLE = "KB-STACK-002", "CloudFormation did not take the control plane's signal in time",
        cause: "SignalResource was throttled, failed (5xx) or timed out after the SDK's retries. A warning, not a failure: bootstrap succeeded, and a rolling update waiting for this control plane times out after its PauseTime and rolls back. Metric StackSignalFailed.",
        check: "Network or VPC endpoint to CloudFormation (aws.endpoints.cloudformation), aws.max_attempts and aws.operation_timeout; `systemctl restart kubeboot-bootstrap` signals again while the update waits. The node is up (bootstrap still succeeded), but a rolling update waiting for this control plane rolls back after its PauseTime.";

    BACKUP_NO_BUCKET = "KB-BACKUP-001", "backups are on but no bucket is set",
        cause: "A backup command ran, or backups are enabled, without aws.backup_bucket: the node's configuration does not name the cluster's backup bucket.",
        check: "aws.backup_bucket in the node's configuration (the stack's BackupBucket output); `kubeboot config show`.";
    BACKUP_STREAM = "KB-BACKUP-002", "the etcd snapshot could not be streamed",
        cause: "No etcd member would open a snapshot stream (certificates, an unhealthy member, NOSPACE), the stream stopped for 60 s, the whole backup took longer than backup.timeout, or the daemon lost the backup lock mid-upload. The upload was aborted: nothing half-written is left.",
        check: "`kubeboot etcd members` and `kubeboot status`; etcd's own logs on the member in the message; backup.timeout against the database size (metric EtcdDbSize). The leader retries after 5 minutes, doubling up to backup.interval; `kubeboot backup now` tries at once.";
    BACKUP_STORAGE = "KB-BACKUP-003", "S3 refused or failed a backup call",
        cause: "The control-plane role may not call the operation on the bucket or prefix (s3:PutObject, s3:ListBucket, s3:AbortMultipartUpload...), the KMS key refuses the role (SSE-KMS needs kms:GenerateDataKey and kms:Decrypt), or S3 was throttling or unreachable after the SDK's retries. An upload that failed was aborted.",
        check: "The operation and key in the message; the control-plane role's policy and the key policy of aws.kms_key_id (or the bucket's default key); network or VPC endpoint to S3 (aws.endpoints.s3). Metric BackupFailures.";
    BACKUP_DAMAGED = "KB-BACKUP-004", "a snapshot does not verify",
        cause: "The snapshot's sha256 (etcd appends it to the stream and the manifest records it) does not match its bytes: the object was truncated, altered or replaced after upload, its manifest belongs to another object, or the stream from etcd was cut. Nothing was restored or changed.",
        check: "`kubeboot backup list` and `kubeboot backup verify <key>` on an older snapshot; the bucket's access logs and object versions (versioning keeps the previous version). Use a snapshot that verifies.";
    BACKUP_NOT_FOUND = "KB-BACKUP-005", "no such snapshot",
        cause: "The key or URI names no object (deleted by retention, a typo, another bucket or cluster), `latest` found no snapshot with a manifest, or the bucket does not exist.",
        check: "`kubeboot backup list` for what exists; aws.backup_bucket and backup.prefix; a URI must name this cluster's bucket.";
    BACKUP_NO_CERTIFICATES = "KB-BACKUP-006", "the snapshot has no certificates saved with it",
        cause: "Each backup saves the cluster's certificate authorities (ca, sa, front-proxy-ca, etcd/ca) beside the snapshot, and this one's manifest records none: the node that took it had no kubeadm pki/ (a warning said so then). A cluster restored without them could not trust its own ServiceAccount tokens or kubelets. Nothing was restored or changed.",
        check: "`kubeboot backup list`: restore from a snapshot taken by a control plane (its manifest has pki_sha256). `kubeboot backup now` on a control plane takes one.";

    RESTORE_CLUSTER_ANSWERS = "KB-RESTORE-001", "the cluster still answers: restore refused",
        cause: "A member the registry records (this node's own included: a restore that already finished answers) still answers: with this node's etcd client certificate, it sees a leader; without one (a fresh instance), its client port takes connections. Restoring would start a new cluster beside it and replace it. Nothing was changed.",
        check: "`kubeboot status` and `kubeboot etcd members`: is the cluster really lost? If so, terminate the old control planes (or stop their kubelet and etcd) first, as docs/RESTORE.md says, or pass --replace-answering-cluster if you mean to replace it while it runs.";
    RESTORE_TOOL = "KB-RESTORE-002", "etcd's restore tool failed or is missing",
        cause: "`etcdutl snapshot restore` (etcd 3.5+) or `etcdctl snapshot restore` (3.4) is not on PATH or at binaries.etcd_restore_tool, exited non-zero (its last lines are in the message), or ran longer than 15 minutes. The new generation was started and the node reset; nothing was published.",
        check: "The tool's message; `etcdutl version`; free disk space under paths.etcd_data_dir. Fix it and run `kubeboot restore` again: it starts another generation from the same snapshot.";
    RESTORE_LOCAL = "KB-RESTORE-003", "this node's files stand in the way of the restore",
        cause: "A file or directory the restore writes could not be written: the download under paths.state_dir/restore (disk full, permissions), kubeadm's pki/, or the etcd data directory (one left non-empty by kubeadm reset is moved aside to <dir>.replaced-<time>, never deleted).",
        check: "The path in the message: free space (`df`), permissions (run as root). Then run `kubeboot restore` again.";
    RESTORE_NOT_CONTROL_PLANE = "KB-RESTORE-004", "restore runs on a control plane only",
        cause: "`kubeboot restore` ran on a node whose node.role is worker: only a control plane runs etcd and kubeadm init.",
        check: "Run it on a control-plane instance (docs/RESTORE.md says which).";
    RESTORE_UNFINISHED = "KB-RESTORE-005", "an unfinished restore holds the cluster",
        cause: "`kubeboot restore` started a new generation from a snapshot and did not finish (it failed or its node died). Bootstrap will not initialize an empty cluster over it: that would lose the restored data for good.",
        check: "`kubeboot status` names the snapshot; run `kubeboot restore --snapshot <it>` again on a control plane (docs/RESTORE.md). The control planes' bootstrap waits and is retried by systemd.";

    OIDC_KEY = "KB-OIDC-001", "the service-account public key cannot be read or described",
        cause: "<paths.kubernetes_dir>/pki/sa.pub (kubeadm writes it at init; a restore lays it down) is missing, unreadable, or holds a key the API server does not sign with (RSA, or ECDSA P-256/384/521, as PEM PUBLIC KEY blocks).",
        check: "`ls -l /etc/kubernetes/pki/sa.pub` and `openssl pkey -pubin -in /etc/kubernetes/pki/sa.pub -noout -text` on a control plane. Until it is fixed, pods using IAM roles for service accounts cannot get credentials for tokens signed with a key not yet published.";
    ADDON_MANIFEST = "KB-ADDON-001", "an add-on manifest cannot be read or is not valid",
        cause: "A manifest under addons.directory is missing, unreadable, not YAML, of a kind kubeboot does not apply, with a field its type does not have, or uses a variable with no value (cluster-autoscaler needs addons.cluster_autoscaler_role_arn). Nothing was applied: one invalid manifest stops the whole set (the pod network included), so no half-changed add-on is left.",
        check: "The file and document named in the message (`ls /usr/share/kubeboot/addons`; the image installs them), addons.pod_network and addons.cluster_autoscaler_role_arn; docs/ADDONS.md lists the kinds and variables.";
    ADDON_APPLY = "KB-ADDON-002", "an add-on could not be applied through the API",
        cause: "Server-side apply of an add-on object failed, or the leader's whole add-on turn took over 2 minutes: the API server is not answering, admin.conf is missing or refused, the server rejected the object, or another writer changed it between kubeboot's read and its apply (409). The leader applies the add-ons again on its next turn; until the pod network is applied, Nodes stay NotReady.",
        check: "`kubectl --kubeconfig /etc/kubernetes/admin.conf get --raw /readyz` on a control plane, the object named in the message, and the API server's answer in it.";
    ADDON_NEWER = "KB-ADDON-003", "an add-on object belongs to a newer cluster generation",
        cause: "The object carries kubeboot.io/generation above the generation this node applies for: a newer generation (a restore) applied it, and this node works for an older one. Nothing is overwritten.",
        check: "`kubeboot status` (the cluster's generation); a control plane of an abandoned generation should be terminated (docs/RESTORE.md).";
    OIDC_PUBLISH = "KB-OIDC-002", "the issuer's documents cannot be published to S3",
        cause: "GetObject or PutObject on aws.oidc_bucket failed after the SDK's retries: the bucket does not exist, the control-plane role may not write under the issuer's path, or S3 is unavailable. The leader retries every turn.",
        check: "aws.oidc_bucket and cluster.service_account_issuer (its path is the objects' prefix), the control-plane role's OidcDocuments statement in infra/, and `aws s3 ls s3://<bucket>/<path>/`.";
}

/// An error with a catalogue entry. The advice an operator reads with an
/// error (`hint`) is the entry's `check`, written once, here; a failure adds
/// only what is known at run time (kubeadm's own diagnosis, the timeout key).
pub trait Coded {
    /// Its catalogue entry.
    fn entry(&self) -> &'static Entry;

    /// Its stable code, e.g. `KB-LOCK-001`.
    fn code(&self) -> &'static str {
        self.entry().code
    }

    /// What this failure adds to its entry's advice, known only at run time.
    fn detail(&self) -> Option<String> {
        None
    }

    /// What the operator should check: the detail, if any, then the entry's advice.
    fn hint(&self) -> String {
        match self.detail() {
            Some(detail) => format!("{detail}. {}", self.entry().check),
            None => self.entry().check.to_string(),
        }
    }
}

/// Logs a failure with its code, message and hint at the given level:
/// `report!(warn, err, "what happened; what happens next")`, with any extra
/// fields before the message (`report!(error, err, instance_id = %id, "...")`).
macro_rules! report {
    ($level:ident, $err:expr, $($rest:tt)+) => {{
        use $crate::catalogue::Coded as _;
        let err = &$err;
        tracing::$level!(code = err.code(), error = %err, hint = %err.hint(), $($rest)+)
    }};
}
pub(crate) use report;

/// The form every code has, for messages.
pub const CODE_FORM: &str = "KB-AREA-NNN (e.g. KB-LOCK-001)";

/// `kubeboot explain` was given something that is not a known code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCode {
    /// What was asked for, as typed.
    pub value: String,
    /// Whether it had the form of a code (then it is merely unknown).
    pub well_formed: bool,
    /// The nearest known codes, best first.
    pub closest: Vec<&'static str>,
}

impl std::fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.well_formed {
            "a known error code"
        } else {
            "an error code"
        };
        write!(
            f,
            "{:?} is not {what}: expected the form {CODE_FORM}",
            self.value
        )?;
        if !self.closest.is_empty() {
            write!(f, "; closest: {}", self.closest.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownCode {}

/// Finds the entry for `asked`: case-insensitive, surrounding brackets and
/// whitespace ignored (`[KB-LOCK-001]` as log lines print it), `KB-` and
/// leading zeros optional (`lock-1`).
pub fn lookup(asked: &str) -> Result<&'static Entry, UnknownCode> {
    let wanted = normalize(asked);
    if let Some(code) = &wanted {
        if let Some(entry) = ENTRIES.iter().find(|e| e.code == code) {
            return Ok(entry);
        }
    }
    let probe = wanted
        .clone()
        .unwrap_or_else(|| asked.trim().to_ascii_uppercase());
    Err(UnknownCode {
        value: asked.to_string(),
        well_formed: wanted.is_some(),
        closest: closest(&probe, 3),
    })
}

/// `KB-AREA-NNN` from the forms [`lookup`] accepts, or `None`.
fn normalize(asked: &str) -> Option<String> {
    let s = asked
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim()
        .to_ascii_uppercase();
    let s = s.strip_prefix("KB-").unwrap_or(&s);
    let (area, number) = s.split_once('-')?;
    let well_formed = !area.is_empty()
        && area.chars().all(|c| c.is_ascii_uppercase())
        && (1..=3).contains(&number.len())
        && number.chars().all(|c| c.is_ascii_digit());
    let n: u16 = number.parse().ok()?;
    well_formed.then(|| format!("KB-{area}-{n:03}"))
}

fn area_of(code: &str) -> &str {
    code.split('-').nth(1).unwrap_or("")
}

/// The `n` codes nearest to `probe`: same area first, then by edit distance.
fn closest(probe: &str, n: usize) -> Vec<&'static str> {
    let area = area_of(probe);
    let mut scored: Vec<(bool, usize, &'static str)> = ENTRIES
        .iter()
        .map(|e| {
            (
                area_of(e.code) != area,
                edit_distance(probe, e.code),
                e.code,
            )
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(n)
        .map(|(_, _, code)| code)
        .collect()
}

/// Levenshtein distance over bytes (codes are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// One entry as `kubeboot explain` prints it.
pub fn render_text(e: &Entry) -> String {
    format!(
        "{}: {}\n\nProbable cause:\n  {}\n\nWhat to check:\n  {}\n",
        e.code, e.title, e.cause, e.check
    )
}

/// Every code with its title, one per line, as `kubeboot explain --list` prints them.
pub fn render_list() -> String {
    let width = ENTRIES.iter().map(|e| e.code.len()).max().unwrap_or(0);
    ENTRIES
        .iter()
        .map(|e| format!("{:<width$}  {}\n", e.code, e.title))
        .collect()
}

/// `docs/errors.md`, generated from the catalogue.
pub fn markdown() -> String {
    let mut out = String::from(
        "<!-- Generated from agent/src/catalogue.rs: do not edit. Regenerate with\n     \
         KBTEST_BLESS=1 cargo test -p kubeboot --test agent errors:: -->\n\
         # kubeboot error codes\n\n\
         Every failure kubeboot reports carries a stable code `KB-<AREA>-<NNN>`: in JSON logs the \
         error line's `code` field, in text logs a `[KB-...]` prefix on the message, next to the \
         `hint` and the `explain` field (`kubeboot explain <code>`). `kubeboot explain <code>` \
         prints the entry below (`--output json` too); `kubeboot explain --list` lists every \
         code.\n\n\
         Codes are stable: a code is never renumbered, never reused and never changes meaning. \
         A new condition gets the next free number of its area. A code names a condition, not \
         one spot in the code, so a few failures that mean the same to an operator share one.\n\n\
         Configuration problems carry their own codes (KB-CONFIG-010 to KB-CONFIG-018), one log \
         line per problem, besides KB-CONFIG-001 for the failed command.\n\n\
         | area | covers |\n|---|---|\n",
    );
    for (area, covers) in AREAS {
        out.push_str(&format!("| `KB-{area}` | {covers} |\n"));
    }
    for (area, covers) in AREAS {
        out.push_str(&format!("\n## KB-{area}: {covers}\n"));
        for e in ENTRIES.iter().filter(|e| area_of(e.code) == *area) {
            out.push_str(&format!(
                "\n### {}\n\n**{}**\n\n- Probable cause: {}\n- What to check: {}\n",
                e.code, e.title, e.cause, e.check
            ));
        }
    }
    out
}

// Literal codes here are not proof of anything: the meta-test skips this
// file. Provoked failures live in `error::provoke` (and in other modules' tests).

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_well_formed_and_in_a_known_area() {
        let mut seen = std::collections::BTreeSet::new();
        for e in ENTRIES {
            assert!(seen.insert(e.code), "duplicate code {}", e.code);
            assert_eq!(
                normalize(e.code).as_deref(),
                Some(e.code),
                "{} is not KB-AREA-NNN",
                e.code
            );
            assert!(
                AREAS.iter().any(|(a, _)| *a == area_of(e.code)),
                "{}: area not in AREAS",
                e.code
            );
            for (what, text) in [("title", e.title), ("cause", e.cause), ("check", e.check)] {
                assert!(!text.trim().is_empty(), "{}: empty {what}", e.code);
                assert_eq!(text, text.trim(), "{}: {what} has outer whitespace", e.code);
            }
        }
        for (area, _) in AREAS {
            assert!(
                ENTRIES.iter().any(|e| area_of(e.code) == *area),
                "area {area} has no code"
            );
        }
    }

    #[test]
    fn lookup_is_forgiving_about_case_brackets_prefix_and_zeros() {
        for asked in [
            "KB-LOCK-001",
            "kb-lock-001",
            " [KB-LOCK-001] ",
            "lock-1",
            "Kb-Lock-01",
        ] {
            assert_eq!(lookup(asked).map(|e| e.code), Ok("KB-LOCK-001"), "{asked}");
        }
    }

    #[test]
    fn unknown_codes_name_the_value_the_form_and_the_closest_codes() {
        let err = lookup("KB-LOCK-099").expect_err("unknown");
        assert!(err.well_formed);
        assert_eq!(err.closest.len(), 3);
        assert!(
            err.closest.iter().all(|c| c.starts_with("KB-LOCK-")),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("\"KB-LOCK-099\""), "{text}");
        assert!(text.contains("KB-AREA-NNN"), "{text}");

        let err = lookup("hello").expect_err("not a code");
        assert!(!err.well_formed);
        assert!(err.to_string().contains("is not an error code"), "{err}");
        assert!(!err.closest.is_empty());

        // A typo in the area still finds its neighbours.
        let err = lookup("KB-LOKC-001").expect_err("typo");
        assert!(err.closest.contains(&"KB-LOCK-001"), "{err}");
    }

    #[test]
    fn rendering_shows_every_part() {
        for e in ENTRIES {
            let text = render_text(e);
            for part in [e.code, e.title, e.cause, e.check] {
                assert!(text.contains(part), "{text}");
            }
        }
        assert_eq!(render_list().lines().count(), ENTRIES.len());
        let md = markdown();
        for e in ENTRIES {
            assert!(md.contains(&format!("### {}\n", e.code)), "{}", e.code);
        }
    }
}
