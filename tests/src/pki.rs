//! kubeadm's PKI, with real keys, as the kubeadm stand-in lays it out.
//!
//! Upstream: `cmd/kubeadm/app/phases/certs/certlist.go` (which certificate,
//! which CA, which usages and SANs), `cmd/kubeadm/app/util/pkiutil` (SAN
//! lists: `GetEtcdAltNames`/`GetEtcdPeerAltNames` add the node name,
//! `localhost`, the advertise address, `127.0.0.1` and `::1`),
//! `cmd/kubeadm/app/phases/copycerts/copycerts.go` (what `--upload-certs`
//! shares: the cluster CA, the front-proxy CA, the service-account key pair
//! and, with local etcd, the etcd CA; a file `etcd/ca.crt` is the Secret key
//! `etcd-ca.crt`) and `cmd/kubeadm/app/util/crypto/crypto.go` (AES-GCM with
//! the certificate key, the random nonce prepended to the sealed data).
//!
//! Keys are ECDSA P-256 rather than kubeadm's RSA 2048 (what the agent reads
//! does not depend on the algorithm, and they are made in microseconds).
//! What matters for strictness is here: etcd serves only with these
//! certificates, asks clients for one signed by `etcd/ca`, and a node has
//! none of it until `kubeadm init` made it or a control-plane join
//! downloaded the CAs with the right certificate key and issued its own.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::Path;

/// A certificate authority of the cluster: its file stem under `pki/` and
/// the common name kubeadm gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authority {
    pub stem: &'static str,
    pub common_name: &'static str,
}

pub const CLUSTER_CA: Authority = Authority {
    stem: "ca",
    common_name: "kubernetes",
};
pub const ETCD_CA: Authority = Authority {
    stem: "etcd/ca",
    common_name: "etcd-ca",
};
pub const FRONT_PROXY_CA: Authority = Authority {
    stem: "front-proxy-ca",
    common_name: "front-proxy-ca",
};
pub const AUTHORITIES: [Authority; 3] = [CLUSTER_CA, ETCD_CA, FRONT_PROXY_CA];

/// Files `--upload-certs` puts (sealed) in `kube-system/kubeadm-certs`, in
/// kubeadm's order; the Secret's key is the path with `/` turned into `-`.
pub const SHARED_FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "sa.pub",
    "sa.key",
    "etcd/ca.crt",
    "etcd/ca.key",
];

/// The Secret data key of a shared file (`etcd/ca.crt` → `etcd-ca.crt`).
pub fn secret_key_of(file: &str) -> String {
    file.replace('/', "-")
}

/// What a node's own certificates name: kubeadm's `certs` phase input.
#[derive(Debug, Clone)]
pub struct NodeNames {
    pub node_name: String,
    pub advertise: IpAddr,
    /// `controlPlaneEndpoint`'s host and `apiServer.certSANs`.
    pub api_sans: Vec<String>,
}

/// One leaf kubeadm issues on every control plane.
struct Leaf {
    stem: &'static str,
    ca: Authority,
    common_name: String,
    organization: Option<&'static str>,
    server: bool,
    client: bool,
    sans: Vec<String>,
}

fn leaves(n: &NodeNames) -> Vec<Leaf> {
    let etcd_sans = vec![
        n.node_name.clone(),
        "localhost".into(),
        n.advertise.to_string(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    let mut api_sans = vec![
        n.node_name.clone(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        n.advertise.to_string(),
    ];
    api_sans.extend(n.api_sans.iter().cloned());
    vec![
        Leaf {
            stem: "apiserver",
            ca: CLUSTER_CA,
            common_name: "kube-apiserver".into(),
            organization: None,
            server: true,
            client: false,
            sans: api_sans,
        },
        Leaf {
            stem: "apiserver-kubelet-client",
            ca: CLUSTER_CA,
            common_name: "kube-apiserver-kubelet-client".into(),
            organization: Some("kubeadm:cluster-admins"),
            server: false,
            client: true,
            sans: vec![],
        },
        Leaf {
            stem: "front-proxy-client",
            ca: FRONT_PROXY_CA,
            common_name: "front-proxy-client".into(),
            organization: None,
            server: false,
            client: true,
            sans: vec![],
        },
        Leaf {
            stem: "etcd/server",
            ca: ETCD_CA,
            common_name: n.node_name.clone(),
            organization: None,
            server: true,
            client: true,
            sans: etcd_sans.clone(),
        },
        Leaf {
            stem: "etcd/peer",
            ca: ETCD_CA,
            common_name: n.node_name.clone(),
            organization: None,
            server: true,
            client: true,
            sans: etcd_sans,
        },
        Leaf {
            stem: "etcd/healthcheck-client",
            ca: ETCD_CA,
            common_name: "kube-etcd-healthcheck-client".into(),
            organization: None,
            server: false,
            client: true,
            sans: vec![],
        },
        Leaf {
            stem: "apiserver-etcd-client",
            ca: ETCD_CA,
            common_name: "kube-apiserver-etcd-client".into(),
            organization: None,
            server: false,
            client: true,
            sans: vec![],
        },
    ]
}

/// The stems of every leaf, in the order kubeadm prints them.
pub fn leaf_stems() -> Vec<&'static str> {
    leaves(&NodeNames {
        node_name: String::new(),
        advertise: IpAddr::from([127, 0, 0, 1]),
        api_sans: vec![],
    })
    .iter()
    .map(|l| l.stem)
    .collect()
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // Civil date of `now` (UTC), Howard Hinnant's algorithm.
    let days = now.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    params.not_before = rcgen::date_time_ymd(y, m, 1);
    params.not_after = rcgen::date_time_ymd(y + years, m, d.min(28));
}

fn ca_params(ca: Authority) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, ca.common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    validity(&mut params, 10);
    Ok(params)
}

/// A new self-signed CA: `(certificate PEM, key PEM)`, 10 years, as
/// kubeadm's `certs/ca`, `certs/etcd-ca` and `certs/front-proxy-ca` phases.
pub fn generate_ca(ca: Authority) -> Result<(String, String), String> {
    let params = ca_params(ca)?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn issue(leaf: &Leaf, ca_key_pem: &str) -> Result<(String, String), String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| format!("{}.key: {e}", leaf.ca.stem))?;
    let issuer = Issuer::new(ca_params(leaf.ca)?, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, leaf.common_name.as_str());
    if let Some(o) = leaf.organization {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    for s in &leaf.sans {
        params.subject_alt_names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.clone().try_into().map_err(|e| format!("SAN {s}: {e}"))?),
        });
    }
    leaf_usages(&mut params, leaf.server, leaf.client);
    validity(&mut params, 1);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a file with exactly `mode` (a file already there is replaced, so
/// its old mode cannot survive), creating its directory.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(contents)
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// kubeadm's `certs` phase for the CAs and the service-account key on the
/// first control plane: each made unless already there (a CA on disk is
/// used as it is). Returns kubeadm's progress lines.
pub fn ensure_authorities(pki: &Path) -> Result<Vec<String>, String> {
    let mut said = Vec::new();
    for ca in AUTHORITIES {
        let crt = pki.join(format!("{}.crt", ca.stem));
        let key = pki.join(format!("{}.key", ca.stem));
        let label = ca.stem.replace('/', "-");
        if crt.exists() && key.exists() {
            said.push(format!(
                "[certs] Using existing {label} certificate authority"
            ));
            continue;
        }
        said.push(format!("[certs] Generating {label:?} certificate and key"));
        let (c, k) = generate_ca(ca)?;
        write_file(&crt, c.as_bytes(), 0o644)?;
        write_file(&key, k.as_bytes(), 0o600)?;
    }
    let (sa_key, sa_pub) = (pki.join("sa.key"), pki.join("sa.pub"));
    if sa_key.exists() && sa_pub.exists() {
        said.push("[certs] Using the existing \"sa\" key".into());
    } else {
        said.push("[certs] Generating \"sa\" key and public key".into());
        // RSA 2048, kubeadm's default encryption algorithm (RSA-2048): the
        // issuer's JWKS must describe the key kind the API server signs with.
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(|e| e.to_string())?;
        write_file(&sa_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&sa_pub, key.public_key_pem().as_bytes(), 0o644)?;
    }
    Ok(said)
}

/// kubeadm's `certs` phase for this node's leaves, signed by the CAs on
/// disk (which a joining control plane must have downloaded first: without
/// them this fails with kubeadm's "couldn't load the certificate file").
/// An existing leaf is kept (kubeadm reuses a valid one).
pub fn ensure_leaves(pki: &Path, names: &NodeNames) -> Result<Vec<String>, String> {
    let mut said = Vec::new();
    for leaf in leaves(names) {
        let crt = pki.join(format!("{}.crt", leaf.stem));
        let key = pki.join(format!("{}.key", leaf.stem));
        let ca_crt = pki.join(format!("{}.crt", leaf.ca.stem));
        let ca_key = pki.join(format!("{}.key", leaf.ca.stem));
        if crt.exists() && key.exists() {
            // kubeadm reuses a leaf only if its CA signed it
            // (certs/certs.go, writeCertificateFilesIfNotExist).
            let read =
                |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
            if !signed_by(&read(&crt)?, &read(&ca_crt)?) {
                return Err(format!(
                    "certificate {} is not signed by corresponding CA",
                    leaf.stem
                ));
            }
            said.push(format!(
                "[certs] Using the existing {:?} certificate and key",
                leaf.stem
            ));
            continue;
        }
        for f in [&ca_crt, &ca_key] {
            if !f.exists() {
                return Err(format!(
                    "couldn't load the certificate file {}: open {}: no such file or directory",
                    f.display(),
                    f.display()
                ));
            }
        }
        let ca_key_pem = std::fs::read_to_string(&ca_key)
            .map_err(|e| format!("failure loading {} key: {e}", leaf.ca.stem))?;
        said.push(format!(
            "[certs] Generating {:?} certificate and key",
            leaf.stem
        ));
        let (c, k) = issue(&leaf, &ca_key_pem)?;
        write_file(&crt, c.as_bytes(), 0o644)?;
        write_file(&key, k.as_bytes(), 0o600)?;
    }
    Ok(said)
}

/// Whether the CA in `ca_pem` signed the certificate in `leaf_pem` (its
/// issuer is the CA's subject and the ECDSA signature verifies with the
/// CA's key).
pub fn signed_by(leaf_pem: &str, ca_pem: &str) -> bool {
    use x509_cert::der::{DecodePem, Encode};
    let (Ok(leaf), Ok(ca)) = (
        x509_cert::Certificate::from_pem(leaf_pem.as_bytes()),
        x509_cert::Certificate::from_pem(ca_pem.as_bytes()),
    ) else {
        return false;
    };
    if leaf.tbs_certificate().issuer() != ca.tbs_certificate().subject() {
        return false;
    }
    let Ok(tbs) = leaf.tbs_certificate().to_der() else {
        return false;
    };
    let Some(signature) = leaf.signature().as_bytes() else {
        return false;
    };
    let Some(key) = ca
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .as_bytes()
    else {
        return false;
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(&tbs, signature)
        .is_ok()
}

/// The 32-byte AES key of a `--certificate-key` (64 hex digits), with kubeadm's errors.
pub fn certificate_key_bytes(key: &str) -> Result<Vec<u8>, String> {
    // Never echo the key itself: it decrypts the cluster's CA keys.
    let bad = || "error decoding certificate key: encoding/hex: invalid byte".to_string();
    if !key.len().is_multiple_of(2) {
        return Err("error decoding certificate key: encoding/hex: odd length hex string".into());
    }
    let bytes = (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(key.get(i..i + 2).unwrap_or("zz"), 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, String>>()?;
    if bytes.len() != 32 {
        return Err(format!(
            "error decoding certificate key: crypto/aes: invalid key size {}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

fn aes_key(key: &[u8]) -> Result<aws_lc_rs::aead::LessSafeKey, String> {
    let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
        .map_err(|_| format!("crypto/aes: invalid key size {}", key.len()))?;
    Ok(aws_lc_rs::aead::LessSafeKey::new(unbound))
}

/// AES-256-GCM as kubeadm's `EncryptBytes`: a random 12-byte nonce, then
/// the sealed data with its tag.
pub fn seal(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    let key = aes_key(key)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..12]);
    let mut data = plaintext.to_vec();
    key.seal_in_place_append_tag(
        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
        aws_lc_rs::aead::Aad::empty(),
        &mut data,
    )
    .map_err(|_| "cipher: sealing failed".to_string())?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Ok(out)
}

/// Opens what [`seal`] made; a wrong key fails as Go's AES-GCM does.
pub fn open(key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
    let key = aes_key(key)?;
    if sealed.len() < 12 + 16 {
        return Err("ciphertext too short".into());
    }
    let (nonce, body) = sealed.split_at(12);
    let mut nonce_arr = [0u8; 12];
    nonce_arr.copy_from_slice(nonce);
    let mut data = body.to_vec();
    let plain = key
        .open_in_place(
            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce_arr),
            aws_lc_rs::aead::Aad::empty(),
            &mut data,
        )
        .map_err(|_| "cipher: message authentication failed".to_string())?;
    Ok(plain.to_vec())
}

/// The etcd flags of kubeadm's static Pod that make it serve and peer over
/// TLS with client-certificate authentication
/// (`cmd/kubeadm/app/phases/etcd/local.go`, `getEtcdCommand`).
pub fn etcd_tls_flags(pki: &Path) -> Vec<(String, String)> {
    let p = |f: &str| pki.join(f).display().to_string();
    vec![
        ("cert-file".into(), p("etcd/server.crt")),
        ("key-file".into(), p("etcd/server.key")),
        ("client-cert-auth".into(), "true".into()),
        ("trusted-ca-file".into(), p("etcd/ca.crt")),
        ("peer-cert-file".into(), p("etcd/peer.crt")),
        ("peer-key-file".into(), p("etcd/peer.key")),
        ("peer-client-cert-auth".into(), "true".into()),
        ("peer-trusted-ca-file".into(), p("etcd/ca.crt")),
    ]
}

/// The client identity kubeadm and the API server use for etcd, as PEM.
pub struct EtcdClientFiles {
    /// `etcd/ca.crt`
    pub ca: Vec<u8>,
    /// `apiserver-etcd-client.crt`
    pub cert: Vec<u8>,
    /// `apiserver-etcd-client.key`
    pub key: Vec<u8>,
}

/// [`EtcdClientFiles`] read from `pki`; missing files fail as kubeadm does.
pub fn etcd_client_files(pki: &Path) -> Result<EtcdClientFiles, String> {
    let read = |f: &str| {
        let path = pki.join(f);
        std::fs::read(&path).map_err(|e| {
            format!(
                "error creating etcd client: open {}: {}",
                path.display(),
                if e.kind() == std::io::ErrorKind::NotFound {
                    "no such file or directory".to_string()
                } else {
                    e.to_string()
                }
            )
        })
    };
    Ok(EtcdClientFiles {
        ca: read("etcd/ca.crt")?,
        cert: read("apiserver-etcd-client.crt")?,
        key: read("apiserver-etcd-client.key")?,
    })
}

// ---------------------------------------------------------------------------
// Renewal (`kubeadm certs renew`) and certificates that expire soon

/// The CA that signs each leaf kubeadm issues, by stem.
pub fn leaf_authority(stem: &str) -> Option<Authority> {
    leaves(&NodeNames {
        node_name: String::new(),
        advertise: IpAddr::from([127, 0, 0, 1]),
        api_sans: vec![],
    })
    .into_iter()
    .find(|l| l.stem == stem)
    .map(|l| l.ca)
}

/// The kubeconfigs whose embedded client certificate kubeadm renews, with
/// the subject kubeadm gives it (`phases/kubeconfig/kubeconfig.go`); all
/// signed by the cluster CA. `kubelet.conf` is not here: the kubelet
/// rotates its own.
pub const KUBECONFIG_CLIENTS: [(&str, &str, Option<&str>); 4] = [
    (
        "admin.conf",
        "kubernetes-admin",
        Some("kubeadm:cluster-admins"),
    ),
    (
        "super-admin.conf",
        "kubernetes-super-admin",
        Some("system:masters"),
    ),
    (
        "controller-manager.conf",
        "system:kube-controller-manager",
        None,
    ),
    ("scheduler.conf", "system:kube-scheduler", None),
];

/// What renewal keeps of a certificate: kubeadm's `certToConfig` (common
/// name, organizations, DNS and IP SANs, extended key usages).
struct Kept {
    common_name: String,
    organizations: Vec<String>,
    sans: Vec<SanType>,
    server: bool,
    client: bool,
}

fn kept_of(pem: &str) -> Result<Kept, String> {
    use x509_cert::der::DecodePem;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| format!("failed to parse certificate: {e}"))?;
    let tbs = cert.tbs_certificate();
    let subject = tbs.subject();
    let common_name = subject
        .common_name()
        .map_err(|e| e.to_string())?
        .map(String::from)
        .unwrap_or_default();
    let organizations = subject
        .iter()
        .filter(|a| a.oid == x509_cert::der::oid::db::rfc4519::ORGANIZATION_NAME)
        .filter_map(|a| x509_cert::ext::pkix::name::DirectoryString::try_from(&a.value).ok())
        .map(String::from)
        .collect();
    let mut sans = Vec::new();
    if let Some((_, SubjectAltName(names))) = tbs
        .get_extension::<SubjectAltName>()
        .map_err(|e| e.to_string())?
    {
        for name in names {
            match name {
                GeneralName::DnsName(d) => sans.push(SanType::DnsName(
                    d.to_string().try_into().map_err(|e| format!("SAN: {e}"))?,
                )),
                GeneralName::IpAddress(o) => {
                    let b = o.as_bytes();
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(b).map_err(|e| e.to_string())?),
                        16 => IpAddr::from(<[u8; 16]>::try_from(b).map_err(|e| e.to_string())?),
                        n => return Err(format!("IP SAN of {n} bytes")),
                    };
                    sans.push(SanType::IpAddress(ip));
                }
                _ => {}
            }
        }
    }
    let (mut server, mut client) = (false, false);
    if let Some((_, ExtendedKeyUsage(usages))) = tbs
        .get_extension::<ExtendedKeyUsage>()
        .map_err(|e| e.to_string())?
    {
        use x509_cert::der::oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
        server = usages.contains(&ID_KP_SERVER_AUTH);
        client = usages.contains(&ID_KP_CLIENT_AUTH);
    }
    Ok(Kept {
        common_name,
        organizations,
        sans,
        server,
        client,
    })
}

/// Sets `params`' validity: from five minutes ago until `not_after`
/// (rcgen's dates without naming the `time` crate).
fn set_validity(params: &mut CertificateParams, not_after: std::time::SystemTime) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    params.not_before =
        epoch + since(std::time::SystemTime::now() - std::time::Duration::from_secs(300));
    params.not_after = epoch + since(not_after);
}

/// Signs a new key for `kept` with the CA `ca` in `pki`, valid until `not_after`.
fn sign(
    kept: &Kept,
    pki: &Path,
    ca: Authority,
    not_after: std::time::SystemTime,
) -> Result<(String, String), String> {
    let ca_key_path = pki.join(format!("{}.key", ca.stem));
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .map_err(|e| format!("failure loading {} certificate authority: {e}", ca.stem))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| format!("{}.key: {e}", ca.stem))?;
    let issuer = Issuer::new(ca_params(ca)?, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, kept.common_name.as_str());
    for o in &kept.organizations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, o.as_str());
    }
    params.subject_alt_names = kept.sans.clone();
    leaf_usages(&mut params, kept.server, kept.client);
    set_validity(&mut params, not_after);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Re-signs the leaf `<stem>.crt` in `pki` with its CA, keeping its names
/// and usages, with a new key, valid until `not_after` (what kubeadm's
/// `RenewUsingLocalCA` does with now + one year).
pub fn renew_leaf(pki: &Path, stem: &str, not_after: std::time::SystemTime) -> Result<(), String> {
    let ca = leaf_authority(stem).ok_or_else(|| format!("{stem} is not a known certificate"))?;
    let crt = pki.join(format!("{stem}.crt"));
    let pem = std::fs::read_to_string(&crt).map_err(|e| format!("{}: {e}", crt.display()))?;
    let (c, k) = sign(&kept_of(&pem)?, pki, ca, not_after)?;
    write_file(&pki.join(format!("{stem}.key")), k.as_bytes(), 0o600)?;
    write_file(&crt, c.as_bytes(), 0o644)
}

/// The PEM certificate embedded in a kubeconfig (JSON, as the stand-in
/// writes them) for its first user, if any.
pub fn kubeconfig_client_pem(path: &Path) -> Result<Option<String>, String> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(data) = cfg["users"][0]["user"]["client-certificate-data"].as_str() else {
        return Ok(None);
    };
    let pem = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("{}: client-certificate-data: {e}", path.display()))?;
    Ok(Some(String::from_utf8_lossy(&pem).into_owned()))
}

/// Writes a client certificate and key into the kubeconfig at `path`
/// (`client-certificate-data` / `client-key-data`, as kubeadm embeds them).
fn embed(path: &Path, cert: &str, key: &str) -> Result<(), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let user = cfg["users"][0]["user"]
        .as_object_mut()
        .ok_or_else(|| format!("{}: no users[0].user", path.display()))?;
    user.insert("client-certificate-data".into(), b64.encode(cert).into());
    user.insert("client-key-data".into(), b64.encode(key).into());
    write_file(path, format!("{cfg:#}\n").as_bytes(), 0o600)
}

/// The subject kubeadm gives the client certificate of each kubeconfig it
/// writes (`cmd/kubeadm/app/phases/kubeconfig/kubeconfig.go`:
/// `getKubeConfigSpecsBase`): common name and organizations.
pub fn kubeconfig_subject(file: &str, node: &str) -> Option<(String, Vec<String>)> {
    Some(match file {
        "admin.conf" => (
            "kubernetes-admin".into(),
            vec!["kubeadm:cluster-admins".into()],
        ),
        "super-admin.conf" => (
            "kubernetes-super-admin".into(),
            vec!["system:masters".into()],
        ),
        "kubelet.conf" => (format!("system:node:{node}"), vec!["system:nodes".into()]),
        "controller-manager.conf" => ("system:kube-controller-manager".into(), vec![]),
        "scheduler.conf" => ("system:kube-scheduler".into(), vec![]),
        _ => return None,
    })
}

/// Embeds in the kubeconfig at `path` a new client certificate for
/// `common_name`/`organizations`, signed by the cluster CA in `pki` and
/// valid until `not_after`: what kubeadm's kubeconfig phase writes (one
/// year, `client-certificate-data`/`client-key-data`).
pub fn embed_client_certificate(
    path: &Path,
    pki: &Path,
    common_name: &str,
    organizations: &[String],
    not_after: std::time::SystemTime,
) -> Result<(), String> {
    let kept = Kept {
        common_name: common_name.to_string(),
        organizations: organizations.to_vec(),
        sans: Vec::new(),
        server: false,
        client: true,
    };
    let (c, k) = sign(&kept, pki, CLUSTER_CA, not_after)?;
    embed(path, &c, &k)
}

/// Re-signs the client certificate embedded in the kubeconfig `path` with
/// the cluster CA in `pki`, keeping its subject, valid until `not_after`.
/// A kubeconfig with no embedded certificate fails as kubeadm's does.
pub fn renew_kubeconfig(
    path: &Path,
    pki: &Path,
    not_after: std::time::SystemTime,
) -> Result<(), String> {
    let pem = kubeconfig_client_pem(path)?.ok_or_else(|| {
        format!(
            "failed to load existing certificate {}: the kubeconfig has no client-certificate-data",
            path.display()
        )
    })?;
    let (c, k) = sign(&kept_of(&pem)?, pki, CLUSTER_CA, not_after)?;
    embed(path, &c, &k)
}

/// A control plane whose certificates were issued long ago: every leaf
/// under `<kubernetes_dir>/pki` re-signed by its CA to expire at
/// `not_after`, and the kubeconfigs kubeadm renews given an embedded
/// client certificate (kubeadm's subjects) expiring then too. The node's
/// etcd keeps serving: it reads its certificate files at each handshake.
pub fn age_node_certificates(
    kubernetes_dir: &Path,
    not_after: std::time::SystemTime,
) -> Result<(), String> {
    let pki = kubernetes_dir.join("pki");
    for stem in leaf_stems() {
        renew_leaf(&pki, stem, not_after)?;
    }
    for (file, cn, org) in KUBECONFIG_CLIENTS {
        let path = kubernetes_dir.join(file);
        if !path.exists() {
            continue;
        }
        let kept = Kept {
            common_name: cn.to_string(),
            organizations: org.map(str::to_string).into_iter().collect(),
            sans: vec![],
            server: false,
            client: true,
        };
        let (c, k) = sign(&kept, &pki, CLUSTER_CA, not_after)?;
        embed(&path, &c, &k)?;
    }
    Ok(())
}

/// The notAfter of a PEM certificate.
pub fn not_after_of(pem: &str) -> Result<std::time::SystemTime, String> {
    use x509_cert::der::DecodePem;
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| format!("failed to parse certificate: {e}"))?;
    Ok(cert.tbs_certificate().validity().not_after.to_system_time())
}

/// A leaf's key usages, as kubeadm's `certs` phase sets them: signing and
/// key encipherment, and server and/or client authentication.
fn leaf_usages(params: &mut CertificateParams, server: bool, client: bool) {
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_certificates_open_only_with_their_key() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"ca.key contents").unwrap();
        assert_eq!(open(&key, &sealed).unwrap(), b"ca.key contents");
        let wrong = [8u8; 32];
        assert_eq!(
            open(&wrong, &sealed).unwrap_err(),
            "cipher: message authentication failed"
        );
    }

    #[test]
    fn a_joining_node_cannot_issue_leaves_before_it_has_the_cas() {
        let dir = tempfile::tempdir().unwrap();
        let names = NodeNames {
            node_name: "ip-10-0-0-1".into(),
            advertise: "127.0.0.9".parse().unwrap(),
            api_sans: vec!["api.example.internal".into()],
        };
        let err = ensure_leaves(dir.path(), &names).unwrap_err();
        assert!(err.contains("couldn't load the certificate file"), "{err}");
        ensure_authorities(dir.path()).unwrap();
        ensure_leaves(dir.path(), &names).unwrap();
        for stem in leaf_stems() {
            assert!(dir.path().join(format!("{stem}.crt")).exists(), "{stem}");
        }
        etcd_client_files(dir.path()).unwrap();
    }

    #[test]
    fn a_leaf_left_from_another_ca_is_refused_like_kubeadm() {
        let dir = tempfile::tempdir().unwrap();
        let names = NodeNames {
            node_name: "ip-10-0-0-2".into(),
            advertise: "127.0.0.8".parse().unwrap(),
            api_sans: vec![],
        };
        ensure_authorities(dir.path()).unwrap();
        ensure_leaves(dir.path(), &names).unwrap();
        let leaf = std::fs::read_to_string(dir.path().join("etcd/server.crt")).unwrap();
        let ca = std::fs::read_to_string(dir.path().join("etcd/ca.crt")).unwrap();
        assert!(signed_by(&leaf, &ca));
        ensure_leaves(dir.path(), &names).unwrap();
        // A new etcd CA (another cluster's, downloaded over the leftovers).
        let (other, other_key) = generate_ca(ETCD_CA).unwrap();
        write_file(&dir.path().join("etcd/ca.crt"), other.as_bytes(), 0o644).unwrap();
        write_file(&dir.path().join("etcd/ca.key"), other_key.as_bytes(), 0o600).unwrap();
        assert!(!signed_by(&leaf, &other));
        let err = ensure_leaves(dir.path(), &names).unwrap_err();
        assert!(err.contains("is not signed by corresponding CA"), "{err}");
    }
}
