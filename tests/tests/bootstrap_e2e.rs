//! End to end: the real `kubeboot bootstrap` binary on simulated nodes, real
//! etcd through the kubeadm stand-in, moto as AWS, the API double as the
//! API server.

use kubeboot::registry::Phase;
use kubeboot_tests::simcluster::{NodeRun, SimCluster};

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn assert_ok(runs: &[NodeRun]) {
    for r in runs {
        assert_eq!(
            r.code,
            Some(0),
            "node {} exited {:?} after {:?}:\n{}",
            r.index,
            r.code,
            r.elapsed,
            tail(&r.stderr)
        );
    }
}

fn count(lines: &[String], subcommand: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some(subcommand) && l.ends_with("exit=0"))
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
        count(&kubeadm, "init"),
        1,
        "exactly one kubeadm init:\n{}",
        kubeadm.join("\n")
    );
    assert_eq!(
        count(&kubeadm, "join"),
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

    // Workers registered with the API server.
    let nodes = sim.kubeapi.nodes();
    assert_eq!(nodes.len(), 5, "every node registered");

    // Bootstrap again is a no-op.
    let again = sim.bootstrap(&[0, 3]).await;
    assert_ok(&again);
    assert_eq!(
        sim.kubeadm_invocations().len(),
        kubeadm.len(),
        "a finished node runs kubeadm no more"
    );
}
