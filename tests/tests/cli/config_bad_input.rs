//! Bad configuration input, tried as a new user would, through the real
//! `kubeboot config check`: every case must exit 2, name the key (or file)
//! at fault, never print a secret, keep its output small and finish well
//! within a deadline (a hang detector, not a benchmark). Nothing here needs
//! AWS or instance metadata: a linter works on a laptop, in CI, in Packer.

use kubeboot_tests::imds::Imds;
use kubeboot_tests::workspace::kubeboot_bin;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A hang detector: every case finishes far sooner on any machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// Output beyond this means something was echoed whole.
const MAX_OUTPUT: usize = 32 * 1024;
/// A bootstrap token and a certificate key: they must never be printed.
const TOKEN: &str = "abcdef.0123456789abcdef";
const TOKEN_SECRET: &str = "0123456789abcdef";
const CERT_KEY: &str = "5ec4e75ec4e75ec4e75ec4e75ec4e75ec4e75ec4e75ec4e75ec4e75ec4e75ec4";
const PASSWORD: &str = "hunter2-Pa55word";

/// A valid worker config with a metadata endpoint nothing answers on and the
/// default 5-minute IMDS deadline: a check that waits for IMDS hangs the case.
fn base() -> String {
    "[cluster]\nname = \"lint-a\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"api.internal:6443\"\n\
     [node]\nrole = \"worker\"\n[aws]\ntable = \"kubeboot-lint-a\"\n\
     [imds]\nendpoint = \"http://127.0.0.1:9\"\n"
        .to_string()
}

struct Outcome {
    /// `None` when killed at the deadline (or by a signal).
    code: Option<i32>,
    hung: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs kubeboot with a clean environment plus `env`, killing it at the deadline.
fn kubeboot(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Outcome {
    let started = Instant::now();
    let mut child = Command::new(kubeboot_bin())
        .env_clear()
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubeboot starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let (code, hung) = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break (status.code(), false);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code,
        hung,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        took: started.elapsed(),
    }
}

/// What a case feeds kubeboot.
enum Input {
    /// This text as the config file.
    File(String),
    /// A path that is not a regular file (made by the closure in the temp dir).
    Path(fn(&Path) -> PathBuf),
    /// A valid config plus these bytes as `--user-data FILE`.
    UserData(Vec<u8>),
    /// A valid config plus these environment variables.
    Env(Vec<(&'static str, String)>),
}

struct Case {
    name: &'static str,
    input: Input,
    /// Each must appear in the output (the key path, the file, the form).
    names: &'static [&'static str],
}

fn with(extra: &str) -> Input {
    Input::File(format!("{}{extra}", base()))
}

/// `extra` inside the base's `[aws]` table (a second `[aws]` is a syntax error).
fn in_aws(extra: &str) -> Input {
    Input::File(base().replace(
        "table = \"kubeboot-lint-a\"\n",
        &format!("table = \"kubeboot-lint-a\"\n{extra}"),
    ))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// Unique short key names, so many fit in a small file.
fn key_name(mut i: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    let mut s = String::from("k");
    loop {
        s.push(ALPHABET[i % 26] as char);
        i /= 26;
        if i == 0 {
            return s;
        }
    }
}

fn many_unknown_keys(n: usize) -> String {
    let mut s = base();
    s.push_str("[log]\n");
    for i in 0..n {
        s.push_str(&key_name(i));
        s.push_str("=1\n");
    }
    s
}

fn cases() -> Vec<Case> {
    let deep = format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000));
    let wide = format!(
        "[{}]",
        (0..60_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    vec![
        // Class: secrets under unknown or misplaced keys, and retired keys.
        Case {
            name: "a token under a misspelt key in [join]",
            input: with(&format!("[join]\ntokn = \"{TOKEN}\"\n")),
            names: &["join.tokn"],
        },
        Case {
            name: "a password under an unknown key in a known section",
            input: with(&format!("[aws.endpoints]\npassword = \"{PASSWORD}\"\n")),
            names: &["aws.endpoints.password"],
        },
        Case {
            name: "a secret in an unknown section",
            input: with(&format!("[vault]\nsecret = \"{PASSWORD}\"\n")),
            names: &["vault"],
        },
        Case {
            name: "a token in a misplaced section (join.token under [aws])",
            input: with(&format!("[aws.join]\ntoken = \"{TOKEN}\"\n")),
            names: &["aws.join"],
        },
        Case {
            name: "the retired join.token",
            input: with(&format!("[join]\ntoken = \"{TOKEN}\"\n")),
            names: &["join.token", "Secrets Manager"],
        },
        Case {
            name: "the retired join.certificate_key",
            input: with(&format!("[join]\ncertificate_key = \"{CERT_KEY}\"\n")),
            names: &["join.certificate_key", "Secrets Manager"],
        },
        Case {
            name: "the retired join.token from the environment",
            input: Input::Env(vec![("KUBEBOOT_JOIN_TOKEN", TOKEN.into())]),
            names: &["KUBEBOOT_JOIN_TOKEN", "Secrets Manager"],
        },
        Case {
            name: "a syntax error on a line holding a token under an odd key",
            input: with(&format!("[log]\ntokn = \"{TOKEN}\n")),
            names: &["line"],
        },
        Case {
            name: "a secret-ish value of the wrong type under a section name",
            input: in_aws(&format!("endpoints = \"{PASSWORD}\"\n")),
            names: &["aws.endpoints"],
        },
        // Class: endpoint URLs.
        Case {
            name: "an endpoint with two ports",
            input: with("[aws.endpoints]\ndynamodb = \"https://dynamodb.eu-west-1.amazonaws.com:443:443\"\n"),
            names: &["aws.endpoints.dynamodb", "https://"],
        },
        Case {
            name: "an endpoint with an ftp scheme",
            input: with("[aws.endpoints]\ns3 = \"ftp://s3.eu-west-1.amazonaws.com\"\n"),
            names: &["aws.endpoints.s3", "https://"],
        },
        Case {
            name: "an endpoint with an empty label",
            input: with("[aws.endpoints]\nsts = \"https://sts..amazonaws.com\"\n"),
            names: &["aws.endpoints.sts"],
        },
        Case {
            name: "an endpoint with credentials in it",
            input: with(&format!("[aws.endpoints]\nssm = \"https://admin:{PASSWORD}@ssm.internal\"\n")),
            names: &["aws.endpoints.ssm"],
        },
        Case {
            name: "plain http to a remote Secrets Manager endpoint",
            input: with("[aws.endpoints]\nsecretsmanager = \"http://secretsmanager.eu-west-1.amazonaws.com\"\n"),
            names: &["aws.endpoints.secretsmanager", "https://"],
        },
        Case {
            name: "a queue URL without a scheme",
            input: in_aws("lifecycle_queue_url = \"sqs.eu-west-1.amazonaws.com/123456789012/q\"\n"),
            names: &["aws.lifecycle_queue_url"],
        },
        Case {
            name: "an https metadata endpoint (IMDS serves http only)",
            input: with("[imds]\nendpoint = \"https://169.254.169.254\"\n").replace_imds(),
            names: &["imds.endpoint", "http://"],
        },
        Case {
            name: "a metrics agent endpoint with a bad port",
            input: with("[metrics]\nagent_endpoint = \"tcp://127.0.0.1:99999\"\n"),
            names: &["metrics.agent_endpoint"],
        },
        Case {
            name: "an endpoint override from the environment that is no URL",
            input: Input::Env(vec![("KUBEBOOT_AWS_ENDPOINTS_EC2", "ec2 endpoint".into())]),
            names: &["KUBEBOOT_AWS_ENDPOINTS_EC2"],
        },
        // Class: a config path that never ends or is no file.
        Case {
            name: "a character device that never ends",
            input: Input::Path(|_| PathBuf::from("/dev/zero")),
            names: &["/dev/zero", "regular file"],
        },
        Case {
            name: "a FIFO nobody writes to",
            input: Input::Path(|dir| {
                let p = dir.join("fifo.toml");
                let ok = Command::new("mkfifo").arg(&p).status().expect("mkfifo");
                assert!(ok.success());
                p
            }),
            names: &["fifo.toml", "regular file"],
        },
        Case {
            name: "a directory",
            input: Input::Path(|dir| {
                let p = dir.join("conf.toml");
                std::fs::create_dir(&p).expect("dir");
                p
            }),
            names: &["conf.toml"],
        },
        Case {
            name: "a file larger than any configuration",
            input: Input::File(format!("{}#{}\n", base(), "x".repeat(3 * 1024 * 1024))),
            names: &["config.toml", "MiB"],
        },
        // Class: counts, depth and length.
        Case {
            name: "300,000 unknown keys",
            input: Input::File(many_unknown_keys(300_000)),
            names: &["config.toml"],
        },
        Case {
            name: "100,000 unknown keys within the size limit",
            input: Input::File(many_unknown_keys(100_000)),
            names: &["log.ka", "more"],
        },
        Case {
            name: "20,000 unknown environment variables",
            input: Input::Env(
                (0..20_000)
                    .map(|i| {
                        let name: &'static str =
                            Box::leak(format!("KUBEBOOT_X{i}").into_boxed_str());
                        (name, PASSWORD.to_string())
                    })
                    .collect(),
            ),
            names: &["KUBEBOOT_X", "more"],
        },
        Case {
            name: "a deeply nested value under an unknown key",
            input: with(&format!("[log]\nnested = {deep}\n")),
            names: &["line"],
        },
        Case {
            name: "a nested value under a known key",
            input: with(&format!("[log]\nlevel = {}\"x\"{}\n", "[".repeat(50), "]".repeat(50))),
            names: &["`level = <redacted>`", "nested deeper"],
        },
        Case {
            name: "a huge array under a known key",
            input: with(&format!("[log]\nlevel = {wide}\n")),
            names: &["log.level"],
        },
        Case {
            name: "a huge array under an unknown key",
            input: with(&format!("[log]\nlevels = {wide}\n")),
            names: &["log.levels"],
        },
        Case {
            name: "a huge string under a known key",
            input: with(&format!("[log]\nlevel = \"{}\"\n", "v".repeat(500_000))),
            names: &["log.level"],
        },
        Case {
            name: "a huge key name",
            input: with(&format!("[log]\n{} = 1\n", "k".repeat(500_000))),
            names: &["log.kkkk"],
        },
        // Class: user-data.
        Case {
            name: "user-data that decompresses past 1 MiB",
            input: Input::UserData(gzip(
                format!("[log]\nlevel = \"debug\"\n#{}\n", "z".repeat(2 * 1024 * 1024)).as_bytes(),
            )),
            names: &["user-data", "MiB"],
        },
        Case {
            name: "user-data holding a token under a misspelt key",
            input: Input::UserData(format!("[join]\ntokn = \"{TOKEN}\"\n").into_bytes()),
            names: &["join.tokn"],
        },
        Case {
            name: "user-data larger than any user-data",
            input: Input::UserData(format!("#{}\n", "u".repeat(3 * 1024 * 1024)).into_bytes()),
            names: &["user-data", "MiB"],
        },
    ]
}

trait ReplaceImds {
    fn replace_imds(self) -> Input;
}

impl ReplaceImds for Input {
    /// The base's own `[imds]` table would clash with the case's.
    fn replace_imds(self) -> Input {
        match self {
            Input::File(text) => {
                Input::File(text.replace("[imds]\nendpoint = \"http://127.0.0.1:9\"\n", ""))
            }
            other => other,
        }
    }
}

#[test]
fn every_bad_input_exits_2_naming_the_key_without_secrets_quickly_and_briefly() {
    let mut failures = Vec::new();
    for case in cases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        let mut env: Vec<(&str, String)> = Vec::new();
        let mut args = vec!["config", "check"];
        let ud_path = dir.path().join("user-data");
        let ud_arg = ud_path.to_string_lossy().into_owned();
        let config = match case.input {
            Input::File(text) => {
                std::fs::write(&config, text).expect("write config");
                config
            }
            Input::Path(make) => make(dir.path()),
            Input::UserData(bytes) => {
                std::fs::write(&config, base()).expect("write config");
                std::fs::write(&ud_path, bytes).expect("write user-data");
                args.extend(["--user-data", ud_arg.as_str()]);
                config
            }
            Input::Env(vars) => {
                std::fs::write(&config, base()).expect("write config");
                env = vars;
                config
            }
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = kubeboot(&args, &config, &env);
        let all = out.all();
        let mut wrong = Vec::new();
        if out.hung {
            wrong.push(format!("still running after {DEADLINE:?}"));
        } else if out.code != Some(2) {
            wrong.push(format!("exit {:?}, not 2", out.code));
        }
        for name in case.names {
            if !all.contains(name) {
                wrong.push(format!("{name:?} not named"));
            }
        }
        for secret in [TOKEN_SECRET, CERT_KEY, PASSWORD] {
            if all.contains(secret) {
                wrong.push(format!("secret {secret:?} printed"));
            }
        }
        if all.len() > MAX_OUTPUT {
            wrong.push(format!("{} bytes of output", all.len()));
        }
        if !wrong.is_empty() {
            let head: String = all.chars().take(1500).collect();
            failures.push(format!(
                "{}: {} (took {:?})\n{head}",
                case.name,
                wrong.join(", "),
                out.took
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad inputs handled wrongly:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn config_check_reports_the_files_problems_without_waiting_for_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    // Nothing answers on 127.0.0.1:9 and the IMDS deadline is the default 5 minutes.
    std::fs::write(&config, format!("{}[log]\nlevel = \"loud\"\n", base())).expect("write");
    let bad = kubeboot(&["config", "check"], &config, &[]);
    assert!(!bad.hung, "still running after {DEADLINE:?}: {}", bad.all());
    assert_eq!(bad.code, Some(2), "{}", bad.all());
    assert!(bad.stdout.contains("log.level"), "{}", bad.all());

    std::fs::write(&config, base()).expect("write");
    let good = kubeboot(&["config", "check"], &config, &[]);
    assert_eq!(good.code, Some(0), "{}", good.all());
    assert!(
        good.stdout.contains("user-data not merged"),
        "the output says what was not checked: {}",
        good.all()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn asked_for_user_data_a_syntax_error_still_exits_2_when_metadata_fails() {
    let imds = Imds::start().await;
    imds.fail_next(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let text = base().replace(
        "[imds]\nendpoint = \"http://127.0.0.1:9\"\n",
        &format!(
            "[imds]\nendpoint = \"{}\"\ndeadline = \"2s\"\nrequest_timeout = \"500ms\"\n",
            imds.endpoint()
        ),
    );
    std::fs::write(&config, format!("{text}[log\nlevel = \"info\"\n")).expect("write");
    let out = tokio::task::spawn_blocking(move || {
        kubeboot(&["config", "check", "--with-user-data"], &config, &[])
    })
    .await
    .expect("join");
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stdout.contains("TOML syntax error"), "{}", out.all());
    assert!(
        out.all().contains("user-data"),
        "says user-data could not be read: {}",
        out.all()
    );
}

/// The codes of the new refusals, on the operator's screen.
#[test]
fn refusals_of_unreadable_oversized_and_retired_input_carry_their_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = kubeboot(&["config", "check"], Path::new("/dev/zero"), &[]);
    assert!(device.stderr.contains("KB-CONFIG-006"), "{}", device.all());

    let big = dir.path().join("big.toml");
    std::fs::write(
        &big,
        format!("{}#{}\n", base(), "x".repeat(2 * 1024 * 1024)),
    )
    .expect("write");
    let big = kubeboot(&["config", "check"], &big, &[]);
    assert!(big.stderr.contains("KB-CONFIG-007"), "{}", big.all());

    let retired = dir.path().join("retired.toml");
    std::fs::write(&retired, format!("{}[join]\ntoken = \"{TOKEN}\"\n", base())).expect("write");
    let retired = kubeboot(&["config", "check"], &retired, &[]);
    assert!(
        retired.stdout.contains("KB-CONFIG-018"),
        "{}",
        retired.all()
    );
    assert_eq!(retired.code, Some(2));
}
