//! `kubeboot etcd members` and `kubeboot etcd remove`: etcd membership as
//! etcd and the registry see it, and its one manual change.

use super::{
    dynamodb, load, operator_locker, print, registry_for, Cli, EtcdEndpointArgs, EtcdMembersArgs,
    EtcdRemoveArgs, Output, LOG_TARGET,
};
use crate::config::Config;
use crate::error::Error;
use crate::registry::dynamo::DynamoRegistryStore;
use crate::registry::Registry;
use std::process::ExitCode;

/// etcd through `--endpoint`s, else through the members the registry records.
pub(super) async fn etcd_client(
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

/// Lists etcd's members beside their records, with their health.
pub(super) async fn members(cli: &Cli, args: &EtcdMembersArgs) -> Result<ExitCode, Error> {
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

/// Removes one member and its record, under the membership lock and the
/// quorum guard.
pub(super) async fn remove(cli: &Cli, args: &EtcdRemoveArgs) -> Result<ExitCode, Error> {
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
        tracing::warn!(target: LOG_TARGET, removing = %target, "--force: a two-member cluster may be shrunk to one; one more failure would then lose it");
    }
    let locker = operator_locker(cfg, client);
    let outcome = crate::membership::remove(&etcd, &registry, &locker, &target, args.force).await?;
    let mut out = String::new();
    match &outcome.removed {
        Some(r) => out.push_str(&format!(
            "removed etcd member {}{}: {} voting members left, {} healthy (quorum {})\n",
            crate::etcd::MemberHex(r.id),
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
