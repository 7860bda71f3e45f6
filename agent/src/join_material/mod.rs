//! Join material for `kubeadm join`: the bootstrap token, the certificate key
//! for `--control-plane` joins, the CA public-key pins and the endpoint.
//!
//! Nodes boot at any time, long after `kubeadm init`, but kubeadm's bootstrap
//! tokens expire (24 h) and the uploaded control-plane certificates are deleted
//! (2 h). So the material is generated here, published where every node can
//! read it, and refreshed by the leader before it runs out.
//!
//! Where it lives:
//! - the secrets in TWO Secrets Manager secrets, split by who may read them:
//!   the bootstrap token (with the endpoint and CA pins) in `aws.join_secret`,
//!   which every node reads ([`encode_wire`]); the certificate key in
//!   `aws.certificate_key_secret`, which only the control-plane role may read
//!   ([`encode_key_wire`]). The key decrypts kubeadm's uploaded `ca.key`,
//!   `etcd/ca.key` and `sa.key`, and a bootstrap token may read the uploaded
//!   Secret: a worker that could read both would own the cluster;
//! - the non-secret discovery values (endpoint, CA pins) also in SSM
//!   parameters under `aws.ssm_prefix`, for operators and tools;
//! - which secret version is *current* in the registry's fenced join pointer
//!   ([`crate::registry::JoinPointer`]). Readers never trust `AWSCURRENT`:
//!   a publisher that lost its lock may still have written a newer version.
//!
//! Secrets only ever travel inside [`Secret`]; the places that expose them
//! are [`encode_wire`] and [`encode_key_wire`], which build the secret bodies.

mod generate;
mod store;
mod wire;

pub use generate::{
    ca_cert_hash, generate_certificate_key, generate_token, is_ca_cert_hash, is_certificate_key,
    is_endpoint, is_token, MAX_BODY_BYTES, MAX_CA_PINS,
};
pub use store::{JoinStore, DISCOVERY_REPAIR_MAX_BACKOFF};
pub use wire::{decode_key_wire, decode_wire, encode_key_wire, encode_wire};

use crate::registry::JoinPointer;
use crate::retry::{Classify, RetryClass};
use crate::secret::Secret;
use std::time::{Duration, SystemTime};

/// Lifetime of a bootstrap token: kubeadm's default `ttl`, which is what the
/// token is created with.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Lifetime of the uploaded control-plane certificates: kubeadm deletes the
/// `kubeadm-certs` Secret two hours after `--upload-certs`.
pub const CERTS_TTL: Duration = Duration::from_secs(2 * 60 * 60);

/// Version of the wire format this agent writes and reads. A reader refuses
/// other versions rather than guessing at fields it does not know. Format 1
/// kept the certificate key in the token secret every node can read; 2
/// splits them.
pub const WIRE_FORMAT: u32 = 2;

/// Name of the SSM parameter (under `aws.ssm_prefix`) holding the endpoint.
pub const SSM_ENDPOINT: &str = "endpoint";

/// Name of the SSM parameter (under `aws.ssm_prefix`) holding the CA pins,
/// comma-separated as `kubeadm join` takes them one flag each.
pub const SSM_CA_CERT_HASHES: &str = "ca-cert-hashes";

/// Characters of a bootstrap token, as kubeadm validates them.
const TOKEN_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Bytes of a certificate key: kubeadm wants AES-256, 32 bytes, in hex.
const CERTIFICATE_KEY_BYTES: usize = 32;

// ---------------------------------------------------------------------------
// Errors

/// Why the material could not be parsed, without echoing any of it: a body
/// that failed to parse may still hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not valid JSON ({category} error at line {line}, column {column})")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("missing field `{0}`")]
    MissingField(String),
    #[error("wire format {found} is not the one this agent reads ({WIRE_FORMAT}); is a newer kubeboot publishing?")]
    Format { found: u64 },
    #[error("field `{field}` is not {expected}")]
    Field {
        field: &'static str,
        expected: &'static str,
    },
    #[error("the secret version has no SecretString (binary secret?)")]
    NotAString,
    #[error("the body is {bytes} bytes; real join material is under 1 KiB and at most {limit} bytes are read")]
    TooLarge { bytes: usize, limit: usize },
}

/// Join material failures, each naming the secret or parameter involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot compute the CA public-key pin: {reason}")]
    CaCert { reason: String },
    #[error("join material is not publishable: {reason}")]
    Invalid { reason: String },
    #[error("join secret {secret} version {version}: {source}")]
    Malformed {
        secret: String,
        version: String,
        #[source]
        source: Malformed,
    },
    #[error("join secret {secret} version {version} disagrees with the registry's join pointer about the {what}")]
    PointerMismatch {
        secret: String,
        version: String,
        what: &'static str,
    },
    #[error("Secrets Manager {operation} on secret {secret}: {message}")]
    SecretsManager {
        operation: &'static str,
        secret: String,
        class: RetryClass,
        message: String,
    },
    #[error("SSM {operation} on parameter {parameter}: {message}")]
    Ssm {
        operation: &'static str,
        parameter: String,
        class: RetryClass,
        message: String,
    },
    #[error("publishing join material: {0}")]
    Lock(#[from] crate::lock::Error),
    #[error("join material: {0}")]
    Registry(#[from] crate::registry::Error),
}

impl Error {
    /// The AWS call behind a failure that is AWS weather (throttling, 5xx,
    /// timeouts after the SDK's attempts): what a waiting step counts.
    pub fn weather(&self) -> Option<crate::retry::AwsCall> {
        use crate::retry::AwsCall;
        match self {
            Error::SecretsManager {
                operation,
                class: RetryClass::Transient,
                ..
            } => Some(AwsCall {
                service: "SecretsManager",
                operation,
            }),
            Error::Ssm {
                operation,
                class: RetryClass::Transient,
                ..
            } => Some(AwsCall {
                service: "SSM",
                operation,
            }),
            Error::Lock(e) => e.weather(),
            Error::Registry(e) => e.weather(),
            _ => None,
        }
    }
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::SecretsManager { class, .. } | Error::Ssm { class, .. } => *class,
            e if e.weather().is_some() => RetryClass::Transient,
            _ => RetryClass::Permanent,
        }
    }
}

impl From<crate::aws::secrets::Error> for Error {
    fn from(e: crate::aws::secrets::Error) -> Self {
        Error::SecretsManager {
            operation: e.operation,
            secret: e.secret,
            class: e.class,
            message: e.message,
        }
    }
}

impl From<crate::aws::ssm::Error> for Error {
    fn from(e: crate::aws::ssm::Error) -> Self {
        Error::Ssm {
            operation: e.operation,
            parameter: e.parameter,
            class: e.class,
            message: e.message,
        }
    }
}

// ---------------------------------------------------------------------------
// The material

/// Everything a node needs to run `kubeadm join`, with the expiries the
/// refresher watches. `Debug` redacts the token and the certificate key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinMaterial {
    /// Bootstrap token `[a-z0-9]{6}.[a-z0-9]{16}`.
    pub token: Secret<String>,
    /// `--certificate-key` for control-plane joins; `None` when no
    /// certificates are uploaded (workers only).
    pub certificate_key: Option<Secret<String>>,
    /// `sha256:<hex>` pins of the cluster CA(s).
    pub ca_cert_hashes: Vec<String>,
    /// `host:port` of the API server (the NLB).
    pub endpoint: String,
    pub token_expires_at: SystemTime,
    /// When kubeadm deletes the uploaded certificates (`None`: not uploaded).
    pub certs_expire_at: Option<SystemTime>,
}

/// What must be refreshed before the material can be handed to a joiner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Both still have more than their margins left.
    Nothing,
    /// A new token is needed (create it with kubeadm, then publish).
    Token,
    /// New certificates are needed (re-upload with a new key, then publish).
    Certs,
    /// Both.
    Both,
}

impl Refresh {
    fn of(token: bool, certs: bool) -> Refresh {
        match (token, certs) {
            (false, false) => Refresh::Nothing,
            (true, false) => Refresh::Token,
            (false, true) => Refresh::Certs,
            (true, true) => Refresh::Both,
        }
    }

    /// Whether the token must be replaced.
    pub fn token(self) -> bool {
        matches!(self, Refresh::Token | Refresh::Both)
    }

    /// Whether the certificates must be re-uploaded under a new key.
    pub fn certs(self) -> bool {
        matches!(self, Refresh::Certs | Refresh::Both)
    }
}

/// Whether `expires_at` is at most `margin` away from `now` (or past).
fn runs_out(expires_at: SystemTime, now: SystemTime, margin: Duration) -> bool {
    match expires_at.duration_since(now) {
        Ok(left) => left <= margin,
        Err(_) => true,
    }
}

impl JoinMaterial {
    /// Its secret values (the token, and the certificate key when there is
    /// one): what kubeadm's output is scrubbed of.
    pub fn secrets(&self) -> Vec<&Secret<String>> {
        std::iter::once(&self.token)
            .chain(self.certificate_key.as_ref())
            .collect()
    }

    /// New material with a new token and, for control-plane joins, a new
    /// certificate key. Take `now` *before* kubeadm creates the token or
    /// uploads the certificates, so the recorded expiries are never later
    /// than the real ones.
    pub fn fresh(
        endpoint: impl Into<String>,
        ca_cert_hashes: Vec<String>,
        now: SystemTime,
        with_certs: bool,
    ) -> JoinMaterial {
        JoinMaterial {
            token: generate_token(),
            certificate_key: with_certs.then(generate_certificate_key),
            ca_cert_hashes,
            endpoint: endpoint.into(),
            token_expires_at: now + TOKEN_TTL,
            certs_expire_at: with_certs.then_some(now + CERTS_TTL),
        }
    }

    /// What must be refreshed so that a node joining within the margins can
    /// still use the material. Missing certificates count as needing a
    /// refresh; a caller serving only workers looks at [`Refresh::token`].
    pub fn refresh_needed(
        &self,
        now: SystemTime,
        token_margin: Duration,
        certs_margin: Duration,
    ) -> Refresh {
        let token = runs_out(self.token_expires_at, now, token_margin);
        let certs = match (&self.certificate_key, self.certs_expire_at) {
            (Some(_), Some(at)) => runs_out(at, now, certs_margin),
            _ => true,
        };
        Refresh::of(token, certs)
    }

    /// This material with what `refresh` names replaced by new values
    /// (expiries from `now`); the endpoint and CA pins are kept.
    pub fn refreshed(&self, refresh: Refresh, now: SystemTime) -> JoinMaterial {
        let mut next = self.clone();
        if refresh.token() {
            next.token = generate_token();
            next.token_expires_at = now + TOKEN_TTL;
        }
        if refresh.certs() {
            next.certificate_key = Some(generate_certificate_key());
            next.certs_expire_at = Some(now + CERTS_TTL);
        }
        next
    }

    /// The registry's pointer to this material once stored as `secret_version`
    /// (and its key as `key_version`), publication `seq`.
    pub fn pointer(
        &self,
        secret_version: String,
        key_version: Option<String>,
        seq: u64,
        published_at: SystemTime,
    ) -> JoinPointer {
        JoinPointer {
            secret_version,
            key_version,
            seq,
            endpoint: self.endpoint.clone(),
            ca_cert_hashes: self.ca_cert_hashes.clone(),
            token_expires_at: self.token_expires_at,
            certs_expire_at: self.certs_expire_at,
            published_at,
        }
    }

    /// Refuses material that would publish a broken join command (SSM also
    /// rejects empty values).
    fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: &str| {
            Err(Error::Invalid {
                reason: reason.into(),
            })
        };
        if !is_endpoint(&self.endpoint) {
            return invalid("the endpoint is not host:port");
        }
        if self.ca_cert_hashes.is_empty() || self.ca_cert_hashes.len() > MAX_CA_PINS {
            return invalid("there is no CA pin, or more than 16");
        }
        if !self.ca_cert_hashes.iter().all(|h| is_ca_cert_hash(h)) {
            return invalid("a CA pin is not sha256:<64 hex digits>");
        }
        if !is_token(self.token.expose()) {
            return invalid("the token does not have kubeadm's shape");
        }
        if self
            .certificate_key
            .as_ref()
            .is_some_and(|k| !is_certificate_key(k.expose()))
        {
            return invalid("the certificate key is not 64 hex digits");
        }
        Ok(())
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::{Error as E, Malformed as M};
        match self {
            E::CaCert { .. } => &crate::catalogue::JOIN_CA_CERT,
            E::Invalid { .. } => &crate::catalogue::JOIN_INVALID,
            E::Malformed { source, .. } => match source {
                M::Format { .. } => &crate::catalogue::JOIN_FORMAT,
                M::Json { .. }
                | M::MissingField(_)
                | M::Field { .. }
                | M::NotAString
                | M::TooLarge { .. } => &crate::catalogue::JOIN_MALFORMED,
            },
            E::PointerMismatch { .. } => &crate::catalogue::JOIN_POINTER_MISMATCH,
            E::SecretsManager { class, .. } => match class {
                RetryClass::Permanent => &crate::catalogue::JOIN_SECRETS_DENIED,
                RetryClass::Transient => &crate::catalogue::JOIN_SECRETS_UNAVAILABLE,
            },
            E::Ssm { class, .. } => match class {
                RetryClass::Permanent => &crate::catalogue::JOIN_SSM_DENIED,
                RetryClass::Transient => &crate::catalogue::JOIN_SSM_UNAVAILABLE,
            },
            E::Lock(e) => e.entry(),
            E::Registry(e) => e.entry(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;
    use std::time::UNIX_EPOCH;

    /// `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=kubernetes -days 3650`
    const RSA_CA: &str = "-----BEGIN CERTIFICATE-----
MIIDCzCCAfOgAwIBAgIUd3tnunFm6bTXT4DkFKJBHn0awlUwDQYJKoZIhvcNAQEL
BQAwFTETMBEGA1UEAwwKa3ViZXJuZXRlczAeFw0yNjExMjIwNTU2MTFaFw0zNjEx
MTkwNTU2MTFaMBUxEzARBgNVBAMMCmt1YmVybmV0ZXMwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQCf3RO9mfm5tF2R0AxsJyUuoG8gsWkrGgmRvWyLPDx5
RAiXxEz+BOJfXbIJ1s86aHV9z7YCKnvGH8uBG+h4MYpNtXraGAcQmzDXaJpFv5z0
sPe+uVquIcBfwgZOG0yyPbu09zyexhOTcCEDJ9fc9lxS1yN6yWhk3JCoh32tx+jl
VYKkvgfN/aZV5kcj/lvSeecl9A9bEEMy5WLdTWzpwtNweHeqFTPFwTtoG2oo49MK
IWifjRywIFDvfmo/qnXDEOc1j4rIxWjsmSKx/DzzGlhe7IadNrUlwUGDpL8PDTvh
lMASRybQRHWyfk/Lpfou6m87yxifbLJuL4Ug8l7PvDrzAgMBAAGjUzBRMB0GA1Ud
DgQWBBS8cxpoyI4q2qVKatzW9odFnIApYzAfBgNVHSMEGDAWgBS8cxpoyI4q2qVK
atzW9odFnIApYzAPBgNVHRMBAf8EBTADAQH/MA0GCSqGSIb3DQEBCwUAA4IBAQAc
UIzbRTPS0PWEoLeZQDUOyh555UNVZ5qFE1cAAzwhqKqEZW9zsYFk++T2RvXYpwya
UYyoGAYKK6KBJnzc3tfJOusuH+VzaahJifOEoUG5NtprcvLKWtzCW+hE0yPXIw+U
CKIW7AstCSQdgEHQDGu8UYjVnkRB6eWlhz0YY6BoOSjXYGvnGiYHJ4Inhk/UFwDr
S5bwdb9MV/RSlxdZsgnKfhCkgBYj+Xk8b8/FedFRrF3cTapA6LiW3eMbYvrSJQhF
Undd0B1aSnuGzrROt8sXWD1AGtzLh+T383iVd3U40A4DkzFzLWohNTl4iIJeCudE
Zz6WqA/OynXzOaCHpQdz
-----END CERTIFICATE-----
";
    /// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum` of [`RSA_CA`].
    const RSA_CA_HASH: &str =
        "sha256:649e2295ff5ae398516a30b486a07233eb1bc54c115f0d493243c267e4331dd8";

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=kubernetes -days 3650`
    const EC_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBfzCCASWgAwIBAgIUH2UgBQIjMelY2v1N5CPWc/arGQgwCgYIKoZIzj0EAwIw
FTETMBEGA1UEAwwKa3ViZXJuZXRlczAeFw0yNjExMjIwNTU2MTFaFw0zNjExMTkw
NTU2MTFaMBUxEzARBgNVBAMMCmt1YmVybmV0ZXMwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARfu4jarPflxaBVsc6R3ABxuFaIGxTvbNONIdjzG5tg36HgTBWRRVVh
IM3J/wMjXoOBIMOuGQN+3IF+ghUIH3Vao1MwUTAdBgNVHQ4EFgQU2GC7Ita8t8LO
o/s50q3rBdeYRY0wHwYDVR0jBBgwFoAU2GC7Ita8t8LOo/s50q3rBdeYRY0wDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiB9wz19P8zMz4Q4VuQ/Miwn
h2V6xequDmgQgZ4b6pwYVAIhAPiiffJZBMPyq6qRAiP4DngZU9fJ6rxIIYPGLnXJ
tPZ7
-----END CERTIFICATE-----
";
    /// The same pipeline on [`EC_CA`].
    const EC_CA_HASH: &str =
        "sha256:eab84a226a5abee70af11820fc043974165014e236acaaad019eb8573f37baf2";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn material() -> JoinMaterial {
        JoinMaterial {
            token: Secret::new("abcdef.0123456789abcdef".into()),
            certificate_key: Some(Secret::new("0f".repeat(32))),
            ca_cert_hashes: vec![RSA_CA_HASH.into()],
            endpoint: "api.example.internal:6443".into(),
            token_expires_at: UNIX_EPOCH + Duration::from_millis(1_900_000_000_123),
            certs_expire_at: Some(UNIX_EPOCH + Duration::from_millis(1_800_007_200_456)),
        }
    }

    #[test]
    fn ca_pins_match_the_openssl_pipeline() {
        assert_eq!(ca_cert_hash(RSA_CA.as_bytes()).expect("rsa"), RSA_CA_HASH);
        assert_eq!(ca_cert_hash(EC_CA.as_bytes()).expect("ec"), EC_CA_HASH);
        // A bundle pins its first certificate; a leading key block is skipped.
        let bundle = format!("{RSA_CA}{EC_CA}");
        assert_eq!(
            ca_cert_hash(bundle.as_bytes()).expect("bundle"),
            RSA_CA_HASH
        );
        let combined =
            format!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{EC_CA}");
        assert_eq!(
            ca_cert_hash(combined.as_bytes()).expect("combined"),
            EC_CA_HASH
        );
        // Windows line endings and no final newline.
        let crlf = RSA_CA.trim_end().replace('\n', "\r\n");
        assert_eq!(ca_cert_hash(crlf.as_bytes()).expect("crlf"), RSA_CA_HASH);
        assert!(is_ca_cert_hash(RSA_CA_HASH) && is_ca_cert_hash(EC_CA_HASH));
    }

    #[test]
    fn a_garbage_pem_is_an_error_that_does_not_echo_it() {
        let garbage = "-----BEGIN CERTIFICATE-----\nc2VjcmV0LXN0dWZmLW5vdC1hLWNlcnQ=\n-----END CERTIFICATE-----\n";
        let e = ca_cert_hash(garbage.as_bytes()).expect_err("garbage");
        let text = format!("{e} {e:?}");
        assert!(matches!(e, Error::CaCert { .. }), "{text}");
        assert!(!text.contains("c2VjcmV0"), "{text}");
        assert!(!e.hint().is_empty());
        let e = ca_cert_hash(b"abcdef.0123456789abcdef is no PEM").expect_err("no pem");
        assert!(!format!("{e} {e:?}").contains("abcdef.0123456789abcdef"));
        // A truncated certificate.
        let cut = format!("{}\n-----END CERTIFICATE-----\n", &RSA_CA[..400]);
        assert!(ca_cert_hash(cut.as_bytes()).is_err());
    }

    #[test]
    fn refresh_needed_by_remaining_time() {
        let token_margin = Duration::from_secs(3600);
        let certs_margin = Duration::from_secs(600);
        let now = at(1_000_000);
        let with = |token_left: i64, certs_left: Option<i64>| {
            let shift = |left: i64| {
                if left >= 0 {
                    now + Duration::from_secs(left.unsigned_abs())
                } else {
                    now - Duration::from_secs(left.unsigned_abs())
                }
            };
            JoinMaterial {
                token_expires_at: shift(token_left),
                certificate_key: certs_left.map(|_| Secret::new("0f".repeat(32))),
                certs_expire_at: certs_left.map(shift),
                ..material()
            }
        };
        let cases: &[(&str, i64, Option<i64>, Refresh)] = &[
            ("both plenty", 20 * 3600, Some(3600), Refresh::Nothing),
            ("token inside margin", 3599, Some(3600), Refresh::Token),
            ("token exactly at margin", 3600, Some(3600), Refresh::Token),
            (
                "token just outside margin",
                3601,
                Some(3600),
                Refresh::Nothing,
            ),
            ("token expired", -5, Some(3600), Refresh::Token),
            ("certs inside margin", 20 * 3600, Some(599), Refresh::Certs),
            ("certs expired", 20 * 3600, Some(-1), Refresh::Certs),
            ("certs never uploaded", 20 * 3600, None, Refresh::Certs),
            ("both expiring", 60, Some(60), Refresh::Both),
            ("token expired, no certs", -1, None, Refresh::Both),
        ];
        for (name, token_left, certs_left, want) in cases {
            let got =
                with(*token_left, *certs_left).refresh_needed(now, token_margin, certs_margin);
            assert_eq!(got, *want, "{name}");
        }
        // A key without an expiry (or the reverse) is treated as missing.
        let odd = JoinMaterial {
            certs_expire_at: None,
            ..with(20 * 3600, Some(3600))
        };
        assert_eq!(
            odd.refresh_needed(now, token_margin, certs_margin),
            Refresh::Certs
        );
        assert!(Refresh::Both.token() && Refresh::Both.certs());
        assert!(!Refresh::Nothing.token() && !Refresh::Nothing.certs());
    }

    #[test]
    fn fresh_and_refreshed_material_have_new_secrets_and_expiries() {
        let now = at(1_800_000_000);
        let m = JoinMaterial::fresh("api:6443", vec![EC_CA_HASH.into()], now, true);
        assert!(is_token(m.token.expose()));
        assert!(m
            .certificate_key
            .as_ref()
            .is_some_and(|k| is_certificate_key(k.expose())));
        assert_eq!(m.token_expires_at, now + TOKEN_TTL);
        assert_eq!(m.certs_expire_at, Some(now + CERTS_TTL));
        assert_eq!(
            m.refresh_needed(now, Duration::from_secs(3600), Duration::from_secs(600)),
            Refresh::Nothing
        );
        m.validate().expect("valid");

        let workers = JoinMaterial::fresh("api:6443", vec![EC_CA_HASH.into()], now, false);
        assert_eq!(
            (workers.certificate_key.as_ref(), workers.certs_expire_at),
            (None, None)
        );

        let later = now + Duration::from_secs(3 * 3600);
        let r = m.refreshed(Refresh::Certs, later);
        assert_eq!(
            (r.token.clone(), r.token_expires_at),
            (m.token.clone(), m.token_expires_at)
        );
        assert_ne!(r.certificate_key, m.certificate_key);
        assert_eq!(r.certs_expire_at, Some(later + CERTS_TTL));
        let r = m.refreshed(Refresh::Token, later);
        assert_ne!(r.token, m.token);
        assert_eq!(r.token_expires_at, later + TOKEN_TTL);
        assert_eq!(r.certificate_key, m.certificate_key);
    }

    #[test]
    fn debug_and_errors_show_no_token_or_key() {
        let m = material();
        for text in [format!("{m:?}"), format!("{m:#?}")] {
            assert!(!text.contains("abcdef.0123456789abcdef"), "{text}");
            assert!(!text.contains(&"0f".repeat(32)), "{text}");
            assert!(text.contains("api.example.internal:6443"), "{text}");
        }
        let body = encode_wire(&m).expect("encode");
        assert!(!format!("{body:?} {body}").contains("abcdef"));
        let key = encode_key_wire(&m).expect("encode").expect("a key");
        assert!(!format!("{key:?} {key}").contains("0f0f"));
    }

    #[test]
    fn the_token_and_the_certificate_key_are_written_to_different_bodies() {
        let m = material();
        let body = encode_wire(&m).expect("encode");
        let json: serde_json::Value = serde_json::from_str(body.expose()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "format": 2,
                "token": "abcdef.0123456789abcdef",
                "ca_cert_hashes": [RSA_CA_HASH],
                "endpoint": "api.example.internal:6443",
                "token_expires_at": 1_900_000_000_123u64,
            })
        );
        assert!(
            !body.expose().contains(&"0f".repeat(32)),
            "no key in the token secret"
        );
        let key = encode_key_wire(&m).expect("encode").expect("a key");
        let json: serde_json::Value = serde_json::from_str(key.expose()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "format": 2,
                "certificate_key": "0f".repeat(32),
                "certs_expire_at": 1_800_007_200_456u64,
            })
        );
        assert!(
            !key.expose().contains("abcdef"),
            "no token in the key secret"
        );

        let workers = JoinMaterial {
            certificate_key: None,
            certs_expire_at: None,
            ..m.clone()
        };
        assert_eq!(decode_wire(body.expose()).expect("decode"), workers);
        assert_eq!(
            decode_key_wire(key.expose()).expect("decode"),
            (
                m.certificate_key.clone().expect("key"),
                m.certs_expire_at.expect("expiry")
            )
        );
        assert!(encode_key_wire(&workers).expect("encode").is_none());
        // Sub-millisecond precision is rounded down, never up.
        let precise = JoinMaterial {
            token_expires_at: at(10) + Duration::from_nanos(999_999),
            ..workers
        };
        let back = decode_wire(encode_wire(&precise).expect("encode").expose()).expect("decode");
        assert_eq!(back.token_expires_at, at(10));
    }

    #[test]
    fn a_token_secret_carrying_a_certificate_key_is_refused() {
        // What format 1 wrote: the key beside the token, readable by workers.
        let good = encode_wire(&material()).expect("encode").expose().clone();
        let leaky = good.replacen(
            '{',
            &format!("{{\"certificate_key\":\"{}\",", "0f".repeat(32)),
            1,
        );
        let e = decode_wire(&leaky).expect_err("a key in the token secret");
        assert_eq!(
            e,
            Malformed::Field {
                field: "certificate_key",
                expected: "absent (the key lives in the control-plane-only secret)"
            }
        );
        assert!(!format!("{e} {e:?}").contains("0f0f"));
        assert_eq!(
            decode_wire(&good.replace("\"format\":2", "\"format\":1")).expect_err("old"),
            Malformed::Format { found: 1 }
        );
    }

    #[test]
    fn malformed_bodies_are_reported_without_their_content() {
        let token = "abcdef.0123456789abcdef";
        let good = encode_wire(&material()).expect("encode").expose().clone();
        let cases = [
            ("not json", format!("token={token}")),
            ("truncated", good[..good.len() - 10].to_string()),
            (
                "wrong type",
                good.replace("\"format\":2", &format!("\"format\":\"{token}\"")),
            ),
            (
                "token wrong type",
                good.replace(&format!("\"{token}\""), "12345"),
            ),
            ("bad token", good.replace(token, "ABCDEF.0123456789ABCDEF")),
            (
                "missing",
                good.replace(&format!("\"token\":\"{token}\","), ""),
            ),
            ("newer", good.replace("\"format\":2", "\"format\":3")),
            (
                "no pins",
                good.replace(&format!("[\"{RSA_CA_HASH}\"]"), "[]"),
            ),
            (
                "shell in the endpoint",
                good.replace("\"endpoint\":\"", "\"endpoint\":\"$(curl evil);"),
            ),
            ("oversized", format!("{good}{}", " ".repeat(MAX_BODY_BYTES))),
        ];
        for (name, body) in cases {
            let e = decode_wire(&body).expect_err(name);
            let text = format!("{e} {e:?}");
            assert!(!text.contains("0123456789"), "{name}: {text}");
            assert!(!text.contains(&"0f".repeat(32)), "{name}: {text}");
        }
        assert_eq!(
            decode_wire(&good.replace(&format!("\"token\":\"{token}\","), ""))
                .expect_err("missing"),
            Malformed::MissingField("token".into())
        );
        assert_eq!(
            decode_wire(&good.replace("\"format\":2", "\"format\":3")).expect_err("newer"),
            Malformed::Format { found: 3 }
        );
        for endpoint in [
            "api:6443 --v=9",
            "api;reboot:6443",
            "api:99999",
            "`id`:6443",
            "",
        ] {
            let body = good.replace("api.example.internal:6443", endpoint);
            assert!(
                matches!(
                    decode_wire(&body),
                    Err(Malformed::Field {
                        field: "endpoint",
                        ..
                    })
                ),
                "{endpoint:?}"
            );
        }
        assert!(matches!(
            decode_wire(&" ".repeat(MAX_BODY_BYTES + 1)),
            Err(Malformed::TooLarge { .. })
        ));
        let key = encode_key_wire(&material())
            .expect("encode")
            .expect("key")
            .expose()
            .clone();
        for (name, body) in [
            ("short key", key.replace(&"0f".repeat(32), "0f0f")),
            (
                "upper-case key",
                key.replace(&"0f".repeat(32), &"0F".repeat(32)),
            ),
            (
                "no expiry",
                key.replace(",\"certs_expire_at\":1800007200456", ""),
            ),
        ] {
            let e = decode_key_wire(&body).expect_err(name);
            assert!(!format!("{e} {e:?}").contains("0f0f"), "{name}: {e}");
        }
    }

    #[test]
    fn publishing_refuses_material_that_would_break_a_join() {
        assert!(material().validate().is_ok());
        let no_pins = JoinMaterial {
            ca_cert_hashes: vec![],
            ..material()
        };
        assert!(matches!(no_pins.validate(), Err(Error::Invalid { .. })));
        let no_endpoint = JoinMaterial {
            endpoint: " ".into(),
            ..material()
        };
        assert!(no_endpoint.validate().is_err());
        let bad_key = JoinMaterial {
            certificate_key: Some(Secret::new("short".into())),
            ..material()
        };
        let e = bad_key.validate().expect_err("bad key");
        assert!(!format!("{e}").contains("short"));
    }
}
