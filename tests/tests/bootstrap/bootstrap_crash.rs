//! The crash matrix (I4): for every checkpoint of each bootstrap path, the
//! agent dies there (abort: no destructors, like kill -9), is restarted, and
//! the cluster converges — one initialized generation, no orphan learner,
//! records exactly etcd's started voting members, every node bootstrapped.

use kubeboot::registry::Phase;
use kubeboot_tests::simcluster::{tail, NodeRun, SimCluster};

fn assert_ok(runs: &[NodeRun], context: &str) {
    for r in runs {
        assert_eq!(
            r.code,
            Some(0),
            "{context}: node {} exited {:?}:\n{}",
            r.index,
            r.code,
            tail(&r.stderr)
        );
    }
}

/// Runs `node` with a crash at `point`; it must die there.
async fn crash(sim: &SimCluster, node: usize, point: &str) {
    let mut cmd = sim.bootstrap_command(&sim.nodes[node]);
    cmd.env("KBTEST_CRASH_AT", point);
    let out = cmd.output().await.expect("agent runs");
    assert!(
        !out.status.success(),
        "node {node} should have crashed at {point}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(point),
        "node {node} crashed elsewhere than {point}:\n{}",
        tail(&stderr)
    );
}

async fn assert_converged(sim: &SimCluster, control_planes: &[usize], point: &str) {
    let registry = sim.registry().await;
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, Phase::Initialized, "{point}");
    let members = sim
        .assert_members_are_the_records(control_planes, point)
        .await;
    assert_eq!(members.len(), control_planes.len(), "{point}: {members:?}");
    let inits = sim
        .kubeadm_invocations()
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some("init") && l.ends_with("exit=0"))
        .count() as u64;
    assert!(
        inits >= 1 && inits <= state.generation,
        "{point}: at most one kubeadm init per generation, and one happened \
         ({inits} inits, generation {})",
        state.generation
    );
    assert!(
        state.generation <= 2,
        "{point}: at most the crashed generation and one more"
    );
}

/// The first control plane crashes during init; everyone (it included) boots.
async fn init_crash(point: &str) {
    let sim = SimCluster::start(3, 1).await;
    crash(&sim, 0, point).await;
    let runs = sim.bootstrap(&[0, 1, 2, 3]).await;
    assert_ok(&runs, point);
    assert_converged(&sim, &[0, 1, 2], point).await;
}

/// A control plane crashes while joining an initialized cluster.
async fn join_crash(point: &str) {
    let sim = SimCluster::start(3, 0).await;
    assert_ok(&sim.bootstrap(&[0]).await, "init");
    crash(&sim, 1, point).await;
    let runs = sim.bootstrap(&[1, 2]).await;
    assert_ok(&runs, point);
    assert_converged(&sim, &[0, 1, 2], point).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_begin_init() {
    init_crash("init:after-begin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_kubeadm_init() {
    init_crash("init:after-kubeadm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_publishing_join_material() {
    init_crash("init:after-publish").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_recording_the_first_member() {
    init_crash("init:after-record").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_marking_initialized_does_not_reset_the_only_member() {
    init_crash("init:after-mark").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_stale_member_cleanup() {
    join_crash("join:after-cleanup").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_kubeadm_join_adopts_the_unrecorded_member() {
    join_crash("join:after-kubeadm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_recording_a_joined_member() {
    join_crash("join:after-record").await;
}

/// Every crash point the agent has is exercised by a test in this file.
#[test]
fn every_crash_point_has_a_scenario() {
    let source = include_str!("bootstrap_crash.rs");
    for point in kubeboot::bootstrap::CRASH_POINTS {
        assert!(
            source.contains(&format!("\"{point}\"")),
            "crash point {point} has no scenario here"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_a_joined_worker_saved_its_checkpoint_resumes_at_readiness() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await, "init");
    crash(&sim, 1, "worker:after-joined").await;
    let runs = sim.bootstrap(&[1]).await;
    assert_ok(&runs, "worker:after-joined");
    assert!(
        runs[0].stderr.contains("waiting for readiness only"),
        "{}",
        tail(&runs[0].stderr)
    );
    let joins = sim.kubeadm_runs("join", None).len();
    assert_eq!(joins, 1, "the restart does not join (or reset) again");
    assert_converged(&sim, &[0], "worker:after-joined").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_a_worker_join() {
    let sim = SimCluster::start(1, 1).await;
    assert_ok(&sim.bootstrap(&[0]).await, "init");
    crash(&sim, 1, "worker:after-kubeadm").await;
    assert_ok(&sim.bootstrap(&[1]).await, "worker:after-kubeadm");
    assert_converged(&sim, &[0], "worker:after-kubeadm").await;
    assert_eq!(
        sim.kubeapi.nodes().len(),
        2,
        "the worker is registered once"
    );
}

/// `kubeadm <command>` runs of one node.
fn invocations_of(sim: &SimCluster, node: usize, command: &str) -> usize {
    sim.kubeadm_runs(command, Some(node)).len()
}

/// The etcd process the stand-in started for `node` (its static Pod).
fn etcd_pid(sim: &SimCluster, node: usize) -> i32 {
    let path = sim.nodes[node]
        .dir
        .join("etc/kubernetes")
        .join(kubeboot_tests::standin::STATE_DIR)
        .join("etcd.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

/// Before: a node whose `kubeadm init` was taken over (it paused past its
/// lease, another node started generation g+1 and finished) came back,
/// confirmed its own one-member etcd and recorded it: two etcd clusters in
/// one registry, and the next leader would "lead" the wrong one. Now the
/// registry says the cluster was initialized by another run than the one
/// its checkpoint names: its member is of an abandoned generation, it is
/// reset at once and joins as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_init_was_taken_over_resets_instead_of_adopting_a_second_cluster() {
    let sim = SimCluster::start(2, 0).await;
    crash(&sim, 0, "init:after-kubeadm").await;
    // Node 0's etcd (a cluster of its own) keeps running; node 1 takes the
    // init lock over once node 0's lease has run out.
    assert_ok(&sim.bootstrap(&[1]).await, "takeover");
    let runs = sim.bootstrap(&[0]).await;
    assert_ok(&runs, "the crashed node again");
    assert!(
        runs[0]
            .stderr
            .contains("local etcd data is of an abandoned generation"),
        "{}",
        tail(&runs[0].stderr)
    );
    assert_eq!(invocations_of(&sim, 0, "reset"), 1, "node 0 was reset");
    assert_converged(&sim, &[0, 1], "init taken over").await;
}

/// Before: after a reboot the bootstrap gave the local etcd 5 s and then ran
/// `kubeadm reset` on the cluster's only member. Now a member recorded as
/// this node's is kept while nobody says it is gone: bootstrap fails (systemd
/// retries), and adopts it once etcd answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_etcd_after_a_reboot_is_never_reset_when_it_is_the_recorded_member() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let sim = SimCluster::start(1, 0).await;
    crash(&sim, 0, "init:after-mark").await;
    let before = sim.etcd_members(&[0]).await;
    let pid = Pid::from_raw(etcd_pid(&sim, 0));
    kill(pid, Signal::SIGSTOP).expect("pause etcd");
    let mut cmd = sim.bootstrap_command(&sim.nodes[0]);
    cmd.env("KUBEBOOT_ETCD_PROMOTE_TIMEOUT", "3s")
        .env("KUBEBOOT_ETCD_DIAL_TIMEOUT", "1s");
    let out = cmd.output().await.expect("agent runs");
    kill(pid, Signal::SIGCONT).expect("resume etcd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", tail(&stderr));
    assert!(stderr.contains("not resetting it"), "{}", tail(&stderr));
    assert_eq!(invocations_of(&sim, 0, "reset"), 0, "nothing was reset");

    let runs = sim.bootstrap(&[0]).await;
    assert_ok(&runs, "etcd answers again");
    assert!(
        runs[0].stderr.contains("its member is adopted"),
        "{}",
        tail(&runs[0].stderr)
    );
    assert_eq!(invocations_of(&sim, 0, "reset"), 0, "nothing was reset");
    let after = sim.etcd_members(&[0]).await;
    assert_eq!(
        before.iter().map(|m| m.id).collect::<Vec<_>>(),
        after.iter().map(|m| m.id).collect::<Vec<_>>(),
        "the same member"
    );
    assert_converged(&sim, &[0], "slow etcd").await;
}
