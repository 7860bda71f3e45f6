//! Routing

use super::replies::Reply;
use super::{Resource, RESOURCES};

#[derive(Debug)]
pub(super) enum Route {
    Version,
    Health,
    ApiVersions,
    ResourceList,
    /// `/apis`: the group list (legacy discovery, as kubectl reads it).
    Groups,
    /// `/apis/<group>/<version>`: that group version's resources.
    GroupResources {
        group: String,
        version: String,
    },
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

/// The core (`""`) resource named `plural`.
pub(super) fn resource(plural: &str) -> Option<&'static Resource> {
    resource_in("", "v1", plural)
}

/// The resource `plural` of a group version.
fn resource_in(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub(super) fn not_found_path() -> Reply {
    Reply::status(
        404,
        "NotFound",
        "the server could not find the requested resource".into(),
        None,
    )
}

pub(super) fn route(path: &str) -> Result<Route, Reply> {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => return Ok(Route::Version),
        "/readyz" | "/livez" | "/healthz" => return Ok(Route::Health),
        "/api" => return Ok(Route::ApiVersions),
        "/api/v1" => return Ok(Route::ResourceList),
        "/apis" => return Ok(Route::Groups),
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/apis/") {
        if let Some((group, version)) = gv.split_once('/').filter(|(_, v)| !v.contains('/')) {
            if RESOURCES
                .iter()
                .any(|r| r.group == group && r.version == version)
            {
                return Ok(Route::GroupResources {
                    group: group.to_string(),
                    version: version.to_string(),
                });
            }
            return Err(not_found_path());
        }
    }
    let (group, version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("", "v1", rest)
    } else {
        let rest = path.strip_prefix("/apis/").ok_or_else(not_found_path)?;
        let mut parts = rest.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(g), Some(v), Some(rest)) => (g, v, rest),
            _ => return Err(not_found_path()),
        }
    };
    let resource = |plural: &str| resource_in(group, version, plural);
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
                [name, sub @ ..] if sub.len() <= 1 => Ok(Route::Object {
                    res,
                    ns,
                    name: name.to_string(),
                    sub: sub.first().map(|s| s.to_string()),
                }),
                _ => Err(not_found_path()),
            }
        }
        [plural] => Ok(Route::Collection {
            res: found(plural)?,
            ns: String::new(),
        }),
        [plural, name, sub @ ..] if sub.len() <= 1 => {
            let res = found(plural)?;
            if res.namespaced {
                return Err(not_found_path());
            }
            Ok(Route::Object {
                res,
                ns: String::new(),
                name: name.to_string(),
                sub: sub.first().map(|s| s.to_string()),
            })
        }
        _ => Err(not_found_path()),
    }
}
