//! The command line: the product's face for operators and for systemd.
//!
//! [`args`] holds what clap parses, this file turns it into a run (logging,
//! the exit code, the error report) and sends each command to its own file;
//! bootstrap and the daemon get this node's [`Context`] from
//! [`node_context`], the one place its parts are built.

mod args;
mod backup;
mod bootstrap;
mod config;
mod daemon;
mod etcd;
mod explain;
mod lock;
mod restore;
mod status;

pub use args::*;

use crate::config::{Config, LoadOptions, Loaded, UserData};
use crate::context::{Context, NodeContext};
use crate::error::{Error, EXIT_OK, EXIT_USAGE};
use crate::lock::dynamo::DynamoLockStore;
use crate::lock::{Locker, Owner};
use crate::registry::dynamo::DynamoRegistryStore;
use crate::registry::Registry;
use crate::telemetry::{self, LogFormat};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

/// The target of every log line the commands write: `kubeboot::cli`, as
/// when they shared one file, so log queries and filters keep matching.
const LOG_TARGET: &str = "kubeboot::cli";

/// The system's CA bundle where the AMI's distributions keep it (Debian and
/// Ubuntu; Amazon Linux, RHEL and Fedora).
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Names the system's CA bundle in `SSL_CERT_FILE` unless the environment
/// already chose (`SSL_CERT_FILE` or `SSL_CERT_DIR`). The TLS clients of
/// the AWS SDK load the system's roots with rustls-native-certs, which,
/// told nothing, reads the bundle *and* every file of `/etc/ssl/certs`:
/// on Debian the same ~140 roots three times over, ~400 files, on every
/// start (bench/REPORT.md measured it). Told the bundle, it reads one
/// file; the roots are the same. Runs before any thread exists.
fn prefer_ca_bundle() {
    let chosen = |k| std::env::var_os(k).is_some();
    if let Some(bundle) = ca_bundle(chosen("SSL_CERT_FILE") || chosen("SSL_CERT_DIR"), |p| {
        std::path::Path::new(p).is_file()
    }) {
        std::env::set_var("SSL_CERT_FILE", bundle);
    }
}

/// The bundle to name: none when the environment chose already, else the
/// first of [`CA_BUNDLES`] that exists.
fn ca_bundle(chosen: bool, exists: impl Fn(&str) -> bool) -> Option<&'static str> {
    if chosen {
        return None;
    }
    CA_BUNDLES.iter().copied().find(|p| exists(p))
}

/// Parses the process arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    prefer_ca_bundle();
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
    if let Error::Config(crate::config::Error::Invalid { problems, .. }) = err {
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
        Command::Config(ConfigCommand::Check(args)) => config::check(cli, args).await,
        Command::Status(args) => status::run(cli, args).await,
        Command::Lock(LockCommand::Release(args)) => lock::release(cli, args).await,
        Command::Etcd(EtcdCommand::Members(args)) => etcd::members(cli, args).await,
        Command::Etcd(EtcdCommand::Remove(args)) => etcd::remove(cli, args).await,
        Command::Backup(BackupCommand::Now(args)) => backup::now(cli, args).await,
        Command::Backup(BackupCommand::List(args)) => backup::list(cli, args).await,
        Command::Backup(BackupCommand::Verify(args)) => backup::verify(cli, args).await,
        Command::Restore(args) => restore::run(cli, args).await,
        Command::Bootstrap(args) => bootstrap::run(cli, args).await,
        Command::Daemon(args) => daemon::run(cli, args).await,
        Command::Explain(args) => explain::run(args),
        Command::Config(ConfigCommand::Show(args)) => config::show(cli, args).await,
    }
}

/// Loads the configuration and starts logging as it asks (flag wins over log.format).
async fn load(cli: &Cli, user_data: UserData) -> Result<Loaded, Error> {
    let loaded = crate::config::load_with(
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

/// This node's context for bootstrap and the daemon: the configuration the
/// flags and sources give, then the parts built from it.
async fn node_context(cli: &Cli, sources: &SourceArgs) -> Result<NodeContext, Error> {
    let loaded = load(cli, sources.user_data()).await?;
    Context::for_node(loaded.config).await
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

/// The region from configuration, else from instance metadata.
async fn region(cfg: &Config) -> Result<String, Error> {
    if let Some(region) = &cfg.aws.region {
        return Ok(region.clone());
    }
    let imds = crate::identity::Imds::new(&cfg.imds)?;
    match imds.region().await? {
        Some(region) => Ok(region),
        None => Err(Error::Usage(
            "aws.region is not set and instance metadata has no placement/region; set aws.region"
                .into(),
        )),
    }
}

/// The SDK configuration for the operator commands (region from config or IMDS).
async fn aws_config(cfg: &Config) -> Result<aws_config::SdkConfig, Error> {
    Ok(crate::aws::sdk_config(cfg, &region(cfg).await?).await?)
}

/// A DynamoDB client with the configured endpoint, retries and timeouts.
async fn dynamodb(cfg: &Config) -> Result<aws_sdk_dynamodb::Client, Error> {
    Ok(crate::aws::dynamodb_client(&aws_config(cfg).await?, cfg))
}

/// The cluster's locks, for the operator commands (no node identity needed).
fn lock_store(cfg: &Config, client: aws_sdk_dynamodb::Client) -> DynamoLockStore {
    DynamoLockStore::new(client, &cfg.aws.table, &cfg.cluster.name)
}

/// The operator commands' locker: what they take, `operator` holds.
fn operator_locker(cfg: &Config, client: aws_sdk_dynamodb::Client) -> Locker<DynamoLockStore> {
    Locker::new(
        std::sync::Arc::new(lock_store(cfg, client)),
        Owner::new("operator"),
        crate::lock::Settings::from_config(&cfg.lock),
    )
}

/// The cluster's registry, for the operator commands.
fn registry_for(cfg: &Config, client: aws_sdk_dynamodb::Client) -> Registry<DynamoRegistryStore> {
    Registry::new(std::sync::Arc::new(DynamoRegistryStore::new(
        client,
        &cfg.aws.table,
        &cfg.cluster.name,
    )))
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
    use super::ca_bundle;

    #[test]
    fn the_system_bundle_is_named_unless_the_environment_chose() {
        assert_eq!(
            ca_bundle(false, |_| true),
            Some("/etc/ssl/certs/ca-certificates.crt")
        );
        assert_eq!(
            ca_bundle(false, |p| p.starts_with("/etc/pki")),
            Some("/etc/pki/tls/certs/ca-bundle.crt")
        );
        // SSL_CERT_FILE or SSL_CERT_DIR set: the operator's choice stands.
        assert_eq!(ca_bundle(true, |_| true), None);
        // No bundle: rustls-native-certs probes as before.
        assert_eq!(ca_bundle(false, |_| false), None);
    }
}
