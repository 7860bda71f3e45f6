//! The leader's join-material refresh: a new bootstrap token before the
//! current one runs out (24 h), and the control-plane certificates uploaded
//! under a new key when a control plane asks for them.
//!
//! The certificates are not kept uploaded around the clock: the uploaded
//! `kubeadm-certs` Secret holds the cluster's CA keys, readable with a
//! bootstrap token, and only a control plane's join needs it. So it exists
//! after `kubeadm init` (the first control planes join then) and for two
//! hours after a joining control plane asked, no longer.
//!
//! Who may ask for what: a request read from the request partition (which
//! workers can write) gets a token at most; only a request from the cluster
//! partition (control-plane role only) can rotate the certificate key. And
//! every rotation on request is rate-limited, so no node can make the
//! leader rotate every turn.
//!
//! kubeadm gets the new token and key in 0600 configuration files, never on
//! its command line (any local user can read /proc/*/cmdline). The new
//! secret versions are written BEFORE kubeadm rotates anything, and the
//! pointer is checked to be still the one refreshed, so a refresh that cannot
//! publish does not invalidate the published key. The new material becomes
//! current only through the registry's fenced JOIN pointer, so a leader that
//! lost its lock cannot publish.

use crate::config::Config;
use crate::join_material::{self, JoinMaterial, JoinStore, Refresh};
use crate::kubeadm::{self, config as kcfg, Kubeadm};
use crate::lock::Guard;
use crate::registry::{JoinPointer, Origin, RefreshRequest, Registry, RegistryStore};
use std::time::{Duration, SystemTime};

/// Refresh the token when less than this is left (of its 24 h).
pub const TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(6 * 60 * 60);
/// On a control plane's request, re-upload the certificates when less than
/// this is left (of their 2 h), whatever the rate limit says.
pub const CERTS_REFRESH_BEFORE: Duration = Duration::from_secs(30 * 60);
/// A request rotates the token at most this often.
pub const MIN_TOKEN_ROTATION: Duration = Duration::from_secs(10 * 60);
/// A request rotates the certificate key at most this often.
pub const MIN_CERTS_ROTATION: Duration = Duration::from_secs(10 * 60);

/// Refresh failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    JoinMaterial(#[from] join_material::Error),
    #[error(transparent)]
    Kubeadm(#[from] kubeadm::Error),
    #[error("join material publication {seen} was replaced by {now} while refreshing; nothing was rotated")]
    Superseded { seen: u64, now: u64 },
}

/// How long ago something with lifetime `ttl` that expires at `expires_at`
/// was made.
fn age(expires_at: SystemTime, ttl: Duration, now: SystemTime) -> Duration {
    now.duration_since(expires_at.checked_sub(ttl).unwrap_or(expires_at))
        .unwrap_or(Duration::ZERO)
}

/// What to refresh now: a token that runs out within the schedule, plus what
/// the pending requests for the current version may have:
/// - a worker's request (any request from the request partition): the token
///   only, whatever it names;
/// - a control plane's: the token and/or the certificates;
/// - either only if what it asks for was last rotated at least
///   [`MIN_TOKEN_ROTATION`] / [`MIN_CERTS_ROTATION`] ago (certificates that
///   are missing or within [`CERTS_REFRESH_BEFORE`] of their end are always
///   re-uploaded for a control plane).
pub fn plan(
    material: &JoinMaterial,
    current_version: &str,
    requests: &[RefreshRequest],
    now: SystemTime,
) -> Refresh {
    let scheduled = material.refresh_needed(now, TOKEN_REFRESH_BEFORE, CERTS_REFRESH_BEFORE);
    let mut token = scheduled.token();
    let mut certs = false;
    let token_age = age(material.token_expires_at, join_material::TOKEN_TTL, now);
    let certs_due = scheduled.certs()
        || material
            .certs_expire_at
            .is_some_and(|at| age(at, join_material::CERTS_TTL, now) >= MIN_CERTS_ROTATION);
    for r in requests
        .iter()
        .filter(|r| r.stale_version == current_version)
    {
        let asks_token = r.what.token();
        let asks_certs = r.what.certs();
        token |= asks_token && token_age >= MIN_TOKEN_ROTATION;
        certs |= asks_certs && r.origin == Origin::ControlPlane && certs_due;
    }
    match (token, certs) {
        (false, false) => Refresh::Nothing,
        (true, false) => Refresh::Token,
        (false, true) => Refresh::Certs,
        (true, true) => Refresh::Both,
    }
}

/// Whether `e` says the material is in a wire format older than this
/// agent's (a cluster upgraded from a kubeboot that kept the key beside the
/// token): the leader can replace it, as nobody else can.
fn older_format(e: &join_material::Error) -> bool {
    matches!(
        e,
        join_material::Error::Malformed {
            source: join_material::Malformed::Format { found },
            ..
        } if *found < u64::from(join_material::WIRE_FORMAT)
    )
}

/// Stand-in material for a pointer this agent cannot read: its endpoint and
/// CA pins, a token already expired (so the schedule replaces it now) and
/// no certificates (uploaded when a control plane asks).
fn replacement(pointer: &JoinPointer) -> JoinMaterial {
    JoinMaterial {
        token: join_material::generate_token(),
        certificate_key: None,
        ca_cert_hashes: pointer.ca_cert_hashes.clone(),
        endpoint: pointer.endpoint.clone(),
        token_expires_at: std::time::UNIX_EPOCH,
        certs_expire_at: None,
    }
}

/// One refresh turn; returns the new pointer when something was refreshed.
pub async fn run_once<S: RegistryStore>(
    cfg: &Config,
    kubeadm: &Kubeadm,
    join: &JoinStore,
    registry: &Registry<S>,
    guard: &Guard,
) -> Result<Option<JoinPointer>, Error> {
    let Some(pointer) = registry.join_pointer().await? else {
        return Ok(None);
    };
    if let Ok(age) = SystemTime::now().duration_since(pointer.published_at) {
        crate::metrics::record(crate::metrics::JOIN_MATERIAL_AGE, age.as_secs_f64(), &[]);
    }
    let material = match join.read(&pointer).await {
        Ok(material) => material,
        Err(e) if older_format(&e) => {
            tracing::warn!(version = %pointer.secret_version, error = %e, "the current join material was published by an older kubeboot; replacing it with a new token (control planes ask for certificates when they join)");
            replacement(&pointer)
        }
        Err(e) => return Err(e.into()),
    };
    let requests = registry.refresh_requests().await?;
    let now = SystemTime::now();
    let refresh = plan(&material, &pointer.secret_version, &requests, now);
    for r in requests
        .iter()
        .filter(|r| r.stale_version == pointer.secret_version)
    {
        if r.origin == Origin::Worker && r.what.certs() {
            tracing::warn!(requested_by = %r.requested_by, what = %r.what, "a refresh request from the worker partition asks for the certificates; workers are given a token only");
        }
    }
    if refresh == Refresh::Nothing {
        // A publish that stopped after its pointer (SSM still throttling
        // after the SDK's attempts), a restart or a new leader: the
        // discovery copy is written again here, once; after a failure not
        // before a backoff (a turn, doubling up to 5 minutes). Its failure
        // does not fail the turn.
        if let Err(e) = join
            .ensure_discovery(registry, &pointer, cfg.daemon.period)
            .await
        {
            crate::catalogue::report!(
                warn,
                e,
                "cannot write the SSM discovery parameters; tried again later"
            );
        }
        return Ok(None);
    }
    tracing::info!(?refresh, version = %pointer.secret_version, "refreshing join material");
    let next = material.refreshed(refresh, now);
    // The secrets first, then check the pointer is still ours to move: only
    // then rotate in the cluster (an uploaded key replaces the published one).
    let keep_key = (!refresh.certs())
        .then(|| pointer.key_version.clone())
        .flatten();
    let staged = join
        .stage(guard, &next, Some(&pointer), keep_key, SystemTime::now())
        .await?;
    guard.fence().map_err(join_material::Error::from)?;
    let seen = registry.join_pointer().await?.map_or(0, |p| p.seq);
    if seen != pointer.seq {
        return Err(Error::Superseded {
            seen: pointer.seq,
            now: seen,
        });
    }
    if refresh.token() {
        let rendered = kcfg::render_token(&next.token, join_material::TOKEN_TTL);
        kubeadm.token_create(&rendered, &[&next.token]).await?;
    }
    if refresh.certs() {
        if let Some(key) = &next.certificate_key {
            let dir = cfg.paths.kubernetes_dir.display().to_string();
            let rendered = kcfg::render_upload_certs(key, &dir);
            kubeadm.upload_certs(&rendered, &[key]).await?;
        }
    }
    // The pointer first: from here joiners are served. The SSM discovery
    // copy after it; its weather does not fail the turn (the next turns
    // repair it, [`JoinStore::ensure_discovery`]), as in the bootstrap's
    // publication.
    join.commit_pointer(registry, guard, &staged).await?;
    if let Err(e) = join.write_discovery(registry, &staged).await {
        let Some(call) = e.weather() else {
            return Err(e.into());
        };
        crate::retry::note_weather("write the discovery parameters", call, &e);
        crate::catalogue::report!(warn, e, "the fresh join material is published; the SSM discovery parameters are left to the next turns");
    }
    tracing::info!(version = %staged.secret_version, seq = staged.seq, "fresh join material published");
    Ok(Some(staged))
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Registry(e) => e.entry(),
            E::JoinMaterial(e) => e.entry(),
            E::Kubeadm(e) => e.entry(),
            E::Superseded { .. } => &crate::catalogue::JOIN_SUPERSEDED,
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
    use super::*;
    use crate::secret::Secret;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const HOUR: u64 = 3600;
    const NOW: u64 = 100 * HOUR;

    /// Material whose token has `token_left_h` hours and whose certificates
    /// have `certs_left_min` minutes left.
    fn material(token_left_h: u64, certs_left_min: Option<u64>) -> JoinMaterial {
        JoinMaterial {
            token: Secret::new("abcdef.0123456789abcdef".into()),
            certificate_key: certs_left_min.map(|_| Secret::new("0f".repeat(32))),
            ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
            endpoint: "api:6443".into(),
            token_expires_at: at(NOW + token_left_h * HOUR),
            certs_expire_at: certs_left_min.map(|m| at(NOW + m * 60)),
        }
    }

    fn request(origin: Origin, what: &str, version: &str) -> RefreshRequest {
        RefreshRequest {
            origin,
            requested_by: "i-0new".into(),
            what: crate::registry::Wants::parse(what),
            stale_version: version.into(),
            requested_at: at(0),
        }
    }

    fn cp(what: &str) -> RefreshRequest {
        request(Origin::ControlPlane, what, "v1")
    }

    fn worker(what: &str) -> RefreshRequest {
        request(Origin::Worker, what, "v1")
    }

    #[test]
    fn the_schedule_renews_the_token_but_never_uploads_certificates_on_its_own() {
        let now = at(NOW);
        assert_eq!(
            plan(&material(20, Some(90)), "v1", &[], now),
            Refresh::Nothing
        );
        assert_eq!(plan(&material(5, Some(90)), "v1", &[], now), Refresh::Token);
        // Certificates running out, or gone: nobody asked, nothing uploaded.
        assert_eq!(
            plan(&material(20, Some(20)), "v1", &[], now),
            Refresh::Nothing
        );
        assert_eq!(plan(&material(20, None), "v1", &[], now), Refresh::Nothing);
        assert_eq!(plan(&material(1, Some(1)), "v1", &[], now), Refresh::Token);
    }

    #[test]
    fn a_control_plane_gets_certificates_uploaded_when_it_asks() {
        let now = at(NOW);
        // Uploaded 100 min ago (20 left) or gone: uploaded now.
        assert_eq!(
            plan(&material(20, Some(20)), "v1", &[cp("certs")], now),
            Refresh::Certs
        );
        assert_eq!(
            plan(&material(20, None), "v1", &[cp("certs")], now),
            Refresh::Certs
        );
        assert_eq!(
            plan(&material(5, None), "v1", &[cp("both")], now),
            Refresh::Both
        );
        // A request about an older version was already answered.
        assert_eq!(
            plan(&material(20, Some(20)), "v2", &[cp("certs")], now),
            Refresh::Nothing
        );
    }

    #[test]
    fn a_worker_may_ask_for_a_token_only() {
        let now = at(NOW);
        // Tokens made 4 h ago: the request is honoured for the token only.
        for what in ["token", "both", "certs"] {
            let expected = if what == "certs" {
                Refresh::Nothing
            } else {
                Refresh::Token
            };
            assert_eq!(
                plan(&material(20, Some(20)), "v1", &[worker(what)], now),
                expected,
                "{what}"
            );
        }
        // Even with no certificates uploaded at all.
        assert_eq!(
            plan(&material(20, None), "v1", &[worker("both")], now),
            Refresh::Token
        );
    }

    #[test]
    fn rotations_on_request_are_rate_limited() {
        let now = at(NOW);
        // A token made 5 minutes ago (24 h minus 5 min left) is not rotated
        // again on anyone's request; nor certificates uploaded 5 minutes ago.
        let fresh = JoinMaterial {
            token_expires_at: now + join_material::TOKEN_TTL - Duration::from_secs(300),
            certs_expire_at: Some(now + join_material::CERTS_TTL - Duration::from_secs(300)),
            ..material(0, Some(0))
        };
        for r in [cp("both"), worker("both"), cp("token"), cp("certs")] {
            assert_eq!(
                plan(&fresh, "v1", std::slice::from_ref(&r), now),
                Refresh::Nothing,
                "{r:?}"
            );
        }
        // Eleven minutes later both may be rotated again.
        let later = now + Duration::from_secs(660);
        assert_eq!(plan(&fresh, "v1", &[cp("both")], later), Refresh::Both);
    }
}
