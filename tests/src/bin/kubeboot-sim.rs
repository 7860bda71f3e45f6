//! `kubeboot-sim`: the main job run locally, on loopback.
//!
//! Stands up what a cluster's nodes see — moto_server as AWS, a real 3-member
//! etcd cluster, and one IMDSv2 double per node carrying that node's
//! user-data — and runs the real `kubeboot` binary on each node, printing a
//! timeline. Today each node runs `kubeboot config check` and one `config
//! show`; bootstrap joins the timeline when it exists. Everything it starts
//! stops when it exits, also on Ctrl-C or failure.

use kubeboot_tests::etcd::EtcdCluster;
use kubeboot_tests::imds::{Imds, ImdsIdentity};
use kubeboot_tests::moto::Moto;
use kubeboot_tests::workspace::kubeboot_bin;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

const CLUSTER: &str = "sim";

struct Timeline(Instant);

impl Timeline {
    fn say(&self, what: impl AsRef<str>) {
        println!(
            "[{:>6.2}s] {}",
            self.0.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }
}

fn user_data(role: &str) -> Vec<u8> {
    let backup = if role == "control-plane" {
        "[backup]\nenabled = false\n"
    } else {
        ""
    };
    format!(
        "Content-Type: multipart/mixed; boundary=\"//\"\nMIME-Version: 1.0\n\n\
         --//\nContent-Type: text/x-shellscript\n\n#!/bin/bash\nsystemctl start kubeboot-bootstrap\n\
         --//\nContent-Type: application/kubeboot+toml\n\n[node]\nrole = \"{role}\"\n{backup}--//--\n"
    )
    .into_bytes()
}

fn node_config(dir: &Path, imds: &str, moto: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join("config.toml");
    let mut endpoints = String::new();
    for svc in [
        "dynamodb",
        "ssm",
        "secretsmanager",
        "ec2",
        "s3",
        "sqs",
        "autoscaling",
        "sts",
    ] {
        endpoints.push_str(&format!("{svc} = \"{moto}\"\n"));
    }
    std::fs::write(
        &path,
        format!(
            "[cluster]\nname = \"{CLUSTER}\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"127.0.0.1:6443\"\n\n\
             [aws]\ntable = \"kubeboot-{CLUSTER}\"\nregion = \"us-east-1\"\ns3_force_path_style = true\n\n\
             [aws.endpoints]\n{endpoints}\n\
             [imds]\nendpoint = \"{imds}\"\ndeadline = \"20s\"\n\n\
             [etcd]\nscheme = \"http\"\n\n\
             [paths]\nkubernetes_dir = \"{d}/etc/kubernetes\"\nstate_dir = \"{d}/var/lib/kubeboot\"\n\
             run_dir = \"{d}/run/kubeboot\"\netcd_data_dir = \"{d}/var/lib/etcd\"\n\n\
             [metrics]\nsink = \"stdout\"\n",
            d = dir.display()
        ),
    )?;
    Ok(path)
}

#[tokio::main]
async fn main() -> ExitCode {
    let t = Timeline(Instant::now());
    let bin = kubeboot_bin();
    t.say(format!("agent binary {}", bin.display()));

    let moto = Moto::start().await;
    t.say(format!(
        "moto_server (AWS) listening on {}",
        moto.endpoint()
    ));
    let etcd = EtcdCluster::start(3).await;
    for i in 0..etcd.len() {
        let m = etcd.member(i);
        t.say(format!(
            "etcd member {} up at {} (pid {:?})",
            m.name, m.client_url, m.pid
        ));
    }

    let roles = [
        "control-plane",
        "control-plane",
        "control-plane",
        "worker",
        "worker",
    ];
    let work = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a work dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failures = 0;
    let mut nodes = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let mut identity = ImdsIdentity::default();
        if let Some(ip) = (i < etcd.len()).then(|| etcd.member(i).ip) {
            identity.private_ip = ip;
        }
        let imds = Imds::start_with(identity).await;
        imds.set_user_data(Some(user_data(role)));
        let dir = work.path().join(format!("node-{i}"));
        let config = match std::fs::create_dir_all(&dir)
            .and_then(|()| node_config(&dir, &imds.endpoint(), &moto.endpoint()))
        {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cannot write node {i}'s config: {e}");
                return ExitCode::FAILURE;
            }
        };
        t.say(format!(
            "node-{i} {} ({role}, {}) metadata at {}",
            imds.identity().instance_id,
            imds.identity().private_ip,
            imds.endpoint()
        ));
        nodes.push((i, imds, config));
    }

    for (i, imds, config) in &nodes {
        let out = Command::new(&bin)
            .env_clear()
            .args(["config", "check", "--log-format", "text", "--config"])
            .arg(config)
            .output();
        match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout);
                t.say(format!(
                    "node-{i} {}: kubeboot config check -> exit {}: {}",
                    imds.identity().instance_id,
                    o.status.code().unwrap_or(-1),
                    text.trim()
                ));
                if !o.status.success() {
                    failures += 1;
                    eprint!("{}", String::from_utf8_lossy(&o.stderr));
                }
            }
            Err(e) => {
                t.say(format!("node-{i}: cannot run kubeboot: {e}"));
                failures += 1;
            }
        }
    }

    if let Some((_, _, config)) = nodes.first() {
        if let Ok(o) = Command::new(&bin)
            .env_clear()
            .args(["config", "show", "--config"])
            .arg(config)
            .output()
        {
            t.say("node-0: kubeboot config show (excerpt)");
            for line in String::from_utf8_lossy(&o.stdout).lines().filter(|l| {
                l.starts_with("cluster.")
                    || l.starts_with("node.")
                    || l.starts_with("aws.table")
                    || l.starts_with("aws.endpoints.dynamodb")
            }) {
                println!("          {line}");
            }
        }
    }

    t.say(format!(
        "tearing down: {} metadata doubles, {} etcd members, moto_server",
        nodes.len(),
        etcd.len()
    ));
    drop(nodes);
    drop(etcd);
    drop(moto);
    t.say(if failures == 0 {
        "demo OK".to_string()
    } else {
        format!("demo FAILED on {failures} node(s)")
    });
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
