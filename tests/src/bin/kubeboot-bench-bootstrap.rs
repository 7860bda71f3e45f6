//! Bootstrap benchmark driver: figures for bench/bootstrap/REPORT.md, never
//! assertions.
//!
//! Measures the agent's own overhead: the real `kubeboot bootstrap` binary,
//! timed from spawning the process to its exit, with the kubeadm stand-in in
//! its no-op mode (`KBTEST_KUBEADM_NOOP=1`: it writes only what the agent
//! reads afterwards), so what is left is the agent — configuration, instance
//! metadata, AWS calls, etcd and Kubernetes API checks, process start.
//!
//! - init path: a fresh simulated cluster per run (moto, the API double, one
//!   control plane); the etcd member the agent confirms after `kubeadm init`
//!   is a one-member etcd started at the node's IP before the timed region;
//! - worker path: one cluster initialized once by a control plane with the
//!   full stand-in (real etcd, join material published), then one new worker
//!   per run, one at a time.
//!
//! AWS traffic goes through one in-process AWS proxy per service (no faults),
//! which logs every request with its operation: that gives the calls per
//! operation per bootstrap. Writes Markdown to stdout and, with `--out`, to a
//! file (only once every run succeeded).
//!
//! ```text
//! kubeboot-bench-bootstrap [--runs N] [--init-runs N] [--worker-runs N] [--out FILE] [--logs DIR]
//! ```

// Shared by the drivers; this one uses a part of it.
#[allow(dead_code)]
mod bench_common;

use aws_sdk_dynamodb::types::AttributeValue;
use bench_common::runs::{exec_times, start_node_etcd, timed_bootstrap, Proxies, Run};
use bench_common::{
    args, command_line, date_line, first_line, initialized_cluster, machine, moto_version, ms,
    percentile, publish, shown, spread, warm_up_moto, Interference,
};
use kubeboot::registry::Phase;
use kubeboot::table;
use kubeboot_tests::simcluster::SimCluster;
use kubeboot_tests::standin;
use kubeboot_tests::workspace::kubeboot_bin;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Round trips timed for the reference figure of one moto call.
const REFERENCE_CALLS: usize = 50;

struct Options {
    init_runs: usize,
    worker_runs: usize,
    out: Option<PathBuf>,
    logs: Option<PathBuf>,
}

const USAGE: &str = "usage: kubeboot-bench-bootstrap [--runs N] [--init-runs N] [--worker-runs N] [--out FILE] [--logs DIR]\n\
     \n  --runs N         runs per path (default 20)\
     \n  --init-runs N    runs of the init path (overrides --runs)\
     \n  --worker-runs N  runs of the worker path (overrides --runs)\
     \n  --out FILE       also write the report there (after every run succeeded)\
     \n  --logs DIR       keep each run's agent log (JSON lines) there";

fn options() -> Options {
    let a = args(USAGE, &["--runs", "--init-runs", "--worker-runs"]);
    let runs = a.counts.get("--runs").copied().unwrap_or(20);
    Options {
        init_runs: a.counts.get("--init-runs").copied().unwrap_or(runs),
        worker_runs: a.counts.get("--worker-runs").copied().unwrap_or(runs),
        out: a.out,
        logs: a.logs,
    }
}

/// Init runs, and how long moto's first SSM call took in each fresh moto.
async fn init_runs(n: usize, logs: Option<&Path>) -> (Vec<Run>, Vec<Duration>) {
    let mut runs = Vec::new();
    let mut warm_ups = Vec::new();
    for i in 1..=n {
        let sim = SimCluster::start(1, 0).await;
        warm_ups.push(warm_up_moto(&sim).await);
        let proxies = Proxies::start(&sim.moto.endpoint()).await;
        let node = &sim.nodes[0];
        let etcd = start_node_etcd(node).await;
        let run = timed_bootstrap(&sim, node, &proxies, &format!("init run {i}"), logs).await;
        let state = sim.registry().await.state().await.expect("cluster state");
        assert_eq!(state.phase, Phase::Initialized, "init run {i}: {state:?}");
        eprintln!("init run {i}/{n}: {}", ms(run.elapsed));
        runs.push(run);
        drop(etcd);
        drop(proxies);
        drop(sim);
    }
    (runs, warm_ups)
}

/// Worker runs, and the reference round trip of one moto call (through the
/// same proxy, from this process).
async fn worker_runs(n: usize, logs: Option<&Path>) -> (Vec<Run>, Vec<Duration>) {
    // Setup, not timed: the first control plane with the full stand-in.
    let sim = initialized_cluster(n).await;
    let proxies = Proxies::start(&sim.moto.endpoint()).await;
    let mut runs = Vec::new();
    for i in 1..=n {
        let node = &sim.nodes[i];
        let run = timed_bootstrap(&sim, node, &proxies, &format!("worker run {i}"), logs).await;
        let registered = sim.has_node_object(node);
        assert!(registered, "worker run {i}: no Node object");
        eprintln!("worker run {i}/{n}: {}", ms(run.elapsed));
        runs.push(run);
    }
    let ddb = proxies
        .by_service
        .iter()
        .find(|(key, _, _)| *key == "dynamodb")
        .map(|(_, _, p)| p.endpoint())
        .expect("dynamodb proxy");
    let sdk = sim
        .moto
        .sdk_config()
        .await
        .to_builder()
        .endpoint_url(ddb)
        .build();
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let mut reference = Vec::new();
    for _ in 0..REFERENCE_CALLS {
        let t = Instant::now();
        client
            .get_item()
            .table_name(&sim.table)
            .key(
                table::PARTITION_KEY,
                AttributeValue::S(table::cluster_pk(&sim.name)),
            )
            .key(table::SORT_KEY, AttributeValue::S(table::STATE_SK.into()))
            .consistent_read(true)
            .send()
            .await
            .expect("reference GetItem");
        reference.push(t.elapsed());
    }
    (runs, reference)
}

/// Mean, min and max of a per-run count.
fn count_cells(per_run: &[usize]) -> String {
    let mean = per_run.iter().sum::<usize>() as f64 / per_run.len() as f64;
    let (min, max) = (
        per_run.iter().min().copied().unwrap_or(0),
        per_run.iter().max().copied().unwrap_or(0),
    );
    if min == max {
        format!("{mean:.2} | {min}")
    } else {
        format!("{mean:.2} | {min}–{max}")
    }
}

fn aws_table(out: &mut String, runs: &[Run]) {
    let mut keys: Vec<(&'static str, String)> =
        runs.iter().flat_map(|r| r.aws.keys().cloned()).collect();
    keys.sort();
    keys.dedup();
    let _ = writeln!(
        out,
        "| service | operation | calls per run (mean) | range | of which non-2xx (total over runs) |\n|---|---|---|---|---|"
    );
    let mut totals = vec![0usize; runs.len()];
    for key in &keys {
        let per_run: Vec<usize> = runs
            .iter()
            .map(|r| r.aws.get(key).map_or(0, |c| c.0))
            .collect();
        for (t, c) in totals.iter_mut().zip(&per_run) {
            *t += c;
        }
        let errors: usize = runs.iter().map(|r| r.aws.get(key).map_or(0, |c| c.1)).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {errors} |",
            key.0,
            key.1,
            count_cells(&per_run)
        );
    }
    let _ = writeln!(out, "| **all** | | {} | |\n", count_cells(&totals));
}

fn request_table(
    out: &mut String,
    runs: &[Run],
    pick: fn(&Run) -> &BTreeMap<String, usize>,
    who: fn(&str) -> &'static str,
) {
    let mut keys: Vec<String> = runs.iter().flat_map(|r| pick(r).keys().cloned()).collect();
    keys.sort();
    keys.dedup();
    let _ = writeln!(
        out,
        "| request | by | per run (mean) | range |\n|---|---|---|---|"
    );
    for key in &keys {
        let per_run: Vec<usize> = runs
            .iter()
            .map(|r| pick(r).get(key).copied().unwrap_or(0))
            .collect();
        let _ = writeln!(
            out,
            "| `{key}` | {} | {} |",
            who(key),
            count_cells(&per_run)
        );
    }
    out.push('\n');
}

/// The agent's log lines in order, with the median time since process start
/// and the median step from the line before (per run, then the median).
fn timeline_table(out: &mut String, runs: &[Run]) {
    let order: Vec<String> = runs[0].timeline.iter().map(|(m, _)| m.clone()).collect();
    let _ = writeln!(
        out,
        "| log line (or event) | since process start, p50 | step from the row above, p50 |\n|---|---|---|"
    );
    let mut previous: Vec<Duration> = vec![Duration::ZERO; runs.len()];
    let mut rows: Vec<(String, Vec<Option<Duration>>)> = order
        .iter()
        .map(|m| {
            let at = runs
                .iter()
                .map(|r| r.timeline.iter().find(|(x, _)| x == m).map(|(_, d)| *d))
                .collect();
            (format!("`{m}`"), at)
        })
        .collect();
    rows.push((
        "process exit".into(),
        runs.iter().map(|r| Some(r.elapsed)).collect(),
    ));
    for (label, at) in rows {
        let mut offsets = Vec::new();
        let mut steps = Vec::new();
        for (i, d) in at.iter().enumerate() {
            if let Some(d) = d {
                offsets.push(*d);
                steps.push(d.saturating_sub(previous[i]));
                previous[i] = *d;
            }
        }
        if offsets.is_empty() {
            continue;
        }
        offsets.sort();
        steps.sort();
        let _ = writeln!(
            out,
            "| {label} | {} | {} |",
            ms(percentile(&offsets, 0.5)),
            ms(percentile(&steps, 0.5))
        );
    }
    out.push('\n');
}

fn timing_row(out: &mut String, path: &str, runs: &[Run]) {
    let total: Vec<Duration> = runs.iter().map(|r| r.elapsed).collect();
    let kubeadm: Vec<Duration> = runs.iter().filter_map(|r| r.kubeadm).collect();
    let without: Vec<Duration> = runs
        .iter()
        .filter_map(|r| r.kubeadm.map(|k| r.elapsed.saturating_sub(k)))
        .collect();
    let _ = writeln!(
        out,
        "| {path} | {} | total | {} |",
        runs.len(),
        spread(&total)
    );
    let cpu: Vec<Duration> = runs.iter().map(|r| r.cpu).collect();
    let _ = writeln!(
        out,
        "| | | agent CPU time (user + system, its own process) | {} |",
        spread(&cpu)
    );
    if kubeadm.len() == runs.len() {
        let _ = writeln!(
            out,
            "| | | no-op kubeadm (as the agent logged it) | {} |",
            spread(&kubeadm)
        );
        let _ = writeln!(out, "| | | total − no-op kubeadm | {} |", spread(&without));
    }
}

#[tokio::main]
async fn main() {
    let opts = options();
    let agent = kubeboot_bin();
    // Fail before any setup if the stand-in is missing.
    let kubeadm = standin::kubeadm_bin();
    let started = Instant::now();
    let date = k8s_openapi::jiff::Timestamp::now();
    let interference = Interference::start();
    eprintln!(
        "bootstrap benchmark: {} init runs, {} worker runs",
        opts.init_runs, opts.worker_runs
    );
    let (init, warm_ups) = init_runs(opts.init_runs, opts.logs.as_deref()).await;
    let (worker, reference) = worker_runs(opts.worker_runs, opts.logs.as_deref()).await;
    let agent_exec = exec_times(&agent, &["--version"], REFERENCE_CALLS).await;
    let kubeadm_exec = exec_times(&kubeadm, &["version", "-o", "short"], REFERENCE_CALLS).await;

    let mut out = String::new();
    let _ = writeln!(out, "# Bootstrap benchmark\n");
    let _ = writeln!(
        out,
        "Agent overhead of `kubeboot bootstrap` with kubeadm replaced by a no-op, and AWS API calls per bootstrap.\n"
    );
    let (others, own) = interference.finish();
    let _ = writeln!(
        out,
        "- Machine: {}; during the benchmark other processes used {others:.0}% of the machine's CPU time \
         and the benchmark {own:.0}% (the machine is shared: other work shows in the figures)",
        machine()
    );
    let _ = writeln!(out, "{}", date_line(date, started));
    let _ = writeln!(out, "{}", command_line("kubeboot-bench-bootstrap"));
    let _ = writeln!(
        out,
        "- Agent: `{}` (debug build), source `{}`",
        shown(&agent),
        first_line("git", &["describe", "--always", "--dirty"])
    );
    let _ = writeln!(
        out,
        "- kubeadm: the stand-in `{}` with `KBTEST_KUBEADM_NOOP=1`",
        shown(&kubeadm)
    );
    let _ = writeln!(
        out,
        "- AWS: moto_server {} on loopback, behind one in-process AWS proxy per service (every `aws.endpoints` override, no faults); etcd {}\n",
        moto_version(),
        first_line("etcd", &["--version"])
            .trim_start_matches("etcd Version: ")
    );

    let _ = writeln!(out, "## Wall time, process start → exit\n");
    let _ = writeln!(
        out,
        "| path | runs | what | min | p50 | p90 | max |\n|---|---|---|---|---|---|---|"
    );
    timing_row(&mut out, "init (fresh cluster, one control plane)", &init);
    timing_row(
        &mut out,
        "worker (cluster initialized, join material published)",
        &worker,
    );
    let _ = writeln!(
        out,
        "\nFor scale ({REFERENCE_CALLS} each, from the driver):\n\n| reference | min | p50 | p90 | max |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        out,
        "| one DynamoDB `GetItem` (consistent read) through the proxy to moto | {} |",
        spread(&reference)
    );
    let _ = writeln!(
        out,
        "| `kubeboot --version`: exec, start and exit of the agent's debug binary | {} |",
        spread(&agent_exec)
    );
    let _ = writeln!(
        out,
        "| `kubeadm version -o short`: the same for the stand-in | {} |\n",
        spread(&kubeadm_exec)
    );
    let _ = writeln!(
        out,
        "Not in these figures: moto initializes a service on its first use (SSM's has been seen to take ~0.8 s; \
         here the first SSM call to each init run's fresh moto_server took {} at p50); a warm-up call to each \
         service, straight to moto, precedes every timed region so that cost stays out of the agent's figures.\n",
        ms(percentile(&{
            let mut w = warm_ups.clone();
            w.sort();
            w
        }, 0.5))
    );

    let _ = writeln!(
        out,
        "## Where the time goes\n\nThe agent's own log lines (JSON, info level, millisecond stamps) against the spawn time; \
         the first line comes after configuration, instance metadata, AWS credentials and the first AWS calls.\n"
    );
    let _ = writeln!(out, "Init path:\n");
    timeline_table(&mut out, &init);
    let _ = writeln!(out, "Worker path:\n");
    timeline_table(&mut out, &worker);

    let _ = writeln!(out, "## AWS API calls per worker join (happy path)\n");
    aws_table(&mut out, &worker);
    let _ = writeln!(out, "## AWS API calls per init (happy path)\n");
    aws_table(&mut out, &init);

    let _ = writeln!(out, "## Other requests per run\n");
    let _ = writeln!(out, "Instance metadata (IMDSv2 double), worker path:\n");
    request_table(&mut out, &worker, |r| &r.imds, |_| "agent");
    let _ = writeln!(out, "Instance metadata (IMDSv2 double), init path:\n");
    request_table(&mut out, &init, |r| &r.imds, |_| "agent");
    let _ = writeln!(out, "Kubernetes API (the double), worker path:\n");
    request_table(
        &mut out,
        &worker,
        |r| &r.kube,
        // The agent asks for its own Node only; the rest is the stand-in.
        |k| {
            if k == "GET /api/v1/nodes/<node>" {
                "agent"
            } else {
                "no-op kubeadm"
            }
        },
    );

    let _ = writeln!(
        out,
        "## What is measured\n\n\
- **Wall time** from spawning the real `kubeboot bootstrap --config <node>/kubeboot.toml --log-format json` \
to its exit (status 0 checked), one node at a time, nothing else running in the cluster. It includes \
exec of the debug binary, configuration load (file, user-data from IMDS), the IMDSv2 identity and \
instance-role credentials, every DynamoDB / Secrets Manager / SSM call, spawning the no-op kubeadm, the \
etcd and Kubernetes API checks, and the checkpoint files.\n\
- **Init path**: each run is a fresh simulated cluster (its own moto_server, table, API double, IMDS \
double). Before the timed region a one-member etcd is started at the node's IP (`http://<ip>:2379`, peer \
`:2380`, named like the node), standing in for the member `kubeadm init` would start. Timed: init lock, \
new generation, no-op `kubeadm init` (writes `pki/ca.crt` and `ca.key` only), join material published \
(Secrets Manager, SSM, the fenced pointer), the etcd member confirmed (started, voting, healthy) and \
recorded, the cluster marked initialized, lock released. The cluster state is checked `initialized` \
after each run.\n\
- **Worker path**: one cluster, initialized once (untimed) by a control plane running the full stand-in \
(real etcd, real join material); then each run is a new worker instance. Timed: registry read, join \
material read, no-op `kubeadm join` (writes `kubelet.conf` with the cluster CA from `cluster-info`, as \
kubeadm writes it, and registers the Node already `Ready` in the API double), the checkpoint, and the agent's wait for its Node to be `Ready` through the API with \
the kubelet's credentials (the Node is registered `Ready`, so one `GET` answers it: see the \
Kubernetes API table).\n\
- **\"total − no-op kubeadm\"** subtracts the kubeadm run time the agent itself logs (`kubeadm succeeded \
elapsed_ms`: from spawning the stand-in to its exit): what remains is the agent. The no-op \
`init` spends most of its time generating the cluster CA (a key pair and a self-signed certificate, \
debug build; kubeadm makes one too); the no-op `join` is exec plus two API requests.\n\
- **AWS calls** are every request that reached a proxy, SDK retries included. A non-2xx on the happy \
path is an answer the agent expects and acts on (when this was written: the first `PutSecretValue` \
of a new cluster answers `ResourceNotFoundException`, and the agent then calls `CreateSecret`).\n\
- Warm-up: before each timed region, one call to each service straight to moto (not through the \
proxies, not counted), and for the init path the etcd member is already serving.\n\n\
## What is not measured\n\n\
- Real kubeadm, kubelet, etcd start-up, image pulls, TLS bootstrap: replaced by the no-op stand-in and \
the pre-started etcd. On a real node those take tens of seconds and dwarf these figures.\n\
- Real AWS latency: moto_server on loopback (Python) answers in the time shown above per call; \
multiply the call counts by your region's per-call latency for an estimate (requests are sequential \
on these paths).\n\
- Contention: runs are sequential, so no lock waits, no init race, no waiting for join material.\n\
- Release builds: agent and stand-in are debug builds; a release build mostly shortens process start \
and CPU work, not the round trips.\n\
- TLS anywhere (etcd and the API double are plain HTTP; AWS goes to moto over HTTP)."
    );

    publish(&out, opts.out.as_deref());
}
