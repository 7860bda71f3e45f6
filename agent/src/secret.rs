//! A wrapper for values that must never reach logs, metrics, errors or output.
//!
//! Invariant I6 is enforced by construction: `Debug`, `Display` and `Serialize`
//! all print a fixed marker, so a secret that ends up in a `tracing` field, an
//! error message or `config show` is redacted without anyone remembering to.
//! The only way to the value is [`Secret::expose`], which is easy to grep for.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What every redacted value prints as.
pub const REDACTED: &str = "<redacted>";

/// A secret value (bootstrap token, certificate key, secret payload).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value so that it can no longer be printed by accident.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// Gives the value to the one place that must send it somewhere (kubeadm's
    /// config file, a Secrets Manager write). Keep call sites few.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

/// Removes secrets from text we did not write ourselves (kubeadm's output):
/// every known secret value, and anything shaped like a bootstrap token
/// (`[a-z0-9]{6}.[a-z0-9]{16}`) or a certificate key (64 hex characters),
/// since kubeadm prints both.
pub fn scrub(text: &str, known: &[&Secret<String>]) -> String {
    let mut out = text.to_string();
    for secret in known {
        if !secret.expose().is_empty() {
            out = out.replace(secret.expose().as_str(), REDACTED);
        }
    }
    scrub_shapes(&out)
}

fn scrub_shapes(text: &str) -> String {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let at_boundary = i == 0 || !word(bytes[i - 1]);
        // A CA public-key pin is public and what an operator compares first.
        let is_pin = text[..i].ends_with("sha256:");
        if at_boundary && !is_pin {
            if let Some(len) = token_at(&bytes[i..]).or_else(|| hex_key_at(&bytes[i..])) {
                let end = i + len;
                if end == bytes.len() || !word(bytes[end]) {
                    out.push_str(REDACTED);
                    i = end;
                    continue;
                }
            }
        }
        // Copy one UTF-8 character.
        let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + ch_len]);
        i += ch_len;
    }
    out
}

fn token_at(b: &[u8]) -> Option<usize> {
    let lower = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (b.len() >= 23 && b[..6].iter().all(lower) && b[6] == b'.' && b[7..23].iter().all(lower))
        .then_some(23)
}

fn hex_key_at(b: &[u8]) -> Option<usize> {
    (b.len() >= 64 && b[..64].iter().all(u8::is_ascii_hexdigit)).then_some(64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrub_removes_known_values_and_secret_shapes() {
        let key = "0f".repeat(32);
        let known = Secret::new("s3cr3t-value".to_string());
        let text = format!(
            "token abcdef.0123456789abcdef used\n--certificate-key {key}\npassword s3cr3t-value\n\
             sha256:{} stays, v1.31.2 stays, ip-10-0-1-2.ec2.internal stays",
            "ab".repeat(32)
        );
        let out = scrub(&text, &[&known]);
        assert!(!out.contains("abcdef.0123456789abcdef"), "{out}");
        assert!(!out.contains(&key), "{out}");
        assert!(!out.contains("s3cr3t-value"), "{out}");
        assert!(out.contains("v1.31.2 stays") && out.contains("ip-10-0-1-2.ec2.internal stays"));
        assert!(
            out.contains(&format!("sha256:{} stays", "ab".repeat(32))),
            "CA pins are public: {out}"
        );
        assert_eq!(out.matches(REDACTED).count(), 3, "{out}");
    }

    use super::*;

    #[test]
    fn no_formatting_path_reveals_the_value() {
        let s = Secret::new("abcdef.0123456789abcdef".to_string());
        assert!(!format!("{s:?}").contains("abcdef"));
        assert!(!format!("{s}").contains("abcdef"));
        assert!(!format!("{s:#?}").contains("abcdef"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{REDACTED}\""));
        assert_eq!(s.expose(), "abcdef.0123456789abcdef");
    }

    #[test]
    fn deserializes_transparently() {
        let s: Secret<String> = serde_json::from_str("\"v\"").unwrap();
        assert_eq!(s.expose(), "v");
    }
}
