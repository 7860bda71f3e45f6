//! The API server (the test double), over plain HTTP

use crate::helpers::knob;
use crate::B64;
use base64::Engine as _;
use kubeboot_tests::net::http_request;
use kubeboot_tests::pki;
use serde_json::json;
use serde_json::Value;
use std::fmt::Display;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Clone)]
pub(crate) struct Api {
    /// `http://host:port`
    pub(crate) base: String,
    /// How long unreachable / 5xx / 429 answers are retried.
    pub(crate) patience: Duration,
}

/// An answer other than 2xx: the status code and the `Status` message.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub(crate) code: u16,
    pub(crate) message: String,
}

impl Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Api {
    pub(crate) fn new(endpoint: &str) -> Self {
        let host = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        Api {
            base: format!("http://{host}"),
            patience: knob("KBTEST_KUBEADM_API_TIMEOUT_MS", 10_000),
        }
    }

    /// One call, retried while the server is unreachable or overloaded.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> Result<Value, ApiFailure> {
        let deadline = Instant::now() + self.patience;
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let verb = match method {
            "GET" => "Get",
            "POST" => "Post",
            "PUT" => "Put",
            "PATCH" => "Patch",
            "DELETE" => "Delete",
            m => m,
        };
        loop {
            let headers = [
                ("Content-Type", content_type),
                ("Accept", "application/json"),
            ];
            let attempt = http_request(&self.base, method, path, &headers, &bytes).await;
            let failure = match attempt {
                Ok(resp) if (200..300).contains(&resp.status) => {
                    return Ok(serde_json::from_slice(&resp.body).unwrap_or(Value::Null));
                }
                Ok(resp) => {
                    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                    let message = body["message"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| resp.text());
                    ApiFailure {
                        code: resp.status,
                        message,
                    }
                }
                Err(e) => ApiFailure {
                    code: 0,
                    message: format!("{verb} \"{}{path}\": {e}", self.base),
                },
            };
            let transient = failure.code == 0 || failure.code == 429 || failure.code >= 500;
            if !transient || Instant::now() >= deadline {
                return Err(failure);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Option<Value>, ApiFailure> {
        match self.call("GET", path, None, "application/json").await {
            Ok(v) => Ok(Some(v)),
            Err(f) if f.code == 404 => Ok(None),
            Err(f) => Err(f),
        }
    }

    pub(crate) async fn create(&self, collection: &str, obj: &Value) -> Result<Value, ApiFailure> {
        self.call("POST", collection, Some(obj), "application/json")
            .await
    }

    /// kubeadm's CreateOrUpdate: POST, and on AlreadyExists a PUT.
    pub(crate) async fn create_or_update(
        &self,
        collection: &str,
        name: &str,
        obj: &Value,
    ) -> Result<Value, ApiFailure> {
        match self.create(collection, obj).await {
            Err(f) if f.code == 409 => {
                let mut obj = obj.clone();
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                self.call(
                    "PUT",
                    &format!("{collection}/{name}"),
                    Some(&obj),
                    "application/json",
                )
                .await
            }
            other => other,
        }
    }

    pub(crate) async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, ApiFailure> {
        self.call("PATCH", path, Some(patch), "application/merge-patch+json")
            .await
    }

    /// Whether the object existed.
    pub(crate) async fn delete(&self, path: &str) -> Result<bool, ApiFailure> {
        match self.call("DELETE", path, None, "application/json").await {
            Ok(_) => Ok(true),
            Err(f) if f.code == 404 => Ok(false),
            Err(f) => Err(f),
        }
    }
}

/// The API server a kubeconfig written by this stand-in (or any JSON
/// kubeconfig) points at.
pub(crate) fn kubeconfig_server(path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JSON kubeconfig: {e}", path.display()))?;
    cfg["clusters"][0]["cluster"]["server"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no clusters[0].cluster.server", path.display()))
}

/// Embeds the client certificate kubeadm's kubeconfig phase gives `file`
/// (its subject, signed by the cluster CA, valid one year), as kubeadm
/// does on init and on a control-plane join.
pub(crate) fn embed_client_certificate(
    path: &std::path::Path,
    pki: &std::path::Path,
    file: &str,
    node: &str,
) -> Result<(), String> {
    let Some((cn, orgs)) = pki::kubeconfig_subject(file, node) else {
        return Ok(());
    };
    let year = std::time::SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    pki::embed_client_certificate(path, pki, &cn, &orgs, year)
}

pub(crate) fn kubeconfig(cluster: &str, server: &str, ca_pem: &str, user: &str) -> Value {
    let context = format!("{user}@{cluster}");
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "certificate-authority-data": B64.encode(ca_pem),
            "server": server,
        }}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
        "users": [{"name": user, "user": {}}],
    })
}
