//! Lock benchmark driver: figures for bench/lock/REPORT.md, never assertions.
//!
//! Runs against moto_server through the AWS proxy (no faults), which counts
//! the DynamoDB calls each lock operation makes. Prints Markdown.
//!
//! - acquire latency of a free lock, and calls per acquire / renewal / release;
//! - takeover latency after a holder crashes, for several lease lengths.

use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Locker, Owner, Purpose, Settings};
use kubeboot_tests::awsproxy::AwsProxy;
use kubeboot_tests::moto::Moto;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn settings(lease: Duration) -> Settings {
    Settings {
        lease,
        margin: lease / 6,
        acquire_timeout: Duration::from_secs(600),
        wall_clock: Arc::new(SystemTime::now),
    }
}

fn update_items(proxy: &AwsProxy) -> usize {
    proxy.log_for("UpdateItem").len()
}

fn get_items(proxy: &AwsProxy) -> usize {
    proxy.log_for("GetItem").len()
}

#[tokio::main]
async fn main() {
    let acquires: usize = std::env::var("KBBENCH_ACQUIRES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let takeovers: usize = std::env::var("KBBENCH_TAKEOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let sdk = moto
        .sdk_config()
        .await
        .to_builder()
        .endpoint_url(proxy.endpoint())
        .build();
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let table = format!("kubeboot-bench-{}", uuid::Uuid::new_v4().simple());
    kubeboot::table::create(&client, &table)
        .await
        .expect("create table");

    println!("# Lock benchmark\n");
    println!(
        "moto_server 5.2.5 behind the in-process AWS proxy, loopback; the lock code in-process (a debug build of the driver).
"
    );

    // Free-lock acquire latency and calls per operation.
    let store = Arc::new(DynamoLockStore::new(client.clone(), &table, "bench-free"));
    let locker = Locker::new(
        store.clone(),
        Owner::new("i-0000000000000bench"),
        settings(Duration::from_secs(30)),
    );
    let mut latencies = Vec::new();
    let (mut acquire_calls, mut release_calls) = (0, 0);
    for _ in 0..acquires {
        let before = (update_items(&proxy), get_items(&proxy));
        let t = Instant::now();
        let guard = locker.acquire(Purpose::Init).await.expect("acquire");
        latencies.push(t.elapsed());
        let mid = (update_items(&proxy), get_items(&proxy));
        acquire_calls += (mid.0 - before.0) + (mid.1 - before.1);
        guard.release().await.expect("release");
        release_calls += update_items(&proxy) - mid.0 + get_items(&proxy) - mid.1;
    }
    latencies.sort();
    println!("## Acquire a free lock ({acquires} cycles)\n");
    println!("| p50 | p90 | p99 | max |\n|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |\n",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().expect("samples"))
    );

    // Renewal calls while holding.
    let lease = Duration::from_secs(3);
    let locker = Locker::new(
        store.clone(),
        Owner::new("i-0000000000000bench"),
        settings(lease),
    );
    let guard = locker.acquire(Purpose::Leader).await.expect("acquire");
    let before = (update_items(&proxy), get_items(&proxy));
    let held = Duration::from_secs(12);
    tokio::time::sleep(held).await;
    let renewals = update_items(&proxy) - before.0;
    let reads = get_items(&proxy) - before.1;
    guard.release().await.expect("release");
    println!("## DynamoDB calls per operation\n");
    println!("| operation | calls |\n|---|---|");
    println!(
        "| acquire (free lock) | {:.2} |",
        acquire_calls as f64 / acquires as f64
    );
    println!(
        "| release | {:.2} |",
        release_calls as f64 / acquires as f64
    );
    println!(
        "| holding for {}s with a {}s lease | {renewals} UpdateItem + {reads} GetItem ({:.2} renewals per second; expected 3 per lease) |\n",
        held.as_secs(),
        lease.as_secs(),
        renewals as f64 / held.as_secs_f64()
    );

    // Takeover latency after a crash, by lease.
    println!(
        "## Takeover after the holder crashes ({takeovers} trials per lease, margin = lease/6)\n"
    );
    println!("Measured from the crash (last renewal at most lease/3 earlier) to the waiter holding the lock.");
    println!(
        "Bounds: at least one lease after the last renewal; at most lease + 2 renewal periods.\n"
    );
    println!("| lease | min | median | max | max ÷ lease | lease + 2 × lease/3 |\n|---|---|---|---|---|---|");
    let mut worst_ratio = 0.0f64;
    for lease_s in [3u64, 6, 12] {
        let lease = Duration::from_secs(lease_s);
        let trials = (0..takeovers).map(|t| {
            let client = client.clone();
            let table = table.clone();
            tokio::spawn(async move {
                let cluster = format!("bench-takeover-{lease_s}-{t}");
                let store = Arc::new(DynamoLockStore::new(client, &table, &cluster));
                let holder = Locker::new(
                    store.clone(),
                    Owner::new("i-000000000000holder"),
                    settings(lease),
                );
                let waiter =
                    Locker::new(store, Owner::new("i-000000000000waiter"), settings(lease));
                let guard = holder.acquire(Purpose::Init).await.expect("holder");
                // Crash at a random point of the renewal period.
                let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u64;
                tokio::time::sleep(lease + Duration::from_millis(jitter * lease_s / 3)).await;
                drop(guard);
                let crashed = Instant::now();
                let _g = waiter.acquire(Purpose::Init).await.expect("waiter");
                crashed.elapsed()
            })
        });
        let mut times = Vec::new();
        for t in trials.collect::<Vec<_>>() {
            times.push(t.await.expect("trial"));
        }
        times.sort();
        let max = *times.last().expect("samples");
        let ratio = max.as_secs_f64() / lease.as_secs_f64();
        worst_ratio = worst_ratio.max(ratio);
        println!(
            "| {lease_s}s | {} | {} | {} | {ratio:.3} | {} |",
            ms(times[0]),
            ms(percentile(&times, 0.5)),
            ms(max),
            ms(lease + 2 * (lease / 3))
        );
    }
    // The headline for bench/run.sh's summary.
    if let Some(path) = std::env::var_os("KBBENCH_JSON") {
        let json = serde_json::json!({ "takeover_max_over_lease": (worst_ratio * 1000.0).round() / 1000.0 });
        std::fs::write(path, json.to_string()).expect("write json");
    }
    println!(
        "\nReading: a waiter that arrives at the crash first sees the last record version then, so it takes\n\
         over at crash + lease + margin (plus one request). A waiter that was already watching saw that\n\
         version up to one renewal period after it was written, so its takeover lands between\n\
         last renewal + lease + margin and that + lease/3; with margin <= lease/3 (enforced by config\n\
         validation) both stay within lease + 2 renewal periods of the last renewal."
    );
}
