//! Controllers: token cleaner and bootstrap signer

use super::{Key, Store, BOOTSTRAP_TOKEN_TYPE, JWS_PREFIX};
use base64::Engine as _;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use serde_json::Map;
use serde_json::Value;
use sha2::Digest;
use sha2::Sha256;
use std::collections::BTreeMap;

pub(super) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
pub(super) const B64URL: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A decoded `data` entry of a Secret.
pub(super) fn secret_field(secret: &Value, field: &str) -> Option<String> {
    let raw = secret["data"][field].as_str()?;
    String::from_utf8(B64.decode(raw).ok()?).ok()
}

/// Whether a bootstrap-token Secret's `expiration` is in the past.
pub(super) fn token_expired(secret: &Value, now: Timestamp) -> bool {
    secret_field(secret, "expiration")
        .and_then(|e| e.parse::<Timestamp>().ok())
        .is_some_and(|exp| exp <= now)
}

/// Runs the token cleaner and bootstrap signer over the store, as the
/// controller manager does continuously. Called on every request, so what a
/// client reads is always what those controllers would have produced.
pub(super) fn run_controllers(store: &mut Store) {
    let now = Timestamp::now();
    let expired: Vec<Key> = store
        .objects
        .iter()
        .filter(|((p, ns, _), v)| {
            *p == "secrets"
                && ns == "kube-system"
                && v["type"] == BOOTSTRAP_TOKEN_TYPE
                && token_expired(v, now)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in expired {
        store.objects.remove(&key);
        store.next_rv();
    }
    let info_key: Key = ("configmaps", "kube-public".into(), "cluster-info".into());
    let Some(info) = store.objects.get(&info_key) else {
        return;
    };
    let kubeconfig = info["data"]["kubeconfig"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for ((p, ns, name), secret) in &store.objects {
        if *p != "secrets" || ns != "kube-system" || secret["type"] != BOOTSTRAP_TOKEN_TYPE {
            continue;
        }
        let (Some(id), Some(token_secret)) = (
            secret_field(secret, "token-id"),
            secret_field(secret, "token-secret"),
        ) else {
            continue;
        };
        if *name != format!("bootstrap-token-{id}")
            || secret_field(secret, "usage-bootstrap-signing").as_deref() != Some("true")
        {
            continue;
        }
        wanted.insert(
            format!("{JWS_PREFIX}{id}"),
            compute_detached_jws(&kubeconfig, &id, &token_secret),
        );
    }
    let data = info["data"].as_object().cloned().unwrap_or_default();
    let current: BTreeMap<String, String> = data
        .iter()
        .filter(|(k, _)| k.starts_with(JWS_PREFIX))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
        .collect();
    if current == wanted {
        return;
    }
    let mut data: Map<String, Value> = data
        .into_iter()
        .filter(|(k, _)| !k.starts_with(JWS_PREFIX))
        .collect();
    for (k, v) in wanted {
        data.insert(k, json!(v));
    }
    let mut info = info.clone();
    info["data"] = Value::Object(data);
    info["metadata"]["resourceVersion"] = json!(store.next_rv());
    store.objects.insert(info_key, info);
}

/// HMAC-SHA256 (RFC 2104), for token signatures and the sealed
/// `kubeadm-certs`; small enough not to need another crate.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The detached JWS (`header..signature`, HS256, `kid` = token id, keyed by
/// the token secret) the bootstrap signer puts in `cluster-info` for each
/// signing token, over the `kubeconfig` entry.
pub fn compute_detached_jws(content: &str, token_id: &str, token_secret: &str) -> String {
    let header = B64URL.encode(format!(r#"{{"alg":"HS256","kid":"{token_id}"}}"#));
    let input = format!("{header}.{}", B64URL.encode(content));
    let sig = B64URL.encode(hmac_sha256(token_secret.as_bytes(), input.as_bytes()));
    format!("{header}..{sig}")
}

/// Whether `jws` is a valid detached signature of `content` for the token,
/// as a joining node checks before trusting `cluster-info`.
pub fn detached_jws_is_valid(jws: &str, content: &str, token_id: &str, token_secret: &str) -> bool {
    let mut parts = jws.split('.');
    let (Some(header), Some(""), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(header_json) = B64URL.decode(header) else {
        return false;
    };
    let Ok(header_value) = serde_json::from_slice::<Value>(&header_json) else {
        return false;
    };
    if header_value["alg"] != "HS256" || header_value["kid"] != token_id {
        return false;
    }
    let input = format!("{header}.{}", B64URL.encode(content));
    B64URL
        .decode(sig)
        .is_ok_and(|s| s == hmac_sha256(token_secret.as_bytes(), input.as_bytes()))
}
