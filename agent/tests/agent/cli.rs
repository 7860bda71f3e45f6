//! The binary as an operator meets it: exit codes, every problem printed,
//! secrets never shown, help that explains.

use crate::common::{examples, kubeboot_with as kubeboot, stderr, stdout};
use std::path::Path;

const TOKEN: &str = "abcdef.0123456789abcdef";

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn the_example_configs_pass_config_check() {
    for name in ["worker.toml", "control-plane.toml"] {
        let path = examples().join(name);
        let out = kubeboot(
            &[
                "config",
                "check",
                "--no-user-data",
                "--config",
                path.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stdout(&out).starts_with("configuration OK: cluster prod-a"),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn a_broken_config_exits_2_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[cluster]\nname = \"Prod_A\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"api:6443\"\n\
         [node]\nrole = \"wroker\"\n[aws]\ntable = \"t-1\"\nmax_attempts = 0\n[lock]\nleese = \"1m\"\n",
    );
    let out = kubeboot(
        &["config", "check", "--no-user-data", "--config", &path],
        &[("KUBEBOOT_METRICS_BUFFER", "lots")],
    );
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(text.starts_with("configuration has 5 problems:"), "{text}");
    for needle in [
        "cluster.name = \"Prod_A\": invalid value; expected a lowercase DNS label",
        "node.role = \"wroker\": invalid value; expected one of \"control-plane\", \"worker\"",
        "aws.max_attempts = 0: out of range; expected a whole number from 1 to 10",
        "lock.leese: unknown key (its text value is not shown); expected a known key (did you mean `lock.lease`?)",
        "env KUBEBOOT_METRICS_BUFFER: metrics.buffer = \"lots\": wrong type (text)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(text.contains(&format!("file {path}")));
    // Each problem carries its catalogue code, for `kubeboot explain`.
    assert!(
        text.lines()
            .any(|l| l.contains("[KB-CONFIG-011]") && l.contains("lock.leese")),
        "{text}"
    );
}

#[test]
fn config_check_json_output_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[cluster]\nname = 42\n");
    let out = kubeboot(
        &[
            "config",
            "check",
            "--no-user-data",
            "--output",
            "json",
            "--config",
            &path,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ok"], false);
    let first = &v["problems"][0];
    assert_eq!(first["kind"], "wrong-type");
    assert_eq!(first["code"], "KB-CONFIG-012");
    assert_eq!(first["key"], "cluster.name");
    assert_eq!(first["value"], "42");
    assert!(first["source"].as_str().unwrap().starts_with("file "));
}

#[test]
fn a_missing_config_file_exits_2_with_a_hint() {
    let out = kubeboot(
        &["config", "check", "--no-user-data", "--log-format", "json"],
        &[("KUBEBOOT_CONFIG", "/nonexistent/k.toml")],
    );
    assert_eq!(out.status.code(), Some(2));
    let line: serde_json::Value =
        serde_json::from_str(stderr(&out).lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert!(line["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/k.toml"));
    assert!(line["hint"].as_str().unwrap().contains("--config"));
    assert_eq!(line["exit_code"], 2);
}

#[test]
fn config_show_prints_sources_and_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cert_key = "7e".repeat(32);
    let base = std::fs::read_to_string(examples().join("worker.toml")).unwrap();
    let path = write_config(dir.path(), &base);
    let env = [("KUBEBOOT_LOG_LEVEL", "debug")];
    for output in ["text", "json"] {
        let out = kubeboot(
            &[
                "config",
                "show",
                "--no-user-data",
                "--output",
                output,
                "--config",
                &path,
            ],
            &env,
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !all.contains(TOKEN) && !all.contains(&cert_key),
            "secret leaked:\n{all}"
        );
    }
    // The retired [join] keys are refused by name, their values never shown.
    let other = tempfile::tempdir().unwrap();
    let retired = write_config(
        other.path(),
        &format!("{base}\n[join]\ntoken = \"{TOKEN}\"\n"),
    );
    let out = kubeboot(
        &["config", "show", "--no-user-data", "--config", &retired],
        &[("KUBEBOOT_JOIN_CERTIFICATE_KEY", cert_key.as_str())],
    );
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("join.token") && all.contains("KUBEBOOT_JOIN_CERTIFICATE_KEY"),
        "{all}"
    );
    assert!(
        !all.contains(TOKEN) && !all.contains(&cert_key),
        "secret leaked:\n{all}"
    );
    let text = stdout(&kubeboot(
        &["config", "show", "--no-user-data", "--config", &path],
        &env,
    ));
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("cluster.name ").contains(&format!("# file {path}")),
        "{text}"
    );
    assert!(line("log.level ").contains("# env KUBEBOOT_LOG_LEVEL"));
    assert!(line("lock.lease ").contains("# default"));
    assert!(line("aws.ssm_prefix ").contains("\"/kubeboot/prod-a\""));
}

#[test]
fn user_data_from_a_file_is_merged_and_shown_as_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(examples().join("worker.toml")).unwrap();
    let path = write_config(dir.path(), &base);
    let ud = dir.path().join("user-data");
    std::fs::write(&ud, "[daemon]\nperiod = \"45s\"\n").unwrap();
    let out = kubeboot(
        &[
            "config",
            "show",
            "--user-data",
            ud.to_str().unwrap(),
            "--config",
            &path,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("daemon.period"));
    assert!(stdout(&out).lines().any(|l| l.starts_with("daemon.period")
        && l.contains("45s")
        && l.contains("user-data (plain body)")));
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(kubeboot(&["frobnicate"], &[]).status.code(), Some(2));
    assert_eq!(
        kubeboot(
            &["config", "check", "--user-data", "x", "--no-user-data"],
            &[]
        )
        .status
        .code(),
        Some(2)
    );
    let help = kubeboot(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    let text = stdout(&help);
    assert!(
        text.contains("Exit codes:") && text.contains("KUBEBOOT_<SECTION>_<KEY>"),
        "{text}"
    );
    let version = kubeboot(&["--version"], &[]);
    assert_eq!(version.status.code(), Some(0));
    // A workspace build (the test crate enables the failpoints) says so.
    let shown = stdout(&version);
    let plain = format!("kubeboot {}", env!("CARGO_PKG_VERSION"));
    assert!(
        shown.trim() == plain
            || shown.trim() == format!("{plain} (test build: failpoints compiled in)"),
        "{shown}"
    );
}

#[test]
fn unreachable_imds_is_a_restartable_failure_with_a_hint() {
    // Nothing listens on this port; a short deadline keeps the test quick.
    let base = std::fs::read_to_string(examples().join("worker.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{base}\n[imds]\nendpoint = \"http://127.0.0.1:9\"\ndeadline = \"1s\"\n"),
    );
    // `config check` reads user-data through IMDS only when asked to.
    let out = kubeboot(
        &[
            "config",
            "check",
            "--with-user-data",
            "--log-format",
            "text",
            "--config",
            &path,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--no-user-data"), "{}", stderr(&out));
}

/// (class, config text, user-data, env, fragments the report must contain)
type ErrorCase<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    Vec<(&'a str, &'a str)>,
    Vec<&'a str>,
);

#[test]
fn every_class_of_config_error_exits_2_naming_key_value_and_expectation() {
    let base = std::fs::read_to_string(examples().join("worker.toml")).unwrap();
    let cases: Vec<ErrorCase> = vec![
        ("syntax", format!("{base}\n[lock\nlease = \"30s\"\n"), None, vec![], vec!["line 14, column", "TOML syntax error", "expected valid TOML"]),
        ("unknown key", format!("{base}\n[lock]\nleese = \"30s\"\n"), None, vec![], vec!["lock.leese: unknown key (its text value is not shown)", "did you mean `lock.lease`"]),
        ("wrong type", format!("{base}\n[lock]\nlease = 30\n"), None, vec![], vec!["lock.lease = 30: wrong type (integer)", "expected a duration"]),
        ("out of range", format!("{base}\n[lock]\nlease = \"11m\"\n"), None, vec![], vec!["lock.lease = \"11m\": out of range", "from 3s to 10m"]),
        ("missing", base.replace("role = \"worker\"", ""), None, vec![], vec!["no source: node.role: required and not set", "KUBEBOOT_NODE_ROLE"]),
        (
            "conflicting sources",
            base.clone(),
            Some("[cluster]\nname = \"prod-b\"\n"),
            vec![],
            vec!["user-data (plain body): cluster.name = \"prod-b\": conflicts with \"prod-a\" from file"],
        ),
        ("inconsistent", format!("{base}\n[lock]\nlease = \"30s\"\nmargin = \"20s\"\n"), None, vec![], vec!["lock.margin = \"20s\"", "lock.margin <= lock.lease / 3"]),
        ("bad env", base.clone(), None, vec![("KUBEBOOT_DAEMON_PERIOD", "often")], vec!["env KUBEBOOT_DAEMON_PERIOD: daemon.period = \"often\": invalid value"]),
    ];
    for (class, config, user_data, env, fragments) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &config);
        let mut args = vec!["config", "check", "--config", path.as_str()];
        let ud_path = dir.path().join("user-data").display().to_string();
        match user_data {
            Some(ud) => {
                std::fs::write(&ud_path, ud).unwrap();
                args.extend(["--user-data", ud_path.as_str()]);
            }
            None => args.push("--no-user-data"),
        }
        let out = kubeboot(&args, &env);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{class}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let report = stdout(&out);
        for f in fragments {
            assert!(report.contains(f), "{class}: missing {f:?} in\n{report}");
        }
    }
}
