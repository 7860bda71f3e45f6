//! kubeadm's certificates on this control plane: when each expires, whether
//! to renew, and the renewal itself.
//!
//! kubeadm issues every control plane's leaf certificates for one year and
//! nothing renews them by itself (kubeadm renews them only during `kubeadm
//! upgrade`): a control plane that lives longer than that stops serving.
//! Each control plane's daemon therefore reads its own certificates every
//! turn (file reads only), reports the soonest expiry (`kubeboot status`,
//! the `CertificateDaysLeft` metric and its alarm) and, once the soonest
//! leaf is within [`RENEW_BEFORE`], renews them under the `membership` lock:
//! `kubeadm certs renew all`, then the restart the kubeadm documentation
//! requires ("you must restart the control plane Pods"), then etcd's health.
//!
//! What is read is what `kubeadm certs check-expiration` lists: the leaves
//! under `pki/` ([`LEAF_FILES`]), the client certificates embedded in
//! [`KUBECONFIGS`], and the CAs ([`AUTHORITY_FILES`], which kubeadm never
//! renews: rotating a CA is a manual procedure). `kubelet.conf` is not
//! among them: kubeadm points it at `/var/lib/kubelet/pki/kubelet-client-current.pem`,
//! which the kubelet rotates itself (`rotateCertificates`), and kubeadm's
//! renewal excludes it for that reason.

use crate::lock::{LockStore, Locker, Purpose};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Leaf certificates under `<kubernetes_dir>/pki`, as kubeadm names them
/// (file stem without `.crt`), stacked etcd included.
pub const LEAF_FILES: [&str; 7] = [
    "apiserver",
    "apiserver-kubelet-client",
    "apiserver-etcd-client",
    "front-proxy-client",
    "etcd/server",
    "etcd/peer",
    "etcd/healthcheck-client",
];

/// Kubeconfigs whose embedded client certificate kubeadm renews, and
/// whether every control plane has one (`super-admin.conf` exists only on
/// the node that ran `kubeadm init`, 1.29 and later).
pub const KUBECONFIGS: [(&str, bool); 4] = [
    ("admin.conf", true),
    ("super-admin.conf", false),
    ("controller-manager.conf", true),
    ("scheduler.conf", true),
];

/// The CAs the leaves hang from; kubeadm does not renew them.
pub const AUTHORITY_FILES: [&str; 3] = ["ca", "etcd/ca", "front-proxy-ca"];

/// The control-plane static Pods that must restart to load renewed
/// certificates (kubeadm's manifests under `<kubernetes_dir>/manifests`).
pub const STATIC_PODS: [&str; 4] = [
    "etcd.yaml",
    "kube-apiserver.yaml",
    "kube-controller-manager.yaml",
    "kube-scheduler.yaml",
];

/// Renew once the soonest leaf expires within this: a month leaves room for
/// a few failed turns, an operator, or replacing the node, and is what
/// kubeadm's documentation and most runbooks use. (No config key yet: a
/// constant until an operator needs another window.)
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// The kubelet's default `fileCheckFrequency`: how long the kubelet may
/// take to notice a static Pod manifest went away or came back. The
/// kubeadm documentation restarts a static Pod by removing its manifest,
/// waiting this long, and putting it back.
pub const KUBELET_FILE_CHECK: Duration = Duration::from_secs(20);

/// Extra time on top of [`KUBELET_FILE_CHECK`] for the kubelet to act.
const FILE_CHECK_MARGIN: Duration = Duration::from_secs(5);

/// Where manifests wait while their Pods stop: a sibling of `manifests/`
/// (same file system, so moves are atomic renames; the kubelet does not
/// look into other directories).
pub const PARKING_DIR: &str = "kubeboot-parked-manifests";

/// What a certificate is to kubeadm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Renewed by `kubeadm certs renew`.
    Leaf,
    /// A CA: never renewed by kubeadm.
    Authority,
}

/// One certificate's expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// kubeadm's name: `apiserver`, `etcd/peer`, `admin.conf`, `ca`, ...
    pub name: String,
    pub kind: Kind,
    pub not_after: SystemTime,
}

/// Every certificate of this node that could be read, and what could not.
#[derive(Debug, Default)]
pub struct Inventory {
    pub expiries: Vec<Expiry>,
    pub problems: Vec<Error>,
}

impl Inventory {
    /// The leaf that expires first.
    pub fn soonest_leaf(&self) -> Option<&Expiry> {
        soonest(&self.expiries, Kind::Leaf)
    }

    /// The CA that expires first.
    pub fn soonest_authority(&self) -> Option<&Expiry> {
        soonest(&self.expiries, Kind::Authority)
    }

    /// Whether this node has kubeadm certificates at all (a worker, or a
    /// control plane before its join, has none).
    pub fn is_empty(&self) -> bool {
        self.expiries.is_empty() && self.problems.is_empty()
    }
}

fn soonest(expiries: &[Expiry], kind: Kind) -> Option<&Expiry> {
    expiries
        .iter()
        .filter(|e| e.kind == kind)
        .min_by_key(|e| e.not_after)
}

/// What to do about this node's certificates this turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Everything lives beyond the renewal window.
    Nothing,
    /// These leaves expire within the window (or did): renew.
    Renew { due: Vec<String> },
    /// No leaf is due, but these CAs expire within the window: renewing
    /// cannot help (kubeadm does not renew CAs); an operator must rotate
    /// the CA or rebuild the cluster.
    Warn { authorities: Vec<String> },
}

/// Decides from the expiries alone: leaves within `renew_before` of `now`
/// are renewed (an expired one too: `kubeadm certs renew` signs with the
/// local CA and needs no working API); CAs within it are only reported.
pub fn plan(expiries: &[Expiry], now: SystemTime, renew_before: Duration) -> Plan {
    let horizon = now + renew_before;
    let within = |kind: Kind| -> Vec<String> {
        expiries
            .iter()
            .filter(|e| e.kind == kind && e.not_after <= horizon)
            .map(|e| e.name.clone())
            .collect()
    };
    let due = within(Kind::Leaf);
    if !due.is_empty() {
        return Plan::Renew { due };
    }
    let authorities = within(Kind::Authority);
    if !authorities.is_empty() {
        return Plan::Warn { authorities };
    }
    Plan::Nothing
}

/// Days from `now` to `at` (negative once passed), as the metric reports them.
pub fn days_left(at: SystemTime, now: SystemTime) -> f64 {
    let secs = match at.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    (secs / 86_400.0 * 10.0).round() / 10.0
}

/// The notAfter of the first certificate in `pem`.
pub fn not_after(pem: &[u8]) -> Result<SystemTime, String> {
    use x509_cert::der::DecodePem;
    let text = String::from_utf8_lossy(pem);
    const END: &str = "-----END CERTIFICATE-----";
    let first = match (text.find("-----BEGIN CERTIFICATE-----"), text.find(END)) {
        (Some(start), Some(end)) if end > start => &text[start..end + END.len()],
        _ => return Err("no PEM certificate in it".into()),
    };
    let cert = x509_cert::Certificate::from_pem(first.as_bytes())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.tbs_certificate().validity().not_after.to_system_time())
}

/// Where a kubeconfig keeps its user's client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// `client-certificate-data`, decoded (kubeadm embeds it).
    Embedded(Vec<u8>),
    /// `client-certificate`: a file path.
    File(PathBuf),
}

/// The client certificate of the current context's user in a kubeconfig
/// (kubeadm's YAML, or JSON); `None` when it has none (token or exec auth:
/// nothing for kubeadm to renew).
pub fn kubeconfig_client_cert(text: &str) -> Result<Option<ClientCert>, String> {
    use base64::Engine as _;
    let config =
        kube::config::Kubeconfig::from_yaml(text).map_err(|e| format!("not a kubeconfig: {e}"))?;
    let user = config
        .current_context
        .as_deref()
        .and_then(|name| config.contexts.iter().find(|c| c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone());
    let auth = config
        .auth_infos
        .iter()
        .find(|a| user.as_deref().is_none_or(|u| a.name == u))
        .and_then(|a| a.auth_info.as_ref());
    let Some(auth) = auth else {
        return Ok(None);
    };
    if let Some(data) = auth.client_certificate_data.as_deref() {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("client-certificate-data is not base64: {e}"))?;
        return Ok(Some(ClientCert::Embedded(pem)));
    }
    Ok(auth
        .client_certificate
        .as_ref()
        .map(PathBuf::from)
        .map(ClientCert::File))
}

/// Reads every certificate of this node under `kubernetes_dir`. A missing
/// optional kubeconfig is skipped; a node without `pki/` has nothing.
pub fn inventory(kubernetes_dir: &Path) -> Inventory {
    let mut inv = Inventory::default();
    let pki = kubernetes_dir.join("pki");
    if !pki.is_dir() {
        return inv;
    }
    let mut file = |name: &str, kind: Kind| {
        let path = pki.join(format!("{name}.crt"));
        match read_cert(&path) {
            Ok(not_after) => inv.expiries.push(Expiry {
                name: name.to_string(),
                kind,
                not_after,
            }),
            Err(e) => inv.problems.push(e),
        }
    };
    for name in LEAF_FILES {
        file(name, Kind::Leaf);
    }
    for name in AUTHORITY_FILES {
        file(name, Kind::Authority);
    }
    for (name, required) in KUBECONFIGS {
        let path = kubernetes_dir.join(name);
        if !required && !path.exists() {
            continue;
        }
        match read_kubeconfig(&path, kubernetes_dir) {
            Ok(Some(not_after)) => inv.expiries.push(Expiry {
                name: name.to_string(),
                kind: Kind::Leaf,
                not_after,
            }),
            Ok(None) => {}
            Err(e) => inv.problems.push(e),
        }
    }
    inv
}

fn read_cert(path: &Path) -> Result<SystemTime, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    not_after(&pem).map_err(|reason| Error::Parse {
        path: path.to_path_buf(),
        reason,
    })
}

fn read_kubeconfig(path: &Path, base: &Path) -> Result<Option<SystemTime>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |reason: String| Error::Parse {
        path: path.to_path_buf(),
        reason,
    };
    match kubeconfig_client_cert(&text).map_err(parse)? {
        None => Ok(None),
        Some(ClientCert::Embedded(pem)) => not_after(&pem).map(Some).map_err(parse),
        Some(ClientCert::File(file)) => read_cert(&base.join(file)).map(Some),
    }
}

/// Certificate failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read certificate {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse certificate {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("`kubeadm certs renew all` succeeded but {names:?} still expire within {} (soonest in {days:.1} days)", crate::config::value::format_duration(*window))]
    NotRenewed {
        names: Vec<String>,
        days: f64,
        window: Duration,
    },
    #[error("cannot move static Pod manifest {} to {}: {source}", from.display(), to.display())]
    Restart {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd did not come back healthy after the restart for renewed certificates: {0}")]
    EtcdAfterRestart(#[source] crate::etcd::Error),
    #[error("certificate renewal deferred: restarting this control plane would leave {healthy_others} healthy of {voters} voting etcd members, below quorum {quorum}; unhealthy now: {unhealthy}")]
    Deferred {
        healthy_others: usize,
        voters: usize,
        quorum: usize,
        unhealthy: String,
    },
    #[error("certificate renewal deferred: cannot tell whether restarting this control plane keeps etcd's quorum: {0}")]
    QuorumUnknown(#[source] crate::etcd::Error),
    #[error(transparent)]
    Kubeadm(#[from] crate::kubeadm::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
}

impl Error {
    /// A renewal put off because restarting now could cost etcd's quorum:
    /// a warning, retried next turn, not a failure.
    pub fn is_deferral(&self) -> bool {
        matches!(self, Error::Deferred { .. } | Error::QuorumUnknown(_))
    }
}

/// The `[timeouts]` and the kubelet's pace for one renewal, so tests can
/// shorten the kubelet's file-check period.
fn file_check() -> Duration {
    crate::failpoint::duration_override("KUBELET_FILE_CHECK_MS")
        .unwrap_or(KUBELET_FILE_CHECK + FILE_CHECK_MARGIN)
}

/// Moves back manifests a renewal parked (an agent stopped mid-restart
/// must not leave its control plane down); idempotent.
pub fn restore_parked(kubernetes_dir: &Path) -> Result<usize, Error> {
    let parked = kubernetes_dir.join(PARKING_DIR);
    let manifests = kubernetes_dir.join("manifests");
    let mut moved = 0;
    for name in STATIC_PODS {
        let from = parked.join(name);
        if from.exists() {
            let to = manifests.join(name);
            std::fs::rename(&from, &to).map_err(|source| Error::Restart { from, to, source })?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// Parks the control-plane manifests present; returns how many.
fn park(kubernetes_dir: &Path) -> Result<usize, Error> {
    let parked = kubernetes_dir.join(PARKING_DIR);
    let manifests = kubernetes_dir.join("manifests");
    std::fs::create_dir_all(&parked).map_err(|source| Error::Restart {
        from: manifests.clone(),
        to: parked.clone(),
        source,
    })?;
    let mut moved = 0;
    for name in STATIC_PODS {
        let from = manifests.join(name);
        if from.exists() {
            let to = parked.join(name);
            std::fs::rename(&from, &to).map_err(|source| Error::Restart { from, to, source })?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// What one turn found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No kubeadm certificates on this node (yet).
    NoCertificates,
    /// Nothing due; the soonest leaf's days left.
    Fine { days_left: f64 },
    /// CAs expire within the window; nothing kubeadm can renew.
    AuthoritiesExpiring { authorities: Vec<String> },
    /// Renewed; the soonest leaf's days left afterwards.
    Renewed { days_left: f64 },
    /// Due, but a recent attempt failed: not tried again before [`RETRY_AFTER`].
    BackingOff { due: Vec<String> },
}

/// How long after a failed renewal (kubeadm failed, left leaves due, the
/// restart or etcd's confirmation failed) the next attempt waits: each
/// attempt restarts the control plane, and a turn later the cause (an
/// external CA, a missing key) is still there. Several attempts still fit
/// in the 30-day window, and the `CertificatesExpiring` alarm fires at 14.
pub const RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// What the certificate loop remembers between turns (in memory: a
/// restarted agent tries once more at once, which is the point of
/// restarting it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    /// No renewal attempt before this (after a failed one).
    pub not_before: Option<Instant>,
    /// kubeadm renewed certificates but the restart that loads them was
    /// deferred: the next attempt restarts without renewing again (the
    /// files are fresh, so the plan alone would never restart).
    pub restart_pending: bool,
}

/// Whether a renewal may be attempted at `now`.
pub fn may_attempt(not_before: Option<Instant>, now: Instant) -> bool {
    not_before.is_none_or(|t| now >= t)
}

/// When the attempt after `result` (ended at `now`) may come: at once
/// after a success, a deferral (quorum) or a lock wait that timed out
/// (nothing was done), [`RETRY_AFTER`] later after any other failure.
pub fn next_attempt(result: &Result<f64, Error>, now: Instant) -> Option<Instant> {
    match result {
        Ok(_) => None,
        Err(e) if e.is_deferral() => None,
        Err(Error::Lock(crate::lock::Error::Timeout { .. })) => None,
        Err(_) => Some(now + RETRY_AFTER),
    }
}

/// Whether `kubeadm certs renew all` changed any expiry between two
/// inventories: only then is there something for a restart to load.
pub fn expiries_moved(before: &[Expiry], after: &[Expiry]) -> bool {
    after.iter().any(|a| {
        !before
            .iter()
            .any(|b| b.name == a.name && b.not_after == a.not_after)
    })
}

/// Whether this node's control plane may restart now. The restart takes
/// its etcd member away for about a minute, like a temporary removal: the
/// OTHER healthy voters must reach quorum of the full cluster (a dead
/// member counts as a voter until it is removed). A lone voter restarts
/// anyway: it is the whole cluster, there is no quorum to keep but its
/// own, and no other way to load the renewed certificates.
pub fn restart_verdict(health: &[crate::etcd::Health], own_peer_url: &str) -> Result<(), Error> {
    let is_own = |h: &crate::etcd::Health| h.member.peer_urls.iter().any(|u| u == own_peer_url);
    let voters: Vec<&crate::etcd::Health> =
        health.iter().filter(|h| !h.member.is_learner).collect();
    if voters.len() == 1 && is_own(voters[0]) {
        return Ok(());
    }
    let healthy_others = voters.iter().filter(|h| h.healthy && !is_own(h)).count();
    let quorum = crate::quorum::quorum(voters.len());
    if healthy_others >= quorum {
        return Ok(());
    }
    let unhealthy: Vec<String> = voters
        .iter()
        .filter(|h| !h.healthy)
        .map(|h| h.member.hex_id())
        .collect();
    Err(Error::Deferred {
        healthy_others,
        voters: voters.len(),
        quorum,
        unhealthy: if unhealthy.is_empty() {
            "none".into()
        } else {
            unhealthy.join(", ")
        },
    })
}

/// What a renewal turn works with.
pub struct Renewal<'a, L: LockStore> {
    pub cfg: &'a crate::config::Config,
    pub kubeadm: &'a crate::kubeadm::Kubeadm,
    pub locker: &'a Locker<L>,
    /// This node's private IP (its etcd member's peer URL).
    pub private_ip: &'a str,
}

impl<L: LockStore> Renewal<'_, L> {
    /// One turn: reads the certificates, reports the soonest expiry, and
    /// renews them when due (and no back-off from `state` holds). Failures
    /// are the caller's to log; every outcome is metered here.
    pub async fn run_once(&self, state: &mut State) -> Result<Outcome, Error> {
        let dir = &self.cfg.paths.kubernetes_dir;
        let restored = restore_parked(dir)?;
        if restored > 0 {
            tracing::warn!(
                restored,
                "moved back static Pod manifests an interrupted certificate renewal had parked"
            );
        }
        let inv = inventory(dir);
        for problem in &inv.problems {
            crate::catalogue::report!(warn, problem, "cannot read a kubeadm certificate");
        }
        let Some(soonest) = inv.soonest_leaf().cloned() else {
            return Ok(Outcome::NoCertificates);
        };
        let now = SystemTime::now();
        let days = days_left(soonest.not_after, now);
        crate::metrics::record(crate::metrics::CERTIFICATE_DAYS_LEFT, days, &[]);
        let plan = plan(&inv.expiries, now, RENEW_BEFORE);
        if state.restart_pending {
            let due = match plan {
                Plan::Renew { due } => due,
                _ => Vec::new(),
            };
            tracing::info!(
                "renewed kubeadm certificates still wait for the control plane's restart"
            );
            return self.attempt(state, due).await;
        }
        match plan {
            Plan::Nothing => Ok(Outcome::Fine { days_left: days }),
            Plan::Warn { authorities } => {
                tracing::warn!(?authorities, hint = "kubeadm does not renew CAs: rotate them (kubernetes.io/docs/tasks/tls/manual-rotation-of-ca-certificates) or rebuild the cluster", "certificate authorities expire within the renewal window");
                Ok(Outcome::AuthoritiesExpiring { authorities })
            }
            Plan::Renew { due } => {
                tracing::info!(?due, soonest = %soonest.name, days_left = days, "kubeadm certificates expire soon; renewing under the membership lock");
                self.attempt(state, due).await
            }
        }
    }

    /// A renewal (or a pending restart) unless a back-off holds; meters it
    /// and sets the next back-off.
    async fn attempt(&self, state: &mut State, due: Vec<String>) -> Result<Outcome, Error> {
        if !may_attempt(state.not_before, Instant::now()) {
            tracing::debug!(
                ?due,
                "certificate renewal backing off after a failed attempt"
            );
            return Ok(Outcome::BackingOff { due });
        }
        let result = self.renew(&mut state.restart_pending).await;
        state.not_before = next_attempt(&result, Instant::now());
        if state.not_before.is_some() {
            tracing::warn!(
                retry_in = %crate::config::value::format_duration(RETRY_AFTER),
                "certificate renewal failed; backing off before the next attempt (restart the agent to try at once)"
            );
        }
        match result {
            Ok(days_left) => {
                crate::metrics::record(crate::metrics::CERTIFICATE_RENEWALS, 1.0, &[]);
                crate::metrics::record(crate::metrics::CERTIFICATE_DAYS_LEFT, days_left, &[]);
                tracing::info!(
                    days_left,
                    "kubeadm certificates renewed; the control plane restarted with them"
                );
                Ok(Outcome::Renewed { days_left })
            }
            Err(e) => {
                let metric = if e.is_deferral() {
                    crate::metrics::CERTIFICATE_RENEWALS_DEFERRED
                } else {
                    crate::metrics::CERTIFICATE_RENEWAL_FAILURES
                };
                crate::metrics::record(metric, 1.0, &[]);
                Err(e)
            }
        }
    }

    /// Renewal under the membership lock; the soonest leaf's days left after.
    async fn renew(&self, restart_pending: &mut bool) -> Result<f64, Error> {
        let guard = self.locker.acquire(Purpose::Membership).await?;
        tracing::info!(
            fence = guard.fence().map(|f| f.value).unwrap_or_default(),
            "certificate renewal holds the membership lock"
        );
        guard
            .scoped(async |guard| {
                let result = tokio::select! {
                    r = self.renew_held(restart_pending) => r,
                    () = guard.lost() => Err(Error::Lock(crate::lock::Error::Lost {
                        purpose: Purpose::Membership,
                        reason: "lost during the certificate renewal".into(),
                    })),
                };
                // Whatever happened, this node's control plane must not stay down.
                restore_parked(&self.cfg.paths.kubernetes_dir)?;
                result
            })
            .await
    }

    async fn renew_held(&self, restart_pending: &mut bool) -> Result<f64, Error> {
        let dir = &self.cfg.paths.kubernetes_dir;
        let settings = crate::etcd::Settings::from_config(self.cfg);
        // Judged first so a deferral changes nothing on disk.
        self.keeps_quorum(&settings).await?;
        if !*restart_pending {
            let before = inventory(dir).expiries;
            self.kubeadm.certs_renew_all().await?;
            let after = inventory(dir).expiries;
            if !expiries_moved(&before, &after) {
                tracing::warn!(
                    "kubeadm renewed no certificate; the control plane is not restarted"
                );
                return check_renewed(&after, SystemTime::now(), RENEW_BEFORE);
            }
            self.mark_restart_pending(restart_pending, true);
            // kubeadm took a while: judge again right before the restart.
            self.keeps_quorum(&settings).await?;
        }
        // kubeadm's documentation: "you must restart the control plane
        // Pods": remove the static Pod manifests, wait for the kubelet's
        // file check, put them back.
        let parked = park(dir)?;
        tracing::info!(
            parked,
            wait_ms = file_check().as_millis() as u64,
            "static Pod manifests parked so the kubelet stops the control plane"
        );
        tokio::time::sleep(file_check()).await;
        restore_parked(dir)?;
        self.mark_restart_pending(restart_pending, false);
        tokio::time::sleep(file_check()).await;
        confirm_local_etcd(&settings, self.private_ip, self.cfg.etcd.promote_timeout).await?;
        check_renewed(&inventory(dir).expiries, SystemTime::now(), RENEW_BEFORE)
    }

    /// Records that renewed certificates wait for the restart that loads
    /// them, in memory and in a marker under `paths.state_dir`: the files
    /// on disk are fresh, so after an agent restart the plan alone would
    /// never restart the control plane, and its components would keep the
    /// old certificates until they expire.
    fn mark_restart_pending(&self, flag: &mut bool, pending: bool) {
        *flag = pending;
        let marker = restart_marker(&self.cfg.paths.state_dir);
        let written = if pending {
            std::fs::create_dir_all(&self.cfg.paths.state_dir).and_then(|()| {
                std::fs::write(
                    &marker,
                    b"renewed certificates wait for the control plane's restart\n",
                )
            })
        } else {
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        if let Err(e) = written {
            tracing::warn!(path = %marker.display(), error = %e, "cannot record whether the control plane's restart is pending; an agent restart may forget it");
        }
    }

    /// Asks etcd (through this node's member, each call under the etcd
    /// timeouts) for every member's health and judges the restart.
    async fn keeps_quorum(&self, settings: &crate::etcd::Settings) -> Result<(), Error> {
        let etcd = crate::etcd::Etcd::connect(&[settings.client_url(self.private_ip)], settings)
            .await
            .map_err(Error::QuorumUnknown)?;
        let members = etcd.members().await.map_err(Error::QuorumUnknown)?;
        // An alarm (NOSPACE) stops writes, not a restart: it does not
        // count against the members here.
        let health = etcd.health_for_removal(&members).await;
        restart_verdict(&health, &settings.peer_url(self.private_ip))
    }
}

/// Waits (up to `within`) until this node's etcd member answers as started,
/// voting and healthy again (I2's confirmation) after the restart.
pub async fn confirm_local_etcd(
    settings: &crate::etcd::Settings,
    ip: &str,
    within: Duration,
) -> Result<(), Error> {
    let etcd = crate::etcd::Etcd::connect(&[settings.client_url(ip)], settings)
        .await
        .map_err(Error::EtcdAfterRestart)?;
    etcd.confirm(&settings.peer_url(ip), within)
        .await
        .map_err(Error::EtcdAfterRestart)?;
    Ok(())
}

/// After a renewal: the soonest leaf's days left, or [`Error::NotRenewed`]
/// when leaves are still due (kubeadm skips what it cannot sign).
pub fn check_renewed(expiries: &[Expiry], now: SystemTime, window: Duration) -> Result<f64, Error> {
    let days = soonest(expiries, Kind::Leaf).map_or(0.0, |e| days_left(e.not_after, now));
    match plan(expiries, now, window) {
        Plan::Renew { due } => Err(Error::NotRenewed {
            names: due,
            days,
            window,
        }),
        _ => Ok(days),
    }
}

/// The marker of a pending restart (see `Renewal::mark_restart_pending`).
pub fn restart_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("certificates-restart-pending")
}

/// Watchdog name of the certificate loop (control planes).
pub const LOOP: &str = "certificates";

/// The daemon's certificate loop on a control plane: a turn every period
/// until `stop`; a failed turn is logged with its code and tried again
/// next turn.
pub async fn watch<L: LockStore>(renewal: Renewal<'_, L>, mut stop: crate::pacing::Stop) {
    let cfg = renewal.cfg;
    // A turn may wait for the lock, run kubeadm, restart and confirm etcd.
    let allowance = crate::pacing::allowance(cfg)
        + cfg.lock.acquire_timeout
        + cfg.timeouts.kubeadm_join
        + 2 * file_check()
        + cfg.etcd.promote_timeout;
    let mut state = State {
        restart_pending: restart_marker(&cfg.paths.state_dir).exists(),
        ..State::default()
    };
    loop {
        crate::systemd::beat(LOOP, allowance);
        // A stop must not wait for the membership lock (up to
        // lock.acquire_timeout) or a restart (2 x the kubelet's file check)
        // past the unit's stop timeout: the turn is dropped, and manifests
        // it parked are put back at once, so the control plane comes back.
        let stopping = {
            let turn = renewal.run_once(&mut state);
            tokio::pin!(turn);
            tokio::select! {
                result = &mut turn => {
                    match result {
                        Err(e) if e.is_deferral() => {
                            crate::catalogue::report!(warn, e, "certificate renewal deferred; retried next turn")
                        }
                        Err(e) => {
                            crate::catalogue::report!(error, e, "certificate renewal failed")
                        }
                        Ok(_) => {}
                    }
                    false
                }
                _ = crate::pacing::stopped(&mut stop) => true,
            }
        };
        if stopping {
            match restore_parked(&cfg.paths.kubernetes_dir) {
                Ok(0) => {}
                Ok(moved) => tracing::warn!(moved, "stopped during a certificate renewal: the static Pod manifests are back; the membership lock expires with its lease"),
                Err(e) => crate::catalogue::report!(error, e, "stopped during a certificate renewal and cannot put the static Pod manifests back"),
            }
            crate::systemd::done(LOOP);
            return;
        }
        let delay = crate::pacing::next_delay(
            cfg.daemon.period,
            cfg.daemon.jitter,
            u64::from(uuid::Uuid::new_v4().as_u128() as u32),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::pacing::stopped(&mut stop) => {
                crate::systemd::done(LOOP);
                return;
            }
        }
    }
}

/// Milliseconds since the epoch (display and JSON).
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Read { .. } => &crate::catalogue::CERT_READ,
            E::Parse { .. } => &crate::catalogue::CERT_PARSE,
            E::NotRenewed { .. } => &crate::catalogue::CERT_NOT_RENEWED,
            E::Restart { .. } => &crate::catalogue::CERT_RESTART,
            E::EtcdAfterRestart(_) => &crate::catalogue::CERT_ETCD_AFTER_RESTART,
            E::Deferred { .. } | E::QuorumUnknown(_) => &crate::catalogue::CERT_DEFERRED,
            E::Kubeadm(e) => e.entry(),
            E::Lock(e) => e.entry(),
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::Deferred { voters, .. } if *voters == 2 => Some(
                "a two-member etcd loses quorum during any restart: add a third control plane \
                 (or renew by hand in a maintenance window)"
                    .into(),
            ),
            Error::Kubeadm(e) => e.detail(),
            // Whether removing this member keeps quorum could not be judged:
            // what etcd's own failure says to check comes first.
            Error::QuorumUnknown(e) | Error::EtcdAfterRestart(e) => Some(e.hint()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;

    /// A self-signed ECDSA certificate, notAfter 2028-01-07T12:42:49Z (UTCTime).
    const UTC_TIME: &str = "-----BEGIN CERTIFICATE-----
MIIBLDCB0wIUbSqunGxmHVd6SHGXa6fDdo6iJ3kwCgYIKoZIzj0EAwIwGTEXMBUG
A1UEAwwOa3ViZS1hcGlzZXJ2ZXIwHhcNMjYxMjAzMTI0MjQ5WhcNMjgwMTA3MTI0
MjQ5WjAZMRcwFQYDVQQDDA5rdWJlLWFwaXNlcnZlcjBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABOe5XljDoI9Gy4uP4SFNRElEew+CRGLZyKNZH0FawmJwNoncsg4U
Hk4PBuuXDoyZZX9v3aWZTPoqB6wiakxn5nEwCgYIKoZIzj0EAwIDSAAwRQIgYHsc
pCOupcMyO+TAlgn1MNNUkRw9UE3U1YvOpQNTSyACIQDmtnRF1gD9jJ9n+3m0E9bp
Ie7/o0kGeggxM15bMAop8A==
-----END CERTIFICATE-----
";
    const UTC_TIME_NOT_AFTER: u64 = 1_830_861_769;

    /// The same key, notAfter 2054-04-20T12:42:53Z (GeneralizedTime, after 2049).
    const GENERALIZED_TIME: &str = "-----BEGIN CERTIFICATE-----
MIIBLjCB1QIUMVAUhyvxwzgxnK1RKNG4dusSM1cwCgYIKoZIzj0EAwIwGTEXMBUG
A1UEAwwOa3ViZS1hcGlzZXJ2ZXIwIBcNMjYxMjAzMTI0MjUzWhgPMjA1NDA0MjAx
MjQyNTNaMBkxFzAVBgNVBAMMDmt1YmUtYXBpc2VydmVyMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE57leWMOgj0bLi4/hIU1ESUR7D4JEYtnIo1kfQVrCYnA2idyy
DhQeTg8G65cOjJllf2/dpZlM+ioHrCJqTGfmcTAKBggqhkjOPQQDAgNIADBFAiA2
bKfyjtJ7W8sSw/WlNmTKC2mxbb2ijqMj0s6Kkh8xGgIhAP3QtGko4+GOM0Z+/FRg
v2pEMLmJOlqZVCHkOsmUmFHm
-----END CERTIFICATE-----
";
    const GENERALIZED_TIME_NOT_AFTER: u64 = 2_660_301_773;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn leaf(name: &str, not_after: SystemTime) -> Expiry {
        Expiry {
            name: name.into(),
            kind: Kind::Leaf,
            not_after,
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        assert_eq!(not_after(UTC_TIME.as_bytes()), Ok(at(UTC_TIME_NOT_AFTER)));
        assert_eq!(
            not_after(GENERALIZED_TIME.as_bytes()),
            Ok(at(GENERALIZED_TIME_NOT_AFTER))
        );
        // A bundle: the first certificate counts (the file's own).
        let bundle = format!("{GENERALIZED_TIME}{UTC_TIME}");
        assert_eq!(
            not_after(bundle.as_bytes()),
            Ok(at(GENERALIZED_TIME_NOT_AFTER))
        );
    }

    #[test]
    fn not_after_refuses_what_is_not_a_certificate() {
        assert!(not_after(b"").unwrap_err().contains("no PEM certificate"));
        let key = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(not_after(key.as_bytes())
            .unwrap_err()
            .contains("not an X.509"));
    }

    fn kubeconfig_json(user: serde_json::Value) -> String {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "k", "cluster": {"server": "https://api:6443"}}],
            "contexts": [{"name": "admin@k", "context": {"cluster": "k", "user": "admin"}}],
            "current-context": "admin@k",
            "users": [{"name": "other", "user": {"token": "x"}}, {"name": "admin", "user": user}],
        })
        .to_string()
    }

    #[test]
    fn a_kubeconfig_gives_its_current_users_embedded_certificate() {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(UTC_TIME);
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster:\n    server: https://api:6443\n\
             contexts:\n- name: admin@k\n  context:\n    cluster: k\n    user: kubernetes-admin\n\
             current-context: admin@k\nusers:\n- name: kubernetes-admin\n  user:\n    \
             client-certificate-data: {data}\n    client-key-data: c2VjcmV0\n"
        );
        let Ok(Some(ClientCert::Embedded(pem))) = kubeconfig_client_cert(&yaml) else {
            panic!("embedded certificate expected");
        };
        assert_eq!(not_after(&pem), Ok(at(UTC_TIME_NOT_AFTER)));
        let json = kubeconfig_json(serde_json::json!({"client-certificate-data": data}));
        assert!(matches!(
            kubeconfig_client_cert(&json),
            Ok(Some(ClientCert::Embedded(_)))
        ));
        let file = kubeconfig_json(serde_json::json!({"client-certificate": "pki/x.crt"}));
        assert_eq!(
            kubeconfig_client_cert(&file),
            Ok(Some(ClientCert::File("pki/x.crt".into())))
        );
        let none = kubeconfig_json(serde_json::json!({}));
        assert_eq!(kubeconfig_client_cert(&none), Ok(None));
        assert!(kubeconfig_client_cert("[").is_err());
    }

    #[test]
    fn the_plan_renews_leaves_within_the_window_and_only_warns_for_authorities() {
        let now = at(1_800_000_000);
        let far = now + 300 * DAY;
        let mut expiries = vec![
            leaf("apiserver", far),
            leaf("admin.conf", far),
            Expiry {
                name: "ca".into(),
                kind: Kind::Authority,
                not_after: now + 3000 * DAY,
            },
        ];
        assert_eq!(plan(&expiries, now, 30 * DAY), Plan::Nothing);

        expiries[1].not_after = now + 29 * DAY;
        assert_eq!(
            plan(&expiries, now, 30 * DAY),
            Plan::Renew {
                due: vec!["admin.conf".into()]
            }
        );
        // Already expired: still renewed (kubeadm signs locally).
        expiries[0].not_after = now - DAY;
        assert_eq!(
            plan(&expiries, now, 30 * DAY),
            Plan::Renew {
                due: vec!["apiserver".into(), "admin.conf".into()]
            }
        );
        // Exactly at the window's edge counts as due.
        expiries[0].not_after = far;
        expiries[1].not_after = now + 30 * DAY;
        assert!(matches!(plan(&expiries, now, 30 * DAY), Plan::Renew { .. }));

        // Leaves fine, a CA within the window: renewal cannot help.
        expiries[1].not_after = far;
        expiries[2].not_after = now + 10 * DAY;
        assert_eq!(
            plan(&expiries, now, 30 * DAY),
            Plan::Warn {
                authorities: vec!["ca".into()]
            }
        );
        assert_eq!(plan(&[], now, 30 * DAY), Plan::Nothing);
    }

    #[test]
    fn days_left_is_signed_with_one_decimal() {
        let now = at(1_800_000_000);
        assert_eq!(days_left(now + 30 * DAY, now), 30.0);
        assert_eq!(days_left(now + DAY / 2, now), 0.5);
        assert_eq!(days_left(now - 2 * DAY, now), -2.0);
    }

    #[test]
    fn the_inventory_reads_leaves_authorities_and_kubeconfigs_and_names_what_is_missing() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        assert!(inventory(dir.path()).is_empty(), "no pki/: nothing");
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(pki.join("etcd")).unwrap();
        for name in LEAF_FILES.iter().chain(AUTHORITY_FILES.iter()) {
            std::fs::write(pki.join(format!("{name}.crt")), GENERALIZED_TIME).unwrap();
        }
        std::fs::write(pki.join("etcd/peer.crt"), UTC_TIME).unwrap();
        let data = base64::engine::general_purpose::STANDARD.encode(GENERALIZED_TIME);
        for name in ["admin.conf", "controller-manager.conf"] {
            std::fs::write(
                dir.path().join(name),
                kubeconfig_json(serde_json::json!({"client-certificate-data": data})),
            )
            .unwrap();
        }
        // scheduler.conf missing; super-admin.conf absent (optional).
        let inv = inventory(dir.path());
        assert_eq!(
            inv.soonest_leaf().map(|e| e.name.as_str()),
            Some("etcd/peer")
        );
        assert_eq!(
            inv.soonest_leaf().map(|e| e.not_after),
            Some(at(UTC_TIME_NOT_AFTER))
        );
        assert_eq!(inv.expiries.len(), 7 + 3 + 2);
        assert_eq!(inv.problems.len(), 1, "{:?}", inv.problems);
        let e = &inv.problems[0];
        assert!(e.to_string().contains("scheduler.conf"), "{e}");
        assert_eq!(e.code(), "KB-CERT-001");
        std::fs::write(dir.path().join("scheduler.conf"), "[").unwrap();
        let inv = inventory(dir.path());
        assert_eq!(inv.problems[0].code(), "KB-CERT-002");
    }

    #[test]
    fn a_renewal_that_left_leaves_due_is_an_error_naming_them() {
        let now = at(1_800_000_000);
        let fresh = vec![
            leaf("apiserver", now + 365 * DAY),
            leaf("admin.conf", now + 364 * DAY),
        ];
        assert_eq!(check_renewed(&fresh, now, 30 * DAY).unwrap(), 364.0);
        let skipped = vec![
            leaf("apiserver", now + 365 * DAY),
            leaf("admin.conf", now + 3 * DAY),
        ];
        let err = check_renewed(&skipped, now, 30 * DAY).unwrap_err();
        assert_eq!(err.code(), "KB-CERT-003");
        assert!(err.to_string().contains("admin.conf"), "{err}");
        assert!(err.hint().contains("external CA"), "{}", err.hint());
    }

    fn member(id: u64, voter: bool, healthy: bool) -> crate::etcd::Health {
        use crate::testing;
        let m = if voter {
            testing::member(id)
        } else {
            testing::learner(id)
        };
        testing::health(m, healthy)
    }

    const OWN: &str = "https://10.0.0.1:2380";

    #[test]
    fn a_restart_waits_while_the_other_healthy_voters_miss_quorum_of_the_full_cluster() {
        // Three voters, all healthy: the other two are quorum of three.
        let all = [
            member(1, true, true),
            member(2, true, true),
            member(3, true, true),
        ];
        assert!(restart_verdict(&all, OWN).is_ok());
        // One dead (awaiting replacement): restarting leaves 1 of 3.
        let one_dead = [
            member(1, true, true),
            member(2, true, true),
            member(3, true, false),
        ];
        let err = restart_verdict(&one_dead, OWN).unwrap_err();
        assert_eq!(err.code(), "KB-CERT-006");
        assert!(err.is_deferral());
        assert!(err.to_string().contains("1 healthy of 3"), "{err}");
        assert!(err.to_string().contains("0000000000000003"), "{err}");
        // This node's own member unhealthy: the others still have quorum.
        let own_down = [
            member(1, true, false),
            member(2, true, true),
            member(3, true, true),
        ];
        assert!(restart_verdict(&own_down, OWN).is_ok());
        // Five voters, one dead: three others of five keep quorum; two dead do not.
        let mut five: Vec<_> = (1..=5).map(|i| member(i, true, i != 5)).collect();
        assert!(restart_verdict(&five, OWN).is_ok());
        five[3].healthy = false;
        assert!(restart_verdict(&five, OWN).is_err());
        // A learner neither counts nor helps.
        let learner = [
            member(1, true, true),
            member(2, true, true),
            member(4, false, true),
        ];
        assert!(restart_verdict(&learner, OWN).is_err());
        // A lone voter is the whole cluster: it restarts (no other way).
        assert!(restart_verdict(&[member(1, true, true)], OWN).is_ok());
        // Two voters: any restart loses quorum for its duration.
        let two = [member(1, true, true), member(2, true, true)];
        let err = restart_verdict(&two, OWN).unwrap_err();
        assert!(err.hint().contains("third control plane"), "{}", err.hint());
        // Nothing answered at all (our member not seen): deferred.
        assert!(restart_verdict(&[], OWN).is_err());
    }

    #[test]
    fn after_a_failed_renewal_the_next_attempt_waits_six_hours_but_a_deferral_does_not() {
        let t0 = Instant::now();
        assert!(may_attempt(None, t0));
        let failed: Result<f64, Error> = Err(Error::NotRenewed {
            names: vec!["apiserver".into()],
            days: 3.0,
            window: 30 * DAY,
        });
        let next = next_attempt(&failed, t0);
        assert_eq!(next, Some(t0 + RETRY_AFTER));
        assert_eq!(RETRY_AFTER, Duration::from_secs(6 * 3600));
        // Turns every 30 s: none within the six hours may try again.
        for turn in 1..(6 * 120) {
            assert!(!may_attempt(next, t0 + Duration::from_secs(30 * turn)));
        }
        assert!(may_attempt(next, t0 + RETRY_AFTER));
        assert!(may_attempt(next, t0 + RETRY_AFTER + Duration::from_secs(1)));
        // A success, a deferral, a lock wait that timed out: next turn.
        assert_eq!(next_attempt(&Ok(364.0), t0), None);
        let deferred: Result<f64, Error> = Err(Error::Deferred {
            healthy_others: 1,
            voters: 3,
            quorum: 2,
            unhealthy: "3".into(),
        });
        assert_eq!(next_attempt(&deferred, t0), None);
        let restart: Result<f64, Error> = Err(Error::Restart {
            from: "a".into(),
            to: "b".into(),
            source: std::io::Error::other("read-only"),
        });
        assert_eq!(next_attempt(&restart, t0), Some(t0 + RETRY_AFTER));
    }

    #[test]
    fn a_restart_follows_only_a_renewal_that_moved_some_expiry() {
        let now = at(1_800_000_000);
        let before = vec![
            leaf("apiserver", now + 5 * DAY),
            leaf("etcd/peer", now + 5 * DAY),
        ];
        assert!(!expiries_moved(&before, &before.clone()));
        let mut after = before.clone();
        after[1].not_after = now + 365 * DAY;
        assert!(expiries_moved(&before, &after));
        // A certificate that appeared (super-admin.conf written meanwhile).
        let mut grown = before.clone();
        grown.push(leaf("super-admin.conf", now + 365 * DAY));
        assert!(expiries_moved(&before, &grown));
        // One that went away is nothing to load.
        assert!(!expiries_moved(&before, &before[..1]));
    }

    #[tokio::test]
    async fn an_etcd_that_does_not_come_back_fails_with_its_own_code() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let settings = crate::etcd::Settings {
            scheme: crate::config::model::EtcdScheme::Http,
            client_port: port,
            peer_port: port,
            dial_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(200),
            pki_dir: PathBuf::from("/nonexistent"),
        };
        let err = confirm_local_etcd(&settings, "127.0.0.1", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "KB-CERT-005");
        assert!(err.hint().contains("crictl"), "{}", err.hint());
    }

    #[test]
    fn parked_manifests_go_back_and_a_second_restore_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        for name in ["etcd.yaml", "kube-apiserver.yaml"] {
            std::fs::write(manifests.join(name), name).unwrap();
        }
        assert_eq!(park(dir.path()).unwrap(), 2);
        assert!(!manifests.join("etcd.yaml").exists());
        assert_eq!(restore_parked(dir.path()).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(manifests.join("etcd.yaml")).unwrap(),
            "etcd.yaml"
        );
        assert_eq!(restore_parked(dir.path()).unwrap(), 0);
        // A manifest directory that cannot be written: the move fails with its code.
        std::fs::write(dir.path().join(PARKING_DIR).join("etcd.yaml"), "x").unwrap();
        std::fs::remove_dir_all(&manifests).unwrap();
        let err = restore_parked(dir.path()).unwrap_err();
        assert_eq!(err.code(), "KB-CERT-004");
    }
}
