//! `kubeboot status`: the cluster record, lock holders and member records in
//! one view — what an operator needs first when a node will not join.
//! Gathering does the I/O; rendering is pure so it is tested on its own.

use crate::config::value::format_duration;
use crate::lock::{LockItem, LockStore, Purpose};
use crate::registry::{
    ClusterState, JoinPointer, MemberRecord, RefreshRequest, Registry, RegistryStore,
};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Everything `status` shows, read at one moment.
#[derive(Debug)]
pub struct Status {
    pub cluster: String,
    pub table: String,
    pub state: ClusterState,
    pub locks: Vec<(Purpose, Option<LockItem>)>,
    pub members: Vec<MemberRecord>,
    /// The current join material (non-secret facts only).
    pub join: Option<JoinPointer>,
    /// The latest joiner's request for fresh material.
    pub refresh: Option<RefreshRequest>,
    /// This host's wall clock when read; lease ages are computed against the
    /// holder's own stamps and shown as such (never used for decisions).
    pub observed_at: SystemTime,
    /// This node's own kubeadm certificates (a control plane's; empty on a
    /// worker or off-node): per node, unlike everything above.
    pub certificates: crate::certs::Inventory,
    /// The newest verified backup (control planes with backups on).
    pub backup: BackupView,
}

/// The newest verified backup, as `status` shows it.
#[derive(Debug, Default)]
pub enum BackupView {
    /// Not looked at: a worker (its role may not list the bucket), or backups off.
    #[default]
    NotHere,
    /// The bucket could not be listed.
    Unreadable { code: &'static str, error: String },
    /// Nothing verified yet under `location`.
    NoneYet { location: String },
    Newest {
        uri: String,
        manifest: crate::backup::Manifest,
    },
}

impl Status {
    /// Adds the newest verified backup of `backups`.
    pub async fn with_backups(mut self, backups: &crate::backup::Backups) -> Status {
        use crate::catalogue::Coded as _;
        self.backup = match backups.newest_verified().await {
            Ok(Some(manifest)) => BackupView::Newest {
                uri: backups.bucket().uri(&manifest.key),
                manifest,
            },
            Ok(None) => BackupView::NoneYet {
                location: backups.location(),
            },
            Err(e) => BackupView::Unreadable {
                code: e.code(),
                error: e.to_string(),
            },
        };
        self
    }

    /// Adds this node's kubeadm certificates, read under `kubernetes_dir`.
    pub fn with_local_certificates(mut self, kubernetes_dir: &std::path::Path) -> Status {
        self.certificates = crate::certs::inventory(kubernetes_dir);
        self
    }
}

/// Failure to gather the status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the {purpose} lock: {source}")]
    Lock {
        purpose: Purpose,
        source: crate::lock::StoreError,
    },
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
}

/// Reads the cluster record, every lock and every member record.
pub async fn gather<L: LockStore, R: RegistryStore>(
    cluster: &str,
    table: &str,
    locks: &L,
    registry: &Registry<R>,
) -> Result<Status, Error> {
    let state = registry.state().await?;
    let mut lock_items = Vec::new();
    for purpose in Purpose::ALL {
        let item = locks
            .read(purpose)
            .await
            .map_err(|source| Error::Lock { purpose, source })?;
        lock_items.push((purpose, item));
    }
    Ok(Status {
        cluster: cluster.to_string(),
        table: table.to_string(),
        state,
        locks: lock_items,
        members: registry.members().await?,
        join: registry.join_pointer().await?,
        refresh: registry.refresh_request().await?,
        observed_at: SystemTime::now(),
        certificates: Default::default(),
        backup: BackupView::NotHere,
    })
}

/// How long ago `stamp` was, by our clock against the writer's: display only.
fn age(observed: SystemTime, stamp: SystemTime) -> String {
    match observed.duration_since(stamp) {
        Ok(d) => format!("{} ago", format_duration(Duration::from_secs(d.as_secs()))),
        Err(e) => format!(
            "{} in the future (clock skew)",
            format_duration(Duration::from_secs(e.duration().as_secs()))
        ),
    }
}

fn lock_line(purpose: Purpose, item: Option<&LockItem>, observed: SystemTime) -> String {
    match item {
        None => format!("  {:<11} never taken", purpose.as_str()),
        Some(i) if i.released => format!(
            "  {:<11} free        fence {}{}",
            purpose.as_str(),
            i.fence,
            i.heartbeat_at
                .map(|t| format!("  released {}", age(observed, t)))
                .unwrap_or_default()
        ),
        Some(i) => format!(
            "  {:<11} held by {}  fence {}  lease {}{}",
            purpose.as_str(),
            i.owner,
            i.fence,
            format_duration(i.lease),
            i.heartbeat_at
                .map(|t| format!("  renewed {} (holder's clock)", age(observed, t)))
                .unwrap_or_default()
        ),
    }
}

/// When `at` comes, from `observed`: "in 5m" or "5m ago" (display only).
fn until(observed: SystemTime, at: SystemTime) -> String {
    match at.duration_since(observed) {
        Ok(d) => format!("in {}", format_duration(Duration::from_secs(d.as_secs()))),
        Err(e) => format!(
            "{} ago",
            format_duration(Duration::from_secs(e.duration().as_secs()))
        ),
    }
}

fn join_lines(s: &Status) -> String {
    let mut out = String::new();
    match &s.join {
        None => out.push_str("join material: none published\n"),
        Some(j) => out.push_str(&format!(
            "join material: version {}  token expires {}  certificates {}  published {}\n",
            j.secret_version,
            until(s.observed_at, j.token_expires_at),
            j.certs_expire_at
                .map_or("not uploaded".to_string(), |t| format!(
                    "expire {}",
                    until(s.observed_at, t)
                )),
            age(s.observed_at, j.published_at)
        )),
    }
    if let Some(r) = &s.refresh {
        out.push_str(&format!(
            "  refresh of {} requested by {} {} for version {}: {}\n",
            r.what,
            r.requested_by,
            age(s.observed_at, r.requested_at),
            r.stale_version,
            if r.fulfilled_by(s.join.as_ref()) {
                "fulfilled"
            } else {
                "PENDING (the leader's daemon refreshes it)"
            }
        ));
    }
    out
}

/// Human-readable status.
pub fn render_text(s: &Status) -> String {
    let st = &s.state;
    let mut out = format!(
        "cluster {}  (table {})\n  phase {}  generation {}",
        s.cluster,
        s.table,
        st.phase.as_str(),
        st.generation
    );
    if let Some(v) = &st.kubernetes_version {
        out.push_str(&format!("  kubernetes {v}"));
    }
    if let Some(ep) = &st.endpoint {
        out.push_str(&format!("  endpoint {ep}"));
    }
    out.push('\n');
    if let Some(by) = &st.initialized_by {
        out.push_str(&format!(
            "  initialized by {by}  run {}  init fence {}\n",
            st.init_run_id.as_deref().unwrap_or("?"),
            st.fence.map_or("?".to_string(), |f| f.to_string())
        ));
    }
    if let Some(snapshot) = &st.restored_from {
        out.push_str(&format!("  restored from {snapshot}\n"));
    }
    out.push_str("locks:\n");
    for (purpose, item) in &s.locks {
        out.push_str(&lock_line(*purpose, item.as_ref(), s.observed_at));
        out.push('\n');
    }
    out.push_str(&format!("members ({}):\n", s.members.len()));
    for m in &s.members {
        out.push_str(&format!(
            "  {}  member {}  {}  {}  confirmed {}\n",
            m.instance_id,
            crate::etcd::MemberHex(m.member_id),
            if m.name.is_empty() { "-" } else { &m.name },
            m.peer_url,
            age(s.observed_at, m.confirmed_at)
        ));
    }
    out.push_str(&join_lines(s));
    out.push_str(&certificate_lines(s));
    out.push_str(&backup_line(s));
    out
}

/// The newest verified backup and its age.
fn backup_line(s: &Status) -> String {
    match &s.backup {
        BackupView::NotHere => {
            "backups: not shown here (a worker, or backup.enabled = false)\n".into()
        }
        BackupView::Unreadable { code, error } => {
            format!("backups: cannot list them: [{code}] {error}\n")
        }
        BackupView::NoneYet { location } => format!("backups: NONE verified yet in {location}\n"),
        BackupView::Newest { uri, manifest } => format!(
            "backups: newest verified {} ({})  {} bytes  revision {}  {}\n",
            manifest.taken_at,
            age(
                s.observed_at,
                UNIX_EPOCH + Duration::from_secs(manifest.taken_at_unix)
            ),
            manifest.size,
            manifest.revision,
            uri
        ),
    }
}

fn backup_json(s: &Status) -> serde_json::Value {
    let observed = epoch_ms(s.observed_at) / 1000;
    match &s.backup {
        BackupView::NotHere => json!({"status": "not-shown"}),
        BackupView::Unreadable { code, error } => {
            json!({"status": "unreadable", "code": code, "error": error})
        }
        BackupView::NoneYet { location } => json!({"status": "none", "location": location}),
        BackupView::Newest { uri, manifest } => json!({
            "status": "verified",
            "uri": uri,
            "age_s": observed.saturating_sub(manifest.taken_at_unix),
            "manifest": manifest,
        }),
    }
}

/// This node's certificates: the soonest leaf and CA, and what is unreadable.
fn certificate_lines(s: &Status) -> String {
    let c = &s.certificates;
    if c.is_empty() {
        return "certificates on this node: none (not a control plane, or not joined yet)\n".into();
    }
    let mut out = String::from("certificates on this node:");
    for (what, e) in [("leaf", c.soonest_leaf()), ("CA", c.soonest_authority())] {
        if let Some(e) = e {
            out.push_str(&format!(
                "  soonest {what} {} expires {}",
                e.name,
                until(s.observed_at, e.not_after)
            ));
        }
    }
    if let Some(e) = c.soonest_leaf() {
        let left = e
            .not_after
            .duration_since(s.observed_at)
            .unwrap_or(Duration::ZERO);
        if left <= crate::certs::RENEW_BEFORE {
            out.push_str("  (DUE: the daemon renews it)");
        }
    }
    out.push('\n');
    for p in &c.problems {
        out.push_str(&format!("  [{}] {p}\n", crate::catalogue::Coded::code(p)));
    }
    out
}

fn certificates_json(s: &Status) -> serde_json::Value {
    let c = &s.certificates;
    let entry = |e: &crate::certs::Expiry| {
        json!({
            "name": e.name,
            "kind": e.kind,
            "not_after_ms": epoch_ms(e.not_after),
            "days_left": crate::certs::days_left(e.not_after, s.observed_at),
        })
    };
    json!({
        "soonest": c.soonest_leaf().map(entry),
        "soonest_authority": c.soonest_authority().map(entry),
        "renew_before_days": crate::certs::RENEW_BEFORE.as_secs() / 86_400,
        "all": c.expiries.iter().map(entry).collect::<Vec<_>>(),
        "problems": c.problems.iter().map(|p| json!({
            "code": crate::catalogue::Coded::code(p),
            "error": p.to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Machine-readable status.
pub fn to_json(s: &Status) -> serde_json::Value {
    let observed = epoch_ms(s.observed_at);
    json!({
        "cluster": s.cluster,
        "table": s.table,
        "state": s.state,
        "locks": s.locks.iter().map(|(purpose, item)| match item {
            None => json!({"purpose": purpose, "status": "never-taken"}),
            Some(i) => json!({
                "purpose": purpose,
                "status": if i.released { "free" } else { "held" },
                "owner": i.owner,
                "fence": i.fence,
                "lease_ms": i.lease.as_millis() as u64,
                "renewed_at_ms": i.heartbeat_at.map(epoch_ms),
                "renewed_age_ms_by_holder_clock": i.heartbeat_at.map(|t| observed as i64 - epoch_ms(t) as i64),
            }),
        }).collect::<Vec<_>>(),
        "members": s.members.iter().map(|m| json!({
            "instance_id": m.instance_id,
            "member_id": crate::etcd::MemberHex(m.member_id).to_string(),
            "name": m.name,
            "peer_url": m.peer_url,
            "confirmed_at_ms": epoch_ms(m.confirmed_at),
        })).collect::<Vec<_>>(),
        "join": s.join.as_ref().map(|j| json!({
            "secret_version": j.secret_version,
            "endpoint": j.endpoint,
            "ca_cert_hashes": j.ca_cert_hashes,
            "token_expires_at_ms": epoch_ms(j.token_expires_at),
            "certs_expire_at_ms": j.certs_expire_at.map(epoch_ms),
            "published_at_ms": epoch_ms(j.published_at),
        })),
        "refresh": s.refresh.as_ref().map(|r| json!({
            "what": r.what,
            "requested_by": r.requested_by,
            "stale_version": r.stale_version,
            "requested_at_ms": epoch_ms(r.requested_at),
            "fulfilled": r.fulfilled_by(s.join.as_ref()),
        })),
        "certificates": certificates_json(s),
        "backup": backup_json(s),
        "observed_at_ms": observed,
    })
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        match self {
            self::Error::Lock { .. } => &crate::catalogue::STATUS_LOCK_READ,
            self::Error::Registry(e) => e.entry(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Phase;

    fn sample() -> Status {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Status {
            cluster: "prod-a".into(),
            table: "kubeboot-prod-a".into(),
            state: ClusterState {
                phase: Phase::Initialized,
                generation: 2,
                endpoint: Some("api:6443".into()),
                kubernetes_version: Some("1.31.2".into()),
                initialized_by: Some("i-0abc/p1".into()),
                init_run_id: Some("run-7".into()),
                fence: Some(4),
                restored_from: None,
                updated_at: None,
            },
            locks: vec![
                (
                    Purpose::Init,
                    Some(LockItem {
                        owner: "i-0abc/p1".into(),
                        rvn: "r".into(),
                        lease: Duration::from_secs(30),
                        fence: 4,
                        released: true,
                        heartbeat_at: Some(t0 - Duration::from_secs(600)),
                    }),
                ),
                (
                    Purpose::Membership,
                    Some(LockItem {
                        owner: "i-0def/p9".into(),
                        rvn: "r".into(),
                        lease: Duration::from_secs(30),
                        fence: 9,
                        released: false,
                        heartbeat_at: Some(t0 - Duration::from_secs(4)),
                    }),
                ),
                (Purpose::Leader, None),
            ],
            members: vec![MemberRecord {
                instance_id: "i-0abc".into(),
                member_id: 0x8e9e_05c5_2164_694d,
                name: "ip-10-0-1-2".into(),
                peer_url: "https://10.0.1.2:2380".into(),
                confirmed_at: t0 - Duration::from_secs(3600),
            }],
            join: Some(JoinPointer {
                secret_version: "v-2".into(),
                key_version: None,
                seq: 2,
                endpoint: "api:6443".into(),
                ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
                token_expires_at: t0 + Duration::from_secs(120),
                certs_expire_at: None,
                published_at: t0 - Duration::from_secs(3600),
            }),
            refresh: Some(RefreshRequest {
                origin: crate::registry::Origin::Worker,
                requested_by: "i-0new".into(),
                what: crate::registry::Wants::Token,
                stale_version: "v-2".into(),
                requested_at: t0 - Duration::from_secs(30),
            }),
            observed_at: t0,
            backup: Default::default(),
            certificates: crate::certs::Inventory {
                expiries: vec![
                    crate::certs::Expiry {
                        name: "etcd/peer".into(),
                        kind: crate::certs::Kind::Leaf,
                        not_after: t0 + Duration::from_secs(20 * 86_400),
                    },
                    crate::certs::Expiry {
                        name: "apiserver".into(),
                        kind: crate::certs::Kind::Leaf,
                        not_after: t0 + Duration::from_secs(300 * 86_400),
                    },
                    crate::certs::Expiry {
                        name: "ca".into(),
                        kind: crate::certs::Kind::Authority,
                        not_after: t0 + Duration::from_secs(3000 * 86_400),
                    },
                ],
                problems: vec![],
            },
        }
    }

    #[test]
    fn the_soonest_certificate_on_this_node_is_shown_and_flagged_when_due() {
        let s = sample();
        let text = render_text(&s);
        assert!(
            text.contains("certificates on this node:  soonest leaf etcd/peer expires in 20d  soonest CA ca expires in 3000d  (DUE: the daemon renews it)"),
            "{text}"
        );
        let v = to_json(&s);
        assert_eq!(v["certificates"]["soonest"]["name"], "etcd/peer");
        assert_eq!(v["certificates"]["soonest"]["days_left"], 20.0);
        assert_eq!(v["certificates"]["soonest_authority"]["name"], "ca");
        assert_eq!(v["certificates"]["all"].as_array().map(Vec::len), Some(3));
        let mut none = sample();
        none.certificates = Default::default();
        assert!(render_text(&none).contains("certificates on this node: none"));
    }

    #[test]
    fn text_names_phase_holders_ages_and_members() {
        let text = render_text(&sample());
        assert!(
            text.contains("phase initialized  generation 2  kubernetes 1.31.2"),
            "{text}"
        );
        assert!(text.contains("initialized by i-0abc/p1  run run-7  init fence 4"));
        assert!(text.contains("init        free        fence 4  released 10m ago"));
        assert!(text.contains(
            "membership  held by i-0def/p9  fence 9  lease 30s  renewed 4s ago (holder's clock)"
        ));
        assert!(text.contains("leader      never taken"));
        assert!(text.contains(
            "join material: version v-2  token expires in 2m  certificates not uploaded  published 1h ago"
        ), "{text}");
        assert!(
            text.contains("refresh of token requested by i-0new 30s ago for version v-2: PENDING"),
            "{text}"
        );
        assert!(text.contains(
            "i-0abc  member 8e9e05c52164694d  ip-10-0-1-2  https://10.0.1.2:2380  confirmed 1h ago"
        ));
    }

    #[test]
    fn skewed_holder_clock_is_shown_as_skew() {
        let mut s = sample();
        if let Some((_, Some(item))) = s.locks.get_mut(1) {
            item.heartbeat_at = Some(s.observed_at + Duration::from_secs(600));
        }
        assert!(render_text(&s).contains("renewed 10m in the future (clock skew)"));
    }

    #[test]
    fn json_carries_the_same_facts() {
        let v = to_json(&sample());
        assert_eq!(v["state"]["phase"], "initialized");
        assert_eq!(v["locks"][1]["status"], "held");
        assert_eq!(v["locks"][1]["renewed_age_ms_by_holder_clock"], 4000);
        assert_eq!(v["locks"][2]["status"], "never-taken");
        assert_eq!(v["members"][0]["member_id"], "8e9e05c52164694d");
        assert_eq!(v["join"]["secret_version"], "v-2");
        assert_eq!(v["refresh"]["fulfilled"], false);
    }
}
