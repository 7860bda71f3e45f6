//! Observability end to end: the metrics a real bootstrap and daemon write
//! are valid EMF and say what happened; one init run id ties every node's
//! logs to the init that started the generation; the health monitor sees a
//! member die.

use kubeboot_tests::emf;
use kubeboot_tests::simcluster::{assert_ok, log_lines, tail, SimCluster};
use kubeboot_tests::termination::host_dies;
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Documents that carry `metric`.
fn with_metric<'a>(docs: &'a [Value], metric: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d.get(metric).is_some()).collect()
}

/// Waits until node `index` wrote a health document satisfying `pred`.
async fn wait_health(
    sim: &SimCluster,
    index: usize,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let docs = emf::validate_all(&sim.nodes[index].metrics_text());
        if let Some(d) = with_metric(&docs, "EtcdHealthyMembers")
            .into_iter()
            .rev()
            .find(|d| pred(d))
        {
            return d.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no health document with {what} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_bootstrap_and_the_leaders_health_turns_emit_valid_emf_that_tells_the_story() {
    let sim = SimCluster::start(3, 1).await;
    let runs = sim.bootstrap(&[0, 1, 2, 3]).await;
    assert_ok(&runs);

    let daemon = sim
        .daemon_command(&sim.nodes[0])
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon");
    let healthy = wait_health(&sim, 0, "3 healthy members and a ready API", |d| {
        d["EtcdHealthyMembers"] == 3 && d["ApiServerReady"] == 1
    })
    .await;
    assert_eq!(healthy["EtcdMembers"], 3);
    assert_eq!(healthy["EtcdVoters"], 3);
    assert_eq!(healthy["EtcdLearners"], 0);
    assert_eq!(healthy["NodesReady"], 4, "every node registered Ready");
    assert!(healthy["EtcdDbSize"].as_u64().is_some_and(|b| b > 0));

    // A member's host dies: the next looks report it.
    host_dies(&sim, 2);
    let degraded = wait_health(&sim, 0, "2 healthy members", |d| {
        d["EtcdHealthyMembers"] == 2
    })
    .await;
    assert_eq!(degraded["EtcdMembers"], 3, "the member is still in etcd");

    let pid = nix::unistd::Pid::from_raw(daemon.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = tokio::time::timeout(Duration::from_secs(30), daemon.wait_with_output())
        .await
        .expect("the daemon stops")
        .expect("wait");
    let daemon_err = String::from_utf8_lossy(&out.stderr).into_owned();
    sim.record_output(&daemon_err);
    assert_eq!(out.status.code(), Some(0), "{}", tail(&daemon_err));

    // Every line every node wrote is valid EMF (metrics_documents checks).
    let docs = sim.metrics_documents();
    let names = emf::metric_names(&docs);
    for expected in [
        "BootstrapSuccess",
        "BootstrapDuration",
        "PhaseDuration",
        "LockWait",
        "EtcdMembers",
        "EtcdVoters",
        "EtcdLearners",
        "EtcdHealthyMembers",
        "EtcdDbSize",
        "EtcdLeaderChanges",
        "ApiServerReady",
        "NodesReady",
        "NodesNotReady",
        "JoinMaterialAge",
    ] {
        assert!(names.contains(expected), "no {expected} in {names:?}");
    }
    for name in &names {
        assert!(
            kubeboot::metrics::by_name(name).is_some(),
            "{name} is not in the agent's catalogue (infra alarms read it)"
        );
    }
    // One success per node, by path; every document names its cluster.
    let mut paths: Vec<String> = with_metric(&docs, "BootstrapSuccess")
        .iter()
        .map(|d| d["Path"].as_str().unwrap_or("?").to_string())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "control-plane-join",
            "control-plane-join",
            "init",
            "worker-join"
        ]
    );
    assert!(docs.iter().all(|d| d["ClusterName"] == sim.name.as_str()));
    assert!(with_metric(&docs, "BootstrapFailure").is_empty());
    // Phases are timed without their own code: init's kubeadm run is there.
    assert!(with_metric(&docs, "PhaseDuration")
        .iter()
        .any(|d| d["Phase"] == "kubeadm-init"));

    // Correlation: the init's run id is on the joiners' lines.
    let init_node = paths_run(&runs, &sim, "init");
    let init_run = log_lines(&runs[init_node].stderr)
        .iter()
        .find_map(|l| l["run_id"].as_str().map(str::to_string))
        .expect("the init logs its run id");
    for r in runs.iter().filter(|r| r.index != init_node) {
        let lines = log_lines(&r.stderr);
        assert!(
            lines
                .iter()
                .any(|l| l["init_run_id"] == init_run.as_str() && l["run_id"] != init_run.as_str()),
            "node {} does not name the init run {init_run}:\n{}",
            r.index,
            tail(&r.stderr)
        );
    }
}

/// The index of the run whose success document says `path`.
fn paths_run(runs: &[kubeboot_tests::simcluster::NodeRun], sim: &SimCluster, path: &str) -> usize {
    runs.iter()
        .find(|r| {
            emf::validate_all(&sim.nodes[r.index].metrics_text())
                .iter()
                .any(|d| d.get("BootstrapSuccess").is_some() && d["Path"] == path)
        })
        .map(|r| r.index)
        .expect("a run took the path")
}
