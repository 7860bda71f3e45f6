//! `kubeboot backup now|list|verify`: the operator's side of the backups the
//! leader takes on its own.

use super::etcd::etcd_client;
use super::{
    aws_config, load, operator_locker, print, registry_for, stop_on_signal, BackupListArgs,
    BackupNowArgs, BackupVerifyArgs, Cli, Output,
};
use crate::backup::{Backups, Entry, Manifest, Source, Trigger};
use crate::error::Error;
use crate::lock::Purpose;
use std::process::ExitCode;

/// Takes a snapshot now, under the `backup` lock.
pub(super) async fn now(cli: &Cli, args: &BackupNowArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let aws = aws_config(cfg).await?;
    let backups = Backups::from_config(&aws, cfg)?;
    let ddb = crate::aws::dynamodb_client(&aws, cfg);
    let registry = registry_for(cfg, ddb.clone());
    let etcd = etcd_client(cfg, &args.etcd, &registry).await?;
    let generation = registry.state().await?.generation;
    let settings = crate::etcd::Settings::from_config(cfg);
    let endpoints = if args.etcd.endpoints.is_empty() {
        crate::etcd::recorded_endpoints(&registry.members().await?, &settings)
    } else {
        args.etcd.endpoints.clone()
    };
    let guard = operator_locker(cfg, ddb).acquire(Purpose::Backup).await?;
    let source = Source {
        etcd: &etcd,
        endpoints,
        generation,
        stop: Some(stop_on_signal()?),
    };
    let manifest = guard
        .scoped(async |g| crate::backup::take(&backups, source, Trigger::Manual, g).await)
        .await?;
    print(&match args.output {
        Output::Text => format!(
            "{}\n  {} bytes, revision {}, from member {}, sha256 {}, in {} ms\n",
            backups.bucket().uri(&manifest.key),
            manifest.size,
            manifest.revision,
            manifest.member,
            manifest.sha256,
            manifest.duration_ms
        ),
        Output::Json => format!("{:#}\n", as_json(&backups, &manifest)),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Lists the cluster's snapshots.
pub(super) async fn list(cli: &Cli, args: &BackupListArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let backups = Backups::from_config(&aws_config(cfg).await?, cfg)?;
    let entries = backups.list().await?;
    print(&match args.output {
        Output::Text => render(&backups.location(), &entries, crate::backup::now_unix()),
        Output::Json => format!(
            "{:#}\n",
            serde_json::json!({ "location": backups.location(), "snapshots": entries })
        ),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Reads a snapshot back and checks it.
pub(super) async fn verify(cli: &Cli, args: &BackupVerifyArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let backups = Backups::from_config(&aws_config(cfg).await?, cfg)?;
    let key = backups.resolve(&args.snapshot).await?;
    let manifest = backups.verify(&key).await?;
    print(&match args.output {
        Output::Text => format!(
            "{} verifies: {} bytes, sha256 {} (as its manifest and etcd's trailer say)\n",
            backups.bucket().uri(&key),
            manifest.size,
            manifest.sha256
        ),
        Output::Json => format!("{:#}\n", as_json(&backups, &manifest)),
    })?;
    Ok(ExitCode::SUCCESS)
}

fn as_json(backups: &Backups, m: &Manifest) -> serde_json::Value {
    serde_json::json!({ "uri": backups.bucket().uri(&m.key), "manifest": m })
}

/// The text listing: one line per snapshot, oldest first.
fn render(location: &str, entries: &[Entry], now: u64) -> String {
    let mut out = format!("snapshots in {location}\n");
    if entries.is_empty() {
        out.push_str("  none\n");
    }
    for e in entries {
        let age = crate::config::value::format_duration(std::time::Duration::from_secs(
            now.saturating_sub(e.taken_at_unix),
        ));
        match &e.manifest {
            Some(m) => out.push_str(&format!(
                "  {}  {} ago  {} bytes  revision {}  member {}  {}  verified\n",
                m.taken_at,
                age,
                m.size,
                m.revision,
                m.member,
                m.trigger.as_str()
            )),
            None => out.push_str(&format!(
                "  {}  {} ago  {} bytes  NOT VERIFIED (no manifest: an upload that did not finish)\n",
                crate::backup::rfc3339(e.taken_at_unix),
                age,
                e.size
            )),
        }
        out.push_str(&format!("    {}\n", e.key));
    }
    out
}
