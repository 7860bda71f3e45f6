//! kubeadm's configuration files, typed (kubeadm.k8s.io/v1beta4, so
//! Kubernetes 1.31 or newer).
//!
//! Documents are written as JSON objects separated by `---`: JSON is YAML, so
//! kubeadm's decoder reads them as it reads its own YAML, and no YAML writer
//! (the common crates are unmaintained) is needed. Only the fields kubeboot
//! sets are modelled; kubeadm defaults the rest.

use crate::secret::Secret;
use serde::Serialize;
use std::path::Path;

/// The API version of every document.
pub const API_VERSION: &str = "kubeadm.k8s.io/v1beta4";

/// `--name value` pairs, v1beta4's structured extra arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arg {
    pub name: String,
    pub value: String,
}

fn arg(name: &str, value: impl Into<String>) -> Arg {
    Arg {
        name: name.into(),
        value: value.into(),
    }
}

/// What kubeadm registers this node as.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegistration {
    /// The Node name: the EC2 private DNS name, as the AWS cloud provider expects.
    pub name: String,
    pub kubelet_extra_args: Vec<Arg>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiEndpoint {
    pub advertise_address: String,
    pub bind_port: u16,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapToken {
    token: String,
    ttl: String,
    usages: [&'static str; 2],
    groups: [&'static str; 1],
    description: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct InitConfiguration {
    api_version: &'static str,
    kind: &'static str,
    bootstrap_tokens: Vec<BootstrapToken>,
    node_registration: NodeRegistration,
    #[serde(rename = "localAPIEndpoint")]
    local_api_endpoint: ApiEndpoint,
    certificate_key: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Networking {
    pod_subnet: String,
    service_subnet: String,
    dns_domain: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalEtcd {
    data_dir: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Etcd {
    local: LocalEtcd,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiServer {
    #[serde(rename = "certSANs")]
    cert_sans: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    extra_args: Vec<Arg>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterConfiguration {
    api_version: &'static str,
    kind: &'static str,
    cluster_name: String,
    kubernetes_version: String,
    control_plane_endpoint: String,
    certificates_dir: String,
    networking: Networking,
    etcd: Etcd,
    api_server: ApiServer,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapTokenDiscovery {
    api_server_endpoint: String,
    token: String,
    ca_cert_hashes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery {
    bootstrap_token: BootstrapTokenDiscovery,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinControlPlane {
    #[serde(rename = "localAPIEndpoint")]
    local_api_endpoint: ApiEndpoint,
    certificate_key: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinConfiguration {
    api_version: &'static str,
    kind: &'static str,
    discovery: Discovery,
    node_registration: NodeRegistration,
    ca_cert_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    control_plane: Option<JoinControlPlane>,
}

/// Facts about this node that every document needs.
#[derive(Debug, Clone)]
pub struct Node {
    /// EC2 private DNS name.
    pub name: String,
    /// Private IPv4: the API server's and etcd's advertise address.
    pub ip: String,
    /// `aws:///<az>/<instance-id>`: the kubelet registers the Node with it,
    /// so the daemon finds an instance's Node (the AWS cloud controller
    /// manager sets the same value).
    pub provider_id: String,
}

/// The providerID of an EC2 instance, as Kubernetes' AWS provider writes it.
pub fn provider_id(availability_zone: &str, instance_id: &str) -> String {
    format!("aws:///{availability_zone}/{instance_id}")
}

impl Node {
    fn registration(&self) -> NodeRegistration {
        NodeRegistration {
            name: self.name.clone(),
            kubelet_extra_args: vec![
                arg("node-ip", &self.ip),
                arg("provider-id", &self.provider_id),
            ],
        }
    }

    fn api_endpoint(&self) -> ApiEndpoint {
        ApiEndpoint {
            advertise_address: self.ip.clone(),
            bind_port: 6443,
        }
    }
}

/// Everything `kubeadm init` needs.
#[derive(Debug, Clone)]
pub struct InitParams {
    pub node: Node,
    pub cluster_name: String,
    pub kubernetes_version: String,
    pub control_plane_endpoint: String,
    pub pod_subnet: String,
    pub service_subnet: String,
    pub dns_domain: String,
    /// `cluster.service_account_issuer`: the API server's only issuer (one,
    /// not beside kubeadm's default: kubeadm 1.31 sorts repeated extraArgs,
    /// so the default would sort first and sign, kubernetes/kubeadm#3261).
    pub service_account_issuer: Option<String>,
    pub etcd_data_dir: String,
    /// `paths.kubernetes_dir`: certificates go to its `pki/`.
    pub kubernetes_dir: String,
    pub token: Secret<String>,
    pub token_ttl: std::time::Duration,
    pub certificate_key: Secret<String>,
}

/// Everything `kubeadm join` needs; `control_plane` for control-plane joins.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub node: Node,
    pub api_server_endpoint: String,
    pub token: Secret<String>,
    pub ca_cert_hashes: Vec<String>,
    pub certificate_key: Option<Secret<String>>,
    /// `paths.kubernetes_dir`: where the cluster CA is written (`pki/ca.crt`).
    pub kubernetes_dir: String,
}

/// A rendered configuration: it holds secrets, so it is a [`Secret`] too.
pub type Rendered = Secret<String>;

fn versioned(v: &str) -> String {
    if v.starts_with('v') {
        v.to_string()
    } else {
        format!("v{v}")
    }
}

fn documents(docs: &[serde_json::Value]) -> String {
    docs.iter()
        .map(|d| format!("{d:#}\n"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `InitConfiguration` + `ClusterConfiguration`.
///
/// No etcd `extraArgs`: the ClusterConfiguration is cluster-wide (kubeadm
/// stores it in the `kubeadm-config` ConfigMap and every joining control
/// plane applies its `extraArgs` over its own defaults), so a URL with this
/// node's address there would make every later member listen on and
/// advertise the first node's address. kubeadm's own defaults are per node
/// and what kubeboot wants: https on the advertise address, 2379 and 2380,
/// client-certificate authentication.
pub fn render_init(p: &InitParams) -> Rendered {
    let init = InitConfiguration {
        api_version: API_VERSION,
        kind: "InitConfiguration",
        bootstrap_tokens: vec![join_token(&p.token, p.token_ttl)],
        node_registration: p.node.registration(),
        local_api_endpoint: p.node.api_endpoint(),
        certificate_key: p.certificate_key.expose().clone(),
    };
    let host = p
        .control_plane_endpoint
        .rsplit_once(':')
        .map_or(p.control_plane_endpoint.as_str(), |(h, _)| h);
    let cluster = ClusterConfiguration {
        api_version: API_VERSION,
        kind: "ClusterConfiguration",
        cluster_name: p.cluster_name.clone(),
        kubernetes_version: versioned(&p.kubernetes_version),
        control_plane_endpoint: p.control_plane_endpoint.clone(),
        certificates_dir: format!("{}/pki", p.kubernetes_dir.trim_end_matches('/')),
        networking: Networking {
            pod_subnet: p.pod_subnet.clone(),
            service_subnet: p.service_subnet.clone(),
            dns_domain: p.dns_domain.clone(),
        },
        etcd: Etcd {
            local: LocalEtcd {
                data_dir: p.etcd_data_dir.clone(),
            },
        },
        api_server: ApiServer {
            cert_sans: vec![host.to_string()],
            extra_args: p
                .service_account_issuer
                .as_deref()
                .map(|issuer| {
                    vec![
                        arg("service-account-issuer", issuer),
                        arg("service-account-jwks-uri", crate::oidc::jwks_uri(issuer)),
                    ]
                })
                .unwrap_or_default(),
        },
    };
    Secret::new(documents(&[to_value(&init), to_value(&cluster)]))
}

fn join_token(token: &Secret<String>, ttl: std::time::Duration) -> BootstrapToken {
    BootstrapToken {
        token: token.expose().clone(),
        ttl: format!("{}s", ttl.as_secs()),
        usages: ["signing", "authentication"],
        groups: ["system:bootstrappers:kubeadm:default-node-token"],
        description: "kubeboot join token",
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenOnly {
    api_version: &'static str,
    kind: &'static str,
    bootstrap_tokens: Vec<BootstrapToken>,
}

/// An `InitConfiguration` holding only a bootstrap token, for `kubeadm token
/// create --config` (the token never appears on a command line, where any
/// local user could read it in /proc).
pub fn render_token(token: &Secret<String>, ttl: std::time::Duration) -> Rendered {
    Secret::new(documents(&[to_value(&TokenOnly {
        api_version: API_VERSION,
        kind: "InitConfiguration",
        bootstrap_tokens: vec![join_token(token, ttl)],
    })]))
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateKeyOnly {
    api_version: &'static str,
    kind: &'static str,
    certificate_key: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificatesDirOnly {
    api_version: &'static str,
    kind: &'static str,
    certificates_dir: String,
}

/// `InitConfiguration` with the certificate key and `ClusterConfiguration`
/// with the certificates dir, for `kubeadm init phase upload-certs --config`.
pub fn render_upload_certs(certificate_key: &Secret<String>, kubernetes_dir: &str) -> Rendered {
    Secret::new(documents(&[
        to_value(&CertificateKeyOnly {
            api_version: API_VERSION,
            kind: "InitConfiguration",
            certificate_key: certificate_key.expose().clone(),
        }),
        to_value(&CertificatesDirOnly {
            api_version: API_VERSION,
            kind: "ClusterConfiguration",
            certificates_dir: format!("{}/pki", kubernetes_dir.trim_end_matches('/')),
        }),
    ]))
}

/// `JoinConfiguration` (with `controlPlane` for control-plane joins).
pub fn render_join(p: &JoinParams) -> Rendered {
    let join = JoinConfiguration {
        api_version: API_VERSION,
        kind: "JoinConfiguration",
        discovery: Discovery {
            bootstrap_token: BootstrapTokenDiscovery {
                api_server_endpoint: p.api_server_endpoint.clone(),
                token: p.token.expose().clone(),
                ca_cert_hashes: p.ca_cert_hashes.clone(),
            },
        },
        node_registration: p.node.registration(),
        ca_cert_path: format!("{}/pki/ca.crt", p.kubernetes_dir.trim_end_matches('/')),
        control_plane: p.certificate_key.as_ref().map(|key| JoinControlPlane {
            local_api_endpoint: p.node.api_endpoint(),
            certificate_key: key.expose().clone(),
        }),
    };
    Secret::new(documents(&[to_value(&join)]))
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    // Serializing these plain structs cannot fail; Null would make kubeadm refuse loudly.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Writes a rendered configuration readable by root only (it holds the token
/// and certificate key), atomically: a crash never leaves half a file.
pub fn write_private(path: &Path, rendered: &Rendered) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(rendered.expose().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TOKEN: &str = "abcdef.0123456789abcdef";

    fn node() -> Node {
        Node {
            name: "ip-10-0-1-2.ec2.internal".into(),
            ip: "10.0.1.2".into(),
            provider_id: provider_id("us-east-1a", "i-0123456789abcdef0"),
        }
    }

    fn docs(rendered: &Rendered) -> Vec<serde_json::Value> {
        rendered
            .expose()
            .split("---\n")
            .map(|d| serde_json::from_str(d).expect("each document is JSON (and so YAML)"))
            .collect()
    }

    #[test]
    fn init_renders_both_documents_with_our_values() {
        let p = InitParams {
            node: node(),
            cluster_name: "prod-a".into(),
            kubernetes_version: "1.31.2".into(),
            control_plane_endpoint: "api.prod-a.internal:6443".into(),
            pod_subnet: "10.244.0.0/16".into(),
            service_subnet: "10.96.0.0/12".into(),
            dns_domain: "cluster.local".into(),
            service_account_issuer: None,
            etcd_data_dir: "/var/lib/etcd".into(),
            kubernetes_dir: "/etc/kubernetes".into(),
            token: Secret::new(TOKEN.into()),
            token_ttl: Duration::from_secs(86_400),
            certificate_key: Secret::new("0f".repeat(32)),
        };
        let with_issuer = InitParams {
            service_account_issuer: Some("https://oidc.example.com/prod-a".into()),
            ..p.clone()
        };
        let d = docs(&render_init(&with_issuer));
        assert_eq!(
            d[1]["apiServer"]["extraArgs"],
            serde_json::json!([
                {"name": "service-account-issuer", "value": "https://oidc.example.com/prod-a"},
                {"name": "service-account-jwks-uri", "value": "https://oidc.example.com/prod-a/keys.json"},
            ])
        );
        let rendered = render_init(&p);
        assert!(
            !format!("{rendered:?}").contains(TOKEN),
            "a rendered config is a secret"
        );
        let d = docs(&rendered);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0]["apiVersion"], API_VERSION);
        assert_eq!(d[0]["kind"], "InitConfiguration");
        assert_eq!(d[0]["bootstrapTokens"][0]["token"], TOKEN);
        assert_eq!(d[0]["bootstrapTokens"][0]["ttl"], "86400s");
        assert_eq!(d[0]["nodeRegistration"]["name"], "ip-10-0-1-2.ec2.internal");
        assert_eq!(
            d[0]["nodeRegistration"]["kubeletExtraArgs"][0]["name"],
            "node-ip"
        );
        // kubeadm decodes case-sensitively: the acronyms must be exact.
        assert_eq!(d[0]["localAPIEndpoint"]["advertiseAddress"], "10.0.1.2");
        assert_eq!(d[0]["localAPIEndpoint"]["bindPort"], 6443);
        assert_eq!(d[0]["certificateKey"], "0f".repeat(32));
        assert_eq!(d[1]["kind"], "ClusterConfiguration");
        assert_eq!(d[1]["kubernetesVersion"], "v1.31.2");
        assert_eq!(d[1]["controlPlaneEndpoint"], "api.prod-a.internal:6443");
        assert_eq!(d[1]["networking"]["podSubnet"], "10.244.0.0/16");
        // Cluster-wide: nothing of this node's may be in it (joiners apply
        // etcd.local.extraArgs over their own defaults).
        assert_eq!(
            d[1]["etcd"]["local"],
            serde_json::json!({"dataDir": "/var/lib/etcd"})
        );
        assert!(
            !d[1].to_string().contains("10.0.1.2"),
            "the ClusterConfiguration names this node: {}",
            d[1]
        );
        assert_eq!(d[1]["apiServer"]["certSANs"][0], "api.prod-a.internal");
        assert!(
            d[1]["apiServer"].get("extraArgs").is_none(),
            "no issuer: kubeadm's default"
        );
        assert_eq!(d[1]["certificatesDir"], "/etc/kubernetes/pki");
    }

    #[test]
    fn join_renders_control_plane_only_with_a_certificate_key() {
        let mut p = JoinParams {
            node: node(),
            api_server_endpoint: "api:6443".into(),
            token: Secret::new(TOKEN.into()),
            ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
            certificate_key: None,
            kubernetes_dir: "/etc/kubernetes/".into(),
        };
        let worker = docs(&render_join(&p));
        assert_eq!(worker[0]["kind"], "JoinConfiguration");
        assert_eq!(worker[0]["discovery"]["bootstrapToken"]["token"], TOKEN);
        assert_eq!(
            worker[0]["discovery"]["bootstrapToken"]["caCertHashes"][0],
            p.ca_cert_hashes[0]
        );
        assert!(worker[0].get("controlPlane").is_none());
        assert_eq!(worker[0]["caCertPath"], "/etc/kubernetes/pki/ca.crt");
        p.certificate_key = Some(Secret::new("0f".repeat(32)));
        let cp = docs(&render_join(&p));
        assert_eq!(cp[0]["controlPlane"]["certificateKey"], "0f".repeat(32));
        assert_eq!(
            cp[0]["controlPlane"]["localAPIEndpoint"]["advertiseAddress"],
            "10.0.1.2"
        );
        assert_eq!(
            cp[0]["discovery"]["bootstrapToken"]["apiServerEndpoint"],
            "api:6443"
        );
    }

    #[test]
    fn configs_are_written_root_only_and_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/kubeadm-init.yaml");
        write_private(&path, &Secret::new("a: 1\n".into())).unwrap();
        write_private(&path, &Secret::new("a: 2\n".into())).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 2\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!path.with_extension("tmp").exists());
    }
}
