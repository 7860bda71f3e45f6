//! The leader's join-material refresh: a new bootstrap token before the
//! current one runs out (24 h), the control-plane certificates re-uploaded
//! under a new key before kubeadm deletes them (2 h), and at once when a
//! joiner's REFRESH request names the current version.
//!
//! kubeadm gets the new token and key in 0600 configuration files, never on
//! its command line (any local user can read /proc/*/cmdline). The new
//! material becomes current only through the registry's fenced JOIN pointer,
//! so a leader that lost its lock cannot publish.

use crate::config::Config;
use crate::join_material::{self, JoinMaterial, JoinStore, Refresh};
use crate::kubeadm::{self, config as kcfg, Kubeadm};
use crate::lock::Guard;
use crate::registry::{JoinPointer, RefreshRequest, Registry, RegistryStore};
use std::time::{Duration, SystemTime};

/// Refresh the token when less than this is left (of its 24 h).
pub const TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(6 * 60 * 60);
/// Re-upload the certificates when less than this is left (of their 2 h).
pub const CERTS_REFRESH_BEFORE: Duration = Duration::from_secs(30 * 60);

/// Refresh failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    JoinMaterial(#[from] join_material::Error),
    #[error(transparent)]
    Kubeadm(#[from] kubeadm::Error),
}

impl Error {
    /// What the operator should check.
    pub fn hint(&self) -> String {
        match self {
            Error::Registry(e) => e.hint(),
            Error::JoinMaterial(e) => e.hint(),
            Error::Kubeadm(e) => e.hint(),
        }
    }
}

/// What to refresh now: what runs out within the schedule, plus what a
/// pending request for the current version asks for.
pub fn plan(
    material: &JoinMaterial,
    current_version: &str,
    request: Option<&RefreshRequest>,
    now: SystemTime,
) -> Refresh {
    let scheduled = material.refresh_needed(now, TOKEN_REFRESH_BEFORE, CERTS_REFRESH_BEFORE);
    let (mut token, mut certs) = (scheduled.token(), scheduled.certs());
    if let Some(r) = request.filter(|r| r.stale_version == current_version) {
        token |= matches!(r.what.as_str(), "token" | "both");
        certs |= matches!(r.what.as_str(), "certs" | "both");
    }
    // Material published for workers only has no certificates to refresh.
    certs &= material.certificate_key.is_some();
    match (token, certs) {
        (false, false) => Refresh::Nothing,
        (true, false) => Refresh::Token,
        (false, true) => Refresh::Certs,
        (true, true) => Refresh::Both,
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
    let material = join.read(&pointer).await?;
    let request = registry.refresh_request().await?;
    let now = SystemTime::now();
    let refresh = plan(&material, &pointer.secret_version, request.as_ref(), now);
    if refresh == Refresh::Nothing {
        return Ok(None);
    }
    tracing::info!(?refresh, version = %pointer.secret_version, requested_by = request.as_ref().map(|r| r.requested_by.as_str()), "refreshing join material");
    let next = material.refreshed(refresh, now);
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
    let published = join
        .publish(registry, guard, &next, SystemTime::now())
        .await?;
    tracing::info!(version = %published.secret_version, "fresh join material published");
    Ok(Some(published))
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

    fn material(token_left_h: u64, certs_left_min: Option<u64>) -> JoinMaterial {
        let now = 100 * HOUR;
        JoinMaterial {
            token: Secret::new("abcdef.0123456789abcdef".into()),
            certificate_key: certs_left_min.map(|_| Secret::new("0f".repeat(32))),
            ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
            endpoint: "api:6443".into(),
            token_expires_at: at(now + token_left_h * HOUR),
            certs_expire_at: certs_left_min.map(|m| at(now + m * 60)),
        }
    }

    fn request(what: &str, version: &str) -> RefreshRequest {
        RefreshRequest {
            requested_by: "i-0new".into(),
            what: what.into(),
            stale_version: version.into(),
            requested_at: at(0),
        }
    }

    #[test]
    fn the_schedule_refreshes_what_runs_out_and_requests_add_to_it() {
        let now = at(100 * HOUR);
        assert_eq!(
            plan(&material(20, Some(90)), "v1", None, now),
            Refresh::Nothing
        );
        assert_eq!(
            plan(&material(5, Some(90)), "v1", None, now),
            Refresh::Token
        );
        assert_eq!(
            plan(&material(20, Some(20)), "v1", None, now),
            Refresh::Certs
        );
        assert_eq!(plan(&material(1, Some(1)), "v1", None, now), Refresh::Both);
        // A request for the current version adds what it names...
        let fresh = material(20, Some(90));
        assert_eq!(
            plan(&fresh, "v1", Some(&request("token", "v1")), now),
            Refresh::Token
        );
        assert_eq!(
            plan(&fresh, "v1", Some(&request("certs", "v1")), now),
            Refresh::Certs
        );
        assert_eq!(
            plan(&fresh, "v1", Some(&request("both", "v1")), now),
            Refresh::Both
        );
        // ...and one for an older version was already answered.
        assert_eq!(
            plan(&fresh, "v2", Some(&request("both", "v1")), now),
            Refresh::Nothing
        );
    }

    #[test]
    fn material_without_certificates_only_ever_refreshes_the_token() {
        let now = at(100 * HOUR);
        let workers_only = material(20, None);
        assert_eq!(
            plan(&workers_only, "v1", Some(&request("both", "v1")), now),
            Refresh::Token
        );
        assert_eq!(
            plan(&workers_only, "v1", Some(&request("certs", "v1")), now),
            Refresh::Nothing
        );
    }
}
