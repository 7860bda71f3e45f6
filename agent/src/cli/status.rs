//! `kubeboot status`: the cluster record, the locks and the member records.

use super::{aws_config, load, lock_store, print, registry_for, Cli, Output, StatusArgs};
use crate::error::Error;
use std::process::ExitCode;

pub(super) async fn run(cli: &Cli, args: &StatusArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let aws = aws_config(cfg).await?;
    let client = crate::aws::dynamodb_client(&aws, cfg);
    let locks = lock_store(cfg, client.clone());
    let registry = registry_for(cfg, client);
    let mut status = crate::status::gather(&cfg.cluster.name, &cfg.aws.table, &locks, &registry)
        .await?
        .with_local_certificates(&cfg.paths.kubernetes_dir);
    // A worker's role may not list the bucket.
    if cfg.node.role == crate::config::Role::ControlPlane && cfg.backup.enabled {
        if let Ok(backups) = crate::backup::Backups::from_config(&aws, cfg) {
            status = status.with_backups(&backups).await;
        }
    }
    print(&match args.output {
        Output::Text => crate::status::render_text(&status),
        Output::Json => format!("{:#}\n", crate::status::to_json(&status)),
    })?;
    Ok(ExitCode::SUCCESS)
}
