//! [`JoinStore`]: the Secrets Manager secrets, the SSM discovery parameters
//! and the registry's fenced join pointer.

use super::wire::{decode_key_wire, decode_wire, encode_key_wire, encode_wire, epoch_ms};
use super::{Error, JoinMaterial, Malformed, SSM_CA_CERT_HASHES, SSM_ENDPOINT};
use crate::aws;
use crate::aws::secrets::Secrets;
use crate::aws::ssm::Parameters;
use crate::config::Config;
use crate::lock::Guard;
use crate::registry::{JoinPointer, Registry, RegistryStore};
use crate::secret::Secret;
use aws_config::SdkConfig;
use std::time::{Duration, SystemTime};

/// Reads and publishes join material: Secrets Manager for the secrets, SSM
/// for discovery values, the registry's fenced pointer for "which is current".
#[derive(Debug, Clone)]
pub struct JoinStore {
    secrets: Secrets,
    ssm: Parameters,
    secret_name: String,
    key_secret_name: String,
    ssm_prefix: String,
    /// The publication (`seq`) whose discovery values this store last wrote
    /// to SSM, so that the leader's next turn writes them again after a
    /// failed write, after a restart and after a change of leader
    /// ([`JoinStore::ensure_discovery`]); shared by clones.
    discovery_written: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
    /// The ClientRequestToken of the last version written to each secret,
    /// by the digest of its content: a step that writes the same content
    /// again (its earlier PutSecretValue applied but the answer was lost)
    /// sends the same token, which Secrets Manager treats as the same
    /// request (same token and content: no new version); shared by clones.
    request_tokens: std::sync::Arc<std::sync::Mutex<RequestTokens>>,
    /// After a failed repair ([`JoinStore::ensure_discovery`]): not before
    /// when to try again, and the wait that set it (doubled per failure, up
    /// to [`DISCOVERY_REPAIR_MAX_BACKOFF`]); cleared by a successful write.
    repair_backoff: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, Duration)>>>,
}

/// The longest wait between two repairs of the SSM discovery parameters
/// while SSM keeps refusing them.
pub const DISCOVERY_REPAIR_MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Per secret (token, key): the digest of the last content written and the
/// ClientRequestToken it was written with. Shows no digest in `Debug`.
#[derive(Default)]
struct RequestTokens([Option<([u8; 32], String)>; 2]);

impl std::fmt::Debug for RequestTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestTokens(..)")
    }
}

/// Which of the two secrets a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Token,
    Key,
}

impl JoinStore {
    /// From explicit clients (tests, the demo).
    pub fn new(
        secrets: aws_sdk_secretsmanager::Client,
        ssm: aws_sdk_ssm::Client,
        secret_name: impl Into<String>,
        key_secret_name: impl Into<String>,
        ssm_prefix: impl Into<String>,
    ) -> Self {
        JoinStore {
            discovery_written: Default::default(),
            request_tokens: Default::default(),
            repair_backoff: Default::default(),
            secrets: Secrets::new(secrets),
            ssm: Parameters::new(ssm),
            secret_name: secret_name.into(),
            key_secret_name: key_secret_name.into(),
            ssm_prefix: ssm_prefix.into(),
        }
    }

    /// Clients with the configured endpoint overrides, for `aws.join_secret`,
    /// `aws.certificate_key_secret` and `aws.ssm_prefix`.
    pub fn from_config(base: &SdkConfig, cfg: &Config) -> Self {
        let secrets = aws::secretsmanager_client(base, cfg);
        let ssm = aws::ssm_client(base, cfg);
        JoinStore::new(
            secrets,
            ssm,
            cfg.aws.join_secret.clone(),
            cfg.aws.certificate_key_secret.clone(),
            cfg.aws.ssm_prefix.clone(),
        )
    }

    /// The token secret's name.
    pub fn secret_name(&self) -> &str {
        &self.secret_name
    }

    /// The certificate-key secret's name.
    pub fn key_secret_name(&self) -> &str {
        &self.key_secret_name
    }

    fn name(&self, which: Which) -> &str {
        match which {
            Which::Token => &self.secret_name,
            Which::Key => &self.key_secret_name,
        }
    }

    /// Full name of the SSM parameter `name` under the prefix.
    pub fn parameter(&self, name: &str) -> String {
        parameter_name(&self.ssm_prefix, name)
    }

    /// Publishes `material` and makes it current: [`Self::stage`] after the
    /// current pointer, then [`Self::commit`]. A publisher that lost its lock
    /// fails before writing or at the fenced pointer.
    pub async fn publish<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
        guard: &Guard,
        material: &JoinMaterial,
        now: SystemTime,
    ) -> Result<JoinPointer, Error> {
        guard.fence()?;
        let previous = registry.join_pointer().await?;
        let pointer = self
            .stage(guard, material, previous.as_ref(), None, now)
            .await?;
        self.commit(registry, guard, &pointer).await?;
        Ok(pointer)
    }

    /// Writes `material`'s secret versions, not current yet, and returns the
    /// pointer that would make them current after `previous`:
    ///
    /// 1. the lock must still be held (fail fast, write nothing);
    /// 2. a new token-secret version (PutSecretValue, or CreateSecret if the
    ///    secret does not exist yet — the stack creates it in production) with
    ///    a ClientRequestToken made once per content, so the SDK's retries and
    ///    a caller's retry of the same `material` are idempotent (no second
    ///    version when an applied write lost its answer);
    /// 3. a new certificate-key version, unless `keep_key_version` names the
    ///    version already holding this material's key (a token-only refresh).
    ///
    /// Nothing is rotated in the cluster yet: a caller that creates a token or
    /// uploads certificates does so after this succeeded, so a failure here
    /// leaves the published material working.
    pub async fn stage(
        &self,
        guard: &Guard,
        material: &JoinMaterial,
        previous: Option<&JoinPointer>,
        keep_key_version: Option<String>,
        now: SystemTime,
    ) -> Result<JoinPointer, Error> {
        guard.fence()?;
        material.validate()?;
        let seq = previous.map_or(0, |p| p.seq) + 1;
        let token_body = encode_wire(material)?;
        // The two secrets are independent: written at once when both change.
        let (version, key_version) = match (encode_key_wire(material)?, keep_key_version) {
            (None, _) => (self.put_secret(Which::Token, &token_body, seq).await?, None),
            (Some(_), Some(kept)) => (
                self.put_secret(Which::Token, &token_body, seq).await?,
                Some(kept),
            ),
            (Some(body), None) => {
                let (version, key) = tokio::try_join!(
                    self.put_secret(Which::Token, &token_body, seq),
                    self.put_secret(Which::Key, &body, seq)
                )?;
                (version, Some(key))
            }
        };
        tracing::info!(secret = %self.secret_name, version = %version, key_version = key_version.as_deref(), "join material stored; not current until the pointer is published");
        Ok(material.pointer(version, key_version, seq, now))
    }

    /// Makes a staged `pointer` current:
    ///
    /// 1. the registry's join pointer, a FENCED compare-and-swap from
    ///    publication `seq - 1`: only now do readers see the new versions
    ///    ([`Self::commit_pointer`]);
    /// 2. then the SSM discovery parameters ([`Self::write_discovery`]).
    ///
    /// A publisher refused at 1 leaves orphan secret versions — possibly even
    /// labelled `AWSCURRENT` — that nobody reads, because readers follow the
    /// pointer, never the label. A publisher that fails at 2 (SSM still
    /// throttling after the SDK's attempts) leaves the publication complete
    /// for every joiner — secrets, pointer and, on a refresh, the token in
    /// the cluster agree — and only the discovery copy behind: the leader's
    /// next turn writes it ([`Self::ensure_discovery`]).
    pub async fn commit<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
        guard: &Guard,
        pointer: &JoinPointer,
    ) -> Result<(), Error> {
        self.commit_pointer(registry, guard, pointer).await?;
        self.write_discovery(registry, pointer).await
    }

    /// Step 1 of [`Self::commit`]: the fenced pointer.
    pub async fn commit_pointer<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
        guard: &Guard,
        pointer: &JoinPointer,
    ) -> Result<(), Error> {
        registry.publish_join(guard, pointer).await?;
        tracing::info!(
            secret = %self.secret_name,
            version = %pointer.secret_version,
            seq = pointer.seq,
            token_expires_at_ms = epoch_ms(pointer.token_expires_at),
            certs_expire_at_ms = pointer.certs_expire_at.map(epoch_ms),
            "join material published"
        );
        Ok(())
    }

    /// Step 2 of [`Self::commit`]: the SSM discovery parameters (not secret,
    /// unfenced: SSM has no conditional write), written only after the
    /// fenced pointer, so a publisher that lost its lock never reaches them;
    /// and read back against the pointer afterwards, so that of two
    /// publishers racing here the values of the current pointer are the
    /// ones left.
    pub async fn write_discovery<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
        pointer: &JoinPointer,
    ) -> Result<(), Error> {
        self.put_discovery(pointer).await?;
        if let Some(current) = registry.join_pointer().await? {
            if current.seq != pointer.seq {
                tracing::info!(
                    seq = pointer.seq,
                    current = current.seq,
                    "a newer publication landed meanwhile; writing its discovery values"
                );
                self.put_discovery(&current).await?;
            }
        }
        Ok(())
    }

    /// The leader's repair, every turn: writes the discovery values of
    /// `pointer` (the current publication) unless this store already wrote
    /// them. So a publish that stopped after the pointer (SSM throttled),
    /// a restarted daemon and a new leader each write them once, and
    /// nothing is written turn after turn (which would itself provoke
    /// `TooManyUpdates`). After a failed repair the next waits
    /// `first_backoff`, then twice as long after each further failure, up
    /// to [`DISCOVERY_REPAIR_MAX_BACKOFF`] (in memory). Returns whether it
    /// wrote.
    pub async fn ensure_discovery<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
        pointer: &JoinPointer,
        first_backoff: Duration,
    ) -> Result<bool, Error> {
        if self.written_seq() == Some(pointer.seq) {
            return Ok(false);
        }
        let now = std::time::Instant::now();
        let previous = *self
            .repair_backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((not_before, _)) = previous {
            if now < not_before {
                return Ok(false);
            }
        }
        tracing::info!(
            seq = pointer.seq,
            "writing the discovery parameters of the current join material"
        );
        let result = self.write_discovery(registry, pointer).await;
        let next = match &result {
            Ok(()) => None,
            Err(_) => {
                let wait = previous
                    .map_or(first_backoff, |(_, last)| last.saturating_mul(2))
                    .min(DISCOVERY_REPAIR_MAX_BACKOFF);
                Some((std::time::Instant::now() + wait, wait))
            }
        };
        *self
            .repair_backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        result.map(|()| true)
    }

    fn written_seq(&self) -> Option<u64> {
        *self
            .discovery_written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_written_seq(&self, seq: Option<u64>) {
        *self
            .discovery_written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = seq;
    }

    async fn put_discovery(&self, pointer: &JoinPointer) -> Result<(), Error> {
        // Forget first: a write that fails half-way must be done again.
        self.set_written_seq(None);
        // Two parameters, two writes at once.
        let hashes = pointer.ca_cert_hashes.join(",");
        tokio::try_join!(
            self.put_parameter(SSM_ENDPOINT, &pointer.endpoint),
            self.put_parameter(SSM_CA_CERT_HASHES, &hashes)
        )?;
        self.set_written_seq(Some(pointer.seq));
        Ok(())
    }

    /// The current material with its certificate key (a control plane's
    /// view): the versions the registry points at, or `None` if nothing was
    /// published yet.
    pub async fn current<S: RegistryStore>(
        &self,
        registry: &Registry<S>,
    ) -> Result<Option<JoinMaterial>, Error> {
        match registry.join_pointer().await? {
            Some(pointer) => self.read(&pointer).await.map(Some),
            None => Ok(None),
        }
    }

    /// The material `pointer` names with its certificate key, for control
    /// planes (the only role that may read the key secret).
    pub async fn read(&self, pointer: &JoinPointer) -> Result<JoinMaterial, Error> {
        let Some(key_version) = &pointer.key_version else {
            return self.read_token(pointer).await;
        };
        // Both secrets at once.
        let (mut material, body) = tokio::try_join!(
            self.read_token(pointer),
            self.get_secret(Which::Key, key_version)
        )?;
        let (key, expires_at) =
            decode_key_wire(body.expose()).map_err(|source| Error::Malformed {
                secret: self.key_secret_name.clone(),
                version: key_version.clone(),
                source,
            })?;
        material.certificate_key = Some(key);
        material.certs_expire_at = Some(expires_at);
        Ok(material)
    }

    /// The material `pointer` names without the certificate key: what a
    /// worker reads (its role cannot read the key secret, and never asks).
    /// Checked against the pointer (a version that disagrees is refused).
    pub async fn read_token(&self, pointer: &JoinPointer) -> Result<JoinMaterial, Error> {
        let version = pointer.secret_version.as_str();
        let body = self.get_secret(Which::Token, version).await?;
        let material = decode_wire(body.expose()).map_err(|source| Error::Malformed {
            secret: self.secret_name.clone(),
            version: version.to_string(),
            source,
        })?;
        let mismatch = |what| Error::PointerMismatch {
            secret: self.secret_name.clone(),
            version: version.to_string(),
            what,
        };
        if material.endpoint != pointer.endpoint {
            return Err(mismatch("endpoint"));
        }
        if material.ca_cert_hashes != pointer.ca_cert_hashes {
            return Err(mismatch("CA pins"));
        }
        Ok(material)
    }

    /// The body of one secret version, as a [`Secret`].
    async fn get_secret(&self, which: Which, version: &str) -> Result<Secret<String>, Error> {
        let name = self.name(which);
        self.secrets
            .get_string(name, version)
            .await?
            .ok_or_else(|| Error::Malformed {
                secret: name.to_string(),
                version: version.to_string(),
                source: Malformed::NotAString,
            })
    }

    /// Writes a new version of one secret (creating the secret on its first
    /// write) and returns its VersionId.
    async fn put_secret(
        &self,
        which: Which,
        body: &Secret<String>,
        seq: u64,
    ) -> Result<String, Error> {
        // One token per content: the SDK's retries, the fallback put after
        // a concurrent create and the caller's step retries of the same
        // publication are then idempotent.
        let request_token = self.request_token(which, body, seq);
        let description = match which {
            Which::Token => "kubeboot join material: bootstrap token, endpoint, CA pins (the registry's join pointer names the current version)",
            Which::Key => "kubeboot certificate key for control-plane joins; control-plane role only (the registry's join pointer names the current version)",
        };
        Ok(self
            .secrets
            .put(self.name(which), &request_token, body, description)
            .await?)
    }

    /// The ClientRequestToken for writing `body` to secret `which`: the one
    /// the last write of the same content for the same publication used, or
    /// a new one.
    fn request_token(&self, which: Which, body: &Secret<String>, seq: u64) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(self.name(which).as_bytes());
        hasher.update([0]);
        hasher.update(body.expose().as_bytes());
        // The publication too: a later publication with the same content (a
        // certificates-only refresh keeps the token's secret as it was) gets
        // a new version, so its pointer names a new secret version and the
        // REFRESH request it answers (keyed on the stale version) is met.
        hasher.update(seq.to_be_bytes());
        let digest: [u8; 32] = hasher.finalize().into();
        let mut tokens = self
            .request_tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = match which {
            Which::Token => &mut tokens.0[0],
            Which::Key => &mut tokens.0[1],
        };
        match slot {
            Some((last, token)) if *last == digest => token.clone(),
            _ => {
                let token = uuid::Uuid::new_v4().to_string();
                *slot = Some((digest, token.clone()));
                token
            }
        }
    }

    async fn put_parameter(&self, name: &str, value: &str) -> Result<(), Error> {
        Ok(self.ssm.put_string(&self.parameter(name), value).await?)
    }
}

/// `prefix/name` with exactly one slash between them.
fn parameter_name(prefix: &str, name: &str) -> String {
    format!("{}/{name}", prefix.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_names_have_one_slash() {
        assert_eq!(
            parameter_name("/kubeboot/prod", "endpoint"),
            "/kubeboot/prod/endpoint"
        );
        assert_eq!(
            parameter_name("/kubeboot/prod/", SSM_CA_CERT_HASHES),
            "/kubeboot/prod/ca-cert-hashes"
        );
    }
}
