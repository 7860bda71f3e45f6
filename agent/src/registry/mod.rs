//! The cluster's records: the STATE record (phase, generation, who initialized
//! it, with which run and fence) and one MEMBER record per confirmed etcd
//! member.
//!
//! Every write that matters is fenced: the store checks, in the same
//! transaction, that the lock named by the [`Fence`] still carries that fence
//! and is not released. A refused fence means we lost the lock: the guard is
//! told at once. A write whose answer was lost is resolved by a consistent
//! read-back and, only if it provably did not apply, written once more.

pub mod dynamo;

use crate::lock::{Fence, Guard, Purpose, StoreError, StoreErrorClass};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

/// Where a cluster is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Uninitialized,
    Initializing,
    Initialized,
}

impl Phase {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Uninitialized => "uninitialized",
            Phase::Initializing => "initializing",
            Phase::Initialized => "initialized",
        }
    }

    /// From the stored word.
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "uninitialized" => Some(Phase::Uninitialized),
            "initializing" => Some(Phase::Initializing),
            "initialized" => Some(Phase::Initialized),
            _ => None,
        }
    }
}

/// The STATE record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterState {
    pub phase: Phase,
    /// +1 on every init attempt: a crashed attempt leaves its generation behind.
    pub generation: u64,
    pub endpoint: Option<String>,
    pub kubernetes_version: Option<String>,
    /// Owner (instance/process) that ran `kubeadm init` for this generation.
    pub initialized_by: Option<String>,
    /// Correlation id of that bootstrap run: every joining node logs it.
    pub init_run_id: Option<String>,
    /// The init lock's fence used for this generation.
    pub fence: Option<u64>,
    /// The snapshot this generation was restored from (`kubeboot restore`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    #[serde(skip)]
    pub updated_at: Option<SystemTime>,
}

impl ClusterState {
    /// A cluster nobody has started yet.
    pub fn uninitialized() -> Self {
        ClusterState {
            phase: Phase::Uninitialized,
            generation: 0,
            endpoint: None,
            kubernetes_version: None,
            initialized_by: None,
            init_run_id: None,
            fence: None,
            restored_from: None,
            updated_at: None,
        }
    }
}

/// What an init attempt records when it starts.
#[derive(Debug, Clone)]
pub struct InitClaim {
    pub run_id: String,
    pub initialized_by: String,
    pub endpoint: String,
    pub kubernetes_version: String,
    pub wall: SystemTime,
    /// `kubeboot restore`: the snapshot's key. A restore may start a new
    /// generation over an initialized one; an init may not.
    pub restored_from: Option<String>,
}

/// A confirmed etcd member (written only after etcd reports it started, voting, healthy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberRecord {
    pub instance_id: String,
    /// etcd's member id, printed in hex by etcdctl.
    pub member_id: u64,
    pub name: String,
    pub peer_url: String,
    #[serde(skip)]
    pub confirmed_at: SystemTime,
}

/// Which join material is current: the Secrets Manager version to read and
/// the non-secret facts about it. The secret itself never enters the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JoinPointer {
    /// `VersionId` of the token secret (`aws.join_secret`): the token, the
    /// endpoint and the CA pins. Every publication writes a new one, so it
    /// also names the publication (refresh requests refer to it).
    pub secret_version: String,
    /// `VersionId` of the certificate-key secret (`aws.certificate_key_secret`,
    /// readable by control planes only), when certificates are uploaded.
    pub key_version: Option<String>,
    /// Publication number: a publish moves the pointer from `seq - 1` to
    /// `seq` (compare-and-swap), so publications are ordered without
    /// comparing clocks of different hosts.
    pub seq: u64,
    pub endpoint: String,
    pub ca_cert_hashes: Vec<String>,
    #[serde(skip)]
    pub token_expires_at: SystemTime,
    /// When the uploaded control-plane certificates expire (`None`: not uploaded).
    #[serde(skip)]
    pub certs_expire_at: Option<SystemTime>,
    #[serde(skip)]
    pub published_at: SystemTime,
}

/// A joiner found the current join material too close to expiry and asks
/// the leader for fresh material. Not fenced (joiners hold no lock that
/// could fence it): the latest request of each origin wins, and a pointer to
/// any version other than `stale_version` fulfils it.
///
/// Where it is stored says who may have written it: workers can write only
/// the request partition, so a request read from there is a worker's
/// whatever it claims, and the leader grants a worker a token only. Rotations
/// are rate-limited besides (`refresh::plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefreshRequest {
    /// Who may have written it, from where it was read (never from its content).
    pub origin: Origin,
    /// The instance id the requester gave (informational: not authenticated).
    pub requested_by: String,
    /// What it asks for.
    pub what: Wants,
    /// The secret version that was found too close to expiry.
    pub stale_version: String,
    #[serde(skip)]
    pub requested_at: SystemTime,
}

/// What a refresh request asks for, stored as `token`, `certs` or `both`.
/// Anything else read back (another version's word, a hand edit) is kept as
/// written, so `kubeboot status` shows it, and asks for nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    Token,
    Certs,
    Both,
    Unknown(String),
}

impl Wants {
    /// What the stored word asks for.
    pub fn parse(word: &str) -> Wants {
        match word {
            "token" => Wants::Token,
            "certs" => Wants::Certs,
            "both" => Wants::Both,
            other => Wants::Unknown(other.to_string()),
        }
    }

    /// The stored word.
    pub fn as_str(&self) -> &str {
        match self {
            Wants::Token => "token",
            Wants::Certs => "certs",
            Wants::Both => "both",
            Wants::Unknown(word) => word,
        }
    }

    /// Whether it asks for a new bootstrap token.
    pub fn token(&self) -> bool {
        matches!(self, Wants::Token | Wants::Both)
    }

    /// Whether it asks for the control-plane certificates.
    pub fn certs(&self) -> bool {
        matches!(self, Wants::Certs | Wants::Both)
    }
}

impl std::fmt::Display for Wants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Wants {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Which role could have written a refresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The request partition, which every node role may write.
    Worker,
    /// The cluster partition, which only the control-plane role may write.
    ControlPlane,
}

impl RefreshRequest {
    /// Whether `pointer` already answers this request.
    pub fn fulfilled_by(&self, pointer: Option<&JoinPointer>) -> bool {
        pointer.is_some_and(|p| p.secret_version != self.stale_version)
    }
}

/// How a fenced write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Applied,
    /// The lock no longer carries our fence (or was released).
    FenceRejected,
    /// The record was not in the expected state.
    ConditionFailed,
}

/// The records' storage. DynamoDB implements it ([`dynamo::DynamoRegistryStore`]);
/// the tests implement it in memory for the seeded simulation.
pub trait RegistryStore: Send + Sync + 'static {
    fn read_state(&self) -> impl Future<Output = Result<Option<ClusterState>, StoreError>> + Send;
    /// Starts generation `expected_generation + 1` if the cluster is still at
    /// `expected_generation` and not initialized.
    fn begin_init(
        &self,
        fence: Fence,
        expected_generation: u64,
        claim: &InitClaim,
    ) -> impl Future<Output = Result<WriteResult, StoreError>> + Send;
    /// `initializing` → `initialized` for `generation` started by `run_id`.
    fn finish_init(
        &self,
        fence: Fence,
        generation: u64,
        run_id: &str,
        wall: SystemTime,
    ) -> impl Future<Output = Result<WriteResult, StoreError>> + Send;
    fn put_member(
        &self,
        fence: Fence,
        record: &MemberRecord,
    ) -> impl Future<Output = Result<WriteResult, StoreError>> + Send;
    fn delete_member(
        &self,
        fence: Fence,
        instance_id: &str,
    ) -> impl Future<Output = Result<WriteResult, StoreError>> + Send;
    fn list_members(&self) -> impl Future<Output = Result<Vec<MemberRecord>, StoreError>> + Send;
    /// Points at new join material: fenced, and only if the pointer is still
    /// publication `pointer.seq - 1` (none yet, or one without a number, for 1).
    fn put_join(
        &self,
        fence: Fence,
        pointer: &JoinPointer,
    ) -> impl Future<Output = Result<WriteResult, StoreError>> + Send;
    fn read_join(&self) -> impl Future<Output = Result<Option<JoinPointer>, StoreError>> + Send;
    /// Records a refresh request where its origin may write (unconditional:
    /// the latest request of that origin wins).
    fn put_refresh(
        &self,
        request: &RefreshRequest,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The requests of both origins, each with the origin of where it was read.
    fn read_refresh(&self) -> impl Future<Output = Result<Vec<RefreshRequest>, StoreError>> + Send;
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{operation} refused: the {} lock no longer carries fence {}", fence.purpose, fence.value)]
    LockLost {
        operation: &'static str,
        fence: Fence,
    },
    #[error("{operation} refused: {reason}")]
    Conflict {
        operation: &'static str,
        reason: String,
    },
    #[error(transparent)]
    NotHeld(#[from] crate::lock::Error),
    #[error(
        "{operation} must be fenced by the {expected} lock, not the {got} lock (a kubeboot bug)"
    )]
    WrongLock {
        operation: &'static str,
        expected: &'static str,
        got: crate::lock::Purpose,
    },
    #[error("registry {operation}: {source}")]
    Store {
        operation: &'static str,
        source: StoreError,
    },
}

impl Error {
    /// The AWS call behind this error when it is weather, not a refusal.
    pub fn weather(&self) -> Option<crate::retry::AwsCall> {
        match self {
            Error::Store { source, .. } => source.weather(),
            Error::NotHeld(e) => e.weather(),
            _ => None,
        }
    }
}

/// The fence of `guard`, if it is one of the locks allowed to fence `operation`.
fn fence_for(
    guard: &Guard,
    operation: &'static str,
    allowed: &[Purpose],
    expected: &'static str,
) -> Result<Fence, Error> {
    if !allowed.contains(&guard.purpose()) {
        return Err(Error::WrongLock {
            operation,
            expected,
            got: guard.purpose(),
        });
    }
    Ok(guard.fence()?)
}

/// The registry of one cluster.
pub struct Registry<S> {
    store: Arc<S>,
}

impl<S: RegistryStore> Registry<S> {
    pub fn new(store: Arc<S>) -> Self {
        Registry { store }
    }

    /// The STATE record (`uninitialized`, generation 0, when absent).
    pub async fn state(&self) -> Result<ClusterState, Error> {
        self.store
            .read_state()
            .await
            .map(|s| s.unwrap_or_else(ClusterState::uninitialized))
            .map_err(|source| Error::Store {
                operation: "read state",
                source,
            })
    }

    /// Every MEMBER record.
    pub async fn members(&self) -> Result<Vec<MemberRecord>, Error> {
        self.store
            .list_members()
            .await
            .map_err(|source| Error::Store {
                operation: "list members",
                source,
            })
    }

    /// The pointer to the current join material, if any was published.
    pub async fn join_pointer(&self) -> Result<Option<JoinPointer>, Error> {
        self.store.read_join().await.map_err(|source| Error::Store {
            operation: "read join pointer",
            source,
        })
    }

    /// Asks the leader for fresh join material (see [`RefreshRequest`]).
    pub async fn request_refresh(&self, request: &RefreshRequest) -> Result<(), Error> {
        self.store
            .put_refresh(request)
            .await
            .map_err(|source| Error::Store {
                operation: "request join material refresh",
                source,
            })
    }

    /// The latest refresh request of each origin (at most two).
    pub async fn refresh_requests(&self) -> Result<Vec<RefreshRequest>, Error> {
        self.store
            .read_refresh()
            .await
            .map_err(|source| Error::Store {
                operation: "read refresh request",
                source,
            })
    }

    /// The latest refresh request of any origin, if any was made.
    pub async fn refresh_request(&self) -> Result<Option<RefreshRequest>, Error> {
        Ok(self
            .refresh_requests()
            .await?
            .into_iter()
            .max_by_key(|r| r.requested_at))
    }

    /// Makes `pointer` the current join material (fenced: a holder that lost
    /// its lock cannot make its freshly written secret version current).
    pub async fn publish_join(&self, guard: &Guard, pointer: &JoinPointer) -> Result<(), Error> {
        let fence = fence_for(
            guard,
            "publish join pointer",
            &[Purpose::Init, Purpose::Leader],
            "init or leader",
        )?;
        self.fenced(
            guard,
            "publish join pointer",
            fence,
            || self.store.put_join(fence, pointer),
            || async {
                let current = self.join_pointer().await?;
                Ok(current.is_some_and(|p| {
                    p.seq == pointer.seq && p.secret_version == pointer.secret_version
                }))
            },
        )
        .await
    }

    /// Starts a new init generation after `current` (fenced by the init lock); returns it.
    pub async fn begin_init(
        &self,
        guard: &Guard,
        current: &ClusterState,
        claim: &InitClaim,
    ) -> Result<u64, Error> {
        if current.phase == Phase::Initialized && claim.restored_from.is_none() {
            return Err(Error::Conflict {
                operation: "begin init",
                reason: "the cluster is already initialized".into(),
            });
        }
        let fence = fence_for(guard, "begin init", &[Purpose::Init], "init")?;
        let next = current.generation + 1;
        let applied = |s: &ClusterState| {
            s.init_run_id.as_deref() == Some(claim.run_id.as_str()) && s.generation == next
        };
        self.fenced(
            guard,
            "begin init",
            fence,
            || self.store.begin_init(fence, current.generation, claim),
            || async { Ok(applied(&self.state().await?)) },
        )
        .await?;
        Ok(next)
    }

    /// Marks `generation` initialized (fenced by the init lock).
    pub async fn mark_initialized(
        &self,
        guard: &Guard,
        generation: u64,
        run_id: &str,
        wall: SystemTime,
    ) -> Result<(), Error> {
        let fence = fence_for(guard, "mark initialized", &[Purpose::Init], "init")?;
        self.fenced(
            guard,
            "mark initialized",
            fence,
            || self.store.finish_init(fence, generation, run_id, wall),
            || async {
                let s = self.state().await?;
                Ok(s.phase == Phase::Initialized && s.init_run_id.as_deref() == Some(run_id))
            },
        )
        .await
    }

    /// Records a confirmed member (fenced by the lock the caller holds).
    pub async fn record_member(&self, guard: &Guard, record: &MemberRecord) -> Result<(), Error> {
        let fence = fence_for(
            guard,
            "record member",
            &[Purpose::Init, Purpose::Membership],
            "init or membership",
        )?;
        self.fenced(
            guard,
            "record member",
            fence,
            || self.store.put_member(fence, record),
            || async {
                let all = self.members().await?;
                Ok(all.iter().any(|m| {
                    m.instance_id == record.instance_id && m.member_id == record.member_id
                }))
            },
        )
        .await
    }

    /// Deletes a member record (fenced).
    pub async fn forget_member(&self, guard: &Guard, instance_id: &str) -> Result<(), Error> {
        let fence = fence_for(
            guard,
            "forget member",
            &[Purpose::Init, Purpose::Membership],
            "init or membership",
        )?;
        self.fenced(
            guard,
            "forget member",
            fence,
            || self.store.delete_member(fence, instance_id),
            || async {
                let all = self.members().await?;
                Ok(all.iter().all(|m| m.instance_id != instance_id))
            },
        )
        .await
    }

    /// One fenced write. A refused fence tells the guard it lost; a refused
    /// condition is read back (it may be our own earlier attempt); a failure
    /// that may have applied (timeout, or throttled after an attempt whose
    /// answer was lost) is read back and written again only if it did not.
    async fn fenced<W, WF, R, RF>(
        &self,
        guard: &Guard,
        operation: &'static str,
        fence: Fence,
        write: W,
        read_back: R,
    ) -> Result<(), Error>
    where
        W: Fn() -> WF,
        WF: Future<Output = Result<WriteResult, StoreError>>,
        R: Fn() -> RF,
        RF: Future<Output = Result<bool, Error>>,
    {
        use crate::retry::Attempt::{Again, Stop};
        crate::retry::with_attempts(operation, FENCED_FIRST_DELAY, FENCED_ATTEMPTS, || async {
            match write().await {
                Ok(WriteResult::Applied) => Ok(()),
                Ok(WriteResult::FenceRejected) => {
                    guard.mark_lost(format!(
                        "{operation} was refused: fence {} is stale",
                        fence.value
                    ));
                    Err(Stop(Error::LockLost { operation, fence }))
                }
                Ok(WriteResult::ConditionFailed) => {
                    if read_back().await.map_err(Stop)? {
                        tracing::info!(
                            operation,
                            "condition failed against our own earlier attempt (read back)"
                        );
                        return Ok(());
                    }
                    Err(Stop(Error::Conflict {
                        operation,
                        reason: "the record is not in the expected state".into(),
                    }))
                }
                Err(e) if e.class == StoreErrorClass::Permanent => Err(Stop(Error::Store {
                    operation,
                    source: e,
                })),
                Err(e) => {
                    if read_back().await.map_err(Stop)? {
                        tracing::info!(operation, error = %e, "write reported failure but had applied (read back)");
                        return Ok(());
                    }
                    // Provably not applied: another attempt, while the lock is ours.
                    guard.fence().map_err(|e| Stop(e.into()))?;
                    Err(Again(Error::Store {
                        operation,
                        source: e,
                    }))
                }
            }
        })
        .await
    }
}

/// Attempts of a fenced write whose answer said it did not apply (read
/// back), and the pause after the first, doubled each time: a transaction
/// conflict or throttling passes in moments.
const FENCED_ATTEMPTS: usize = 5;
const FENCED_FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        use crate::lock::StoreErrorClass as C;
        match self {
            // A refused fence is the lock lost, whoever noticed first.
            E::LockLost { .. } => &crate::catalogue::LOCK_LOST,
            E::Conflict { .. } => &crate::catalogue::REG_CONFLICT,
            E::NotHeld(e) => e.entry(),
            E::WrongLock { .. } => &crate::catalogue::REG_WRONG_LOCK,
            E::Store { source, .. } => match source.class {
                C::Permanent => &crate::catalogue::REG_STORE_DENIED,
                C::Transient | C::OutcomeUnknown => &crate::catalogue::REG_STORE_UNAVAILABLE,
            },
        }
    }
}
