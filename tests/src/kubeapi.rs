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
//! - a *kubelet* that flips a freshly registered Node's `Ready` condition from
//!   `"False"` to `"True"` after [`KubeApi::set_node_ready_delay`];
//! - the *bootstrap signer* that signs `kube-public/cluster-info` with every
//!   signing bootstrap token (`jws-kubeconfig-<id>`), which is what joining
//!   nodes verify their token against;
//! - the *token cleaner* that deletes expired bootstrap-token Secrets.
//!
//! Objects are round-tripped through `k8s-openapi`'s types on every write, so
//! a body the real API server would reject as undecodable is rejected here
//! (400) and unknown fields are dropped as the real server prunes them.
//! Plain HTTP, no authentication.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, Status, StatusCause, StatusDetails, Time,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
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
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        has_status: false,
    },
    Resource {
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        has_status: false,
    },
    Resource {
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        has_status: true,
    },
    Resource {
        plural: "services",
        kind: "Service",
        namespaced: true,
        has_status: true,
    },
    Resource {
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        has_status: true,
    },
    Resource {
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        has_status: true,
    },
];

/// Decodes `value` as the typed object (what the real API server's decoder
/// would refuse, this refuses) and re-encodes it, dropping unknown fields.
fn normalize(kind: &str, mut value: Value) -> Result<Value, String> {
    use k8s_openapi::api::core::v1 as core;
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
    node_ready_delay: Mutex<Duration>,
    log: Mutex<Vec<KubeRequest>>,
}

/// A running API server double on `127.0.0.1:<port>`; stops on drop.
#[derive(Debug)]
pub struct KubeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl KubeApi {
    /// Starts an empty API server (no objects, not even namespaces: the
    /// double does not require a namespace to exist before objects in it).
    pub async fn start() -> Self {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            unavailable: AtomicBool::new(false),
            node_ready_delay: Mutex::new(DEFAULT_NODE_READY_DELAY),
            log: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind Kubernetes API double on 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("Kubernetes API double local address");
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            inner,
            addr,
            shutdown: Some(tx),
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
        *lock(&self.inner.node_ready_delay) = delay;
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Poison-tolerant lock: a panicking test must not cascade into the server.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Routing

#[derive(Debug)]
enum Route {
    Version,
    Health,
    ApiVersions,
    ResourceList,
    /// `ns` empty: cluster-scoped, or namespaced across all namespaces.
    Collection {
        res: &'static Resource,
        ns: String,
    },
    Object {
        res: &'static Resource,
        ns: String,
        name: String,
        sub: Option<String>,
    },
}

fn resource(plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

fn not_found_path() -> Reply {
    Reply::status(
        404,
        "NotFound",
        "the server could not find the requested resource".into(),
        None,
    )
}

fn route(path: &str) -> Result<Route, Reply> {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => return Ok(Route::Version),
        "/readyz" | "/livez" | "/healthz" => return Ok(Route::Health),
        "/api" => return Ok(Route::ApiVersions),
        "/api/v1" => return Ok(Route::ResourceList),
        _ => {}
    }
    let rest = path.strip_prefix("/api/v1/").ok_or_else(not_found_path)?;
    let segs: Vec<&str> = rest.split('/').collect();
    let found = |plural: &str| resource(plural).ok_or_else(not_found_path);
    match segs.as_slice() {
        ["namespaces", ns, plural, tail @ ..] if !tail.is_empty() || resource(plural).is_some() => {
            let res = found(plural)?;
            if !res.namespaced {
                return Err(not_found_path());
            }
            let ns = ns.to_string();
            match tail {
                [] => Ok(Route::Collection { res, ns }),
                [name] => Ok(Route::Object {
                    res,
                    ns,
                    name: name.to_string(),
                    sub: None,
                }),
                [name, sub] => Ok(Route::Object {
                    res,
                    ns,
                    name: name.to_string(),
                    sub: Some(sub.to_string()),
                }),
                _ => Err(not_found_path()),
            }
        }
        [plural] => Ok(Route::Collection {
            res: found(plural)?,
            ns: String::new(),
        }),
        [plural, name] => {
            let res = found(plural)?;
            if res.namespaced {
                return Err(not_found_path());
            }
            Ok(Route::Object {
                res,
                ns: String::new(),
                name: name.to_string(),
                sub: None,
            })
        }
        [plural, name, sub] => {
            let res = found(plural)?;
            if res.namespaced {
                return Err(not_found_path());
            }
            Ok(Route::Object {
                res,
                ns: String::new(),
                name: name.to_string(),
                sub: Some(sub.to_string()),
            })
        }
        _ => Err(not_found_path()),
    }
}

// ---------------------------------------------------------------------------
// Replies

/// What a handler answers: a status code and a JSON (or plain text) body.
#[derive(Debug)]
struct Reply {
    code: u16,
    body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self { code: 200, body }
    }

    fn created(body: Value) -> Self {
        Self { code: 201, body }
    }

    /// A failure `Status`, built from k8s-openapi's type so its shape is the
    /// real one (`kind`, `apiVersion`, `metadata`, `status`, `message`,
    /// `reason`, `details`, `code`).
    fn status(code: u16, reason: &str, message: String, details: Option<StatusDetails>) -> Self {
        let status = Status {
            code: Some(i32::from(code)),
            details,
            message: Some(message),
            metadata: ListMeta::default(),
            reason: Some(reason.to_string()),
            status: Some("Failure".into()),
        };
        Self {
            code,
            body: serde_json::to_value(status).unwrap_or(Value::Null),
        }
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        Self::status(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.plural),
            Some(details(res, name)),
        )
    }

    fn bad_request(message: String) -> Self {
        Self::status(400, "BadRequest", message, None)
    }

    fn invalid(res: &Resource, name: &str, message: String) -> Self {
        Self::status(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", res.kind),
            Some(details(res, name)),
        )
    }

    fn conflict(res: &Resource, name: &str, message: &str) -> Self {
        Self::status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {message}",
                res.plural
            ),
            Some(details(res, name)),
        )
    }

    fn method_not_allowed(method: &Method) -> Self {
        Self::status(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            None,
        )
    }
}

fn details(res: &Resource, name: &str) -> StatusDetails {
    StatusDetails {
        name: Some(name.to_string()),
        kind: Some(res.plural.to_string()),
        ..StatusDetails::default()
    }
}

fn success_status(res: &Resource, name: &str, uid: Option<String>, code: Option<i32>) -> Value {
    let status = Status {
        code,
        details: Some(StatusDetails {
            uid,
            ..details(res, name)
        }),
        message: None,
        metadata: ListMeta::default(),
        reason: None,
        status: Some("Success".into()),
    };
    serde_json::to_value(status).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------
// Handling

async fn handle(
    State(s): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().map(str::to_string);
    let (reply, text) = if s.unavailable.load(Ordering::SeqCst) {
        (
            Reply::status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request".into(),
                None,
            ),
            false,
        )
    } else {
        respond(&s, &method, &path, query.as_deref(), &headers, &body)
    };
    lock(&s.log).push(KubeRequest {
        method: method.to_string(),
        path,
        query,
        status: reply.code,
    });
    let (content_type, bytes) = match (&reply.body, text) {
        (Value::String(t), true) => ("text/plain; charset=utf-8", t.clone().into_bytes()),
        (v, _) => ("application/json", v.to_string().into_bytes()),
    };
    Response::builder()
        .status(StatusCode::from_u16(reply.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(bytes))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Returns the reply and whether its body is plain text.
fn respond(
    s: &Arc<Inner>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> (Reply, bool) {
    let route = match route(path) {
        Ok(r) => r,
        Err(reply) => return (reply, false),
    };
    let reply = match route {
        Route::Health => return (Reply::ok(Value::String("ok".into())), true),
        Route::Version => Reply::ok(json!({
            "major": "1",
            "minor": "31",
            "gitVersion": GIT_VERSION,
            "gitCommit": "5864a4677267e6adeae276ad85882a8714d69d9d",
            "gitTreeState": "clean",
            "buildDate": "2024-10-22T20:28:14Z",
            "goVersion": "go1.22.8",
            "compiler": "gc",
            "platform": "linux/amd64",
        })),
        Route::ApiVersions => Reply::ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}],
        })),
        Route::ResourceList => Reply::ok(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": RESOURCES.iter().map(|r| json!({
                "name": r.plural,
                "singularName": r.kind.to_ascii_lowercase(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update"],
            })).collect::<Vec<_>>(),
        })),
        Route::Collection { res, ns } => match *method {
            Method::GET => list(s, res, &ns, query),
            Method::POST if res.namespaced && ns.is_empty() => Reply::method_not_allowed(method),
            Method::POST => create(s, res, &ns, body),
            _ => Reply::method_not_allowed(method),
        },
        Route::Object {
            res,
            ns,
            name,
            sub: None,
        } => match *method {
            Method::GET => get(s, res, &ns, &name),
            Method::PUT => update(s, res, &ns, &name, body, false),
            Method::PATCH => patch(s, res, &ns, &name, headers, body, false),
            Method::DELETE => delete(s, res, &ns, &name, body),
            _ => Reply::method_not_allowed(method),
        },
        Route::Object {
            res,
            ns,
            name,
            sub: Some(sub),
        } => match (sub.as_str(), method) {
            ("status", &Method::GET) if res.has_status => get(s, res, &ns, &name),
            ("status", &Method::PUT) if res.has_status => update(s, res, &ns, &name, body, true),
            ("status", &Method::PATCH) if res.has_status => {
                patch(s, res, &ns, &name, headers, body, true)
            }
            ("eviction", &Method::POST) if res.plural == "pods" => evict(s, &ns, &name, body),
            ("status", _) | ("eviction", _) => Reply::method_not_allowed(method),
            _ => not_found_path(),
        },
    };
    (reply, false)
}

fn parse_body(body: &[u8]) -> Result<Value, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        Reply::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })
}

fn now_time() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null)
}

fn list(s: &Arc<Inner>, res: &'static Resource, ns: &str, query: Option<&str>) -> Reply {
    let params = query_params(query);
    if params.get("watch").is_some_and(|v| v == "true" || v == "1") {
        return Reply::bad_request("watch is not supported by this API server double".into());
    }
    let labels = match params.get("labelSelector").map(|s| parse_selector(s, true)) {
        Some(Err(e)) => return Reply::bad_request(e),
        Some(Ok(sel)) => sel,
        None => Vec::new(),
    };
    let fields = match params
        .get("fieldSelector")
        .map(|s| parse_selector(s, false))
    {
        Some(Err(e)) => return Reply::bad_request(e),
        Some(Ok(sel)) => sel,
        None => Vec::new(),
    };
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((p, n, _), _)| *p == res.plural && (ns.is_empty() || n == ns))
        .map(|(_, v)| v)
        .filter(|v| labels.iter().all(|r| r.matches_labels(v)))
        .filter(|v| fields.iter().all(|r| r.matches_fields(v)))
        .map(|v| {
            // The real server omits the type of each item in a typed list.
            let mut item = v.clone();
            if let Some(o) = item.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
            item
        })
        .collect();
    Reply::ok(json!({
        "apiVersion": "v1",
        "kind": format!("{}List", res.kind),
        "metadata": {"resourceVersion": store.revision.to_string()},
        "items": items,
    }))
}

fn get(s: &Arc<Inner>, res: &'static Resource, ns: &str, name: &str) -> Reply {
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    match store
        .objects
        .get(&(res.plural, ns.to_string(), name.to_string()))
    {
        Some(v) => Reply::ok(v.clone()),
        None => Reply::not_found(res, name),
    }
}

/// Checks the type and identity of a written body against the URL and
/// fills in `apiVersion`/`kind` when the client left them out.
fn check_body(
    res: &Resource,
    ns: &str,
    url_name: Option<&str>,
    body: &mut Value,
) -> Result<(), Reply> {
    let Some(obj) = body.as_object_mut() else {
        return Err(Reply::bad_request(
            "the body of the request is not a JSON object".into(),
        ));
    };
    for (field, expected) in [("apiVersion", "v1"), ("kind", res.kind)] {
        match obj.get(field).and_then(Value::as_str) {
            None => {
                obj.insert(field.into(), json!(expected));
            }
            Some(v) if v == expected => {}
            Some(v) => {
                return Err(Reply::bad_request(format!(
                    "{} in version \"v1\" cannot be handled as a {}: {field} {v:?} does not match the expected {expected:?}",
                    res.kind, res.kind
                )))
            }
        }
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| Reply::bad_request("metadata is not an object".into()))?;
    if res.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("namespace".into(), json!(ns));
            }
            Some(n) if n == ns => {}
            Some(n) => {
                return Err(Reply::bad_request(format!(
                    "the namespace of the provided object ({n}) does not match the namespace sent on the request ({ns})"
                )))
            }
        }
    } else {
        meta.remove("namespace");
    }
    if let Some(url_name) = url_name {
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if n == url_name => {}
            None | Some("") => {
                meta.insert("name".into(), json!(url_name));
            }
            Some(n) => {
                return Err(Reply::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({url_name})"
                )))
            }
        }
    }
    Ok(())
}

fn create(s: &Arc<Inner>, res: &'static Resource, ns: &str, body: &[u8]) -> Reply {
    let mut obj = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_body(res, ns, None, &mut obj) {
        return r;
    }
    let meta = &mut obj["metadata"];
    let name = match (
        meta.get("name").and_then(Value::as_str),
        meta.get("generateName").and_then(Value::as_str),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => {
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].into();
            format!("{prefix}{suffix}")
        }
        _ => {
            return Reply::invalid(
                res,
                "",
                "metadata.name: Required value: name or generateName is required".into(),
            )
        }
    };
    if let Err(e) = check_name(&name) {
        return Reply::invalid(
            res,
            &name,
            format!("metadata.name: Invalid value: {name:?}: {e}"),
        );
    }
    meta["name"] = json!(name);
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = now_time();
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
    }
    if res.kind == "Pod" {
        // The Pod strategy resets status on create; the kubelet reports it.
        obj["status"] = json!({"phase": "Pending"});
    }
    let mut obj = match normalize(res.kind, obj) {
        Ok(v) => v,
        Err(e) => {
            return Reply::bad_request(format!(
                "{} in version \"v1\" cannot be handled as a {}: {e}",
                res.kind, res.kind
            ))
        }
    };
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let key = (res.plural, ns.to_string(), name.clone());
    if store.objects.contains_key(&key) {
        return Reply::status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.plural),
            Some(details(res, &name)),
        );
    }
    obj["metadata"]["resourceVersion"] = json!(store.next_rv());
    store.objects.insert(key, obj.clone());
    run_controllers(&mut store);
    drop(store);
    if res.kind == "Node" && ready_condition(&obj) == Some("False") {
        let delay = *lock(&s.node_ready_delay);
        let uid = obj["metadata"]["uid"].clone();
        tokio::spawn(kubelet_reports_ready(s.clone(), name, uid, delay));
    }
    Reply::created(obj)
}

/// Object names must be RFC 1123 subdomains, as the API server validates.
fn check_name(name: &str) -> Result<(), &'static str> {
    const RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
                        and must start and end with an alphanumeric character";
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| ok_char(c) || c == '-' || c == '.')
        && name.starts_with(ok_char)
        && name.ends_with(ok_char);
    if valid {
        Ok(())
    } else {
        Err(RULE)
    }
}

fn ready_condition(node: &Value) -> Option<&str> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["status"]
        .as_str()
}

/// The simulated kubelet: after `delay`, the Node (if it is still the same
/// object) reports `Ready` = `"True"`, as a real kubelet does once its
/// runtime and network are up.
async fn kubelet_reports_ready(s: Arc<Inner>, name: String, uid: Value, delay: Duration) {
    tokio::time::sleep(delay).await;
    let mut store = lock(&s.store);
    let key = ("nodes", String::new(), name);
    let Some(mut node) = store.objects.get(&key).cloned() else {
        return;
    };
    if node["metadata"]["uid"] != uid {
        return;
    }
    let now = now_time();
    let ready = json!({
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    });
    let conditions = node["status"]["conditions"].as_array_mut();
    match conditions {
        Some(list) => match list.iter_mut().find(|c| c["type"] == "Ready") {
            Some(c) => *c = ready,
            None => list.push(ready),
        },
        None => node["status"]["conditions"] = json!([ready]),
    }
    node["metadata"]["resourceVersion"] = json!(store.next_rv());
    store.objects.insert(key, node);
}

/// Keeps what the client may not change (identity, creation, and for
/// resources with a status subresource the status or everything else).
fn carry_over(res: &Resource, old: &Value, new: &mut Value, status_only: bool) {
    if status_only {
        let status = new.get("status").cloned();
        *new = old.clone();
        match status {
            Some(st) => new["status"] = st,
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        return;
    }
    for field in [
        "uid",
        "creationTimestamp",
        "name",
        "namespace",
        "deletionTimestamp",
    ] {
        match old["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if res.has_status {
        match old.get("status") {
            Some(st) => new["status"] = st.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
}

fn update(
    s: &Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    body: &[u8],
    status_only: bool,
) -> Reply {
    let mut obj = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_body(res, ns, Some(name), &mut obj) {
        return r;
    }
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let key = (res.plural, ns.to_string(), name.to_string());
    let Some(old) = store.objects.get(&key).cloned() else {
        return Reply::not_found(res, name);
    };
    if let Some(rv) = obj["metadata"]
        .get("resourceVersion")
        .and_then(Value::as_str)
    {
        if rv != old["metadata"]["resourceVersion"] {
            return Reply::conflict(
                res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
    }
    carry_over(res, &old, &mut obj, status_only);
    write_back(&mut store, res, key, obj)
}

fn write_back(store: &mut Store, res: &'static Resource, key: Key, obj: Value) -> Reply {
    let mut obj = match normalize(res.kind, obj) {
        Ok(v) => v,
        Err(e) => {
            return Reply::bad_request(format!(
                "{} in version \"v1\" cannot be handled as a {}: {e}",
                res.kind, res.kind
            ))
        }
    };
    obj["metadata"]["resourceVersion"] = json!(store.next_rv());
    store.objects.insert(key, obj.clone());
    run_controllers(store);
    Reply::ok(obj)
}

#[allow(clippy::too_many_arguments)]
fn patch(
    s: &Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    status_only: bool,
) -> Reply {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !matches!(
        content_type.as_str(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Reply::status(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types by this double: application/merge-patch+json, application/strategic-merge-patch+json"
            ),
            None,
        );
    }
    let patch_doc = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let key = (res.plural, ns.to_string(), name.to_string());
    let Some(old) = store.objects.get(&key).cloned() else {
        return Reply::not_found(res, name);
    };
    if let Some(rv) = patch_doc["metadata"]
        .get("resourceVersion")
        .and_then(Value::as_str)
    {
        if rv != old["metadata"]["resourceVersion"] {
            return Reply::conflict(
                res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
    }
    let mut obj = old.clone();
    merge_patch(&mut obj, &patch_doc);
    carry_over(res, &old, &mut obj, status_only);
    obj["apiVersion"] = json!("v1");
    obj["kind"] = json!(res.kind);
    write_back(&mut store, res, key, obj)
}

fn delete(s: &Arc<Inner>, res: &'static Resource, ns: &str, name: &str, body: &[u8]) -> Reply {
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let key = (res.plural, ns.to_string(), name.to_string());
    let Some(old) = store.objects.get(&key).cloned() else {
        return Reply::not_found(res, name);
    };
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        if let Some(want) = options["preconditions"].get(field).and_then(Value::as_str) {
            let have = old["metadata"][field].as_str().unwrap_or("");
            if want != have {
                return Reply::conflict(
                    res,
                    name,
                    &format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"),
                );
            }
        }
    }
    store.objects.remove(&key);
    store.next_rv();
    run_controllers(&mut store);
    if res.kind == "Pod" {
        // Pods are returned as deleted (no graceful termination here).
        Reply::ok(old)
    } else {
        let uid = old["metadata"]["uid"].as_str().map(str::to_string);
        Reply::ok(success_status(res, name, uid, None))
    }
}

fn evict(s: &Arc<Inner>, ns: &str, name: &str, body: &[u8]) -> Reply {
    let pods = resource("pods").unwrap_or(&RESOURCES[2]);
    let eviction: k8s_openapi::api::policy::v1::Eviction = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            return Reply::bad_request(format!(
                "Eviction in version \"v1\" cannot be handled as a Eviction: {e}"
            ))
        }
    };
    if eviction.metadata.name.as_deref().is_some_and(|n| n != name) {
        return Reply::bad_request(format!(
            "name in URL does not match name in Eviction object ({name} != {})",
            eviction.metadata.name.unwrap_or_default()
        ));
    }
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    let key = ("pods", ns.to_string(), name.to_string());
    let Some(pod) = store.objects.get(&key) else {
        return Reply::not_found(pods, name);
    };
    if pod["metadata"]["annotations"][EVICTION_BLOCKED_ANNOTATION] == "blocked" {
        return Reply::status(
            429,
            "TooManyRequests",
            "Cannot evict pod as it would violate the pod's disruption budget.".into(),
            Some(StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("DisruptionBudget".into()),
                    message: Some(
                        "The disruption budget kbtest-pdb needs 1 healthy pods and has 1 currently"
                            .into(),
                    ),
                    field: None,
                }]),
                ..StatusDetails::default()
            }),
        );
    }
    store.objects.remove(&key);
    store.next_rv();
    // The eviction subresource answers a bare success `Status`.
    let mut status = success_status(pods, name, None, Some(201));
    if let Some(o) = status.as_object_mut() {
        o.remove("details");
    }
    Reply::created(status)
}

// ---------------------------------------------------------------------------
// Selectors and patches

fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// Parses `k=v`, `k==v`, `k!=v` (and for labels `k`, `!k`), comma-separated.
/// Set-based label requirements (`in`, `notin`) are refused, not misread.
fn parse_selector(s: &str, labels: bool) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if labels && term.contains(' ') {
            return Err(format!(
                "unable to parse requirement {term:?}: set-based selectors are not supported by this API server double"
            ));
        } else if labels {
            match term.strip_prefix('!') {
                Some(k) => Requirement::NotExists(k.trim().into()),
                None => Requirement::Exists(term.into()),
            }
        } else {
            return Err(format!(
                "invalid selector: '{s}'; can't understand '{term}'"
            ));
        };
        out.push(req);
    }
    Ok(out)
}

impl Requirement {
    fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        }
    }

    /// Field selectors compare the value at a dotted path; absent fields
    /// compare as `""` (so `spec.nodeName=` selects unscheduled Pods).
    fn matches_fields(&self, obj: &Value) -> bool {
        let get = |path: &str| -> String {
            let v = path.split('.').fold(obj, |v, seg| &v[seg]);
            match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            }
        };
        match self {
            Requirement::Equals(k, v) => get(k) == *v,
            Requirement::NotEquals(k, v) => get(k) != *v,
            Requirement::Exists(_) | Requirement::NotExists(_) => true,
        }
    }
}

/// RFC 7386 JSON merge patch. Strategic merge patches are applied the same
/// way (lists are replaced, not merged by key).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return;
    };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

// ---------------------------------------------------------------------------
// Controllers: token cleaner and bootstrap signer

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A decoded `data` entry of a Secret.
fn secret_field(secret: &Value, field: &str) -> Option<String> {
    let raw = secret["data"][field].as_str()?;
    String::from_utf8(B64.decode(raw).ok()?).ok()
}

/// Whether a bootstrap-token Secret's `expiration` is in the past.
fn token_expired(secret: &Value, now: Timestamp) -> bool {
    secret_field(secret, "expiration")
        .and_then(|e| e.parse::<Timestamp>().ok())
        .is_some_and(|exp| exp <= now)
}

/// Runs the token cleaner and bootstrap signer over the store, as the
/// controller manager does continuously. Called on every request, so what a
/// client reads is always what those controllers would have produced.
fn run_controllers(store: &mut Store) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn detached_jws_verifies_only_with_the_right_token() {
        let jws = compute_detached_jws("kubeconfig", "abcdef", "0123456789abcdef");
        assert!(detached_jws_is_valid(
            &jws,
            "kubeconfig",
            "abcdef",
            "0123456789abcdef"
        ));
        assert!(!detached_jws_is_valid(
            &jws,
            "kubeconfig",
            "abcdef",
            "0123456789abcdeX"
        ));
        assert!(!detached_jws_is_valid(
            &jws,
            "kubeconfig",
            "abcdeX",
            "0123456789abcdef"
        ));
        assert!(!detached_jws_is_valid(
            &jws,
            "other",
            "abcdef",
            "0123456789abcdef"
        ));
    }

    #[test]
    fn secrets_fold_string_data_and_names_are_validated() {
        let secret = normalize(
            "Secret",
            json!({"metadata": {"name": "s"}, "stringData": {"a": "x"}}),
        )
        .unwrap();
        assert_eq!(secret["data"]["a"], "eA==");
        assert!(secret.get("stringData").is_none());
        assert!(check_name("ip-10-0-1-2.ec2.internal").is_ok());
        assert!(check_name("Upper").is_err());
        assert!(check_name("-x").is_err());
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn paths_route_to_collections_objects_and_subresources() {
        assert!(
            matches!(route("/api/v1/nodes"), Ok(Route::Collection { ns, .. }) if ns.is_empty())
        );
        assert!(
            matches!(route("/api/v1/nodes/n1/status"), Ok(Route::Object { sub: Some(s), .. }) if s == "status")
        );
        assert!(
            matches!(route("/api/v1/namespaces/kube-system/pods/p/eviction"), Ok(Route::Object { sub: Some(s), .. }) if s == "eviction")
        );
        assert!(
            matches!(route("/api/v1/namespaces/kube-system"), Ok(Route::Object { ns, name, .. }) if ns.is_empty() && name == "kube-system")
        );
        assert!(route("/api/v1/namespaces/x/nodes").is_err());
        assert!(route("/apis/apps/v1/deployments").is_err());
    }

    #[test]
    fn percent_decoding_handles_selectors() {
        assert_eq!(percent_decode("spec.nodeName%3Dn1"), "spec.nodeName=n1");
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
