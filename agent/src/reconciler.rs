//! The dead-member reconciler (leader only): what the lifecycle queue missed
//! — an instance that vanished without a message, a joiner that died with
//! its learner half-added, a record left behind — is cleaned up each turn.
//!
//! - a recorded member whose instance EC2 no longer reports running, for
//!   longer than `daemon.reconcile_grace`, is removed (quorum guard applies);
//! - a member without a record that is unhealthy for longer than the grace
//!   is removed (a healthy one is left: bootstrap adopts it on restart);
//! - a learner that never started is removed at once, and a record whose
//!   member is gone is deleted at once: both only under the `membership`
//!   lock, which a join in progress holds, so neither can be a join's
//!   half-made state.
//!
//! The turn only runs when the `membership` lock is free (a join or a
//! termination in progress goes first). What it observed is planned by the
//! pure [`plan`]; suspicion times live in the leader's memory, so a new
//! leader waits a whole grace period again (conservative).

use crate::aws::ec2::{self, Instances};
use crate::config::Config;
use crate::etcd::{self, Etcd, Health};
use crate::lock::{LockStore, Locker, Purpose};
use crate::membership::{self, Target};
use crate::registry::{MemberRecord, Registry, RegistryStore};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Reconciler failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ec2(#[from] ec2::Error),
    #[error(transparent)]
    Membership(#[from] membership::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
}

/// One cleanup step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Remove a member (and its record) through the guarded path.
    Remove { target: Target, why: String },
    /// Delete a record whose member is gone.
    Forget { instance_id: String },
}

/// What the reconciler saw this turn.
#[derive(Debug, Clone)]
pub struct Observation {
    pub health: Vec<Health>,
    pub records: Vec<MemberRecord>,
    /// Recorded instances that EC2 does not report pending or running.
    pub not_running: HashSet<String>,
    /// Whether the member list came from the etcd leader. A follower's may
    /// lag behind a member just added: a record is forgotten only on the
    /// leader's word.
    pub from_leader: bool,
}

/// Suspects and since when (this leader's monotonic clock).
pub type Suspects = HashMap<String, Instant>;

/// The steps for `seen`, updating `suspects`: only what stayed suspect for
/// `grace` is removed; what recovered is forgotten.
pub fn plan(
    seen: &Observation,
    suspects: &mut Suspects,
    now: Instant,
    grace: Duration,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut current = HashSet::new();
    let mut suspect = |key: String, step: Step, steps: &mut Vec<Step>| {
        let since = *suspects.entry(key.clone()).or_insert(now);
        current.insert(key);
        if now.duration_since(since) >= grace {
            steps.push(step);
        }
    };
    for h in &seen.health {
        let m = &h.member;
        let record = seen.records.iter().find(|r| r.member_id == m.id);
        match record {
            _ if m.is_learner && !m.is_started() => steps.push(Step::Remove {
                target: Target::Member(m.id),
                why: "a learner that never started (a join died half-way)".into(),
            }),
            Some(r) if seen.not_running.contains(&r.instance_id) => suspect(
                format!("instance:{}", r.instance_id),
                Step::Remove {
                    target: Target::Instance(r.instance_id.clone()),
                    why: format!("instance {} no longer runs", r.instance_id),
                },
                &mut steps,
            ),
            None if !h.healthy => suspect(
                format!("member:{}", etcd::MemberHex(m.id)),
                Step::Remove {
                    target: Target::Member(m.id),
                    why: "an unrecorded member that stays unhealthy".into(),
                },
                &mut steps,
            ),
            _ => {}
        }
    }
    for r in &seen.records {
        if seen.from_leader && seen.health.iter().all(|h| h.member.id != r.member_id) {
            steps.push(Step::Forget {
                instance_id: r.instance_id.clone(),
            });
        }
    }
    suspects.retain(|k, _| current.contains(k));
    steps
}

/// The member list as the etcd leader serves it, through a client to the
/// leader alone (etcd-client 0.21 has no linearizable MemberList; a member
/// serves its own, possibly lagging, view). `None` when no member answers
/// as the leader (an election under way): no record is forgotten then.
async fn members_from_leader(
    etcd: &Etcd,
    members: &[etcd::Member],
    settings: &etcd::Settings,
) -> Option<Vec<etcd::Member>> {
    let leader = etcd.leader().await.ok()?;
    let urls = &members.iter().find(|m| m.id == leader)?.client_urls;
    let direct = Etcd::connect(urls, settings).await.ok()?;
    // It must see itself as the leader, not only be named so by another.
    if direct.leader().await.ok()? != leader {
        return None;
    }
    direct.members().await.ok()
}

/// One reconciler turn; returns the steps taken.
///
/// `leader` is this node's own instance id: EC2 must report it running for
/// its answer about the others to be believed.
pub async fn run_once<L: LockStore, R: RegistryStore>(
    cfg: &Config,
    registry: &Registry<R>,
    locker: &Locker<L>,
    instances: &Instances,
    leader: &str,
    suspects: &mut Suspects,
    backups: Option<&crate::backup::Backups>,
) -> Result<Vec<Step>, Error> {
    let Some(guard) = locker.try_acquire(Purpose::Membership).await? else {
        tracing::debug!("membership lock busy; reconciling next turn");
        return Ok(Vec::new());
    };
    guard.scoped(async |guard| {
        let records = registry.members().await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let settings = etcd::Settings::from_config(cfg);
        let etcd = Etcd::connect_any(&etcd::recorded_endpoints(&records, &settings), &settings)
            .await
            .map_err(membership::Error::from)?;
        let members = etcd.members().await.map_err(membership::Error::from)?;
        let ids: Vec<String> = records.iter().map(|r| r.instance_id.clone()).collect();
        let not_running = instances.not_running(&ids, leader).await?;
        let from_leader = members_from_leader(&etcd, &members, &settings).await;
        let (members, from_leader) = match from_leader {
            Some(list) => (list, true),
            None => {
                tracing::info!(
                    "no etcd member answers as the leader; no record is forgotten this turn"
                );
                (members, false)
            }
        };
        let seen = Observation {
            health: etcd.health(&members).await,
            records,
            not_running,
            from_leader,
        };
        let steps = plan(&seen, suspects, Instant::now(), cfg.daemon.reconcile_grace);
        let mut done = Vec::new();
        for step in steps {
            match &step {
                Step::Remove { target, why } => {
                    tracing::warn!(removing = %target, %why, "reconciler removes a member");
                    if let Some(backups) = backups {
                        crate::backup::before_removal(backups, locker, registry, &etcd).await;
                    }
                    match membership::remove_locked(&etcd, registry, guard, target, false).await {
                        Ok(_) => done.push(step),
                        Err(e) => {
                            crate::catalogue::report!(error, e, removing = %target, "reconciler could not remove the member; retried next turn")
                        }
                    }
                }
                Step::Forget { instance_id } => {
                    tracing::warn!(%instance_id, "reconciler deletes a record whose member is gone");
                    registry.forget_member(guard, instance_id).await?;
                    done.push(step);
                }
            }
        }
        Ok(done)
    })
    .await
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Ec2(e) => e.entry(),
            E::Membership(e) => e.entry(),
            E::Registry(e) => e.entry(),
            E::Lock(e) => e.entry(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, record};

    fn member(id: u64, started: bool, learner: bool, healthy: bool) -> Health {
        let m = if learner {
            testing::learner(id)
        } else {
            testing::member(id)
        };
        testing::health(if started { m } else { testing::unstarted(m) }, healthy)
    }

    fn seen(health: Vec<Health>, records: Vec<MemberRecord>, gone: &[&str]) -> Observation {
        Observation {
            health,
            records,
            not_running: gone.iter().map(|s| s.to_string()).collect(),
            from_leader: true,
        }
    }

    #[test]
    fn a_record_is_forgotten_only_on_the_leaders_member_list() {
        // A follower that has not applied a join yet lists no member for
        // the joiner's fresh record: that is no proof the member is gone.
        let lagging = Observation {
            from_leader: false,
            ..seen(
                vec![member(1, true, false, true)],
                vec![record("i-1", 1), record("i-2", 2)],
                &[],
            )
        };
        assert!(plan(&lagging, &mut Suspects::new(), Instant::now(), GRACE).is_empty());
        let leaders = Observation {
            from_leader: true,
            ..lagging
        };
        assert_eq!(
            plan(&leaders, &mut Suspects::new(), Instant::now(), GRACE),
            vec![Step::Forget {
                instance_id: "i-2".into()
            }]
        );
    }

    const GRACE: Duration = Duration::from_secs(300);

    #[test]
    fn a_gone_instance_is_removed_only_after_the_grace_period() {
        let t0 = Instant::now();
        let obs = seen(
            vec![member(1, true, false, true), member(2, true, false, false)],
            vec![record("i-1", 1), record("i-2", 2)],
            &["i-2"],
        );
        let mut suspects = Suspects::new();
        assert!(plan(&obs, &mut suspects, t0, GRACE).is_empty());
        assert!(plan(&obs, &mut suspects, t0 + GRACE / 2, GRACE).is_empty());
        assert_eq!(
            plan(&obs, &mut suspects, t0 + GRACE, GRACE),
            vec![Step::Remove {
                target: Target::Instance("i-2".into()),
                why: "instance i-2 no longer runs".into()
            }]
        );
    }

    #[test]
    fn a_suspect_that_recovers_starts_from_zero_next_time() {
        let t0 = Instant::now();
        let gone = seen(
            vec![member(2, true, false, false)],
            vec![record("i-2", 2)],
            &["i-2"],
        );
        let back = seen(
            vec![member(2, true, false, true)],
            vec![record("i-2", 2)],
            &[],
        );
        let mut suspects = Suspects::new();
        plan(&gone, &mut suspects, t0, GRACE);
        plan(&back, &mut suspects, t0 + GRACE / 2, GRACE);
        assert!(suspects.is_empty());
        assert!(plan(&gone, &mut suspects, t0 + GRACE, GRACE).is_empty());
    }

    #[test]
    fn orphan_learners_and_orphan_records_go_at_once() {
        let obs = seen(
            vec![member(1, true, false, true), member(7, false, true, false)],
            vec![record("i-1", 1), record("i-9", 9)],
            &[],
        );
        let steps = plan(&obs, &mut Suspects::new(), Instant::now(), GRACE);
        assert!(steps.contains(&Step::Remove {
            target: Target::Member(7),
            why: "a learner that never started (a join died half-way)".into()
        }));
        assert!(steps.contains(&Step::Forget {
            instance_id: "i-9".into()
        }));
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn healthy_unrecorded_members_and_running_instances_are_left_alone() {
        let t0 = Instant::now();
        let obs = seen(
            vec![
                member(1, true, false, true),
                member(3, true, false, true),
                member(4, true, false, false),
            ],
            vec![record("i-1", 1), record("i-4", 4)],
            &[],
        );
        let mut suspects = Suspects::new();
        assert!(plan(&obs, &mut suspects, t0, GRACE).is_empty());
        // An unhealthy member whose instance still runs (a reboot) is not removed.
        assert!(plan(&obs, &mut suspects, t0 + 10 * GRACE, GRACE).is_empty());
    }

    #[test]
    fn an_unrecorded_member_that_stays_unhealthy_is_removed_after_the_grace() {
        let t0 = Instant::now();
        let obs = seen(
            vec![member(1, true, false, true), member(5, true, false, false)],
            vec![record("i-1", 1)],
            &[],
        );
        let mut suspects = Suspects::new();
        assert!(plan(&obs, &mut suspects, t0, GRACE).is_empty());
        assert_eq!(
            plan(&obs, &mut suspects, t0 + GRACE, GRACE),
            vec![Step::Remove {
                target: Target::Member(5),
                why: "an unrecorded member that stays unhealthy".into()
            }]
        );
    }
}
