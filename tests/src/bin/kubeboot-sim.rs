//! `kubeboot-sim`: the main job run locally, on loopback.
//!
//! A simulated cluster of 3 control planes and 2 workers — moto_server as
//! AWS, the Kubernetes API double as the API server, an IMDSv2 double per
//! node, real etcd members started by the kubeadm stand-in — boots at the
//! same moment with the real `kubeboot bootstrap`, then prints the cluster as
//! `kubeboot status` sees it. Everything it starts stops when it exits.
//!
//! `KBSIM_CONTROL_PLANES` / `KBSIM_WORKERS` change the shape.
//! `KBSIM_RESTORE=1` then shows a disaster and its runbook
//! (docs/RESTORE.md): keys are written, `kubeboot backup now` takes a
//! snapshot, every control plane is lost with its etcd, a fresh one runs
//! `kubeboot restore --snapshot latest`, and the keys are counted back.

use kubeboot_tests::simcluster::SimCluster;
use kubeboot_tests::workspace::kubeboot_bin;
use std::process::ExitCode;
use std::time::Instant;

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

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The interesting fields of one agent JSON log line, for the timeline.
fn summarize(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = v["message"].as_str()?;
    let interesting = [
        "lock acquired",
        "starting a new cluster generation",
        "running kubeadm",
        "kubeadm succeeded",
        "join material published",
        "etcd member confirmed and recorded",
        "cluster initialized",
        "node is Ready",
        "join material expires too soon",
        "bootstrap complete",
        "removing a stale etcd member before joining",
        "another node initialized the cluster while we waited; joining instead",
    ];
    if !interesting.iter().any(|m| message.starts_with(m)) {
        return None;
    }
    let mut extra = Vec::new();
    for key in [
        "lock",
        "fence",
        "generation",
        "command",
        "member_id",
        "phase",
    ] {
        if let Some(val) = v.get(key) {
            extra.push(format!(
                "{key}={}",
                val.as_str().map_or(val.to_string(), str::to_string)
            ));
        }
    }
    Some(format!("{message} {}", extra.join(" ")))
}

#[tokio::main]
async fn main() -> ExitCode {
    let t = Timeline(Instant::now());
    let (cps, workers) = (count("KBSIM_CONTROL_PLANES", 3), count("KBSIM_WORKERS", 2));
    t.say(format!(
        "starting a simulated cluster: {cps} control planes, {workers} workers (agent {})",
        kubeboot_bin().display()
    ));
    let mut sim = SimCluster::start(cps, workers).await;
    t.say(format!(
        "moto_server (AWS) at {}, table {}",
        sim.moto.endpoint(),
        sim.table
    ));
    t.say(format!(
        "Kubernetes API double (the load balancer) at {}",
        sim.kubeapi.endpoint()
    ));
    for n in &sim.nodes {
        t.say(format!(
            "node-{} {} {:<13} ip {} metadata {}",
            n.index,
            n.instance_id(),
            n.role,
            n.ip(),
            n.imds.endpoint()
        ));
    }
    t.say("all nodes run `kubeboot bootstrap` now, at the same moment");
    let all: Vec<usize> = (0..sim.nodes.len()).collect();
    let runs = sim.bootstrap(&all).await;
    let mut failures = 0;
    for r in &runs {
        for line in r.stderr.lines().filter_map(summarize) {
            println!("          node-{}: {line}", r.index);
        }
        t.say(format!(
            "node-{} bootstrap exited {:?} after {:.2}s",
            r.index,
            r.code,
            r.elapsed.as_secs_f64()
        ));
        if r.code != Some(0) {
            failures += 1;
            eprintln!(
                "{}",
                r.stderr
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    let kubeadm = sim.kubeadm_invocations();
    let inits = kubeadm
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some("init"))
        .count();
    t.say(format!(
        "kubeadm stand-in ran {} times: {inits} init",
        kubeadm.len()
    ));

    t.say("kubeboot status (from node-0):");
    match tokio::process::Command::new(kubeboot_bin())
        .env_clear()
        .args(["status", "--log-format", "text", "--config"])
        .arg(&sim.nodes[0].config)
        .output()
        .await
    {
        Ok(o) => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                println!("          {line}");
            }
            if !o.status.success() {
                failures += 1;
                eprint!("{}", String::from_utf8_lossy(&o.stderr));
            }
        }
        Err(e) => {
            failures += 1;
            eprintln!("cannot run kubeboot status: {e}");
        }
    }
    t.say("metrics each node wrote (EMF, every line checked against the specification):");
    for n in &sim.nodes {
        let docs = kubeboot_tests::emf::validate_all(&n.metrics_text());
        for d in docs.iter().filter(|d| d.get("BootstrapDuration").is_some()) {
            let outcome = if d.get("BootstrapSuccess").is_some() {
                "BootstrapSuccess"
            } else {
                "BootstrapFailure"
            };
            println!(
                "          node-{}: {outcome} Path={} BootstrapDuration={} ms ({} documents)",
                n.index,
                d["Path"].as_str().unwrap_or("?"),
                d["BootstrapDuration"],
                docs.len()
            );
        }
    }
    if std::env::var("KBSIM_RESTORE").is_ok_and(|v| v == "1") && failures == 0 {
        failures += backup_disaster_restore(&t, &mut sim, cps).await;
    }
    t.say("tearing down: etcd members, doubles, moto_server");
    drop(sim);
    t.say(if failures == 0 {
        "demo OK".to_string()
    } else {
        format!("demo FAILED ({failures} problems)")
    });
    if failures == 0 && inits == 1 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes keys, backs up, loses every control plane, restores on a fresh
/// one and counts the keys back; the number of problems.
async fn backup_disaster_restore(t: &Timeline, sim: &mut SimCluster, cps: usize) -> usize {
    const KEYS: usize = 10_000;
    const PREFIX: &str = "/kbsim-restore/";
    sim.put_keys(0, PREFIX, KEYS, 32).await;
    t.say(format!(
        "wrote {KEYS} keys under {PREFIX}; node-0 runs `kubeboot backup now`"
    ));
    let ok = |what: &str, out: std::io::Result<std::process::Output>| match out {
        Ok(o) if o.status.success() => {
            print!("{}", String::from_utf8_lossy(&o.stdout));
            true
        }
        Ok(o) => {
            eprintln!("{what} failed:\n{}", String::from_utf8_lossy(&o.stderr));
            false
        }
        Err(e) => {
            eprintln!("cannot run {what}: {e}");
            false
        }
    };
    if !ok("backup now", run_on(sim, 0, &["backup", "now"]).await) {
        return 1;
    }
    t.say(format!(
        "disaster: all {cps} control planes are lost with their etcd"
    ));
    for i in 0..cps {
        kubeboot_tests::termination::instance_lost(sim, i).await;
    }
    let fresh = sim.add_node("control-plane").await;
    t.say(format!(
        "node-{fresh} (a fresh control plane) runs `kubeboot restore --snapshot latest`"
    ));
    if !ok(
        "restore",
        run_on(sim, fresh, &["restore", "--snapshot", "latest"]).await,
    ) {
        return 1;
    }
    let back = sim.keys(fresh, PREFIX).await;
    let intact = back.len() == KEYS
        && back.iter().enumerate().all(|(i, (k, v))| {
            *k == format!("{PREFIX}key-{i:05}") && v.starts_with(&format!("value-{i}-"))
        });
    t.say(format!(
        "{} of {KEYS} keys are back through node-{fresh}'s etcd{}",
        back.len(),
        if intact {
            ", every value intact"
        } else {
            ": NOT all back"
        }
    ));
    usize::from(!intact)
}

/// `kubeboot <args>` on node `node`, as an operator runs it there.
async fn run_on(
    sim: &SimCluster,
    node: usize,
    args: &[&str],
) -> std::io::Result<std::process::Output> {
    sim.kubeadm_command(&sim.nodes[node], args).output().await
}
