//! `kubeboot etcd members|remove` on a real three-member cluster: the quorum
//! guard refuses what would break quorum, allows removing the dead member,
//! keeps two-member clusters from shrinking, and removes an orphan learner.

use kubeboot_tests::simcluster::{assert_ok, SimCluster, SimNode};
use kubeboot_tests::standin;
use std::time::Duration;

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn kubeboot(node: &SimNode, args: &[&str]) -> Ran {
    let out = tokio::process::Command::new(kubeboot_tests::workspace::kubeboot_bin())
        .env_clear()
        .args(args)
        .args(["--log-format", "text", "--config"])
        .arg(&node.config)
        .output()
        .await
        .expect("kubeboot runs");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn members_json(node: &SimNode) -> serde_json::Value {
    let ran = kubeboot(node, &["etcd", "members", "--output", "json"]).await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    serde_json::from_str(&ran.stdout).expect("members JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quorum_guard_protects_a_cluster_with_a_dead_member() {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2]).await);
    let (n0, n1, n2) = (&sim.nodes[0], &sim.nodes[1], &sim.nodes[2]);

    let all = members_json(n0).await;
    let members = all["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{all:#}");
    assert!(members
        .iter()
        .all(|m| m["healthy"] == true && m["recorded"] == true && m["learner"] == false));

    // Node 2's host dies: its etcd member stops answering.
    let pids = standin::etcd_pids_for(&n2.dir.join("var/lib/etcd"));
    assert!(!pids.is_empty(), "node 2 runs etcd");
    standin::stop_groups(&pids, Duration::ZERO);
    let text = kubeboot(n0, &["etcd", "members"]).await;
    assert!(
        text.stdout.contains("UNHEALTHY") && text.stdout.contains(&n2.instance_id()),
        "{}",
        text.stdout
    );

    // Removing a healthy member now would leave 1 healthy of 2: refused.
    let refused = kubeboot(n0, &["etcd", "remove", &n1.instance_id()]).await;
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("below quorum 2") && refused.stderr.contains("hint"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        members_json(n0).await["members"].as_array().map(Vec::len),
        Some(3)
    );

    // Removing the dead one is what the guard allows.
    let removed = kubeboot(n0, &["etcd", "remove", &n2.instance_id()]).await;
    assert_eq!(removed.code, Some(0), "{}", removed.stderr);
    assert!(
        removed
            .stdout
            .contains("2 voting members left, 2 healthy (quorum 2)")
            && removed.stdout.contains(&format!(
                "deleted the member record of {}",
                n2.instance_id()
            )),
        "{}",
        removed.stdout
    );
    let after = members_json(n0).await;
    assert_eq!(
        after["members"].as_array().map(Vec::len),
        Some(2),
        "{after:#}"
    );
    assert_eq!(
        sim.registry().await.members().await.expect("records").len(),
        2
    );

    // Two voters: refused without --force; and the removed one is unknown now.
    let two = kubeboot(n0, &["etcd", "remove", &n1.instance_id()]).await;
    assert_eq!(two.code, Some(1));
    assert!(
        two.stderr.contains("only 2 voting members"),
        "{}",
        two.stderr
    );
    let again = kubeboot(n0, &["etcd", "remove", &n2.instance_id()]).await;
    assert_eq!(again.code, Some(1));
    assert!(
        again
            .stderr
            .contains("no etcd member or member record matches"),
        "{}",
        again.stderr
    );

    // Bad input is a usage error naming the value and the expected form.
    let bad = kubeboot(n0, &["etcd", "remove", "node-2"]).await;
    assert_eq!(bad.code, Some(2));
    assert!(
        bad.stderr.contains("\"node-2\" is not an instance id"),
        "{}",
        bad.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orphan_learner_is_listed_and_removed_without_touching_quorum() {
    let sim = SimCluster::start(1, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let n0 = &sim.nodes[0];
    let id = sim.add_orphan_learner(0).await;

    let listed = kubeboot(n0, &["etcd", "members"]).await;
    assert!(
        listed.stdout.contains(&format!("{id:016x}  (not started)")),
        "{}",
        listed.stdout
    );
    let removed = kubeboot(n0, &["etcd", "remove", &format!("{id:016x}")]).await;
    assert_eq!(removed.code, Some(0), "{}", removed.stderr);
    assert!(removed.stdout.contains("(learner)"), "{}", removed.stdout);
    let after = members_json(n0).await;
    assert_eq!(
        after["members"].as_array().map(Vec::len),
        Some(1),
        "{after:#}"
    );
}
