//! The secret bodies' wire format: the token secret (with the endpoint and
//! CA pins) and the certificate-key secret.

use super::generate::{is_ca_cert_hash, is_certificate_key, is_endpoint, is_token};
use super::{Error, JoinMaterial, Malformed, MAX_BODY_BYTES, MAX_CA_PINS, WIRE_FORMAT};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
pub(super) fn epoch_ms(t: SystemTime) -> u64 {
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
