//! A Kubernetes API server double that speaks the real core/v1 JSON.
//!
//! There is no installable API server here, yet both the kubeadm stand-in
//! and the agent keep cluster state in it: kubeadm's `cluster-info`,
//! bootstrap-token Secrets, `kubeadm-certs`, `kubeadm-config`, the etcd
//! mirror Pods it finds members through, Nodes the agent waits on, cordons,
//! drains and deletes. So the double is a generic in-memory object store with
//! the API server's paths, verbs, JSON shapes and error `Status` objects, plus
//! the few controllers whose effects kubeadm relies on:
//!
//! - a *kubelet* as strict as the real one about the pod network: a Node
//!   registers `Ready` = `"False"` ("cni plugin not initialized") and turns
//!   `"True"` only once [`KubeApi::set_node_ready_delay`] has passed *and* a
//!   pod network runs on it: a DaemonSet that installs a CNI configuration
//!   (a hostPath volume at `/etc/cni/net.d`) from the host's network (a Pod
//!   on the pod network needs the CNI first), whose Pods the node would
//!   admit (node selector, required node affinity, tolerations of the
//!   node's taints, `not-ready:NoSchedule` included, with only the
//!   tolerations the DaemonSet controller adds itself), whose service
//!   account and ConfigMaps exist, and, for
//!   flannel (`net-conf.json`), whose `Network` holds the node's pod CIDR;
//! - the *node lifecycle controller*'s taint: `node.kubernetes.io/not-ready:NoSchedule`
//!   on every NotReady Node, gone once it is Ready;
//! - the *node IPAM controller* (`--allocate-node-cidrs`, which kubeadm turns
//!   on with `networking.podSubnet`): each Node gets a `/24` of the
//!   `kubeadm-config` podSubnet as `spec.podCIDR`;
//! - the *bootstrap signer* that signs `kube-public/cluster-info` with every
//!   signing bootstrap token (`jws-kubeconfig-<id>`), which is what joining
//!   nodes verify their token against;
//! - the *token cleaner* that deletes expired bootstrap-token Secrets.
//!
//! Objects are round-tripped through `k8s-openapi`'s types on every write, so
//! a body the real API server would reject as undecodable is rejected here
//! (400) and unknown fields are dropped as the real server prunes them.
//! Served groups: core `v1`, `apps/v1` (DaemonSets, Deployments) and
//! `rbac.authorization.k8s.io/v1`, with create, get, list, update, merge
//! patch, server-side apply (`application/apply-patch+yaml`, see
//! [`handling`]) and delete. Namespaced objects need their Namespace.
//! Plain HTTP, no authentication.

mod controllers;
mod handling;
mod replies;
mod routing;
mod selectors;
#[cfg(test)]
mod tests;

use crate::lock;
use crate::net::serve_local;
use axum::Router;
use base64::Engine as _;
pub use controllers::{
    compute_detached_jws, detached_jws_is_valid, hmac_sha256, NETWORK_NOT_READY,
};
use controllers::{run_controllers, B64};
use handling::handle;
use routing::{route, Route};
pub use selectors::merge_patch;
use serde_json::json;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// `GET /version`'s `gitVersion`: the Kubernetes release the agent renders
/// configs for (kubeadm v1beta4 needs 1.31+).
pub const GIT_VERSION: &str = "v1.31.2";

/// Annotation that makes an eviction of the Pod fail with 429, as if a
/// PodDisruptionBudget forbade it (the double has no PDB controller).
pub const EVICTION_BLOCKED_ANNOTATION: &str = "kbtest/evict";

/// Default delay of the simulated kubelet between a Node's registration
/// (`Ready` = `"False"`) and its first ready status.
pub const DEFAULT_NODE_READY_DELAY: Duration = Duration::from_millis(300);

/// Secret type of bootstrap tokens, as the token cleaner and signer select them.
pub const BOOTSTRAP_TOKEN_TYPE: &str = "bootstrap.kubernetes.io/token";

/// Prefix of the detached JWS entries the bootstrap signer adds to
/// `cluster-info` (`jws-kubeconfig-<token id>`).
pub const JWS_PREFIX: &str = "jws-kubeconfig-";

/// One resource type the double serves.
#[derive(Debug)]
struct Resource {
    /// API group, `""` for the core group (`/api/v1`), else served under
    /// `/apis/<group>/<version>`.
    group: &'static str,
    version: &'static str,
    /// Plural path segment, e.g. `configmaps`.
    plural: &'static str,
    /// `kind`, e.g. `ConfigMap`.
    kind: &'static str,
    namespaced: bool,
    /// Has a `status` subresource: main-resource writes keep the stored
    /// status and `…/status` writes change only the status.
    has_status: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        has_status: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        has_status: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        has_status: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        has_status: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        has_status: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        has_status: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
        has_status: false,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        kind: "DaemonSet",
        namespaced: true,
        has_status: true,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        has_status: true,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        kind: "ClusterRole",
        namespaced: false,
        has_status: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        kind: "ClusterRoleBinding",
        namespaced: false,
        has_status: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        kind: "Role",
        namespaced: true,
        has_status: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
        has_status: false,
    },
];

impl Resource {
    /// `apiVersion` of its objects: `v1`, `apps/v1`, ...
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Namespaces the real API server creates at start (its system namespaces
/// controller); every other namespace must be created before objects in it.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-node-lease", "kube-public", "kube-system"];

/// Decodes `value` as the typed object (what the real API server's decoder
/// would refuse, this refuses) and re-encodes it, dropping unknown fields.
fn normalize(kind: &str, mut value: Value) -> Result<Value, String> {
    use k8s_openapi::api::apps::v1 as apps;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::rbac::v1 as rbac;
    if kind == "Secret" {
        // The API server folds write-only `stringData` into `data`.
        if let Some(Value::Object(strings)) =
            value.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            for (k, v) in strings {
                let text = v.as_str().ok_or("stringData values must be strings")?;
                value["data"][k] = json!(B64.encode(text));
            }
        }
    }
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: Value) -> Result<Value, String> {
        let typed: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
        serde_json::to_value(typed).map_err(|e| e.to_string())
    }
    match kind {
        "ConfigMap" => rt::<core::ConfigMap>(value),
        "Secret" => rt::<core::Secret>(value),
        "Pod" => rt::<core::Pod>(value),
        "Service" => rt::<core::Service>(value),
        "Node" => rt::<core::Node>(value),
        "Namespace" => rt::<core::Namespace>(value),
        "ServiceAccount" => rt::<core::ServiceAccount>(value),
        "DaemonSet" => rt::<apps::DaemonSet>(value),
        "Deployment" => rt::<apps::Deployment>(value),
        "ClusterRole" => rt::<rbac::ClusterRole>(value),
        "ClusterRoleBinding" => rt::<rbac::ClusterRoleBinding>(value),
        "Role" => rt::<rbac::Role>(value),
        "RoleBinding" => rt::<rbac::RoleBinding>(value),
        other => Err(format!("no kind {other:?} is registered")),
    }
}

/// One request the double answered, so tests can assert what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeRequest {
    /// HTTP method.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Status code answered.
    pub status: u16,
}

type Key = (&'static str, String, String);

#[derive(Debug, Default)]
struct Store {
    /// `(plural, namespace or "", name)` → object, in etcd key order.
    objects: BTreeMap<Key, Value>,
    /// Last resourceVersion handed out (one counter, like etcd's revision).
    revision: u64,
    /// How long after its registration the simulated kubelet may first
    /// report a Node ready.
    node_ready_delay: Duration,
    /// Server-side apply: the configuration each field manager last applied
    /// to an object, so fields it stops applying are removed as the real
    /// server's managed fields remove them.
    applied: BTreeMap<(Key, String), Value>,
    /// When each Node was created, for the kubelets' delay.
    registered: BTreeMap<Key, std::time::Instant>,
}

impl Store {
    fn next_rv(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    unavailable: AtomicBool,
    log: Mutex<Vec<KubeRequest>>,
}

/// A running API server double on `127.0.0.1:<port>`; stops on drop.
#[derive(Debug)]
pub struct KubeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    /// Dropped with the double: the server shuts down.
    _shutdown: oneshot::Sender<()>,
}

impl KubeApi {
    /// Starts an API server with only the system namespaces (`default`,
    /// `kube-system`, `kube-public`, `kube-node-lease`); an object in any
    /// other namespace is refused (404) until its Namespace exists, as the
    /// real server refuses it.
    pub async fn start() -> Self {
        let mut store = Store {
            node_ready_delay: DEFAULT_NODE_READY_DELAY,
            ..Store::default()
        };
        for ns in SYSTEM_NAMESPACES {
            let namespace = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": handling::now_time(),
                    "labels": {"kubernetes.io/metadata.name": ns},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            let rv = store.next_rv();
            let mut namespace = namespace;
            namespace["metadata"]["resourceVersion"] = json!(rv);
            store
                .objects
                .insert(("namespaces", String::new(), ns.to_string()), namespace);
        }
        let inner = Arc::new(Inner {
            store: Mutex::new(store),
            unavailable: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, tx) = serve_local(app, "Kubernetes API double").await;
        Self {
            inner,
            addr,
            _shutdown: tx,
        }
    }

    /// `127.0.0.1:PORT`: what the agent's `control_plane_endpoint` is set to
    /// in tests (kubeadm's `controlPlaneEndpoint` has no scheme).
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`, for HTTP clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The object at an API path such as
    /// `/api/v1/namespaces/kube-public/configmaps/cluster-info`, as a GET
    /// would return it (`None` if absent or the path names no object).
    pub fn object(&self, path: &str) -> Option<Value> {
        let Ok(Route::Object { res, ns, name, .. }) = route(path) else {
            return None;
        };
        let mut store = lock(&self.inner.store);
        run_controllers(&mut store);
        store.objects.get(&(res.plural, ns, name)).cloned()
    }

    /// Applies a JSON merge patch to the object at `path` directly (status
    /// included, bypassing the status split), for tests that need to age or
    /// break state behind a client's back. Returns the new object.
    pub fn patch_object(&self, path: &str, patch: &Value) -> Option<Value> {
        let Ok(Route::Object { res, ns, name, .. }) = route(path) else {
            return None;
        };
        let mut store = lock(&self.inner.store);
        let key = (res.plural, ns, name);
        let mut obj = store.objects.get(&key)?.clone();
        merge_patch(&mut obj, patch);
        let mut obj = normalize(res.kind, obj).ok()?;
        obj["metadata"]["resourceVersion"] = json!(store.next_rv());
        store.objects.insert(key, obj.clone());
        Some(obj)
    }

    /// Deletes the object at `path` directly; whether it existed.
    pub fn delete_object(&self, path: &str) -> bool {
        let Ok(Route::Object { res, ns, name, .. }) = route(path) else {
            return false;
        };
        let mut store = lock(&self.inner.store);
        let removed = store.objects.remove(&(res.plural, ns, name)).is_some();
        if removed {
            store.next_rv();
        }
        removed
    }

    /// Every Node, in name order.
    pub fn nodes(&self) -> Vec<Value> {
        self.list("nodes", None)
    }

    /// Every object of a resource (`"pods"`, `"secrets"`, …), optionally in
    /// one namespace, in key order.
    pub fn list(&self, plural: &str, namespace: Option<&str>) -> Vec<Value> {
        let mut store = lock(&self.inner.store);
        run_controllers(&mut store);
        store
            .objects
            .iter()
            .filter(|((p, ns, _), _)| *p == plural && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every request answered so far, in order.
    pub fn request_log(&self) -> Vec<KubeRequest> {
        lock(&self.inner.log).clone()
    }

    /// While `true`, every request is answered 503 with a `Status`, like an
    /// API server behind a load balancer with no healthy target.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// How long the simulated kubelet takes to report a newly registered
    /// Node ready (applies to Nodes created afterwards).
    pub fn set_node_ready_delay(&self, delay: Duration) {
        lock(&self.inner.store).node_ready_delay = delay;
    }

    /// Lays a pod network into the store as if its add-on had been applied
    /// (a DaemonSet writing `/etc/cni/net.d` on every node, its service
    /// account and namespace), for scenarios about something else than how
    /// the network got there. The agent's own add-on path is tested against
    /// the repository's manifests.
    pub fn install_pod_network(&self) {
        let mut store = lock(&self.inner.store);
        controllers::install_test_network(&mut store);
    }

    /// Why no pod network runs on `node` (each CNI DaemonSet's refusal), or
    /// what runs: for a test's failure message.
    pub fn network_report(&self, node: &str) -> String {
        let mut store = lock(&self.inner.store);
        run_controllers(&mut store);
        controllers::network_report(&store, node)
    }
}
