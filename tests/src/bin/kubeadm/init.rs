//! `kubeadm init` and `kubeadm init phase`.

use crate::api::{embed_client_certificate, kubeconfig, kubeconfig_server, Api};
use crate::certificates::{ca_pin, upload_certs};
use crate::cli::parse_flags;
use crate::config::{
    arg_list, config_documents, find_kind, load_documents, parse_ip, parse_token, str_at, Token,
};
use crate::etcd::{
    drop_shared_loopback, etcd_args, set_pki_dir, spawn_etcd, split_url, wait_member, EtcdUrls,
    LocalEtcd,
};
use crate::helpers::wait_timeout;
use crate::helpers::{
    generate_certificate_key, generate_token, guard_paths, parent, parse_go_duration, phase_err,
    plain_err, rfc3339, try_start_kubelet, write_file, R,
};
use crate::join::host_of;
use crate::kubelet::{
    create_etcd_mirror_pod, mark_control_plane, note_kubelet_args, register_node,
    write_control_plane_manifests, write_etcd_manifest,
};
use crate::preflight::{manifest_files, Preflight};
use crate::token::default_advertise_address;
use crate::{B64, DEFAULT_CERT_DIR, DEFAULT_TOKEN_GROUP, VERSION};
use base64::Engine as _;
use kubeboot_tests::kubeapi;
use kubeboot_tests::net::http_request;
use kubeboot_tests::pki;
use kubeboot_tests::standin;
use serde_json::json;
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

#[derive(Debug, Clone)]
pub(crate) struct TokenSpec {
    pub(crate) token: Token,
    pub(crate) ttl: Duration,
    pub(crate) usages: Vec<String>,
    pub(crate) groups: Vec<String>,
    pub(crate) description: String,
}

pub(crate) fn token_secret(spec: &TokenSpec) -> Value {
    let mut data = serde_json::Map::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.into(), json!(B64.encode(v)));
    };
    put("token-id", &spec.token.id);
    put("token-secret", &spec.token.secret);
    if !spec.ttl.is_zero() {
        put("expiration", &rfc3339(SystemTime::now() + spec.ttl));
    }
    for usage in &spec.usages {
        put(&format!("usage-bootstrap-{usage}"), "true");
    }
    if !spec.groups.is_empty() {
        put("auth-extra-groups", &spec.groups.join(","));
    }
    if !spec.description.is_empty() {
        put("description", &spec.description);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kubeapi::BOOTSTRAP_TOKEN_TYPE,
        "metadata": {"name": format!("bootstrap-token-{}", spec.token.id), "namespace": "kube-system"},
        "data": data,
    })
}

pub(crate) fn token_specs(init: &Value) -> R<Vec<TokenSpec>> {
    let Some(list) = init["bootstrapTokens"].as_array() else {
        return Ok(vec![TokenSpec {
            token: parse_token(&generate_token(), "bootstrapTokens[0].token")?,
            ttl: Duration::from_secs(86_400),
            usages: vec!["signing".into(), "authentication".into()],
            groups: vec![DEFAULT_TOKEN_GROUP.into()],
            description: String::new(),
        }]);
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let token = parse_token(
                t["token"].as_str().unwrap_or(""),
                &format!("bootstrapTokens[{i}].token"),
            )?;
            let ttl = match t["ttl"].as_str() {
                Some(s) => parse_go_duration(s)
                    .map_err(|e| plain_err(format!("bootstrapTokens[{i}].ttl: {e}")))?,
                None => Duration::from_secs(86_400),
            };
            let strings = |field: &str, default: &[&str]| -> Vec<String> {
                t[field].as_array().map_or_else(
                    || default.iter().map(|s| s.to_string()).collect(),
                    |a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    },
                )
            };
            Ok(TokenSpec {
                token,
                ttl,
                usages: strings("usages", &["signing", "authentication"]),
                groups: strings("groups", &[DEFAULT_TOKEN_GROUP]),
                description: t["description"].as_str().unwrap_or("").into(),
            })
        })
        .collect()
}

/// `kube-public/cluster-info`: the CA and endpoint joining nodes discover
/// (the double's bootstrap signer adds the token signatures).
pub(crate) fn cluster_info(server: &str, ca_pem: &str) -> Value {
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "", "cluster": {"certificate-authority-data": B64.encode(ca_pem), "server": server}}],
        "contexts": null,
        "current-context": "",
        "preferences": {},
        "users": null,
    });
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cluster-info", "namespace": "kube-public"},
        "data": {"kubeconfig": format!("{kubeconfig:#}\n")},
    })
}

pub(crate) fn check_kubernetes_version(v: &str) -> R<()> {
    let bad = || plain_err(format!("couldn't parse Kubernetes version {v:?}"));
    let rest = v.strip_prefix('v').ok_or_else(bad)?;
    let mut parts = rest.split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    let (major, minor): (u32, u32) = (
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    );
    if major != 1 || minor < 30 {
        return Err(plain_err(format!(
            "this version of kubeadm only supports deploying clusters with the control plane version >= 1.30.0. Current version: {v}"
        )));
    }
    if minor > 32 {
        return Err(plain_err(format!(
            "the specified version to deploy ({v}) is too far from the kubeadm version ({VERSION})"
        )));
    }
    Ok(())
}

/// The flags `init` takes (the no-op `init` too).
pub(crate) const INIT_FLAGS: &[(&str, bool)] = &[
    ("config", true),
    ("upload-certs", false),
    ("skip-token-print", false),
    ("ignore-preflight-errors", true),
    ("certificate-key", true),
];

pub(crate) async fn init(args: &[String]) -> R<()> {
    let flags = parse_flags(args, INIT_FLAGS)?;
    let (config, docs) = config_documents(&flags)?;
    let empty = json!({});
    let init_doc = find_kind(&docs, "InitConfiguration").unwrap_or(&empty);
    let cluster = find_kind(&docs, "ClusterConfiguration").ok_or_else(|| {
        plain_err(format!(
            "{config}: no ClusterConfiguration document (the stand-in needs controlPlaneEndpoint)"
        ))
    })?;

    let node = str_at(init_doc, "/nodeRegistration/name")
        .ok_or_else(|| plain_err("nodeRegistration.name: Required value: the kubeadm stand-in does not default it to the hostname"))?
        .to_string();
    note_kubelet_args(&arg_list(
        init_doc.pointer("/nodeRegistration/kubeletExtraArgs"),
        "NodeRegistrationOptions.nodeRegistration.kubeletExtraArgs",
    )?);
    let ip = parse_ip(
        str_at(init_doc, "/localAPIEndpoint/advertiseAddress"),
        "localAPIEndpoint.advertiseAddress",
    )?;
    let tokens = token_specs(init_doc)?;
    let endpoint = str_at(cluster, "/controlPlaneEndpoint")
        .ok_or_else(|| plain_err("controlPlaneEndpoint: Required value: the kubeadm stand-in reaches the API server double there"))?
        .to_string();
    let version = str_at(cluster, "/kubernetesVersion").unwrap_or(VERSION);
    check_kubernetes_version(version)?;
    let cluster_name = str_at(cluster, "/clusterName")
        .unwrap_or("kubernetes")
        .to_string();
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    let k8s = parent(&pki);
    let data_dir = PathBuf::from(str_at(cluster, "/etcd/local/dataDir").unwrap_or("/var/lib/etcd"));
    let extra = arg_list(
        cluster.pointer("/etcd/local/extraArgs"),
        "LocalEtcd.etcd.local.extraArgs",
    )?;
    guard_paths(&[&k8s, &data_dir])?;
    let key = match flags
        .value("certificate-key")
        .or_else(|| str_at(init_doc, "/certificateKey"))
    {
        Some(k) => k.to_string(),
        None => generate_certificate_key(),
    };

    let extra_get = |n: &str| extra.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let client = extra_get("advertise-client-urls").unwrap_or_else(|| format!("https://{ip}:2379"));
    let peer =
        extra_get("initial-advertise-peer-urls").unwrap_or_else(|| format!("https://{ip}:2380"));
    let split = |s: Option<String>, default: &str| -> Vec<String> {
        s.unwrap_or_else(|| default.to_string())
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let urls = EtcdUrls {
        listen_client: drop_shared_loopback(&split(extra_get("listen-client-urls"), &client), &ip),
        listen_peer: drop_shared_loopback(&split(extra_get("listen-peer-urls"), &peer), &ip),
        client: client.clone(),
        peer: peer.clone(),
    };
    for u in urls
        .listen_client
        .iter()
        .chain(&urls.listen_peer)
        .chain([&client, &peer])
    {
        if !matches!(split_url(u), Some(("http" | "https", _, _))) {
            return Err(plain_err(format!(
                "etcd URL {u:?} is not scheme://host:port"
            )));
        }
    }
    set_pki_dir(&pki);

    println!("[init] Using Kubernetes version: {version}");
    println!("[preflight] Running pre-flight checks");
    let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
    let manifests = k8s.join("manifests");
    for f in manifest_files(&manifests) {
        pre.file_available(&f);
    }
    for u in [&client, &peer] {
        if let Some((_, host, port)) = split_url(u) {
            if let Ok(h) = host.parse::<IpAddr>() {
                pre.port(&h, port);
            }
        }
    }
    pre.dir_available(&data_dir);
    pre.finish()?;
    println!("[preflight] Pulling images required for setting up a Kubernetes cluster");

    // certs
    println!(
        "[certs] Using certificateDir folder {:?}",
        pki.display().to_string()
    );
    let names = pki::NodeNames {
        node_name: node.clone(),
        advertise: ip,
        api_sans: vec![host_of(&endpoint).to_string()],
    };
    let said = pki::ensure_authorities(&pki)
        .and_then(|mut said| {
            said.extend(pki::ensure_leaves(&pki, &names)?);
            Ok(said)
        })
        .map_err(|e| phase_err("certs", e))?;
    for line in said {
        println!("{line}");
    }
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt"))
        .map_err(|e| phase_err("certs/ca", format!("failure loading ca certificate: {e}")))?;
    let pin = ca_pin(&ca_pem).map_err(|e| phase_err("certs/ca", e))?;

    // kubeconfig
    let server = format!("http://{endpoint}");
    println!(
        "[kubeconfig] Using kubeconfig folder {:?}",
        k8s.display().to_string()
    );
    for (file, user) in [
        ("admin.conf", "kubernetes-admin"),
        ("super-admin.conf", "kubernetes-super-admin"),
        ("kubelet.conf", &format!("system:node:{node}")),
        ("controller-manager.conf", "system:kube-controller-manager"),
        ("scheduler.conf", "system:kube-scheduler"),
    ] {
        println!("[kubeconfig] Writing {file:?} kubeconfig file");
        let cfg = kubeconfig(&cluster_name, &server, &ca_pem, user);
        write_file(&k8s.join(file), format!("{cfg:#}\n").as_bytes(), 0o600)
            .map_err(|e| phase_err("kubeconfig", e))?;
        embed_client_certificate(&k8s.join(file), &pki, file, &node)
            .map_err(|e| phase_err("kubeconfig", e))?;
    }

    // etcd + control plane manifests
    let member = LocalEtcd {
        name: node.clone(),
        data_dir: data_dir.clone(),
        client_url: client.clone(),
        peer_url: peer.clone(),
        args: etcd_args(
            &node,
            &data_dir,
            &urls,
            &format!("{node}={peer}"),
            "new",
            &[pki::etcd_tls_flags(&pki), extra.clone()].concat(),
        ),
    };
    write_control_plane_manifests(&manifests, "control-plane")?;
    write_etcd_manifest(&manifests, &member, "etcd")?;
    println!("[kubelet-start] Writing kubelet environment file with flags to file \"/var/lib/kubelet/kubeadm-flags.env\"");
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    // The API server refuses these flags at start (kubernetes/kubernetes
    // pkg/kubeapiserver/options/authentication.go, ServiceAccountAuthenticationOptions
    // Validate): it never becomes healthy and kubeadm times out waiting.
    let api_args = arg_list(
        cluster.pointer("/apiServer/extraArgs"),
        "ClusterConfiguration.apiServer.extraArgs",
    )?;
    if let Some((_, uri)) = api_args
        .iter()
        .find(|(k, _)| k == "service-account-jwks-uri")
    {
        if !uri.starts_with("https://") {
            println!("[api-check] The API server is not healthy after 4m0s");
            return Err(phase_err(
                "wait-control-plane",
                format!("kube-apiserver exited: service-account-jwks-uri requires https scheme, parsed as: {uri}"),
            ));
        }
    }
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut child =
        spawn_etcd(&member, &state_dir).map_err(|e| phase_err("wait-control-plane", e))?;
    println!("[wait-control-plane] Waiting for the kubelet to boot up the control plane as static Pods from directory {:?}", manifests.display().to_string());
    let started = Instant::now();
    wait_member(&mut child, &client, false, &state_dir.join("etcd.log"))
        .await
        .map_err(|e| {
            println!("[wait-control-plane] etcd did not become healthy: timed out waiting for the condition");
            phase_err("wait-control-plane", e)
        })?;
    println!(
        "[kubelet-check] The kubelet is healthy after {:.6}s",
        started.elapsed().as_secs_f64()
    );
    let api = Api::new(&endpoint);
    println!("[api-check] Waiting for a healthy API server. This can take up to 4m0s");
    wait_api(&api)
        .await
        .map_err(|e| phase_err("wait-control-plane", e))?;
    println!(
        "[api-check] The API server is healthy after {:.6}s",
        started.elapsed().as_secs_f64()
    );

    let node_uid = register_node(&api, &node, &ip).await.map_err(|e| {
        phase_err(
            "wait-control-plane",
            format!("error registering node {node:?}: {e}"),
        )
    })?;
    create_etcd_mirror_pod(&api, &node, &node_uid, &ip, &member)
        .await
        .map_err(|e| {
            phase_err(
                "wait-control-plane",
                format!("error creating the etcd mirror Pod: {e}"),
            )
        })?;

    println!("[upload-config] Storing the configuration used in ConfigMap \"kubeadm-config\" in the \"kube-system\" Namespace");
    let kubeadm_config = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": format!("{cluster:#}\n")},
    });
    api.create_or_update(
        "/api/v1/namespaces/kube-system/configmaps",
        "kubeadm-config",
        &kubeadm_config,
    )
    .await
    .map_err(|e| {
        phase_err(
            "upload-config/kubeadm",
            format!("error uploading the kubeadm ClusterConfiguration: {e}"),
        )
    })?;
    println!("[kubelet] Creating a ConfigMap \"kubelet-config\" in namespace kube-system with the configuration for the kubelets in the cluster");

    if flags.on("upload-certs") {
        upload_certs(&api, &pki, &key).await?;
    } else {
        println!("[upload-certs] Skipping phase. Please see --upload-certs");
    }
    mark_control_plane(&api, &node).await?;

    for t in &tokens {
        println!("[bootstrap-token] Using token: {}", t.token.full());
    }
    println!("[bootstrap-token] Configuring bootstrap tokens, cluster-info ConfigMap, RBAC Roles");
    for t in &tokens {
        api.create_or_update(
            "/api/v1/namespaces/kube-system/secrets",
            &format!("bootstrap-token-{}", t.token.id),
            &token_secret(t),
        )
        .await
        .map_err(|e| {
            phase_err(
                "bootstrap-token",
                format!("error updating or creating token: {e}"),
            )
        })?;
    }
    println!("[bootstrap-token] Creating the \"cluster-info\" ConfigMap in the \"kube-public\" namespace");
    api.create_or_update(
        "/api/v1/namespaces/kube-public/configmaps",
        "cluster-info",
        &cluster_info(&server, &ca_pem),
    )
    .await
    .map_err(|e| {
        phase_err(
            "bootstrap-token",
            format!("error creating bootstrap ConfigMap: {e}"),
        )
    })?;
    println!("[kubelet-finalize] Updating \"{}\" to point to a rotatable kubelet client certificate and key", k8s.join("kubelet.conf").display());
    println!("[addons] Applied essential addon: CoreDNS");
    println!("[addons] Applied essential addon: kube-proxy");

    let token = tokens.first().map(|t| t.token.full()).unwrap_or_default();
    let admin = k8s.join("admin.conf").display().to_string();
    println!(
        "\nYour Kubernetes control-plane has initialized successfully!\n\n\
To start using your cluster, you need to run the following as a regular user:\n\n  \
mkdir -p $HOME/.kube\n  sudo cp -i {admin} $HOME/.kube/config\n  sudo chown $(id -u):$(id -g) $HOME/.kube/config\n\n\
Alternatively, if you are the root user, you can run:\n\n  export KUBECONFIG={admin}\n\n\
You should now deploy a pod network to the cluster.\n\
Run \"kubectl apply -f [podnetwork].yaml\" with one of the options listed at:\n  https://kubernetes.io/docs/concepts/cluster-administration/addons/\n"
    );
    if flags.on("upload-certs") {
        println!(
            "You can now join any number of control-plane nodes running the following command on each as root:\n\n  \
kubeadm join {endpoint} --token {token} \\\n\t--discovery-token-ca-cert-hash {pin} \\\n\t--control-plane --certificate-key {key}\n\n\
Please note that the certificate-key gives access to cluster sensitive data, keep it secret!\n\
As a safeguard, uploaded-certs will be deleted in two hours; If necessary, you can use\n\
\"kubeadm init phase upload-certs --upload-certs\" to reload certs afterward.\n"
        );
    }
    println!(
        "Then you can join any number of worker nodes by running the following on each as root:\n\n\
kubeadm join {endpoint} --token {token} \\\n\t--discovery-token-ca-cert-hash {pin} "
    );
    Ok(())
}

pub(crate) async fn wait_api(api: &Api) -> Result<(), String> {
    let timeout = wait_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_request(&api.base, "GET", "/readyz", &[], &[]).await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("GET {}/readyz: {} {}", api.base, r.status, r.text().trim()),
            Err(e) => format!("Get \"{}/readyz\": {e}", api.base),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "could not check API server health: {last}: timed out waiting for the condition"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubeadm init phase upload-certs --upload-certs [--certificate-key K]
/// [--config F] [--kubeconfig K]`.
pub(crate) async fn init_phase(args: &[String]) -> R<()> {
    let Some((phase, rest)) = args.split_first() else {
        return Err(plain_err(
            "the kubeadm stand-in implements only `init phase upload-certs`",
        ));
    };
    if phase != "upload-certs" {
        return Err(plain_err(format!(
            "the kubeadm stand-in implements only `init phase upload-certs`, not {phase:?}"
        )));
    }
    let flags = parse_flags(
        rest,
        &[
            ("upload-certs", false),
            ("certificate-key", true),
            ("config", true),
            ("kubeconfig", true),
            ("skip-certificate-key-print", false),
        ],
    )?;
    if !flags.on("upload-certs") {
        println!("[upload-certs] Skipping phase. Please see --upload-certs");
        return Ok(());
    }
    let docs = match flags.value("config") {
        Some(path) => load_documents(path)?,
        None => Vec::new(),
    };
    let empty = json!({});
    let init_doc = find_kind(&docs, "InitConfiguration").unwrap_or(&empty);
    default_advertise_address(Some(init_doc))?;
    let cluster = find_kind(&docs, "ClusterConfiguration").unwrap_or(&empty);
    let pki = PathBuf::from(str_at(cluster, "/certificatesDir").unwrap_or(DEFAULT_CERT_DIR));
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| parent(&pki).join("admin.conf"));
    guard_paths(&[&pki, &kubeconfig_path])?;
    let server = kubeconfig_server(&kubeconfig_path).map_err(|e| {
        phase_err(
            "upload-certs",
            format!("failed to load admin kubeconfig: {e}"),
        )
    })?;
    let key = match flags
        .value("certificate-key")
        .or_else(|| str_at(init_doc, "/certificateKey"))
    {
        Some(k) => k.to_string(),
        None => generate_certificate_key(),
    };
    let api = Api::new(&server);
    upload_certs(&api, &pki, &key).await
}
