//! The cluster add-ons: the first control plane applies the pod network
//! (the repository's addons/flannel.yaml) through the API with server-side
//! apply, the leader applies what init could not, a worker waits for the
//! network past timeouts.node_ready and says why, and every apply is
//! idempotent and fenced by the cluster generation.
//!
//! The API double's kubelets are as strict as real ones: a Node is Ready
//! only once a DaemonSet writing `/etc/cni/net.d` runs on it, with its
//! service account and ConfigMaps present and, for flannel, the node's pod
//! CIDR (the double's node IPAM, from kubeadm-config's podSubnet) inside
//! its `Network`.

use kubeboot::addons::{self, Variables, GENERATION_ANNOTATION};
use kubeboot::catalogue::Coded;
use kubeboot::kubernetes::Kubernetes;
use kubeboot_tests::kubeapi::KubeApi;
use kubeboot_tests::net::http_request;
use kubeboot_tests::simcluster::{
    assert_ok, log_lines, read_stderr, sigterm_and_wait, tail, SimCluster,
};
use kubeboot_tests::workspace::workspace_root;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const FLANNEL_DS: &str = "/apis/apps/v1/namespaces/kube-flannel/daemonsets/kube-flannel-ds";
const FLANNEL_CONFIG: &str = "/api/v1/namespaces/kube-flannel/configmaps/kube-flannel-cfg";

fn vars() -> Variables {
    kubeboot_tests::fixtures::addon_variables()
}

fn repo_addon(name: &str) -> addons::AddOn {
    let path = workspace_root().join("addons").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).expect("manifest");
    addons::parse(name, &path, &text, &vars()).expect("a valid manifest")
}

/// A client of the double as `admin.conf` would make one.
async fn client(api: &KubeApi, dir: &Path) -> Kubernetes {
    let path = dir.join("admin.conf");
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "a",
        "clusters": [{"name": "c", "cluster": {"server": api.url()}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u"}}],
    });
    std::fs::write(&path, kubeconfig.to_string()).expect("kubeconfig");
    Kubernetes::from_kubeconfig(&path, Duration::from_secs(5))
        .await
        .expect("client")
}

fn resource_versions(api: &KubeApi) -> Vec<(String, String)> {
    [
        "daemonsets",
        "configmaps",
        "serviceaccounts",
        "clusterroles",
        "namespaces",
        "deployments",
    ]
    .iter()
    .flat_map(|p| api.list(p, None))
    .map(|o| {
        (
            format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]),
            o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    })
    .collect()
}

fn ready(api: &KubeApi, node: &str) -> bool {
    api.object(&format!("/api/v1/nodes/{node}"))
        .and_then(|n| {
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["status"] == "True")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_are_server_side_idempotent_repairing_and_fenced_by_generation() {
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let kube = client(&api, dir.path()).await;
    let flannel = repo_addon("flannel");
    let autoscaler = repo_addon("cluster-autoscaler");
    let both = [flannel.clone(), autoscaler.clone()];

    let applied = addons::apply(&kube, &both, 1).await.expect("first apply");
    assert_eq!(applied.objects.len(), 12, "{:?}", applied.objects);
    assert_eq!(
        applied.objects[0], "flannel: Namespace kube-flannel",
        "the namespace goes first (the server refuses objects in a missing one)"
    );
    let ds = api.object(FLANNEL_DS).expect("flannel DaemonSet");
    assert_eq!(ds["metadata"]["annotations"][GENERATION_ANNOTATION], "1");
    assert_eq!(ds["metadata"]["managedFields"][0]["manager"], "kubeboot");
    assert_eq!(ds["metadata"]["managedFields"][0]["operation"], "Apply");
    assert_eq!(ds["metadata"]["generation"], 1);
    let patches: Vec<_> = api
        .request_log()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 12);
    assert!(
        patches.iter().all(|r| {
            let q = r.query.as_deref().unwrap_or("");
            q.contains("fieldManager=kubeboot") && q.contains("force=true")
        }),
        "{patches:?}"
    );
    let deployment = api
        .object("/apis/apps/v1/namespaces/kube-system/deployments/cluster-autoscaler")
        .expect("cluster-autoscaler");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("arn:aws:iam::123456789012:role/ca"), "{env}");

    // Unchanged: the server writes nothing.
    let before = resource_versions(&api);
    addons::apply(&kube, &both, 1).await.expect("second apply");
    assert_eq!(resource_versions(&api), before, "an unchanged apply wrote");

    // Deleted behind kubeboot's back: the next apply puts it back.
    assert!(api.delete_object(FLANNEL_DS));
    addons::apply(&kube, &both, 1).await.expect("repair");
    assert!(api.object(FLANNEL_DS).is_some(), "not repaired");

    // A field kubeboot stops applying goes; one another writer added stays.
    api.patch_object(
        FLANNEL_CONFIG,
        &json!({"metadata": {"labels": {"owner": "someone-else"}}}),
    )
    .expect("label");
    let mut trimmed = flannel.clone();
    let config = trimmed
        .objects
        .iter_mut()
        .find(|o| o.kind.kind == "ConfigMap")
        .expect("config");
    config.body["data"]
        .as_object_mut()
        .expect("data")
        .remove("cni-conf.json");
    addons::apply(&kube, &[trimmed], 1).await.expect("trimmed");
    let cm = api.object(FLANNEL_CONFIG).expect("config");
    assert!(cm["data"].get("cni-conf.json").is_none(), "{cm}");
    assert_eq!(cm["metadata"]["labels"]["owner"], "someone-else");

    // Fenced: an object a newer generation applied is not rolled back.
    api.patch_object(
        FLANNEL_DS,
        &json!({"metadata": {"annotations": {GENERATION_ANNOTATION: "5"}}}),
    )
    .expect("stamp");
    let err = addons::apply(&kube, &both, 4)
        .await
        .expect_err("older generation");
    assert_eq!(err.code(), "KB-ADDON-003", "{err}");
    assert!(err.to_string().contains("generation 5"), "{err}");
    assert_eq!(
        api.object(FLANNEL_DS).expect("ds")["metadata"]["annotations"][GENERATION_ANNOTATION],
        "5"
    );
    // A restored cluster's newer generation overwrites the older stamps.
    addons::apply(&kube, &both, 6)
        .await
        .expect("newer generation");
    assert_eq!(
        api.object(FLANNEL_DS).expect("ds")["metadata"]["annotations"][GENERATION_ANNOTATION],
        "6"
    );

    // The API down: KB-ADDON-002, with the API's own code in the hint.
    api.set_unavailable(true);
    let err = addons::apply(&kube, &both, 6).await.expect_err("down");
    assert_eq!(err.code(), "KB-ADDON-002", "{err}");
    assert!(err.hint().contains("KB-KUBE-003"), "{}", err.hint());
    api.set_unavailable(false);

    // A namespace that does not exist is refused, as the real server does.
    let orphan = addons::parse(
        "orphan",
        Path::new("/x/orphan.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: nowhere}\n",
        &vars(),
    )
    .expect("parse");
    let err = addons::apply(&kube, &[orphan], 6)
        .await
        .expect_err("no namespace");
    assert!(
        err.to_string().contains("namespaces \"nowhere\" not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_refuses_apply_requests_the_real_server_refuses() {
    // kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go:
    // PatchOptions validation (no fieldManager: 422), the field manager's
    // version check (another type than the URL: 400), checkName (400).
    let api = KubeApi::start().await;
    let apply = |path: &'static str, body: Value| {
        let url = api.url();
        async move {
            http_request(
                &url,
                "PATCH",
                path,
                &[("content-type", "application/apply-patch+yaml")],
                body.to_string().as_bytes(),
            )
            .await
            .expect("answer")
        }
    };
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"}});
    let r = apply("/api/v1/namespaces/default/configmaps/a", cm.clone()).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("fieldManager: Required value"));
    let r = apply(
        "/api/v1/namespaces/default/configmaps/a?fieldManager=t",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("invalid object type: /v1, Kind=Secret"));
    let r = apply(
        "/api/v1/namespaces/default/configmaps/b?fieldManager=t",
        cm.clone(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("does not match the name on the URL"));
    let r = apply(
        "/api/v1/namespaces/default/configmaps/a?fieldManager=t",
        cm.clone(),
    )
    .await;
    assert_eq!(r.status, 201, "created by apply");
    let r = apply(
        "/api/v1/namespaces/default/configmaps/a?fieldManager=other",
        json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"},
        "data": {"k": "v"}}),
    )
    .await;
    assert_eq!(r.status, 409, "another applier without force conflicts");
    let r = apply(
        "/api/v1/namespaces/default/configmaps/a?fieldManager=other&force=true",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"},
            "data": {"k": "v"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_control_plane_applies_flannel_and_every_node_turns_ready_through_it() {
    let sim = SimCluster::start(1, 1).await;
    let init = sim.bootstrap(&[0]).await;
    assert_ok(&init);
    let applied = log_lines(&init[0].stderr)
        .into_iter()
        .find(|l| l["message"] == "cluster add-ons applied")
        .unwrap_or_else(|| panic!("no add-ons applied:\n{}", tail(&init[0].stderr)));
    assert_eq!(applied["objects"], 6, "{applied}");
    let ds = sim.kubeapi.object(FLANNEL_DS).expect("flannel DaemonSet");
    assert_eq!(ds["metadata"]["annotations"][GENERATION_ANNOTATION], "1");
    let config = sim.kubeapi.object(FLANNEL_CONFIG).expect("flannel config");
    let net: Value =
        serde_json::from_str(config["data"]["net-conf.json"].as_str().expect("net-conf"))
            .expect("json");
    assert_eq!(net["Network"], "10.244.0.0/16", "cluster.pod_subnet");

    assert_ok(&sim.bootstrap(&[1]).await);
    for node in sim.kubeapi.nodes() {
        let name = node["metadata"]["name"].as_str().expect("name");
        assert!(
            ready(&sim.kubeapi, name),
            "{}",
            sim.kubeapi.network_report(name)
        );
        let cidr = node["spec"]["podCIDR"].as_str().expect("a pod CIDR");
        assert!(cidr.starts_with("10.244."), "{cidr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_waits_for_the_pod_network_past_node_ready_and_says_why() {
    let sim = SimCluster::start(1, 1).await;
    // The operator installs the network: kubeboot applies none.
    let out = sim
        .bootstrap_command(&sim.nodes[0])
        .env("KUBEBOOT_ADDONS_POD_NETWORK", "none")
        .output()
        .await
        .expect("init");
    let init = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{}", tail(&init));
    assert!(sim.kubeapi.object(FLANNEL_DS).is_none());

    let started = Instant::now();
    let mut worker = sim
        .bootstrap_command(&sim.nodes[1])
        .env("KUBEBOOT_TIMEOUTS_NODE_READY", "5s")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker");
    let name = loop {
        if let Some(n) = sim
            .kubeapi
            .nodes()
            .into_iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap_or("").to_string())
            .find(|n| !n.is_empty() && sim.kubeapi.nodes().len() == 2 && !ready(&sim.kubeapi, n))
        {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the worker never registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Well past timeouts.node_ready (5s): still waiting, not failed.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker gave up while only the network was missing:\n{}",
        tail(&read_stderr(&mut worker).await)
    );
    assert!(!ready(&sim.kubeapi, &name));
    sim.kubeapi.install_pod_network();
    let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker finishes once the network runs")
        .expect("status");
    let log = read_stderr(&mut worker).await;
    assert!(status.success(), "{}", tail(&log));
    let waiting = log_lines(&log)
        .into_iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("waits for its pod network"))
        })
        .unwrap_or_else(|| panic!("no reason logged:\n{}", tail(&log)));
    assert!(
        waiting["why"]
            .as_str()
            .is_some_and(|w| w.contains("cni plugin not initialized")),
        "{waiting}"
    );
    assert!(ready(&sim.kubeapi, &name));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_applies_the_add_ons_init_could_not() {
    let sim = SimCluster::start(1, 1).await;
    let out = sim
        .bootstrap_command(&sim.nodes[0])
        .env("KUBEBOOT_ADDONS_DIRECTORY", "/nonexistent/addons")
        .output()
        .await
        .expect("init");
    let init = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "an add-on failure fails no init:\n{}",
        tail(&init)
    );
    let warned = log_lines(&init)
        .into_iter()
        .find(|l| l["code"] == "KB-ADDON-001")
        .unwrap_or_else(|| panic!("no KB-ADDON-001:\n{}", tail(&init)));
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert!(sim.kubeapi.object(FLANNEL_DS).is_none());

    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("daemon");
    let deadline = Instant::now() + Duration::from_secs(90);
    while sim.kubeapi.object(FLANNEL_DS).is_none() {
        if Instant::now() > deadline {
            let (_, log) = sigterm_and_wait(&mut daemon).await;
            panic!("the leader never applied the add-ons:\n{}", tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_ok(&sim.bootstrap(&[1]).await);
    let (_, log) = sigterm_and_wait(&mut daemon).await;
    assert!(
        log_lines(&log)
            .iter()
            .any(|l| l["message"] == "cluster add-ons applied"),
        "{}",
        tail(&log)
    );
}

/// The double's kubelets refuse what real ones refuse: a CNI DaemonSet off
/// the host network never starts (its sandbox needs the CNI), one that does
/// not tolerate a NotReady node's `not-ready:NoSchedule` taint is never
/// scheduled there, and flannel without a pod CIDR on the node fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_network_the_kubelet_could_not_run_leaves_the_node_not_ready() {
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let kube = client(&api, dir.path()).await;
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "w1", "labels": {"kubernetes.io/os": "linux"}},
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
            "message": kubeboot_tests::kubeapi::NETWORK_NOT_READY}]}});
    let created = http_request(
        &api.url(),
        "POST",
        "/api/v1/nodes",
        &[("content-type", "application/json")],
        node.to_string().as_bytes(),
    )
    .await
    .expect("create node");
    assert_eq!(created.status, 201);
    let taints = api.object("/api/v1/nodes/w1").expect("node")["spec"]["taints"].clone();
    assert_eq!(
        taints,
        json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}])
    );

    let flannel = repo_addon("flannel");
    let variant = |edit: &dyn Fn(&mut Value)| {
        let mut a = flannel.clone();
        for o in a.objects.iter_mut().filter(|o| o.kind.kind == "DaemonSet") {
            edit(&mut o.body);
        }
        a
    };
    // No pod CIDR yet (no kubeadm-config): flannel cannot run.
    addons::apply(&kube, std::slice::from_ref(&flannel), 1)
        .await
        .expect("apply");
    assert!(!ready(&api, "w1"));
    assert!(
        api.network_report("w1").contains("no pod CIDR"),
        "{}",
        api.network_report("w1")
    );
    // The broken variant replaces the good one before the pod CIDR comes:
    // a good network and a CIDR never meet before the end (once Ready, a
    // kubelet stays Ready while its running network Pod is replaced).
    let off_host = variant(&|ds| {
        ds["spec"]["template"]["spec"]["hostNetwork"] = json!(false);
    });
    addons::apply(&kube, &[off_host], 1).await.expect("apply");
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": json!({"networking": {"podSubnet": "10.244.0.0/16"}}).to_string()}});
    let made = http_request(
        &api.url(),
        "POST",
        "/api/v1/namespaces/kube-system/configmaps",
        &[("content-type", "application/json")],
        config.to_string().as_bytes(),
    )
    .await
    .expect("kubeadm-config");
    assert_eq!(made.status, 201);

    assert!(!ready(&api, "w1"));
    assert!(
        api.network_report("w1").contains("not on the host network"),
        "{}",
        api.network_report("w1")
    );

    let intolerant = variant(&|ds| {
        ds["spec"]["template"]["spec"]["tolerations"] = json!([]);
    });
    addons::apply(&kube, &[intolerant], 1).await.expect("apply");
    assert!(!ready(&api, "w1"));
    assert!(
        api.network_report("w1")
            .contains("node.kubernetes.io/not-ready:NoSchedule"),
        "{}",
        api.network_report("w1")
    );

    // A DaemonSet's selector is immutable, as the API server has it.
    let reselected = variant(&|ds| {
        ds["spec"]["selector"]["matchLabels"]["extra"] = json!("x");
        ds["spec"]["template"]["metadata"]["labels"]["extra"] = json!("x");
    });
    let err = addons::apply(&kube, &[reselected], 1)
        .await
        .expect_err("immutable");
    assert!(err.to_string().contains("field is immutable"), "{err}");

    addons::apply(&kube, &[flannel], 1).await.expect("apply");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ready(&api, "w1") {
        assert!(Instant::now() < deadline, "{}", api.network_report("w1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node = api.object("/api/v1/nodes/w1").expect("node");
    assert_eq!(node["spec"]["podCIDR"], "10.244.0.0/24");
    assert!(node["spec"].get("taints").is_none(), "{node}");
}

/// kubectl, the real client, takes the repository's manifests as they are:
/// a client-side dry run against the API double (which serves the legacy
/// discovery kubectl maps kinds to resources with) reports every object
/// "created (dry run)". The OpenAPI schema check is kubeboot's own, offline
/// (`addons::parse`): the double serves no OpenAPI document, so kubectl's
/// validation is off here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_takes_the_manifests_in_a_client_dry_run() {
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().expect("dir");
    client(&api, dir.path()).await;
    let kubeconfig = dir.path().join("admin.conf");
    for name in ["flannel", "cluster-autoscaler"] {
        let manifest = workspace_root().join("addons").join(format!("{name}.yaml"));
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "--dry-run=client", "--validate=false", "-f"])
            .arg(&manifest)
            .env("HOME", dir.path())
            .output()
            .await
            .expect("kubectl (scripts/setup.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addon = repo_addon(name);
        for object in &addon.objects {
            let resource = format!("{}/{}", object.kind.kind.to_ascii_lowercase(), object.name);
            let line = stdout
                .lines()
                .find(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(&resource.to_ascii_lowercase())
                        || l.contains(&format!("/{} ", object.name))
                })
                .unwrap_or_else(|| panic!("{name}: kubectl did not take {resource}:\n{stdout}"));
            assert!(line.contains("dry run"), "{line}");
        }
        assert_eq!(stdout.lines().count(), addon.objects.len(), "{stdout}");
    }
    assert!(
        api.request_log().iter().all(|r| r.method == "GET"),
        "a client dry run writes nothing"
    );
}

/// A leader whose add-ons fail the same way every turn says so once at
/// error level, not every turn (a one-second period here).
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_reports_an_unchanged_add_on_failure_once() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let mut daemon = sim
        .daemon_command(&sim.nodes[0])
        .env("KUBEBOOT_ADDONS_DIRECTORY", "/nonexistent/addons")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("daemon");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, log) = sigterm_and_wait(&mut daemon).await;
    let turns = log_lines(&log)
        .iter()
        .filter(|l| l["message"] == "leader turn" || l["phase"] == "addons")
        .count();
    let reported: Vec<_> = log_lines(&log)
        .into_iter()
        .filter(|l| l["code"] == "KB-ADDON-001" && l["level"] == "ERROR")
        .collect();
    assert_eq!(reported.len(), 1, "turns seen: {turns}\n{}", tail(&log));
}
