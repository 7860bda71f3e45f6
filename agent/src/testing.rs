//! Fixtures the unit tests share (test builds only): etcd members as the
//! member list shows them, their health, and their MEMBER records. Member
//! `id` lives at 10.0.0.`id`, is named `m<id>` and speaks https, as kubeadm
//! sets etcd up.

use crate::etcd::{Health, Member};
use crate::registry::MemberRecord;
use std::time::SystemTime;

/// A started voting member.
pub fn member(id: u64) -> Member {
    Member {
        id,
        name: format!("m{id}"),
        peer_urls: vec![format!("https://10.0.0.{id}:2380")],
        client_urls: vec![format!("https://10.0.0.{id}:2379")],
        is_learner: false,
    }
}

/// A started learner.
pub fn learner(id: u64) -> Member {
    Member {
        is_learner: true,
        ..member(id)
    }
}

/// A member added but not started: etcd knows no name or client URLs yet.
pub fn unstarted(mut m: Member) -> Member {
    m.name.clear();
    m.client_urls.clear();
    m
}

/// `m` as the health check saw it: healthy, or unhealthy with no reason given.
pub fn health(m: Member, healthy: bool) -> Health {
    Health {
        member: m,
        healthy,
        error: None,
        db_size: None,
        leader: None,
    }
}

/// `m` unhealthy, for the reason given.
pub fn down(m: Member, why: &str) -> Health {
    Health {
        error: Some(why.to_string()),
        ..health(m, false)
    }
}

/// The MEMBER record of member `id` on `instance`.
pub fn record(instance: &str, id: u64) -> MemberRecord {
    MemberRecord {
        instance_id: instance.into(),
        member_id: id,
        name: format!("m{id}"),
        peer_url: format!("https://10.0.0.{id}:2380"),
        confirmed_at: SystemTime::UNIX_EPOCH,
    }
}
