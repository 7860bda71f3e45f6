//! The final error line of every command carries its catalogue code: a
//! `code` field and a `[KB-...]` message prefix, next to the hint and the
//! `explain` pointer. Failures of the command line itself are provoked here.

use crate::common::{examples, kubeboot, run, stderr, BIN};
use std::process::{Command, Output, Stdio};

/// The worker example with `extra` appended, written in `dir`; its path.
fn worker_config(dir: &tempfile::TempDir, extra: &str) -> String {
    let base = std::fs::read_to_string(examples().join("worker.toml")).expect("example");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("{base}\n{extra}")).expect("write");
    path.display().to_string()
}

/// `kubeboot status` with JSON logs, no user-data and `config`.
fn status(config: &str) -> Output {
    kubeboot(&[
        "--log-format",
        "json",
        "status",
        "--no-user-data",
        "--config",
        config,
    ])
}

/// The JSON log lines on stderr.
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stderr(o)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The final error line (JSON), checked for the shape every report has.
fn report_line(o: &Output) -> serde_json::Value {
    let line = json_lines(o).pop().expect("a JSON error line");
    assert_eq!(line["level"], "ERROR", "{line}");
    let code = line["code"].as_str().expect("code field").to_string();
    let message = line["message"].as_str().expect("message");
    assert!(message.starts_with(&format!("[{code}] ")), "{line}");
    assert_eq!(line["explain"], format!("kubeboot explain {code}"));
    assert!(
        line["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{line}"
    );
    line
}

#[test]
fn a_usage_error_carries_its_code_in_json_and_text() {
    let out = kubeboot(&[
        "--log-format",
        "json",
        "lock",
        "release",
        "--purpose",
        "init",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let line = report_line(&out);
    assert_eq!(line["code"], "KB-CLI-001");
    assert_eq!(line["exit_code"], 2);

    let out = kubeboot(&[
        "--log-format",
        "text",
        "lock",
        "release",
        "--purpose",
        "init",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(
        text.contains("ERROR [KB-CLI-001] refusing to release the init lock"),
        "{text}"
    );
    assert!(
        text.contains("explain=\"kubeboot explain KB-CLI-001\""),
        "{text}"
    );
}

#[test]
fn a_host_out_of_file_descriptors_carries_its_code() {
    // Four descriptors: enough to load and log, too few for the runtime.
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=4:4",
        BIN,
        "--log-format",
        "json",
        "explain",
        "--list",
    ]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(report_line(&out)["code"], "KB-CLI-002");
}

#[test]
fn output_that_cannot_be_written_carries_its_code() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut cmd = Command::new(BIN);
    cmd.args(["--log-format", "json", "explain", "--list"])
        .stdout(Stdio::from(full));
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(report_line(&out)["code"], "KB-CLI-003");
}

#[test]
fn an_unknown_code_for_explain_carries_its_code() {
    let out = kubeboot(&["--log-format", "json", "explain", "kb-nope-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(report_line(&out)["code"], "KB-CLI-004");
}

#[test]
fn a_missing_configuration_file_carries_its_code() {
    let out = status("/nonexistent/k.toml");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(report_line(&out)["code"], "KB-CONFIG-002");
}

#[test]
fn every_configuration_problem_is_logged_with_its_own_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = worker_config(&dir, "[lock]\nleese = \"30s\"\nlease = \"11m\"\n");
    let out = status(&path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let lines = json_lines(&out);
    let problem = |key: &str| {
        lines
            .iter()
            .find(|l| l["key"] == key)
            .unwrap_or_else(|| panic!("no line for {key}: {}", stderr(&out)))
            .clone()
    };
    let unknown = problem("lock.leese");
    assert_eq!(unknown["code"], "KB-CONFIG-011");
    assert!(unknown["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("[KB-CONFIG-011] ")));
    assert_eq!(problem("lock.lease")["code"], "KB-CONFIG-013");
    assert_eq!(report_line(&out)["code"], "KB-CONFIG-001");
}

#[test]
fn user_data_from_an_unreachable_imds_carries_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 9; the shortest deadline keeps the test quick.
    let path = worker_config(
        &dir,
        "[imds]\nendpoint = \"http://127.0.0.1:9\"\ndeadline = \"1s\"\n",
    );
    let out = kubeboot(&["--log-format", "json", "config", "show", "--config", &path]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(report_line(&out)["code"], "KB-CONFIG-004");
}

#[test]
fn logging_set_up_twice_has_its_code() {
    // The only test in this process that installs a subscriber.
    let first = kubeboot::telemetry::init_with_writer(
        kubeboot::telemetry::LogFormat::Json,
        "error",
        std::io::sink,
    );
    assert!(first.is_ok(), "{first:?}");
    let err = kubeboot::telemetry::init_with_writer(
        kubeboot::telemetry::LogFormat::Json,
        "error",
        std::io::sink,
    )
    .expect_err("a second subscriber is refused");
    assert_eq!(kubeboot::catalogue::Coded::code(&err), "KB-LOG-002");
}
