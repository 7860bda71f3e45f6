//! Talking to the stacked etcd: membership, per-member health, removal, and
//! confirmation of a member before anyone records it (I2).
//!
//! A member is *confirmed* only when etcd itself reports it started (it has
//! a name and client URLs — an added-but-never-started member has neither),
//! voting (not a learner) and healthy. *Healthy* is more than "its endpoint
//! answered Status" (a member cut off from the others still answers): it
//! also sees a leader, reports no raft error, and the cluster has no active
//! alarm (NOSPACE or CORRUPT stop every write, whichever member raised it);
//! [`judge`] decides that. What must be cleaned up before a join (I3) is
//! decided by a pure function over the member list and health, so every
//! case is unit-tested.

use crate::config::model::EtcdScheme;
use crate::retry::{self, Classify, RetryClass, WaitPolicy};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One etcd member as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: u64,
    /// Empty until the member has started.
    pub name: String,
    pub peer_urls: Vec<String>,
    /// Empty until the member has started.
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl Member {
    /// Started: etcd knows its name and client URLs.
    pub fn is_started(&self) -> bool {
        !self.name.is_empty() && !self.client_urls.is_empty()
    }

    /// The id as etcdctl prints it.
    pub fn hex_id(&self) -> String {
        MemberHex(self.id).to_string()
    }
}

/// A member id as etcdctl prints it (16 lower-case hex digits): the one
/// place that says how, for logs, messages, tables and records alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHex(pub u64);

impl std::fmt::Display for MemberHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A member and whether it is healthy ([`judge`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub member: Member,
    pub healthy: bool,
    /// Why it is not healthy: no answer, no leader, a raft error, an alarm.
    pub error: Option<String>,
    /// The member's backend size, when it answered.
    pub db_size: Option<i64>,
    /// The leader id as this member sees it (0: none), when it answered.
    pub leader: Option<u64>,
}

/// An active cluster alarm, as the Alarm API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alarm {
    /// The member that raised it.
    pub member_id: u64,
    /// `NOSPACE`, `CORRUPT` (etcd's names).
    pub kind: String,
}

impl Alarm {
    /// What the alarm means and what the operator does about it.
    fn describe(&self) -> String {
        let what = match self.kind.as_str() {
            "NOSPACE" => "the backend reached its quota and etcd accepts no writes:                 free space (`etcdctl compact` to the current revision, then `etcdctl defrag`                 on every member) or raise --quota-backend-bytes, then `etcdctl alarm disarm`",
            "CORRUPT" => "a member's data differs from the others' and etcd refuses requests:                 replace or restore that member from a snapshot, then `etcdctl alarm disarm`",
            _ => "`etcdctl alarm list` shows it; clear its cause, then `etcdctl alarm disarm`",
        };
        format!(
            "etcd alarm {} is active (raised by member {}): {what}",
            self.kind,
            MemberHex(self.member_id)
        )
    }
}

/// Whether a member that answered Status is healthy: it sees a leader, it
/// reports no raft error, and no alarm is active in the cluster. `Err` names
/// the first condition that fails, alarms first (they say what to do).
pub fn judge(leader: u64, errors: &[String], alarms: &[Alarm]) -> Result<(), String> {
    if let Some(alarm) = alarms.first() {
        let more = alarms.len() - 1;
        return Err(if more == 0 {
            alarm.describe()
        } else {
            format!("{} (and {more} more alarm(s))", alarm.describe())
        });
    }
    if leader == 0 {
        return Err("no leader (Status.leader = 0): it cannot reach a quorum of its peers".into());
    }
    if !errors.is_empty() {
        return Err(format!("raft errors: {}", errors.join("; ")));
    }
    Ok(())
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scheme: EtcdScheme,
    pub client_port: u16,
    pub peer_port: u16,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    /// `<kubernetes_dir>/pki`: kubeadm's etcd CA and the API server's etcd client certificate.
    pub pki_dir: PathBuf,
}

impl Settings {
    /// From `[etcd]` and `[paths]`.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Settings {
            scheme: cfg.etcd.scheme,
            // kubeadm's stacked etcd (its constants; not configurable there).
            client_port: 2379,
            peer_port: 2380,
            dial_timeout: cfg.etcd.dial_timeout,
            request_timeout: cfg.etcd.request_timeout,
            pki_dir: cfg.paths.kubernetes_dir.join("pki"),
        }
    }

    fn scheme(&self) -> &'static str {
        match self.scheme {
            EtcdScheme::Https => "https",
            EtcdScheme::Http => "http",
        }
    }

    /// This node's client URL.
    pub fn client_url(&self, ip: &str) -> String {
        format!("{}://{ip}:{}", self.scheme(), self.client_port)
    }

    /// This node's peer URL: how etcd (and we) recognise its member.
    pub fn peer_url(&self, ip: &str) -> String {
        format!("{}://{ip}:{}", self.scheme(), self.peer_port)
    }
}

/// etcd failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read etcd client certificate {}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach etcd at {endpoints:?}: {message}")]
    Connect {
        endpoints: Vec<String>,
        message: String,
    },
    #[error("etcd {operation} failed: {message}")]
    Request {
        operation: &'static str,
        message: String,
        transient: bool,
    },
    #[error("etcd member with peer URL {peer_url} is not confirmed: {reason}")]
    NotConfirmed { peer_url: String, reason: String },
    #[error("gave up confirming the etcd member with peer URL {peer_url} after {}: {last}", crate::config::value::format_duration(*after))]
    ConfirmTimeout {
        peer_url: String,
        after: Duration,
        last: String,
    },
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::Connect { .. }
            | Error::NotConfirmed { .. }
            | Error::Request {
                transient: true, ..
            } => RetryClass::Transient,
            _ => RetryClass::Permanent,
        }
    }
}

/// The member a snapshot streams from, and etcd's state when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSource {
    pub member: u64,
    /// The revision when the stream opened (the snapshot holds at least it).
    pub revision: i64,
    pub endpoint: String,
    /// The member's database size then: about what the stream will carry.
    pub db_size: u64,
}

/// etcd's snapshot stream: the database in pieces, then its sha256.
pub struct SnapshotStream {
    inner: etcd_client::SnapshotStreaming,
    stall: Duration,
    /// The stream's own connection, closed with it.
    _client: Client,
}

impl SnapshotStream {
    /// The next piece; `None` once etcd has sent everything.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, Error> {
        match tokio::time::timeout(self.stall, self.inner.message()).await {
            Err(_) => Err(Error::Request {
                operation: "snapshot",
                message: format!(
                    "no data for {}",
                    crate::config::value::format_duration(self.stall)
                ),
                transient: true,
            }),
            Ok(Err(e)) => Err(request("snapshot", e)),
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(piece))) => Ok(Some(piece.blob().to_vec())),
        }
    }
}

/// A client to the cluster's etcd.
pub struct Etcd {
    client: Client,
    /// The endpoints `client` balances over, each tried alone when no member
    /// answered a request through the balanced client.
    endpoints: Vec<String>,
    settings: Settings,
    tls: Option<TlsOptions>,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Certificate {
        path: path.to_path_buf(),
        source,
    })
}

fn request(operation: &'static str, e: etcd_client::Error) -> Error {
    let message = e.to_string();
    let transient = !message.contains("member not found") && !message.contains("permission denied");
    Error::Request {
        operation,
        message,
        transient,
    }
}

/// How one request attempt failed, before it becomes an [`Error`].
#[derive(Debug)]
enum Failure {
    TimedOut,
    Etcd(etcd_client::Error),
}

impl Failure {
    /// No member answered (refused, connection broken, unavailable, no
    /// answer in time), so another member may still answer it. A refusal
    /// in etcd's own words ("etcdserver: no leader", "unhealthy cluster")
    /// is an answer: a live member gave it, and the caller decides.
    fn no_member_answered(&self) -> bool {
        if self.answered_by_etcd() {
            return false;
        }
        match self {
            Failure::TimedOut => true,
            Failure::Etcd(
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_),
            ) => true,
            // Cancelled is how the channel's own request timeout ends a call;
            // a connection that broke under the call is Unknown, caused by I/O.
            Failure::Etcd(etcd_client::Error::GRpcStatus(status)) => {
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) || caused_by_io(status)
            }
            Failure::Etcd(_) => false,
        }
    }

    fn answered_by_etcd(&self) -> bool {
        matches!(self, Failure::Etcd(etcd_client::Error::GRpcStatus(status))
            if status.message().starts_with("etcdserver:"))
    }

    fn into_error(self, operation: &'static str) -> Error {
        match self {
            Failure::TimedOut => Error::Request {
                operation,
                message: "timed out".into(),
                transient: true,
            },
            Failure::Etcd(e) => request(operation, e),
        }
    }
}

/// Whether an I/O error (refused, reset, broken pipe) is behind `e`.
fn caused_by_io(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = e.source();
    while let Some(cause) = next {
        if cause.is::<std::io::Error>() {
            return true;
        }
        next = cause.source();
    }
    false
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::TimedOut => f.write_str("timed out"),
            Failure::Etcd(e) => write!(f, "{e}"),
        }
    }
}

impl Etcd {
    /// Connects to `endpoints` (client URLs), with kubeadm's client certificate when https.
    pub async fn connect(endpoints: &[String], settings: &Settings) -> Result<Etcd, Error> {
        let tls = match settings.scheme {
            EtcdScheme::Http => None,
            EtcdScheme::Https => {
                let ca = read(&settings.pki_dir.join("etcd/ca.crt"))?;
                let cert = read(&settings.pki_dir.join("apiserver-etcd-client.crt"))?;
                let key = read(&settings.pki_dir.join("apiserver-etcd-client.key"))?;
                Some(
                    TlsOptions::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .identity(Identity::from_pem(cert, key)),
                )
            }
        };
        let client = connect(endpoints, settings, tls.clone()).await?;
        Ok(Etcd {
            client,
            endpoints: endpoints.to_vec(),
            settings: settings.clone(),
            tls,
        })
    }

    /// Connects through the first of `endpoints` that answers: records can
    /// name members that are gone, and a request routed to one fails.
    pub async fn connect_any(endpoints: &[String], settings: &Settings) -> Result<Etcd, Error> {
        let mut failures = Vec::new();
        for endpoint in endpoints {
            let attempt = async {
                let etcd = Etcd::connect(std::slice::from_ref(endpoint), settings).await?;
                etcd.status_of(std::slice::from_ref(endpoint)).await?;
                Ok::<_, Error>(etcd)
            };
            match attempt.await {
                Ok(etcd) => return Ok(etcd),
                Err(e) => failures.push(format!("{endpoint}: {e}")),
            }
        }
        Err(Error::Connect {
            endpoints: endpoints.to_vec(),
            message: failures.join("; "),
        })
    }

    /// A snapshot stream from the first of `endpoints` that answers, through
    /// a connection of its own without the request timeout (a large database
    /// streams for minutes): `stall` bounds the wait for each piece instead.
    pub async fn snapshot(
        &self,
        endpoints: &[String],
        stall: Duration,
    ) -> Result<(SnapshotSource, SnapshotStream), Error> {
        let mut failures = Vec::new();
        for endpoint in endpoints {
            match self.snapshot_from(endpoint, stall).await {
                Ok(opened) => return Ok(opened),
                Err(e) => failures.push(format!("{endpoint}: {e}")),
            }
        }
        Err(Error::Connect {
            endpoints: endpoints.to_vec(),
            message: failures.join("; "),
        })
    }

    async fn snapshot_from(
        &self,
        endpoint: &str,
        stall: Duration,
    ) -> Result<(SnapshotSource, SnapshotStream), Error> {
        let endpoints = [endpoint.to_string()];
        let timed_out = |operation: &'static str| Error::Request {
            operation,
            message: "timed out".into(),
            transient: true,
        };
        let mut client = connect_with(&endpoints, &self.settings, self.tls.clone(), None).await?;
        let status = tokio::time::timeout(self.settings.request_timeout, client.status())
            .await
            .map_err(|_| timed_out("status"))?
            .map_err(|e| request("status", e))?;
        let (member, revision) = status
            .header()
            .map(|h| (h.member_id(), h.revision()))
            .unwrap_or_default();
        let inner = tokio::time::timeout(self.settings.request_timeout, client.snapshot())
            .await
            .map_err(|_| timed_out("snapshot"))?
            .map_err(|e| request("snapshot", e))?;
        Ok((
            SnapshotSource {
                member,
                revision,
                endpoint: endpoint.to_string(),
                db_size: status.db_size().max(0) as u64,
            },
            SnapshotStream {
                inner,
                stall,
                _client: client,
            },
        ))
    }

    /// The client URLs this client reaches etcd through.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The member list, as etcd reports it.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        let resp = self
            .on_any_member("member list", |mut client| async move {
                client.member_list().await
            })
            .await
            .map_err(|f| f.into_error("member list"))?;
        Ok(resp
            .members()
            .iter()
            .map(|m| Member {
                id: m.id(),
                name: m.name().to_string(),
                peer_urls: m.peer_urls().to_vec(),
                client_urls: m.client_urls().to_vec(),
                is_learner: m.is_learner(),
            })
            .collect())
    }

    /// The cluster's active alarms. A failed list is an empty one (logged):
    /// the list goes through raft, so it fails when there is no leader, and
    /// each member's Status then says so; Status also carries the alarms
    /// the member knows of, among its errors.
    pub async fn alarms(&self) -> Vec<Alarm> {
        let answer = self
            .on_any_member("alarm list", |mut client| async move {
                client
                    .alarm(
                        etcd_client::AlarmAction::Get,
                        etcd_client::AlarmType::None,
                        None,
                    )
                    .await
            })
            .await;
        match answer {
            Ok(resp) => resp
                .alarms()
                .iter()
                .filter(|a| a.alarm() != etcd_client::AlarmType::None)
                .map(|a| Alarm {
                    member_id: a.member_id(),
                    kind: a.alarm().as_str_name().to_string(),
                })
                .collect(),
            Err(f) => {
                tracing::warn!(error = %f, "cannot list etcd alarms; judging health by each member's status");
                Vec::new()
            }
        }
    }

    /// Asks every started member's own endpoint for its status, and the
    /// cluster for its alarms, and judges each member ([`judge`]). Alarms are
    /// listed only when some member sees a leader: without one the list
    /// cannot answer, and every member is unhealthy anyway.
    pub async fn health(&self, members: &[Member]) -> Vec<Health> {
        self.health_judged(members, true).await
    }

    /// [`Self::health`] for a membership removal: an active alarm (NOSPACE,
    /// CORRUPT) does not count against a member here. An alarm stops writes
    /// to the keyspace, not raft's configuration changes, so a terminating
    /// member can still leave; refusing would let it die as a voter. Joins
    /// and confirmation (I2) still count alarms.
    pub async fn health_for_removal(&self, members: &[Member]) -> Vec<Health> {
        self.health_judged(members, false).await
    }

    async fn health_judged(&self, members: &[Member], count_alarms: bool) -> Vec<Health> {
        let mut out = Vec::new();
        let mut statuses = Vec::new();
        for m in members {
            let mut health = Health {
                member: m.clone(),
                healthy: false,
                error: None,
                db_size: None,
                leader: None,
            };
            let mut status = None;
            if !m.is_started() {
                health.error = Some("never started (no name, no client URLs)".to_string());
            } else {
                match self.status_of(&m.client_urls).await {
                    Ok(s) => {
                        health.db_size = Some(s.db_size());
                        health.leader = Some(s.leader());
                        status = Some(s);
                    }
                    Err(e) => health.error = Some(e.to_string()),
                }
            }
            out.push(health);
            statuses.push(status);
        }
        let led = statuses.iter().flatten().any(|s| s.leader() != 0);
        let alarms = if led && count_alarms {
            self.alarms().await
        } else {
            Vec::new()
        };
        for (health, status) in out.iter_mut().zip(&statuses) {
            if let Some(status) = status {
                // etcd also lists active alarms among a member's Status
                // errors (`memberID:<id> alarm:NOSPACE`).
                let errors: Vec<String> = status
                    .errors()
                    .iter()
                    .filter(|e| count_alarms || !e.contains("alarm:"))
                    .cloned()
                    .collect();
                match judge(status.leader(), &errors, &alarms) {
                    Ok(()) => health.healthy = true,
                    Err(why) => health.error = Some(why),
                }
            }
        }
        out
    }

    /// The status of the member behind `endpoints`, within the request timeout.
    async fn status_of(&self, endpoints: &[String]) -> Result<etcd_client::StatusResponse, Error> {
        let client = connect(endpoints, &self.settings, self.tls.clone()).await?;
        self.attempt(client, &|mut client: Client| async move {
            client.status().await
        })
        .await
        .map_err(|f| f.into_error("status"))
    }

    /// The leader's member id as the member that answered sees it (0: none).
    pub async fn leader(&self) -> Result<u64, Error> {
        let status = self
            .on_any_member("status", |mut client| async move { client.status().await })
            .await
            .map_err(|f| f.into_error("status"))?;
        Ok(status.leader())
    }

    /// Removes a member by id. A member that is already gone counts as
    /// removed: a retry after a lost answer, or another path that got there
    /// first, must not fail the caller.
    pub async fn remove(&self, id: u64) -> Result<(), Error> {
        let answer = self
            .on_any_member("member remove", |mut client| async move {
                client.member_remove(id).await
            })
            .await;
        match answer {
            Ok(_) => Ok(()),
            Err(Failure::Etcd(e)) if e.to_string().contains("member not found") => {
                tracing::info!(member_id = %MemberHex(id), "member already removed");
                Ok(())
            }
            Err(f) => Err(f.into_error("member remove")),
        }
    }

    /// Runs `call` through the balanced client and, if no member answered it,
    /// through each endpoint alone. The balanced channel routes some requests
    /// to a member that is down, and a cluster that has lost one member is
    /// exactly when membership must still be read and changed. Safe for
    /// writes too: the only write here (remove) is idempotent, so a repeat
    /// after a connection broke under it or timed out changes nothing.
    /// At worst one request timeout per endpoint, plus one.
    async fn on_any_member<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, Failure>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let first = match self.attempt(self.client.clone(), &call).await {
            Err(f) if f.no_member_answered() && self.endpoints.len() > 1 => f,
            answer => return answer,
        };
        tracing::debug!(operation, error = %first, "no member answered through the balanced client; trying each endpoint");
        for endpoint in &self.endpoints {
            let client = match connect(
                std::slice::from_ref(endpoint),
                &self.settings,
                self.tls.clone(),
            )
            .await
            {
                Ok(client) => client,
                Err(_) => continue,
            };
            match self.attempt(client, &call).await {
                Err(f) if f.no_member_answered() => continue,
                answer => return answer,
            }
        }
        Err(first)
    }

    async fn attempt<T, F, Fut>(&self, client: Client, call: &F) -> Result<T, Failure>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.settings.request_timeout, call(client))
            .await
            .map_err(|_| Failure::TimedOut)?
            .map_err(Failure::Etcd)
    }

    /// I2: waits (up to `within`) until the member with `peer_url` is started,
    /// voting and healthy, and returns it. Nothing may be recorded before this.
    pub async fn confirm(&self, peer_url: &str, within: Duration) -> Result<Member, Error> {
        let policy = WaitPolicy {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(3),
            max_attempts: 10_000,
            deadline: Some(within),
        };
        retry::with_retries("confirm etcd member", &policy, || {
            self.confirm_once(peer_url)
        })
        .await
        .map_err(|e| match e {
            retry::RetryError::Failed(e) => e,
            retry::RetryError::Deadline { deadline, last, .. } => Error::ConfirmTimeout {
                peer_url: peer_url.to_string(),
                after: deadline,
                last: last.unwrap_or_default(),
            },
        })
    }

    async fn confirm_once(&self, peer_url: &str) -> Result<Member, Error> {
        let members = self.members().await?;
        let not = |reason: &str| Error::NotConfirmed {
            peer_url: peer_url.to_string(),
            reason: reason.to_string(),
        };
        let member = find_by_peer_url(&members, peer_url).ok_or_else(|| not("no such member"))?;
        if !member.is_started() {
            return Err(not("not started yet (no name or client URLs)"));
        }
        if member.is_learner {
            return Err(not("still a learner"));
        }
        let status = self
            .status_of(&member.client_urls)
            .await
            .map_err(|e| not(&format!("its endpoint does not answer: {e}")))?;
        let alarms = if status.leader() != 0 {
            self.alarms().await
        } else {
            Vec::new()
        };
        judge(status.leader(), status.errors(), &alarms).map_err(|why| not(&why))?;
        Ok(member.clone())
    }
}

async fn connect(
    endpoints: &[String],
    settings: &Settings,
    tls: Option<TlsOptions>,
) -> Result<Client, Error> {
    connect_with(endpoints, settings, tls, Some(settings.request_timeout)).await
}

/// [`connect`], with each request bounded by `request_timeout` (none for a
/// stream that may run for minutes and is bounded piece by piece instead).
async fn connect_with(
    endpoints: &[String],
    settings: &Settings,
    tls: Option<TlsOptions>,
    request_timeout: Option<Duration>,
) -> Result<Client, Error> {
    let mut options = ConnectOptions::new().with_connect_timeout(settings.dial_timeout);
    if let Some(timeout) = request_timeout {
        options = options.with_timeout(timeout);
    }
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    tokio::time::timeout(
        settings.dial_timeout + settings.request_timeout,
        Client::connect(endpoints, Some(options)),
    )
    .await
    .map_err(|_| Error::Connect {
        endpoints: endpoints.to_vec(),
        message: "timed out".into(),
    })?
    .map_err(|e| Error::Connect {
        endpoints: endpoints.to_vec(),
        message: e.to_string(),
    })
}

/// The host part of a URL such as `https://10.0.1.2:2380`.
pub fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h))
}

/// Client URLs of the members the registry records (their peer URLs' hosts).
pub fn recorded_endpoints(
    records: &[crate::registry::MemberRecord],
    settings: &Settings,
) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| host_of(&r.peer_url).map(|h| settings.client_url(h)))
        .collect()
}

/// The member whose peer URLs include `peer_url`.
pub fn find_by_peer_url<'a>(members: &'a [Member], peer_url: &str) -> Option<&'a Member> {
    members
        .iter()
        .find(|m| m.peer_urls.iter().any(|u| u == peer_url))
}

/// Why a member must go before this node joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// A learner that never started: an earlier join died after `member add`.
    OrphanLearner(Member),
    /// A member with this node's own peer URL: an earlier incarnation of this node.
    OwnLeftover(Member),
}

/// What must be removed before `own_peer_url` joins (I3), and whether the
/// cluster is healthy enough to add a member at all: every voting member
/// other than our own leftover must be started and healthy.
pub fn join_plan(health: &[Health], own_peer_url: &str) -> (Vec<Stale>, Result<(), String>) {
    let mut stale = Vec::new();
    let mut unhealthy: Vec<(&str, Vec<String>)> = Vec::new();
    for h in health {
        let m = &h.member;
        if m.peer_urls.iter().any(|u| u == own_peer_url) {
            stale.push(Stale::OwnLeftover(m.clone()));
        } else if m.is_learner && !m.is_started() {
            stale.push(Stale::OrphanLearner(m.clone()));
        } else if !h.healthy {
            let who = format!(
                "{} ({})",
                m.hex_id(),
                if m.name.is_empty() {
                    "unnamed"
                } else {
                    &m.name
                }
            );
            // Members with one reason (a cluster-wide alarm) share one line.
            let why = h.error.as_deref().unwrap_or("unhealthy");
            match unhealthy.iter_mut().find(|(w, _)| *w == why) {
                Some((_, names)) => names.push(who),
                None => unhealthy.push((why, vec![who])),
            }
        }
    }
    let ready = if unhealthy.is_empty() {
        Ok(())
    } else {
        let lines: Vec<String> = unhealthy
            .iter()
            .map(|(why, names)| format!("{}: {why}", names.join(", ")))
            .collect();
        Err(format!("unhealthy members: {}", lines.join("; ")))
    };
    (stale, ready)
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Certificate { .. } => &crate::catalogue::ETCD_CERTIFICATE,
            E::Connect { .. } => &crate::catalogue::ETCD_CONNECT,
            E::Request { .. } => &crate::catalogue::ETCD_REQUEST,
            // One check failing is what the confirmation wait retries.
            E::NotConfirmed { .. } | E::ConfirmTimeout { .. } => {
                &crate::catalogue::ETCD_NOT_CONFIRMED
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_no_member_answered_are_tried_on_another() {
        let status = |code| {
            Failure::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, "x",
            )))
        };
        assert!(Failure::TimedOut.no_member_answered());
        assert!(status(tonic::Code::Unavailable).no_member_answered());
        assert!(status(tonic::Code::Cancelled).no_member_answered());
        assert!(status(tonic::Code::DeadlineExceeded).no_member_answered());
        // The connection to a member that died broke under the call.
        #[derive(Debug)]
        struct Transport(std::io::Error);
        impl std::fmt::Display for Transport {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Transport {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let mut broken = tonic::Status::new(tonic::Code::Unknown, "transport error");
        broken.set_source(std::sync::Arc::new(Transport(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        ))));
        assert!(Failure::Etcd(etcd_client::Error::GRpcStatus(broken)).no_member_answered());
        assert!(!status(tonic::Code::Unknown).no_member_answered());
        // A live member refused in etcd's words: its answer stands.
        for refusal in ["etcdserver: unhealthy cluster", "etcdserver: no leader"] {
            let refused = tonic::Status::new(tonic::Code::Unavailable, refusal);
            assert!(!Failure::Etcd(etcd_client::Error::GRpcStatus(refused)).no_member_answered());
        }
        // etcd answered: another member would answer the same.
        assert!(!status(tonic::Code::NotFound).no_member_answered());
        assert!(!status(tonic::Code::PermissionDenied).no_member_answered());
        assert!(!status(tonic::Code::FailedPrecondition).no_member_answered());
        assert!(!Failure::Etcd(etcd_client::Error::InvalidArgs("x".into())).no_member_answered());
        // What the caller sees is still classified as before.
        let err = status(tonic::Code::Unavailable).into_error("member list");
        assert!(matches!(
            err,
            Error::Request {
                operation: "member list",
                transient: true,
                ..
            }
        ));
        let err = Failure::TimedOut.into_error("status");
        assert_eq!(
            err.to_string(),
            Error::Request {
                operation: "status",
                message: "timed out".into(),
                transient: true
            }
            .to_string()
        );
    }

    #[test]
    fn hosts_come_out_of_peer_urls() {
        assert_eq!(host_of("https://10.0.1.2:2380"), Some("10.0.1.2"));
        assert_eq!(host_of("http://127.1.2.3:2380/"), Some("127.1.2.3"));
        assert_eq!(host_of("nonsense"), None);
    }

    fn member(id: u64, name: &str, ip: &str, learner: bool) -> Member {
        Member {
            id,
            name: name.into(),
            peer_urls: vec![format!("https://{ip}:2380")],
            client_urls: if name.is_empty() {
                vec![]
            } else {
                vec![format!("https://{ip}:2379")]
            },
            is_learner: learner,
        }
    }

    fn healthy(m: Member) -> Health {
        Health {
            member: m,
            healthy: true,
            error: None,
            db_size: None,
            leader: None,
        }
    }

    fn sick(m: Member) -> Health {
        Health {
            member: m,
            healthy: false,
            error: Some("connection refused".into()),
            db_size: None,
            leader: None,
        }
    }

    #[test]
    fn a_started_member_has_a_name_and_client_urls() {
        assert!(member(1, "a", "10.0.0.1", false).is_started());
        assert!(!member(1, "", "10.0.0.1", true).is_started());
        assert_eq!(
            member(0x8e9e05c52164694d, "a", "10.0.0.1", false).hex_id(),
            "8e9e05c52164694d"
        );
    }

    #[test]
    fn a_healthy_cluster_needs_no_cleanup() {
        let h = vec![
            healthy(member(1, "a", "10.0.0.1", false)),
            healthy(member(2, "b", "10.0.0.2", false)),
        ];
        assert_eq!(join_plan(&h, "https://10.0.0.9:2380"), (vec![], Ok(())));
    }

    #[test]
    fn an_orphan_learner_and_our_own_leftover_go_first() {
        let orphan = member(3, "", "10.0.0.3", true);
        let own = member(4, "", "10.0.0.9", false);
        let h = vec![
            healthy(member(1, "a", "10.0.0.1", false)),
            sick(orphan.clone()),
            sick(own.clone()),
        ];
        let (stale, ready) = join_plan(&h, "https://10.0.0.9:2380");
        assert_eq!(
            stale,
            vec![Stale::OrphanLearner(orphan), Stale::OwnLeftover(own)]
        );
        assert_eq!(
            ready,
            Ok(()),
            "stale members do not count against health once removed"
        );
    }

    #[test]
    fn an_unhealthy_voter_blocks_the_join() {
        let h = vec![
            healthy(member(1, "a", "10.0.0.1", false)),
            sick(member(2, "b", "10.0.0.2", false)),
        ];
        let (stale, ready) = join_plan(&h, "https://10.0.0.9:2380");
        assert!(stale.is_empty());
        let reason = ready.unwrap_err();
        assert!(
            reason.contains("0000000000000002 (b): connection refused"),
            "{reason}"
        );
    }

    fn alarm(member_id: u64, kind: &str) -> Alarm {
        Alarm {
            member_id,
            kind: kind.into(),
        }
    }

    #[test]
    fn answering_status_is_not_enough_to_be_healthy() {
        assert_eq!(judge(7, &[], &[]), Ok(()));
        let no_leader = judge(0, &[], &[]).unwrap_err();
        assert!(no_leader.starts_with("no leader"), "{no_leader}");
        let raft = judge(7, &["etcdserver: no leader".into()], &[]).unwrap_err();
        assert_eq!(raft, "raft errors: etcdserver: no leader");
    }

    #[test]
    fn an_alarm_anywhere_makes_every_member_unhealthy_and_says_what_to_do() {
        let nospace = judge(7, &[], &[alarm(0xa, "NOSPACE")]).unwrap_err();
        assert!(
            nospace.starts_with("etcd alarm NOSPACE is active (raised by member 000000000000000a)"),
            "{nospace}"
        );
        for what in ["compact", "defrag", "--quota-backend-bytes", "alarm disarm"] {
            assert!(nospace.contains(what), "{nospace}");
        }
        let corrupt = judge(7, &[], &[alarm(0xb, "CORRUPT"), alarm(0xa, "NOSPACE")]).unwrap_err();
        assert!(
            corrupt.contains("CORRUPT") && corrupt.contains("snapshot"),
            "{corrupt}"
        );
        assert!(corrupt.ends_with("(and 1 more alarm(s))"), "{corrupt}");
        // The alarm is named before the errors that follow from it.
        let both = judge(
            0,
            &["memberID:10 alarm:NOSPACE".into()],
            &[alarm(0xa, "NOSPACE")],
        );
        assert!(both.unwrap_err().contains("NOSPACE is active"));
    }

    #[test]
    fn a_member_without_a_leader_blocks_the_join_by_name() {
        let mut h = healthy(member(2, "b", "10.0.0.2", false));
        h.healthy = false;
        h.error = judge(0, &[], &[]).err();
        let (_, ready) = join_plan(
            &[healthy(member(1, "a", "10.0.0.1", false)), h],
            "https://10.0.0.9:2380",
        );
        let reason = ready.unwrap_err();
        assert!(
            reason.contains("0000000000000002 (b): no leader"),
            "{reason}"
        );
    }

    #[test]
    fn urls_follow_the_scheme_and_ports() {
        let s = Settings {
            scheme: EtcdScheme::Https,
            client_port: 2379,
            peer_port: 2380,
            dial_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            pki_dir: "/etc/kubernetes/pki".into(),
        };
        assert_eq!(s.client_url("10.0.0.1"), "https://10.0.0.1:2379");
        assert_eq!(s.peer_url("10.0.0.1"), "https://10.0.0.1:2380");
        let m = vec![member(7, "a", "10.0.0.1", false)];
        assert_eq!(
            find_by_peer_url(&m, "https://10.0.0.1:2380").map(|m| m.id),
            Some(7)
        );
    }
}
