//! No-op mode (KBTEST_KUBEADM_NOOP=1): only what the agent reads afterwards

use crate::api::{kubeconfig, Api};
use crate::certificates::generate_ca;
use crate::cli::parse_flags;
use crate::config::{config_documents, find_kind, join_node, str_at};
use crate::helpers::{guard_paths, parent, phase_err, plain_err, write_file, R};
use crate::init::INIT_FLAGS;
use crate::kubelet::register_node;
use crate::{B64, DEFAULT_CERT_DIR, NOOP_ENV};
use base64::Engine as _;
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;

/// `init` in no-op mode: the cluster CA the agent pins, and nothing else.
pub(crate) async fn noop_init(args: &[String]) -> R<()> {
    let flags = parse_flags(args, INIT_FLAGS)?;
    let (config, docs) = config_documents(&flags)?;
    let cluster = find_kind(&docs, "ClusterConfiguration").ok_or_else(|| {
        plain_err(format!(
            "{config}: no ClusterConfiguration document (the stand-in needs certificatesDir)"
        ))
    })?;
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    guard_paths(&[&pki])?;
    let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
    if ca_crt.exists() && ca_key.exists() {
        println!("[certs] Using existing ca certificate authority");
    } else {
        let (cert, key) = generate_ca().map_err(|e| {
            phase_err(
                "certs/ca",
                format!("failure while creating CA certificate: {e}"),
            )
        })?;
        write_file(&ca_crt, cert.as_bytes(), 0o644).map_err(|e| phase_err("certs/ca", e))?;
        write_file(&ca_key, key.as_bytes(), 0o600).map_err(|e| phase_err("certs/ca", e))?;
    }
    println!(
        "[kbtest] no-op init ({NOOP_ENV}=1): wrote {}; no etcd, no API objects",
        ca_crt.display()
    );
    Ok(())
}

/// `join` in no-op mode: `kubelet.conf` and a Node, NotReady until a pod network runs.
pub(crate) async fn noop_join(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("config", true), ("ignore-preflight-errors", true)])?;
    let (config, docs) = config_documents(&flags)?;
    let (jc, node, kubelet_args) = join_node(&docs, config)?;
    let node_ip: IpAddr = kubelet_args
        .iter()
        .find(|(k, _)| k == "node-ip")
        .map(|(_, v)| v.as_str())
        .or_else(|| str_at(jc, "/controlPlane/localAPIEndpoint/advertiseAddress"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let endpoint = str_at(jc, "/discovery/bootstrapToken/apiServerEndpoint")
        .ok_or_else(|| plain_err("discovery.bootstrapToken.apiServerEndpoint: Required value"))?
        .to_string();
    let ca_path = PathBuf::from(str_at(jc, "/caCertPath").unwrap_or("/etc/kubernetes/pki/ca.crt"));
    let k8s = parent(&parent(&ca_path));
    guard_paths(&[&k8s])?;
    // The cluster CA as kubeadm would put it in kubelet.conf (the agent's
    // client loads it; without one it would load the system's roots
    // instead): from cluster-info when there is one, unverified, else a
    // throwaway (plain HTTP: nothing is verified with it).
    let api = Api::new(&endpoint);
    let from_cluster = api
        .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
        .await
        .ok()
        .flatten()
        .and_then(|cm| {
            let kc: Value = serde_json::from_str(cm["data"]["kubeconfig"].as_str()?).ok()?;
            let data = kc["clusters"][0]["cluster"]["certificate-authority-data"].as_str()?;
            String::from_utf8(B64.decode(data).ok()?).ok()
        });
    let ca_pem = match from_cluster {
        Some(pem) => pem,
        None => generate_ca().map_err(|e| phase_err("kubelet-start", e))?.0,
    };
    let kubelet = kubeconfig(
        "kubernetes",
        &format!("http://{endpoint}"),
        &ca_pem,
        &format!("system:node:{node}"),
    );
    let kubelet_conf = k8s.join("kubelet.conf");
    write_file(&kubelet_conf, format!("{kubelet:#}\n").as_bytes(), 0o600)
        .map_err(|e| phase_err("kubelet-start", e))?;
    register_node(&api, &node, &node_ip).await.map_err(|e| {
        phase_err(
            "kubelet-start",
            format!("error registering node {node:?}: {e}"),
        )
    })?;
    println!(
        "[kbtest] no-op join ({NOOP_ENV}=1): wrote {}, registered node {node:?} (NotReady until a pod network runs); no discovery, no etcd",
        kubelet_conf.display()
    );
    Ok(())
}
