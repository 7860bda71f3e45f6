//! Rolling replacement: every control plane is replaced, one at a time, five
//! times over (15 replacements). Each old instance dies with its etcd member
//! and its daemon, the leader daemon handles its lifecycle message, a new
//! instance boots and joins. Throughout, a watcher checks that etcd never
//! loses quorum; after every step the member list equals the records; a key
//! written at the start is still there at the end.

use kubeboot::etcd::{Etcd, Settings};
use kubeboot::quorum::quorum;
use kubeboot_tests::simcluster::SimCluster;
use kubeboot_tests::termination::{host_dies, tail, Terminations};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn every_control_plane_is_replaced_five_times_without_losing_quorum_or_data() {
    let mut sim = SimCluster::start(3, 0).await;
    for r in sim.bootstrap(&[0, 1, 2]).await {
        assert_eq!(r.code, Some(0), "{}", tail(&r.stderr));
    }
    let endpoint = |sim: &SimCluster, i: usize| format!("https://{}:2379", sim.nodes[i].ip());
    let mut kv = sim.etcd_client(0).await;
    kv.put("canary", "written before the first replacement", None)
        .await
        .expect("put");

    // The quorum watcher: asks every live member each 100 ms.
    let live_endpoints = Arc::new(Mutex::new(vec![
        endpoint(&sim, 0),
        endpoint(&sim, 1),
        endpoint(&sim, 2),
    ]));
    let lost = Arc::new(AtomicU32::new(0));
    let checks = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let settings: Settings = sim.etcd_settings();
    let watcher = {
        let (live, lost, checks, stop) = (
            live_endpoints.clone(),
            lost.clone(),
            checks.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let endpoints = live.lock().expect("live").clone();
                if let Ok(etcd) = Etcd::connect_any(&endpoints, &settings).await {
                    if let Ok(members) = etcd.members().await {
                        let health = etcd.health(&members).await;
                        let voters = health.iter().filter(|h| !h.member.is_learner).count();
                        let healthy = health
                            .iter()
                            .filter(|h| !h.member.is_learner && h.healthy)
                            .count();
                        checks.fetch_add(1, Ordering::Relaxed);
                        if healthy < quorum(voters) {
                            lost.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "QUORUM LOST: {healthy} healthy of {voters} voters: {health:?}"
                            );
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut terminations = Terminations::start(&sim, "30s").await;
    // node index -> its daemon; node 0's is the harness's own.
    let mut daemons: Vec<(usize, tokio::process::Child)> = vec![
        (1, terminations.daemon_on(&sim, 1, None)),
        (2, terminations.daemon_on(&sim, 2, None)),
    ];
    let mut live: Vec<usize> = vec![0, 1, 2];
    let started = Instant::now();
    let mut replacement = 0;
    for round in 1..=5 {
        for slot in 0..3 {
            replacement += 1;
            let old = live[slot];
            let step = format!("round {round}, replacement {replacement} (node {old})");
            // The old instance dies: its daemon and its etcd member with it.
            if old == 0 {
                // The harness's own daemon runs on node 0.
                let _ = terminations.daemon.start_kill();
                let _ = terminations.daemon.wait().await;
            }
            if let Some(pos) = daemons.iter().position(|(i, _)| *i == old) {
                let (_, mut d) = daemons.remove(pos);
                let _ = d.start_kill();
                let _ = d.wait().await;
            }
            host_dies(&sim, old);
            live.remove(slot);
            *live_endpoints.lock().expect("live") =
                live.iter().map(|&i| endpoint(&sim, i)).collect();
            let token = terminations
                .terminate("kb-control-plane", &sim.nodes[old].instance_id())
                .await;
            terminations
                .wait_completed(&token, Duration::from_secs(90))
                .await;
            sim.assert_members_are_the_records(&live, &format!("{step}: after removal"))
                .await;

            // Its replacement boots and joins, then runs its own daemon.
            let new = sim.add_node("control-plane").await;
            let run = sim.bootstrap(&[new]).await.remove(0);
            assert_eq!(
                run.code,
                Some(0),
                "{step}: new node {new}:\n{}",
                tail(&run.stderr)
            );
            live.insert(slot, new);
            *live_endpoints.lock().expect("live") =
                live.iter().map(|&i| endpoint(&sim, i)).collect();
            sim.assert_members_are_the_records(&live, &format!("{step}: after the join"))
                .await;
            daemons.push((new, terminations.daemon_on(&sim, new, None)));
            assert_eq!(
                terminations
                    .actions
                    .accepted_completions(&sim.nodes[old].instance_id()),
                1,
                "{step}: completed once"
            );
        }
    }
    eprintln!(
        "15 replacements in {:?}; quorum checked {} times",
        started.elapsed(),
        checks.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    assert!(checks.load(Ordering::Relaxed) > 50, "the watcher watched");
    assert_eq!(lost.load(Ordering::Relaxed), 0, "quorum was never lost");

    let mut kv = sim.etcd_client(live[0]).await;
    let got = kv.get("canary", None).await.expect("get");
    assert_eq!(
        got.kvs()
            .first()
            .map(|k| k.value_str().unwrap_or_default().to_string()),
        Some("written before the first replacement".to_string())
    );
    for (_, mut d) in daemons {
        let _ = d.start_kill();
        let _ = d.wait().await;
    }
    drop(terminations);
}
