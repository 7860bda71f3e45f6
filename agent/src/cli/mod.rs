//! The command line: the product's face for operators and for systemd.

use crate::config::{self, Config, LoadOptions, Loaded, UserData};
use crate::context::{Context, NodeContext};
use crate::error::{Error, EXIT_OK, EXIT_USAGE};
use crate::lock::dynamo::DynamoLockStore;
use crate::lock::{Locker, Owner, Purpose};
use crate::registry::dynamo::DynamoRegistryStore;
use crate::registry::Registry;
use crate::telemetry::{self, LogFormat};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    fn user_data(&self) -> UserData {
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
    fn user_data(&self) -> UserData {
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

/// Parses the process arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version exit 0; usage errors exit 2 (clap's own code).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&cli, &Error::Runtime(e)),
    };
    match runtime.block_on(run(&cli)) {
        Ok(code) => code,
        Err(e) => report(&cli, &e),
    }
}

/// Logs a failure with its catalogue code and hint, initializing logging if
/// the command had not. The code is a field (`code`, for queries) and the
/// message's `[KB-...]` prefix (for people); `explain` says how to learn more.
/// All on the one error line, so no log level or filter separates them.
fn report(cli: &Cli, err: &Error) -> ExitCode {
    use crate::catalogue::Coded;
    let _ = telemetry::init(cli.log_format.unwrap_or(LogFormat::Auto), "info");
    if let Error::Config(config::Error::Invalid { problems, .. }) = err {
        for p in problems {
            let code = p.code();
            tracing::error!(code, kind = ?p.kind, source = %p.source, key = %p.key, "[{code}] {p}");
        }
    }
    let code = err.code();
    tracing::error!(
        code,
        exit_code = err.exit_code(),
        hint = %err.hint(),
        explain = %format!("kubeboot explain {code}"),
        "[{code}] {err}"
    );
    err.to_exit_code()
}

/// Runs one command.
pub async fn run(cli: &Cli) -> Result<ExitCode, Error> {
    match &cli.command {
        Command::Config(ConfigCommand::Check(args)) => config_check(cli, args).await,
        Command::Status(args) => {
            let loaded = load(cli, args.sources.user_data()).await?;
            let cfg = &loaded.config;
            let client = dynamodb(cfg).await?;
            let locks = DynamoLockStore::new(client.clone(), &cfg.aws.table, &cfg.cluster.name);
            let registry = Registry::new(std::sync::Arc::new(DynamoRegistryStore::new(
                client,
                &cfg.aws.table,
                &cfg.cluster.name,
            )));
            let status =
                crate::status::gather(&cfg.cluster.name, &cfg.aws.table, &locks, &registry)
                    .await?
                    .with_local_certificates(&cfg.paths.kubernetes_dir);
            print(&match args.output {
                Output::Text => crate::status::render_text(&status),
                Output::Json => format!("{:#}\n", crate::status::to_json(&status)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lock(LockCommand::Release(args)) => lock_release(cli, args).await,
        Command::Etcd(EtcdCommand::Members(args)) => etcd_members(cli, args).await,
        Command::Etcd(EtcdCommand::Remove(args)) => etcd_remove(cli, args).await,
        Command::Bootstrap(args) => bootstrap(cli, args).await,
        Command::Daemon(args) => daemon(cli, args).await,
        Command::Explain(args) => explain(args),
        Command::Config(ConfigCommand::Show(args)) => {
            let loaded = load(cli, args.sources.user_data()).await?;
            let out = match args.output {
                Output::Text => loaded.show_text(),
                Output::Json => format!("{:#}\n", loaded.show_json()),
            };
            print(&out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `kubeboot explain`: one entry, or the list; an unknown code is a usage error.
fn explain(args: &ExplainArgs) -> Result<ExitCode, Error> {
    use crate::catalogue::{self, ENTRIES};
    let out = match (&args.code, args.output) {
        (Some(code), Output::Text) => catalogue::render_text(catalogue::lookup(code)?),
        (Some(code), Output::Json) => {
            format!("{:#}\n", serde_json::json!(catalogue::lookup(code)?))
        }
        (None, Output::Text) => catalogue::render_list(),
        (None, Output::Json) => format!("{:#}\n", serde_json::json!(ENTRIES)),
    };
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Loads the configuration and starts logging as it asks (flag wins over log.format).
async fn load(cli: &Cli, user_data: UserData) -> Result<Loaded, Error> {
    let loaded = config::load_with(
        &LoadOptions::from_process(cli.config.clone(), user_data),
        &crate::identity::UserDataFromImds,
    )
    .await?;
    let format = cli
        .log_format
        .or_else(|| LogFormat::parse(&loaded.config.log.format))
        .unwrap_or(LogFormat::Auto);
    telemetry::init(format, &loaded.config.log.level)?;
    Ok(loaded)
}

async fn lock_release(cli: &Cli, args: &ReleaseArgs) -> Result<ExitCode, Error> {
    if !args.force {
        return Err(Error::Usage(format!(
            "refusing to release the {} lock without --force; check `kubeboot status` first: \
             the holder must be dead or stuck",
            args.purpose
        )));
    }
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let store = std::sync::Arc::new(DynamoLockStore::new(
        dynamodb(cfg).await?,
        &cfg.aws.table,
        &cfg.cluster.name,
    ));
    let locker = Locker::new(
        store,
        Owner::new("operator"),
        crate::lock::Settings::from_config(&cfg.lock),
    );
    tracing::warn!(
        lock = %args.purpose,
        "forcing a lock release: watching it for its lease plus lock.margin; refused if the holder renews meanwhile"
    );
    match locker.force_release(args.purpose).await {
        Ok(item) => {
            print(&format!(
                "released the {} lock held by {} (fence now {}: the old holder's writes are refused)\n",
                args.purpose, item.owner, item.fence
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::lock::Error::NotHeld { .. }) => {
            print(&format!(
                "the {} lock is not held; nothing to release\n",
                args.purpose
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

/// etcd through `--endpoint`s, else through the members the registry records.
async fn etcd_client(
    cfg: &Config,
    args: &EtcdEndpointArgs,
    registry: &Registry<DynamoRegistryStore>,
) -> Result<crate::etcd::Etcd, Error> {
    let settings = crate::etcd::Settings::from_config(cfg);
    let endpoints = if args.endpoints.is_empty() {
        crate::etcd::recorded_endpoints(&registry.members().await?, &settings)
    } else {
        args.endpoints.clone()
    };
    if endpoints.is_empty() {
        return Err(crate::membership::Error::NoEndpoints.into());
    }
    Ok(crate::etcd::Etcd::connect_any(&endpoints, &settings)
        .await
        .map_err(crate::membership::Error::from)?)
}

fn registry_for(cfg: &Config, client: aws_sdk_dynamodb::Client) -> Registry<DynamoRegistryStore> {
    Registry::new(std::sync::Arc::new(DynamoRegistryStore::new(
        client,
        &cfg.aws.table,
        &cfg.cluster.name,
    )))
}

async fn etcd_members(cli: &Cli, args: &EtcdMembersArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let registry = registry_for(cfg, dynamodb(cfg).await?);
    let etcd = etcd_client(cfg, &args.etcd, &registry).await?;
    let members = etcd
        .members()
        .await
        .map_err(crate::membership::Error::from)?;
    let health = etcd.health(&members).await;
    let (views, orphans) = crate::membership::views(&health, &registry.members().await?);
    print(&match args.output {
        Output::Text => crate::membership::render_text(&views, &orphans),
        Output::Json => format!(
            "{:#}\n",
            serde_json::json!({
                "members": views,
                "records_without_member": orphans,
            })
        ),
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn etcd_remove(cli: &Cli, args: &EtcdRemoveArgs) -> Result<ExitCode, Error> {
    let target = crate::membership::parse_target(&args.target).ok_or_else(|| {
        Error::Usage(format!(
            "INSTANCE_OR_MEMBER_ID {:?} is not {}",
            args.target,
            crate::membership::TARGET_FORMS
        ))
    })?;
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let client = dynamodb(cfg).await?;
    let registry = registry_for(cfg, client.clone());
    let etcd = etcd_client(cfg, &args.etcd, &registry).await?;
    if args.force {
        tracing::warn!(removing = %target, "--force: a two-member cluster may be shrunk to one; one more failure would then lose it");
    }
    let locker = Locker::new(
        std::sync::Arc::new(DynamoLockStore::new(
            client,
            &cfg.aws.table,
            &cfg.cluster.name,
        )),
        Owner::new("operator"),
        crate::lock::Settings::from_config(&cfg.lock),
    );
    let outcome = crate::membership::remove(&etcd, &registry, &locker, &target, args.force).await?;
    let mut out = String::new();
    match &outcome.removed {
        Some(r) => out.push_str(&format!(
            "removed etcd member {:016x}{}: {} voting members left, {} healthy (quorum {})\n",
            r.id,
            if r.learner { " (learner)" } else { "" },
            r.voters_after,
            r.healthy_voters_after,
            r.quorum_after
        )),
        None => out.push_str(&format!("{target} has no etcd member (already removed)\n")),
    }
    if let Some(instance) = &outcome.forgot {
        out.push_str(&format!("deleted the member record of {instance}\n"));
    }
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// This node's context for bootstrap and the daemon: the configuration the
/// flags and sources give, then the parts built from it.
async fn node_context(cli: &Cli, sources: &SourceArgs) -> Result<NodeContext, Error> {
    let loaded = load(cli, sources.user_data()).await?;
    Context::for_node(loaded.config).await
}

async fn bootstrap(cli: &Cli, args: &BootstrapArgs) -> Result<ExitCode, Error> {
    let started = std::time::Instant::now();
    let ctx = node_context(cli, &args.sources).await?;
    let stop = stop_on_signal()?;
    let bootstrap = crate::bootstrap::Bootstrap {
        ctx: ctx.with_stop(stop.clone()),
    };
    crate::systemd::status("bootstrapping");
    let mut stopped = stop.clone();
    let outcome = until_stopped(bootstrap.run(), stop, &bootstrap.ctx.kubeadm).await;
    if outcome.is_ok() {
        // Only now, the member confirmed and recorded (or found so by an
        // earlier run): the stack's rolling update may take the next one.
        let signal = crate::cloudformation::signal_in_service(
            &bootstrap.ctx.aws,
            &bootstrap.ctx.cfg,
            &bootstrap.ctx.identity.instance_id,
        );
        tokio::select! {
            () = signal => {}
            _ = stopped.wait_for(|s| *s) => tracing::warn!("stopped before the stack signal was answered; the next start signals again"),
        }
    }
    let elapsed = crate::metrics::ms(started.elapsed());
    let path = match &outcome {
        Ok(done) => done.path,
        Err(_) => bootstrap.attempted_path(),
    }
    .map(crate::bootstrap::Path::as_str)
    .unwrap_or("unknown");
    let result = match outcome {
        Ok(done) => {
            crate::metrics::emit(
                &[
                    (crate::metrics::BOOTSTRAP_SUCCESS, 1.0),
                    (crate::metrics::BOOTSTRAP_DURATION, elapsed),
                ],
                &[("Path", path)],
            );
            tracing::info!(run_id = %done.run_id, path, "node bootstrapped");
            crate::systemd::ready(&format!("bootstrapped ({path})"));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            crate::metrics::emit(
                &[
                    (crate::metrics::BOOTSTRAP_FAILURE, 1.0),
                    (crate::metrics::BOOTSTRAP_DURATION, elapsed),
                ],
                &[("Path", path)],
            );
            let code = crate::catalogue::Coded::code(&e);
            crate::systemd::status(&format!("bootstrap failed ({path}): [{code}] {e}"));
            Err(e.into())
        }
    };
    crate::metrics::global()
        .flush(crate::metrics::FLUSH_GRACE)
        .await;
    result
}

/// A flag that turns `true` on SIGTERM (`systemctl stop`, shutdown) or
/// SIGINT; `STOPPING=1` is sent to systemd then.
fn stop_on_signal() -> Result<tokio::sync::watch::Receiver<bool>, Error> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Runtime)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        crate::systemd::stopping();
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// How long a stopped bootstrap gets to end a running kubeadm step
/// (kubeadm's SIGTERM-to-SIGKILL grace, then releasing its lock) before the
/// process exits anyway; below the unit's `TimeoutStopSec`.
const BOOTSTRAP_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs bootstrap until it ends or a stop is asked. Then a running kubeadm
/// is stopped by the flag and its step given [`BOOTSTRAP_STOP_WAIT`] to fail
/// and release its lock; any other wait (a lock, join material, etcd) is
/// abandoned at once (a lease held then expires on its own).
async fn until_stopped<T>(
    work: impl std::future::Future<Output = Result<T, crate::bootstrap::Error>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    kubeadm: &crate::kubeadm::Kubeadm,
) -> Result<T, crate::bootstrap::Error> {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        _ = stop.wait_for(|s| *s) => {}
    }
    if !kubeadm.is_running() {
        return Err(crate::bootstrap::Error::Stopped);
    }
    match tokio::time::timeout(BOOTSTRAP_STOP_WAIT, work).await {
        Ok(done) => done,
        Err(_) => Err(crate::bootstrap::Error::Stopped),
    }
}

async fn daemon(cli: &Cli, args: &DaemonArgs) -> Result<ExitCode, Error> {
    let ctx = node_context(cli, &args.sources).await?;
    let rx = stop_on_signal()?;

    let queue =
        ctx.cfg.aws.lifecycle_queue_url.as_ref().map(|url| {
            crate::aws::sqs::Queue::new(crate::aws::sqs_client(&ctx.aws, &ctx.cfg), url)
        });
    let hooks =
        crate::aws::autoscaling::Hooks::new(crate::aws::autoscaling_client(&ctx.aws, &ctx.cfg));
    let imds = crate::identity::Imds::new(&ctx.cfg.imds)?;
    let instances = crate::aws::ec2::Instances::new(crate::aws::ec2_client(&ctx.aws, &ctx.cfg));
    let daemon = crate::daemon::Daemon {
        queue,
        hooks,
        imds,
        instances,
        suspects: Default::default(),
        etcd_leader: Default::default(),
        ctx: ctx.with_stop(rx.clone()),
    };
    crate::systemd::ready("daemon: loops running");
    let watchdog = tokio::spawn(crate::systemd::watchdog());
    daemon.run(rx).await;
    watchdog.abort();
    crate::metrics::global()
        .flush(crate::metrics::FLUSH_GRACE)
        .await;
    Ok(ExitCode::SUCCESS)
}

/// The region from configuration, else from instance metadata.
async fn region(cfg: &Config) -> Result<String, Error> {
    if let Some(region) = &cfg.aws.region {
        return Ok(region.clone());
    }
    let imds = crate::identity::Imds::new(&cfg.imds)?;
    match imds.get("/latest/meta-data/placement/region").await? {
        Some(bytes) => Ok(String::from_utf8_lossy(&bytes).trim().to_string()),
        None => Err(Error::Usage(
            "aws.region is not set and instance metadata has no placement/region; set aws.region"
                .into(),
        )),
    }
}

/// A DynamoDB client with the configured endpoint, retries and timeouts.
async fn dynamodb(cfg: &Config) -> Result<aws_sdk_dynamodb::Client, Error> {
    let base = crate::aws::sdk_config(cfg, &region(cfg).await?).await?;
    Ok(crate::aws::dynamodb_client(&base, cfg))
}

async fn config_check(cli: &Cli, args: &CheckArgs) -> Result<ExitCode, Error> {
    let user_data = args.user_data();
    let result = config::load_with(
        &LoadOptions::from_process(cli.config.clone(), user_data.clone()),
        &crate::identity::UserDataFromImds,
    )
    .await;
    let (problems, omitted, unread) = match &result {
        Ok(_) => (Vec::new(), 0, None),
        Err(config::Error::Invalid {
            problems,
            omitted,
            user_data_unread,
        }) => (problems.clone(), *omitted, user_data_unread.clone()),
        Err(_) => return result.map(|_| ExitCode::SUCCESS).map_err(Error::from),
    };
    let user_data_note = match (&user_data, unread) {
        (_, Some(why)) => format!("user-data not merged: {why}"),
        (UserData::Skip, None) => "user-data not merged (pass --with-user-data to fetch it from \
            instance metadata, or --user-data FILE)"
            .to_string(),
        _ => "user-data merged".to_string(),
    };
    let out = match args.output {
        Output::Json => format!(
            "{:#}\n",
            serde_json::json!({
                "ok": problems.is_empty(),
                "problems": coded(&problems),
                "omitted": omitted,
                "user_data": user_data_note,
            })
        ),
        Output::Text => format!(
            "{}{user_data_note}\n",
            check_report(result.as_ref().ok(), &problems, omitted)
        ),
    };
    print(&out)?;
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

/// Problems as JSON objects with their catalogue code beside the fields.
fn coded(problems: &[config::Problem]) -> Vec<serde_json::Value> {
    problems
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or(serde_json::Value::Null);
            if let Some(map) = v.as_object_mut() {
                map.insert("code".into(), crate::catalogue::Coded::code(p).into());
            }
            v
        })
        .collect()
}

fn check_report(loaded: Option<&Loaded>, problems: &[config::Problem], omitted: usize) -> String {
    if let Some(l) = loaded {
        let mut sources: Vec<String> = l.entries.values().map(|e| e.source.to_string()).collect();
        sources.retain(|s| !s.starts_with("default"));
        sources.sort();
        sources.dedup();
        return format!(
            "configuration OK: cluster {}, role {}, from {}\n",
            l.config.cluster.name,
            l.config.node.role.as_str(),
            if sources.is_empty() {
                "defaults only".to_string()
            } else {
                sources.join(", ")
            }
        );
    }
    let total = problems.len() + omitted;
    let mut out = format!(
        "configuration has {total} problem{}:\n",
        if total == 1 { "" } else { "s" }
    );
    for (i, p) in problems.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}. [{}] {p}\n",
            i + 1,
            crate::catalogue::Coded::code(p)
        ));
    }
    if omitted > 0 {
        out.push_str(&format!(
            "     … and {omitted} more not listed: fix the ones above and check again\n"
        ));
    }
    out
}

fn print(s: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(s.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(Error::Output)
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
