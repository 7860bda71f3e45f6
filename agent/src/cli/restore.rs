//! `kubeboot restore --snapshot <latest|key|s3-uri>`: checks before it
//! changes anything, the cheap ones first (a control plane, etcd's restore
//! tool, no recorded member still answers, then the snapshot downloaded and
//! verified as this cluster's), then runs
//! [`crate::bootstrap::Bootstrap::restore`] on this node's context.

use super::{node_context, print, stop_on_signal, Cli, Output, RestoreArgs};
use crate::backup::Backups;
use crate::error::Error;
use std::process::ExitCode;

pub(super) async fn run(cli: &Cli, args: &RestoreArgs) -> Result<ExitCode, Error> {
    let ctx = node_context(cli, &args.sources).await?;
    if ctx.cfg.node.role != crate::config::Role::ControlPlane {
        return Err(crate::bootstrap::Error::from(crate::restore::Error::NotControlPlane).into());
    }
    let backups = Backups::from_config(&ctx.aws, &ctx.cfg)?;
    // Everything that can refuse runs before anything changes.
    let tool = crate::restore::Tool::find(
        ctx.cfg.binaries.etcd_restore_tool.as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
    .map_err(crate::bootstrap::Error::from)?;
    ctx.kubeadm
        .check_version(&ctx.cfg.cluster.kubernetes_version)
        .await
        .map_err(crate::bootstrap::Error::from)?;
    let records = ctx.registry.members().await?;
    let settings = crate::etcd::Settings::from_config(&ctx.cfg);
    if let Some((endpoint, how)) = crate::restore::cluster_answers(&records, &settings).await {
        if !args.replace_answering_cluster {
            return Err(
                crate::bootstrap::Error::from(crate::restore::Error::ClusterAnswers {
                    endpoint,
                    how,
                })
                .into(),
            );
        }
        tracing::warn!(%endpoint, %how, "the recorded cluster still answers; replacing it as --replace-answering-cluster asks");
    }
    let prepared = crate::restore::prepare(&backups, &ctx.cfg, &args.snapshot, tool).await?;
    let stop = stop_on_signal()?;
    let bootstrap = crate::bootstrap::Bootstrap {
        ctx: ctx.with_stop(stop),
    };
    let (done, generation) = bootstrap.restore(&prepared).await?;
    let m = &prepared.manifest;
    tracing::info!(snapshot = %prepared.uri, generation = generation, run_id = %done.run_id, revision = m.revision, "cluster restored");
    print(&match args.output {
        Output::Text => format!(
            "restored {}\n  revision {} taken {} from member {}\n  cluster {} is generation {} (initialized by this node)\n  next: terminate the old control planes; new ones join this generation (docs/RESTORE.md)\n",
            prepared.uri,
            m.revision,
            m.taken_at,
            m.member,
            bootstrap.ctx.cfg.cluster.name,
            generation
        ),
        Output::Json => format!(
            "{:#}\n",
            serde_json::json!({
                "uri": prepared.uri,
                "manifest": m,
                "generation": generation,
                "run_id": done.run_id,
            })
        ),
    })?;
    Ok(ExitCode::SUCCESS)
}
