//! The node image (packer/): every download pinned with a checksum, the
//! Kubernetes version it installs equal to the one the agent renders, its
//! install script, and the image booted under real systemd: installed into
//! the machine's root by that script (the kubeadm stand-in and the kubelet
//! double in place of the Kubernetes packages), a worker reads its cluster
//! settings from its launch template's user-data (infra/, served by the
//! IMDS double), joins the simulated cluster, says READY, and the daemon
//! starts after it; an image without its configuration fails loudly.

use crate::systemd_boot::{bootstrap_becomes_active, standin_environment, GUEST_SIM};
use kubeboot::config::model::Role;
use kubeboot_tests::cfn::{cluster_stack, launch_user_data, repo_template, scalar};
use kubeboot_tests::machine::{Machine, Options};
use kubeboot_tests::net::{fresh_loopback_ip, Forwarder, LineSink};
use kubeboot_tests::simcluster::{assert_ok, tail, SimCluster};
use kubeboot_tests::standin;
use kubeboot_tests::workspace::{kubeboot_bin, workspace_root};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOTSTRAP: &str = "kubeboot-bootstrap.service";
const DAEMON: &str = "kubeboot.service";
const JOURNAL: &str = "kubeboot-journal.service";
const UNITS: [&str; 3] = [BOOTSTRAP, DAEMON, JOURNAL];
const ARCHES: [&str; 2] = ["amd64", "arm64"];

fn packer_file(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join("packer").join(path))
        .unwrap_or_else(|e| panic!("packer/{path}: {e}"))
}

fn install_script() -> PathBuf {
    workspace_root().join("packer/scripts/install-kubeboot.sh")
}

/// The template's default for `variable "<name>"`.
fn template_default(name: &str) -> String {
    let text = packer_file("kubeboot.pkr.hcl");
    let block = text
        .split(&format!("variable \"{name}\" {{"))
        .nth(1)
        .unwrap_or_else(|| panic!("kubeboot.pkr.hcl declares no variable {name}"));
    let block = &block[..block.find("\n}").expect("variable block ends")];
    block
        .lines()
        .find_map(|l| l.trim().strip_prefix("default"))
        .and_then(|l| l.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("variable {name} has no default"))
}

/// `out` exited 0; its stderr otherwise.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A row of packer/pins.
#[derive(Debug)]
struct Pin {
    name: String,
    version: String,
    arch: String,
    sha256: String,
    url: String,
}

fn pins() -> Vec<Pin> {
    packer_file("pins")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                f.len(),
                5,
                "packer/pins: '{l}' is not: name version arch sha256 url"
            );
            Pin {
                name: f[0].into(),
                version: f[1].into(),
                arch: f[2].into(),
                sha256: f[3].into(),
                url: f[4].into(),
            }
        })
        .collect()
}

/// The names the provisioning scripts download (`fetch NAME`).
fn fetched() -> BTreeSet<String> {
    let dir = workspace_root().join("packer/scripts");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("packer/scripts") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("script");
        for part in text.split("fetch ").skip(1) {
            let word: String = part
                .trim_start_matches('"')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '$')
                .collect();
            match word.as_str() {
                "" | "NAME" => {}
                "$tool" => names.extend(["kubeadm", "kubelet", "kubectl"].map(String::from)),
                w => {
                    names.insert(w.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn every_download_the_image_makes_is_pinned_with_a_checksum_for_both_architectures() {
    let pins = pins();
    let fetched = fetched();
    assert!(
        fetched.contains("containerd") && fetched.contains("kubeadm"),
        "{fetched:?}"
    );
    for p in &pins {
        assert!(
            p.sha256.len() == 64
                && p.sha256
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{p:?}: the sha256 is not 64 lowercase hex digits"
        );
        assert!(p.url.starts_with("https://"), "{p:?}: not https");
        assert!(ARCHES.contains(&p.arch.as_str()), "{p:?}: unknown arch");
        assert!(
            fetched.contains(&p.name),
            "{p:?}: no script downloads it (a stale pin)"
        );
    }
    for name in &fetched {
        for arch in ARCHES {
            let versions: Vec<&str> = pins
                .iter()
                .filter(|p| &p.name == name && p.arch == arch)
                .map(|p| p.version.as_str())
                .collect();
            assert!(
                !versions.is_empty(),
                "{name} is downloaded but has no pin for {arch}"
            );
            let per_kubernetes_version = ["kubeadm", "kubelet", "kubectl"].contains(&name.as_str());
            assert!(
                per_kubernetes_version || versions.len() == 1,
                "{name} on {arch}: one version, not {versions:?} (lib.sh's pin needs one)"
            );
        }
    }
    // Downloads go through lib.sh's verified fetch; the CloudWatch agent's
    // key and signature are the one exception (checked by fingerprint).
    let dir = workspace_root().join("packer");
    for entry in walk(&dir) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // A download is a command: curl, wget or a language's HTTP client
        // at the start of a command (an apt package list may name curl).
        let downloads = text.lines().any(|l| {
            let l = l.trim_start();
            [
                "curl ",
                "wget ",
                "python3 -c",
                "perl -e",
                "$(curl",
                "| curl",
            ]
            .iter()
            .any(|c| l.starts_with(c) || l.contains(&format!("$({c}")))
                || l.contains("urllib")
        });
        if downloads {
            assert!(
                ["lib.sh", "50-cloudwatch-agent.sh"].contains(&name.as_str()),
                "{}: downloads outside lib.sh's fetch",
                entry.display()
            );
        }
        assert!(!text.contains("wget "), "{}: wget", entry.display());
        if name.ends_with(".sh") {
            assert!(
                text.contains("set -euo pipefail")
                    || text.contains("source \"$(dirname \"$0\")/lib.sh\""),
                "{}: neither set -euo pipefail nor lib.sh (which sets it)",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The launch template's user-data of `role`, loaded by the agent's own
/// loader as a node would (user-data over an empty file).
fn user_data_config(user_data: &str, role: Role) -> kubeboot::config::Config {
    let dir = tempfile::tempdir().expect("dir");
    let (config, data) = (dir.path().join("config.toml"), dir.path().join("user-data"));
    std::fs::write(&config, "").expect("config");
    std::fs::write(&data, user_data).expect("user-data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(kubeboot::config::load_offline(
        &kubeboot::config::LoadOptions {
            path: config,
            user_data: kubeboot::config::UserData::File(data),
            env: vec![],
        },
    ))
    .unwrap_or_else(|e| panic!("{role:?} user-data refused: {e}"))
    .config
}

#[test]
fn the_image_installs_the_kubernetes_version_the_agents_kubeadm_config_renders() {
    let version = template_default("kubernetes_version");
    let template = packer_file("kubeboot.pkr.hcl");
    assert!(
        template.contains("\"KUBERNETES_VERSION=${var.kubernetes_version}\""),
        "the scripts install the template's variable"
    );
    assert!(
        packer_file("scripts/20-kubernetes.sh").contains("fetch \"$tool\" \"$KUBERNETES_VERSION\""),
        "20-kubernetes.sh downloads the version it is given"
    );
    for tool in ["kubeadm", "kubelet", "kubectl"] {
        for arch in ARCHES {
            assert!(
                pins()
                    .iter()
                    .any(|p| p.name == tool && p.arch == arch && p.version == version),
                "packer/pins has no {tool} {version} for {arch}"
            );
        }
    }
    // infra/'s default, the launch templates through the agent's loader,
    // and the ClusterConfiguration the agent renders from it.
    let stack = cluster_stack(repo_template("cluster.json"), "dev", "blue");
    assert_eq!(
        stack.params["KubernetesVersion"], version,
        "infra/ KubernetesVersion default"
    );
    for (role, lt) in [
        (Role::ControlPlane, "ControlPlaneLaunchTemplate"),
        (Role::Worker, "WorkerLaunchTemplate"),
    ] {
        let cfg = user_data_config(&launch_user_data(&stack, lt), role);
        assert_eq!(cfg.cluster.kubernetes_version, version, "{lt}");
        let rendered =
            kubeboot::kubeadm::config::render_init(&kubeboot::kubeadm::config::InitParams {
                node: kubeboot::kubeadm::config::Node {
                    name: "ip-10-0-1-2.eu-west-1.compute.internal".into(),
                    ip: "10.0.1.2".into(),
                    provider_id: "aws:///eu-west-1a/i-0123456789abcdef0".into(),
                },
                cluster_name: cfg.cluster.name.clone(),
                kubernetes_version: cfg.cluster.kubernetes_version.clone(),
                control_plane_endpoint: cfg.cluster.control_plane_endpoint.clone(),
                pod_subnet: "10.244.0.0/16".into(),
                service_subnet: "10.96.0.0/12".into(),
                dns_domain: "cluster.local".into(),
                service_account_issuer: cfg.cluster.service_account_issuer.clone(),
                etcd_data_dir: "/var/lib/etcd".into(),
                kubernetes_dir: "/etc/kubernetes".into(),
                token: kubeboot::secret::Secret::new("abcdef.0123456789abcdef".into()),
                token_ttl: Duration::from_secs(3600),
                certificate_key: kubeboot::secret::Secret::new("0f".repeat(32)),
            });
        let cluster_configuration = rendered
            .expose()
            .split("---\n")
            .map(|d| serde_json::from_str::<serde_json::Value>(d).expect("JSON document"))
            .find(|d| d["kind"] == "ClusterConfiguration")
            .expect("a ClusterConfiguration");
        assert_eq!(
            cluster_configuration["kubernetesVersion"],
            json!(format!("v{version}")),
            "{lt}: kubeadm would install another version than the image's"
        );
    }
    for example in ["control-plane.toml", "worker.toml"] {
        let text = std::fs::read_to_string(workspace_root().join("examples").join(example))
            .expect("example");
        assert!(
            text.contains(&format!("kubernetes_version = \"{version}\"")),
            "examples/{example} names another version than the image's {version}"
        );
    }
}

/// How Packer runs the scripts: each staged copy by path (so `$0`'s
/// directory holds lib.sh and the pins), as root, with the template's
/// variables, which Packer passes only through `{{ .Vars }}`; none is
/// `KUBEBOOT_*` (kubeboot, which 70-kubeboot.sh runs, would read it as a
/// setting and refuse it). Every file a script installs from the staging
/// directory is in packer/files.
#[test]
fn the_template_runs_every_staged_script_in_order_with_its_variables() {
    let template = packer_file("kubeboot.pkr.hcl");
    let execute = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("execute_command = "))
        .expect("an execute_command");
    assert!(
        execute.contains("{{ .Vars }}") && execute.contains("{{ .Path }}"),
        "{execute}"
    );
    let block = &template[template
        .find("environment_vars = [")
        .expect("environment_vars")..];
    let vars: Vec<&str> = block[..block.find(']').expect("end")]
        .lines()
        .skip(1)
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
        .filter(|l| !l.is_empty())
        .collect();
    let names: Vec<&str> = vars.iter().filter_map(|v| v.split('=').next()).collect();
    assert_eq!(
        names,
        ["IMAGE_DIR", "KUBERNETES_VERSION", "ARCH"],
        "{vars:?}"
    );
    let mut numbered: Vec<String> = std::fs::read_dir(workspace_root().join("packer/scripts"))
        .expect("scripts")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    numbered.sort();
    let inline: Vec<String> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"bash ${local.staging}/scripts/"))
        .map(|l| l.trim_end_matches(',').trim_end_matches('"').to_string())
        .collect();
    assert_eq!(
        inline, numbered,
        "the template runs every numbered script, in order"
    );
    for name in &numbered {
        let text = packer_file(&format!("scripts/{name}"));
        let strict = text.find("set -euo pipefail").unwrap_or(usize::MAX);
        let source = text
            .find("source \"$(dirname \"$0\")/lib.sh\"")
            .unwrap_or_else(|| panic!("{name} does not source lib.sh beside it"));
        assert!(
            strict < source,
            "{name}: set -euo pipefail before sourcing (a failed source must stop it)"
        );
        for part in text.split("$IMAGE_DIR/files/").skip(1) {
            let path: String = part
                .chars()
                .take_while(|c| !matches!(c, '"' | ' ' | '\n'))
                .collect();
            assert!(
                workspace_root().join("packer/files").join(&path).is_file(),
                "{name} installs files/{path}, which packer/files lacks"
            );
        }
    }
    assert!(packer_file("scripts/70-kubeboot.sh").contains("--doc \"$IMAGE_DIR/README.md\""));
    assert!(packer_file("scripts/70-kubeboot.sh").contains("--addons \"$IMAGE_DIR/addons\""));
    assert!(
        template.contains("source      = \"${path.root}/../addons\""),
        "the add-on manifests are staged"
    );
    assert!(
        template.contains("${path.root}/../README.md"),
        "the README is staged"
    );
}

/// lib.sh's `pin` finds a row by name, version and architecture and names
/// what is missing; `fetch` uses a cached file only when its sha256 is the
/// pin's, and otherwise downloads (here: an unreachable URL, so it fails
/// and says so instead of handing back the wrong file).
#[test]
fn lib_sh_finds_pins_and_uses_a_download_only_when_its_sha256_is_pinned() {
    let dir = tempfile::tempdir().expect("dir");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).expect("cache");
    let content = b"a pinned artifact\n";
    let sha = {
        let out = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().expect("stdin").write_all(content)?;
                c.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };
    std::fs::write(
        dir.path().join("pins"),
        format!(
            "# name version arch sha256 url\n\
             tool 1.0.0 amd64 {sha} https://127.0.0.1:9/tool-@VERSION@-@ARCH@\n\
             tool 1.0.0 arm64 {sha} https://127.0.0.1:9/tool-@VERSION@-@ARCH@\n"
        ),
    )
    .expect("pins");
    let lib = workspace_root().join("packer/scripts/lib.sh");
    let run = |script: &str| {
        Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}'\n{script}", lib.display()))
            .env("IMAGE_DIR", dir.path())
            .env("CACHE_DIR", &cache)
            .env("ARCH", "amd64")
            .env("KUBERNETES_VERSION", "1.31.2")
            .output()
            .expect("bash")
    };
    let out = run("pin tool 1.0.0");
    succeeded(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("1.0.0 {sha} https://127.0.0.1:9/tool-@VERSION@-@ARCH@")
    );
    let out = run("pin tool 2.0.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no pin for tool 2.0.0 on amd64"),
        "{stderr}"
    );

    // The cached file with the pinned hash is used as it is.
    let cached = cache.join("tool-1.0.0-amd64-tool-1.0.0-amd64");
    std::fs::write(&cached, content).expect("cached");
    let out = run("f=$(fetch tool 1.0.0)\necho \"$f\"");
    succeeded(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        cached.display().to_string()
    );
    // A cached file that is not what was pinned is never handed back.
    std::fs::write(&cached, b"tampered\n").expect("tamper");
    let out = run("f=$(fetch tool 1.0.0)\necho \"used $f\"");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "a tampered download was used: {stdout}"
    );
    assert!(!stdout.contains("used"), "{stdout}");
    assert!(
        stderr.contains("download of https://127.0.0.1:9/tool-1.0.0-amd64 failed"),
        "{stderr}"
    );
    // Bad environment is named with what is expected.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source '{}'", lib.display()))
        .env("IMAGE_DIR", dir.path())
        .env("ARCH", "sparc")
        .env("KUBERNETES_VERSION", "1.31.2")
        .output()
        .expect("bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ARCH='sparc': expected amd64 or arm64"),
        "{stderr}"
    );
}

/// The CloudWatch agent is pointed at the cluster's log group by the
/// image, before bootstrap (a node whose bootstrap fails must be seen):
/// `cloudwatch-agent-setup` reads metrics.log_group from kubeboot's merged
/// configuration (here the worker launch template's user-data), renders
/// the agent's config and queues its restart; when kubeboot refuses its
/// configuration it fails with kubeboot's reasons and writes nothing. kubeboot sends EMF where the agent
/// listens.
#[test]
fn the_cloudwatch_agent_is_pointed_at_the_stacks_log_group_before_bootstrap() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let stack = cluster_stack(repo_template("cluster.json"), "dev", "blue");
    let log_group = scalar(&stack.eval(&json!({"Ref": "LogGroup"})));
    std::fs::write(
        d.join("user-data"),
        launch_user_data(&stack, "WorkerLaunchTemplate"),
    )
    .expect("user-data");
    std::fs::write(d.join("no-cluster"), "[cluster]\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"a.b:6443\"\n[node]\nrole = \"worker\"\n[aws]\ntable = \"kubeboot-dev-blue\"\n").expect("user-data");
    let fake = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = d.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("fake");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    };
    let image_config = workspace_root().join("packer/files/kubeboot/config.toml");
    let setup = |user_data: &str| {
        let kubeboot = fake(
            "kubeboot",
            &format!(
                "exec '{}' \"$@\" --config '{}' --user-data '{}'",
                kubeboot_bin().display(),
                image_config.display(),
                d.join(user_data).display()
            ),
        );
        let _ = std::fs::remove_file(d.join("calls"));
        Command::new(workspace_root().join("packer/files/cloudwatch-agent-setup"))
            .env("CWSETUP_KUBEBOOT", kubeboot)
            .env(
                "CWAGENT_TEMPLATE",
                workspace_root().join("packer/files/cloudwatch-agent.json"),
            )
            .env("CWAGENT_CONFIG", d.join("etc/kubeboot.json"))
            .env(
                "CWAGENT_CTL",
                fake(
                    "ctl",
                    &format!("echo ctl \"$*\" >> '{}'", d.join("calls").display()),
                ),
            )
            .env(
                "SYSTEMCTL",
                fake(
                    "systemctl",
                    &format!("echo systemctl \"$*\" >> '{}'", d.join("calls").display()),
                ),
            )
            .output()
            .expect("cloudwatch-agent-setup")
    };
    let out = setup("user-data");
    succeeded(&out);
    let rendered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("etc/kubeboot.json")).expect("agent config"))
            .expect("JSON");
    let files = &rendered["logs"]["logs_collected"]["files"]["collect_list"][0];
    assert_eq!(files["log_group_name"], json!(log_group));
    assert_eq!(files["file_path"], "/var/log/kubeboot/kubeboot.log");
    let calls = std::fs::read_to_string(d.join("calls")).expect("calls");
    assert_eq!(
        calls,
        format!(
            "ctl -a fetch-config -m ec2 -c file:{}\nsystemctl --no-block restart amazon-cloudwatch-agent.service\n",
            d.join("etc/kubeboot.json").display()
        )
    );
    std::fs::remove_file(d.join("etc/kubeboot.json")).expect("rm");
    // metrics.log_group defaults to /kubeboot/<cluster>/metrics, so only
    // a configuration kubeboot refuses leaves the agent without one.
    let out = setup("no-cluster");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("cluster.name")
            && stderr.contains("kubeboot cannot read its configuration"),
        "{stderr}"
    );
    assert!(!d.join("etc/kubeboot.json").exists() && !d.join("calls").exists());

    // Its unit runs before bootstrap, and systemd accepts it.
    let unit = packer_file("files/kubeboot-cloudwatch.service");
    let directive = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        directive("Before")
            .split_whitespace()
            .any(|u| u == BOOTSTRAP),
        "{unit}"
    );
    assert_eq!(directive("Type"), "oneshot");
    assert!(packer_file("scripts/50-cloudwatch-agent.sh")
        .contains("systemctl enable kubeboot-cloudwatch.service"));
    let staged = d.join("kubeboot-cloudwatch.service");
    std::fs::write(
        &staged,
        unit.replace(
            "/usr/libexec/kubeboot/cloudwatch-agent-setup",
            &workspace_root()
                .join("packer/files/cloudwatch-agent-setup")
                .display()
                .to_string(),
        ),
    )
    .expect("stage");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&staged)
        .output()
        .expect("verify");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );

    // kubeboot's EMF goes where the agent listens.
    let agent: serde_json::Value =
        serde_json::from_str(&packer_file("files/cloudwatch-agent.json")).expect("agent config");
    let listens = agent["logs"]["metrics_collected"]["emf"]["service_address"]
        .as_str()
        .expect("service_address");
    assert!(
        packer_file("files/kubeboot/config.toml")
            .contains(&format!("agent_endpoint = \"{listens}\"")),
        "the image's metrics.agent_endpoint is not the agent's {listens}"
    );
}

/// Path, mode, owner and content (or link target) of everything under `root`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let what = if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).expect("link").display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else {
                format!(
                    "{} bytes {:x}",
                    meta.len(),
                    crc(&std::fs::read(&path).expect("read"))
                )
            };
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            out.insert(
                rel,
                format!(
                    "{:o} {}:{} {what}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            );
        }
    }
    out
}

fn crc(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn run_install(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(install_script())
        .arg("--binary")
        .arg(kubeboot_bin())
        .args(args)
        .output()
        .expect("bash")
}

#[test]
fn the_install_script_lays_kubeboot_down_with_its_modes_and_a_second_run_changes_nothing() {
    let root = tempfile::tempdir().expect("root");
    let out = run_install(&[&root.path().display().to_string()]);
    succeeded(&out);
    let first = tree(root.path());
    let mode = |p: &str| {
        first
            .get(p)
            .unwrap_or_else(|| panic!("{p} not installed: {first:#?}"))
            .clone()
    };
    assert!(mode("usr/bin/kubeboot").starts_with("755 0:0 "));
    assert!(mode("etc/kubeboot/config.toml").starts_with("644 0:0 "));
    assert!(mode("etc/kubeboot/config.d").starts_with("755 0:0 dir"));
    assert!(mode("var/lib/kubeboot").starts_with("700 0:0 dir"));
    assert!(mode("var/log/kubeboot").starts_with("750 0:0 dir"));
    // The add-on manifests, where addons.directory's default looks.
    assert!(mode("usr/share/kubeboot/addons").starts_with("755 0:0 dir"));
    for manifest in ["flannel.yaml", "cluster-autoscaler.yaml"] {
        assert!(mode(&format!("usr/share/kubeboot/addons/{manifest}")).starts_with("644 0:0 "));
    }
    let defaults = kubeboot::config::schema::KEYS
        .iter()
        .find(|k| k.path == "addons.directory")
        .and_then(|k| k.default)
        .expect("addons.directory has a default");
    assert_eq!(defaults, "\"/usr/share/kubeboot/addons\"");
    for unit in UNITS {
        assert!(mode(&format!("usr/lib/systemd/system/{unit}")).starts_with("644 0:0 "));
        assert!(
            mode(&format!(
                "etc/systemd/system/multi-user.target.wants/{unit}"
            ))
            .contains(&format!("-> /usr/lib/systemd/system/{unit}")),
            "{unit} is enabled"
        );
    }
    let out = run_install(&[&root.path().display().to_string()]);
    succeeded(&out);
    assert_eq!(tree(root.path()), first, "a second run changed the tree");

    // Bad input: named, with what is expected, nothing installed.
    let empty = tempfile::tempdir().expect("empty");
    for (args, says) in [
        (vec![], "ROOT is missing"),
        (
            vec!["--units", "/nonexistent", "ROOT"],
            "has no kubeboot-bootstrap.service",
        ),
        (
            vec!["--frobnicate", "ROOT"],
            "unknown option '--frobnicate'",
        ),
        (
            vec!["--addons", "/nonexistent", "ROOT"],
            "has no flannel.yaml",
        ),
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("ROOT", &empty.path().display().to_string()))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_install(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(
            tree(empty.path()).is_empty(),
            "{args:?} installed something"
        );
    }
}

/// A machine's options for an image the install script lays into its
/// root before it boots: the Kubernetes packages' doubles (`options`), the
/// three kubeboot units enabled, booted to multi-user.target as a node is.
/// Later [`Options::before_boot`] commands run after the install.
fn image(options: Options) -> Options {
    options
        .before_boot(&[
            "bash",
            &install_script().display().to_string(),
            "--binary",
            &kubeboot_bin().display().to_string(),
        ])
        .multi_user()
}

/// A worker launched from infra/'s launch template on an image the install
/// script made: systemd starts the enabled units at boot, bootstrap reads
/// its cluster settings from the template's user-data (IMDS double) over
/// the image's /etc/kubeboot/config.toml, joins through the "load
/// balancer" (a forwarder on :6443 to the API double), says READY=1; the
/// daemon starts after it; the journal copy feeds
/// /var/log/kubeboot/kubeboot.log; EMF reaches the CloudWatch agent's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_from_the_install_script_boots_a_worker_from_its_launch_templates_user_data() {
    // The stack as deployed for cluster dev-<suffix>: the sim uses its names.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let stack = cluster_stack(repo_template("cluster.json"), "dev", suffix);
    let table = scalar(&stack.eval(&json!({"Ref": "Table"})));
    let log_group = scalar(&stack.eval(&json!({"Ref": "LogGroup"})));
    let lb_name = scalar(&stack.eval(&json!({"Fn::GetAtt": ["ApiLoadBalancer", "DNSName"]})));
    let mut sim = SimCluster::start_named(1, 0, &format!("dev-{suffix}"), &table).await;
    assert_ok(&sim.bootstrap(&[0]).await);
    let worker = sim.add_node("worker").await;

    // The load balancer's DNS name resolves to a forwarder on :6443.
    let lb = Forwarder::start(
        (fresh_loopback_ip(), 6443).into(),
        sim.kubeapi.endpoint().parse().expect("api addr"),
    )
    .await;
    let user_data = launch_user_data(&stack, "WorkerLaunchTemplate")
        .replace(&lb_name, &lb.addr().ip().to_string());
    assert!(
        user_data.contains(&format!("{}:6443", lb.addr().ip())),
        "{user_data}"
    );
    sim.nodes[worker]
        .imds
        .set_user_data(Some(user_data.into_bytes()));

    // The test world, as a drop-in: where AWS (moto), instance metadata and
    // the CloudWatch agent's EMF port are. The cluster's settings are the
    // user-data's alone.
    let agent = LineSink::start().await;
    let moto = sim.moto.endpoint();
    let world = format!(
        "[aws]\nmax_attempts = 5\ninitial_backoff = \"50ms\"\ns3_force_path_style = true\n\n\
         [aws.endpoints]\ndynamodb = \"{moto}\"\nssm = \"{moto}\"\nsecretsmanager = \"{moto}\"\n\
         ec2 = \"{moto}\"\nsqs = \"{moto}\"\nautoscaling = \"{moto}\"\ns3 = \"{moto}\"\nsts = \"{moto}\"\n\n\
         [imds]\nendpoint = \"{}\"\ndeadline = \"20s\"\n\n\
         [metrics]\nagent_endpoint = \"tcp://{}\"\n",
        sim.nodes[worker].imds.endpoint(),
        agent.addr()
    );
    let standin = format!(
        "[Service]\n{}Environment={}=1\n",
        standin_environment(&sim),
        standin::ALLOW_SYSTEM_PATHS_ENV
    );
    let machine = Machine::boot(image(
        Options::packages()
            .bind_rw(sim.work.path(), GUEST_SIM)
            .file("/etc/kubeboot/config.d/90-test-world.toml", &world, 0o600)
            .file(
                &format!("/etc/systemd/system/{BOOTSTRAP}.d/test.conf"),
                &standin,
                0o644,
            )
            .file(
                &format!("/etc/systemd/system/{DAEMON}.d/test.conf"),
                &standin,
                0o644,
            ),
    ));

    // The units load: verify is clean inside the machine, and they are enabled.
    let verify = machine.exec(&[
        "systemd-analyze",
        "verify",
        "/usr/lib/systemd/system/kubeboot-bootstrap.service",
        "/usr/lib/systemd/system/kubeboot.service",
        "/usr/lib/systemd/system/kubeboot-journal.service",
    ]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    for unit in UNITS {
        assert_eq!(
            machine.systemctl_ok(&["is-enabled", unit]).trim(),
            "enabled",
            "{unit}"
        );
    }

    // Nobody started bootstrap: the boot did.
    let (took, journal) = bootstrap_becomes_active(&machine, &sim);
    eprintln!("the image's worker bootstrapped {took:?} after the boot");
    assert!(journal.contains("bootstrap complete"), "{}", tail(&journal));
    assert!(machine.read_file("/etc/kubernetes/kubelet.conf").is_some());

    // Its settings came from the launch template's user-data.
    let show = machine.exec(&["kubeboot", "config", "show"]);
    let show = String::from_utf8_lossy(&show.stdout);
    let name_line = show
        .lines()
        .find(|l| l.contains("cluster.name"))
        .unwrap_or_default();
    assert!(
        name_line.contains(&format!("dev-{suffix}")) && name_line.contains("user-data"),
        "cluster.name from user-data:\n{show}"
    );

    // The daemon started after bootstrap was up.
    let daemon = machine.wait_state(DAEMON, "active", Duration::from_secs(60));
    daemon.unwrap_or_else(|(a, s)| panic!("{DAEMON} is {a}/{s}:\n{}", machine.report(DAEMON)));
    let ready: u64 = machine
        .show(BOOTSTRAP, "ActiveEnterTimestampMonotonic")
        .parse()
        .expect("timestamp");
    let started: u64 = machine
        .show(DAEMON, "ExecMainStartTimestampMonotonic")
        .parse()
        .expect("timestamp");
    assert!(
        started >= ready,
        "the daemon started ({started}) before bootstrap was READY ({ready})"
    );

    // The CloudWatch agent's two inputs: the journal copy and EMF.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let copied = machine
            .read_file("/var/log/kubeboot/kubeboot.log")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if copied.contains("bootstrap complete") {
            let first = copied.lines().next().unwrap_or_default();
            assert!(
                serde_json::from_str::<serde_json::Value>(first).is_ok(),
                "the copy holds the agent's JSON lines: {first}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/var/log/kubeboot/kubeboot.log never got bootstrap's lines:\n{}\n{}",
            tail(&copied),
            machine.report(JOURNAL)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // A restart of the copy (or a reboot) resumes after its cursor: no
    // line is copied twice.
    machine.systemctl_ok(&["restart", JOURNAL]);
    std::thread::sleep(Duration::from_secs(5));
    let copied = String::from_utf8_lossy(
        &machine
            .read_file("/var/log/kubeboot/kubeboot.log")
            .unwrap_or_default(),
    )
    .into_owned();
    assert_eq!(
        copied.matches("bootstrap complete").count(),
        1,
        "after a restart of {JOURNAL}:\n{}",
        tail(&copied)
    );
    assert_eq!(
        machine.show(JOURNAL, "ActiveState"),
        "active",
        "{}",
        machine.report(JOURNAL)
    );
    let emf = agent.lines();
    assert!(
        emf.iter().any(|l| l.contains(&log_group)),
        "EMF reached the agent's port, naming the stack's log group {log_group}: {} lines",
        emf.len()
    );
    for line in &emf {
        kubeboot_tests::emf::validate(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

/// An image whose /etc/kubeboot/config.toml is missing: bootstrap fails at
/// boot with KB-CONFIG-002 and exit 2, is not restarted, and the daemon
/// does not start (no unit skips silently on a failed condition).
#[test]
fn an_image_without_its_configuration_fails_at_boot_loudly() {
    let machine = Machine::boot(image(Options::packages()).before_boot(&[
        "sh",
        "-c",
        "rm \"$1/etc/kubeboot/config.toml\"",
        "rm-config",
    ]));
    machine
        .wait_state(BOOTSTRAP, "failed", Duration::from_secs(60))
        .unwrap_or_else(|(a, s)| panic!("{BOOTSTRAP} is {a}/{s}:\n{}", machine.report(BOOTSTRAP)));
    assert_eq!(machine.show(BOOTSTRAP, "ExecMainStatus"), "2");
    assert_eq!(machine.show(BOOTSTRAP, "NRestarts"), "0");
    let journal = machine.journal(BOOTSTRAP);
    assert!(journal.contains("KB-CONFIG-002"), "{}", tail(&journal));
    assert!(
        journal.contains("/etc/kubeboot/config.toml"),
        "{}",
        tail(&journal)
    );
    let failed = machine.systemctl_ok(&["list-units", "--failed", "--plain", "--no-legend"]);
    assert!(failed.contains(BOOTSTRAP), "systemctl --failed: {failed}");
    assert_ne!(
        machine.show(DAEMON, "ActiveState"),
        "active",
        "{}",
        machine.report(DAEMON)
    );
}

/// The AMI pre-pulls every image the add-on manifests run: the line of
/// 60-images.sh that lists them, run over the repository's addons/, finds
/// exactly the images of their Pods' containers and init containers.
#[test]
fn the_image_pre_pulls_every_add_on_image() {
    let script = packer_file("scripts/60-images.sh");
    let lister = script
        .lines()
        .find(|l| l.trim_start().starts_with("sed -nE"))
        .expect("60-images.sh lists the add-on images with sed");
    let out = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail; {lister} | sort -u")])
        .env("IMAGE_DIR", workspace_root())
        .output()
        .expect("bash");
    succeeded(&out);
    let listed: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let vars = kubeboot_tests::fixtures::addon_variables();
    let mut expected = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(workspace_root().join("addons")).expect("addons/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("manifest");
        let addon = kubeboot::addons::parse("a", &path, &text, &vars).expect("valid");
        for object in addon.objects {
            let pod = &object.body["spec"]["template"]["spec"];
            for list in ["containers", "initContainers"] {
                for c in pod[list].as_array().into_iter().flatten() {
                    expected.insert(c["image"].as_str().expect("image").to_string());
                }
            }
        }
    }
    assert_eq!(listed, expected);
    assert!(expected.len() >= 3, "{expected:?}");
    let docs = std::fs::read_to_string(workspace_root().join("docs/ADDONS.md")).expect("docs");
    for image in &expected {
        assert!(docs.contains(image), "docs/ADDONS.md does not name {image}");
    }
}
