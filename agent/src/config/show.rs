//! `config show`: values as they may appear in output (secrets redacted,
//! URL credentials hidden), as text or JSON.

use super::merge::nest;
use super::schema::{self, Key, Kind};
use super::{value, Entry, Loaded};
use crate::secret::REDACTED;
use std::collections::BTreeMap;

/// A value as it may appear in output: secrets never do, others quoted and cut short.
pub(super) fn show_value(key: &Key, value: &toml::Value) -> String {
    match (key.secret, key.kind, value.as_str()) {
        (true, _, _) => REDACTED.to_string(),
        (_, Kind::AwsUrl | Kind::ImdsUrl | Kind::SocketUrl | Kind::IssuerUrl, Some(url)) => {
            value::preview(&toml::Value::String(without_credentials(url)))
        }
        _ => value::preview(value),
    }
}

/// A URL with any `user:password@` before its host replaced by `<redacted>@`.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!(
            "{}{REDACTED}{}",
            if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            },
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

impl Loaded {
    /// `config show` as text: one `key = value  # source` line per key, secrets redacted.
    pub fn show_text(&self) -> String {
        let width = self.entries.keys().map(|k| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for key in schema::KEYS {
            if let Some(entry) = self.entries.get(key.path) {
                let line = format!("{:width$} = {}", key.path, show_value(key, &entry.value));
                out.push_str(&format!("{line:<60}  # {}\n", entry.source));
            }
        }
        out
    }

    /// `config show --output json`: the nested config (secrets redacted) and each key's source.
    pub fn show_json(&self) -> serde_json::Value {
        let redacted: BTreeMap<&'static str, Entry> = self
            .entries
            .iter()
            .map(|(path, e)| {
                let secret = schema::find(path).is_some_and(|k| k.secret);
                let value = if secret {
                    toml::Value::String(REDACTED.into())
                } else {
                    e.value.clone()
                };
                (
                    *path,
                    Entry {
                        value,
                        source: e.source.clone(),
                    },
                )
            })
            .collect();
        let sources: BTreeMap<&str, String> = self
            .entries
            .iter()
            .map(|(p, e)| (*p, e.source.to_string()))
            .collect();
        serde_json::json!({
            "config": serde_json::to_value(nest(&redacted)).unwrap_or_default(),
            "sources": sources,
        })
    }
}
