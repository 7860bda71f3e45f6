//! Certificates: the cluster CA, its pin, and the control-plane
//! certificates `upload-certs` seals into `kubeadm-certs`.

use crate::api::Api;
use crate::helpers::{hex, phase_err, rfc3339, R};
use crate::CERTS_EXPIRY_ANNOTATION;
use crate::KEY_HASH_ANNOTATION;
use crate::{B64, CERTS_TTL};
use base64::Engine as _;
use kubeboot_tests::pki;
use serde_json::json;
use sha2::Digest;
use sha2::Sha256;
use std::path::Path;
use std::time::SystemTime;

/// A self-signed cluster CA (`CN=kubernetes`, 10 years), as kubeadm's
/// `certs/ca` phase creates it (see [`pki`]).
pub(crate) fn generate_ca() -> Result<(String, String), String> {
    pki::generate_ca(pki::CLUSTER_CA)
}

/// `sha256:<hex of the DER SubjectPublicKeyInfo>`, kubeadm's CA pin.
pub(crate) fn ca_pin(pem: &str) -> Result<String, String> {
    use x509_cert::der::{DecodePem, Encode};
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| format!("failed to parse the CA certificate: {e}"))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| format!("failed to encode the CA public key: {e}"))?;
    Ok(format!("sha256:{}", hex(&Sha256::digest(&spki))))
}

/// Stores the shared CAs and the service-account key pair, each sealed
/// with the certificate key (AES-256-GCM), in `kube-system/kubeadm-certs`
/// (upstream: `cmd/kubeadm/app/phases/copycerts/copycerts.go`).
pub(crate) async fn upload_certs(api: &Api, pki_dir: &Path, key: &str) -> R<()> {
    let fail = |m: String| phase_err("upload-certs", format!("error uploading certs: {m}"));
    let key_bytes = pki::certificate_key_bytes(key).map_err(fail)?;
    let mut data = serde_json::Map::new();
    for name in pki::SHARED_FILES {
        let path = pki_dir.join(name);
        let content = std::fs::read(&path).map_err(|e| {
            fail(format!(
                "failed to load {name}: open {}: {e}",
                path.display()
            ))
        })?;
        let sealed = pki::seal(&key_bytes, &content).map_err(fail)?;
        data.insert(pki::secret_key_of(name), json!(B64.encode(sealed)));
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": "kubeadm-certs",
            "namespace": "kube-system",
            "annotations": {
                KEY_HASH_ANNOTATION: hex(&Sha256::digest(key.as_bytes())),
                CERTS_EXPIRY_ANNOTATION: rfc3339(SystemTime::now() + CERTS_TTL),
            },
        },
        "data": data,
    });
    println!("[upload-certs] Storing the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace");
    api.create_or_update(
        "/api/v1/namespaces/kube-system/secrets",
        "kubeadm-certs",
        &secret,
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    println!("[upload-certs] Using certificate key:\n{key}");
    Ok(())
}
