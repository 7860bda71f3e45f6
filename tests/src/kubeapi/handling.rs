//! Handling

use super::controllers::run_controllers;
use super::replies::{details, success_status, Reply};
use super::routing::{not_found_path, resource, route, Route};
use super::selectors::{merge_patch, parse_selector, query_params};
use super::{
    lock, normalize, Inner, Key, KubeRequest, Resource, Store, EVICTION_BLOCKED_ANNOTATION,
    GIT_VERSION, RESOURCES,
};
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::http::HeaderMap;
use axum::http::Method;
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::Response;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::StatusCause;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::StatusDetails;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

pub(super) async fn handle(
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
pub(super) fn respond(
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
        Route::ResourceList => resource_list("", "v1"),
        Route::GroupResources { group, version } => resource_list(&group, &version),
        Route::Groups => {
            let mut groups: Vec<(&str, &str)> = RESOURCES
                .iter()
                .filter(|r| !r.group.is_empty())
                .map(|r| (r.group, r.version))
                .collect();
            groups.dedup();
            Reply::ok(json!({
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": groups.iter().map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                }).collect::<Vec<_>>(),
            }))
        }
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
            Method::PATCH if content_type(headers) == APPLY => {
                apply(s, res, &ns, &name, query, body)
            }
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

pub(super) fn parse_body(body: &[u8]) -> Result<Value, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        Reply::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })
}

pub(super) fn now_time() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null)
}

pub(super) fn list(s: &Arc<Inner>, res: &'static Resource, ns: &str, query: Option<&str>) -> Reply {
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
        "apiVersion": res.api_version(),
        "kind": format!("{}List", res.kind),
        "metadata": {"resourceVersion": store.revision.to_string()},
        "items": items,
    }))
}

pub(super) fn get(s: &Arc<Inner>, res: &'static Resource, ns: &str, name: &str) -> Reply {
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
pub(super) fn check_body(
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
    let api_version = res.api_version();
    for (field, expected) in [("apiVersion", api_version.as_str()), ("kind", res.kind)] {
        match obj.get(field).and_then(Value::as_str) {
            None => {
                obj.insert(field.into(), json!(expected));
            }
            Some(v) if v == expected => {}
            Some(v) => {
                return Err(Reply::bad_request(format!(
                    "{} in version \"{}\" cannot be handled as a {}: {field} {v:?} does not match the expected {expected:?}",
                    res.kind, res.version, res.kind
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

pub(super) fn create(s: &Arc<Inner>, res: &'static Resource, ns: &str, body: &[u8]) -> Reply {
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
    let mut obj = match normalized(res, obj) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    if let Err(r) = namespace_exists(&store, res, ns) {
        return r;
    }
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
    if res.kind == "Node" {
        store
            .registered
            .insert(key.clone(), std::time::Instant::now());
    }
    store.objects.insert(key, obj.clone());
    run_controllers(&mut store);
    Reply::created(obj)
}

/// Object names must be RFC 1123 subdomains, as the API server validates.
pub(super) fn check_name(name: &str) -> Result<(), &'static str> {
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

/// Keeps what the client may not change (identity, creation, and for
/// resources with a status subresource the status or everything else).
pub(super) fn carry_over(res: &Resource, old: &Value, new: &mut Value, status_only: bool) {
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

/// The stored object `name` (after the controllers ran) and its key, or 404.
fn stored(
    store: &mut Store,
    res: &'static Resource,
    ns: &str,
    name: &str,
) -> Result<(Key, Value), Reply> {
    run_controllers(store);
    let key = (res.plural, ns.to_string(), name.to_string());
    match store.objects.get(&key).cloned() {
        Some(old) => Ok((key, old)),
        None => Err(Reply::not_found(res, name)),
    }
}

/// The store, locked, with the stored object `name` a write of `body` may
/// overwrite (it exists, and `body` names its `resourceVersion` or none)
/// and its key.
fn to_overwrite<'a>(
    s: &'a Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<(MutexGuard<'a, Store>, Key, Value), Reply> {
    let mut store = lock(&s.store);
    let (key, old) = stored(&mut store, res, ns, name)?;
    check_resource_version(res, name, body, &old)?;
    Ok((store, key, old))
}

/// A write that names a `resourceVersion` must name the stored object's
/// (optimistic concurrency): 409 otherwise.
fn check_resource_version(
    res: &Resource,
    name: &str,
    body: &Value,
    old: &Value,
) -> Result<(), Reply> {
    if let Some(rv) = body["metadata"]
        .get("resourceVersion")
        .and_then(Value::as_str)
    {
        if rv != old["metadata"]["resourceVersion"] {
            return Err(Reply::conflict(
                res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
    }
    Ok(())
}

pub(super) fn update(
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
    let (mut store, key, old) = match to_overwrite(s, res, ns, name, &obj) {
        Ok(found) => found,
        Err(r) => return r,
    };
    carry_over(res, &old, &mut obj, status_only);
    write_back(&mut store, res, key, obj)
}

/// `obj` round-tripped through the resource's `k8s-openapi` type, or the
/// 400 the API server answers a body it cannot decode with.
fn normalized(res: &Resource, obj: Value) -> Result<Value, Reply> {
    normalize(res.kind, obj).map_err(|e| {
        Reply::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            res.kind, res.version, res.kind
        ))
    })
}

pub(super) fn write_back(store: &mut Store, res: &'static Resource, key: Key, obj: Value) -> Reply {
    let mut obj = match normalized(res, obj) {
        Ok(v) => v,
        Err(r) => return r,
    };
    obj["metadata"]["resourceVersion"] = json!(store.next_rv());
    store.objects.insert(key, obj.clone());
    run_controllers(store);
    Reply::ok(obj)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn patch(
    s: &Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    status_only: bool,
) -> Reply {
    let content_type = content_type(headers);
    if !matches!(
        content_type.as_str(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Reply::status(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types by this double: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
            ),
            None,
        );
    }
    let patch_doc = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (mut store, key, old) = match to_overwrite(s, res, ns, name, &patch_doc) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let mut obj = old.clone();
    merge_patch(&mut obj, &patch_doc);
    carry_over(res, &old, &mut obj, status_only);
    obj["apiVersion"] = json!(res.api_version());
    obj["kind"] = json!(res.kind);
    write_back(&mut store, res, key, obj)
}

pub(super) fn delete(
    s: &Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    body: &[u8],
) -> Reply {
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        match parse_body(body) {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
    let mut store = lock(&s.store);
    let (key, old) = match stored(&mut store, res, ns, name) {
        Ok(found) => found,
        Err(r) => return r,
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

pub(super) fn evict(s: &Arc<Inner>, ns: &str, name: &str, body: &[u8]) -> Reply {
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

/// Server-side apply's media type.
const APPLY: &str = "application/apply-patch+yaml";

/// The request's media type, lowercased, without parameters.
fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A namespaced object needs its Namespace (404 otherwise, as the real
/// server's NamespaceLifecycle admission answers).
fn namespace_exists(store: &Store, res: &Resource, ns: &str) -> Result<(), Reply> {
    if !res.namespaced
        || store
            .objects
            .contains_key(&("namespaces", String::new(), ns.to_string()))
    {
        return Ok(());
    }
    let namespaces = resource("namespaces").unwrap_or(&RESOURCES[0]);
    Err(Reply::status(
        404,
        "NotFound",
        format!("namespaces \"{ns}\" not found"),
        Some(details(namespaces, ns)),
    ))
}

/// Removes from `obj` what the manager applied before (`previous`) and no
/// longer applies (`now`): fields it owned alone go with it.
fn prune(obj: &mut Value, previous: &Value, now: &Value) {
    let (Some(prev), Some(target)) = (previous.as_object(), obj.as_object_mut()) else {
        return;
    };
    for (k, v) in prev {
        match now.get(k) {
            None => {
                target.remove(k);
            }
            Some(n) if v.is_object() && n.is_object() => {
                if let Some(child) = target.get_mut(k) {
                    prune(child, v, n);
                }
            }
            Some(_) => {}
        }
    }
}

/// Whether `config` sets a leaf to another value than `obj` holds.
fn changes(obj: &Value, config: &Value) -> bool {
    match (obj, config) {
        (Value::Object(o), Value::Object(c)) => c
            .iter()
            .any(|(k, v)| o.get(k).is_none_or(|ov| changes(ov, v))),
        (o, c) => o != c,
    }
}

/// `PATCH` with `application/apply-patch+yaml`: server-side apply as the
/// real server does it for one or more appliers, minus the per-field
/// ownership of list items.
///
/// What the real server refuses, this refuses (handlers/patch.go, in its
/// order): no `fieldManager` (422); a body without `apiVersion` or `kind`,
/// or of another type than the URL (400 `invalid object type`), another
/// name or namespace (400); a body it cannot decode (400); a namespace that does
/// not exist (404); a `resourceVersion` that is not the stored one (409);
/// another applier's object changed without `force=true` (409 Conflict).
/// It creates the object when absent (201), merges the configuration into
/// it otherwise, removes the fields this manager applied before and no
/// longer does, bumps `metadata.generation` when the spec changes, and
/// writes nothing (same `resourceVersion`) when nothing changes.
pub(super) fn apply(
    s: &Arc<Inner>,
    res: &'static Resource,
    ns: &str,
    name: &str,
    query: Option<&str>,
    body: &[u8],
) -> Reply {
    let params = query_params(query);
    let Some(manager) = params.get("fieldManager").filter(|m| !m.is_empty()) else {
        // PatchOptions validation (apimachinery's ValidatePatchOptions).
        return Reply::status(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(),
            Some(StatusDetails {
                group: Some("meta.k8s.io".into()),
                kind: Some("PatchOptions".into()),
                causes: Some(vec![StatusCause {
                    reason: Some("FieldValueRequired".into()),
                    message: Some("Required value: is required for apply patch".into()),
                    field: Some("fieldManager".into()),
                }]),
                ..StatusDetails::default()
            }),
        );
    };
    let force = params.get("force").is_some_and(|f| f == "true");
    let mut config: Value = match serde_json::from_slice(body)
        .map_err(|e| e.to_string())
        .or_else(|_| serde_norway::from_slice::<Value>(body).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            return Reply::bad_request(format!("error decoding YAML: {e}"));
        }
    };
    for field in ["apiVersion", "kind"] {
        if config
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Reply::bad_request(format!(
                "Object '{}' is missing in '{}'",
                if field == "kind" {
                    "Kind"
                } else {
                    "apiVersion"
                },
                String::from_utf8_lossy(body)
            ));
        }
    }
    let (api_version, kind) = (
        config["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        config["kind"].as_str().unwrap_or_default().to_string(),
    );
    if api_version != res.api_version() || kind != res.kind {
        // The field manager's version check (managedfields versioncheck.go).
        let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
        return Reply::bad_request(format!(
            "invalid object type: {group}/{version}, Kind={kind}"
        ));
    }
    if let Err(r) = check_body(res, ns, Some(name), &mut config) {
        return r;
    }
    if let Err(r) = normalized(res, config.clone()) {
        return r;
    }
    let mut store = lock(&s.store);
    run_controllers(&mut store);
    if let Err(r) = namespace_exists(&store, res, ns) {
        return r;
    }
    let key: Key = (res.plural, ns.to_string(), name.to_string());
    let entry = json!({
        "manager": manager, "operation": "Apply", "apiVersion": res.api_version(),
        "fieldsType": "FieldsV1", "fieldsV1": {}, "time": now_time(),
    });
    if let Some(r) = workload_invalid(res, name, &config) {
        return r;
    }
    let Some(old) = store.objects.get(&key).cloned() else {
        let mut obj = config.clone();
        obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        obj["metadata"]["creationTimestamp"] = now_time();
        obj["metadata"]["managedFields"] = json!([entry]);
        if obj.get("spec").is_some() && res.has_status {
            obj["metadata"]["generation"] = json!(1);
        }
        if let Some(o) = obj.as_object_mut() {
            if res.has_status {
                o.remove("status");
            }
        }
        let mut obj = match normalized(res, obj) {
            Ok(v) => v,
            Err(r) => return r,
        };
        obj["metadata"]["resourceVersion"] = json!(store.next_rv());
        if res.kind == "Node" {
            store
                .registered
                .insert(key.clone(), std::time::Instant::now());
        }
        store.objects.insert(key.clone(), obj.clone());
        store.applied.insert((key, manager.clone()), config);
        run_controllers(&mut store);
        return Reply::created(obj);
    };
    if let Err(r) = check_resource_version(res, name, &config, &old) {
        return r;
    }
    if let Some(r) = immutable_changed(res, name, &old, &config) {
        return r;
    }
    let others: Vec<String> = store
        .applied
        .keys()
        .filter(|(k, m)| *k == key && m != manager)
        .map(|(_, m)| m.clone())
        .collect();
    let mut desired = config.clone();
    if let Some(m) = desired["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    if !force && !others.is_empty() && changes(&old, &desired) {
        return Reply::conflict(
            res,
            name,
            &format!(
                "Apply failed with {} conflict(s): conflict with {:?}",
                others.len(),
                others.join(", ")
            ),
        );
    }
    let mut obj = old.clone();
    if let Some(previous) = store.applied.get(&(key.clone(), manager.clone())) {
        prune(&mut obj, previous, &desired);
    }
    merge_patch(&mut obj, &desired);
    carry_over(res, &old, &mut obj, false);
    let mut managers: Vec<Value> = old["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["manager"] != manager.as_str())
        .collect();
    let unchanged = {
        let mut a = obj.clone();
        let mut b = old.clone();
        for v in [&mut a, &mut b] {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("managedFields");
                m.remove("resourceVersion");
                m.remove("generation");
            }
        }
        normalize(res.kind, a).ok() == normalize(res.kind, b).ok()
    };
    store
        .applied
        .insert((key.clone(), manager.clone()), desired);
    if unchanged {
        return Reply::ok(old);
    }
    managers.push(entry);
    obj["metadata"]["managedFields"] = json!(managers);
    if res.has_status && obj.get("spec") != old.get("spec") {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        obj["metadata"]["generation"] = json!(generation);
    }
    write_back(&mut store, res, key, obj)
}

/// apps/v1 validation: a workload's selector must be set and select its
/// own template's Pods (422 otherwise).
fn workload_invalid(res: &Resource, name: &str, obj: &Value) -> Option<Reply> {
    if !matches!(res.kind, "DaemonSet" | "Deployment") {
        return None;
    }
    let labels = &obj["spec"]["template"]["metadata"]["labels"];
    let selector = obj["spec"]["selector"]["matchLabels"].as_object();
    let selects =
        selector.is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k.as_str()] == *v));
    (!selects).then(|| {
        Reply::invalid(
            res,
            name,
            "spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`".into(),
        )
    })
}

/// Fields the API server refuses to change once set (422): a workload's
/// `spec.selector`, a binding's `roleRef`.
fn immutable_changed(res: &Resource, name: &str, old: &Value, new: &Value) -> Option<Reply> {
    let (field, path) = match res.kind {
        "DaemonSet" | "Deployment" => ("spec.selector", "/spec/selector"),
        "RoleBinding" | "ClusterRoleBinding" => ("roleRef", "/roleRef"),
        _ => return None,
    };
    let (Some(before), Some(after)) = (old.pointer(path), new.pointer(path)) else {
        return None;
    };
    (before != after).then(|| {
        Reply::invalid(
            res,
            name,
            format!("{field}: Invalid value: field is immutable"),
        )
    })
}

/// A group version's `APIResourceList` (legacy discovery).
fn resource_list(group: &str, version: &str) -> Reply {
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Reply::ok(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": RESOURCES.iter().filter(|r| r.group == group && r.version == version).map(|r| json!({
            "name": r.plural,
            "singularName": r.kind.to_ascii_lowercase(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update"],
        })).collect::<Vec<_>>(),
    }))
}
