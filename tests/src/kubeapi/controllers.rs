//! Controllers: token cleaner, bootstrap signer, node IPAM and the kubelets

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
    allocate_pod_cidrs(store);
    run_kubelets(store, now);
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

/// The `Ready` condition's message a kubelet (1.31, containerd) posts while
/// no CNI configuration exists in `/etc/cni/net.d`.
pub const NETWORK_NOT_READY: &str = "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized";

/// Where CNI plugins' configuration is read from; a pod network's
/// DaemonSet writes it through a hostPath volume.
const CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// Taints every DaemonSet Pod tolerates without asking, with their effect:
/// what the DaemonSet controller adds (pkg/controller/daemon/util,
/// `AddOrUpdateDaemonPodTolerations`); `network-unavailable` only for Pods
/// on the host's network.
const DAEMONSET_TOLERATED: &[(&str, &str)] = &[
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];
const HOST_NETWORK_TOLERATED: (&str, &str) =
    ("node.kubernetes.io/network-unavailable", "NoSchedule");

/// The taint the node lifecycle controller keeps on a NotReady Node
/// (TaintNodesByCondition).
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

fn parse_v4_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(ip), len))
}

/// Whether `inner` lies inside `outer` (both IPv4 CIDRs).
fn cidr_contains(outer: &str, inner: &str) -> bool {
    let (Some((o, ol)), Some((i, il))) = (parse_v4_cidr(outer), parse_v4_cidr(inner)) else {
        return false;
    };
    let mask = |l: u32| if l == 0 { 0 } else { u32::MAX << (32 - l) };
    il >= ol && (o & mask(ol)) == (i & mask(ol))
}

/// The node IPAM controller: every Node without a pod CIDR gets the next
/// free `/24` of `kubeadm-config`'s `networking.podSubnet` (none without it,
/// as the controller manager allocates nothing then).
pub(super) fn allocate_pod_cidrs(store: &mut Store) {
    let config: Key = ("configmaps", "kube-system".into(), "kubeadm-config".into());
    let Some(subnet) = store
        .objects
        .get(&config)
        .and_then(|c| c["data"]["ClusterConfiguration"].as_str())
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|c| c["networking"]["podSubnet"].as_str().map(str::to_string))
    else {
        return;
    };
    let Some((base, len)) = parse_v4_cidr(&subnet).filter(|(_, l)| *l <= 24) else {
        return;
    };
    let nodes: Vec<(Key, Option<String>)> = store
        .objects
        .iter()
        .filter(|((p, _, _), _)| *p == "nodes")
        .map(|(k, v)| (k.clone(), v["spec"]["podCIDR"].as_str().map(str::to_string)))
        .collect();
    let mut used: std::collections::BTreeSet<String> =
        nodes.iter().filter_map(|(_, c)| c.clone()).collect();
    for (key, cidr) in nodes {
        if cidr.is_some() {
            continue;
        }
        let free = (0..1u32 << (24 - len))
            .map(|i| {
                let net = std::net::Ipv4Addr::from(base + (i << 8));
                format!("{net}/24")
            })
            .find(|c| !used.contains(c));
        let Some(free) = free else {
            return;
        };
        used.insert(free.clone());
        let rv = store.next_rv();
        if let Some(node) = store.objects.get_mut(&key) {
            node["spec"]["podCIDR"] = json!(free);
            node["spec"]["podCIDRs"] = json!([free]);
            node["metadata"]["resourceVersion"] = json!(rv);
        }
    }
}

/// Why the DaemonSet's Pod would not run and write a CNI configuration on
/// `node`, or `None` when it would.
fn network_blocked(store: &Store, ds: &Value, node: &Value) -> Option<String> {
    let ns = ds["metadata"]["namespace"].as_str().unwrap_or_default();
    let pod = &ds["spec"]["template"]["spec"];
    let host_network = pod["hostNetwork"] == true;
    if !host_network {
        // A Pod on the pod network needs the CNI it would install.
        return Some("its Pods are not on the host network: their sandbox needs the CNI they would install (network plugin not ready)".into());
    }
    let labels = &node["metadata"]["labels"];
    if let Some(selector) = pod["nodeSelector"].as_object() {
        if let Some((k, v)) = selector.iter().find(|(k, v)| labels[k.as_str()] != **v) {
            return Some(format!("nodeSelector {k}={v} does not match the node"));
        }
    }
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    if let Some(terms) = terms.as_array() {
        let matches = |e: &Value| {
            let key = e["key"].as_str().unwrap_or_default();
            let have = labels[key].as_str();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => !have.is_some_and(|h| values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            }
        };
        let admitted = terms.iter().any(|t| {
            t["matchExpressions"]
                .as_array()
                .is_none_or(|es| es.iter().all(matches))
        });
        if !terms.is_empty() && !admitted {
            return Some("required node affinity does not match the node".into());
        }
    }
    let tolerations = pod["tolerations"].as_array().cloned().unwrap_or_default();
    for taint in node["spec"]["taints"].as_array().into_iter().flatten() {
        let (key, effect) = (
            taint["key"].as_str().unwrap_or_default(),
            taint["effect"].as_str().unwrap_or_default(),
        );
        if effect == "PreferNoSchedule"
            || DAEMONSET_TOLERATED.contains(&(key, effect))
            || (host_network && HOST_NETWORK_TOLERATED == (key, effect))
        {
            continue;
        }
        let tolerated = tolerations.iter().any(|t| {
            let effect_ok = t["effect"]
                .as_str()
                .is_none_or(|e| e.is_empty() || e == effect);
            let key_ok = match t["operator"].as_str() {
                Some("Exists") => t["key"].as_str().is_none_or(|k| k.is_empty() || k == key),
                _ => {
                    t["key"].as_str() == Some(key)
                        && t["value"].as_str().unwrap_or_default()
                            == taint["value"].as_str().unwrap_or_default()
                }
            };
            effect_ok && key_ok
        });
        if !tolerated {
            return Some(format!("its Pods do not tolerate the taint {key}:{effect}"));
        }
    }
    let account = pod["serviceAccountName"]
        .as_str()
        .or(pod["serviceAccount"].as_str())
        .unwrap_or("default");
    if account != "default"
        && !store
            .objects
            .contains_key(&("serviceaccounts", ns.to_string(), account.to_string()))
    {
        return Some(format!(
            "error looking up service account {ns}/{account}: serviceaccount \"{account}\" not found"
        ));
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let Some(name) = volume["configMap"]["name"].as_str() else {
            continue;
        };
        let map = store
            .objects
            .get(&("configmaps", ns.to_string(), name.to_string()));
        let Some(map) = map else {
            if volume["configMap"]["optional"] == true {
                continue;
            }
            return Some(format!("configmap \"{name}\" not found"));
        };
        if let Some(conf) = map["data"]["net-conf.json"].as_str() {
            let network = serde_json::from_str::<Value>(conf)
                .ok()
                .and_then(|c| c["Network"].as_str().map(str::to_string));
            let Some(network) = network else {
                return Some(format!("{name}: net-conf.json has no Network"));
            };
            let Some(pod_cidr) = node["spec"]["podCIDR"].as_str() else {
                return Some(
                    "the node has no pod CIDR assigned (kubeadm networking.podSubnet unset?)"
                        .into(),
                );
            };
            if !cidr_contains(&network, pod_cidr) {
                return Some(format!(
                    "the node's pod CIDR {pod_cidr} is outside the network's {network}"
                ));
            }
        }
    }
    None
}

/// Whether a DaemonSet installs a CNI configuration on its nodes.
fn installs_cni(ds: &Value) -> bool {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            v["hostPath"]["path"]
                .as_str()
                .map(|p| p.trim_end_matches('/'))
                == Some(CNI_CONF_DIR)
        })
}

/// The kubelets: a Node waiting for its network (the `Ready` condition
/// carries [`NETWORK_NOT_READY`]) turns Ready once the delay since its
/// registration has passed and a pod network runs on it.
pub(super) fn run_kubelets(store: &mut Store, now: Timestamp) {
    taint_by_readiness(store);
    let delay = store.node_ready_delay;
    let networks: Vec<Value> = store
        .objects
        .iter()
        .filter(|((p, _, _), v)| *p == "daemonsets" && installs_cni(v))
        .map(|(_, v)| v.clone())
        .collect();
    let waiting: Vec<Key> = store
        .objects
        .iter()
        .filter(|((p, _, _), node)| {
            *p == "nodes"
                && node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["message"] == NETWORK_NOT_READY)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in waiting {
        let Some(node) = store.objects.get(&key) else {
            continue;
        };
        let due = store
            .registered
            .get(&key)
            .is_none_or(|at| at.elapsed() >= delay);
        if !due
            || !networks
                .iter()
                .any(|ds| network_blocked(store, ds, node).is_none())
        {
            continue;
        }
        let stamp = json!(now.to_string());
        let ready = json!({
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        });
        let rv = store.next_rv();
        if let Some(node) = store.objects.get_mut(&key) {
            if let Some(list) = node["status"]["conditions"].as_array_mut() {
                for c in list.iter_mut().filter(|c| c["type"] == "Ready") {
                    *c = ready.clone();
                }
            }
            node["metadata"]["resourceVersion"] = json!(rv);
        }
    }
}

/// The node lifecycle controller: a NotReady Node carries
/// `node.kubernetes.io/not-ready:NoSchedule`, a Ready one does not.
fn taint_by_readiness(store: &mut Store) {
    let keys: Vec<Key> = store
        .objects
        .keys()
        .filter(|(p, _, _)| *p == "nodes")
        .cloned()
        .collect();
    for key in keys {
        let Some(node) = store.objects.get(&key) else {
            continue;
        };
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let taints: Vec<Value> = node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let tainted = taints
            .iter()
            .any(|t| t["key"] == NOT_READY_TAINT && t["effect"] == "NoSchedule");
        if ready != tainted {
            continue;
        }
        let mut taints: Vec<Value> = taints
            .into_iter()
            .filter(|t| !(t["key"] == NOT_READY_TAINT && t["effect"] == "NoSchedule"))
            .collect();
        if !ready {
            taints.push(json!({"key": NOT_READY_TAINT, "effect": "NoSchedule"}));
        }
        let rv = store.next_rv();
        if let Some(node) = store.objects.get_mut(&key) {
            if taints.is_empty() {
                if let Some(spec) = node["spec"].as_object_mut() {
                    spec.remove("taints");
                }
            } else {
                node["spec"]["taints"] = Value::Array(taints);
            }
            node["metadata"]["resourceVersion"] = json!(rv);
        }
    }
}

/// Why no pod network runs on the Node `name` yet, for tests' failure
/// messages: each CNI-installing DaemonSet's refusal, or that there is none.
pub(super) fn network_report(store: &Store, name: &str) -> String {
    let Some(node) = store
        .objects
        .get(&("nodes", String::new(), name.to_string()))
    else {
        return format!("no Node {name}");
    };
    let reasons: Vec<String> = store
        .objects
        .iter()
        .filter(|((p, _, _), v)| *p == "daemonsets" && installs_cni(v))
        .map(|((_, ns, n), ds)| {
            let why = network_blocked(store, ds, node).unwrap_or_else(|| "runs".into());
            format!("{ns}/{n}: {why}")
        })
        .collect();
    if reasons.is_empty() {
        "no DaemonSet installs a CNI configuration (/etc/cni/net.d)".into()
    } else {
        reasons.join("; ")
    }
}

/// A minimal pod network (see [`super::KubeApi::install_pod_network`]).
pub(super) fn install_test_network(store: &mut Store) {
    let ns = "kbtest-network";
    let meta = |store: &mut Store, name: &str, namespace: Option<&str>| {
        let mut m = json!({
            "name": name,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": Timestamp::now().to_string(),
            "resourceVersion": store.next_rv(),
        });
        if let Some(n) = namespace {
            m["namespace"] = json!(n);
        }
        m
    };
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta(store, ns, None),
        "status": {"phase": "Active"}});
    store
        .objects
        .insert(("namespaces", String::new(), ns.into()), namespace);
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(store, "cni", Some(ns))});
    store
        .objects
        .insert(("serviceaccounts", ns.into(), "cni".into()), account);
    let ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta(store, "cni", Some(ns)),
        "spec": {
            "selector": {"matchLabels": {"app": "cni"}},
            "template": {
                "metadata": {"labels": {"app": "cni"}},
                "spec": {
                    "serviceAccountName": "cni",
                    "hostNetwork": true,
                    "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "cni", "image": "registry.invalid/cni:test"}],
                    "volumes": [{"name": "cni", "hostPath": {"path": CNI_CONF_DIR}}],
                },
            },
        },
    });
    store
        .objects
        .insert(("daemonsets", ns.into(), "cni".into()), ds);
}
