//! Kubelet effects: Node registration and mirror Pods

use crate::api::{Api, ApiFailure};
use crate::etcd::LocalEtcd;
use crate::helpers::{hex, phase_err, rfc3339, write_file, R};
use crate::{CONTROL_PLANE_LABEL, EXCLUDE_LB_LABEL, VERSION};
use serde_json::json;
use serde_json::Value;
use sha2::Digest;
use sha2::Sha256;
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

/// The kubelet's `--provider-id` from kubeletExtraArgs, which the simulated
/// kubelet registers its Node with (`spec.providerID`).
pub(crate) static PROVIDER_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub(crate) fn note_kubelet_args(args: &[(String, String)]) {
    if let Some((_, id)) = args.iter().find(|(k, _)| k == "provider-id") {
        let _ = PROVIDER_ID.set(id.clone());
    }
}

pub(crate) fn node_spec() -> Value {
    match PROVIDER_ID.get() {
        Some(id) => json!({"providerID": id}),
        None => json!({}),
    }
}

/// Registers the Node as a kubelet does: `Ready` = `"False"` for want of a
/// pod network (the API double's kubelets turn it `"True"` once one runs on
/// the node, as a real kubelet does once a CNI configuration appears); an
/// existing Node is kept. Returns its uid.
pub(crate) async fn register_node(
    api: &Api,
    name: &str,
    ip: &IpAddr,
) -> Result<String, ApiFailure> {
    let ready_condition = json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady",
        "message": kubeboot_tests::kubeapi::NETWORK_NOT_READY});
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": node_spec(),
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available"},
                ready_condition,
            ],
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": VERSION, "kubeProxyVersion": VERSION, "containerRuntimeVersion": "containerd://1.7.22",
                "operatingSystem": "linux", "architecture": "amd64", "osImage": "Amazon Linux 2023",
                "kernelVersion": "6.1.0", "machineID": "", "systemUUID": "", "bootID": "",
            },
        },
    });
    let created = match api.create("/api/v1/nodes", &node).await {
        Ok(v) => v,
        Err(f) if f.code == 409 => {
            let labels = node["metadata"]["labels"].clone();
            api.merge_patch(
                &format!("/api/v1/nodes/{name}"),
                &json!({"metadata": {"labels": labels}}),
            )
            .await?
        }
        Err(f) => return Err(f),
    };
    Ok(created["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

pub(crate) async fn mark_control_plane(api: &Api, name: &str) -> R<()> {
    println!("[mark-control-plane] Marking the node {name} as control-plane by adding the labels: [{CONTROL_PLANE_LABEL} {EXCLUDE_LB_LABEL}]");
    println!("[mark-control-plane] Marking the node {name} as control-plane by adding the taints [{CONTROL_PLANE_LABEL}:NoSchedule]");
    api.merge_patch(
        &format!("/api/v1/nodes/{name}"),
        &json!({
            "metadata": {"labels": {CONTROL_PLANE_LABEL: "", EXCLUDE_LB_LABEL: ""}},
            "spec": {"taints": [{"key": CONTROL_PLANE_LABEL, "effect": "NoSchedule"}]},
        }),
    )
    .await
    .map_err(|e| {
        phase_err(
            "mark-control-plane",
            format!("error patching node {name:?} through apiserver: {e}"),
        )
    })?;
    Ok(())
}

/// The etcd mirror Pod the kubelet creates for the static Pod: this is how
/// kubeadm (and the agent) find etcd members through the API.
pub(crate) async fn create_etcd_mirror_pod(
    api: &Api,
    node: &str,
    node_uid: &str,
    ip: &IpAddr,
    member: &LocalEtcd,
) -> Result<(), ApiFailure> {
    let mut pod = member.manifest();
    let name = format!("etcd-{node}");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["annotations"]["kubernetes.io/config.source"] = json!("file");
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"] =
        json!(hex(&Sha256::digest(member.args.join(" ").as_bytes()))[..32]);
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": true,
    }]);
    pod["spec"]["nodeName"] = json!(node);
    let collection = "/api/v1/namespaces/kube-system/pods";
    let created = match api.create(collection, &pod).await {
        Err(f) if f.code == 409 => {
            // A mirror Pod from an earlier incarnation of this node.
            api.delete(&format!("{collection}/{name}")).await?;
            api.create(collection, &pod).await?
        }
        other => other?,
    };
    let mut running = created;
    let now = rfc3339(SystemTime::now());
    running["status"] = json!({
        "phase": "Running",
        "hostIP": ip.to_string(),
        "podIP": ip.to_string(),
        "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    });
    api.call(
        "PUT",
        &format!("{collection}/{name}/status"),
        Some(&running),
        "application/json",
    )
    .await?;
    Ok(())
}

/// The API server, controller-manager and scheduler manifests (the
/// stand-in runs none of them; kubeadm's preflight checks for these files).
pub(crate) fn write_control_plane_manifests(manifests: &Path, phase: &str) -> R<()> {
    for component in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        println!("[control-plane] Creating static Pod manifest for {component:?}");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": component, "namespace": "kube-system", "labels": {"component": component, "tier": "control-plane"}},
            "spec": {"hostNetwork": true, "containers": [{"name": component, "image": format!("registry.k8s.io/{component}:{VERSION}"), "command": [component]}]},
        });
        write_file(
            &manifests.join(format!("{component}.yaml")),
            format!("{pod:#}\n").as_bytes(),
            0o600,
        )
        .map_err(|e| phase_err(phase, e))?;
    }
    Ok(())
}

/// `manifests/etcd.yaml`: a JSON Pod whose command is the member's real
/// argv; `reset` reads the data dir, name and URLs back from it.
pub(crate) fn write_etcd_manifest(manifests: &Path, member: &LocalEtcd, phase: &str) -> R<()> {
    println!(
        "[etcd] Creating static Pod manifest for local etcd in {:?}",
        manifests.display().to_string()
    );
    write_file(
        &manifests.join("etcd.yaml"),
        format!("{:#}\n", member.manifest()).as_bytes(),
        0o600,
    )
    .map_err(|e| phase_err(phase, e))
}
