//! End to end: the real `kubeboot bootstrap` binary on simulated nodes, real
//! etcd through the kubeadm stand-in, moto as AWS, the API double as the
//! API server.

use kubeboot::registry::Phase;
use kubeboot_tests::simcluster::{assert_ok, tail, SimCluster};

/// Successful kubeadm runs of `command` (a join's phases are not a join).
fn count(sim: &SimCluster, command: &str) -> usize {
    sim.kubeadm_runs(command, None)
        .iter()
        .filter(|r| r.exit == 0)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_control_planes_and_two_workers_boot_at_once_and_form_one_cluster() {
    let sim = SimCluster::start(3, 2).await;
    let runs = sim.bootstrap(&[0, 1, 2, 3, 4]).await;
    assert_ok(&runs);
    for r in &runs {
        eprintln!("node {} bootstrapped in {:?}", r.index, r.elapsed);
    }

    let kubeadm = sim.kubeadm_invocations();
    assert_eq!(
        count(&sim, "init"),
        1,
        "exactly one kubeadm init:\n{}",
        kubeadm.join("\n")
    );
    assert_eq!(
        count(&sim, "join"),
        4,
        "two control-plane and two worker joins:\n{}",
        kubeadm.join("\n")
    );

    let registry = sim.registry().await;
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, Phase::Initialized);
    assert_eq!(state.generation, 1, "no init attempt was abandoned");

    // I2: the records are exactly etcd's voting, started members.
    let members = sim.etcd_members(&[0, 1, 2]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        members.iter().all(|m| m.is_started() && !m.is_learner),
        "{members:?}"
    );
    let records = registry.members().await.expect("records");
    assert_eq!(records.len(), 3, "{records:?}");
    for m in &members {
        let r = records
            .iter()
            .find(|r| r.member_id == m.id)
            .unwrap_or_else(|| panic!("no record for {m:?}"));
        assert_eq!(vec![r.peer_url.clone()], m.peer_urls);
        let node = sim
            .nodes
            .iter()
            .find(|n| n.instance_id() == r.instance_id)
            .expect("record names a node");
        assert_eq!(node.role, "control-plane");
    }

    // Every node registered; workers reported success only once Ready.
    let nodes = sim.kubeapi.nodes();
    assert_eq!(nodes.len(), 5, "every node registered");
    for r in runs.iter().filter(|r| sim.nodes[r.index].role == "worker") {
        assert!(
            r.stderr.contains("node is Ready"),
            "worker {} waited for readiness:\n{}",
            r.index,
            tail(&r.stderr)
        );
    }

    // I6: neither the token nor the certificate key appears in anything the
    // agent printed (its own logs and the kubeadm output it relays).
    let (_, material) = sim.current_join_material().await;
    let mut secrets = vec![material.token.expose().clone()];
    secrets.extend(material.certificate_key.iter().map(|k| k.expose().clone()));
    // The token's secret half alone must not leak either.
    secrets.extend(
        material
            .token
            .expose()
            .split_once('.')
            .map(|(_, s)| s.to_string()),
    );
    for r in &runs {
        for secret in &secrets {
            assert!(
                !r.stdout.contains(secret.as_str()) && !r.stderr.contains(secret.as_str()),
                "node {} printed a join secret",
                r.index
            );
        }
    }

    // Bootstrap again is a no-op.
    let again = sim.bootstrap(&[0, 3]).await;
    assert_ok(&again);
    assert_eq!(
        sim.kubeadm_invocations().len(),
        kubeadm.len(),
        "a finished node runs kubeadm no more"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_holder_dies_mid_init_and_another_control_plane_forms_a_clean_generation() {
    use kubeboot_tests::standin;
    use std::time::{Duration, Instant};
    let sim = SimCluster::start(3, 0).await;
    let node0 = &sim.nodes[0];
    let etcd_dir = node0.dir.join("var/lib/etcd");

    // Node 0 alone starts bootstrap; as soon as its kubeadm init has started
    // etcd and etcd has written its data, the agent is killed -9 and its
    // member with it (the host dies).
    let mut agent = sim.bootstrap_command(node0).spawn().expect("spawn agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pids = standin::etcd_pids_for(&etcd_dir);
        if !pids.is_empty() && etcd_dir.join("member").is_dir() {
            agent.start_kill().expect("kill -9 the agent");
            let _ = agent.wait().await;
            standin::stop_groups(&pids, Duration::ZERO);
            break;
        }
        if let Ok(Some(status)) = agent.try_wait() {
            panic!("node 0 finished ({status}) before it could be killed mid-init");
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never started kubeadm init"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registry = sim.registry().await;
    let state = registry.state().await.expect("state");
    assert_ne!(
        state.phase,
        Phase::Initialized,
        "the dead holder never marked the cluster initialized"
    );

    // The other two boot: one takes over the init lock after the dead
    // holder's lease, starts a new generation and initializes; one joins.
    let runs = sim.bootstrap(&[1, 2]).await;
    assert_ok(&runs);
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, Phase::Initialized);
    assert_eq!(
        state.generation, 2,
        "the interrupted generation 1 was abandoned, not finished"
    );

    // Node 0 comes back: it resets its half-made state and joins. Its etcd
    // data is of its own init, which another run's init replaced (the
    // registry says so): it is reset at once, without waiting
    // etcd.promote_timeout (2 min here) for a member that cannot be adopted.
    let again = sim.bootstrap(&[0]).await;
    assert_ok(&again);
    assert!(
        again[0]
            .stderr
            .contains("local etcd data is of an abandoned generation"),
        "node 0 did not see at once that its data is of an abandoned init:\n{}",
        tail(&again[0].stderr)
    );
    let members = sim.etcd_members(&[1, 2]).await;
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        members.iter().all(|m| m.is_started() && !m.is_learner),
        "{members:?}"
    );
    let records = registry.members().await.expect("records");
    let mut recorded: Vec<u64> = records.iter().map(|r| r.member_id).collect();
    let mut actual: Vec<u64> = members.iter().map(|m| m.id).collect();
    recorded.sort_unstable();
    actual.sort_unstable();
    assert_eq!(
        recorded, actual,
        "records match etcd exactly, no leftover of the dead generation"
    );
    let kubeadm = sim.kubeadm_invocations();
    assert!(
        kubeadm
            .iter()
            .any(|l| l.split_whitespace().nth(2) == Some("reset")),
        "node 0 reset:\n{}",
        kubeadm.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_node_never_becomes_ready_fails_clearly_and_a_restart_only_waits() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    sim.kubeapi
        .set_node_ready_delay(std::time::Duration::from_secs(3600));
    // The pod network is applied, yet the kubelet never finds a CNI
    // configuration: past timeouts.pod_network (the bound while only the
    // network is missing), the worker fails with what the kubelet reports.
    let mut cmd = sim.bootstrap_command(&sim.nodes[1]);
    cmd.env("KUBEBOOT_TIMEOUTS_NODE_READY", "5s")
        .env("KUBEBOOT_TIMEOUTS_POD_NETWORK", "8s");
    let out = cmd.output().await.expect("worker runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", tail(&stderr));
    assert!(
        stderr.contains("has no pod network after 8s")
            && stderr.contains("cni plugin not initialized")
            && stderr.contains("KB-KUBE-005"),
        "the error says what the kubelet reports:\n{}",
        tail(&stderr)
    );

    // The kubelet comes good; systemd's restart only waits, it does not rejoin.
    let worker = sim
        .kubeapi
        .nodes()
        .into_iter()
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .find(|name| {
            sim.kubeapi
                .object(&format!("/api/v1/nodes/{name}"))
                .is_some_and(|n| {
                    n["metadata"]["labels"]
                        .get("node-role.kubernetes.io/control-plane")
                        .is_none()
                })
        })
        .expect("the worker's Node");
    sim.kubeapi
        .patch_object(
            &format!("/api/v1/nodes/{worker}"),
            &serde_json::json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"},
            ]}}),
        )
        .expect("patch the Node");
    let again = sim.bootstrap(&[1]).await;
    assert_ok(&again);
    assert_eq!(count(&sim, "join"), 1, "joined once");
    assert_eq!(
        sim.kubeadm_invocations()
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some("reset"))
            .count(),
        0,
        "never reset"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orphan_learner_is_removed_before_the_next_join_proceeds() {
    let sim = SimCluster::start(2, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let orphan = sim.add_orphan_learner(0).await;

    let runs = sim.bootstrap(&[1]).await;
    assert_ok(&runs);
    assert!(
        runs[0]
            .stderr
            .contains("removing a stale etcd member before joining"),
        "{}",
        tail(&runs[0].stderr)
    );
    let members = sim.etcd_members(&[0, 1]).await;
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members
        .iter()
        .all(|m| m.id != orphan && m.is_started() && !m.is_learner));
}
