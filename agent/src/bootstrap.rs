//! `kubeboot bootstrap`: turns a fresh instance into a cluster member, once.
//!
//! Control plane, cluster uninitialized: take the `init` lock, re-read the
//! cluster record, start a new generation (fenced), run `kubeadm init`,
//! publish join material (fenced), confirm the local etcd member and record
//! it (fenced), mark the cluster initialized (fenced), release.
//! Control plane, cluster initialized: take the `membership` lock, remove
//! orphan learners and this node's own leftover member, refuse to add into an
//! unhealthy cluster, `kubeadm join --control-plane`, confirm, record, release.
//! Worker: wait for the cluster to be initialized, `kubeadm join`, wait for
//! the Node to be `Ready` through the API.
//!
//! Join material that runs out within its margin is never handed to kubeadm:
//! the joiner records a refresh request and waits (`timeouts.join_material`).
//!
//! Recovery (I4): the durable truth is DynamoDB and etcd. A local checkpoint
//! file records the run and whether it finished; an unfinished local attempt
//! is cleaned with `kubeadm reset` and its path runs again (an interrupted
//! init starts a new generation, so its half-made generation can never be
//! marked initialized).

use crate::config::{value, Role};
use crate::context::Context;
use crate::etcd::{self, Etcd, Stale};
use crate::join_material::{self, JoinMaterial, Refresh};
use crate::kubeadm::{self, config as kcfg};
use crate::lock::{Guard, LockStore, Purpose};
use crate::registry::{
    InitClaim, MemberRecord, Origin, Phase, RefreshRequest, RegistryStore, Wants,
};
use crate::retry::{self, Classify, RetryClass, WaitPolicy};
use crate::telemetry;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument;

use crate::failpoint::crash_point;

/// Every crash point, in the order bootstrap passes them.
pub const CRASH_POINTS: &[&str] = &[
    "init:after-begin",
    "init:after-kubeadm",
    "init:after-publish",
    "init:after-record",
    "init:after-mark",
    "join:after-cleanup",
    "join:after-kubeadm",
    "join:after-record",
    "worker:after-kubeadm",
    "worker:after-joined",
];

/// Once a node knows it joins an initialized cluster, every line it logs
/// names the init run that started the generation: one Logs Insights query
/// (`filter run_id = X or init_run_id = X`) finds the cluster's whole story.
fn note_generation(state: &crate::registry::ClusterState) {
    if let (Phase::Initialized, Some(init_run_id)) = (state.phase, &state.init_run_id) {
        telemetry::set_context(telemetry::ContextKey::InitRunId, init_run_id.clone());
        tracing::info!(
            generation = state.generation,
            "joining an initialized cluster"
        );
    }
}

/// Which way this node joins the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    Init,
    ControlPlaneJoin,
    WorkerJoin,
}

impl Path {
    /// The name used in logs and as the metrics' `Path` dimension.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Init => "init",
            Path::ControlPlaneJoin => "control-plane-join",
            Path::WorkerJoin => "worker-join",
        }
    }
}

/// Whether `previous` ran `kubeadm init` for a generation that did not
/// become the cluster's: the initialized cluster was begun by another run.
/// Its local etcd is a one-member cluster of its own, never to be adopted.
fn abandoned_init(previous: &Checkpoint, state: &crate::registry::ClusterState) -> bool {
    previous.path == Some(Path::Init)
        && previous.kubeadm_started
        && state.phase == Phase::Initialized
        && state.init_run_id.as_deref() != Some(previous.run_id.as_str())
}

/// The local checkpoint (`<state_dir>/bootstrap.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub run_id: String,
    pub path: Option<Path>,
    /// kubeadm was started by this attempt: a restart must reset first.
    pub kubeadm_started: bool,
    /// `kubeadm join` finished (workers): a restart only waits for readiness.
    #[serde(default)]
    pub joined: bool,
    pub done: bool,
}

/// Bootstrap failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    JoinMaterial(#[from] join_material::Error),
    #[error(transparent)]
    Kubeadm(#[from] kubeadm::Error),
    #[error(transparent)]
    Etcd(#[from] etcd::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::Error),
    #[error(transparent)]
    Membership(#[from] crate::membership::Error),
    #[error(transparent)]
    Restore(#[from] crate::restore::Error),
    #[error("cannot use the checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the cluster is not ready for this node yet: {0}")]
    NotReady(String),
    #[error("{0}")]
    StaleMaterial(String),
    #[error("no usable join material within {} (timeouts.join_material); last: {last}", value::format_duration(*waited))]
    MaterialDeadline { waited: Duration, last: String },
    #[error("lost the {0} lock while working; the step is retried from the start")]
    LockLost(Purpose),
    #[error("stopped (SIGTERM) before bootstrap finished; the next start resumes")]
    Stopped,
    #[error("{step}: AWS kept throttling or failing {} {} beyond the SDK's attempts for {} ({bound}); last: {last}", call.service, call.operation, value::format_duration(*waited))]
    AwsWeather {
        step: &'static str,
        /// The configuration key whose deadline ran out.
        bound: &'static str,
        waited: Duration,
        call: retry::AwsCall,
        last: String,
    },
}

impl Error {
    /// The AWS call behind a failure that is AWS weather (throttling, 5xx,
    /// an attempt timeout or a dispatch failure after the SDK's attempts),
    /// which a bootstrap step waits out within its deadline.
    pub fn weather(&self) -> Option<retry::AwsCall> {
        match self {
            Error::Lock(e) => e.weather(),
            Error::Registry(e) => e.weather(),
            Error::JoinMaterial(e) => e.weather(),
            _ => None,
        }
    }
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::NotReady(_) | Error::StaleMaterial(_) => RetryClass::Transient,
            e if e.weather().is_some() => RetryClass::Transient,
            _ => RetryClass::Permanent,
        }
    }
}

/// Which configured deadline bounds a bootstrap step's wait through AWS
/// weather.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// `lock.acquire_timeout`: how long bootstrap waits for a lock, and so
    /// for the cluster record it reads before and writes under one.
    Lock,
    /// `timeouts.join_material`: how long a joiner waits for usable material.
    JoinMaterial,
}

impl Bound {
    fn key(self) -> &'static str {
        match self {
            Bound::Lock => "lock.acquire_timeout",
            Bound::JoinMaterial => "timeouts.join_material",
        }
    }
}

/// A step's error as [`retry::with_retries`] sees it: with `only_weather`,
/// only AWS weather is worth another attempt (not a stale material or a
/// cluster that is not ready, which the caller handles).
struct StepError {
    error: Error,
    only_weather: bool,
}

impl Classify for StepError {
    fn retry_class(&self) -> RetryClass {
        if self.only_weather && self.error.weather().is_none() {
            RetryClass::Permanent
        } else {
            self.error.retry_class()
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Pauses between attempts of a step waiting out AWS weather.
const STEP_FIRST_DELAY: Duration = Duration::from_secs(1);
const STEP_MAX_DELAY: Duration = Duration::from_secs(15);
/// Attempts of one step: far more than its deadline allows at these pauses,
/// so the deadline ends the wait; explicit all the same.
const STEP_MAX_ATTEMPTS: usize = 10_000;

/// What bootstrap works with: the node's context; generic over the stores
/// so tests can inject faults.
pub struct Bootstrap<L: LockStore, R: RegistryStore> {
    pub ctx: Context<L, R>,
}

impl<L: LockStore, R: RegistryStore> Bootstrap<L, R> {
    fn bound(&self, bound: Bound) -> Duration {
        match bound {
            Bound::Lock => self.ctx.cfg.lock.acquire_timeout,
            Bound::JoinMaterial => self.ctx.cfg.timeouts.join_material,
        }
    }

    /// Runs one bootstrap step (a few AWS calls, e.g. "read the cluster
    /// state") and, while it fails with AWS weather, runs it again with
    /// backoff until `bound`'s deadline, from now: each such failure is
    /// counted and logged at warn. Anything else ends the step at once.
    /// The SDK's own retries stay inside each call; this is the step's wait.
    async fn step<T, F, Fut>(&self, what: &'static str, bound: Bound, op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + self.bound(bound);
        self.wait_through(what, bound, deadline, true, op, |_, _| None)
            .await
    }

    /// [`Self::step`] with its deadline given, also retrying what
    /// `only_weather = false` lets [`Error::retry_class`] retry; at the
    /// deadline, AWS weather as the last failure gives
    /// [`Error::AwsWeather`], anything else `on_deadline(waited, last)`.
    async fn wait_through<T, F, Fut>(
        &self,
        what: &'static str,
        bound: Bound,
        deadline: Instant,
        only_weather: bool,
        mut op: F,
        on_deadline: impl FnOnce(Duration, Option<String>) -> Option<Error>,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let policy = WaitPolicy {
            first_delay: STEP_FIRST_DELAY,
            max_delay: STEP_MAX_DELAY,
            max_attempts: STEP_MAX_ATTEMPTS,
            deadline: Some(deadline.saturating_duration_since(started)),
        };
        let last_weather = std::sync::Mutex::new(None::<retry::AwsCall>);
        let result = retry::with_retries(what, &policy, || {
            let attempt = op();
            let last_weather = &last_weather;
            async move {
                attempt.await.map_err(|error| {
                    let call = error.weather();
                    if let Some(call) = call {
                        retry::note_weather(what, call, &error);
                    }
                    if let Ok(mut l) = last_weather.lock() {
                        *l = call;
                    }
                    StepError {
                        error,
                        only_weather,
                    }
                })
            }
        })
        .await;
        match result {
            Ok(v) => Ok(v),
            Err(retry::RetryError::Failed(e)) => Err(e.error),
            Err(retry::RetryError::Deadline { last, .. }) => {
                let waited = started.elapsed();
                let weather = last_weather.lock().ok().and_then(|l| *l);
                match weather {
                    Some(call) => Err(Error::AwsWeather {
                        step: what,
                        bound: bound.key(),
                        waited,
                        call,
                        last: last.unwrap_or_else(|| "no answer".into()),
                    }),
                    None => Err(on_deadline(waited, last.clone()).unwrap_or_else(|| {
                        Error::NotReady(format!(
                            "{what}: no answer within {} ({}); last: {}",
                            value::format_duration(waited),
                            bound.key(),
                            last.unwrap_or_else(|| "none".into())
                        ))
                    })),
                }
            }
        }
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.ctx.cfg.paths.state_dir.join("bootstrap.json")
    }

    /// The path the last attempt chose, as its checkpoint says (for the
    /// failure metric: which path failed).
    pub fn attempted_path(&self) -> Option<Path> {
        self.load_checkpoint().ok().flatten().and_then(|c| c.path)
    }

    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        let path = self.checkpoint_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Checkpoint {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Checkpoint {
                path,
                reason: e.to_string(),
            }),
        }
    }

    fn save_checkpoint(&self, c: &Checkpoint) -> Result<(), Error> {
        let path = self.checkpoint_path();
        let fail = |e: std::io::Error| Error::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.ctx.cfg.paths.state_dir).map_err(fail)?;
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(c).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // Durable before it counts: the file's data, then its name in the
        // directory (a power loss must not leave an empty or old checkpoint
        // that tells the next boot to reset a member that joined).
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        std::io::Write::write_all(&mut f, &body).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(fail)?;
        std::fs::File::open(&self.ctx.cfg.paths.state_dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)
    }

    /// Runs bootstrap to completion (or to an error that systemd's restart retries).
    pub async fn run(&self) -> Result<Checkpoint, Error> {
        let previous = self.load_checkpoint()?;
        if let Some(c) = previous.as_ref().filter(|c| c.done) {
            tracing::info!(run_id = %c.run_id, "already bootstrapped; nothing to do");
            return Ok(c.clone());
        }
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        telemetry::set_context(telemetry::ContextKey::RunId, run_id.clone());
        self.check_kubeadm_version().await?;
        if self.ctx.cfg.paths.kubernetes_dir != std::path::Path::new(KUBEADM_DIR) {
            tracing::warn!(kubernetes_dir = %self.ctx.cfg.paths.kubernetes_dir.display(), "paths.kubernetes_dir is not {KUBEADM_DIR}: kubeadm takes only its pki/ from it and writes its kubeconfigs to {KUBEADM_DIR} regardless (a setting for tests and the simulation)");
        }
        let mut checkpoint = Checkpoint {
            run_id,
            path: None,
            kubeadm_started: false,
            joined: false,
            done: false,
        };
        let joined_worker = self.ctx.cfg.node.role == Role::Worker
            && previous
                .as_ref()
                .is_some_and(|c| c.kubeadm_started && c.joined);
        if joined_worker {
            tracing::info!("an earlier attempt joined this worker; waiting for readiness only");
            checkpoint.kubeadm_started = true;
            checkpoint.joined = true;
        } else if let Some(previous) = previous.as_ref().filter(|c| c.kubeadm_started) {
            if self.ctx.cfg.node.role == Role::ControlPlane
                && self.adopt_own_member(previous).await?
            {
                checkpoint.path = previous.path;
                if previous.path == Some(Path::Init) {
                    // The attempt may have died between marking the cluster
                    // initialized and applying the add-ons: nothing else
                    // would apply them before the leader's first turn.
                    let state = self
                        .step("read the cluster state", Bound::Lock, || async {
                            Ok(self.ctx.registry.state().await?)
                        })
                        .await?;
                    self.apply_addons(state.generation).await;
                }
                checkpoint.done = true;
                self.save_checkpoint(&checkpoint)?;
                tracing::info!("an earlier attempt had finished joining; its member is adopted");
                return Ok(checkpoint);
            }
            tracing::warn!(
                "an earlier attempt ran kubeadm and did not finish: resetting this node first"
            );
            self.reset().await?;
        }
        self.save_checkpoint(&checkpoint)?;
        let path = match self.ctx.cfg.node.role {
            // A worker learns the generation when it looks for join material.
            Role::Worker => Path::WorkerJoin,
            Role::ControlPlane => {
                let state = self
                    .step("read the cluster state", Bound::Lock, || async {
                        Ok(self.ctx.registry.state().await?)
                    })
                    .await?;
                note_generation(&state);
                match state.phase {
                    Phase::Initialized => Path::ControlPlaneJoin,
                    _ => Path::Init,
                }
            }
        };
        checkpoint.path = Some(path);
        match path {
            Path::Init => self.init_or_join(&mut checkpoint).await?,
            Path::ControlPlaneJoin => self.control_plane_join(&mut checkpoint).await?,
            Path::WorkerJoin => self.worker_join(&mut checkpoint).await?,
        }
        checkpoint.done = true;
        self.save_checkpoint(&checkpoint)?;
        tracing::info!(path = ?checkpoint.path, "bootstrap complete");
        Ok(checkpoint)
    }

    /// The image's kubeadm is the cluster's release, before any lock,
    /// reset or kubeadm run (KB-KUBEADM-006 otherwise, exit 2). `restore`
    /// checks the same among its refusals, before its download.
    pub(crate) async fn check_kubeadm_version(&self) -> Result<(), Error> {
        let wanted = &self.ctx.cfg.cluster.kubernetes_version;
        let printed = self.ctx.kubeadm.check_version(wanted).await?;
        tracing::info!(kubeadm = %printed, "kubeadm is the cluster's Kubernetes version");
        Ok(())
    }

    /// After a crash or a reboot mid-bootstrap: adopt this node's etcd
    /// member (the earlier attempt got that far: record it if the crash came
    /// first) instead of resetting it. Returns false when the node must be
    /// reset.
    ///
    /// Only a member of the recorded cluster is adopted: its id is the one
    /// recorded for this instance or, when the crash came before the record,
    /// its member list holds a member recorded for another instance. A
    /// one-member etcd of an init that another node took over is not, and
    /// is reset (recording it would put a second cluster in the registry).
    ///
    /// A member recorded as this node's is never reset on a mere timeout
    /// (etcd can be slow after a reboot): only when the other recorded
    /// members answer without it is it gone. Otherwise bootstrap fails and
    /// systemd retries later.
    async fn adopt_own_member(&self, previous: &Checkpoint) -> Result<bool, Error> {
        let state = self
            .step("read the cluster state", Bound::Lock, || async {
                Ok(self.ctx.registry.state().await?)
            })
            .await?;
        if state.phase != Phase::Initialized {
            return Ok(false);
        }
        let settings = self.etcd_settings();
        let peer_url = settings.peer_url(&self.ctx.identity.private_ip);
        let records = self.read_members().await?;
        let me = &self.ctx.identity.instance_id;
        let own_record = records
            .iter()
            .find(|r| &r.instance_id == me && r.peer_url == peer_url);
        // A recorded member, or one whose data is on this disk (a power loss
        // after the join, before the record), gets the full promotion window
        // to come back: after a reboot the kubelet starts etcd late.
        let has_data = std::fs::read_dir(&self.ctx.cfg.paths.etcd_data_dir)
            .is_ok_and(|mut d| d.next().is_some());
        if own_record.is_none() && abandoned_init(previous, &state) {
            // This node's own `kubeadm init` made that data, and another
            // node's init took the cluster over: its member can never be
            // adopted, so there is nothing to wait the promotion window for.
            tracing::warn!(generation = state.generation, "an earlier attempt of this node ran kubeadm init, and the cluster was initialized by another run: its local etcd data is of an abandoned generation; reset, not adopted");
            return Ok(false);
        }
        let wait = if own_record.is_some() || has_data {
            self.ctx.cfg.etcd.promote_timeout
        } else {
            Duration::from_secs(5)
        };
        match self.local_member(&settings, &peer_url, wait).await {
            Ok((member, ids)) => {
                let of_recorded_cluster = match own_record {
                    Some(r) => r.member_id == member.id,
                    None => ids.iter().any(|id| {
                        records
                            .iter()
                            .any(|r| &r.instance_id != me && r.member_id == *id)
                    }),
                };
                if !of_recorded_cluster {
                    tracing::warn!(member_id = %member.hex_id(), "the local etcd member is not of the recorded cluster (another node's init took over); it is reset, not adopted");
                    return Ok(false);
                }
                if own_record.is_none() {
                    let guard = self.ctx.locker.acquire(Purpose::Membership).await?;
                    guard
                        .scoped(async |guard| self.confirm_and_record(guard).await)
                        .await?;
                }
                Ok(true)
            }
            Err(why) => {
                let Some(record) = own_record else {
                    return Ok(false);
                };
                let id = crate::etcd::MemberHex(record.member_id).to_string();
                let others = self.others_client_urls(&records, &settings);
                let keep = |reason: String| {
                    Err(Error::NotReady(format!(
                        "this node's etcd member {id} is recorded as the cluster's and did not answer within {} ({why}); {reason}: not resetting it",
                        value::format_duration(wait)
                    )))
                };
                if others.is_empty() {
                    return keep("it is the only recorded member".into());
                }
                let listed = match Etcd::connect_any(&others, &settings).await {
                    Ok(etcd) => etcd.members().await,
                    Err(e) => Err(e),
                };
                match listed {
                    Ok(members) if members.iter().all(|m| m.id != record.member_id) => {
                        tracing::warn!(member_id = %id, "this node's recorded etcd member is no longer in the cluster; resetting");
                        Ok(false)
                    }
                    Ok(_) => keep("the other members still list it".into()),
                    Err(e) => keep(format!("the other members could not be asked ({e})")),
                }
            }
        }
    }

    /// The client URLs of the members recorded for other instances.
    fn others_client_urls(
        &self,
        records: &[MemberRecord],
        settings: &etcd::Settings,
    ) -> Vec<String> {
        let me = &self.ctx.identity.instance_id;
        records
            .iter()
            .filter(|r| &r.instance_id != me)
            .filter_map(|r| etcd::host_of(&r.peer_url).map(|h| settings.client_url(h)))
            .collect()
    }

    /// This node's own etcd member, confirmed (started, voting, healthy)
    /// through its own client URL within `wait`, and the ids its member
    /// list holds.
    async fn local_member(
        &self,
        settings: &etcd::Settings,
        peer_url: &str,
        wait: Duration,
    ) -> Result<(etcd::Member, Vec<u64>), etcd::Error> {
        let etcd = Etcd::connect(
            &[settings.client_url(&self.ctx.identity.private_ip)],
            settings,
        )
        .await?;
        let member = etcd.confirm(peer_url, wait).await?;
        let ids = etcd.members().await?.iter().map(|m| m.id).collect();
        Ok((member, ids))
    }

    /// `kubeadm reset` of an unfinished attempt. On a control plane it
    /// changes etcd membership (kubeadm removes the node's member), so it
    /// runs under the `membership` lock, and this node's member, if the
    /// other recorded members still list it, goes first through the quorum
    /// guard (refused: nothing is reset, systemd retries later).
    async fn reset(&self) -> Result<(), Error> {
        if self.ctx.cfg.node.role != Role::ControlPlane {
            self.ctx.kubeadm.reset().await?;
            return Ok(());
        }
        let guard = self.lock(Purpose::Membership, "membership-lock").await?;
        guard
            .scoped(async |guard| {
                self.remove_own_member(guard).await?;
                self.ctx.kubeadm.reset().await?;
                Ok(())
            })
            .await
    }

    /// Removes this node's member through the other recorded members, under
    /// the quorum guard; nothing to do when they cannot be reached (the
    /// reconciler removes what is left) or do not list it.
    async fn remove_own_member(&self, guard: &Guard) -> Result<(), Error> {
        let settings = self.etcd_settings();
        let peer_url = settings.peer_url(&self.ctx.identity.private_ip);
        let others: Vec<String> = self
            .read_members()
            .await?
            .iter()
            .filter(|r| r.instance_id != self.ctx.identity.instance_id && r.peer_url != peer_url)
            .filter_map(|r| etcd::host_of(&r.peer_url).map(|h| settings.client_url(h)))
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let Ok(etcd) = Etcd::connect_any(&others, &settings).await else {
            tracing::warn!(
                "no other recorded etcd member answers; kubeadm reset removes what it can"
            );
            return Ok(());
        };
        let members = etcd.members().await?;
        let Some(own) = etcd::find_by_peer_url(&members, &peer_url) else {
            return Ok(());
        };
        let target = crate::membership::Target::Member(own.id);
        crate::membership::remove_locked(&etcd, &self.ctx.registry, guard, &target, false).await?;
        Ok(())
    }

    fn node(&self) -> kcfg::Node {
        kcfg::Node {
            name: self.ctx.identity.hostname.clone(),
            ip: self.ctx.identity.private_ip.clone(),
            provider_id: kcfg::provider_id(
                &self.ctx.identity.availability_zone,
                &self.ctx.identity.instance_id,
            ),
        }
    }

    fn etcd_settings(&self) -> etcd::Settings {
        etcd::Settings::from_config(&self.ctx.cfg)
    }

    /// Runs `work` unless the lock is lost first.
    async fn guarded<T, F: std::future::Future<Output = Result<T, Error>>>(
        &self,
        guard: &Guard,
        work: F,
    ) -> Result<T, Error> {
        tokio::select! {
            r = work => r,
            _ = guard.lost() => Err(Error::LockLost(guard.purpose())),
        }
    }

    /// Waits for `purpose`'s lock; the wait is the log's `phase` span.
    async fn lock(&self, purpose: Purpose, phase: &'static str) -> Result<Guard, Error> {
        Ok(self
            .ctx
            .locker
            .acquire(purpose)
            .instrument(telemetry::phase(phase))
            .await?)
    }

    async fn init_or_join(&self, checkpoint: &mut Checkpoint) -> Result<(), Error> {
        let guard = self.lock(Purpose::Init, "init-lock").await?;
        let state = self
            .step("read the cluster state", Bound::Lock, || async {
                Ok(self.ctx.registry.state().await?)
            })
            .await;
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                let _ = guard.release().await;
                return Err(e);
            }
        };
        if state.phase == Phase::Initialized {
            note_generation(&state);
            tracing::info!("another node initialized the cluster while we waited; joining instead");
            guard.release().await?;
            checkpoint.path = Some(Path::ControlPlaneJoin);
            return self.control_plane_join(checkpoint).await;
        }
        if let Some(snapshot) = &state.restored_from {
            // An empty init now would lose the restored data for good.
            let _ = guard.release().await;
            return Err(crate::restore::Error::Unfinished {
                snapshot: snapshot.clone(),
                generation: state.generation,
            }
            .into());
        }
        let result = self
            .init(&guard, &state, checkpoint, None)
            .await
            .map(|_| ());
        match result {
            Ok(()) => {
                // The cluster is initialized: a release lost to AWS weather
                // must not fail it (the lease runs out by itself).
                if let Err(e) = guard.release().await {
                    if e.weather().is_none() {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %e, "could not release the init lock (AWS weather); it expires with its lease");
                }
                Ok(())
            }
            Err(e) => {
                let _ = guard.release().await;
                Err(e)
            }
        }
    }

    /// `kubeboot restore` on this control plane: under the `init` lock, a
    /// new generation named for the snapshot (over an initialized one too),
    /// this node reset, the backup laid down, then the rest of an init
    /// (`kubeadm init` over the restored data, publish, confirm, record,
    /// mark initialized). The other control planes join it as usual.
    /// Returns the checkpoint and the new generation.
    pub async fn restore(
        &self,
        prepared: &crate::restore::Prepared,
    ) -> Result<(Checkpoint, u64), Error> {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        telemetry::set_context(telemetry::ContextKey::RunId, run_id.clone());
        let mut checkpoint = Checkpoint {
            run_id,
            path: Some(Path::Init),
            kubeadm_started: false,
            joined: false,
            done: false,
        };
        let guard = self.lock(Purpose::Init, "init-lock").await?;
        let generation = guard
            .scoped(async |guard| {
                let state = self
                    .step("read the cluster state", Bound::Lock, || async {
                        Ok(self.ctx.registry.state().await?)
                    })
                    .await?;
                tracing::warn!(
                    generation = state.generation,
                    phase = state.phase.as_str(),
                    snapshot = %prepared.uri,
                    "restoring: a new cluster generation replaces this one"
                );
                self.init(guard, &state, &mut checkpoint, Some(prepared))
                    .await
            })
            .await?;
        checkpoint.done = true;
        self.save_checkpoint(&checkpoint)?;
        Ok((checkpoint, generation))
    }

    async fn init(
        &self,
        guard: &Guard,
        state: &crate::registry::ClusterState,
        checkpoint: &mut Checkpoint,
        restore: Option<&crate::restore::Prepared>,
    ) -> Result<u64, Error> {
        let cfg = &self.ctx.cfg;
        let claim = InitClaim {
            run_id: checkpoint.run_id.clone(),
            initialized_by: self.ctx.locker.owner().as_str().to_string(),
            endpoint: cfg.cluster.control_plane_endpoint.clone(),
            kubernetes_version: cfg.cluster.kubernetes_version.clone(),
            wall: SystemTime::now(),
            restored_from: restore.map(|p| p.manifest.key.clone()),
        };
        let generation = self
            .step("start a new generation", Bound::Lock, || async {
                Ok(self.ctx.registry.begin_init(guard, state, &claim).await?)
            })
            .await?;
        telemetry::set_context(telemetry::ContextKey::InitRunId, checkpoint.run_id.clone());
        tracing::info!(generation, "starting a new cluster generation");
        crash_point("init:after-begin");
        // A new generation is a new etcd cluster: members recorded for an
        // abandoned generation are gone with it.
        for stale in self.read_members().await? {
            tracing::warn!(instance_id = %stale.instance_id, member_id = %crate::etcd::MemberHex(stale.member_id), "forgetting a member of an abandoned generation");
            self.step("forget a member record", Bound::Lock, || async {
                Ok(self
                    .ctx
                    .registry
                    .forget_member(guard, &stale.instance_id)
                    .await?)
            })
            .await?;
        }
        let now = SystemTime::now();
        let token = join_material::generate_token();
        let key = join_material::generate_certificate_key();
        let rendered = kcfg::render_init(&kcfg::InitParams {
            node: self.node(),
            cluster_name: cfg.cluster.name.clone(),
            kubernetes_version: cfg.cluster.kubernetes_version.clone(),
            control_plane_endpoint: cfg.cluster.control_plane_endpoint.clone(),
            pod_subnet: cfg.cluster.pod_subnet.clone(),
            service_subnet: cfg.cluster.service_subnet.clone(),
            dns_domain: cfg.cluster.dns_domain.clone(),
            service_account_issuer: cfg.cluster.service_account_issuer.clone(),
            etcd_data_dir: cfg.paths.etcd_data_dir.display().to_string(),
            kubernetes_dir: cfg.paths.kubernetes_dir.display().to_string(),
            token: token.clone(),
            token_ttl: join_material::TOKEN_TTL,
            certificate_key: key.clone(),
        });
        // Saved before kubeadm (or a restore's reset) touches the node: an
        // attempt cut short leaves a node that is reset next.
        checkpoint.kubeadm_started = true;
        self.save_checkpoint(checkpoint)?;
        let mut ignore = None;
        if let Some(prepared) = restore {
            // Whatever this node ran before (an attempt, a member of the
            // lost cluster) goes: kubeadm reset empties the data directory
            // and pki/ the backup is laid into.
            self.guarded(guard, async { Ok(self.ctx.kubeadm.reset().await?) })
                .await?;
            let settings = self.etcd_settings();
            let member = crate::restore::Member {
                name: self.node().name,
                peer_url: settings.peer_url(&self.ctx.identity.private_ip),
            };
            self.guarded(guard, async {
                Ok(crate::restore::lay_down(prepared, cfg, &member).await?)
            })
            .instrument(telemetry::phase("restore"))
            .await?;
            ignore = Some(crate::restore::data_dir_check(&cfg.paths.etcd_data_dir));
        }
        self.guarded(guard, async {
            Ok(self
                .ctx
                .kubeadm
                .init(&rendered, &[&token, &key], ignore.as_deref())
                .await?)
        })
        .instrument(telemetry::phase("kubeadm-init"))
        .await?;
        crash_point("init:after-kubeadm");
        let ca = std::fs::read(cfg.paths.kubernetes_dir.join("pki/ca.crt")).map_err(|e| {
            Error::Checkpoint {
                path: cfg.paths.kubernetes_dir.join("pki/ca.crt"),
                reason: format!("kubeadm init did not leave the cluster CA: {e}"),
            }
        })?;
        let material = JoinMaterial {
            token,
            certificate_key: Some(key),
            ca_cert_hashes: vec![join_material::ca_cert_hash(&ca)?],
            endpoint: cfg.cluster.control_plane_endpoint.clone(),
            token_expires_at: now + join_material::TOKEN_TTL,
            certs_expire_at: Some(now + join_material::CERTS_TTL),
        };
        self.publish(guard, &material).await?;
        crash_point("init:after-publish");
        self.confirm_and_record(guard).await?;
        crash_point("init:after-record");
        self.step("mark the cluster initialized", Bound::Lock, || async {
            Ok(self
                .ctx
                .registry
                .mark_initialized(guard, generation, &checkpoint.run_id, SystemTime::now())
                .await?)
        })
        .await?;
        crash_point("init:after-mark");
        tracing::info!(generation, "cluster initialized");
        self.publish_issuer().await;
        self.apply_addons(generation).await;
        Ok(generation)
    }

    /// The cluster add-ons, right after init: no Node is Ready before the
    /// pod network runs. A failure does not fail the init (the cluster is
    /// initialized and recorded): the leader's daemon applies them on its
    /// next turn, and joining workers wait for the network meanwhile.
    async fn apply_addons(&self, generation: u64) {
        match crate::addons::apply_from_config(&self.ctx.cfg, &self.ctx.identity.region, generation)
            .instrument(telemetry::phase("addons"))
            .await
        {
            Ok(applied) => tracing::info!(
                generation,
                objects = applied.objects.len(),
                addons = ?crate::addons::selected(&self.ctx.cfg),
                "cluster add-ons applied"
            ),
            Err(e) => crate::catalogue::report!(
                warn,
                e,
                "cannot apply the cluster add-ons; the leader retries on its next turn"
            ),
        }
    }

    /// The service-account issuer's documents, right after init (or a
    /// restore) so IAM roles for service accounts work from the start. A
    /// failure does not fail the init: the leader's daemon publishes them
    /// on its next turn.
    async fn publish_issuer(&self) {
        let Some(publisher) = crate::issuer::Publisher::from_config(&self.ctx.aws, &self.ctx.cfg)
        else {
            return;
        };
        match publisher
            .publish()
            .instrument(telemetry::phase("publish-issuer"))
            .await
        {
            Ok(outcome) => {
                tracing::info!(
                    issuer = publisher.issuer(),
                    ?outcome,
                    "service-account issuer documents published"
                )
            }
            Err(e) => crate::catalogue::report!(
                warn,
                e,
                "cannot publish the service-account issuer's documents; the leader retries"
            ),
        }
    }

    /// I2: only a member etcd reports started, voting and healthy is recorded.
    async fn confirm_and_record(&self, guard: &Guard) -> Result<(), Error> {
        self.confirm_and_record_inner(guard)
            .instrument(telemetry::phase("confirm-member"))
            .await
    }

    async fn confirm_and_record_inner(&self, guard: &Guard) -> Result<(), Error> {
        let settings = self.etcd_settings();
        let own = settings.client_url(&self.ctx.identity.private_ip);
        let etcd = Etcd::connect(&[own], &settings).await?;
        let peer_url = settings.peer_url(&self.ctx.identity.private_ip);
        let member = etcd
            .confirm(&peer_url, self.ctx.cfg.etcd.promote_timeout)
            .await?;
        let record = MemberRecord {
            instance_id: self.ctx.identity.instance_id.clone(),
            member_id: member.id,
            name: member.name.clone(),
            peer_url,
            confirmed_at: SystemTime::now(),
        };
        self.step("record the etcd member", Bound::Lock, || async {
            Ok(self.ctx.registry.record_member(guard, &record).await?)
        })
        .await?;
        tracing::info!(member_id = %member.hex_id(), "etcd member confirmed and recorded");
        Ok(())
    }

    /// Join material this node may hand to kubeadm now: the cluster is
    /// initialized and neither the token nor (for control planes) the
    /// certificate key runs out within its margin. Material that would is
    /// never used: a refresh request is recorded for the leader and the
    /// answer is [`Error::StaleMaterial`], which callers wait out.
    async fn usable_material(&self, with_certs: bool) -> Result<JoinMaterial, Error> {
        // Both reads at once: one round trip, not two (each is a consistent
        // read of its own item either way; the pointer is what is used).
        let (state, pointer) =
            tokio::try_join!(self.ctx.registry.state(), self.ctx.registry.join_pointer())?;
        if state.phase != Phase::Initialized {
            return Err(Error::NotReady("the cluster is not initialized yet".into()));
        }
        note_generation(&state);
        let pointer =
            pointer.ok_or_else(|| Error::NotReady("no join material has been published".into()))?;
        // A worker never reads the certificate key (its role cannot).
        let material = if with_certs {
            self.ctx.join.read(&pointer).await?
        } else {
            self.ctx.join.read_token(&pointer).await?
        };
        let now = SystemTime::now();
        let need = stale_part(
            material.refresh_needed(now, TOKEN_MARGIN, CERTS_MARGIN),
            with_certs,
        );
        let Some(what) = need else {
            return Ok(material);
        };
        let origin = if with_certs {
            Origin::ControlPlane
        } else {
            Origin::Worker
        };
        let already = self.ctx.registry.refresh_requests().await?.iter().any(|r| {
            r.origin == origin && r.stale_version == pointer.secret_version && r.what == what
        });
        if !already {
            self.ctx
                .registry
                .request_refresh(&RefreshRequest {
                    origin,
                    requested_by: self.ctx.identity.instance_id.clone(),
                    what: what.clone(),
                    stale_version: pointer.secret_version.clone(),
                    requested_at: now,
                })
                .await?;
            tracing::warn!(version = %pointer.secret_version, stale = %what, "join material expires too soon to use; refresh requested from the leader");
        }
        Err(Error::StaleMaterial(format!(
            "join material version {} ({what}) expires within its margin (token {}, certificate key {}); a refresh was requested from the leader",
            pointer.secret_version,
            value::format_duration(TOKEN_MARGIN),
            value::format_duration(CERTS_MARGIN),
        )))
    }

    /// [`Self::usable_material`], waited for until `deadline`, through a
    /// cluster not initialized yet, stale material and AWS weather.
    async fn wait_material(
        &self,
        with_certs: bool,
        deadline: Instant,
    ) -> Result<JoinMaterial, Error> {
        let waited = self.ctx.cfg.timeouts.join_material;
        self.wait_through(
            "wait for usable join material",
            Bound::JoinMaterial,
            deadline,
            false,
            || self.usable_material(with_certs),
            |_, last| {
                Some(Error::MaterialDeadline {
                    waited,
                    last: last.unwrap_or_else(|| "no answer".into()),
                })
            },
        )
        .instrument(telemetry::phase("wait-join-material"))
        .await
    }

    /// The member records, read through AWS weather.
    async fn read_members(&self) -> Result<Vec<MemberRecord>, Error> {
        self.step("read the member records", Bound::Lock, || async {
            Ok(self.ctx.registry.members().await?)
        })
        .await
    }

    /// Publishes the material of a new generation (init, under its lock),
    /// each step waiting out AWS weather: the secret versions, then the
    /// fenced pointer (from here every joiner uses it), then the SSM
    /// discovery copy, whose weather does not hold the init up: the
    /// leader's daemon writes it on its first turn
    /// ([`JoinStore::ensure_discovery`]).
    async fn publish(&self, guard: &Guard, material: &JoinMaterial) -> Result<(), Error> {
        let previous = self
            .step("read the join pointer", Bound::Lock, || async {
                Ok(self.ctx.registry.join_pointer().await?)
            })
            .await?;
        let pointer = self
            .step("store the join material", Bound::Lock, || async {
                Ok(self
                    .ctx
                    .join
                    .stage(guard, material, previous.as_ref(), None, SystemTime::now())
                    .await?)
            })
            .await?;
        self.step("publish the join pointer", Bound::Lock, || async {
            Ok(self
                .ctx
                .join
                .commit_pointer(&self.ctx.registry, guard, &pointer)
                .await?)
        })
        .await?;
        if let Err(e) = self
            .ctx
            .join
            .write_discovery(&self.ctx.registry, &pointer)
            .await
        {
            let Some(call) = e.weather() else {
                return Err(e.into());
            };
            retry::note_weather("write the discovery parameters", call, &e);
            tracing::warn!(error = %e, "the SSM discovery parameters are left to the leader's daemon (it writes them on its first turn)");
        }
        Ok(())
    }

    async fn control_plane_join(&self, checkpoint: &mut Checkpoint) -> Result<(), Error> {
        let deadline = Instant::now() + self.ctx.cfg.timeouts.join_material;
        loop {
            // Wait without the lock (it also serializes the daemon's
            // membership changes), then check again under it.
            self.wait_material(true, deadline).await?;
            let guard = self.lock(Purpose::Membership, "membership-lock").await?;
            let result = guard
                .scoped(async |guard| self.control_plane_join_locked(guard, checkpoint).await)
                .await;
            match result {
                Err(Error::StaleMaterial(why)) if Instant::now() < deadline => {
                    tracing::warn!(%why, "join material went stale while waiting for the lock; waiting again");
                }
                // AWS weather before kubeadm started: never waited out under
                // the membership lock (the leader's removals and reconciler
                // need it); released, waited for outside, within the join's
                // own deadline.
                Err(e)
                    if !checkpoint.kubeadm_started
                        && e.weather().is_some()
                        && Instant::now() < deadline =>
                {
                    if let Some(call) = e.weather() {
                        retry::note_weather("join under the membership lock", call, &e);
                    }
                    tracing::warn!(error = %e, "AWS weather under the membership lock: released it; trying again outside it");
                    tokio::time::sleep(
                        STEP_MAX_DELAY.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                other => return other,
            }
        }
    }

    async fn control_plane_join_locked(
        &self,
        guard: &Guard,
        checkpoint: &mut Checkpoint,
    ) -> Result<(), Error> {
        let settings = self.etcd_settings();
        let own_peer = settings.peer_url(&self.ctx.identity.private_ip);
        // One attempt each under the lock: weather is waited out by the
        // caller, outside it.
        let records = self.ctx.registry.members().await?;
        let endpoints: Vec<String> = records
            .iter()
            .filter(|r| r.peer_url != own_peer)
            .filter_map(|r| etcd::host_of(&r.peer_url).map(|h| settings.client_url(h)))
            .collect();
        if endpoints.is_empty() {
            return Err(Error::NotReady("no recorded etcd member to join".into()));
        }
        let material = self.usable_material(true).await?;
        let rendered = self.render_join(&material);
        let secrets = material.secrets();
        // From here kubeadm writes to this node: a crash must reset first.
        checkpoint.kubeadm_started = true;
        self.save_checkpoint(checkpoint)?;
        // A joining node has no etcd credentials until kubeadm downloads the
        // shared CAs and issues its own certificates; only then can it check
        // etcd's health and remove stale members before the join itself.
        self.guarded(guard, async {
            Ok(self
                .ctx
                .kubeadm
                .join_prepare_certs(&rendered, &secrets)
                .await?)
        })
        .instrument(telemetry::phase("kubeadm-join-certs"))
        .await?;
        let etcd = Etcd::connect_any(&endpoints, &settings).await?;
        let health = etcd.health(&etcd.members().await?).await;
        let (stale, ready) = etcd::join_plan(&health, &own_peer);
        for s in &stale {
            let (Stale::OrphanLearner(m) | Stale::OwnLeftover(m)) = s;
            tracing::warn!(member_id = %m.hex_id(), reason = ?s, "removing a stale etcd member before joining");
            // The guarded path: fresh health, the quorum guard, the record.
            let target = crate::membership::Target::Member(m.id);
            crate::membership::remove_locked(&etcd, &self.ctx.registry, guard, &target, false)
                .await?;
        }
        ready.map_err(Error::NotReady)?;
        crash_point("join:after-cleanup");
        // The prepare phases and the cleanup took time, and the join itself
        // downloads the uploaded certificates again: they must still be
        // there for it (else the wait for a refresh starts over).
        let material = self.usable_material(true).await?;
        let rendered = self.render_join(&material);
        let secrets = material.secrets();
        self.guarded(guard, async {
            Ok(self.ctx.kubeadm.join(&rendered, &secrets).await?)
        })
        .instrument(telemetry::phase("kubeadm-join"))
        .await?;
        crash_point("join:after-kubeadm");
        self.confirm_and_record(guard).await?;
        crash_point("join:after-record");
        Ok(())
    }

    /// The JoinConfiguration for `material` (a control plane's when it
    /// carries a certificate key).
    fn render_join(&self, material: &JoinMaterial) -> kcfg::Rendered {
        kcfg::render_join(&kcfg::JoinParams {
            node: self.node(),
            api_server_endpoint: material.endpoint.clone(),
            token: material.token.clone(),
            ca_cert_hashes: material.ca_cert_hashes.clone(),
            certificate_key: material.certificate_key.clone(),
            kubernetes_dir: self.ctx.cfg.paths.kubernetes_dir.display().to_string(),
        })
    }

    async fn worker_join(&self, checkpoint: &mut Checkpoint) -> Result<(), Error> {
        if checkpoint.joined {
            return self.wait_ready().await;
        }
        let deadline = Instant::now() + self.ctx.cfg.timeouts.join_material;
        let material = self.wait_material(false, deadline).await?;
        let rendered = kcfg::render_join(&kcfg::JoinParams {
            node: self.node(),
            api_server_endpoint: material.endpoint.clone(),
            token: material.token.clone(),
            ca_cert_hashes: material.ca_cert_hashes.clone(),
            certificate_key: None,
            kubernetes_dir: self.ctx.cfg.paths.kubernetes_dir.display().to_string(),
        });
        checkpoint.kubeadm_started = true;
        self.save_checkpoint(checkpoint)?;
        self.ctx
            .kubeadm
            .join(&rendered, &[&material.token])
            .instrument(telemetry::phase("kubeadm-join"))
            .await?;
        crash_point("worker:after-kubeadm");
        checkpoint.joined = true;
        self.save_checkpoint(checkpoint)?;
        crash_point("worker:after-joined");
        self.wait_ready().await
    }

    /// The worker's Node is `Ready` through the API, as its kubelet's own
    /// credentials (`kubelet.conf`) see it, within `timeouts.node_ready`.
    async fn wait_ready(&self) -> Result<(), Error> {
        let kubeconfig = self.ctx.cfg.paths.kubernetes_dir.join("kubelet.conf");
        let api = crate::kubernetes::Kubernetes::from_kubeconfig(
            &kubeconfig,
            self.ctx.cfg.timeouts.kube_api,
        )
        .await?;
        let node = self.ctx.identity.hostname.clone();
        let waiting = move |why: &str| {
            tracing::info!(node = %node, why, "the Node waits for its pod network (applied by the control planes); waiting up to timeouts.pod_network");
            crate::systemd::status(&format!(
                "waiting for the pod network: node {node} NotReady ({why})"
            ));
        };
        api.wait_node_ready(
            &self.ctx.identity.hostname,
            self.ctx.cfg.timeouts.node_ready,
            self.ctx.cfg.timeouts.pod_network,
            &waiting,
        )
        .instrument(telemetry::phase("node-ready"))
        .await?;
        tracing::info!(node = %self.ctx.identity.hostname, "node is Ready");
        Ok(())
    }
}

/// Where kubeadm writes its kubeconfigs and manifests, whatever its
/// configuration says (upstream: `kubeadmconstants.KubernetesDir`).
const KUBEADM_DIR: &str = "/etc/kubernetes";

/// How long the token must still be valid when a node starts its join.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// How long the uploaded certificates must still be there (they are read
/// early in a control-plane join).
const CERTS_MARGIN: Duration = Duration::from_secs(120);

/// What this joiner needs refreshed, as the request names it: workers need
/// only the token.
fn stale_part(need: Refresh, with_certs: bool) -> Option<Wants> {
    match (need, with_certs) {
        (Refresh::Nothing, _) => None,
        (Refresh::Token, _) => Some(Wants::Token),
        (Refresh::Certs, false) => None,
        (Refresh::Certs, true) => Some(Wants::Certs),
        (Refresh::Both, false) => Some(Wants::Token),
        (Refresh::Both, true) => Some(Wants::Both),
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Lock(e) => e.entry(),
            E::Registry(e) => e.entry(),
            E::JoinMaterial(e) => e.entry(),
            E::Kubeadm(e) => e.entry(),
            E::Etcd(e) => e.entry(),
            E::Kubernetes(e) => e.entry(),
            E::Membership(e) => e.entry(),
            E::Restore(e) => e.entry(),
            E::Checkpoint { .. } => &crate::catalogue::BOOT_CHECKPOINT,
            E::NotReady(_) => &crate::catalogue::BOOT_NOT_READY,
            // Stale material is what the wait for material retries; once it
            // escapes, the node ran out of time waiting for usable material.
            E::StaleMaterial(_) | E::MaterialDeadline { .. } => &crate::catalogue::BOOT_NO_MATERIAL,
            E::LockLost(_) => &crate::catalogue::LOCK_LOST,
            E::Stopped => &crate::catalogue::BOOT_STOPPED,
            E::AwsWeather { .. } => &crate::catalogue::BOOT_AWS_WEATHER,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::Kubeadm(e) => e.detail(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_an_init_of_this_node_that_another_run_replaced_is_abandoned() {
        use super::{abandoned_init, Checkpoint, Path};
        use crate::registry::{ClusterState, Phase};
        let checkpoint = |path, kubeadm_started| Checkpoint {
            run_id: "run-a".into(),
            path: Some(path),
            kubeadm_started,
            joined: false,
            done: false,
        };
        let state = |phase, init_run_id: &str| ClusterState {
            phase,
            generation: 2,
            init_run_id: Some(init_run_id.into()),
            ..ClusterState::uninitialized()
        };
        let initialized_by_b = state(Phase::Initialized, "run-b");
        // Ours ran init, another run's init became the cluster.
        assert!(abandoned_init(
            &checkpoint(Path::Init, true),
            &initialized_by_b
        ));
        // Our own init became the cluster: its data is the cluster's.
        assert!(!abandoned_init(
            &checkpoint(Path::Init, true),
            &state(Phase::Initialized, "run-a")
        ));
        // A join (its member may be the cluster's, unrecorded) or an init
        // that never started kubeadm, or a cluster not initialized yet.
        assert!(!abandoned_init(
            &checkpoint(Path::ControlPlaneJoin, true),
            &initialized_by_b
        ));
        assert!(!abandoned_init(
            &checkpoint(Path::Init, false),
            &initialized_by_b
        ));
        assert!(!abandoned_init(
            &checkpoint(Path::Init, true),
            &state(Phase::Initializing, "run-b")
        ));
    }

    #[test]
    fn workers_ask_only_for_a_token_and_control_planes_for_what_runs_out() {
        use super::{stale_part, Refresh};
        let cases = [
            (Refresh::Nothing, false, None),
            (Refresh::Nothing, true, None),
            (Refresh::Token, false, Some("token")),
            (Refresh::Token, true, Some("token")),
            (Refresh::Certs, false, None),
            (Refresh::Certs, true, Some("certs")),
            (Refresh::Both, false, Some("token")),
            (Refresh::Both, true, Some("both")),
        ];
        for (need, with_certs, want) in cases {
            assert_eq!(
                stale_part(need, with_certs)
                    .as_ref()
                    .map(crate::registry::Wants::as_str),
                want,
                "{need:?} certs={with_certs}"
            );
        }
    }
}
