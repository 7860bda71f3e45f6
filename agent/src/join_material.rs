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

use crate::aws;
use crate::config::Config;
use crate::lock::Guard;
use crate::registry::{JoinPointer, Registry, RegistryStore};
use crate::retry::{classify_sdk_error, Classify, RetryClass};
use crate::secret::Secret;
use aws_config::SdkConfig;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

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

// ---------------------------------------------------------------------------
// Generation (pure, OS randomness)

/// Fills `buf` from the operating system's CSPRNG.
///
/// # Panics
/// If the OS has no working random source. On Linux `getrandom(2)` blocks
/// until the pool is seeded and does not fail otherwise; if it ever did, no
/// fallback is acceptable: a guessable token lets anyone join the cluster.
fn os_random(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system's random number generator failed ({e}); refusing to generate a guessable secret");
    }
}

/// `n` characters drawn uniformly from `alphabet` by rejection sampling: a
/// byte is used only below the largest multiple of the alphabet's size, so
/// no character is more likely than another (kubeadm draws uniformly too).
fn sample(alphabet: &[u8], n: usize, fill: &mut dyn FnMut(&mut [u8])) -> String {
    let size = alphabet.len();
    let limit = 256 - 256 % size;
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        fill(&mut buf);
        for &b in &buf {
            if usize::from(b) < limit && out.len() < n {
                out.push(char::from(alphabet[usize::from(b) % size]));
            }
        }
    }
    out
}

/// A fresh kubeadm bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}` (token id and
/// secret). Generated here, not by kubeadm, so it can be published before and
/// independently of `kubeadm init`'s output.
pub fn generate_token() -> Secret<String> {
    let id = sample(TOKEN_ALPHABET, 6, &mut os_random);
    let secret = sample(TOKEN_ALPHABET, 16, &mut os_random);
    Secret::new(format!("{id}.{secret}"))
}

/// A fresh `--certificate-key`: 32 random bytes in lowercase hex, the AES key
/// kubeadm encrypts the uploaded control-plane certificates with.
pub fn generate_certificate_key() -> Secret<String> {
    let mut key = [0u8; CERTIFICATE_KEY_BYTES];
    os_random(&mut key);
    Secret::new(hex(&key))
}

/// Whether `s` has the shape of a bootstrap token.
pub fn is_token(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| TOKEN_ALPHABET.contains(c);
    b.len() == 23 && b[..6].iter().all(ok) && b[6] == b'.' && b[7..].iter().all(ok)
}

/// Whether `s` has the shape of a certificate key (64 lowercase hex digits).
pub fn is_certificate_key(s: &str) -> bool {
    s.len() == 2 * CERTIFICATE_KEY_BYTES && is_lower_hex(s)
}

/// Largest secret body read: real material is about 400 bytes (Secrets
/// Manager allows 64 KiB); anything bigger is refused before parsing.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// More CA pins than any CA rotation needs.
pub const MAX_CA_PINS: usize = 16;

/// Whether `s` is an API server endpoint `host:port` (DNS name or IP
/// literal, port 1-65535): nothing else may reach kubeadm's configuration.
pub fn is_endpoint(s: &str) -> bool {
    s.len() <= 261 && crate::config::value::split_host_port(s).is_some()
}

/// Whether `s` has the shape of a CA pin, `sha256:` and 64 lowercase hex digits.
pub fn is_ca_cert_hash(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && is_lower_hex(h))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The `--discovery-token-ca-cert-hash` pin of the first certificate in
/// `pem`: `sha256:` and the hex SHA-256 of its DER SubjectPublicKeyInfo, as
/// kubeadm computes it (and as `openssl x509 -pubkey -noout | openssl pkey
/// -pubin -outform der | sha256sum` does). Joining nodes use it to trust the
/// API server before they have any credentials.
pub fn ca_cert_hash(pem: &[u8]) -> Result<String, Error> {
    let block = first_certificate_block(pem).ok_or_else(|| Error::CaCert {
        reason: "no `-----BEGIN CERTIFICATE-----` block found".into(),
    })?;
    // der's errors name a kind and a byte position, never the input.
    let cert = Certificate::from_pem(block).map_err(|e| Error::CaCert {
        reason: format!("the first certificate does not parse: {e}"),
    })?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Error::CaCert {
            reason: format!("cannot encode its public key: {e}"),
        })?;
    Ok(format!("sha256:{}", hex(&Sha256::digest(&spki))))
}

/// The first `CERTIFICATE` PEM block of `pem` (a CA bundle may hold several,
/// a combined file may start with a key), markers included.
fn first_certificate_block(pem: &[u8]) -> Option<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let start = find(pem, BEGIN)?;
    let end = start + find(&pem[start..], END)? + END.len();
    Some(&pem[start..end])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

// ---------------------------------------------------------------------------
// Wire format

/// The token secret's body as written: borrowed, exposed strings. Only
/// [`encode_wire`] builds one.
#[derive(Serialize)]
struct WireOut<'a> {
    format: u32,
    token: &'a str,
    ca_cert_hashes: &'a [String],
    endpoint: &'a str,
    token_expires_at: u64,
}

/// The token secret's body as read (after its `format` was checked): the
/// token goes straight into [`Secret`]; unknown fields are ignored, except a
/// certificate key, which must never be in the secret every node can read.
#[derive(Deserialize)]
struct WireIn {
    token: Secret<String>,
    ca_cert_hashes: Vec<String>,
    endpoint: String,
    token_expires_at: u64,
    #[serde(default)]
    certificate_key: Option<serde::de::IgnoredAny>,
}

/// The certificate-key secret's body as written. Only [`encode_key_wire`] builds one.
#[derive(Serialize)]
struct KeyWireOut<'a> {
    format: u32,
    certificate_key: &'a str,
    certs_expire_at: u64,
}

/// The certificate-key secret's body as read.
#[derive(Deserialize)]
struct KeyWireIn {
    certificate_key: Secret<String>,
    certs_expire_at: u64,
}

/// Only the version, read first so that a newer format is reported as such
/// rather than as a missing field.
#[derive(Deserialize)]
struct WireVersion {
    format: u64,
}

/// Milliseconds since the Unix epoch (0 before it), rounded down: an expiry
/// stored a little early is safe, a little late is not.
fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The token secret's body (`aws.join_secret`, readable by every node), JSON:
/// `{"format":2,"token":…,"ca_cert_hashes":[…],"endpoint":"host:port","token_expires_at":<epoch ms>}`.
/// The certificate key is never in it (see [`encode_key_wire`]).
///
/// One of the two places where a secret is exposed; the body is returned as
/// a [`Secret`] so it cannot be logged either.
pub fn encode_wire(material: &JoinMaterial) -> Result<Secret<String>, Error> {
    let wire = WireOut {
        format: WIRE_FORMAT,
        token: material.token.expose(),
        ca_cert_hashes: &material.ca_cert_hashes,
        endpoint: &material.endpoint,
        token_expires_at: epoch_ms(material.token_expires_at),
    };
    // Strings, numbers and options always serialize; should that ever change,
    // serde_json's serializer errors name the problem, not the values.
    serde_json::to_string(&wire)
        .map(Secret::new)
        .map_err(|e| Error::Invalid {
            reason: format!("cannot encode the secret body: {e}"),
        })
}

/// The certificate-key secret's body (`aws.certificate_key_secret`, readable
/// by control planes only), JSON:
/// `{"format":2,"certificate_key":"<64 hex>","certs_expire_at":<epoch ms>}`;
/// `None` when the material has no uploaded certificates.
pub fn encode_key_wire(material: &JoinMaterial) -> Result<Option<Secret<String>>, Error> {
    let (Some(key), Some(at)) = (&material.certificate_key, material.certs_expire_at) else {
        return Ok(None);
    };
    let wire = KeyWireOut {
        format: WIRE_FORMAT,
        certificate_key: key.expose(),
        certs_expire_at: epoch_ms(at),
    };
    serde_json::to_string(&wire)
        .map(|s| Some(Secret::new(s)))
        .map_err(|e| Error::Invalid {
            reason: format!("cannot encode the certificate-key body: {e}"),
        })
}

/// Checks the size and the format version of a body before its fields.
fn check_envelope(body: &str) -> Result<(), Malformed> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Malformed::TooLarge {
            bytes: body.len(),
            limit: MAX_BODY_BYTES,
        });
    }
    let version: WireVersion = serde_json::from_str(body).map_err(|e| json_error(&e))?;
    if version.format != u64::from(WIRE_FORMAT) {
        return Err(Malformed::Format {
            found: version.format,
        });
    }
    Ok(())
}

/// Parses a token secret body into material without a certificate key.
/// Errors say what is wrong and where, never what the body contains.
pub fn decode_wire(body: &str) -> Result<JoinMaterial, Malformed> {
    check_envelope(body)?;
    let wire: WireIn = serde_json::from_str(body).map_err(|e| json_error(&e))?;
    let field = |field, expected| Malformed::Field { field, expected };
    if wire.certificate_key.is_some() {
        return Err(field(
            "certificate_key",
            "absent (the key lives in the control-plane-only secret)",
        ));
    }
    if !is_token(wire.token.expose()) {
        return Err(field("token", "a bootstrap token [a-z0-9]{6}.[a-z0-9]{16}"));
    }
    if wire.ca_cert_hashes.is_empty()
        || wire.ca_cert_hashes.len() > MAX_CA_PINS
        || !wire.ca_cert_hashes.iter().all(|h| is_ca_cert_hash(h))
    {
        return Err(field(
            "ca_cert_hashes",
            "a list of 1 to 16 sha256:<64 hex digits>",
        ));
    }
    if !is_endpoint(&wire.endpoint) {
        return Err(field(
            "endpoint",
            "host:port (a DNS name or IP address, port 1-65535)",
        ));
    }
    Ok(JoinMaterial {
        token: wire.token,
        certificate_key: None,
        ca_cert_hashes: wire.ca_cert_hashes,
        endpoint: wire.endpoint,
        token_expires_at: from_epoch_ms(wire.token_expires_at),
        certs_expire_at: None,
    })
}

/// Parses a certificate-key secret body: the key and when the uploaded
/// certificates expire.
pub fn decode_key_wire(body: &str) -> Result<(Secret<String>, SystemTime), Malformed> {
    check_envelope(body)?;
    let wire: KeyWireIn = serde_json::from_str(body).map_err(|e| json_error(&e))?;
    if !is_certificate_key(wire.certificate_key.expose()) {
        return Err(Malformed::Field {
            field: "certificate_key",
            expected: "64 lowercase hex digits",
        });
    }
    Ok((wire.certificate_key, from_epoch_ms(wire.certs_expire_at)))
}

/// serde_json's messages quote offending values (`invalid type: string
/// "…"`): keep only the category and position, and "missing field", which
/// names one of our keys.
fn json_error(e: &serde_json::Error) -> Malformed {
    let message = e.to_string();
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some(name) = rest.split('`').next() {
            return Malformed::MissingField(name.to_string());
        }
    }
    let category = match e.classify() {
        serde_json::error::Category::Io => "I/O",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "type",
        serde_json::error::Category::Eof => "unexpected end",
    };
    Malformed::Json {
        category,
        line: e.line(),
        column: e.column(),
    }
}

// ---------------------------------------------------------------------------
// The store

/// Reads and publishes join material: Secrets Manager for the secrets, SSM
/// for discovery values, the registry's fenced pointer for "which is current".
#[derive(Debug, Clone)]
pub struct JoinStore {
    secrets: aws_sdk_secretsmanager::Client,
    ssm: aws_sdk_ssm::Client,
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
        // SSM answers `TooManyUpdates` to a parameter updated in quick
        // succession, which the SDK's default classifiers do not retry: let
        // the SDK's own retry strategy treat it as throttling.
        let ssm = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::Client::config(&ssm)
                .to_builder()
                .retry_classifier(crate::retry::ThrottlingCodes::<
                    aws_sdk_ssm::operation::put_parameter::PutParameterError,
                >::new(crate::retry::SSM_THROTTLING_CODES))
                .build(),
        );
        JoinStore {
            discovery_written: Default::default(),
            request_tokens: Default::default(),
            repair_backoff: Default::default(),
            secrets,
            ssm,
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
        let version = self
            .put_secret(Which::Token, &encode_wire(material)?, seq)
            .await?;
        let key_version = match (encode_key_wire(material)?, keep_key_version) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(kept),
            (Some(body), None) => Some(self.put_secret(Which::Key, &body, seq).await?),
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
        self.put_parameter(SSM_ENDPOINT, &pointer.endpoint).await?;
        self.put_parameter(SSM_CA_CERT_HASHES, &pointer.ca_cert_hashes.join(","))
            .await?;
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
        let mut material = self.read_token(pointer).await?;
        if let Some(key_version) = &pointer.key_version {
            let body = self.get_secret(Which::Key, key_version).await?;
            let (key, expires_at) =
                decode_key_wire(body.expose()).map_err(|source| Error::Malformed {
                    secret: self.key_secret_name.clone(),
                    version: key_version.clone(),
                    source,
                })?;
            material.certificate_key = Some(key);
            material.certs_expire_at = Some(expires_at);
        }
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
        let out = self
            .secrets
            .get_secret_value()
            .secret_id(name)
            .version_id(version)
            .send()
            .await
            .map_err(|e| self.secrets_error(which, "GetSecretValue", &e))?;
        out.secret_string
            .map(Secret::new)
            .ok_or_else(|| Error::Malformed {
                secret: name.to_string(),
                version: version.to_string(),
                source: Malformed::NotAString,
            })
    }

    /// Writes a new version of one secret and returns its VersionId.
    async fn put_secret(
        &self,
        which: Which,
        body: &Secret<String>,
        seq: u64,
    ) -> Result<String, Error> {
        let name = self.name(which);
        // One token per content: the SDK's retries, the fallback put after
        // a concurrent create and the caller's step retries of the same
        // publication are then idempotent.
        let request_token = self.request_token(which, body, seq);
        let put = || {
            self.secrets
                .put_secret_value()
                .secret_id(name)
                .client_request_token(&request_token)
                .secret_string(body.expose())
                .send()
        };
        let version = match put().await {
            Ok(out) => out.version_id,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                tracing::info!(secret = %name, "join secret does not exist yet; creating it");
                let description = match which {
                    Which::Token => "kubeboot join material: bootstrap token, endpoint, CA pins (the registry's join pointer names the current version)",
                    Which::Key => "kubeboot certificate key for control-plane joins; control-plane role only (the registry's join pointer names the current version)",
                };
                let created = self
                    .secrets
                    .create_secret()
                    .name(name)
                    .description(description)
                    .client_request_token(&request_token)
                    .secret_string(body.expose())
                    .send()
                    .await;
                match created {
                    Ok(out) => out.version_id,
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_exists_exception()) =>
                    {
                        // Another publisher created it first: put our version.
                        put()
                            .await
                            .map_err(|e| self.secrets_error(which, "PutSecretValue", &e))?
                            .version_id
                    }
                    Err(e) => return Err(self.secrets_error(which, "CreateSecret", &e)),
                }
            }
            Err(e) => return Err(self.secrets_error(which, "PutSecretValue", &e)),
        };
        // Secrets Manager uses the ClientRequestToken as the VersionId.
        Ok(version.unwrap_or(request_token))
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
        let parameter = self.parameter(name);
        self.ssm
            .put_parameter()
            .name(&parameter)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| Error::Ssm {
                operation: "PutParameter",
                class: classify_sdk_error(&e),
                message: DisplayErrorContext(&e).to_string(),
                parameter,
            })?;
        Ok(())
    }

    fn secrets_error<E>(
        &self,
        which: Which,
        operation: &'static str,
        e: &SdkError<E, HttpResponse>,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Error::SecretsManager {
            operation,
            secret: self.name(which).to_string(),
            class: classify_sdk_error(e),
            message: DisplayErrorContext(e).to_string(),
        }
    }
}

/// `prefix/name` with exactly one slash between them.
fn parameter_name(prefix: &str, name: &str) -> String {
    format!("{}/{name}", prefix.trim_end_matches('/'))
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
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
    fn tokens_have_kubeadms_shape_and_do_not_repeat() {
        let tokens: Vec<String> = (0..1000)
            .map(|_| generate_token().expose().clone())
            .collect();
        for t in &tokens {
            assert!(is_token(t), "{t}");
            let (id, secret) = t.split_once('.').expect("a dot");
            assert_eq!((id.len(), secret.len()), (6, 16));
            assert!(t
                .chars()
                .all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        }
        let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(distinct.len(), tokens.len());
        assert!(!is_token("ABCDEF.0123456789abcdef"));
        assert!(!is_token("abcdef-0123456789abcdef"));
        assert!(!is_token("abcdef.0123456789abcde"));
    }

    #[test]
    fn sampling_rejects_bytes_that_would_bias_the_alphabet() {
        // 252..=255 would map to '0'..'3' a second time: they must be skipped.
        let mut bytes = vec![255u8, 252, 0, 35, 251, 36];
        bytes.resize(64, 253);
        let mut fill = |buf: &mut [u8]| buf.copy_from_slice(&bytes);
        assert_eq!(sample(TOKEN_ALPHABET, 4, &mut fill), "0zz0");
        let mut counts = [0usize; 36];
        let all = (0..=255u8).collect::<Vec<_>>();
        let mut n = 0;
        let mut fill_all = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                *b = all[n % 256];
                n += 1;
            }
        };
        for c in sample(TOKEN_ALPHABET, 36 * 7 * 4, &mut fill_all).bytes() {
            counts[TOKEN_ALPHABET
                .iter()
                .position(|&a| a == c)
                .expect("in alphabet")] += 1;
        }
        assert!(counts.iter().all(|&c| c == 28), "{counts:?}");
    }

    #[test]
    fn certificate_keys_are_64_lowercase_hex_digits() {
        let a = generate_certificate_key();
        let b = generate_certificate_key();
        assert!(is_certificate_key(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
        assert!(!is_certificate_key(&"0F".repeat(32)));
        assert_eq!(hex(&[0x00, 0x7f, 0xab, 0xff]), "007fabff");
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
