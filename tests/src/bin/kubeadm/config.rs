//! Configuration documents

use crate::cli::Flags;
use crate::helpers::{plain_err, R};
use crate::kubelet::note_kubelet_args;
use crate::log::looks_like_token;
use crate::{CONFIG_API, TOKEN_FORM};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use std::net::IpAddr;

/// Known fields per object path, for kubeadm's strict-decoding warnings.
pub(crate) const KNOWN_FIELDS: &[(&str, &[&str])] = &[
    (
        "InitConfiguration",
        &[
            "apiVersion",
            "kind",
            "bootstrapTokens",
            "dryRun",
            "nodeRegistration",
            "localAPIEndpoint",
            "certificateKey",
            "skipPhases",
            "patches",
            "timeouts",
        ],
    ),
    (
        "InitConfiguration.bootstrapTokens[]",
        &["token", "description", "ttl", "expires", "usages", "groups"],
    ),
    (
        "InitConfiguration.localAPIEndpoint",
        &["advertiseAddress", "bindPort"],
    ),
    (
        "ClusterConfiguration",
        &[
            "apiVersion",
            "kind",
            "etcd",
            "networking",
            "kubernetesVersion",
            "controlPlaneEndpoint",
            "apiServer",
            "controllerManager",
            "scheduler",
            "dns",
            "proxy",
            "certificatesDir",
            "imageRepository",
            "featureGates",
            "clusterName",
            "encryptionAlgorithm",
            "certificateValidityPeriod",
            "caCertificateValidityPeriod",
        ],
    ),
    ("ClusterConfiguration.etcd", &["local", "external"]),
    (
        "ClusterConfiguration.etcd.local",
        &[
            "imageRepository",
            "imageTag",
            "dataDir",
            "extraArgs",
            "extraEnvs",
            "serverCertSANs",
            "peerCertSANs",
        ],
    ),
    (
        "ClusterConfiguration.networking",
        &["serviceSubnet", "podSubnet", "dnsDomain"],
    ),
    (
        "ClusterConfiguration.apiServer",
        &["certSANs", "extraArgs", "extraVolumes", "extraEnvs"],
    ),
    (
        "JoinConfiguration",
        &[
            "apiVersion",
            "kind",
            "dryRun",
            "nodeRegistration",
            "caCertPath",
            "discovery",
            "controlPlane",
            "skipPhases",
            "patches",
            "timeouts",
        ],
    ),
    (
        "JoinConfiguration.discovery",
        &["bootstrapToken", "file", "tlsBootstrapToken"],
    ),
    (
        "JoinConfiguration.discovery.bootstrapToken",
        &[
            "token",
            "apiServerEndpoint",
            "caCertHashes",
            "unsafeSkipCAVerification",
        ],
    ),
    (
        "JoinConfiguration.controlPlane",
        &["localAPIEndpoint", "certificateKey"],
    ),
    (
        "JoinConfiguration.controlPlane.localAPIEndpoint",
        &["advertiseAddress", "bindPort"],
    ),
    (
        "*.nodeRegistration",
        &[
            "name",
            "criSocket",
            "taints",
            "kubeletExtraArgs",
            "ignorePreflightErrors",
            "imagePullPolicy",
            "imagePullSerial",
        ],
    ),
    ("*.extraArgs[]", &["name", "value"]),
    ("*.kubeletExtraArgs[]", &["name", "value"]),
];

pub(crate) fn known_fields(path: &str) -> Option<&'static [&'static str]> {
    let tail = |p: &str| p.rsplit_once('.').map(|(_, t)| format!("*.{t}"));
    KNOWN_FIELDS
        .iter()
        .find(|(p, _)| *p == path || Some(p.to_string()) == tail(path))
        .map(|(_, f)| *f)
}

/// kubeadm prints (not fails on) unknown fields: "strict decoding error".
pub(crate) fn warn_unknown_fields(path: &str, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(known) = known_fields(path) {
                for k in map.keys().filter(|k| !known.contains(&k.as_str())) {
                    eprintln!(
                        "W{} {:>7} strict.go:56] strict decoding error: unknown field \"{}\"",
                        klog_stamp(),
                        std::process::id(),
                        format!("{path}.{k}")
                            .split_once('.')
                            .map_or(k.as_str(), |(_, p)| p)
                    );
                }
            }
            for (k, child) in map {
                warn_unknown_fields(&format!("{path}.{k}"), child);
            }
        }
        Value::Array(items) => {
            for item in items {
                warn_unknown_fields(&format!("{path}[]"), item);
            }
        }
        _ => {}
    }
}

pub(crate) fn klog_stamp() -> String {
    let ts = Timestamp::now();
    k8s_openapi::jiff::fmt::strtime::format("%m%d %H:%M:%S%.6f", ts).unwrap_or_default()
}

/// Reads the `---`-separated JSON documents of a kubeadm config file.
pub(crate) fn load_documents(path: &str) -> R<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| plain_err(format!("unable to read config from {path:?} : {e}")))?;
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut chunks = Vec::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            chunks.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    chunks.push(current);
    for (i, chunk) in chunks.iter().enumerate() {
        if chunk.trim().is_empty() {
            continue;
        }
        let doc: Value = serde_json::from_str(chunk).map_err(|e| {
            plain_err(format!(
                "unable to decode config from {path:?}: document {} is not JSON ({e}); the kubeadm stand-in reads JSON documents only",
                i + 1
            ))
        })?;
        let api = doc["apiVersion"].as_str().unwrap_or("");
        let kind = doc["kind"].as_str().unwrap_or("");
        if api != CONFIG_API {
            if api.starts_with("kubeadm.k8s.io/") {
                return Err(plain_err(format!(
                    "your configuration file uses an old API spec: {api:?} (kind: {kind:?}). This kubeadm stand-in models only {CONFIG_API}"
                )));
            }
            eprintln!("[config] WARNING: Ignored configuration document with GroupVersionKind {api}, Kind={kind}");
            continue;
        }
        if !matches!(
            kind,
            "InitConfiguration" | "ClusterConfiguration" | "JoinConfiguration"
        ) {
            return Err(plain_err(format!(
                "no kind {kind:?} is registered for version {api:?} in scheme \"k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme/scheme.go:31\""
            )));
        }
        warn_unknown_fields(kind, &doc);
        docs.push(doc);
    }
    Ok(docs)
}

pub(crate) fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// v1beta4 `[]Arg` (`{name, value}` objects); anything else fails as Go's
/// decoder does.
pub(crate) fn arg_list(v: Option<&Value>, field: &str) -> R<Vec<(String, String)>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let bad = |what: &str| {
        plain_err(format!(
            "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal {what} into Go struct field {field} of type []v1beta4.Arg"
        ))
    };
    let items = v
        .as_array()
        .ok_or_else(|| bad(if v.is_object() { "object" } else { "value" }))?;
    items
        .iter()
        .map(|a| match (a["name"].as_str(), a["value"].as_str()) {
            (Some(n), Some(val)) => Ok((n.to_string(), val.to_string())),
            _ => Err(bad("value")),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub(crate) id: String,
    pub(crate) secret: String,
}

impl Token {
    pub(crate) fn full(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

pub(crate) fn parse_token(s: &str, field: &str) -> R<Token> {
    if !looks_like_token(s) {
        return Err(plain_err(format!(
            "{field}: Invalid value: {s:?}: the bootstrap token {s:?} was not of the form {TOKEN_FORM:?}"
        )));
    }
    Ok(Token {
        id: s[..6].into(),
        secret: s[7..].into(),
    })
}

pub(crate) fn parse_ip(s: Option<&str>, field: &str) -> R<IpAddr> {
    let s = s.unwrap_or("");
    s.parse()
        .map_err(|_| plain_err(format!("{field}: Invalid value: {s:?}: couldn't use \"{s}\" as \"apiserver-advertise-address\", must be ipv4 or ipv6 address")))
}

/// The `--config` file and its documents: the stand-in needs one (the agent
/// always passes it).
pub(crate) fn config_documents(flags: &Flags) -> R<(&str, Vec<Value>)> {
    let config = flags.value("config").ok_or_else(|| {
        plain_err("the kubeadm stand-in needs --config (the agent always passes one)")
    })?;
    Ok((config, load_documents(config)?))
}

/// A kubelet's extra args, in order: (name, value).
pub(crate) type KubeletArgs = Vec<(String, String)>;

/// The joining node of a `join --config`: its JoinConfiguration, its
/// `nodeRegistration.name`, and the kubelet's extra args (noted for the
/// simulated kubelet).
pub(crate) fn join_node<'a>(
    docs: &'a [Value],
    config: &str,
) -> R<(&'a Value, String, KubeletArgs)> {
    let jc = find_kind(docs, "JoinConfiguration")
        .ok_or_else(|| plain_err(format!("{config}: no JoinConfiguration document")))?;
    let node = str_at(jc, "/nodeRegistration/name")
        .ok_or_else(|| plain_err("nodeRegistration.name: Required value: the kubeadm stand-in does not default it to the hostname"))?
        .to_string();
    let kubelet_args = arg_list(
        jc.pointer("/nodeRegistration/kubeletExtraArgs"),
        "NodeRegistrationOptions.nodeRegistration.kubeletExtraArgs",
    )?;
    note_kubelet_args(&kubelet_args);
    Ok((jc, node, kubelet_args))
}
