//! The quorum guard (I3): may this etcd member be removed without risking
//! the cluster? Pure over the member list with health, so every case is
//! tested without etcd; every removal path (operator command, termination,
//! reconciler) asks it first, under the `membership` lock.
//!
//! Rules:
//! - a learner does not vote: removing it never changes quorum;
//! - the last voting member is never removed (that is the cluster);
//! - a cluster of two voters is not shrunk by an operator's choice unless
//!   forced (one more failure would then be total);
//! - a member whose instance is terminating leaves whatever we decide, so
//!   the cluster is judged as it will be after the termination: removing it
//!   first is right whenever the others keep quorum, two voters included
//!   (1 healthy of 1 keeps quorum; keeping it would leave 1 of 2, none);
//! - otherwise the healthy voters that remain must reach quorum of the new
//!   size (`voters_after / 2 + 1`). Force does not lift this: etcd could not
//!   commit the change anyway, and trying makes things worse.

use crate::etcd::{Health, MemberHex};

/// Why a removal is refused; each says what would happen and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("member {} is not in the etcd member list (already removed?)", MemberHex(*.id))]
    NotAMember { id: u64 },
    #[error("member {} is the last voting member: removing it would destroy the cluster", MemberHex(*.id))]
    LastVoter { id: u64 },
    #[error(
        "the cluster has only {voters} voting members: removing one leaves no tolerance for any failure"
    )]
    TwoVoters { voters: usize },
    #[error(
        "removing member {} would leave {healthy_after} healthy of {voters_after} voting members, below quorum {quorum_after}; unhealthy now: {unhealthy}", MemberHex(*.id)
    )]
    BelowQuorum {
        id: u64,
        healthy_after: usize,
        voters_after: usize,
        quorum_after: usize,
        unhealthy: String,
    },
}

/// An allowed removal and what the cluster looks like after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub id: u64,
    pub learner: bool,
    pub voters_after: usize,
    pub healthy_voters_after: usize,
    pub quorum_after: usize,
    /// Allowed only because an operator forced it (the two-voter rule).
    pub forced: bool,
}

/// Why a member is to be removed: the judgement differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// An operator (or a join's cleanup) chooses to shrink the cluster; the
    /// two-voter rule holds unless `force`.
    Operator { force: bool },
    /// Its instance is terminating (or gone): the member leaves either way,
    /// so only the cluster after it matters.
    Terminating,
}

/// Quorum of a cluster of `voters` voting members.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Whether an operator may remove member `id` from the cluster described by
/// `health` (see the module rules). `force` lifts only the two-voter rule.
pub fn check_removal(health: &[Health], id: u64, force: bool) -> Result<Removal, Refusal> {
    judge(health, id, Context::Operator { force })
}

/// Whether removing member `id` from the cluster described by `health` is
/// safe in `context` (see the module rules).
pub fn judge(health: &[Health], id: u64, context: Context) -> Result<Removal, Refusal> {
    let target = health
        .iter()
        .find(|h| h.member.id == id)
        .ok_or(Refusal::NotAMember { id })?;
    let voters: Vec<&Health> = health.iter().filter(|h| !h.member.is_learner).collect();
    let healthy_voters = voters.iter().filter(|h| h.healthy).count();
    if target.member.is_learner {
        return Ok(Removal {
            id,
            learner: true,
            voters_after: voters.len(),
            healthy_voters_after: healthy_voters,
            quorum_after: quorum(voters.len()),
            forced: false,
        });
    }
    if voters.len() <= 1 {
        return Err(Refusal::LastVoter { id });
    }
    let voters_after = voters.len() - 1;
    let healthy_after = healthy_voters - usize::from(target.healthy);
    let quorum_after = quorum(voters_after);
    if healthy_after < quorum_after {
        let unhealthy: Vec<String> = voters
            .iter()
            .filter(|h| !h.healthy)
            .map(|h| h.member.hex_id())
            .collect();
        return Err(Refusal::BelowQuorum {
            id,
            healthy_after,
            voters_after,
            quorum_after,
            unhealthy: if unhealthy.is_empty() {
                "none".into()
            } else {
                unhealthy.join(", ")
            },
        });
    }
    let forced = match context {
        Context::Operator { force: false } if voters.len() == 2 => {
            return Err(Refusal::TwoVoters {
                voters: voters.len(),
            });
        }
        Context::Operator { force } => force && voters.len() == 2,
        Context::Terminating => false,
    };
    Ok(Removal {
        id,
        learner: false,
        voters_after,
        healthy_voters_after: healthy_after,
        quorum_after,
        forced,
    })
}

impl crate::catalogue::Coded for self::Refusal {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Refusal as R;
        match self {
            R::NotAMember { .. } => &crate::catalogue::MEMBER_NOT_A_MEMBER,
            R::LastVoter { .. } => &crate::catalogue::MEMBER_LAST_VOTER,
            R::TwoVoters { .. } => &crate::catalogue::MEMBER_TWO_VOTERS,
            R::BelowQuorum { .. } => &crate::catalogue::MEMBER_BELOW_QUORUM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn member(id: u64, learner: bool, healthy: bool) -> Health {
        let m = if learner {
            testing::learner(id)
        } else {
            testing::member(id)
        };
        if healthy {
            testing::health(m, true)
        } else {
            testing::down(m, "connection refused")
        }
    }

    /// Every cluster of up to 7 members (each a healthy voter, an unhealthy
    /// voter or a learner), every target, forced or not: the guard allows
    /// exactly the safe removals.
    #[test]
    fn every_small_cluster_and_every_target_follow_the_rules() {
        let mut checked = 0;
        for size in 1..=7usize {
            for code in 0..3usize.pow(size as u32) {
                let mut c = code;
                let cluster: Vec<Health> = (1..=size as u64)
                    .map(|id| {
                        let kind = c % 3;
                        c /= 3;
                        member(id, kind == 2, kind != 1)
                    })
                    .collect();
                let voters = cluster.iter().filter(|h| !h.member.is_learner).count();
                let healthy = cluster
                    .iter()
                    .filter(|h| !h.member.is_learner && h.healthy)
                    .count();
                for target in &cluster {
                    for context in [
                        Context::Operator { force: false },
                        Context::Operator { force: true },
                        Context::Terminating,
                    ] {
                        checked += 1;
                        let verdict = judge(&cluster, target.member.id, context);
                        let learner = target.member.is_learner;
                        let after = voters - usize::from(!learner);
                        let healthy_after = healthy - usize::from(!learner && target.healthy);
                        let operator_may_shrink_two = context != Context::Operator { force: false };
                        let safe = learner
                            || (voters > 1
                                && healthy_after >= quorum(after)
                                && (voters > 2 || operator_may_shrink_two));
                        assert_eq!(
                            verdict.is_ok(),
                            safe,
                            "cluster {cluster:?} remove {} {context:?}: {verdict:?}",
                            target.member.id
                        );
                        match verdict {
                            Ok(r) => {
                                assert!(learner || r.healthy_voters_after >= r.quorum_after);
                                assert_eq!(
                                    r.forced,
                                    !learner
                                        && voters == 2
                                        && context == Context::Operator { force: true }
                                );
                            }
                            Err(Refusal::TwoVoters { .. }) => {
                                assert!(
                                    context == Context::Operator { force: false } && voters == 2
                                )
                            }
                            Err(Refusal::LastVoter { .. }) => assert_eq!(voters, 1),
                            Err(Refusal::BelowQuorum {
                                healthy_after: h,
                                quorum_after: q,
                                ..
                            }) => assert!(h < q),
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                }
            }
        }
        assert!(checked > 30_000, "{checked}");
    }

    #[test]
    fn with_one_member_down_a_healthy_one_may_not_go_but_the_dead_one_may() {
        let cluster = [
            member(1, false, true),
            member(2, false, true),
            member(3, false, false),
        ];
        let refused = check_removal(&cluster, 1, false).expect_err("healthy member");
        assert_eq!(
            refused.to_string(),
            "removing member 0000000000000001 would leave 1 healthy of 2 voting members, \
             below quorum 2; unhealthy now: 0000000000000003"
        );
        assert!(
            check_removal(&cluster, 1, true).is_err(),
            "force does not lift quorum"
        );
        let ok = check_removal(&cluster, 3, false).expect("the dead member");
        assert_eq!(
            (ok.voters_after, ok.healthy_voters_after, ok.quorum_after),
            (2, 2, 2)
        );
    }

    #[test]
    fn two_voters_refuse_unless_forced_and_the_last_voter_never_goes() {
        let two = [member(1, false, true), member(2, false, false)];
        assert_eq!(
            check_removal(&two, 2, false),
            Err(Refusal::TwoVoters { voters: 2 })
        );
        assert!(check_removal(&two, 2, true).is_ok_and(|r| r.forced));
        assert_eq!(
            check_removal(&[member(1, false, true)], 1, true),
            Err(Refusal::LastVoter { id: 1 })
        );
        assert_eq!(
            check_removal(&two, 9, false),
            Err(Refusal::NotAMember { id: 9 })
        );
    }

    #[test]
    fn a_terminating_member_of_two_goes_first_because_the_survivor_then_keeps_quorum() {
        let two = [member(1, false, true), member(2, false, true)];
        let r = judge(&two, 2, Context::Terminating).expect("terminating member of two");
        assert_eq!(
            (
                r.voters_after,
                r.healthy_voters_after,
                r.quorum_after,
                r.forced
            ),
            (1, 1, 1, false)
        );
        // The operator's rule is unchanged: two voters refuse without force.
        assert_eq!(
            judge(&two, 2, Context::Operator { force: false }),
            Err(Refusal::TwoVoters { voters: 2 })
        );
        // Termination does not lift the quorum rule or the last voter's.
        let one_down = [
            member(1, false, true),
            member(2, false, true),
            member(3, false, false),
        ];
        assert!(matches!(
            judge(&one_down, 1, Context::Terminating),
            Err(Refusal::BelowQuorum { .. })
        ));
        assert_eq!(
            judge(&[member(1, false, true)], 1, Context::Terminating),
            Err(Refusal::LastVoter { id: 1 })
        );
    }

    #[test]
    fn learners_go_without_touching_quorum() {
        let cluster = [member(1, false, true), member(2, true, false)];
        let r = check_removal(&cluster, 2, false).expect("orphan learner");
        assert!(r.learner && !r.forced);
    }
}
