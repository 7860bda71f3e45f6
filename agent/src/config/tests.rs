//! Scenarios for merging and validation. Everything here is pure: layers are
//! built from strings, so each rule is checked without files or IMDS.

use super::merge::nest;
use super::schema::Kind;
use super::*;
use crate::catalogue::Coded;
use std::collections::BTreeMap;

const BASE: &str = r#"
[cluster]
name = "prod-a"
kubernetes_version = "1.31.2"
control_plane_endpoint = "api.prod-a.internal:6443"

[node]
role = "worker"

[aws]
table = "kubeboot-prod"
"#;

const TOKEN: &str = "abcdef.0123456789abcdef";

fn merge_text(texts: &[(Source, &str)], env: &[(&str, &str)]) -> Result<Loaded, Error> {
    let mut problems = Vec::new();
    let mut layers: Vec<Layer> = texts
        .iter()
        .map(|(s, t)| parse_toml(s.clone(), t, &mut problems))
        .collect();
    layers.extend(parse_env(env.iter().copied(), &mut problems));
    merge(&layers, problems)
}

fn problems(r: Result<Loaded, Error>) -> Vec<Problem> {
    match r {
        Err(Error::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected problems, got {other}"),
        Ok(_) => panic!("expected problems, got a valid config"),
    }
}

fn only(r: Result<Loaded, Error>) -> Problem {
    let mut p = problems(r);
    assert_eq!(p.len(), 1, "{p:#?}");
    p.remove(0)
}

fn base_plus(extra: &str) -> String {
    format!("{BASE}\n{extra}")
}

#[test]
fn a_minimal_worker_config_is_valid_and_defaults_are_filled() {
    let loaded = merge_text(&[(Source::File("/c.toml".into()), BASE)], &[]).unwrap();
    let c = &loaded.config;
    assert_eq!(c.cluster.name, "prod-a");
    assert_eq!(c.node.role, Role::Worker);
    assert_eq!(c.lock.lease, std::time::Duration::from_secs(30));
    assert_eq!(c.aws.ssm_prefix, "/kubeboot/prod-a");
    assert_eq!(c.aws.join_secret, "kubeboot/prod-a/join");
    assert_eq!(
        loaded.entries["aws.ssm_prefix"].source,
        Source::Derived("cluster.name")
    );
    assert_eq!(loaded.entries["lock.lease"].source, Source::Default);
    assert_eq!(
        loaded.entries["cluster.name"].source,
        Source::File("/c.toml".into())
    );
}

#[test]
fn syntax_error_names_line_and_column() {
    let p = only(merge_text(
        &[(Source::File("/c.toml".into()), "[cluster]\nname = prod-a\n")],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::Syntax);
    assert!(p.key.starts_with("line 2, column"), "{}", p.key);
    // Only the key: the rest of a broken line may be a secret under any name.
    assert_eq!(p.value.as_deref(), Some("`name = <redacted>`"));
    assert!(p.to_string().contains("file /c.toml"));
}

#[test]
fn syntax_error_on_a_secret_line_does_not_echo_it() {
    let text = format!("[join]\ntoken = {TOKEN}\n");
    let p = problems(merge_text(&[(Source::File("/c.toml".into()), &text)], &[]));
    assert!(p.iter().all(|p| !p.to_string().contains(TOKEN)), "{p:#?}");
}

#[test]
fn unknown_key_suggests_the_near_one() {
    let p = only(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus("[lock]\nleese = \"30s\""),
        )],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::UnknownKey);
    assert_eq!(p.key, "lock.leese");
    assert!(
        p.expected.contains("did you mean `lock.lease`"),
        "{}",
        p.expected
    );
}

#[test]
fn unknown_section_lists_the_known_ones() {
    let p = only(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus("[observability]\nx = 1"),
        )],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::UnknownKey);
    assert!(
        p.expected.contains("cluster") && p.expected.contains("metrics"),
        "{}",
        p.expected
    );
}

#[test]
fn wrong_type_names_key_value_and_form() {
    let p = only(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus("[metrics]\nbuffer = \"1024\""),
        )],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::WrongType);
    assert_eq!(p.key, "metrics.buffer");
    assert_eq!(p.value.as_deref(), Some("\"1024\""));
    assert!(p.expected.contains("whole number from 16 to 100000"));
}

#[test]
fn section_given_as_a_value_is_a_wrong_type() {
    let p = only(merge_text(
        &[(Source::File("/c.toml".into()), &format!("lock = 5\n{BASE}"))],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::WrongType);
    assert_eq!(p.key, "lock");
}

#[test]
fn out_of_range_names_the_bounds() {
    let p = only(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus("[lock]\nlease = \"1s\""),
        )],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::OutOfRange);
    assert_eq!(p.value.as_deref(), Some("\"1s\""));
    assert!(p.expected.contains("from 3s to 10m"), "{}", p.expected);
}

#[test]
fn missing_required_keys_are_all_listed_with_their_env_names() {
    let p = problems(merge_text(
        &[(
            Source::File("/c.toml".into()),
            "[node]\nrole = \"worker\"\n",
        )],
        &[],
    ));
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "cluster.name",
            "cluster.kubernetes_version",
            "cluster.control_plane_endpoint",
            "aws.table"
        ]
    );
    assert!(p.iter().all(|p| p.kind == ProblemKind::Missing));
    assert!(p[0].expected.contains("KUBEBOOT_CLUSTER_NAME"));
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = base_plus(
        "[lock]\nlease = \"1s\"\nleese = 3\n[etcd]\nscheme = \"tcp\"\n[metrics]\nbuffer = true\n",
    );
    let p = problems(merge_text(&[(Source::File("/c.toml".into()), &text)], &[]));
    let kinds: Vec<ProblemKind> = p.iter().map(|p| p.kind).collect();
    assert_eq!(p.len(), 4, "{p:#?}");
    for k in [
        ProblemKind::OutOfRange,
        ProblemKind::UnknownKey,
        ProblemKind::Invalid,
        ProblemKind::WrongType,
    ] {
        assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
    }
}

#[test]
fn conflicting_sources_for_the_cluster_name_are_refused() {
    let p = only(merge_text(
        &[
            (Source::File("/c.toml".into()), BASE),
            (
                Source::UserData("plain body"),
                "[cluster]\nname = \"prod-b\"\n",
            ),
        ],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::Conflict);
    assert_eq!(p.key, "cluster.name");
    assert!(
        p.reason.contains("\"prod-a\" from file /c.toml"),
        "{}",
        p.reason
    );
    assert!(p
        .to_string()
        .starts_with("user-data (plain body): cluster.name = \"prod-b\""));
}

#[test]
fn sources_that_agree_on_the_cluster_name_are_fine() {
    let loaded = merge_text(
        &[
            (Source::File("/c.toml".into()), BASE),
            (
                Source::UserData("plain body"),
                "[cluster]\nname = \"prod-a\"\n",
            ),
        ],
        &[("KUBEBOOT_CLUSTER_NAME", "prod-a")],
    )
    .unwrap();
    assert_eq!(
        loaded.entries["cluster.name"].source,
        Source::Env("KUBEBOOT_CLUSTER_NAME".into())
    );
}

#[test]
fn user_data_cannot_move_the_metadata_endpoint() {
    let p = only(merge_text(
        &[
            (Source::File("/c.toml".into()), BASE),
            (
                Source::UserData("plain body"),
                "[imds]\nendpoint = \"http://10.0.0.1\"\n",
            ),
        ],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::Conflict);
    assert_eq!(p.key, "imds.endpoint");
}

#[test]
fn inconsistent_keys_name_both() {
    let text = base_plus("[lock]\nlease = \"30s\"\nmargin = \"15s\"\n[daemon]\nperiod = \"10s\"\njitter = \"10s\"\n[metrics]\nsink = \"file\"");
    let p = problems(merge_text(&[(Source::File("/c.toml".into()), &text)], &[]));
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["lock.margin", "daemon.jitter", "metrics.sink"],
        "{p:#?}"
    );
    assert!(p.iter().all(|p| p.kind == ProblemKind::Inconsistent));
    assert!(p[0].reason.contains("lock.lease"));
}

#[test]
fn a_waiter_must_outlast_a_dead_holders_lease() {
    let text = base_plus("[lock]\nlease = \"30s\"\nmargin = \"5s\"\nacquire_timeout = \"30s\"");
    let p = only(merge_text(&[(Source::File("/c.toml".into()), &text)], &[]));
    assert_eq!(p.key, "lock.acquire_timeout");
    assert!(p.reason.contains("35s"), "{}", p.reason);
}

#[test]
fn control_planes_with_backups_need_a_bucket() {
    let text = BASE.replace("role = \"worker\"", "role = \"control-plane\"");
    let p = only(merge_text(&[(Source::File("/c.toml".into()), &text)], &[]));
    assert_eq!(p.key, "aws.backup_bucket");
    let ok = format!("{text}\n[backup]\nenabled = false\n");
    assert!(merge_text(&[(Source::File("/c.toml".into()), &ok)], &[]).is_ok());
}

#[test]
fn precedence_is_default_file_dropin_userdata_env() {
    let layers = [
        (Source::File("/c.toml".into()), base_plus("[daemon]\nperiod = \"10s\"\njitter = \"1s\"\nreconcile_grace = \"1m\"\nlifecycle_heartbeat = \"20s\"\n[etcd]\ndial_timeout = \"1s\"")),
        (Source::DropIn("/c.d/10.toml".into()), "[daemon]\njitter = \"2s\"\nreconcile_grace = \"2m\"\nlifecycle_heartbeat = \"30s\"\n".into()),
        (Source::DropIn("/c.d/20.toml".into()), "[daemon]\nreconcile_grace = \"3m\"\nlifecycle_heartbeat = \"40s\"\n".into()),
        (Source::UserData("plain body"), "[daemon]\nlifecycle_heartbeat = \"50s\"\n[etcd]\ndial_timeout = \"2s\"\n".into()),
    ];
    let texts: Vec<(Source, &str)> = layers
        .iter()
        .map(|(s, t)| (s.clone(), t.as_str()))
        .collect();
    let loaded = merge_text(&texts, &[("KUBEBOOT_ETCD_DIAL_TIMEOUT", "3s")]).unwrap();
    let src = |k: &str| loaded.entries[k].source.to_string();
    assert_eq!(src("daemon.period"), "file /c.toml");
    assert_eq!(src("daemon.jitter"), "drop-in /c.d/10.toml");
    assert_eq!(src("daemon.reconcile_grace"), "drop-in /c.d/20.toml");
    assert_eq!(src("daemon.lifecycle_heartbeat"), "user-data (plain body)");
    assert_eq!(src("etcd.dial_timeout"), "env KUBEBOOT_ETCD_DIAL_TIMEOUT");
    assert_eq!(src("etcd.request_timeout"), "default");
    assert_eq!(
        loaded.config.etcd.dial_timeout,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(
        loaded.config.daemon.lifecycle_heartbeat,
        std::time::Duration::from_secs(50)
    );
}

#[test]
fn env_values_are_read_as_the_key_type() {
    let loaded = merge_text(
        &[(Source::File("/c.toml".into()), BASE)],
        &[
            ("KUBEBOOT_AWS_MAX_ATTEMPTS", "7"),
            ("KUBEBOOT_AWS_S3_FORCE_PATH_STYLE", "true"),
            ("KUBEBOOT_AWS_ENDPOINTS_DYNAMODB", "http://127.0.0.1:5000"),
            ("KUBEBOOT_CONFIG", "/ignored/reserved.toml"),
            ("PATH", "/usr/bin"),
        ],
    )
    .unwrap();
    assert_eq!(loaded.config.aws.max_attempts, 7);
    assert!(loaded.config.aws.s3_force_path_style);
    assert_eq!(
        loaded.config.aws.endpoints.dynamodb.as_deref(),
        Some("http://127.0.0.1:5000")
    );
}

#[test]
fn bad_env_values_and_unknown_variables_are_errors() {
    let p = problems(merge_text(
        &[(Source::File("/c.toml".into()), BASE)],
        &[
            ("KUBEBOOT_AWS_MAX_ATTEMPTS", "many"),
            ("KUBEBOOT_LOCK_LEESE", "30s"),
        ],
    ));
    assert_eq!(p.len(), 2, "{p:#?}");
    assert_eq!(p[0].kind, ProblemKind::WrongType);
    assert_eq!(p[0].source, Source::Env("KUBEBOOT_AWS_MAX_ATTEMPTS".into()));
    assert_eq!(p[0].value.as_deref(), Some("\"many\""));
    assert_eq!(p[1].kind, ProblemKind::UnknownKey);
    assert!(
        p[1].expected.contains("KUBEBOOT_LOCK_LEASE"),
        "{}",
        p[1].expected
    );
}

#[test]
fn retired_join_keys_are_refused_by_name_without_their_values() {
    let key = "0f".repeat(32);
    let hash = format!("sha256:{}", "ab".repeat(32));
    let p = problems(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus(&format!(
                "[join]\ntoken = \"{TOKEN}\"\nca_cert_hashes = [\"{hash}\"]\ntokn = \"{TOKEN}\""
            )),
        )],
        &[("KUBEBOOT_JOIN_CERTIFICATE_KEY", &key)],
    ));
    let keys: Vec<(&str, ProblemKind)> = p.iter().map(|p| (p.key.as_str(), p.kind)).collect();
    assert_eq!(
        keys,
        [
            ("join.token", ProblemKind::Retired),
            ("join.ca_cert_hashes", ProblemKind::Retired),
            ("join.tokn", ProblemKind::UnknownKey),
            (
                "KUBEBOOT_JOIN_CERTIFICATE_KEY (join.certificate_key)",
                ProblemKind::Retired
            ),
        ]
    );
    for problem in &p {
        let shown = format!(
            "{problem} {problem:?} {}",
            serde_json::to_string(problem).unwrap()
        );
        assert!(
            !shown.contains(TOKEN) && !shown.contains(&key) && !shown.contains(&hash),
            "{shown}"
        );
        assert!(shown.contains("Secrets Manager"), "{shown}");
    }
}

#[test]
fn unknown_and_misplaced_keys_show_their_type_never_their_value() {
    let secret = "hunter2-Pa55word";
    let p = problems(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus(&format!(
                "[log]\ntokn = \"{secret}\"\n[aws.endpoints]\npassword = [\"{secret}\"]\n[vault]\nsecret = \"{secret}\"\n"
            )),
        )],
        &[("KUBEBOOT_X_PASSWORD", secret)],
    ));
    assert_eq!(p.len(), 4, "{p:#?}");
    for problem in &p {
        let shown = format!("{problem} {}", serde_json::to_string(problem).unwrap());
        assert!(!shown.contains(secret), "{shown}");
        assert_eq!(problem.value, None);
    }
    let reason = |key: &str| p.iter().find(|p| p.key == key).map(|p| p.reason.clone());
    assert!(reason("log.tokn")
        .unwrap()
        .contains("text value is not shown"));
    assert!(reason("aws.endpoints.password")
        .unwrap()
        .contains("array value"));
    assert!(reason("vault").unwrap().contains("table value"));
}

#[test]
fn a_syntax_error_shows_only_what_stands_before_the_equals_sign() {
    let p = only(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus(&format!("[log]\ntokn = \"{TOKEN}\n")),
        )],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::Syntax);
    assert_eq!(p.value.as_deref(), Some("`tokn = <redacted>`"));
}

#[test]
fn many_problems_are_counted_past_the_listed_ones_quickly() {
    let mut text = base_plus("[log]\n");
    for i in 0..100_000 {
        text.push_str(&format!("k{i} = 1\n"));
    }
    // A bound on the complexity, not the speed: linear work takes well under
    // a second here, a quadratic one on 100,000 keys minutes. (It was 5 s and
    // failed once at 5.1 s on a loaded 2-core CI machine.)
    let started = std::time::Instant::now();
    let err = merge_text(&[(Source::File("/c.toml".into()), &text)], &[]).unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let Error::Invalid {
        problems, omitted, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (problems.len(), *omitted),
        (MAX_REPORTED, 100_000 - MAX_REPORTED)
    );
    assert_eq!(
        err.to_string(),
        "configuration is invalid (100000 problems)"
    );
}

#[test]
fn values_and_keys_in_problems_are_cut_short() {
    let p = problems(merge_text(
        &[(
            Source::File("/c.toml".into()),
            &base_plus(&format!(
                "[log]\nlevel = \"{}\"\n{} = 1\n",
                "v".repeat(100_000),
                "k".repeat(100_000)
            )),
        )],
        &[],
    ));
    for problem in &p {
        assert!(problem.to_string().len() < 1000, "{problem}");
    }
    let deep = format!(
        "[log]\nlevel = {}1{}\n",
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let p = only(merge_text(
        &[(Source::File("/c.toml".into()), &base_plus(&deep))],
        &[],
    ));
    assert_eq!(p.kind, ProblemKind::Syntax);
    assert!(p.reason.contains("nested deeper than"), "{p}");
}

#[test]
fn the_typed_model_mirrors_every_schema_key() {
    // Every key set at once: deny_unknown_fields on the model fails for a key
    // the model lacks, and a model field without a key fails as missing.
    let mut entries = BTreeMap::new();
    for key in schema::KEYS {
        let value = match (key.default, key.kind) {
            (Some(lit), _) => toml::Value::deserialize_literal(lit).unwrap(),
            (None, Kind::SsmPrefix) => "/x/y".into(),
            (None, Kind::Region) => "eu-west-1".into(),
            (None, Kind::AwsUrl) => "http://127.0.0.1:1".into(),
            (None, Kind::IssuerUrl) => "https://oidc.example.com/a".into(),
            (None, Kind::RoleArn) => "arn:aws:iam::111122223333:role/a".into(),
            (None, Kind::AbsPath) => "/x".into(),
            (None, Kind::HostPort) => "h:1".into(),
            (None, Kind::KubeVersion) => "1.31.2".into(),
            (None, Kind::OneOf(words)) => words[0].into(),
            (None, _) => "abc".into(),
        };
        assert!(
            value::check(key.kind, &value).is_ok(),
            "{} sample does not validate",
            key.path
        );
        entries.insert(
            key.path,
            Entry {
                value,
                source: Source::Default,
            },
        );
    }
    let config: Config = nest(&entries).try_into().unwrap();
    assert!(config.aws.endpoints.sts.is_some());
}

#[test]
fn every_default_validates() {
    for key in schema::KEYS {
        if let Some(lit) = key.default {
            let v = toml::Value::deserialize_literal(lit)
                .unwrap_or_else(|| panic!("{} default {lit}", key.path));
            assert!(
                value::check(key.kind, &v).is_ok(),
                "{} default {lit} fails its own check",
                key.path
            );
        }
    }
}

#[test]
fn a_problem_reads_as_one_actionable_line() {
    let p = only(merge_text(
        &[(
            Source::File("/etc/kubeboot/config.toml".into()),
            &base_plus("[lock]\nlease = \"1s\""),
        )],
        &[],
    ));
    assert_eq!(
        p.to_string(),
        "file /etc/kubeboot/config.toml: lock.lease = \"1s\": out of range; expected a duration from 3s to 10m \
         such as \"500ms\", \"30s\", \"5m\", \"6h\", \"1h30m\""
    );
}

mod load {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn drop_ins_apply_in_lexical_order_and_user_data_file_is_merged() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", BASE);
        write(
            dir.path(),
            "config.d/20-b.toml",
            "[daemon]\nperiod = \"20s\"\n",
        );
        write(
            dir.path(),
            "config.d/10-a.toml",
            "[daemon]\nperiod = \"10s\"\n",
        );
        write(dir.path(), "config.d/README", "not toml, ignored");
        let ud = write(
            dir.path(),
            "user-data",
            &format!(
                "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\n--B\nContent-Type: {}\n\n[node]\nrole = \"control-plane\"\n[backup]\nenabled = false\n--B--\n",
                userdata::CONTENT_TYPE
            ),
        );
        let opts = LoadOptions {
            path,
            user_data: UserData::File(ud),
            env: vec![],
        };
        let loaded = load_offline(&opts).await.unwrap();
        assert_eq!(
            loaded.config.daemon.period,
            std::time::Duration::from_secs(20)
        );
        assert_eq!(loaded.config.node.role, Role::ControlPlane);
        assert_eq!(
            loaded.entries["node.role"].source,
            Source::UserData("MIME part application/kubeboot+toml")
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_a_usage_error_with_a_hint() {
        let opts = LoadOptions {
            path: "/nonexistent/kubeboot.toml".into(),
            user_data: UserData::Skip,
            env: vec![],
        };
        let err = load_offline(&opts).await.unwrap_err();
        assert!(err.is_usage());
        assert!(err.hint().contains("KUBEBOOT_CONFIG"), "{}", err.hint());
    }

    #[tokio::test]
    async fn two_kubeboot_parts_in_user_data_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.toml", BASE);
        let part = format!(
            "--B\nContent-Type: {}\n\n[daemon]\nperiod = \"20s\"\n",
            userdata::CONTENT_TYPE
        );
        let ud = write(
            dir.path(),
            "ud",
            &format!("Content-Type: multipart/mixed; boundary=B\n\n{part}{part}--B--\n"),
        );
        let err = load_offline(&LoadOptions {
            path,
            user_data: UserData::File(ud),
            env: vec![],
        })
        .await
        .unwrap_err();
        let Error::Invalid { problems, .. } = err else {
            panic!("expected problems")
        };
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].kind, ProblemKind::Conflict);
        assert!(
            problems[0].reason.contains("2 parts"),
            "{}",
            problems[0].reason
        );
    }
}

#[test]
fn the_stack_signal_keys_go_together_on_control_planes_only_and_their_values_are_not_shown() {
    let keys = "[aws]\ncloudformation_stack = \"Hidden-Stack\"\ncloudformation_resource = \"HiddenGroup\"\n";
    let cp = BASE.replace("role = \"worker\"", "role = \"control-plane\"")
        + "backup_bucket = \"kubeboot-prod-backups\"\n";
    let file = |text: &str| vec![(Source::File("/c.toml".into()), text.to_string())];
    let run = |layers: Vec<(Source, String)>| {
        let layers: Vec<(Source, &str)> = layers
            .iter()
            .map(|(s, t)| (s.clone(), t.as_str()))
            .collect();
        merge_text(&layers, &[])
    };
    // A control plane with both: valid, typed.
    let mut layers = file(&cp);
    layers.push((Source::File("/ud".into()), keys.to_string()));
    let c = run(layers).expect("valid").config;
    assert_eq!(c.aws.cloudformation_stack.as_deref(), Some("Hidden-Stack"));
    assert_eq!(
        c.aws.cloudformation_resource.as_deref(),
        Some("HiddenGroup")
    );
    // Neither: nothing to signal.
    let c = run(file(&cp)).expect("valid").config;
    assert!(c.aws.cloudformation_stack.is_none() && c.aws.cloudformation_resource.is_none());

    // A worker with them: both refused, by key, without their values.
    let mut layers = file(BASE);
    layers.push((Source::File("/ud".into()), keys.to_string()));
    let p = problems(run(layers));
    let keys_named: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys_named,
        ["aws.cloudformation_stack", "aws.cloudformation_resource"],
        "{p:#?}"
    );
    for problem in &p {
        assert_eq!(problem.kind, ProblemKind::Inconsistent);
        assert_eq!(problem.value, None);
        assert_eq!(problem.source, Source::File("/ud".into()));
        let line = problem.to_string();
        assert!(!line.contains("Hidden"), "{line}");
        assert!(
            line.contains("only control planes signal their stack"),
            "{line}"
        );
        assert!(
            line.contains("expected no aws.cloudformation_* keys on a worker"),
            "{line}"
        );
    }

    // One without the other, either way round.
    for (set, missing) in [
        (
            "cloudformation_stack = \"Hidden-Stack\"",
            "aws.cloudformation_resource",
        ),
        (
            "cloudformation_resource = \"HiddenGroup\"",
            "aws.cloudformation_stack",
        ),
    ] {
        let mut layers = file(&cp);
        layers.push((Source::File("/ud".into()), format!("[aws]\n{set}\n")));
        let p = only(run(layers));
        assert_eq!(p.kind, ProblemKind::Inconsistent);
        assert!(p.reason.contains(&format!("set without {missing}")), "{p}");
        assert!(p.expected.contains("together, or neither"), "{p}");
        assert!(!p.to_string().contains("Hidden"), "{p}");
    }
}
