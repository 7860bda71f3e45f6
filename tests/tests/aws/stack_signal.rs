//! A control plane signals its CloudFormation stack once bootstrap has
//! confirmed and recorded its etcd member, so the control-plane group's
//! rolling update (MaxBatchSize 1, WaitOnResourceSignals) replaces one
//! control plane at a time. The real `kubeboot bootstrap` on a simulated
//! node; SignalResource answered like CloudFormation by
//! `kubeboot_tests::cfn_signal` behind the AWS proxy (moto lacks it).

use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::cfn_signal::{SignalCall, StackSignals};
use kubeboot_tests::simcluster::{log_lines, tail, NodeRun, SimCluster};
use kubeboot_tests::workspace::kubeboot_bin;
use std::time::Instant;

const STACK: &str = "kubeboot-sim";
const GROUP: &str = "ControlPlaneGroup";

/// The control planes' user-data as the template writes it: the role and
/// the stack keys.
fn control_plane_user_data() -> Vec<u8> {
    format!(
        "Content-Type: multipart/mixed; boundary=\"//\"\nMIME-Version: 1.0\n\n\
         --//\nContent-Type: application/kubeboot+toml\n\n[node]\nrole = \"control-plane\"\n\n\
         [aws]\ncloudformation_stack = \"{STACK}\"\ncloudformation_resource = \"{GROUP}\"\n--//--\n"
    )
    .into_bytes()
}

struct Fixture {
    sim: SimCluster,
    proxy: AwsProxy,
    signals: StackSignals,
}

/// One control plane whose user-data names the stack; CloudFormation (the
/// double behind the proxy) holds the stack as `status`, its group
/// `awaiting` signals or not.
async fn fixture(status: &str, awaiting: bool) -> Fixture {
    let sim = SimCluster::start(1, 0).await;
    sim.nodes[0]
        .imds
        .set_user_data(Some(control_plane_user_data()));
    let proxy = AwsProxy::start(&sim.moto.endpoint()).await;
    let signals = StackSignals::new();
    signals.stack(STACK, status, &[(GROUP, awaiting)]);
    proxy.set_handler(signals.handler());
    Fixture {
        sim,
        proxy,
        signals,
    }
}

/// `kubeboot bootstrap` on node 0 with CloudFormation behind the proxy.
async fn bootstrap(f: &Fixture, env: &[(&str, &str)]) -> NodeRun {
    let mut cmd = f.sim.bootstrap_command(&f.sim.nodes[0]);
    cmd.env("KUBEBOOT_AWS_ENDPOINTS_CLOUDFORMATION", f.proxy.endpoint());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().await.expect("kubeboot runs");
    let run = NodeRun {
        index: 0,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    };
    f.sim.record_output(&run.stderr);
    run
}

fn assert_exit(run: &NodeRun, code: i32) {
    assert_eq!(
        run.code,
        Some(code),
        "bootstrap exited {:?}:\n{}",
        run.code,
        tail(&run.stderr)
    );
}

/// The index of the first log line whose message contains `needle`.
fn line_of(run: &NodeRun, needle: &str) -> Option<usize> {
    log_lines(&run.stderr)
        .iter()
        .position(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
}

/// The log line whose message contains `needle`.
fn line(run: &NodeRun, needle: &str) -> serde_json::Value {
    let i = line_of(run, needle)
        .unwrap_or_else(|| panic!("no log line {needle:?} in\n{}", tail(&run.stderr)));
    log_lines(&run.stderr).swap_remove(i)
}

fn assert_signal(call: &SignalCall, instance_id: &str) {
    assert_eq!(call.stack.as_deref(), Some(STACK), "{call:?}");
    assert_eq!(call.resource.as_deref(), Some(GROUP), "{call:?}");
    assert_eq!(call.unique_id.as_deref(), Some(instance_id), "{call:?}");
    assert_eq!(call.status.as_deref(), Some("SUCCESS"), "{call:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_signals_success_once_after_its_member_is_confirmed_and_never_again() {
    let f = fixture("UPDATE_IN_PROGRESS", true).await;
    let instance_id = f.sim.nodes[0].instance_id();
    let run = bootstrap(&f, &[]).await;
    assert_exit(&run, 0);

    let calls = f.signals.calls();
    assert_eq!(calls.len(), 1, "exactly one signal: {calls:#?}");
    assert_signal(&calls[0], &instance_id);
    assert!(calls[0].accepted(), "{calls:#?}");
    assert_eq!(
        f.signals
            .received(STACK, GROUP)
            .get(&instance_id)
            .map(String::as_str),
        Some("SUCCESS")
    );

    // After the member was confirmed and recorded: the record predates the
    // signal, etcd lists the member, and the agent said so first.
    let records = f.sim.registry().await.members().await.expect("records");
    let record = records
        .iter()
        .find(|r| r.instance_id == instance_id)
        .expect("this node's member record");
    assert!(
        record.confirmed_at <= calls[0].at,
        "signalled at {:?}, before the member was recorded at {:?}",
        calls[0].at,
        record.confirmed_at
    );
    let members = f.sim.etcd_members(&[0]).await;
    assert!(
        members
            .iter()
            .any(|m| m.id == record.member_id && m.is_started() && !m.is_learner),
        "{members:?}"
    );
    let confirmed = line_of(&run, "etcd member confirmed and recorded").expect("confirmed");
    let complete = line_of(&run, "bootstrap complete").expect("complete");
    let signalled = line_of(&run, "signalled SUCCESS").expect("signal logged");
    assert!(
        confirmed < complete && complete < signalled,
        "{}",
        tail(&run.stderr)
    );

    // A reboot later — say while a later rolling update waits for its new
    // control plane — finds bootstrap done and must NOT signal: CloudFormation
    // counts any SUCCESS for the group, so an old control plane's would let
    // the update take the next old one before the replacement's member exists.
    f.signals
        .stack(STACK, "UPDATE_IN_PROGRESS", &[(GROUP, true)]);
    let again = bootstrap(&f, &[]).await;
    assert_exit(&again, 0);
    assert!(
        again.stderr.contains("already bootstrapped"),
        "{}",
        tail(&again.stderr)
    );
    let l = line(
        &again,
        "counted this control plane's signal at an earlier start",
    );
    assert_eq!(l["level"], "INFO", "{l}");
    let calls = f.signals.calls();
    assert_eq!(
        calls.len(),
        1,
        "an old control plane signalled again: {calls:#?}"
    );
    assert!(
        f.signals.received(STACK, GROUP).is_empty(),
        "the later update counted an old control plane"
    );
}

/// The node's record of its signal (`<state_dir>/stack-signal.json`).
fn signal_record(f: &Fixture) -> std::path::PathBuf {
    f.sim.nodes[0]
        .dir
        .join("var/lib/kubeboot/stack-signal.json")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_whose_answer_was_lost_is_sent_again_once_and_an_already_counted_answer_ends_it() {
    let f = fixture("UPDATE_IN_PROGRESS", true).await;
    let instance_id = f.sim.nodes[0].instance_id();
    // CloudFormation counts the signal but no answer comes back (every
    // attempt's connection breaks after the request took effect).
    f.proxy
        .set_faults(FaultPlan::always(FaultKind::DropAfterForward).only(&["SignalResource"]));
    let run = bootstrap(&f, &[]).await;
    assert_exit(&run, 0);
    assert_eq!(
        line(&run, "cannot signal the stack")["code"],
        "KB-STACK-002"
    );
    assert_eq!(
        f.signals
            .received(STACK, GROUP)
            .get(&instance_id)
            .map(String::as_str),
        Some("SUCCESS"),
        "counted although the answer was lost"
    );

    // The next start (within the hour) sends it again; CloudFormation says it
    // has it, which ends the matter without a warning.
    f.proxy.clear_faults();
    let again = bootstrap(&f, &[]).await;
    assert_exit(&again, 0);
    let l = line(&again, "already counted");
    assert_eq!(l["level"], "INFO", "{l}");
    assert!(
        line_of(&again, "cannot signal the stack").is_none(),
        "{}",
        tail(&again.stderr)
    );
    let sent = f.signals.calls().len();
    let third = bootstrap(&f, &[]).await;
    assert_exit(&third, 0);
    assert_eq!(f.signals.calls().len(), sent, "answered: never sent again");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_signal_is_not_sent_again_after_the_longest_pause_time() {
    let f = fixture("UPDATE_IN_PROGRESS", true).await;
    f.proxy
        .set_faults(FaultPlan::always(FaultKind::Timeout).only(&["SignalResource"]));
    let run = bootstrap(
        &f,
        &[
            ("KUBEBOOT_AWS_MAX_ATTEMPTS", "1"),
            ("KUBEBOOT_AWS_ATTEMPT_TIMEOUT", "1s"),
        ],
    )
    .await;
    assert_exit(&run, 0);
    assert_eq!(
        line(&run, "cannot signal the stack")["code"],
        "KB-STACK-002"
    );
    f.proxy.clear_faults();
    // Two hours later (the record's first attempt moved back): a later
    // update could only count the resend for another instance.
    let path = signal_record(&f);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("record written before sending"))
            .expect("json");
    assert_eq!(record["answer"], "pending", "{record}");
    let first = record["first_attempt"].as_u64().expect("first_attempt");
    record["first_attempt"] = (first - 7200).into();
    std::fs::write(&path, serde_json::to_vec(&record).expect("json")).expect("write");
    let sent = f.signals.calls().len();
    let later = bootstrap(&f, &[]).await;
    assert_exit(&later, 0);
    assert_eq!(
        f.signals.calls().len(),
        sent,
        "an old control plane signalled a later update"
    );
    let l = line(&later, "more than an hour ago");
    assert_eq!(l["level"], "INFO", "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bootstrap_that_fails_before_its_member_is_confirmed_sends_no_signal() {
    let f = fixture("UPDATE_IN_PROGRESS", true).await;
    // kubeadm cannot be started: init fails after the generation began and
    // before any etcd member exists.
    let failed = bootstrap(&f, &[("KUBEBOOT_BINARIES_KUBEADM", "/nonexistent/kubeadm")]).await;
    assert_exit(&failed, 1);
    assert!(
        failed.stderr.contains("KB-KUBEADM-001"),
        "{}",
        tail(&failed.stderr)
    );
    assert!(
        f.signals.calls().is_empty(),
        "a failed bootstrap signalled: {:#?}",
        f.signals.calls()
    );
    assert!(f.proxy.log_for("SignalResource").is_empty());

    // systemd's restart, with kubeadm back: the member is confirmed, then signalled.
    let run = bootstrap(&f, &[]).await;
    assert_exit(&run, 0);
    let calls = f.signals.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_signal(&calls[0], &f.sim.nodes[0].instance_id());
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_an_update_the_no_signal_expected_answer_leaves_bootstrap_successful() {
    // A scale-out or a replacement outside any stack operation: the stack is
    // UPDATE_COMPLETE and CloudFormation refuses the signal as unexpected.
    let f = fixture("UPDATE_COMPLETE", false).await;
    let run = bootstrap(&f, &[]).await;
    assert_exit(&run, 0);
    let calls = f.signals.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].error_code.as_deref(), Some("ValidationError"));
    let l = line(&run, "the stack expected no signal");
    assert_eq!(l["level"], "INFO", "{l}");
    assert!(
        !run.stderr.contains("KB-STACK-"),
        "an expected answer is no warning:\n{}",
        tail(&run.stderr)
    );
    assert!(!f.sim.nodes[0].metrics_text().contains("StackSignalFailed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_or_unanswered_signal_warns_with_its_code_and_bootstrap_still_succeeds() {
    let f = fixture("UPDATE_IN_PROGRESS", true).await;
    f.signals.deny(STACK);
    let run = bootstrap(&f, &[]).await;
    assert_exit(&run, 0);
    let calls = f.signals.calls();
    assert_eq!(calls.len(), 1, "a refusal is not retried: {calls:#?}");
    assert_eq!(calls[0].error_code.as_deref(), Some("AccessDenied"));
    let l = line(&run, "cannot signal the stack");
    assert_eq!(l["level"], "WARN", "{l}");
    assert_eq!(l["code"], "KB-STACK-001", "{l}");
    assert!(
        l["hint"].as_str().is_some_and(|h| h.contains("rolls back")),
        "{l}"
    );
    assert!(
        run.stderr.contains("node bootstrapped"),
        "{}",
        tail(&run.stderr)
    );
    assert!(f.sim.nodes[0].metrics_text().contains("StackSignalFailed"));
    assert!(f.signals.received(STACK, GROUP).is_empty());

    // CloudFormation throttling past the SDK's attempts (aws.max_attempts 5):
    // KB-STACK-002, and still a successful start.
    f.signals
        .stack(STACK, "UPDATE_IN_PROGRESS", &[(GROUP, true)]);
    f.proxy
        .set_faults(FaultPlan::always(FaultKind::Throttle).only(&["SignalResource"]));
    let again = bootstrap(&f, &[]).await;
    assert_exit(&again, 0);
    let l = line(&again, "cannot signal the stack");
    assert_eq!(l["code"], "KB-STACK-002", "{l}");
    assert_eq!(
        f.proxy.log_for("SignalResource").len(),
        1 + 5,
        "the SDK's 5 attempts"
    );
    assert!(f.signals.received(STACK, GROUP).is_empty());
}

/// `kubeboot config check` on `config` with `user_data`: (exit code, stderr).
fn config_check(config: &str, user_data: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let ud = dir.path().join("user-data");
    std::fs::write(&path, config).expect("config");
    std::fs::write(&ud, user_data).expect("user-data");
    let out = std::process::Command::new(kubeboot_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .args(["--log-format", "text", "config", "check", "--config"])
        .arg(&path)
        .arg("--user-data")
        .arg(&ud)
        .output()
        .expect("kubeboot runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn config_check_refuses_the_stack_keys_on_a_worker_or_one_without_the_other() {
    const BASE: &str = "[cluster]\nname = \"prod-a\"\nkubernetes_version = \"1.31.2\"\n\
        control_plane_endpoint = \"api.prod-a.internal:6443\"\n[aws]\ntable = \"kubeboot-prod-a\"\n\
        backup_bucket = \"kubeboot-prod-a-backups\"\n";
    let keys = "[aws]\ncloudformation_stack = \"Secretive-Stack-Name\"\ncloudformation_resource = \"ControlPlaneGroup\"\n";

    let (code, out) = config_check(BASE, &format!("[node]\nrole = \"control-plane\"\n{keys}"));
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = config_check(BASE, &format!("[node]\nrole = \"worker\"\n{keys}"));
    assert_eq!(code, Some(2), "{out}");
    for needle in [
        "aws.cloudformation_stack",
        "aws.cloudformation_resource",
        "KB-CONFIG-017",
        "only control planes signal their stack",
        "no aws.cloudformation_* keys on a worker",
    ] {
        assert!(out.contains(needle), "{needle:?} not in\n{out}");
    }
    assert!(
        !out.contains("Secretive-Stack-Name"),
        "the value is not shown:\n{out}"
    );

    let (code, out) = config_check(
        BASE,
        "[node]\nrole = \"control-plane\"\n[aws]\ncloudformation_stack = \"prod-a\"\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("aws.cloudformation_stack")
            && out.contains("set without aws.cloudformation_resource"),
        "{out}"
    );

    let (code, out) = config_check(
        BASE,
        "[node]\nrole = \"control-plane\"\n[aws]\ncloudformation_stack = \"1-not-a-stack\"\ncloudformation_resource = \"Control-Plane\"\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("a CloudFormation stack name")
            && out.contains("a CloudFormation logical resource id"),
        "{out}"
    );
}
