//! The command line's types: the flags, the commands and their help texts,
//! as clap reads them.

use crate::config::{self, UserData};
use crate::lock::Purpose;
use crate::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const ABOUT: &str =
    "Bootstraps and looks after self-managed kubeadm clusters on EC2 Auto Scaling Groups.";

const LONG_ABOUT: &str = "\
Bootstraps and looks after self-managed kubeadm clusters (stacked etcd) on EC2 Auto \
Scaling Groups. It runs on every node, started by systemd.

Configuration is merged from, lowest precedence first: built-in defaults, the file \
(--config), drop-ins in config.d/ next to it (lexical order), the kubeboot part of the \
instance user-data (MIME type application/kubeboot+toml, or a plain TOML body), and \
KUBEBOOT_<SECTION>_<KEY> environment variables. `kubeboot config show` prints the result \
and where each value came from.";

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  failure that a retry or restart may fix (AWS, etcd, kubeadm, instance metadata)
  2  configuration or usage error: fix the input; systemd does not restart on it";

/// `--version`: a test build (failpoints compiled in) says so, so an image
/// that ships one by mistake is caught by looking.
const VERSION: &str = if crate::failpoint::COMPILED_IN {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build: failpoints compiled in)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

/// `kubeboot` command line.
#[derive(Debug, Parser)]
#[command(name = "kubeboot", version = VERSION, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// Configuration file; drop-ins are read from config.d/*.toml beside it.
    #[arg(long, global = true, env = "KUBEBOOT_CONFIG", value_name = "PATH", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,

    /// Log format (stderr): json for journald/CloudWatch, text for people, auto = text on a terminal.
    /// Overrides log.format from the configuration.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate or print the merged configuration.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Join this instance to its cluster, once: `kubeadm init` on the first
    /// control plane (exactly one per cluster generation, under a DynamoDB
    /// lock), `kubeadm join` everywhere else. Idempotent: a finished node does
    /// nothing; an interrupted attempt is reset and run again. Run by systemd.
    Bootstrap(BootstrapArgs),

    /// Keep the cluster healthy after bootstrap (run by systemd on every node).
    /// On control planes one daemon is the leader (DynamoDB `leader` lock) and
    /// refreshes the join material before it expires and when a joining node
    /// asks. Stops cleanly on SIGTERM.
    Daemon(DaemonArgs),

    /// Show the cluster record (phase, generation, who initialized it), lock
    /// holders with the age of their last renewal, and the etcd member records.
    Status(StatusArgs),

    /// Operator overrides for the DynamoDB locks.
    #[command(subcommand)]
    Lock(LockCommand),

    /// Inspect and change etcd membership (run on a control plane).
    #[command(subcommand)]
    Etcd(EtcdCommand),

    /// etcd backups in the cluster's S3 bucket (run on a control plane): take
    /// one now, list them, verify one. The leader's daemon takes them every
    /// backup.interval and applies retention.
    #[command(subcommand)]
    Backup(BackupCommand),

    /// Rebuild the cluster from a snapshot on this control plane, when etcd
    /// is lost (docs/RESTORE.md is the runbook). Downloads and verifies the
    /// snapshot first (a damaged or missing one changes nothing), refuses
    /// while a recorded member still answers, then under the `init` lock:
    /// starts a new cluster generation, resets this node, lays down the
    /// backup's certificate authorities and etcd data, runs `kubeadm init`
    /// over them and publishes new join material. Other control planes and
    /// workers join the new generation as usual.
    Restore(RestoreArgs),

    /// Explain an error code from a log line (e.g. KB-LOCK-001): what failed,
    /// the probable cause and what to check. Needs no configuration.
    Explain(ExplainArgs),
}

/// Options of `kubeboot explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The code, as the error line's `code` field or `[KB-...]` prefix shows
    /// it; case-insensitive.
    #[arg(
        value_name = "CODE",
        required_unless_present = "list",
        conflicts_with = "list"
    )]
    pub code: Option<String>,

    /// List every code with its title.
    #[arg(long)]
    pub list: bool,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// `kubeboot etcd ...`
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// List etcd's members with their health and their MEMBER records: id,
    /// name, instance, peer URL, voter or learner, healthy, recorded. Records
    /// whose member is gone are listed too.
    Members(EtcdMembersArgs),
    /// Remove a member (by instance id or member id) and its record, under the
    /// membership lock and the quorum guard: refused when the healthy voters
    /// left would be below quorum, or when only two voters remain (--force).
    Remove(EtcdRemoveArgs),
}

/// Where to reach etcd, for the etcd commands.
#[derive(Debug, Args)]
pub struct EtcdEndpointArgs {
    /// Client URL of an etcd member (repeatable); default: the members the
    /// registry records. Use it when the records are wrong.
    #[arg(long = "endpoint", value_name = "URL")]
    pub endpoints: Vec<String>,
}

/// Options of `kubeboot etcd members`.
#[derive(Debug, Args)]
pub struct EtcdMembersArgs {
    #[command(flatten)]
    pub etcd: EtcdEndpointArgs,

    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// Options of `kubeboot etcd remove`.
#[derive(Debug, Args)]
pub struct EtcdRemoveArgs {
    /// What to remove: an instance id (i-0123456789abcdef0) or an etcd member
    /// id in hex as `kubeboot etcd members` prints it.
    #[arg(value_name = "INSTANCE_OR_MEMBER_ID")]
    pub target: String,

    /// Allow shrinking a two-member cluster to one. Never lifts the quorum
    /// rule, and never removes the last member.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub etcd: EtcdEndpointArgs,

    #[command(flatten)]
    pub sources: SourceArgs,
}

/// `kubeboot lock ...`
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Release a lock whose holder is dead or stuck. Watches the lock for its
    /// lease plus lock.margin first and refuses if the holder renews it
    /// meanwhile; a release bumps the fence, so a holder that is merely slow
    /// has its next write refused.
    Release(ReleaseArgs),
}

/// Options of `kubeboot lock release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// Which lock.
    #[arg(long, value_enum)]
    pub purpose: Purpose,

    /// Required: confirms you checked with `kubeboot status` that the holder is gone.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub sources: SourceArgs,
}

/// Options of `kubeboot bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
}

/// Options of `kubeboot daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
}

/// Options of `kubeboot status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// `kubeboot config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate every source and print every problem (not just the first). Exits 2 on any problem.
    /// Checks the file, drop-ins and environment alone unless --with-user-data or --user-data FILE
    /// is given: it works off EC2 (a laptop, CI, a Packer build) without waiting for metadata.
    Check(CheckArgs),
    /// Print the merged configuration, secrets redacted, with the source of each value.
    Show(ConfigArgs),
}

/// Options of the config commands.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format for the printed data.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// `kubeboot backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a snapshot now: stream etcd's snapshot into the backup bucket as
    /// a multipart upload, verify the sha256 etcd appends, then write its
    /// manifest. Waits (up to lock.acquire_timeout) for the `backup` lock if
    /// the leader is taking one. Prints the snapshot's URI.
    Now(BackupNowArgs),

    /// List this cluster's snapshots, oldest first: when, size, revision,
    /// member, and whether it is verified (has a manifest).
    List(BackupListArgs),

    /// Read a snapshot back from S3 and check it against its trailing sha256
    /// and its manifest (exit 1 and KB-BACKUP-004 when it does not verify).
    Verify(BackupVerifyArgs),
}

/// Options of `kubeboot backup now`.
#[derive(Debug, Args)]
pub struct BackupNowArgs {
    #[command(flatten)]
    pub sources: SourceArgs,

    #[command(flatten)]
    pub etcd: EtcdEndpointArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// Options of `kubeboot backup list`.
#[derive(Debug, Args)]
pub struct BackupListArgs {
    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// Options of `kubeboot backup verify`.
#[derive(Debug, Args)]
pub struct BackupVerifyArgs {
    /// `latest` (the newest verified snapshot), a key as `backup list` shows
    /// it, or `s3://<bucket>/<key>` in this cluster's bucket.
    #[arg(value_name = "SNAPSHOT", default_value = "latest")]
    pub snapshot: String,

    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// Options of `kubeboot restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// `latest` (the newest verified snapshot), a key as `backup list` shows
    /// it, or `s3://<bucket>/<key>` in this cluster's bucket.
    #[arg(long, value_name = "SNAPSHOT")]
    pub snapshot: String,

    /// Restore even though a recorded etcd member still answers: the
    /// running cluster is replaced by the snapshot's.
    #[arg(long)]
    pub replace_answering_cluster: bool,

    #[command(flatten)]
    pub sources: SourceArgs,

    /// Output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

/// Options of `kubeboot config check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub sources: SourceArgs,

    /// Also fetch the user-data from the instance metadata service and check the merged result
    /// (waits up to imds.deadline for IMDS; its failure alone exits 1).
    #[arg(long, conflicts_with_all = ["user_data", "no_user_data"])]
    pub with_user_data: bool,

    /// Output format for the printed data.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
}

impl CheckArgs {
    /// The linter reads user-data only when asked: from a file, or from IMDS.
    pub(super) fn user_data(&self) -> UserData {
        match (&self.sources.user_data, self.with_user_data) {
            (Some(path), _) => UserData::File(path.clone()),
            (None, true) => UserData::FromImds,
            (None, false) => UserData::Skip,
        }
    }
}

/// Where the user-data source comes from, for every command that loads the configuration.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Read user-data from FILE instead of the instance metadata service (check a launch template offline).
    #[arg(long, value_name = "FILE", conflicts_with = "no_user_data")]
    pub user_data: Option<PathBuf>,

    /// Ignore user-data (off EC2, or to see the baked configuration alone).
    #[arg(long)]
    pub no_user_data: bool,
}

impl SourceArgs {
    pub(super) fn user_data(&self) -> UserData {
        match (&self.user_data, self.no_user_data) {
            (Some(path), _) => UserData::File(path.clone()),
            (None, true) => UserData::Skip,
            (None, false) => UserData::FromImds,
        }
    }
}

/// How data is printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
