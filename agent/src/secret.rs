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

#[cfg(test)]
mod tests {
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
