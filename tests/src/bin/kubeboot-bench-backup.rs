//! Backup benchmark driver: figures for bench/backup/REPORT.md, never
//! assertions.
//!
//! One control plane (the kubeadm stand-in's real etcd over https) first
//! holds about `--small-mib` MiB: one agent backup of that size shows
//! whether the agent's memory grows with the database. It is then filled to
//! about `--mib` MiB, and per round, alternating:
//!
//! - **the agent:** `kubeboot backup now`, which streams etcd's snapshot
//!   straight into a multipart upload (8 MiB parts) while hashing it;
//! - **the file way:** `etcdctl snapshot save` to a file, then that file
//!   uploaded as a multipart upload of the same part size through the same
//!   S3 adapter (moto), the way a script or the replaced Lambda would.
//!
//! Peak RSS is each process's `VmHWM` (`/proc/<pid>/status`), sampled every
//! 10 ms until it exits (the high-water mark only rises, so the last sample
//! is the peak up to 10 ms before exit). The upload of the file runs in this
//! driver, so only its time is reported. Writes Markdown to stdout and, with
//! `--out`, to a file.
//!
//! ```text
//! kubeboot-bench-backup [--mib N] [--small-mib N] [--runs N] [--out FILE]
//! ```

// Shared by the drivers; this one uses a part of it.
#[allow(dead_code)]
mod bench_common;

use bench_common::runs::high_water;
use bench_common::{
    args, command_line, date_line, first_line, machine, moto_version, publish, shown,
};
use kubeboot_tests::simcluster::SimCluster;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: kubeboot-bench-backup [--mib N (1100)] [--small-mib N (64)] [--runs N (2)] [--out FILE]";

/// One process's wall time and peak RSS.
struct Measured {
    wall: Duration,
    peak_kib: u64,
    ok: bool,
    stderr: String,
}

/// Runs `cmd` to its end, sampling its peak RSS.
async fn measure(mut cmd: tokio::process::Command) -> Measured {
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut peak_kib = 0;
    let status = loop {
        if let Some(kib) = high_water(pid) {
            peak_kib = peak_kib.max(kib);
        }
        match tokio::time::timeout(Duration::from_millis(10), child.wait()).await {
            Ok(status) => break status.expect("wait"),
            Err(_) => continue,
        }
    };
    Measured {
        wall: started.elapsed(),
        peak_kib,
        ok: status.success(),
        stderr: reader.await.unwrap_or_default(),
    }
}

/// Uploads `file` as a multipart upload of [`kubeboot::backup::PART_SIZE`]
/// parts through the agent's S3 adapter; its wall time.
async fn upload_file(sim: &SimCluster, file: &Path, key: &str) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let bucket = kubeboot::aws::s3::Bucket::new(sim.moto.s3().await, sim.bucket(), None);
    let upload = bucket
        .start_upload(key, Default::default())
        .await
        .expect("start upload");
    let mut f = tokio::fs::File::open(file)
        .await
        .expect("open snapshot file");
    let mut parts = Vec::new();
    loop {
        let mut buf = vec![0u8; kubeboot::backup::PART_SIZE];
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).await.expect("read");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        let number = parts.len() as i32 + 1;
        parts.push(
            bucket
                .upload_part(key, &upload, number, buf.into())
                .await
                .expect("upload part"),
        );
    }
    bucket
        .complete_upload(key, &upload, parts)
        .await
        .expect("complete");
    started.elapsed()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rate(bytes: u64, d: Duration) -> String {
    format!("{:.1} MiB/s", mib(bytes) / d.as_secs_f64().max(1e-9))
}

#[tokio::main]
async fn main() {
    let parsed = args(USAGE, &["--mib", "--small-mib", "--runs"]);
    let fill_mib = parsed.counts.get("--mib").copied().unwrap_or(1100);
    let small_mib = parsed
        .counts
        .get("--small-mib")
        .copied()
        .unwrap_or(64)
        .min(fill_mib);
    let runs = parsed.counts.get("--runs").copied().unwrap_or(2);
    let date = k8s_openapi::jiff::Timestamp::now();
    let started = Instant::now();

    let sim = SimCluster::start(1, 0).await;
    let setup = sim.bootstrap(&[0]).await;
    assert!(
        setup.iter().all(|r| r.code == Some(0)),
        "the control plane did not initialize: {}",
        setup.iter().map(|r| r.stderr.clone()).collect::<String>()
    );
    const VALUE: usize = 1024 * 1024 - 64;
    let mut client = sim.etcd_client(0).await;
    eprintln!("filling etcd with about {small_mib} MiB; one agent backup of that");
    sim.put_keys(0, "/kbbench/small/", small_mib, VALUE).await;
    let small_db = client.status().await.expect("etcd status").db_size() as u64;
    let small = measure(sim.command(&sim.nodes[0], &["backup", "now"])).await;
    assert!(small.ok, "kubeboot backup now failed:\n{}", small.stderr);
    eprintln!("filling etcd to about {fill_mib} MiB");
    let filled = Instant::now();
    sim.put_keys(0, "/kbbench/", fill_mib - small_mib, VALUE)
        .await;
    let fill_time = filled.elapsed();
    let settings = sim.etcd_settings();
    let endpoint = settings.client_url(&sim.nodes[0].ip());
    let db_size = client.status().await.expect("etcd status").db_size() as u64;

    let mut rows = Vec::new();
    for round in 0..runs {
        eprintln!("round {}: the agent", round + 1);
        let agent = measure(sim.command(&sim.nodes[0], &["backup", "now"])).await;
        assert!(agent.ok, "kubeboot backup now failed:\n{}", agent.stderr);
        let newest = kubeboot::backup::Backups::new(
            kubeboot::aws::s3::Bucket::new(sim.moto.s3().await, sim.bucket(), None),
            &kubeboot::config::load_offline(&kubeboot::config::LoadOptions {
                path: sim.nodes[0].config.clone(),
                user_data: kubeboot::config::UserData::Skip,
                env: vec![("KUBEBOOT_NODE_ROLE".into(), "control-plane".into())],
            })
            .await
            .expect("config")
            .config,
        )
        .newest_verified()
        .await
        .expect("list")
        .expect("a verified backup");

        eprintln!(
            "round {}: etcdctl snapshot save, then the upload",
            round + 1
        );
        let file = sim.work.path().join(format!("saved-{round}.db"));
        let mut save = tokio::process::Command::new("etcdctl");
        save.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg(format!(
                "--cacert={}",
                settings.pki_dir.join("etcd/ca.crt").display()
            ))
            .arg(format!(
                "--cert={}",
                settings.pki_dir.join("apiserver-etcd-client.crt").display()
            ))
            .arg(format!(
                "--key={}",
                settings.pki_dir.join("apiserver-etcd-client.key").display()
            ))
            .args(["snapshot", "save"])
            .arg(&file);
        let saved = measure(save).await;
        assert!(saved.ok, "etcdctl snapshot save failed:\n{}", saved.stderr);
        let file_size = std::fs::metadata(&file).expect("saved file").len();
        let upload = upload_file(&sim, &file, &format!("kbbench/saved-{round}.db")).await;
        let _ = std::fs::remove_file(&file);
        rows.push((agent, newest.size, saved, upload, file_size));
    }

    let mut r = String::new();
    let _ = writeln!(r, "# Backup benchmark\n");
    let _ = writeln!(r, "{}", command_line("kubeboot-bench-backup"));
    let _ = writeln!(r, "{}", date_line(date, started));
    let _ = writeln!(r, "- Machine: {}", machine());
    let _ = writeln!(
        r,
        "- Agent: `{}`; etcd {}; `etcdctl` {}; moto_server {} on loopback",
        shown(&kubeboot_tests::workspace::kubeboot_bin()),
        first_line("etcd", &["--version"]).trim_start_matches("etcd Version: "),
        first_line("etcdctl", &["version"]).trim_start_matches("etcdctl version: "),
        moto_version()
    );
    let _ = writeln!(
        r,
        "- Database: {:.0} MiB (etcd's `dbSize`), {fill_mib} values of 1 MiB written through one member over https (the last {} in {:.0} s); {runs} rounds, each the agent then the file way\n",
        mib(db_size),
        fill_mib - small_mib,
        fill_time.as_secs_f64()
    );
    let _ = writeln!(
        r,
        "| round | agent: `kubeboot backup now` | agent peak RSS | file way: `etcdctl snapshot save` | + upload of the file | file way total | `etcdctl` peak RSS | disk the file way needs |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|");
    for (i, (agent, size, saved, upload, file_size)) in rows.iter().enumerate() {
        let total = saved.wall + *upload;
        let _ = writeln!(
            r,
            "| {} | {:.1} s ({}) | {:.1} MiB | {:.1} s | {:.1} s | {:.1} s ({}) | {:.1} MiB | {:.0} MiB |",
            i + 1,
            agent.wall.as_secs_f64(),
            rate(*size, agent.wall),
            agent.peak_kib as f64 / 1024.0,
            saved.wall.as_secs_f64(),
            upload.as_secs_f64(),
            total.as_secs_f64(),
            rate(*file_size, total),
            saved.peak_kib as f64 / 1024.0,
            mib(*file_size)
        );
    }
    let _ = writeln!(
        r,
        "\nThe same agent at {:.0} MiB (`dbSize`, before the fill): {:.1} s ({}), peak RSS {:.1} MiB.",
        mib(small_db),
        small.wall.as_secs_f64(),
        rate(small_db, small.wall),
        small.peak_kib as f64 / 1024.0
    );
    let _ = writeln!(
        r,
        "\nThe agent's time runs from process start to exit: configuration, the `backup` lock, the stream, the manifest and the certificates object. The file way's time is the two steps alone. Peak RSS is `VmHWM` sampled every 10 ms; the goal is flat and at most 64 MiB whatever the database's size (the agent holds one 8 MiB part and the hash state). The report's file: {}.",
        parsed.out.as_deref().map_or("stdout only".to_string(), shown)
    );
    publish(&r, parsed.out.as_deref());
    // The headline for bench/run.sh's summary.
    if let Some(path) = std::env::var_os("KBBENCH_JSON") {
        let peak = rows
            .iter()
            .map(|row| row.0.peak_kib)
            .chain([small.peak_kib])
            .max()
            .unwrap_or(0);
        // Best of the rounds: (agent MiB/s, file way MiB/s).
        let best = |agent: bool| {
            rows.iter()
                .map(|(a, size, saved, upload, file_size)| {
                    if agent {
                        mib(*size) / a.wall.as_secs_f64()
                    } else {
                        mib(*file_size) / (saved.wall + *upload).as_secs_f64()
                    }
                })
                .fold(0.0f64, f64::max)
        };
        let json = serde_json::json!({
            "backup_db_mib": mib(db_size).round(),
            "backup_peak_rss_kib": peak,
            "backup_small_db_peak_rss_kib": small.peak_kib,
            "backup_agent_mib_per_s": (best(true) * 10.0).round() / 10.0,
            "backup_file_way_mib_per_s": (best(false) * 10.0).round() / 10.0,
            "backup_etcdctl_peak_rss_kib": rows.iter().map(|row| row.2.peak_kib).max().unwrap_or(0),
        });
        std::fs::write(path, json.to_string()).expect("write json");
    }
}
