//! `kubeboot daemon`: what keeps running after bootstrap.
//!
//! On control planes one daemon at a time is the leader (the `leader` lock)
//! and runs the cluster-wide tasks each period (plus a random jitter, so
//! nodes do not move in step): the join-material refresh, the dead-member
//! reconciler ([`crate::reconciler`]) and the lifecycle queue (terminating
//! instances, see [`crate::lifecycle`]). A new leader
//! starts with a turn at once, so it picks up where a dead one stopped; a
//! leader that loses its lock stops mid-turn and competes again. SIGTERM or
//! SIGINT stop the loops, release the lock and exit 0.

use crate::catalogue::Coded;
use crate::config::Role;
use crate::context::Context;
use crate::lock::{Guard, LockStore, Purpose};
use crate::pacing::{allowance, next_delay, random_u64, stopped, Stop, LEADER_LOOP, OWN_LOOP};
use crate::registry::RegistryStore;
use crate::{systemd, telemetry};
use std::time::Duration;
use tracing::Instrument;

/// A leader's turn: all of its tasks, or only lifecycle messages a long
/// poll received between two whole turns.
enum Turn {
    Whole,
    Lifecycle(Vec<crate::aws::sqs::Received>),
}

/// How long a stopped daemon lets the leader's current turn finish, so that
/// locks taken inside it are released rather than left to expire. Within
/// the unit's TimeoutStopSec (60 s) with the rest of the shutdown.
const TURN_STOP_GRACE: Duration = Duration::from_secs(15);

/// What the daemon works with: the node's context and the daemon's own
/// parts; generic over the stores so tests can inject faults.
pub struct Daemon<L: LockStore, R: RegistryStore> {
    pub ctx: Context<L, R>,
    /// The lifecycle queue, when `aws.lifecycle_queue_url` is set.
    pub queue: Option<crate::aws::sqs::Queue>,
    /// The lifecycle hooks' API (completion, heartbeats).
    pub hooks: crate::aws::autoscaling::Hooks,
    /// Instance metadata, for this node's own target lifecycle state.
    pub imds: crate::identity::Imds,
    /// EC2, for the dead-member reconciler.
    pub instances: crate::aws::ec2::Instances,
    /// The reconciler's suspects, kept across turns while this node leads.
    pub suspects: tokio::sync::Mutex<crate::reconciler::Suspects>,
    /// The etcd leader the last health look saw (to count leader changes).
    pub etcd_leader: tokio::sync::Mutex<Option<u64>>,
    /// The cluster's backups, on a control plane with backups enabled.
    pub backups: Option<crate::backup::Backups>,
    /// Whether this daemon holds the leader lock (read by the backup loop).
    pub leading: std::sync::atomic::AtomicBool,
    /// The service-account issuer's publisher, when an issuer is set.
    pub issuer: Option<crate::issuer::Publisher>,
    /// What this leader last applied of the cluster add-ons, and when.
    pub addons: tokio::sync::Mutex<crate::addons::Memo>,
}

impl<L: LockStore, R: RegistryStore> Daemon<L, R> {
    /// Runs until `stop` turns true.
    pub async fn run(&self, mut stop: Stop) {
        tracing::info!(
            role = self.ctx.cfg.node.role.as_str(),
            period_ms = self.ctx.cfg.daemon.period.as_millis() as u64,
            "daemon started"
        );
        let own = self.own_termination_loop(stop.clone());
        match self.ctx.cfg.node.role {
            Role::ControlPlane => {
                // Every control plane renews its own kubeadm certificates.
                let certs = crate::certs::Renewal {
                    cfg: &self.ctx.cfg,
                    kubeadm: &self.ctx.kubeadm,
                    locker: &self.ctx.locker,
                    private_ip: &self.ctx.identity.private_ip,
                };
                let certs = crate::certs::watch(certs, stop.clone());
                tokio::join!(
                    self.leader_loop(stop.clone()),
                    own,
                    certs,
                    self.backup_loop(stop.clone())
                );
            }
            Role::Worker => own.await,
        }
        stopped(&mut stop).await;
        tracing::info!("daemon stopped");
    }

    /// Every node watches IMDS for its own termination: a control plane
    /// cleans up and completes its action itself, a worker asks the leader
    /// (its kubelet may not evict Pods). Idempotent with the queue path.
    async fn own_termination_loop(&self, mut stop: Stop) {
        use crate::lifecycle::{own_termination_due, OwnTermination};
        loop {
            systemd::beat(OWN_LOOP, allowance(&self.ctx.cfg));
            crate::failpoint::stall_point("daemon:own-termination").await;
            match own_termination_due(
                &self.imds,
                &self.ctx.identity.instance_id,
                &self.ctx.cfg.aws.lifecycle_hook,
            )
            .await
            {
                Ok(Some(action)) => {
                    let what = match self.ctx.cfg.node.role {
                        Role::ControlPlane => OwnTermination::CleanUpAndComplete,
                        Role::Worker => OwnTermination::AskTheLeader,
                    };
                    tracing::warn!(asg = %action.asg, ?what, "this instance is being terminated");
                    if self.own_termination(&action, what).await {
                        systemd::done(OWN_LOOP);
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(code = e.code(), error = %e, "cannot read the target lifecycle state")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.delay()) => {}
                _ = stopped(&mut stop) => {
                    systemd::done(OWN_LOOP);
                    return;
                }
            }
        }
    }

    /// What the lifecycle handlers borrow from this daemon for a turn.
    fn lifecycle_parts(&self) -> crate::lifecycle::Parts<'_, L, R> {
        crate::lifecycle::Parts {
            cfg: &self.ctx.cfg,
            registry: &self.ctx.registry,
            locker: &self.ctx.locker,
            hooks: &self.hooks,
            backups: self.before_removal(),
        }
    }

    /// The backups to snapshot before a removal, if that is asked for.
    fn before_removal(&self) -> Option<&crate::backup::Backups> {
        self.backups
            .as_ref()
            .filter(|_| self.ctx.cfg.backup.before_membership_change)
    }

    /// Acts on this node's own termination; whether it is done.
    async fn own_termination(
        &self,
        action: &crate::aws::autoscaling::Action,
        what: crate::lifecycle::OwnTermination,
    ) -> bool {
        use crate::lifecycle::OwnTermination;
        match what {
            OwnTermination::CleanUpAndComplete => {
                match crate::lifecycle::handle_termination(self.lifecycle_parts(), action)
                    .instrument(telemetry::phase("own-termination"))
                    .await
                {
                    Ok(_) => true,
                    Err(e) => {
                        crate::catalogue::report!(
                            error,
                            e,
                            "own termination not completed; retrying next turn"
                        );
                        false
                    }
                }
            }
            OwnTermination::AskTheLeader => match &self.queue {
                Some(queue) => match queue.send_own(action).await {
                    Ok(()) => {
                        tracing::info!(
                            "asked the leader to drain this node and complete its action"
                        );
                        true
                    }
                    Err(e) => {
                        crate::catalogue::report!(
                            error,
                            e,
                            "cannot ask the leader; retrying next turn"
                        );
                        false
                    }
                },
                None => {
                    tracing::error!(
                        hint = "set aws.lifecycle_queue_url",
                        "no lifecycle queue: nobody can drain this worker"
                    );
                    true
                }
            },
        }
    }

    fn delay(&self) -> Duration {
        next_delay(
            self.ctx.cfg.daemon.period,
            self.ctx.cfg.daemon.jitter,
            random_u64(),
        )
    }

    async fn leader_loop(&self, mut stop: Stop) {
        loop {
            // Competing may take up to lock.acquire_timeout before it returns.
            systemd::beat(
                LEADER_LOOP,
                self.ctx.cfg.lock.acquire_timeout + allowance(&self.ctx.cfg),
            );
            systemd::status("follower: competing for the leader lock; watching for termination");
            let acquired = tokio::select! {
                r = self.ctx.locker.acquire(Purpose::Leader) => r,
                _ = stopped(&mut stop) => {
                    systemd::done(LEADER_LOOP);
                    return;
                }
            };
            let guard = match acquired {
                Ok(g) => g,
                Err(e) => {
                    // Timeouts while another leader lives are normal; other
                    // errors are retried after a period.
                    if !matches!(e, crate::lock::Error::Timeout { .. }) {
                        crate::catalogue::report!(warn, e, "cannot compete for the leader lock");
                        tokio::select! {
                            _ = tokio::time::sleep(self.delay()) => {}
                            _ = stopped(&mut stop) => return,
                        }
                    }
                    continue;
                }
            };
            self.suspects.lock().await.clear();
            self.set_leading(true);
            tracing::info!(
                fence = guard.fence().map(|f| f.value).unwrap_or_default(),
                "leading: this node runs the cluster-wide tasks"
            );
            // What the next turn is: the whole turn, or only the lifecycle
            // messages that arrived while waiting for it (then the whole
            // turn stays due when it was).
            let mut next = Turn::Whole;
            let mut due = tokio::time::Instant::now();
            loop {
                systemd::beat(LEADER_LOOP, allowance(&self.ctx.cfg));
                let this = std::mem::replace(&mut next, Turn::Whole);
                let whole = matches!(this, Turn::Whole);
                let stopping = {
                    let turn = async {
                        match this {
                            Turn::Whole => self.leader_turn(&guard).await,
                            Turn::Lifecycle(first) => self.lifecycle_turn(first).await,
                        }
                    };
                    tokio::pin!(turn);
                    tokio::select! {
                        _ = &mut turn => false,
                        _ = guard.lost() => false,
                        _ = stopped(&mut stop) => {
                            // A turn dropped mid-way keeps what it holds (the
                            // reconciler's membership lock, a removal's) until
                            // the lease runs out: let it finish its locked
                            // sections first, within a grace.
                            if tokio::time::timeout(TURN_STOP_GRACE, &mut turn).await.is_err() {
                                tracing::warn!(grace_s = TURN_STOP_GRACE.as_secs(), "the leader's turn did not end within the stop grace; locks it holds expire with their lease");
                            }
                            true
                        }
                    }
                };
                if stopping {
                    self.set_leading(false);
                    let _ = guard.release().await;
                    systemd::done(LEADER_LOOP);
                    return;
                }
                if !guard.is_held() {
                    self.set_leading(false);
                    tracing::warn!("lost the leader lock; competing again");
                    break;
                }
                if whole {
                    due = tokio::time::Instant::now() + self.delay();
                }
                tokio::select! {
                    arrived = self.between_turns(due) => {
                        if !arrived.is_empty() {
                            next = Turn::Lifecycle(arrived);
                        }
                    }
                    _ = guard.lost() => {
                        self.set_leading(false);
                        tracing::warn!("lost the leader lock; competing again");
                        break;
                    }
                    _ = stopped(&mut stop) => {
                        self.set_leading(false);
                        let _ = guard.release().await;
                        systemd::done(LEADER_LOOP);
                        return;
                    }
                }
            }
        }
    }

    fn set_leading(&self, leading: bool) {
        self.leading
            .store(leading, std::sync::atomic::Ordering::SeqCst);
    }

    /// The leader's scheduled backups, beside its turns (a large snapshot
    /// streams for minutes: inside a turn it would hold up terminations and
    /// trip the watchdog). Each period, while this daemon leads: report the
    /// newest verified backup's age and, once backup.interval has passed
    /// since it, take one under the `backup` lock (skipped while someone
    /// else holds it), then apply retention. A failed backup is retried
    /// after 5 minutes, doubling up to backup.interval, not every period.
    /// On stop, a backup in flight aborts its upload and releases its lock.
    async fn backup_loop(&self, mut stop: Stop) {
        let Some(backups) = &self.backups else {
            return;
        };
        let interval = self.ctx.cfg.backup.interval;
        // The newest verified backup's time, learned from the bucket on
        // becoming leader and kept while leading.
        let mut newest: Option<Option<u64>> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.delay()) => {}
                _ = stopped(&mut stop) => return,
            }
            if !self.is_leading() {
                newest = None;
                continue;
            }
            let now = crate::backup::now_unix();
            let last = match newest {
                Some(last) => last,
                None => match backups.newest_verified().await {
                    Ok(m) => *newest.insert(m.map(|m| m.taken_at_unix)),
                    Err(e) => {
                        crate::catalogue::report!(
                            warn,
                            e,
                            "cannot list the backups; retried next period"
                        );
                        continue;
                    }
                },
            };
            if let Some(t) = last {
                crate::metrics::record(
                    crate::metrics::BACKUP_AGE,
                    now.saturating_sub(t) as f64,
                    &[],
                );
                if now < t + interval.as_secs() {
                    continue;
                }
            }
            if retry_at.is_some_and(|at| std::time::Instant::now() < at) {
                continue;
            }
            match self.scheduled_backup(backups, stop.clone()).await {
                Ok(Some(m)) => {
                    newest = Some(Some(m.taken_at_unix));
                    (failures, retry_at) = (0, None);
                    // A leader that lost its lock meanwhile leaves retention
                    // to the next one.
                    if self.is_leading() {
                        if let Err(e) = backups.apply_retention(crate::backup::now_unix()).await {
                            crate::catalogue::report!(
                                warn,
                                e,
                                "retention failed; retried after the next backup"
                            );
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let wait = crate::backup::retry_delay(failures, interval);
                    failures = failures.saturating_add(1);
                    retry_at = Some(std::time::Instant::now() + wait);
                    crate::catalogue::report!(
                        error,
                        e,
                        retry_in_s = wait.as_secs(),
                        "scheduled backup failed; retried after a back-off"
                    );
                }
            }
        }
    }

    /// The cluster add-ons, when due ([`crate::addons::Memo::due`]): for
    /// the generation the registry holds now, so a restored cluster gets
    /// them stamped with its own.
    async fn addons_turn(&self) {
        let cfg = &self.ctx.cfg;
        let vars = crate::addons::variables(cfg, &self.ctx.identity.region);
        let addons = match crate::addons::load(cfg, &vars) {
            Ok(addons) if addons.is_empty() => return,
            Ok(addons) => addons,
            Err(e) => {
                if self
                    .addons
                    .lock()
                    .await
                    .failure_is_new(&format!("{}: {e}", e.code()))
                {
                    crate::catalogue::report!(
                        error,
                        e,
                        "the cluster add-ons cannot be loaded; retried every turn (reported again when the failure changes)"
                    );
                }
                return;
            }
        };
        let generation = match self.ctx.registry.state().await {
            Ok(state) => state.generation,
            Err(e) => {
                crate::catalogue::report!(
                    error,
                    e,
                    "cannot read the cluster generation for the add-ons; retried next turn"
                );
                return;
            }
        };
        let digest = crate::addons::digest(&addons);
        let mut memo = self.addons.lock().await;
        if !memo.due(&digest, generation) {
            return;
        }
        match crate::addons::apply_bounded(cfg, &addons, generation).await {
            Ok(applied) => {
                memo.record(digest, generation);
                tracing::info!(
                    generation,
                    objects = applied.objects.len(),
                    "cluster add-ons applied"
                );
            }
            Err(e) if memo.failure_is_new(&format!("{}: {e}", e.code())) => {
                crate::catalogue::report!(
                    error,
                    e,
                    "cannot apply the cluster add-ons; retried every turn (reported again when the failure changes)"
                )
            }
            Err(e) => {
                tracing::debug!(code = e.code(), error = %e, "the cluster add-ons still fail")
            }
        }
    }

    fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// One scheduled backup, unless another holds the `backup` lock. What it
    /// needs is read before the lock is taken, so a failure there cannot
    /// leave the lock held until its lease runs out.
    async fn scheduled_backup(
        &self,
        backups: &crate::backup::Backups,
        stop: Stop,
    ) -> Result<Option<crate::backup::Manifest>, crate::backup::Error> {
        let settings = crate::etcd::Settings::from_config(&self.ctx.cfg);
        let own = settings.client_url(&self.ctx.identity.private_ip);
        let recorded =
            crate::etcd::recorded_endpoints(&self.ctx.registry.members().await?, &settings);
        let mut endpoints = vec![own.clone()];
        endpoints.extend(recorded.into_iter().filter(|e| *e != own));
        let generation = self.ctx.registry.state().await?.generation;
        let etcd = crate::etcd::Etcd::connect_any(&endpoints, &settings).await?;
        let Some(guard) = self.ctx.locker.try_acquire(Purpose::Backup).await? else {
            tracing::info!(
                "another backup is running (the backup lock is held); this one is skipped"
            );
            return Ok(None);
        };
        let source = crate::backup::Source {
            etcd: &etcd,
            endpoints,
            generation,
            stop: Some(stop),
        };
        guard
            .scoped(async |g| {
                crate::backup::take(backups, source, crate::backup::Trigger::Scheduled, g)
                    .instrument(telemetry::phase("backup"))
                    .await
            })
            .await
            .map(Some)
    }

    /// One turn of every leader task; a failing task is logged and retried
    /// next turn, it never stops the others.
    async fn leader_turn(&self, guard: &Guard) {
        crate::failpoint::stall_point("daemon:leader-turn").await;
        {
            let mut last = self.etcd_leader.lock().await;
            let snapshot = crate::health::report(&self.ctx.cfg, &self.ctx.registry, *last)
                .instrument(telemetry::phase("health"))
                .await;
            *last = snapshot.leader;
        }
        if let Err(e) = crate::refresh::run_once(
            &self.ctx.cfg,
            &self.ctx.kubeadm,
            &self.ctx.join,
            &self.ctx.registry,
            guard,
        )
        .instrument(telemetry::phase("refresh-join-material"))
        .await
        {
            crate::catalogue::report!(error, e, "join material refresh failed; retried next turn");
        }
        let mut suspects = self.suspects.lock().await;
        if let Err(e) = crate::reconciler::run_once(
            &self.ctx.cfg,
            &self.ctx.registry,
            &self.ctx.locker,
            &self.instances,
            &self.ctx.identity.instance_id,
            &mut suspects,
            self.before_removal(),
        )
        .instrument(telemetry::phase("reconcile"))
        .await
        {
            crate::catalogue::report!(error, e, "reconciler turn failed; retried next turn");
        }
        drop(suspects);
        if let Some(issuer) = &self.issuer {
            match issuer
                .publish()
                .instrument(telemetry::phase("publish-issuer"))
                .await
            {
                Ok(crate::issuer::Outcome::Published(objects)) => tracing::info!(
                    issuer = issuer.issuer(),
                    objects,
                    "service-account issuer documents published (the signing keys changed)"
                ),
                Ok(_) => {}
                Err(e) => crate::catalogue::report!(
                    error,
                    e,
                    "cannot publish the service-account issuer's documents; retried next turn"
                ),
            }
        }
        if let Some(queue) = &self.queue {
            self.drain(queue, Vec::new()).await;
        }
        // After the queue: a slow API server must not hold terminations back.
        self.addons_turn()
            .instrument(telemetry::phase("addons"))
            .await;
    }

    /// A turn for lifecycle messages that arrived between whole turns.
    async fn lifecycle_turn(&self, first: Vec<crate::aws::sqs::Received>) {
        if let Some(queue) = &self.queue {
            tracing::info!(
                messages = first.len(),
                "lifecycle messages arrived between turns; handling them now"
            );
            self.drain(queue, first).await;
        }
    }

    async fn drain(&self, queue: &crate::aws::sqs::Queue, first: Vec<crate::aws::sqs::Received>) {
        if let Err(e) = crate::lifecycle::drain_queue(
            self.lifecycle_parts(),
            queue,
            crate::lifecycle::Ec2 {
                instances: &self.instances,
                leader: &self.ctx.identity.instance_id,
            },
            first,
        )
        .instrument(telemetry::phase("lifecycle"))
        .await
        {
            crate::catalogue::report!(error, e, "lifecycle queue turn failed; retried next turn");
        }
    }

    /// Until the next whole turn is `due`, or until lifecycle messages
    /// arrive (returned): the leader long-polls its queue meanwhile, so a
    /// termination is handled seconds after its event, as the Lambda this
    /// replaces was, rather than up to a period later.
    async fn between_turns(&self, due: tokio::time::Instant) -> Vec<crate::aws::sqs::Received> {
        match &self.queue {
            Some(queue) => crate::lifecycle::wait_for_messages(queue, &self.ctx.cfg, due).await,
            None => {
                tokio::time::sleep_until(due).await;
                Vec::new()
            }
        }
    }
}
