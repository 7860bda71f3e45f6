//! Cleaning up after a terminating instance (its etcd member, record and
//! Node, or a worker's drain) and completing its lifecycle action.

use super::{alongside, keep_alive, Error, Limits, Parts, Report};
use crate::aws::autoscaling::{Action, Completion};
use crate::config::Config;
use crate::etcd::{self, Etcd};
use crate::kubernetes::Kubernetes;
use crate::lock::LockStore;
use crate::membership::{self, Target};
use crate::metrics;
use crate::registry::RegistryStore;
use std::time::Instant;

/// Cleans up after a terminating instance and completes its action (I5).
pub async fn handle_termination<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    action: &Action,
) -> Result<Report, Error> {
    let limits = Limits::new();
    alongside(
        handle_limited(parts, action, &limits),
        keep_alive(parts.hooks, action, parts.cfg.daemon.lifecycle_heartbeat),
    )
    .await
}

/// [`handle_termination`] without its heartbeat (the caller keeps the
/// action alive), within a batch's `limits`; metered.
pub(super) async fn handle_limited<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let outcome = clean_up_and_complete(parts, action, limits).await;
    let counter = match outcome {
        Ok(_) => metrics::LIFECYCLE_ACTIONS_COMPLETED,
        Err(_) => metrics::LIFECYCLE_ACTIONS_FAILED,
    };
    metrics::record(counter, 1.0, &[]);
    outcome
}

/// The etcd member of a control plane that has no MEMBER record (a crash
/// between its join and the record, or a record deleted by hand): kubeadm
/// names a stacked etcd member after its Node. `None` when etcd has no such
/// member (a worker). When etcd cannot be asked, an error: the instance is
/// neither drained as a worker on a guess nor its member left behind; the
/// message comes back and is tried again.
async fn unrecorded_member(
    cfg: &Config,
    records: &[crate::registry::MemberRecord],
    instance_id: &str,
    node: &str,
) -> Result<Option<(Etcd, u64)>, Error> {
    let settings = etcd::Settings::from_config(cfg);
    let endpoints = etcd::recorded_endpoints(records, &settings);
    let found = async {
        let etcd = Etcd::connect_any(&endpoints, &settings).await?;
        let members = etcd.members().await?;
        let id = members.iter().find(|m| m.name == node).map(|m| m.id);
        Ok::<_, etcd::Error>(id.map(|id| (etcd, id)))
    };
    found.await.map_err(|source| Error::MembershipUnknown {
        instance_id: instance_id.to_string(),
        node: node.to_string(),
        source,
    })
}

/// How a terminating control plane is known.
enum Leaving<'a> {
    /// By its MEMBER record.
    Recorded(&'a crate::registry::MemberRecord),
    /// By its Node's name among etcd's members (through that client).
    Unrecorded(Box<Etcd>, u64),
}

/// What cleaning up after an instance did.
struct Cleanup {
    control_plane: bool,
    member: Option<String>,
    node: Option<String>,
    failures: Vec<String>,
}

impl Report {
    /// The report of one handled instance, logged with `message`.
    fn logged(
        action: &Action,
        cleanup: Cleanup,
        completion: Completion,
        started: Instant,
        message: &str,
    ) -> Report {
        let report = Report {
            instance_id: action.instance_id.clone(),
            control_plane: cleanup.control_plane,
            member: cleanup.member,
            node: cleanup.node,
            cleanup_failures: cleanup.failures,
            completion,
            elapsed: started.elapsed(),
        };
        tracing::info!(
            instance_id = %report.instance_id,
            control_plane = report.control_plane,
            member = report.member.as_deref().unwrap_or("-"),
            node = report.node.as_deref().unwrap_or("-"),
            failures = ?report.cleanup_failures,
            completion = ?report.completion,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "{message}"
        );
        report
    }
}

/// How the instance being cleaned up after is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    /// Still running while its action waits: a worker is drained.
    Terminating,
    /// Already terminated: nothing runs on it to drain.
    Gone,
}

async fn clean_up_and_complete<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let started = Instant::now();
    let cleanup = clean_up(parts, action, limits, Host::Terminating).await?;
    crate::failpoint::crash_point("lifecycle:after-cleanup");
    let completion = parts.hooks.complete(action).await?;
    Ok(Report::logged(
        action,
        cleanup,
        completion,
        started,
        "lifecycle action completed",
    ))
}

/// Cleans up after an instance EC2 already terminated (its notice was read
/// after the hook's timeout, or no group holds it any more): its member
/// leaves through the guarded path and its Node goes; there is no action to
/// complete. Nobody else deletes the Node.
pub(super) async fn clean_up_gone<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    action: &Action,
    limits: &Limits,
) -> Result<Report, Error> {
    let started = Instant::now();
    let cleanup = clean_up(parts, action, limits, Host::Gone).await?;
    Ok(Report::logged(
        action,
        cleanup,
        Completion::Gone,
        started,
        "instance already gone: cleaned up after it",
    ))
}

/// Removes the member of a control plane (or drains a running worker) and
/// deletes the Node; failures of single steps are collected, not fatal.
async fn clean_up<L: LockStore, R: RegistryStore>(
    parts: Parts<'_, L, R>,
    action: &Action,
    limits: &Limits,
    host: Host,
) -> Result<Cleanup, Error> {
    let Parts {
        cfg,
        registry,
        locker,
        backups,
        ..
    } = parts;
    let mut failures = Vec::new();
    let records = registry.members().await?;
    let record = records
        .iter()
        .find(|r| r.instance_id == action.instance_id)
        .cloned();
    let kube = match Kubernetes::from_kubeconfig(
        &cfg.paths.kubernetes_dir.join("admin.conf"),
        cfg.timeouts.kube_api,
    )
    .await
    {
        Ok(k) => Some(k),
        Err(e) => {
            failures.push(format!("Kubernetes API: {e}"));
            None
        }
    };
    let mut node = match &kube {
        Some(k) => match k.node_for_instance(&action.instance_id).await {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("finding the Node: {e}"));
                None
            }
        },
        None => None,
    };
    // A control plane is one etcd knows: by its record, else by its Node's
    // name among the members (never drained as a worker, its member left).
    let unrecorded = match (&record, &node) {
        (None, Some(name)) => unrecorded_member(cfg, &records, &action.instance_id, name).await?,
        _ => None,
    };
    let leaving = match (&record, unrecorded) {
        (Some(r), _) => Some(Leaving::Recorded(r)),
        (None, Some((etcd, id))) => Some(Leaving::Unrecorded(Box::new(etcd), id)),
        (None, None) => None,
    };
    let control_plane = leaving.is_some();
    let mut member = None;
    if let Some(leaving) = leaving {
        let _serialized = limits.removals.lock().await;
        crate::systemd::beat(crate::pacing::LEADER_LOOP, crate::pacing::allowance(cfg));
        let removal = async {
            let (etcd, target) = match leaving {
                Leaving::Recorded(r) => {
                    let settings = etcd::Settings::from_config(cfg);
                    let endpoints: Vec<String> = etcd::recorded_endpoints(&records, &settings)
                        .into_iter()
                        .filter(|e| etcd::host_of(e) != etcd::host_of(&r.peer_url))
                        .collect();
                    let etcd = Etcd::connect_any(&endpoints, &settings)
                        .await
                        .map_err(membership::Error::from)?;
                    (etcd, Target::Instance(action.instance_id.clone()))
                }
                Leaving::Unrecorded(etcd, id) => {
                    tracing::warn!(instance_id = %action.instance_id, member_id = %crate::etcd::MemberHex(id), "a control plane without a member record: its etcd member is found by its Node's name");
                    (*etcd, Target::Member(id))
                }
            };
            if let Some(backups) = backups {
                crate::backup::before_removal(backups, locker, registry, &etcd).await;
            }
            membership::remove_in(
                &etcd,
                registry,
                locker,
                &target,
                crate::quorum::Context::Terminating,
            )
            .await
        };
        if let Some(r) = &record {
            node = node.or_else(|| (!r.name.is_empty()).then(|| r.name.clone()));
        }
        match removal.await {
            Ok(outcome) => {
                member = outcome
                    .removed
                    .map(|r| crate::etcd::MemberHex(r.id).to_string());
            }
            Err(e) => {
                crate::catalogue::report!(error, e, instance_id = %action.instance_id, "etcd member not removed; the reconciler retries once it is safe");
                failures.push(format!("etcd member: {e}"));
            }
        }
    } else if let (Some(k), Some(name), Host::Terminating) = (&kube, &node, host) {
        let drained = async {
            // Closed only when the batch is dropped; then nothing drains.
            let _slot = limits.drains.acquire().await;
            k.cordon(name).await?;
            k.drain(name, cfg.timeouts.drain).await
        };
        match drained.await {
            Ok(report) if report.blocked.is_empty() => {
                tracing::info!(node = %name, evicted = report.evicted.len(), "node drained");
            }
            Ok(report) => {
                tracing::error!(node = %name, blocked = ?report.blocked, "drain deadline passed; completing the lifecycle action anyway");
                metrics::record(metrics::DRAIN_FAILURES, 1.0, &[]);
                failures.push(format!("drain left {} pods", report.blocked.len()));
            }
            Err(e) => {
                metrics::record(metrics::DRAIN_FAILURES, 1.0, &[]);
                failures.push(format!("drain: {e}"));
            }
        }
    }
    if let (Some(k), Some(name)) = (&kube, &node) {
        if let Err(e) = k.delete_node(name).await {
            failures.push(format!("deleting the Node: {e}"));
        }
    }
    Ok(Cleanup {
        control_plane,
        member,
        node,
        failures,
    })
}
