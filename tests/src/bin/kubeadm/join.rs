//! `kubeadm join` and `kubeadm join phase`: discovery, the control plane's
//! certificates, and the etcd member it adds (`check-etcd`, learner then
//! voter).

use crate::api::embed_client_certificate;
use crate::api::{kubeconfig, Api};
use crate::certificates::ca_pin;
use crate::cli::parse_flags;
use crate::cli::Flags;
use crate::config::{arg_list, config_documents, join_node, parse_ip, parse_token, str_at, Token};
use crate::etcd::{
    drop_shared_loopback, etcd_args, etcd_client, etcd_msg, set_pki_dir, spawn_etcd, transient,
    wait_member, EtcdUrls, LocalEtcd,
};
use crate::helpers::parse_rfc3339;
use crate::helpers::{
    guard_paths, knob, parent, phase_err, plain_err, try_start_kubelet, write_file, R,
};
use crate::kubelet::write_control_plane_manifests;
use crate::kubelet::{
    create_etcd_mirror_pod, mark_control_plane, register_node, write_etcd_manifest,
};
use crate::preflight::manifest_files;
use crate::preflight::Preflight;
use crate::B64;
use crate::CERTS_EXPIRY_ANNOTATION;
use crate::ETCD_URL_ANNOTATION;
use base64::Engine as _;
use etcd_client::Member;
use etcd_client::MemberAddOptions;
use kubeboot_tests::kubeapi;
use kubeboot_tests::pki;
use kubeboot_tests::standin;
use kubeboot_tests::standin::etcd_data_dir_for;
use serde_json::Value;
use std::net::IpAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

/// What discovery established: the trusted CA and the API server.
pub(crate) struct Discovered {
    pub(crate) ca_pem: String,
    pub(crate) server: String,
}

/// kubeadm's token discovery: cluster-info must carry a JWS for the token id
/// (the bootstrap signer only signs with live tokens), the signature must
/// verify with the token secret, and the CA's public key must be pinned.
pub(crate) async fn discover(
    api: &Api,
    token: &Token,
    pins: &[String],
    unsafe_skip: bool,
) -> R<Discovered> {
    let fail = |m: String| {
        phase_err(
            "preflight",
            format!("couldn't validate the identity of the API Server: {m}"),
        )
    };
    let timeout = knob("KBTEST_KUBEADM_DISCOVERY_TIMEOUT_MS", 3_000);
    let deadline = Instant::now() + timeout;
    let (kubeconfig_text, jws) = loop {
        let last = match api
            .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
            .await
        {
            Ok(Some(cm)) => {
                let jws = cm["data"][format!("{}{}", kubeapi::JWS_PREFIX, token.id)]
                    .as_str()
                    .map(str::to_string);
                let kc = cm["data"]["kubeconfig"].as_str().map(str::to_string);
                match (kc, jws) {
                    (Some(kc), Some(jws)) if !jws.is_empty() => break (kc, jws),
                    _ => format!("could not find a JWS signature in the cluster-info ConfigMap for token ID {:?}", token.id),
                }
            }
            Ok(None) => "configmaps \"cluster-info\" not found".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(fail(last));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !kubeapi::detached_jws_is_valid(&jws, &kubeconfig_text, &token.id, &token.secret) {
        return Err(fail(
            "failed to verify JWS signature of received cluster info object, can't trust this API Server".into(),
        ));
    }
    let kc: Value = serde_json::from_str(&kubeconfig_text).map_err(|e| {
        fail(format!(
            "couldn't parse the kubeconfig file in the cluster-info ConfigMap: {e}"
        ))
    })?;
    let cluster = &kc["clusters"][0]["cluster"];
    let ca_pem = cluster["certificate-authority-data"]
        .as_str()
        .and_then(|d| B64.decode(d).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            fail("the cluster-info ConfigMap has no certificate-authority-data".into())
        })?;
    let server = cluster["server"].as_str().unwrap_or_default().to_string();
    if !unsafe_skip {
        let actual = ca_pin(&ca_pem).map_err(|e| {
            fail(format!(
                "cluster CA found in cluster-info ConfigMap is invalid: {e}"
            ))
        })?;
        if !pins.iter().any(|p| p.eq_ignore_ascii_case(&actual)) {
            return Err(fail(format!(
                "cluster CA found in cluster-info ConfigMap is invalid: none of the public keys \"{actual}\" are pinned"
            )));
        }
    }
    Ok(Discovered { ca_pem, server })
}

pub(crate) fn validate_pins(pins: &[String], unsafe_skip: bool) -> R<()> {
    if pins.is_empty() && !unsafe_skip {
        return Err(plain_err(
            "discovery.bootstrapToken: Invalid value: \"\": using token-based discovery without caCertHashes can be unsafe. \
             Set unsafeSkipCAVerification as true in your kubeadm config file or pass --discovery-token-unsafe-skip-ca-verification flag to continue",
        ));
    }
    for p in pins {
        match p.split_once(':') {
            Some(("sha256", h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
            Some(("sha256", _)) => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: invalid hash {p:?}, expected a 32 byte SHA-256 hash"
                )))
            }
            Some((f, _)) => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: unknown hash format {f:?}. Known format(s) are: sha256"
                )))
            }
            None => {
                return Err(plain_err(format!(
                    "discovery.bootstrapToken.caCertHashes: Invalid value: {p:?}: invalid hash {p:?}, expected \"format:hex-value\""
                )))
            }
        }
    }
    Ok(())
}

/// What every `kubeadm join` (and its `control-plane-prepare` phases) knows
/// once the config is read and discovery has established trust.
pub(crate) struct JoinContext {
    pub(crate) node: String,
    /// The kubelet's `--node-ip` (the agent always sets it).
    pub(crate) node_ip: IpAddr,
    pub(crate) endpoint: String,
    pub(crate) k8s: PathBuf,
    pub(crate) pki: PathBuf,
    pub(crate) ca_path: PathBuf,
    pub(crate) data_dir: PathBuf,
    /// `controlPlane.localAPIEndpoint.advertiseAddress` of a control-plane join.
    pub(crate) ip: Option<IpAddr>,
    pub(crate) cert_key: Option<String>,
    pub(crate) api: Api,
    pub(crate) found: Discovered,
    /// The cluster's ClusterConfiguration from the `kubeadm-config` ConfigMap.
    pub(crate) cluster_cfg: Value,
    pub(crate) cluster_name: String,
}

/// Reads the JoinConfiguration, runs preflight (the worker's or the control
/// plane's, as kubeadm's `JoinNodeChecks`), discovery, and fetches the
/// cluster's configuration, as `kubeadm join` does before its phases.
pub(crate) async fn join_context(flags: &Flags, preflight: bool) -> R<JoinContext> {
    if !flags.positional.is_empty() {
        return Err(plain_err(
            "the kubeadm stand-in joins with --config only (no endpoint or discovery flags on the command line)",
        ));
    }
    let (config, docs) = config_documents(flags)?;
    let (jc, node, kubelet_args) = join_node(&docs, config)?;
    let node_ip: IpAddr = kubelet_args
        .iter()
        .find(|(k, _)| k == "node-ip")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let bt = &jc["discovery"]["bootstrapToken"];
    let endpoint = str_at(bt, "/apiServerEndpoint")
        .ok_or_else(|| plain_err("discovery.bootstrapToken.apiServerEndpoint: Required value"))?
        .to_string();
    let token = parse_token(
        bt["token"].as_str().unwrap_or(""),
        "discovery.bootstrapToken.token",
    )?;
    let pins: Vec<String> = bt["caCertHashes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let unsafe_skip = bt["unsafeSkipCAVerification"].as_bool().unwrap_or(false);
    validate_pins(&pins, unsafe_skip)?;
    let ca_path = PathBuf::from(str_at(jc, "/caCertPath").unwrap_or("/etc/kubernetes/pki/ca.crt"));
    let pki = parent(&ca_path);
    let k8s = parent(&pki);
    let control_plane = jc.get("controlPlane").filter(|v| v.is_object());
    let data_dir = etcd_data_dir_for(&k8s);
    guard_paths(&[&k8s, &data_dir])?;
    let ip = match control_plane {
        Some(cp) => Some(parse_ip(
            str_at(cp, "/localAPIEndpoint/advertiseAddress"),
            "controlPlane.localAPIEndpoint.advertiseAddress",
        )?),
        None => None,
    };
    let cert_key = control_plane
        .and_then(|cp| str_at(cp, "/certificateKey"))
        .map(str::to_string);

    if preflight {
        println!("[preflight] Running pre-flight checks");
        let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
        pre.file_available(&k8s.join("kubelet.conf"));
        // kubeadm checks the CA path only for workers: a control plane may
        // have downloaded the certificates already (upstream:
        // cmd/kubeadm/app/preflight/checks.go, JoinNodeChecks).
        if ip.is_none() {
            pre.file_available(&ca_path);
        }
        pre.finish()?;
    }

    let api = Api::new(&endpoint);
    let found = discover(&api, &token, &pins, unsafe_skip).await?;
    println!("[preflight] Reading configuration from the cluster...");
    println!("[preflight] FYI: You can look at this config file with 'kubectl -n kube-system get cm kubeadm-config -o yaml'");
    let kubeadm_config = api
        .get("/api/v1/namespaces/kube-system/configmaps/kubeadm-config")
        .await
        .map_err(|e| phase_err("preflight", format!("unable to fetch the kubeadm-config ConfigMap: failed to get config map: {e}")))?
        .ok_or_else(|| phase_err("preflight", "unable to fetch the kubeadm-config ConfigMap: failed to get config map: configmaps \"kubeadm-config\" not found"))?;
    let cluster_cfg: Value = kubeadm_config["data"]["ClusterConfiguration"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let cluster_name = str_at(&cluster_cfg, "/clusterName")
        .unwrap_or("kubernetes")
        .to_string();
    set_pki_dir(&pki);
    Ok(JoinContext {
        node,
        node_ip,
        endpoint,
        k8s,
        pki,
        ca_path,
        data_dir,
        ip,
        cert_key,
        api,
        found,
        cluster_cfg,
        cluster_name,
    })
}

impl JoinContext {
    /// The control-plane join's advertise address and certificate key, or
    /// kubeadm's refusal when the certificates are neither given nor there.
    pub(crate) fn control_plane(&self) -> R<(IpAddr, Option<&str>)> {
        let ip = self.ip.ok_or_else(|| {
            plain_err("this phase needs a JoinConfiguration with a controlPlane section")
        })?;
        if self.cert_key.is_none() && !self.ca_path.exists() {
            // Without a key kubeadm expects the certificates copied by hand.
            return Err(phase_err(
                "preflight",
                format!(
                    "\nOne or more conditions for hosting a new control plane instance is not satisfied.\n\n\
                     [failure loading certificate for CA: couldn't load the certificate file {}: open {}: no such file or directory]\n\n\
                     Please ensure that:\n* The cluster has a stable controlPlaneEndpoint address.\n\
                     * The certificates that must be shared among control plane instances are provided.",
                    self.ca_path.display(),
                    self.ca_path.display()
                ),
            ));
        }
        Ok((ip, self.cert_key.as_deref()))
    }

    /// control-plane-prepare/download-certs: the shared CAs and keys from
    /// `kube-system/kubeadm-certs`, opened with the certificate key
    /// (upstream: cmd/kubeadm/app/phases/copycerts/copycerts.go, `DownloadCerts`).
    pub(crate) async fn download_certs(&self) -> R<()> {
        let Some(cert_key) = self.control_plane()?.1 else {
            println!("[download-certs] Skipping phase. Please see --certificate-key");
            return Ok(());
        };
        println!("[download-certs] Downloading the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace");
        let certs_fail = |m: String| {
            phase_err(
                "control-plane-prepare/download-certs",
                format!("error downloading certs: {m}"),
            )
        };
        let not_found = || {
            certs_fail(
                "error downloading the secret: Secret \"kubeadm-certs\" was not found in the \"kube-system\" Namespace. \
                 This Secret might have expired. Please, run `kubeadm init phase upload-certs --upload-certs` on a control plane to generate a new one"
                    .into(),
            )
        };
        let secret = self
            .api
            .get("/api/v1/namespaces/kube-system/secrets/kubeadm-certs")
            .await
            .map_err(|e| certs_fail(format!("error downloading the secret: {e}")))?
            .ok_or_else(not_found)?;
        let expired = secret["metadata"]["annotations"][CERTS_EXPIRY_ANNOTATION]
            .as_str()
            .and_then(parse_rfc3339)
            .is_some_and(|t| t <= SystemTime::now());
        if expired {
            return Err(not_found());
        }
        let key_bytes = pki::certificate_key_bytes(cert_key).map_err(certs_fail)?;
        // Open everything before writing anything: a wrong key leaves no file.
        let mut opened = Vec::new();
        for name in pki::SHARED_FILES {
            let sealed = secret["data"][pki::secret_key_of(name)]
                .as_str()
                .and_then(|d| B64.decode(d).ok())
                .ok_or_else(|| {
                    certs_fail(format!(
                        "the Secret does not include the required certificate or key - name: {name}, path: {}",
                        self.pki.join(name).display()
                    ))
                })?;
            let plain = pki::open(&key_bytes, &sealed).map_err(|e| {
                certs_fail(format!("error decoding secret data with provided key: {e}"))
            })?;
            opened.push((name, plain));
        }
        for (name, plain) in opened {
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            write_file(&self.pki.join(name), &plain, mode).map_err(certs_fail)?;
        }
        Ok(())
    }

    /// control-plane-prepare/certs: this node's own certificates, signed by
    /// the CAs downloaded before (refused without them, as kubeadm does).
    pub(crate) fn certs(&self) -> R<()> {
        let (ip, _) = self.control_plane()?;
        println!(
            "[certs] Using certificateDir folder {:?}",
            self.pki.display().to_string()
        );
        let endpoint = str_at(&self.cluster_cfg, "/controlPlaneEndpoint").unwrap_or(&self.endpoint);
        let names = pki::NodeNames {
            node_name: self.node.clone(),
            advertise: ip,
            api_sans: vec![host_of(endpoint).to_string()],
        };
        let said = pki::ensure_leaves(&self.pki, &names)
            .map_err(|e| phase_err("control-plane-prepare/certs", e))?;
        for line in said {
            println!("{line}");
        }
        println!(
            "[certs] Valid certificates and keys now exist in {:?}",
            self.pki.display().to_string()
        );
        Ok(())
    }
}

/// The host of `host:port` (an IPv6 literal keeps its brackets off).
pub(crate) fn host_of(endpoint: &str) -> &str {
    endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// `kubeadm join phase control-plane-prepare download-certs|certs --config F`:
/// what a control plane needs before it can talk to etcd (the agent's
/// health check and stale-member cleanup come between these and the join).
pub(crate) async fn join_phase(args: &[String]) -> R<()> {
    let usage = || {
        plain_err(
            "the kubeadm stand-in implements only `join phase control-plane-prepare download-certs|certs`",
        )
    };
    let (Some("control-plane-prepare"), Some(sub)) = (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
    ) else {
        return Err(usage());
    };
    let flags = parse_flags(&args[2..], &[("config", true)])?;
    let ctx = join_context(&flags, false).await?;
    match sub {
        "download-certs" => ctx.download_certs().await,
        "certs" => ctx.certs(),
        _ => Err(usage()),
    }
}

pub(crate) async fn join(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("config", true), ("ignore-preflight-errors", true)])?;
    let ctx = join_context(&flags, true).await?;
    let Some(ip) = ctx.ip else {
        return join_worker(
            &ctx.api,
            &ctx.node,
            &ctx.node_ip,
            &ctx.k8s,
            &ctx.ca_path,
            &ctx.found,
            &ctx.cluster_name,
        )
        .await;
    };
    ctx.control_plane()?;
    let (node, k8s, api) = (&ctx.node, &ctx.k8s, &ctx.api);

    println!(
        "[preflight] Running pre-flight checks before initializing the new control plane instance"
    );
    let manifests = k8s.join("manifests");
    let mut pre = Preflight::new(flags.value("ignore-preflight-errors"));
    for f in manifest_files(&manifests) {
        pre.file_available(&f);
    }
    pre.port(&ip, 2379);
    pre.port(&ip, 2380);
    pre.dir_available(&ctx.data_dir);
    pre.finish()?;

    ctx.download_certs().await?;
    ctx.certs()?;
    let control_plane_endpoint = str_at(&ctx.cluster_cfg, "/controlPlaneEndpoint")
        .unwrap_or(&ctx.endpoint)
        .to_string();
    let server = format!("http://{control_plane_endpoint}");
    println!("[kubeconfig] Generating kubeconfig files");
    println!(
        "[kubeconfig] Using kubeconfig folder {:?}",
        k8s.display().to_string()
    );
    for (file, user) in [
        ("admin.conf", "kubernetes-admin"),
        ("controller-manager.conf", "system:kube-controller-manager"),
        ("scheduler.conf", "system:kube-scheduler"),
    ] {
        println!("[kubeconfig] Writing {file:?} kubeconfig file");
        let cfg = kubeconfig(&ctx.cluster_name, &server, &ctx.found.ca_pem, user);
        write_file(&k8s.join(file), format!("{cfg:#}\n").as_bytes(), 0o600)
            .map_err(|e| phase_err("control-plane-prepare/kubeconfig", e))?;
        embed_client_certificate(&k8s.join(file), &k8s.join("pki"), file, &ctx.node)
            .map_err(|e| phase_err("control-plane-prepare/kubeconfig", e))?;
    }
    write_control_plane_manifests(&manifests, "control-plane-prepare/control-plane")?;

    // check-etcd
    println!("[check-etcd] Checking that the etcd cluster is healthy");
    let members = check_etcd(api)
        .await
        .map_err(|e| phase_err("check-etcd", e))?;

    // kubelet-start
    println!(
        "[kubelet-start] Writing kubelet configuration to file \"/var/lib/kubelet/config.yaml\""
    );
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    println!("[kubelet-start] Waiting for the kubelet to perform the TLS Bootstrap");
    write_kubelet_conf(k8s, &ctx.cluster_name, &ctx.found, node)?;
    let node_uid = register(api, node, &ip).await?;

    // control-plane-join/etcd
    let extra = arg_list(
        ctx.cluster_cfg.pointer("/etcd/local/extraArgs"),
        "LocalEtcd.etcd.local.extraArgs",
    )?;
    let member = join_etcd(node, &ip, &ctx.data_dir, k8s, &ctx.pki, &members, &extra).await?;
    create_etcd_mirror_pod(api, node, &node_uid, &ip, &member)
        .await
        .map_err(|e| {
            phase_err(
                "control-plane-join/etcd",
                format!("error creating the etcd mirror Pod: {e}"),
            )
        })?;
    mark_control_plane(api, node).await?;
    println!(
        "\nThis node has joined the cluster and a new control plane instance was created:\n\n\
* Certificate signing request was sent to apiserver and approval was received.\n\
* The Kubelet was informed of the new secure connection details.\n\
* Control plane label and taint were applied to the new node.\n\
* The Kubernetes control plane instances scaled up.\n\
* A new etcd member was added to the local/stacked etcd cluster.\n\n\
To start administering your cluster from this node, you need to run the following as a regular user:\n\n\
\tmkdir -p $HOME/.kube\n\tsudo cp -i {} $HOME/.kube/config\n\tsudo chown $(id -u):$(id -g) $HOME/.kube/config\n\n\
Run 'kubectl get nodes' to see this node join the cluster.\n",
        k8s.join("admin.conf").display()
    );
    Ok(())
}

/// `kubelet-start`: the kubelet's kubeconfig, as its TLS bootstrap leaves
/// it (the node's identity, the discovered API server and CA).
pub(crate) fn write_kubelet_conf(
    k8s: &Path,
    cluster_name: &str,
    found: &Discovered,
    node: &str,
) -> R<()> {
    let kubelet = kubeconfig(
        cluster_name,
        &found.server,
        &found.ca_pem,
        &format!("system:node:{node}"),
    );
    write_file(
        &k8s.join("kubelet.conf"),
        format!("{kubelet:#}\n").as_bytes(),
        0o600,
    )
    .map_err(|e| phase_err("kubelet-start", e))
}

/// `kubelet-start`: the kubelet registers the Node; returns its uid.
pub(crate) async fn register(api: &Api, node: &str, ip: &IpAddr) -> R<String> {
    register_node(api, node, ip).await.map_err(|e| {
        phase_err(
            "kubelet-start",
            format!("error registering node {node:?}: {e}"),
        )
    })
}

pub(crate) async fn join_worker(
    api: &Api,
    node: &str,
    ip: &IpAddr,
    k8s: &Path,
    ca_path: &Path,
    found: &Discovered,
    cluster_name: &str,
) -> R<()> {
    println!(
        "[kubelet-start] Writing kubelet configuration to file \"/var/lib/kubelet/config.yaml\""
    );
    println!("[kubelet-start] Writing kubelet environment file with flags to file \"/var/lib/kubelet/kubeadm-flags.env\"");
    write_file(ca_path, found.ca_pem.as_bytes(), 0o644)
        .map_err(|e| phase_err("kubelet-start", e))?;
    println!("[kubelet-start] Starting the kubelet");
    try_start_kubelet("kubelet-start")?;
    write_kubelet_conf(k8s, cluster_name, found, node)?;
    println!("[kubelet-check] Waiting for a healthy kubelet at http://127.0.0.1:10248/healthz. This can take up to 4m0s");
    println!("[kubelet-start] Waiting for the kubelet to perform the TLS Bootstrap");
    register(api, node, ip).await?;
    println!(
        "\nThis node has joined the cluster:\n\
* Certificate signing request was sent to apiserver and a response was received.\n\
* The Kubelet was informed of the new secure connection details.\n\n\
Run 'kubectl get nodes' on the control-plane to see this node join the cluster.\n"
    );
    Ok(())
}

/// The client URLs of the etcd members, from the etcd mirror Pods.
pub(crate) async fn etcd_endpoints_from_pods(api: &Api) -> Result<Vec<String>, String> {
    let list = api
        .call(
            "GET",
            "/api/v1/namespaces/kube-system/pods?labelSelector=component%3Detcd%2Ctier%3Dcontrol-plane",
            None,
            "application/json",
        )
        .await
        .map_err(|e| format!("could not retrieve the list of etcd endpoints: {e}"))?;
    Ok(list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["metadata"]["annotations"][ETCD_URL_ANNOTATION].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// The member list through the first endpoint that answers.
pub(crate) async fn member_list_via(endpoints: &[String]) -> Result<Vec<Member>, String> {
    let mut last = "no etcd endpoints".to_string();
    for ep in endpoints {
        match etcd_client(std::slice::from_ref(ep)).await {
            Ok(mut c) => match c.member_list().await {
                Ok(resp) => return Ok(resp.members().to_vec()),
                Err(e) => last = format!("{ep}: {}", etcd_msg(&e)),
            },
            Err(e) => last = format!("{ep}: {e}"),
        }
    }
    Err(last)
}

/// kubeadm's check-etcd: every member that has started must answer its
/// status (learners included); a voter that never started is refused here
/// too (the stand-in is stricter than kubeadm, which would fail later with
/// "unhealthy cluster").
pub(crate) async fn check_etcd(api: &Api) -> Result<Vec<Member>, String> {
    let endpoints = etcd_endpoints_from_pods(api).await?;
    if endpoints.is_empty() {
        return Err("could not retrieve the list of etcd endpoints: no etcd Pods with labels component=etcd,tier=control-plane in the \"kube-system\" Namespace".into());
    }
    let members = member_list_via(&endpoints)
        .await
        .map_err(|e| format!("error syncing endpoints with etcd: {e}"))?;
    for m in &members {
        if m.client_urls().is_empty() || m.name().is_empty() {
            if m.is_learner() {
                continue; // kubeadm's Sync() never sees it; member add will refuse
            }
            return Err(format!(
                "etcd cluster is not healthy: member {:x} ({}) has not started",
                m.id(),
                m.peer_urls().join(",")
            ));
        }
        for url in m.client_urls() {
            let ok = async {
                let mut c = etcd_client(std::slice::from_ref(url)).await?;
                c.status().await.map_err(|e| etcd_msg(&e))
            };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(3), ok)
                .await
                .unwrap_or_else(|_| Err("context deadline exceeded".into()))
            {
                return Err(format!(
                    "etcd cluster is not healthy: failed to dial endpoint {url} with maintenance client: {e}"
                ));
            }
        }
    }
    Ok(members)
}

/// control-plane-join/etcd: add this node as a learner (reusing a member
/// already added for its peer URL), start it, promote it. The member's
/// flags are kubeadm's defaults for this node overridden by the cluster's
/// `etcd.local.extraArgs` (upstream: cmd/kubeadm/app/phases/etcd/local.go,
/// `getEtcdCommand`; the peer URL added is always this node's,
/// `etcdutil.GetPeerURL`), so node-specific URLs in the cluster-wide
/// ClusterConfiguration break every join as they do on real nodes.
pub(crate) async fn join_etcd(
    node: &str,
    ip: &IpAddr,
    data_dir: &Path,
    k8s: &Path,
    pki_dir: &Path,
    members: &[Member],
    extra: &[(String, String)],
) -> R<LocalEtcd> {
    let fail = |m: String| {
        phase_err(
            "control-plane-join/etcd",
            format!("error creating local etcd static pod manifest file: {m}"),
        )
    };
    let peer = format!("https://{ip}:2380");
    let extra_get = |n: &str| extra.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let split = |s: Option<String>, default: String| -> Vec<String> {
        s.unwrap_or(default)
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let client = extra_get("advertise-client-urls").unwrap_or_else(|| format!("https://{ip}:2379"));
    let advertised_peer = extra_get("initial-advertise-peer-urls").unwrap_or_else(|| peer.clone());
    let urls = EtcdUrls {
        listen_client: drop_shared_loopback(
            &split(
                extra_get("listen-client-urls"),
                format!("https://127.0.0.1:2379,https://{ip}:2379"),
            ),
            ip,
        ),
        listen_peer: split(extra_get("listen-peer-urls"), peer.clone()),
        client: client.clone(),
        peer: advertised_peer.clone(),
    };
    let voters: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner())
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    let mut etcd = etcd_client(&voters).await.map_err(fail)?;
    let reconfig = knob("KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS", 30_000);

    let existing = members.iter().find(|m| m.peer_urls().contains(&peer));
    let (id, list, learner) = match existing {
        Some(m) => {
            println!(
                "[etcd] Member {:x} with peer URL {peer} already exists; reusing it",
                m.id()
            );
            (m.id(), members.to_vec(), m.is_learner())
        }
        None => {
            println!("[etcd] Adding etcd member as learner: {peer}");
            let deadline = Instant::now() + reconfig;
            let resp = loop {
                let opts = MemberAddOptions::new().with_is_learner();
                match etcd.member_add([peer.as_str()], Some(opts)).await {
                    Ok(r) => break r,
                    Err(e) => {
                        let msg = etcd_msg(&e);
                        if !transient(&msg) || Instant::now() >= deadline {
                            return Err(fail(msg));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            let id = resp
                .member()
                .map(|m| m.id())
                .ok_or_else(|| fail("member add returned no member".into()))?;
            (id, resp.member_list().to_vec(), true)
        }
    };
    let initial_cluster = list
        .iter()
        .filter_map(|m| {
            let url = m.peer_urls().first()?;
            let name = if m.id() == id {
                node.to_string()
            } else if m.name().is_empty() {
                format!("{:x}", m.id())
            } else {
                m.name().to_string()
            };
            Some(format!("{name}={url}"))
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut flags = pki::etcd_tls_flags(pki_dir);
    flags.extend(extra.iter().cloned());
    let member = LocalEtcd {
        name: node.to_string(),
        data_dir: data_dir.to_path_buf(),
        client_url: client.clone(),
        peer_url: advertised_peer.clone(),
        args: etcd_args(node, data_dir, &urls, &initial_cluster, "existing", &flags),
    };
    println!("[etcd] Announced new etcd member joining to the existing etcd cluster");
    write_etcd_manifest(&k8s.join("manifests"), &member, "control-plane-join/etcd")?;
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut child = spawn_etcd(&member, &state_dir).map_err(fail)?;
    println!("[etcd] Waiting for the new etcd member to join the cluster. This can take up to 40s");
    wait_member(&mut child, &client, learner, &state_dir.join("etcd.log"))
        .await
        .map_err(|e| {
            fail(format!(
                "timeout waiting for etcd cluster to be available: {e}"
            ))
        })?;
    if learner {
        let deadline = Instant::now() + knob("KBTEST_KUBEADM_PROMOTE_TIMEOUT_MS", 120_000);
        loop {
            match etcd.member_promote(id).await {
                Ok(_) => break,
                Err(e) => {
                    let msg = etcd_msg(&e);
                    let retry = msg.contains("in sync with leader") || transient(&msg);
                    if !retry || Instant::now() >= deadline {
                        return Err(fail(format!("error promoting member {id:x}: {msg}")));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        println!("[etcd] The learner {id:x} was promoted to a voting member");
        wait_member(&mut child, &client, false, &state_dir.join("etcd.log"))
            .await
            .map_err(|e| {
                fail(format!(
                    "timeout waiting for etcd cluster to be available: {e}"
                ))
            })?;
    }
    Ok(member)
}
