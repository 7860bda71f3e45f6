//! The cluster's add-ons: its pod network (flannel) and, when its IAM role
//! is configured, cluster-autoscaler, from the manifests the image carries
//! under `addons.directory` (the repository's `addons/`).
//!
//! Without a pod network no Node is ever Ready ("cni plugin not
//! initialized"), so the init holder applies them right after `kubeadm
//! init`, and the leader applies them again on its turns: after a change of
//! the manifests (a new image), of the cluster generation (a restore), and
//! every [`REAPPLY`] to put back what someone deleted. Server-side apply,
//! field manager `kubeboot`, forced: kubeboot owns these objects the way
//! kube-addon-manager owns its add-ons; an unchanged apply writes nothing.
//!
//! Fenced by the cluster generation: every object is stamped with the
//! generation it was applied for ([`GENERATION_ANNOTATION`]), and an object
//! stamped by a newer generation is never overwritten (a node still working
//! for an abandoned generation cannot roll a restored cluster's add-ons back).
//!
//! Parsing, variable substitution and the schema check are pure
//! ([`parse`]); the API calls go through [`crate::kubernetes`].

use crate::config::{Config, PodNetwork};
use crate::kubernetes::{Kubernetes, Target};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "kubeboot";
/// The cluster generation an object was applied for.
pub const GENERATION_ANNOTATION: &str = "kubeboot.io/generation";
/// How often the leader re-applies unchanged add-ons (drift repair).
pub const REAPPLY: Duration = Duration::from_secs(600);
/// The most one application of the add-ons may take: a slow API server
/// must not hold back the init's end or the leader's lifecycle queue (hooks
/// time out in 15 minutes).
pub const TURN_BOUND: Duration = Duration::from_secs(120);
/// Largest manifest read (flannel's is 5 KiB).
const MAX_MANIFEST: u64 = 1024 * 1024;

/// Add-on failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("add-on manifest {}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("add-on manifest {}, document {document}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        /// 1-based, as an editor counts the `---` separated documents.
        document: usize,
        reason: String,
    },
    #[error("add-on {addon}: {source}")]
    Api {
        addon: String,
        source: crate::kubernetes::Error,
    },
    #[error("the add-ons were not applied within {}s (the API answers slowly or not at all); the leader tries again next turn", .0.as_secs())]
    Timeout(Duration),
    #[error("add-on {addon}: {object} was applied for cluster generation {theirs}, newer than this node's {ours}; not overwritten")]
    Newer {
        addon: String,
        object: String,
        theirs: u64,
        ours: u64,
    },
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        match self {
            Error::Manifest { .. } | Error::Invalid { .. } => &crate::catalogue::ADDON_MANIFEST,
            Error::Api { .. } | Error::Timeout(_) => &crate::catalogue::ADDON_APPLY,
            Error::Newer { .. } => &crate::catalogue::ADDON_NEWER,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::Api { source, .. } => Some(format!("[{}]", source.code())),
            _ => None,
        }
    }
}

/// A kind kubeboot applies, with what the API path needs (no discovery).
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Apply order: what others refer to first (namespaces, accounts,
    /// roles, configuration), workloads last.
    rank: u8,
}

const fn kind(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    rank: u8,
) -> Kind {
    Kind {
        api_version,
        kind,
        plural,
        namespaced,
        rank,
    }
}

/// Every kind an add-on may contain.
pub const KINDS: &[Kind] = &[
    kind("v1", "Namespace", "namespaces", false, 0),
    kind("v1", "ServiceAccount", "serviceaccounts", true, 1),
    kind("v1", "ConfigMap", "configmaps", true, 1),
    kind(
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
        2,
    ),
    kind("rbac.authorization.k8s.io/v1", "Role", "roles", true, 2),
    kind(
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        3,
    ),
    kind(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "rolebindings",
        true,
        3,
    ),
    kind("apps/v1", "DaemonSet", "daemonsets", true, 4),
    kind("apps/v1", "Deployment", "deployments", true, 4),
];

/// Values the manifests may use as `{{name}}` inside string values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Variables {
    pub cluster_name: String,
    pub region: String,
    pub pod_subnet: String,
    pub cluster_autoscaler_role_arn: Option<String>,
}

impl Variables {
    fn get(&self, name: &str) -> Result<&str, String> {
        match name {
            "cluster_name" => Ok(&self.cluster_name),
            "region" => Ok(&self.region),
            "pod_subnet" => Ok(&self.pod_subnet),
            "cluster_autoscaler_role_arn" => self
                .cluster_autoscaler_role_arn
                .as_deref()
                .ok_or_else(|| "{{cluster_autoscaler_role_arn}} needs addons.cluster_autoscaler_role_arn".into()),
            other => Err(format!(
                "unknown variable {{{{{other}}}}} (known: cluster_name, region, pod_subnet, cluster_autoscaler_role_arn)"
            )),
        }
    }
}

/// One object of an add-on, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub body: Value,
}

impl Object {
    fn target(&self) -> Target<'_> {
        Target {
            api_version: self.kind.api_version,
            kind: self.kind.kind,
            plural: self.kind.plural,
            namespace: self.namespace.as_deref(),
            name: &self.name,
        }
    }
}

/// An add-on: a manifest's objects, in apply order.
#[derive(Debug, Clone, PartialEq)]
pub struct AddOn {
    pub name: String,
    pub objects: Vec<Object>,
}

/// The add-ons `cfg` selects, as manifest names under `addons.directory`.
pub fn selected(cfg: &Config) -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg.addons.pod_network == PodNetwork::Flannel {
        names.push("flannel");
    }
    if cfg.addons.cluster_autoscaler_role_arn.is_some() {
        names.push("cluster-autoscaler");
    }
    names
}

/// The variables of this cluster (`region` is the node's, from IMDS,
/// unless aws.region says otherwise).
pub fn variables(cfg: &Config, region: &str) -> Variables {
    Variables {
        cluster_name: cfg.cluster.name.clone(),
        region: cfg.aws.region.clone().unwrap_or_else(|| region.to_string()),
        pod_subnet: cfg.cluster.pod_subnet.clone(),
        cluster_autoscaler_role_arn: cfg.addons.cluster_autoscaler_role_arn.clone(),
    }
}

/// Reads and parses the selected add-ons; any invalid one fails the lot,
/// so nothing is applied half.
pub fn load(cfg: &Config, vars: &Variables) -> Result<Vec<AddOn>, Error> {
    selected(cfg)
        .into_iter()
        .map(|name| {
            let path = cfg.addons.directory.join(format!("{name}.yaml"));
            let text = read(&path)?;
            parse(name, &path, &text, vars)
        })
        .collect()
}

fn read(path: &Path) -> Result<String, Error> {
    let bytes =
        crate::config::input::read_file(path, MAX_MANIFEST).map_err(|e| Error::Manifest {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    String::from_utf8(bytes).map_err(|_| Error::Manifest {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// Parses a multi-document manifest: each document must be an object of a
/// [`KINDS`] kind that decodes as its Kubernetes type without dropping a
/// field (what `kubectl apply --validate=strict` refuses), names itself
/// (and its namespace when namespaced), and uses only known variables.
pub fn parse(name: &str, path: &Path, text: &str, vars: &Variables) -> Result<AddOn, Error> {
    use serde::Deserialize as _;
    let mut objects = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            document: index + 1,
            reason,
        };
        let value = Value::deserialize(document).map_err(|e| invalid(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (a leading or trailing `---`)
        }
        let value = substitute(value, vars).map_err(invalid)?;
        objects.push(object(value).map_err(invalid)?);
    }
    if objects.is_empty() {
        return Err(Error::Manifest {
            path: path.to_path_buf(),
            reason: "no objects".into(),
        });
    }
    objects.sort_by_key(|o| o.kind.rank);
    Ok(AddOn {
        name: name.to_string(),
        objects,
    })
}

/// Replaces `{{variable}}` in every string value.
fn substitute(value: Value, vars: &Variables) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(substitute_str(&s, vars)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| substitute(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, substitute(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other,
    })
}

fn substitute_str(s: &str, vars: &Variables) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("an unclosed {{{{ in {s:?}"))?;
        out.push_str(vars.get(after[..end].trim())?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One document as an [`Object`], checked against its type.
fn object(value: Value) -> Result<Object, String> {
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind_name = value["kind"].as_str().unwrap_or_default();
    let kind = KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind_name)
        .ok_or_else(|| {
            format!(
                "kind {kind_name:?} of apiVersion {api_version:?} is not one kubeboot applies ({})",
                KINDS
                    .iter()
                    .map(|k| format!("{}/{}", k.api_version, k.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let name = value["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{kind_name} without metadata.name"))?
        .to_string();
    let namespace = value["metadata"]["namespace"].as_str().map(str::to_string);
    if namespace.as_deref() == Some("") {
        return Err(format!(
            "{kind_name} {name} has an empty metadata.namespace"
        ));
    }
    match (kind.namespaced, &namespace) {
        (true, None) => {
            return Err(format!(
                "{kind_name} {name} without metadata.namespace (kubeboot never defaults it)"
            ))
        }
        (false, Some(ns)) => {
            return Err(format!(
                "{kind_name} {name} is cluster-scoped but names namespace {ns:?}"
            ))
        }
        _ => {}
    }
    if matches!(kind.kind, "DaemonSet" | "Deployment") {
        // The API server refuses a workload whose selector does not select
        // its own Pods (apps validation: "`selector` does not match
        // template `labels`").
        let labels = &value["spec"]["template"]["metadata"]["labels"];
        let selector = value["spec"]["selector"]["matchLabels"].as_object();
        if selector.is_none_or(|m| m.is_empty() || m.iter().any(|(k, v)| labels[k.as_str()] != *v))
        {
            return Err(format!(
                "{kind_name} {name}: spec.selector.matchLabels must be set and match spec.template.metadata.labels"
            ));
        }
    }
    let decoded = roundtrip(kind.kind, &value)?;
    if let Some(path) = dropped(&value, &decoded, String::new()) {
        return Err(format!(
            "{kind_name} {name}: unknown field {path:?} (a typo, or a field of another API version)"
        ));
    }
    Ok(Object {
        kind,
        namespace,
        name,
        body: value,
    })
}

/// `value` decoded as its `k8s-openapi` type and encoded again.
fn roundtrip(kind: &str, value: &Value) -> Result<Value, String> {
    use k8s_openapi::api::apps::v1 as apps;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::rbac::v1 as rbac;
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
        let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(typed).map_err(|e| e.to_string())
    }
    match kind {
        "Namespace" => rt::<core::Namespace>(value),
        "ServiceAccount" => rt::<core::ServiceAccount>(value),
        "ConfigMap" => rt::<core::ConfigMap>(value),
        "ClusterRole" => rt::<rbac::ClusterRole>(value),
        "Role" => rt::<rbac::Role>(value),
        "ClusterRoleBinding" => rt::<rbac::ClusterRoleBinding>(value),
        "RoleBinding" => rt::<rbac::RoleBinding>(value),
        "DaemonSet" => rt::<apps::DaemonSet>(value),
        "Deployment" => rt::<apps::Deployment>(value),
        other => Err(format!("no type for kind {other}")),
    }
    .map_err(|e| format!("{kind} does not decode: {e}"))
}

/// The first field of `original` that `decoded` lost, as a dotted path.
fn dropped(original: &Value, decoded: &Value, at: String) -> Option<String> {
    match (original, decoded) {
        (Value::Object(o), Value::Object(d)) => o.iter().find_map(|(k, v)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            match d.get(k) {
                None if !v.is_null() => Some(path),
                None => None,
                Some(dv) => dropped(v, dv, path),
            }
        }),
        (Value::Array(o), Value::Array(d)) => o
            .iter()
            .zip(d)
            .enumerate()
            .find_map(|(i, (v, dv))| dropped(v, dv, format!("{at}[{i}]"))),
        _ => None,
    }
}

/// A digest of what would be applied, so a turn knows the manifests or the
/// variables changed without applying.
pub fn digest(addons: &[AddOn]) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for addon in addons {
        hash.update(addon.name.as_bytes());
        for object in &addon.objects {
            hash.update(object.body.to_string().as_bytes());
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// `add-on: object` for each object applied.
    pub objects: Vec<String>,
}

/// Applies every add-on, in order, each object stamped with `generation`;
/// stops at the first failure (the next turn starts over: applies are
/// idempotent).
pub async fn apply(api: &Kubernetes, addons: &[AddOn], generation: u64) -> Result<Applied, Error> {
    let mut applied = Applied::default();
    for addon in addons {
        for object in &addon.objects {
            let target = object.target();
            let api_error = |source| Error::Api {
                addon: addon.name.clone(),
                source,
            };
            let current = api.get_object(&target).await.map_err(api_error)?;
            if let Some(theirs) = current.as_ref().and_then(stamped_generation) {
                if theirs > generation {
                    return Err(Error::Newer {
                        addon: addon.name.clone(),
                        object: target.describe(),
                        theirs,
                        ours: generation,
                    });
                }
            }
            let mut body = object.body.clone();
            body["metadata"]["annotations"][GENERATION_ANNOTATION] =
                Value::String(generation.to_string());
            // The version the fence was checked against: the apply is
            // refused (409) if another writer changed the object since.
            if let Some(version) = current
                .as_ref()
                .and_then(|c| c["metadata"]["resourceVersion"].as_str())
            {
                body["metadata"]["resourceVersion"] = Value::String(version.to_string());
            }
            api.apply(&target, &body, FIELD_MANAGER)
                .await
                .map_err(api_error)?;
            applied
                .objects
                .push(format!("{}: {}", addon.name, target.describe()));
        }
    }
    Ok(applied)
}

/// The generation an object was last applied for, if kubeboot applied it.
pub fn stamped_generation(object: &Value) -> Option<u64> {
    object["metadata"]["annotations"][GENERATION_ANNOTATION]
        .as_str()?
        .parse()
        .ok()
}

/// Loads the selected add-ons and applies them through `admin.conf`: the
/// init holder's and the leader's one call.
pub async fn apply_from_config(
    cfg: &Config,
    region: &str,
    generation: u64,
) -> Result<Applied, Error> {
    let addons = load(cfg, &variables(cfg, region))?;
    if addons.is_empty() {
        return Ok(Applied::default());
    }
    apply_bounded(cfg, &addons, generation).await
}

/// [`apply`] through `admin.conf`, the whole of it within [`TURN_BOUND`].
pub async fn apply_bounded(
    cfg: &Config,
    addons: &[AddOn],
    generation: u64,
) -> Result<Applied, Error> {
    let run = async {
        let api = admin_client(cfg).await?;
        apply(&api, addons, generation).await
    };
    tokio::time::timeout(TURN_BOUND, run)
        .await
        .unwrap_or(Err(Error::Timeout(TURN_BOUND)))
}

/// A client with the control plane's `admin.conf`.
pub async fn admin_client(cfg: &Config) -> Result<Kubernetes, Error> {
    Kubernetes::from_kubeconfig(
        &cfg.paths.kubernetes_dir.join("admin.conf"),
        cfg.timeouts.kube_api,
    )
    .await
    .map_err(|source| Error::Api {
        addon: "(all)".into(),
        source,
    })
}

/// The leader's memory of its last successful apply: what, for which
/// generation, and when.
#[derive(Debug, Default)]
pub struct Memo {
    last: Option<(String, u64, tokio::time::Instant)>,
    /// The last failure's code and message, so an unchanged failure is
    /// reported at error level once, not every turn.
    failed: Option<String>,
}

impl Memo {
    /// Whether add-ons with `digest` for `generation` are due: never
    /// applied by this process, changed, or last applied [`REAPPLY`] ago.
    pub fn due(&self, digest: &str, generation: u64) -> bool {
        match &self.last {
            Some((d, g, at)) => d != digest || *g != generation || at.elapsed() >= REAPPLY,
            None => true,
        }
    }

    pub fn record(&mut self, digest: String, generation: u64) {
        self.last = Some((digest, generation, tokio::time::Instant::now()));
        self.failed = None;
    }

    /// Records a failure; whether it is new (another than the last one).
    pub fn failure_is_new(&mut self, failure: &str) -> bool {
        let new = self.failed.as_deref() != Some(failure);
        self.failed = Some(failure.to_string());
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;

    fn vars() -> Variables {
        Variables {
            cluster_name: "prod-a".into(),
            region: "eu-west-1".into(),
            pod_subnet: "10.32.0.0/16".into(),
            cluster_autoscaler_role_arn: Some("arn:aws:iam::111122223333:role/ca".into()),
        }
    }

    fn repo_manifest(name: &str) -> (PathBuf, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../addons")
            .join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).expect("manifest");
        (path, text)
    }

    #[test]
    fn flannel_parses_in_apply_order_with_the_pod_subnet() {
        let (path, text) = repo_manifest("flannel");
        let addon = parse("flannel", &path, &text, &vars()).expect("flannel");
        let kinds: Vec<&str> = addon.objects.iter().map(|o| o.kind.kind).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ConfigMap",
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet"
            ]
        );
        let config = addon
            .objects
            .iter()
            .find(|o| o.kind.kind == "ConfigMap")
            .expect("configmap");
        let net: Value = serde_json::from_str(
            config.body["data"]["net-conf.json"]
                .as_str()
                .expect("net-conf"),
        )
        .expect("json");
        assert_eq!(net["Network"], "10.32.0.0/16");
        assert_eq!(net["Backend"]["Type"], "vxlan");
    }

    #[test]
    fn cluster_autoscaler_gets_the_cluster_region_and_role() {
        let (path, text) = repo_manifest("cluster-autoscaler");
        let addon = parse("cluster-autoscaler", &path, &text, &vars()).expect("ca");
        let deployment = addon
            .objects
            .iter()
            .find(|o| o.kind.kind == "Deployment")
            .expect("deployment");
        let container = &deployment.body["spec"]["template"]["spec"]["containers"][0];
        let command: Vec<&str> = container["command"]
            .as_array()
            .expect("command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(command.contains(
            &"--node-group-auto-discovery=asg:tag=k8s.io/cluster-autoscaler/enabled,k8s.io/cluster-autoscaler/prod-a"
        ));
        assert!(command.contains(&"--balance-similar-node-groups"));
        let env: Vec<(&str, &str)> = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
            .collect();
        assert!(env.contains(&("AWS_REGION", "eu-west-1")));
        assert!(env.contains(&("AWS_ROLE_ARN", "arn:aws:iam::111122223333:role/ca")));
        assert!(!text.contains("{{cluster_name}}") || !deployment.body.to_string().contains("{{"));
        // Without its role the add-on cannot be rendered at all.
        let err = parse(
            "cluster-autoscaler",
            &path,
            &text,
            &Variables {
                cluster_autoscaler_role_arn: None,
                ..vars()
            },
        )
        .expect_err("no role");
        assert!(
            err.to_string()
                .contains("addons.cluster_autoscaler_role_arn"),
            "{err}"
        );
        assert_eq!(err.code(), "KB-ADDON-001");
    }

    #[test]
    fn unknown_fields_kinds_and_missing_names_are_refused_by_document() {
        let path = Path::new("/x/a.yaml");
        let refused = |text: &str| parse("a", path, text, &vars()).expect_err(text).to_string();
        let typo = refused(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d, namespace: a}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: i, imagePullPolicyy: Always}]\n",
        );
        assert!(typo.contains("document 2"), "{typo}");
        assert!(
            typo.contains("spec.template.spec.containers[0].imagePullPolicyy"),
            "{typo}"
        );
        let kind = refused("apiVersion: batch/v1\nkind: Job\nmetadata: {name: j, namespace: a}\n");
        assert!(kind.contains("not one kubeboot applies"), "{kind}");
        let unnamed = refused("apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: a}\n");
        assert!(unnamed.contains("without metadata.name"), "{unnamed}");
        let no_ns = refused("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n");
        assert!(no_ns.contains("without metadata.namespace"), "{no_ns}");
        let scoped =
            refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: n, namespace: x}\n");
        assert!(scoped.contains("cluster-scoped"), "{scoped}");
        let var = refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: \"{{nope}}\"}\n");
        assert!(var.contains("unknown variable {{nope}}"), "{var}");
        let yaml = refused("apiVersion: v1\nkind: [\n");
        assert!(yaml.contains("document 1"), "{yaml}");
        let wrong_type = refused(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: a}\ndata: {a: [1]}\n",
        );
        assert!(wrong_type.contains("does not decode"), "{wrong_type}");
        let unselected = refused("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d, namespace: a}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: y}}\n    spec: {containers: [{name: c, image: i}]}\n");
        assert!(unselected.contains("must be set and match"), "{unselected}");
        let empty = parse("a", path, "---\n", &vars()).expect_err("empty");
        assert!(empty.to_string().contains("no objects"), "{empty}");
    }

    #[test]
    fn the_digest_follows_the_variables_and_the_memo_the_digest_and_generation() {
        let (path, text) = repo_manifest("flannel");
        let a = parse("flannel", &path, &text, &vars()).expect("a");
        let b = parse(
            "flannel",
            &path,
            &text,
            &Variables {
                pod_subnet: "10.33.0.0/16".into(),
                ..vars()
            },
        )
        .expect("b");
        let (da, db) = (digest(std::slice::from_ref(&a)), digest(&[b]));
        assert_ne!(da, db);
        assert_eq!(da, digest(&[a]));
        let mut memo = Memo::default();
        assert!(memo.due(&da, 1));
        memo.record(da.clone(), 1);
        assert!(!memo.due(&da, 1));
        assert!(memo.due(&db, 1));
        assert!(memo.due(&da, 2));
        assert!(memo.failure_is_new("KB-ADDON-002: down"));
        assert!(!memo.failure_is_new("KB-ADDON-002: down"), "reported once");
        assert!(memo.failure_is_new("KB-ADDON-001: bad"));
        memo.record(da.clone(), 1);
        assert!(
            memo.failure_is_new("KB-ADDON-001: bad"),
            "new after a success"
        );
    }

    #[test]
    fn stamps_are_read_from_the_annotation() {
        let object = serde_json::json!({"metadata": {"annotations": {GENERATION_ANNOTATION: "7"}}});
        assert_eq!(stamped_generation(&object), Some(7));
        assert_eq!(
            stamped_generation(&serde_json::json!({"metadata": {}})),
            None
        );
    }
}
