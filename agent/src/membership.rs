//! etcd membership as the operator and the daemon change it: etcd's member
//! list joined with the registry's MEMBER records, and guarded removal.
//!
//! Every removal — `kubeboot etcd remove`, a terminating control plane, the
//! dead-member reconciler — goes through [`remove`]: under the `membership`
//! lock (so changes are serialized and the record write is fenced), with
//! health read fresh, the [`crate::quorum`] guard asked, the member removed
//! from etcd, then its record deleted. Each step is idempotent: a member
//! already gone is not an error, its record is still cleaned up.

use crate::etcd::{self, Etcd, Health, MemberHex};
use crate::lock::{Guard, LockStore, Locker, Purpose};
use crate::quorum::{self, Refusal, Removal};
use crate::registry::{MemberRecord, Registry, RegistryStore};
use crate::retry::{self, Classify, RetryClass, WaitPolicy};
use serde::Serialize;
use std::time::Duration;

/// Membership failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Etcd(#[from] etcd::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
    #[error("refusing to remove: {0}")]
    Refused(#[from] Refusal),
    #[error("no etcd member or member record matches {target}")]
    UnknownTarget { target: String },
    #[error("no etcd endpoint to ask: the registry has no member records")]
    NoEndpoints,
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::Etcd(e) => e.retry_class(),
            _ => RetryClass::Permanent,
        }
    }
}

/// What to remove: an EC2 instance's member or an etcd member id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Instance(String),
    Member(u64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Instance(i) => write!(f, "instance {i}"),
            Target::Member(id) => write!(f, "member {}", MemberHex(*id)),
        }
    }
}

/// The forms [`parse_target`] accepts, for error messages.
pub const TARGET_FORMS: &str = "an instance id (i- and 8 or 17 hex digits) or an etcd member id (1-16 hex digits, as etcdctl prints it)";

/// Parses `i-0123456789abcdef0` or a hex member id (`8e9e05c52164694d`).
pub fn parse_target(s: &str) -> Option<Target> {
    let hex = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = s.strip_prefix("i-") {
        return (hex(rest) && (rest.len() == 8 || rest.len() == 17))
            .then(|| Target::Instance(s.to_ascii_lowercase()));
    }
    (hex(s) && s.len() <= 16)
        .then(|| u64::from_str_radix(s, 16).ok().map(Target::Member))
        .flatten()
}

/// One member as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberView {
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    pub name: String,
    pub instance_id: Option<String>,
    pub peer_url: String,
    pub learner: bool,
    pub started: bool,
    pub healthy: bool,
    pub error: Option<String>,
    pub recorded: bool,
}

fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&MemberHex(*id))
}

/// etcd's members with their records, and the records with no member.
pub fn views(health: &[Health], records: &[MemberRecord]) -> (Vec<MemberView>, Vec<MemberRecord>) {
    let members = health
        .iter()
        .map(|h| {
            let record = records.iter().find(|r| r.member_id == h.member.id);
            MemberView {
                id: h.member.id,
                name: h.member.name.clone(),
                instance_id: record.map(|r| r.instance_id.clone()),
                peer_url: h.member.peer_urls.first().cloned().unwrap_or_default(),
                learner: h.member.is_learner,
                started: h.member.is_started(),
                healthy: h.healthy,
                error: h.error.clone(),
                recorded: record.is_some(),
            }
        })
        .collect();
    let orphans = records
        .iter()
        .filter(|r| health.iter().all(|h| h.member.id != r.member_id))
        .cloned()
        .collect();
    (members, orphans)
}

/// The member id `target` names, from etcd's list or the records; `None`
/// when only a record matches an instance whose member is gone.
fn resolve(
    target: &Target,
    health: &[Health],
    records: &[MemberRecord],
) -> Result<(Option<u64>, Option<MemberRecord>), Error> {
    let unknown = || Error::UnknownTarget {
        target: target.to_string(),
    };
    match target {
        Target::Member(id) => {
            let record = records.iter().find(|r| r.member_id == *id).cloned();
            let live = health.iter().any(|h| h.member.id == *id);
            if !live && record.is_none() {
                return Err(unknown());
            }
            Ok((live.then_some(*id), record))
        }
        Target::Instance(instance) => {
            let record = records.iter().find(|r| &r.instance_id == instance).cloned();
            let id = record
                .as_ref()
                .map(|r| r.member_id)
                .filter(|id| health.iter().any(|h| h.member.id == *id));
            if record.is_none() {
                return Err(unknown());
            }
            Ok((id, record))
        }
    }
}

/// How a removal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub target: Target,
    /// The etcd member removed, with the guard's view of the cluster after it.
    pub removed: Option<Removal>,
    /// The MEMBER record deleted (instance id).
    pub forgot: Option<String>,
}

/// Removes `target` under the membership lock and the quorum guard, as an
/// operator's choice (`force` lifts the two-voter rule).
pub async fn remove<L: LockStore, R: RegistryStore>(
    etcd: &Etcd,
    registry: &Registry<R>,
    locker: &Locker<L>,
    target: &Target,
    force: bool,
) -> Result<Outcome, Error> {
    remove_in(
        etcd,
        registry,
        locker,
        target,
        quorum::Context::Operator { force },
    )
    .await
}

/// [`remove`], judged in `context` (a terminating instance's member is
/// judged by the cluster after the termination).
pub async fn remove_in<L: LockStore, R: RegistryStore>(
    etcd: &Etcd,
    registry: &Registry<R>,
    locker: &Locker<L>,
    target: &Target,
    context: quorum::Context,
) -> Result<Outcome, Error> {
    let guard = locker.acquire(Purpose::Membership).await?;
    guard
        .scoped(async |guard| remove_locked_in(etcd, registry, guard, target, context).await)
        .await
}

/// How long a removal of a dead member waits for the others to elect its
/// successor, when it led (a few election timeouts).
const SUCCESSOR_WAIT: Duration = Duration::from_secs(10);

/// [`remove`] for a caller that already holds the `membership` lock.
pub async fn remove_locked<R: RegistryStore>(
    etcd: &Etcd,
    registry: &Registry<R>,
    guard: &Guard,
    target: &Target,
    force: bool,
) -> Result<Outcome, Error> {
    remove_locked_in(
        etcd,
        registry,
        guard,
        target,
        quorum::Context::Operator { force },
    )
    .await
}

/// [`remove_in`] for a caller that already holds the `membership` lock.
pub async fn remove_locked_in<R: RegistryStore>(
    etcd: &Etcd,
    registry: &Registry<R>,
    guard: &Guard,
    target: &Target,
    context: quorum::Context,
) -> Result<Outcome, Error> {
    let mut health = etcd.health_for_removal(&etcd.members().await?).await;
    // Members that answer but see no leader count as unhealthy: during the
    // election that follows a leader's death, every survivor does. Judge on
    // what etcd says once the successor is elected (bounded), not on that
    // moment, or the quorum guard refuses a removal that keeps quorum.
    if electing(&health) {
        tracing::info!("etcd is electing a leader; waiting for it before judging the removal");
        wait_for_leader(etcd, None).await;
        health = etcd.health_for_removal(&etcd.members().await?).await;
    }
    let records = registry.members().await?;
    let (id, record) = resolve(target, &health, &records)?;
    let mut removed = None;
    if let Some(id) = id {
        let verdict = quorum::judge(&health, id, context)?;
        if verdict.forced {
            tracing::warn!(member_id = %MemberHex(id), "FORCED removal from a two-member cluster: one more failure loses the cluster");
        }
        // A proposal made while the others elect a new leader is dropped and
        // times out: when the dead member led, wait for its successor first.
        // Bounded as a whole: the removal below retries on its own.
        if health.iter().any(|h| h.member.id == id && !h.healthy) {
            wait_for_leader(etcd, Some(id)).await;
        }
        // The dead member is often the leader: a proposal made while the
        // others elect a new one is dropped and the request times out.
        // Removal is idempotent (a member already gone counts as removed).
        let policy = WaitPolicy {
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
            max_attempts: 4,
            deadline: None,
        };
        retry::with_retries("remove etcd member", &policy, || async {
            guard.fence()?;
            Ok::<_, Error>(etcd.remove(id).await?)
        })
        .await
        .map_err(|e| match e {
            retry::RetryError::Failed(e) => e,
            retry::RetryError::Deadline { what, last, .. } => Error::Etcd(etcd::Error::Request {
                operation: what,
                message: last.unwrap_or_default(),
                transient: true,
            }),
        })?;
        tracing::info!(member_id = %MemberHex(id), voters_after = verdict.voters_after, healthy_voters_after = verdict.healthy_voters_after, "etcd member removed");
        crate::failpoint::crash_point("membership:after-etcd-remove");
        removed = Some(verdict);
    }
    let mut forgot = None;
    if let Some(r) = record {
        registry.forget_member(guard, &r.instance_id).await?;
        tracing::info!(instance_id = %r.instance_id, "member record deleted");
        forgot = Some(r.instance_id);
    }
    Ok(Outcome {
        target: target.clone(),
        removed,
        forgot,
    })
}

/// Whether some member answers yet sees no leader (an election under way).
fn electing(health: &[Health]) -> bool {
    health.iter().any(|h| h.leader == Some(0))
}

/// Waits up to [`SUCCESSOR_WAIT`] for etcd to have a leader other than
/// `not` (a member about to be removed); returns either way.
async fn wait_for_leader(etcd: &Etcd, not: Option<u64>) {
    let until = tokio::time::Instant::now() + SUCCESSOR_WAIT;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(left, etcd.leader()).await {
            Ok(Ok(leader)) if leader != 0 && Some(leader) != not => return,
            Ok(_) => tokio::time::sleep(left.min(Duration::from_millis(200))).await,
            Err(_) => return,
        }
    }
}

/// Text table of [`views`], for `kubeboot etcd members`.
pub fn render_text(members: &[MemberView], orphans: &[MemberRecord]) -> String {
    let mut out = format!(
        "{:<16}  {:<30}  {:<19}  {:<28}  {:<7}  {:<9}  {}\n",
        "MEMBER", "NAME", "INSTANCE", "PEER URL", "ROLE", "HEALTH", "RECORD"
    );
    for m in members {
        out.push_str(&format!(
            "{}  {:<30}  {:<19}  {:<28}  {:<7}  {:<9}  {}\n",
            MemberHex(m.id),
            if m.name.is_empty() {
                "(not started)"
            } else {
                &m.name
            },
            m.instance_id.as_deref().unwrap_or("-"),
            m.peer_url,
            if m.learner { "learner" } else { "voter" },
            if m.healthy { "healthy" } else { "UNHEALTHY" },
            if m.recorded { "yes" } else { "NO" },
        ));
    }
    for r in orphans {
        out.push_str(&format!(
            "{}  {:<30}  {:<19}  {:<28}  {:<7}  {:<9}  {}\n",
            MemberHex(r.member_id),
            r.name,
            r.instance_id,
            r.peer_url,
            "-",
            "-",
            "record only (member gone)"
        ));
    }
    out
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Etcd(e) => e.entry(),
            E::Registry(e) => e.entry(),
            E::Lock(e) => e.entry(),
            E::Refused(r) => r.entry(),
            E::UnknownTarget { .. } => &crate::catalogue::MEMBER_UNKNOWN_TARGET,
            E::NoEndpoints => &crate::catalogue::MEMBER_NO_ENDPOINTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, record};

    fn health(id: u64, name: &str, learner: bool, healthy: bool) -> Health {
        let mut m = if learner {
            testing::learner(id)
        } else {
            testing::member(id)
        };
        if name.is_empty() {
            m = testing::unstarted(m);
        } else {
            m.name = name.into();
        }
        testing::health(m, healthy)
    }

    #[test]
    fn targets_are_instance_ids_or_hex_member_ids() {
        assert_eq!(
            parse_target("i-0123456789abcdef0"),
            Some(Target::Instance("i-0123456789abcdef0".into()))
        );
        assert_eq!(
            parse_target("i-0123ABCD"),
            Some(Target::Instance("i-0123abcd".into()))
        );
        assert_eq!(
            parse_target("8e9e05c52164694d"),
            Some(Target::Member(0x8e9e_05c5_2164_694d))
        );
        for bad in [
            "",
            "i-",
            "i-xyz",
            "i-0123",
            "8e9e05c52164694d0",
            "member-1",
            "-1",
        ] {
            assert_eq!(parse_target(bad), None, "{bad}");
        }
    }

    #[test]
    fn views_join_members_and_records_and_list_records_without_members() {
        let h = [health(1, "a", false, true), health(2, "", true, false)];
        let r = [record("i-0000000a", 1), record("i-0000000c", 3)];
        let (members, orphans) = views(&h, &r);
        assert_eq!(members[0].instance_id.as_deref(), Some("i-0000000a"));
        assert!(members[0].recorded && !members[1].recorded && !members[1].started);
        assert_eq!(orphans, vec![record("i-0000000c", 3)]);
        let text = render_text(&members, &orphans);
        assert!(text.contains("0000000000000002  (not started)"), "{text}");
        assert!(text.contains("learner  UNHEALTHY  NO"), "{text}");
        assert!(text.contains("record only (member gone)"), "{text}");
        let json = serde_json::to_value(&members).expect("json");
        assert_eq!(json[0]["id"], "0000000000000001");
    }

    #[test]
    fn a_target_resolves_to_its_member_and_record() {
        let h = [health(1, "a", false, true), health(2, "b", false, true)];
        let r = [record("i-0000000a", 1), record("i-0000000c", 3)];
        let by_instance = resolve(&Target::Instance("i-0000000a".into()), &h, &r).expect("a");
        assert_eq!(by_instance.0, Some(1));
        let gone = resolve(&Target::Instance("i-0000000c".into()), &h, &r).expect("c");
        assert_eq!(gone, (None, Some(record("i-0000000c", 3))));
        let unrecorded = resolve(&Target::Member(2), &h, &r).expect("2");
        assert_eq!(unrecorded, (Some(2), None));
        assert!(matches!(
            resolve(&Target::Member(9), &h, &r),
            Err(Error::UnknownTarget { .. })
        ));
        assert!(matches!(
            resolve(&Target::Instance("i-0000000f".into()), &h, &r),
            Err(Error::UnknownTarget { .. })
        ));
    }
}
