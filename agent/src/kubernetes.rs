//! The Kubernetes API as this node's own credentials see it: is our Node
//! registered and `Ready`? `kubeadm join` returns once the kubelet has
//! bootstrapped its credentials, not when the node can run Pods; bootstrap
//! only reports success after the API says so.
//!
//! One client per use, built from a kubeconfig kubeadm wrote (the worker's
//! `kubelet.conf`), with a timeout on every request and kube's built-in
//! retries off: kube 5 retries 429/503 fifteen times with backoff by default,
//! which would hide a stall behind minutes of silence. The caller's
//! [`crate::retry`] policy decides what is retried, with logging and a deadline.

use crate::retry::{self, Classify, RetryClass, WaitPolicy};
use k8s_openapi::api::core::v1::Node;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Kubernetes API failures, each naming the object and what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use the kubeconfig {}: {reason}", path.display())]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("Kubernetes API {operation} {object}: {message}")]
    Api {
        operation: &'static str,
        object: String,
        /// HTTP status, when the API server answered.
        status: Option<u16>,
        message: String,
    },
    #[error("node {node} is not Ready: {why}")]
    NotReady { node: String, why: String },
    #[error("node {node} did not become Ready within {}: {last}", crate::config::value::format_duration(*waited))]
    Deadline {
        node: String,
        waited: Duration,
        last: String,
    },
    #[error("node {node} has no pod network after {}: {last}", crate::config::value::format_duration(*waited))]
    NoNetwork {
        node: String,
        waited: Duration,
        last: String,
    },
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::Kubeconfig { .. } => RetryClass::Permanent,
            Error::NotReady { .. } => RetryClass::Transient,
            Error::Api { status, .. } => match status {
                // Refused credentials or a malformed request do not heal.
                Some(400 | 401 | 403 | 422) => RetryClass::Permanent,
                _ => RetryClass::Transient,
            },
            Error::Deadline { .. } | Error::NoNetwork { .. } => RetryClass::Permanent,
        }
    }
}

/// Where a Node stands, from its `Ready` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Registered, `Ready` is not `"True"`: the condition's reason and message.
    NotReady(String),
    /// Not Ready only because the container runtime's network is not ready
    /// (no CNI configuration yet: the pod network add-on does not run on
    /// the node yet): the condition's reason and message.
    AwaitingNetwork(String),
    /// Registered without a `Ready` condition yet (the kubelet has not reported).
    Unreported,
}

/// The readiness a Node object reports; pure so it is tested without an API.
pub fn readiness(node: &Node) -> Readiness {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match condition {
        None => Readiness::Unreported,
        Some(c) if c.status == "True" => Readiness::Ready,
        Some(c) if c.status == "False" && awaits_network(c.message.as_deref().unwrap_or("")) => {
            Readiness::AwaitingNetwork(format!(
                "Ready=False reason={} message={}",
                c.reason.as_deref().unwrap_or("-"),
                c.message.as_deref().unwrap_or("-")
            ))
        }
        Some(c) => Readiness::NotReady(format!(
            "Ready={} reason={} message={}",
            c.status,
            c.reason.as_deref().unwrap_or("-"),
            c.message.as_deref().unwrap_or("-")
        )),
    }
}

/// Whether a `Ready` condition's message says the node waits for nothing
/// but its pod network: the kubelet's runtime-network error
/// (`container runtime network not ready: NetworkReady=false ...`,
/// pkg/kubelet/kubelet_network.go and the CRI's NetworkReady condition)
/// and no other error joined to it (the kubelet joins its errors with `,`
/// after "[" when there are several).
pub fn awaits_network(message: &str) -> bool {
    message.starts_with("container runtime network not ready: NetworkReady=false")
}

/// A client of the API server, with per-request timeouts.
pub struct Kubernetes {
    client: kube::Client,
}

impl Kubernetes {
    /// A client from a kubeconfig file (kubeadm's JSON or YAML), every
    /// request bounded by `request_timeout`.
    pub async fn from_kubeconfig(path: &Path, request_timeout: Duration) -> Result<Self, Error> {
        let fail = |reason: String| Error::Kubeconfig {
            path: path.to_path_buf(),
            reason,
        };
        let kubeconfig =
            kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        config.connect_timeout = Some(request_timeout);
        config.read_timeout = Some(request_timeout);
        config.write_timeout = Some(request_timeout);
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(|e| fail(e.to_string()))?;
        Ok(Kubernetes { client })
    }

    /// The Node's readiness; a Node not registered yet is `NotReady`.
    pub async fn node_readiness(&self, name: &str) -> Result<Readiness, Error> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        match nodes.get_opt(name).await {
            Ok(Some(node)) => Ok(readiness(&node)),
            Ok(None) => Ok(Readiness::NotReady("not registered yet".into())),
            Err(e) => Err(api_error("get", &format!("node/{name}"), &e)),
        }
    }

    /// Waits until the Node is `Ready`, polling with backoff. While it
    /// waits only for its pod network (the add-on is applied by the
    /// control planes, then its Pod starts on this node) it is given
    /// `network_deadline` from the start, and `waiting` is told the reason
    /// each time it changes (the unit's status line). Any other NotReady
    /// fails after `deadline`, counted from the start or from the last time
    /// only the network was missing, whichever is later.
    pub async fn wait_node_ready(
        &self,
        name: &str,
        deadline: Duration,
        network_deadline: Duration,
        waiting: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let policy = WaitPolicy {
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            max_attempts: 1_000_000,
            deadline: Some(network_deadline.saturating_add(deadline)),
        };
        // The last network-only reason and when it was seen; whether the
        // last answer was one.
        let network = std::sync::Mutex::new((None::<String>, started, false));
        let outcome = retry::with_retries("wait for the node to be Ready", &policy, || async {
            let readiness = self.node_readiness(name).await;
            let mut seen = network.lock().unwrap_or_else(|p| p.into_inner());
            let why = match readiness {
                Err(e) => {
                    seen.2 = false;
                    return Err(e);
                }
                Ok(Readiness::Ready) => return Ok(()),
                Ok(Readiness::AwaitingNetwork(why)) => {
                    if seen.0.as_deref() != Some(why.as_str()) {
                        waiting(&why);
                        seen.0 = Some(why.clone());
                    }
                    seen.1 = tokio::time::Instant::now();
                    seen.2 = true;
                    if started.elapsed() >= network_deadline {
                        return Err(Error::NoNetwork {
                            node: name.to_string(),
                            waited: network_deadline,
                            last: why,
                        });
                    }
                    why
                }
                Ok(Readiness::NotReady(why)) => {
                    seen.2 = false;
                    why
                }
                Ok(Readiness::Unreported) => {
                    seen.2 = false;
                    "the kubelet has not reported a Ready condition".into()
                }
            };
            if !seen.2 {
                // Not (only) the network: timeouts.node_ready, from the
                // start or the network's arrival.
                if seen.1.elapsed() >= deadline {
                    return Err(Error::Deadline {
                        node: name.to_string(),
                        waited: deadline,
                        last: why,
                    });
                }
            }
            Err(Error::NotReady {
                node: name.to_string(),
                why,
            })
        })
        .await;
        outcome.map_err(|e| match e {
            retry::RetryError::Failed(e) => e,
            retry::RetryError::Deadline { last, .. } => {
                let last = last.unwrap_or_else(|| "no answer".into());
                if network.lock().unwrap_or_else(|p| p.into_inner()).2 {
                    Error::NoNetwork {
                        node: name.to_string(),
                        waited: network_deadline,
                        last,
                    }
                } else {
                    Error::Deadline {
                        node: name.to_string(),
                        waited: deadline,
                        last,
                    }
                }
            }
        })
    }

    /// The object at `target`, if it exists.
    pub async fn get_object(
        &self,
        target: &Target<'_>,
    ) -> Result<Option<serde_json::Value>, Error> {
        let api = self.dynamic(target);
        match api.get_opt(target.name).await {
            Ok(found) => Ok(found.map(|o| serde_json::to_value(o).unwrap_or_default())),
            Err(e) => Err(api_error("get", &target.describe(), &e)),
        }
    }

    /// Server-side apply of `body` to `target` as field manager `manager`,
    /// forced: the caller owns the object's configuration (as the add-on
    /// manager owns its add-ons), another writer's conflicting fields are
    /// taken over. The API server writes nothing when nothing changes.
    pub async fn apply(
        &self,
        target: &Target<'_>,
        body: &serde_json::Value,
        manager: &str,
    ) -> Result<(), Error> {
        let api = self.dynamic(target);
        let params = kube::api::PatchParams::apply(manager).force();
        api.patch(target.name, &params, &kube::api::Patch::Apply(body))
            .await
            .map(|_| ())
            .map_err(|e| api_error("apply", &target.describe(), &e))
    }

    fn dynamic(&self, target: &Target<'_>) -> kube::Api<kube::api::DynamicObject> {
        let (group, version) = match target.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", target.api_version),
        };
        let gvk = kube::api::GroupVersionKind::gvk(group, version, target.kind);
        let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, target.plural);
        match target.namespace {
            Some(ns) => kube::Api::namespaced_with(self.client.clone(), ns, &resource),
            None => kube::Api::all_with(self.client.clone(), &resource),
        }
    }
}

/// One object of a known type, for [`Kubernetes::apply`].
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `v1`, `apps/v1`, ...
    pub api_version: &'a str,
    pub kind: &'a str,
    /// The resource's plural (`daemonsets`): kubeboot serves a fixed set of
    /// kinds, so no discovery round trip is needed.
    pub plural: &'a str,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<&'a str>,
    pub name: &'a str,
}

impl Target<'_> {
    /// `kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        match self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Pods evicted (namespace/name).
    pub evicted: Vec<String>,
    /// Pods still there at the deadline, with the last refusal.
    pub blocked: Vec<(String, String)>,
}

/// Whether a drain must evict this Pod: not a DaemonSet's (its controller
/// would recreate it on the same node), not a static Pod's mirror, not finished.
pub fn must_evict(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let meta = &pod.metadata;
    let daemonset = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true));
    let mirror = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !(daemonset || mirror || finished)
}

/// The instance id at the end of a Node's `spec.providerID`
/// (`aws:///us-east-1a/i-0123456789abcdef0`).
pub fn instance_of(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()?
        .provider_id
        .as_deref()?
        .rsplit('/')
        .next()
        .filter(|id| id.starts_with("i-"))
}

impl Kubernetes {
    /// The name of the Node whose providerID names `instance_id`.
    pub async fn node_for_instance(&self, instance_id: &str) -> Result<Option<String>, Error> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let list = nodes
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| api_error("list", "nodes", &e))?;
        Ok(list
            .items
            .iter()
            .find(|n| instance_of(n) == Some(instance_id))
            .and_then(|n| n.metadata.name.clone()))
    }

    /// Marks the Node unschedulable.
    pub async fn cordon(&self, name: &str) -> Result<(), Error> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        match nodes.cordon(name).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error("cordon", &format!("node/{name}"), &e)),
        }
    }

    /// Evicts every Pod [`must_evict`] names from the Node, through the
    /// eviction API so PodDisruptionBudgets are honoured: a refused eviction
    /// (429) is tried again until `deadline`; what is still there then is
    /// reported, not an error (the instance goes away regardless).
    pub async fn drain(&self, name: &str, deadline: Duration) -> Result<DrainReport, Error> {
        use k8s_openapi::api::core::v1::Pod;
        let pods: kube::Api<Pod> = kube::Api::all(self.client.clone());
        let until = tokio::time::Instant::now() + deadline;
        let mut report = DrainReport::default();
        let mut delay = Duration::from_millis(500);
        loop {
            let on_node = pods
                .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={name}")))
                .await
                .map_err(|e| api_error("list", &format!("pods on node/{name}"), &e))?;
            let mut blocked = Vec::new();
            for pod in on_node.items.iter().filter(|p| must_evict(p)) {
                let (Some(ns), Some(pod_name)) = (&pod.metadata.namespace, &pod.metadata.name)
                else {
                    continue;
                };
                let id = format!("{ns}/{pod_name}");
                let namespaced: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), ns);
                match namespaced
                    .evict(pod_name, &kube::api::EvictParams::default())
                    .await
                {
                    Ok(_) => {
                        tracing::info!(pod = %id, node = name, "evicted");
                        report.evicted.push(id);
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(kube::Error::Api(s)) if s.code == 429 => {
                        blocked.push((id, s.message.clone()));
                    }
                    Err(e) => blocked.push((id, e.to_string())),
                }
            }
            if blocked.is_empty() {
                return Ok(report);
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                tracing::warn!(
                    node = name,
                    blocked = blocked.len(),
                    "drain deadline passed with pods left"
                );
                report.blocked = blocked;
                return Ok(report);
            }
            tracing::info!(
                node = name,
                blocked = blocked.len(),
                "evictions refused (disruption budget?); retrying"
            );
            // The last attempt is made at the deadline itself.
            tokio::time::sleep(delay.min(until - now)).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Deletes the Node object (gone already is fine).
    pub async fn delete_node(&self, name: &str) -> Result<(), Error> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        match nodes
            .delete(name, &kube::api::DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error("delete", &format!("node/{name}"), &e)),
        }
    }
}

impl Kubernetes {
    /// Whether the API server reports itself ready (`GET /readyz`); a 5xx
    /// answer is "not ready", no answer at all is an error.
    pub async fn api_ready(&self) -> Result<bool, Error> {
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Api {
                operation: "get",
                object: "/readyz".into(),
                status: None,
                message: e.to_string(),
            })?;
        match self.client.request_text(request).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code >= 500 => Ok(false),
            Err(e) => Err(api_error("get", "/readyz", &e)),
        }
    }

    /// How many Nodes are `Ready`, and how many are not.
    pub async fn node_counts(&self) -> Result<(usize, usize), Error> {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let list = nodes
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| api_error("list", "nodes", &e))?;
        let ready = list
            .items
            .iter()
            .filter(|n| readiness(n) == Readiness::Ready)
            .count();
        Ok((ready, list.items.len() - ready))
    }
}

fn api_error(operation: &'static str, object: &str, e: &kube::Error) -> Error {
    let (status, message) = match e {
        kube::Error::Api(s) => (Some(s.code), format!("{} ({})", s.message, s.reason)),
        other => (None, other.to_string()),
    };
    Error::Api {
        operation,
        object: object.to_string(),
        status,
        message,
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Kubeconfig { .. } => &crate::catalogue::KUBE_KUBECONFIG,
            E::Api {
                status: Some(401 | 403),
                ..
            } => &crate::catalogue::KUBE_API_DENIED,
            E::Api { .. } => &crate::catalogue::KUBE_API,
            // Not Ready once is what the readiness wait retries.
            E::NotReady { .. } | E::Deadline { .. } => &crate::catalogue::KUBE_NODE_NOT_READY,
            E::NoNetwork { .. } => &crate::catalogue::KUBE_NO_NETWORK,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;

    fn node(conditions: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ip-10-0-1-2"},
            "status": {"conditions": conditions},
        }))
        .expect("node")
    }

    #[test]
    fn readiness_comes_from_the_ready_condition_only() {
        assert_eq!(
            readiness(&node(serde_json::json!([
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True"},
            ]))),
            Readiness::Ready
        );
        let not = readiness(&node(serde_json::json!([
            {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "cni plugin not initialized"},
        ])));
        assert_eq!(
            not,
            Readiness::NotReady(
                "Ready=False reason=KubeletNotReady message=cni plugin not initialized".into()
            )
        );
        assert_eq!(
            readiness(&node(
                serde_json::json!([{"type": "DiskPressure", "status": "False"}])
            )),
            Readiness::Unreported
        );
        assert_eq!(
            readiness(&node(
                serde_json::json!([{"type": "Ready", "status": "Unknown"}])
            )),
            Readiness::NotReady("Ready=Unknown reason=- message=-".into())
        );
    }

    #[test]
    fn drains_skip_daemonset_mirror_and_finished_pods() {
        let pod = |v: serde_json::Value| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(v).expect("pod")
        };
        assert!(must_evict(&pod(
            serde_json::json!({"metadata": {"name": "web"}})
        )));
        assert!(!must_evict(&pod(
            serde_json::json!({"metadata": {"name": "ds",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true}]}})
        )));
        assert!(must_evict(&pod(
            serde_json::json!({"metadata": {"name": "rs",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true}]}})
        )));
        assert!(!must_evict(&pod(
            serde_json::json!({"metadata": {"name": "etcd-n",
            "annotations": {"kubernetes.io/config.mirror": "abc"}}})
        )));
        assert!(!must_evict(&pod(
            serde_json::json!({"metadata": {"name": "job"}, "status": {"phase": "Succeeded"}})
        )));
    }

    #[test]
    fn instances_come_from_provider_ids() {
        let node = |id: &str| -> Node {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "n"}, "spec": {"providerID": id}}),
            )
            .expect("node")
        };
        assert_eq!(
            instance_of(&node("aws:///us-east-1a/i-0123456789abcdef0")),
            Some("i-0123456789abcdef0")
        );
        assert_eq!(instance_of(&node("kind://docker/kind/node")), None);
    }

    #[test]
    fn refused_credentials_are_not_retried_and_outages_are() {
        let api = |status| Error::Api {
            operation: "get",
            object: "node/n".into(),
            status,
            message: String::new(),
        };
        assert_eq!(api(Some(403)).retry_class(), RetryClass::Permanent);
        assert_eq!(api(Some(503)).retry_class(), RetryClass::Transient);
        assert_eq!(api(None).retry_class(), RetryClass::Transient);
        assert!(api(Some(401)).hint().contains("credentials"));
    }
}
