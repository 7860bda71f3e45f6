//! `kubeboot restore`: a cluster whose every etcd member is lost is rebuilt
//! from its backup on a fresh control plane (real etcd over https, moto S3,
//! the kubeadm stand-in), and what must change nothing does not.
//!
//! What the real parts refuse, and the doubles refuse too:
//! - `etcdctl snapshot restore` (etcd 3.4, the real tool) refuses an
//!   existing data directory and a file whose trailing sha256 does not
//!   match;
//! - the kubeadm stand-in's init refuses a non-empty etcd data directory
//!   unless `--ignore-preflight-errors=DirAvailable-<path>` names it, as
//!   kubeadm's `DirAvailableCheck` does (kubernetes/kubernetes
//!   `cmd/kubeadm/app/preflight/checks.go`), and reuses a CA it finds in
//!   pki/ (`cmd/kubeadm/app/phases/certs/certs.go`, "Using existing ca
//!   certificate authority");
//! - real etcd started over a restored data directory ignores its
//!   `--initial-cluster` flags and serves the restored keys.

use super::backup::{get_object, kubeboot, put_object, run, write_keys};
use kubeboot_tests::simcluster::{assert_ok, log_lines, tail, SimCluster, SimNode};
use kubeboot_tests::termination::instance_lost;

/// `kubeboot restore <args>` on `node`, with `env`; (exit code, stdout, stderr).
async fn restore(
    sim: &SimCluster,
    node: &SimNode,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut argv = vec!["restore"];
    argv.extend_from_slice(args);
    let mut cmd = sim.kubeadm_command(node, &argv);
    cmd.envs(env.iter().copied());
    run(sim, cmd).await
}

/// Every key the test wrote, with its value, through node `via`.
async fn keys_through(sim: &SimCluster, via: usize) -> Vec<(String, String)> {
    sim.keys(via, "/backup-test/").await
}

/// The cluster's certificate authorities as node `node` holds them.
fn authorities(sim: &SimCluster, node: usize) -> Vec<Vec<u8>> {
    ["ca.crt", "sa.pub", "etcd/ca.crt", "front-proxy-ca.crt"]
        .iter()
        .map(|f| {
            std::fs::read(sim.nodes[node].dir.join("etc/kubernetes/pki").join(f))
                .expect("a CA file")
        })
        .collect()
}

/// Whether anything of a restore reached `node`: its etcd data directory,
/// its pki/ or a download left in its state directory.
fn untouched(node: &SimNode) -> Result<(), String> {
    for path in [
        node.dir.join("var/lib/etcd"),
        node.dir.join("etc/kubernetes/pki/ca.key"),
    ] {
        if path.exists() {
            return Err(format!("{} exists", path.display()));
        }
    }
    let downloads = node.dir.join("var/lib/kubeboot/restore");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if !left.is_empty() {
        return Err(format!("downloads left: {left:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_cluster_is_restored_with_every_key_and_nodes_join_its_new_generation() {
    let mut sim = SimCluster::start(3, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1, 2, 3]).await);
    write_keys(&sim, 10_000, 16).await;
    let written = keys_through(&sim, 0).await;
    assert_eq!(written.len(), 10_000);
    let (code, stdout, stderr) =
        kubeboot(&sim, &sim.nodes[1], &["backup", "now", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let taken: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let key = taken["manifest"]["key"].as_str().expect("key").to_string();
    assert!(
        taken["manifest"]["pki_sha256"].is_string(),
        "the certificates are saved with the snapshot: {taken}"
    );
    let before = sim.registry().await.state().await.expect("state");
    let original = authorities(&sim, 0);

    // Every control plane is lost with its etcd; the worker stays.
    for i in 0..3 {
        instance_lost(&sim, i).await;
    }

    // A fresh control plane restores. The first attempt dies right after
    // starting the new generation: a control plane booting meanwhile must
    // not initialize an empty cluster over it.
    let fresh = sim.add_node("control-plane").await;
    let (code, _, stderr) = restore(
        &sim,
        &sim.nodes[fresh],
        &["--snapshot", "latest"],
        &[("KBTEST_CRASH_AT", "init:after-begin")],
    )
    .await;
    assert_ne!(code, Some(0), "{}", tail(&stderr));
    let cut = sim.registry().await.state().await.expect("state");
    assert_eq!(cut.generation, before.generation + 1);
    assert_eq!(cut.restored_from.as_deref(), Some(key.as_str()));
    let early = sim.add_node("control-plane").await;
    let runs = sim.bootstrap(&[early]).await;
    assert_eq!(runs[0].code, Some(1), "{}", tail(&runs[0].stderr));
    assert!(
        runs[0].stderr.contains("KB-RESTORE-005"),
        "{}",
        tail(&runs[0].stderr)
    );
    assert_eq!(
        sim.registry()
            .await
            .state()
            .await
            .expect("state")
            .generation,
        cut.generation,
        "the refused bootstrap started nothing"
    );

    // Run again, it finishes.
    let (code, stdout, stderr) = restore(
        &sim,
        &sim.nodes[fresh],
        &["--snapshot", "latest", "--output", "json"],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{}", tail(&stderr));
    let done: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(done["manifest"]["key"], key.as_str());
    let state = sim.registry().await.state().await.expect("state");
    assert_eq!(state.phase, kubeboot::registry::Phase::Initialized);
    assert_eq!(state.generation, before.generation + 2);
    assert_eq!(done["generation"], state.generation);
    assert_eq!(state.restored_from.as_deref(), Some(key.as_str()));
    let records = sim.registry().await.members().await.expect("records");
    assert_eq!(
        records
            .iter()
            .map(|r| r.instance_id.clone())
            .collect::<Vec<_>>(),
        [sim.nodes[fresh].instance_id()],
        "only the restored member is recorded"
    );
    assert_eq!(
        keys_through(&sim, fresh).await,
        written,
        "every key is back"
    );
    let init = sim.kubeadm_runs("init", Some(fresh));
    assert!(
        init.last().is_some_and(|i| i
            .args
            .iter()
            .any(|a| a.starts_with("--ignore-preflight-errors=DirAvailable-"))),
        "{init:?}"
    );
    let (code, stdout, _) = kubeboot(&sim, &sim.nodes[fresh], &["status"]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains(&format!("restored from {key}")), "{stdout}");
    // The cluster's authorities are the lost cluster's: its kubelets and
    // ServiceAccount tokens stay valid.
    assert!(
        authorities(&sim, fresh) == original,
        "the CAs were not restored"
    );
    // Run once more by mistake, it refuses: the restored member answers.
    let (code, _, refused) = restore(&sim, &sim.nodes[fresh], &["--snapshot", "latest"], &[]).await;
    assert_eq!(code, Some(1), "{}", tail(&refused));
    assert!(refused.contains("KB-RESTORE-001"), "{}", tail(&refused));
    assert_eq!(
        sim.registry().await.state().await.expect("state"),
        state,
        "the refused run changed nothing"
    );

    // The control plane refused before now joins, with another one and a
    // new worker; the restored keys are on every member.
    let more = sim.add_node("control-plane").await;
    let worker = sim.add_node("worker").await;
    assert_ok(&sim.bootstrap(&[early, more, worker]).await);
    sim.assert_members_are_the_records(&[fresh, early, more], "after the restore")
        .await;
    assert_eq!(keys_through(&sim, more).await.len(), 10_000);
    assert!(sim.has_node_object(&sim.nodes[worker]));
    let logged = log_lines(&stderr);
    assert!(
        logged
            .iter()
            .any(|l| l["message"] == "the snapshot verifies"),
        "{}",
        tail(&stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_that_cannot_be_trusted_or_is_not_needed_changes_nothing() {
    let mut sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0, 1]).await);
    write_keys(&sim, 100, 16).await;
    let (code, stdout, stderr) =
        kubeboot(&sim, &sim.nodes[0], &["backup", "now", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let taken: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let key = taken["manifest"]["key"].as_str().expect("key").to_string();
    let before = sim.registry().await.state().await.expect("state");
    let fresh = sim.add_node("control-plane").await;
    let node = &sim.nodes[fresh];

    // The cluster still answers: refused unless the operator says so.
    let (code, _, stderr) = restore(&sim, node, &["--snapshot", "latest"], &[]).await;
    assert_eq!(code, Some(1), "{}", tail(&stderr));
    assert!(stderr.contains("KB-RESTORE-001"), "{}", tail(&stderr));
    untouched(node).unwrap();
    // A worker never restores.
    let (code, _, stderr) = restore(&sim, &sim.nodes[1], &["--snapshot", "latest"], &[]).await;
    assert_eq!(code, Some(2), "{}", tail(&stderr));
    assert!(stderr.contains("KB-RESTORE-004"), "{}", tail(&stderr));

    // A flipped byte, a cut object, a manifest without certificates.
    let body = get_object(&sim, &key).await;
    let manifest_key = format!("{key}.json");
    let manifest = get_object(&sim, &manifest_key).await;
    let mut flipped = body.clone();
    flipped[body.len() / 3] ^= 0x01;
    let cut = body[..body.len() - 4096].to_vec();
    for (what, damaged, code) in [
        ("a flipped byte", flipped, "KB-BACKUP-004"),
        ("a truncated object", cut, "KB-BACKUP-004"),
    ] {
        put_object(&sim, &key, damaged).await;
        let (exit, _, stderr) = restore(
            &sim,
            node,
            &["--snapshot", &key, "--replace-answering-cluster"],
            &[],
        )
        .await;
        assert_eq!(exit, Some(1), "{what}: {}", tail(&stderr));
        assert!(stderr.contains(code), "{what}: {}", tail(&stderr));
        untouched(node).map_err(|e| format!("{what}: {e}")).unwrap();
    }
    put_object(&sim, &key, body).await;
    let mut without: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest");
    without
        .as_object_mut()
        .expect("object")
        .remove("pki_sha256");
    put_object(&sim, &manifest_key, without.to_string().into_bytes()).await;
    let (exit, _, stderr) = restore(
        &sim,
        node,
        &["--snapshot", "latest", "--replace-answering-cluster"],
        &[],
    )
    .await;
    assert_eq!(exit, Some(1), "{}", tail(&stderr));
    assert!(stderr.contains("KB-BACKUP-006"), "{}", tail(&stderr));
    untouched(node).unwrap();

    let after = sim.registry().await.state().await.expect("state");
    assert_eq!(after, before, "the cluster record is as it was");
    assert!(sim.kubeadm_runs("init", Some(fresh)).is_empty());
    assert!(sim.kubeadm_runs("reset", Some(fresh)).is_empty());
}
