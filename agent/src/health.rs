//! The health monitor: what the old health Lambda checked, from inside the
//! cluster, once per leader turn.
//!
//! It asks every recorded etcd member for its status (health, backend size,
//! who leads), the API server for `/readyz`, and counts Ready Nodes. The
//! result becomes one EMF document, the systemd `STATUS=` line and a log
//! line. A check that cannot run is reported as unhealthy (0 healthy
//! members, API not ready), never skipped, so alarms see the outage.

use crate::config::Config;
use crate::etcd::{self, Etcd, Health};
use crate::kubernetes::Kubernetes;
use crate::metrics::{self, Metric};
use crate::registry::{Registry, RegistryStore};

/// One look at the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub members: usize,
    pub voters: usize,
    pub learners: usize,
    pub healthy: usize,
    /// Largest backend size among the members that answered.
    pub db_size: Option<i64>,
    /// The leader most members that answered agree on.
    pub leader: Option<u64>,
    /// Why etcd could not be asked at all.
    pub etcd_error: Option<String>,
    /// Why members are not healthy (no answer, no leader, raft errors, an
    /// alarm), each reason once with the members it concerns.
    pub etcd_problems: Vec<String>,
    pub api_ready: bool,
    pub nodes_ready: Option<usize>,
    pub nodes_not_ready: Option<usize>,
    /// Why the Kubernetes API could not be asked.
    pub api_error: Option<String>,
}

/// Folds etcd's per-member answers into the snapshot's etcd figures.
pub fn etcd_figures(health: &[Health], snapshot: &mut Snapshot) {
    snapshot.members = health.len();
    snapshot.learners = health.iter().filter(|h| h.member.is_learner).count();
    snapshot.voters = snapshot.members - snapshot.learners;
    snapshot.healthy = health.iter().filter(|h| h.healthy).count();
    let mut problems: Vec<(&str, Vec<String>)> = Vec::new();
    for h in health.iter().filter(|h| !h.healthy) {
        let why = h.error.as_deref().unwrap_or("unhealthy");
        let who = h.member.hex_id();
        match problems.iter_mut().find(|(w, _)| *w == why) {
            Some((_, names)) => names.push(who),
            None => problems.push((why, vec![who])),
        }
    }
    snapshot.etcd_problems = problems
        .into_iter()
        .map(|(why, names)| format!("{}: {why}", names.join(", ")))
        .collect();
    snapshot.db_size = health.iter().filter_map(|h| h.db_size).max();
    let mut votes: Vec<(u64, usize)> = Vec::new();
    for id in health.iter().filter_map(|h| h.leader).filter(|id| *id != 0) {
        match votes.iter_mut().find(|(l, _)| *l == id) {
            Some((_, n)) => *n += 1,
            None => votes.push((id, 1)),
        }
    }
    snapshot.leader = votes.iter().max_by_key(|(_, n)| *n).map(|(id, _)| *id);
}

/// Leader changes between two looks (a leader that vanished counts too).
pub fn leader_changes(before: Option<u64>, now: Option<u64>) -> u64 {
    match (before, now) {
        (Some(a), Some(b)) if a != b => 1,
        (Some(_), None) => 1,
        _ => 0,
    }
}

/// The metric values of a snapshot.
pub fn figures(s: &Snapshot, leader_changes: u64) -> Vec<(Metric, f64)> {
    let mut out = vec![
        (metrics::ETCD_MEMBERS, s.members as f64),
        (metrics::ETCD_VOTERS, s.voters as f64),
        (metrics::ETCD_LEARNERS, s.learners as f64),
        (metrics::ETCD_HEALTHY_MEMBERS, s.healthy as f64),
        (metrics::ETCD_LEADER_CHANGES, leader_changes as f64),
        (
            metrics::API_SERVER_READY,
            if s.api_ready { 1.0 } else { 0.0 },
        ),
    ];
    if let Some(size) = s.db_size {
        out.push((metrics::ETCD_DB_SIZE, size as f64));
    }
    if let (Some(ready), Some(not_ready)) = (s.nodes_ready, s.nodes_not_ready) {
        out.push((metrics::NODES_READY, ready as f64));
        out.push((metrics::NODES_NOT_READY, not_ready as f64));
    }
    out
}

/// The line `systemctl status` shows on the leader.
pub fn status_line(s: &Snapshot) -> String {
    let etcd = match &s.etcd_error {
        Some(_) => "etcd unreachable".to_string(),
        None => format!(
            "etcd {}/{} healthy ({} voters, {} learners{})",
            s.healthy,
            s.members,
            s.voters,
            s.learners,
            s.leader
                .map(|l| format!(", leader {}", crate::etcd::MemberHex(l)))
                .unwrap_or_else(|| ", no leader".into())
        ),
    };
    let api = if s.api_ready {
        "API ready"
    } else {
        "API not ready"
    };
    let nodes = match (s.nodes_ready, s.nodes_not_ready) {
        (Some(r), Some(n)) => format!("; nodes {r}/{} Ready", r + n),
        _ => String::new(),
    };
    format!("leader: {etcd}; {api}{nodes}")
}

/// Takes one look at etcd and the API server.
pub async fn gather<S: RegistryStore>(cfg: &Config, registry: &Registry<S>) -> Snapshot {
    let mut s = Snapshot::default();
    let settings = etcd::Settings::from_config(cfg);
    let etcd_look = async {
        let records = registry.members().await.map_err(|e| e.to_string())?;
        let endpoints = etcd::recorded_endpoints(&records, &settings);
        let etcd = Etcd::connect_any(&endpoints, &settings)
            .await
            .map_err(|e| e.to_string())?;
        let members = etcd.members().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(etcd.health(&members).await)
    };
    match etcd_look.await {
        Ok(health) => etcd_figures(&health, &mut s),
        Err(e) => s.etcd_error = Some(e),
    }
    let admin = cfg.paths.kubernetes_dir.join("admin.conf");
    let api_look = async {
        let kube = Kubernetes::from_kubeconfig(&admin, cfg.timeouts.kube_api)
            .await
            .map_err(|e| e.to_string())?;
        let ready = kube.api_ready().await.map_err(|e| e.to_string())?;
        let counts = kube.node_counts().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((ready, counts))
    };
    match api_look.await {
        Ok((ready, (r, n))) => {
            s.api_ready = ready;
            s.nodes_ready = Some(r);
            s.nodes_not_ready = Some(n);
        }
        Err(e) => s.api_error = Some(e),
    }
    s
}

/// Looks, then reports: EMF document, systemd status and a log line.
/// Returns the snapshot so the caller can count leader changes next time.
pub async fn report<S: RegistryStore>(
    cfg: &Config,
    registry: &Registry<S>,
    previous_leader: Option<u64>,
) -> Snapshot {
    let s = gather(cfg, registry).await;
    let changes = leader_changes(previous_leader, s.leader);
    metrics::emit(&figures(&s, changes), &[]);
    let line = status_line(&s);
    crate::systemd::status(&line);
    if s.etcd_error.is_some() || s.healthy < s.members || !s.api_ready {
        tracing::warn!(
            etcd_error = s.etcd_error.as_deref().unwrap_or("-"),
            etcd_problems = %s.etcd_problems.join("; "),
            api_error = s.api_error.as_deref().unwrap_or("-"),
            "cluster health: {line}"
        );
    } else {
        tracing::info!(leader_changes = changes, "cluster health: {line}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::Member;

    fn health(id: u64, learner: bool, answered: Option<(i64, u64)>) -> Health {
        Health {
            member: Member {
                id,
                name: format!("m{id}"),
                peer_urls: vec![],
                client_urls: vec![format!("https://10.0.0.{id}:2379")],
                is_learner: learner,
            },
            healthy: answered.is_some(),
            error: answered.is_none().then(|| "refused".into()),
            db_size: answered.map(|(size, _)| size),
            leader: answered.map(|(_, leader)| leader),
        }
    }

    #[test]
    fn a_three_member_cluster_with_one_dead_member_and_a_learner() {
        let mut s = Snapshot::default();
        etcd_figures(
            &[
                health(1, false, Some((20_480, 1))),
                health(2, false, None),
                health(3, false, Some((40_960, 1))),
                health(4, true, Some((8_192, 3))),
            ],
            &mut s,
        );
        assert_eq!((s.members, s.voters, s.learners, s.healthy), (4, 3, 1, 3));
        assert_eq!(s.db_size, Some(40_960));
        assert_eq!(s.leader, Some(1), "the majority's leader wins");
        assert_eq!(s.etcd_problems, vec!["0000000000000002: refused"]);
    }

    #[test]
    fn members_that_answer_without_a_leader_or_under_an_alarm_are_not_counted_healthy() {
        let mut s = Snapshot::default();
        let mut lost = health(1, false, Some((20_480, 0)));
        lost.healthy = false;
        lost.error = crate::etcd::judge(0, &[], &[]).err();
        let mut alarmed = health(2, false, Some((20_480, 3)));
        alarmed.healthy = false;
        alarmed.error = Some("etcd alarm NOSPACE is active".into());
        let mut alarmed_too = health(3, false, Some((20_480, 3)));
        alarmed_too.healthy = false;
        alarmed_too.error = alarmed.error.clone();
        etcd_figures(&[lost, alarmed, alarmed_too], &mut s);
        assert_eq!((s.members, s.healthy), (3, 0));
        assert_eq!(s.etcd_problems.len(), 2, "{:?}", s.etcd_problems);
        assert!(s.etcd_problems[0].starts_with("0000000000000001: no leader"));
        assert_eq!(
            s.etcd_problems[1],
            "0000000000000002, 0000000000000003: etcd alarm NOSPACE is active"
        );
    }

    #[test]
    fn leader_changes_count_a_new_or_a_vanished_leader() {
        assert_eq!(leader_changes(None, Some(1)), 0, "first look");
        assert_eq!(leader_changes(Some(1), Some(1)), 0);
        assert_eq!(leader_changes(Some(1), Some(2)), 1);
        assert_eq!(leader_changes(Some(1), None), 1);
    }

    #[test]
    fn an_unreachable_etcd_reports_zero_healthy_members_not_nothing() {
        let s = Snapshot {
            etcd_error: Some("no endpoint answered".into()),
            ..Default::default()
        };
        let values = figures(&s, 0);
        assert!(values
            .iter()
            .any(|(m, v)| *m == metrics::ETCD_HEALTHY_MEMBERS && *v == 0.0));
        assert!(values
            .iter()
            .any(|(m, v)| *m == metrics::API_SERVER_READY && *v == 0.0));
        assert_eq!(status_line(&s), "leader: etcd unreachable; API not ready");
    }

    #[test]
    fn the_status_line_says_what_an_operator_checks_first() {
        let s = Snapshot {
            members: 3,
            voters: 3,
            healthy: 3,
            leader: Some(0x8e9e05c52164694d),
            api_ready: true,
            nodes_ready: Some(4),
            nodes_not_ready: Some(1),
            ..Default::default()
        };
        assert_eq!(
            status_line(&s),
            "leader: etcd 3/3 healthy (3 voters, 0 learners, leader 8e9e05c52164694d); API ready; nodes 4/5 Ready"
        );
        assert_eq!(figures(&s, 1).len(), 8);
    }
}
