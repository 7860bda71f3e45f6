//! The agent's etcd module against real etcd members.

use kubeboot::config::model::EtcdScheme;
use kubeboot::etcd::{join_plan, Etcd, Settings, Stale};
use kubeboot_tests::etcd::EtcdCluster;
use std::time::{Duration, Instant};

fn settings() -> Settings {
    Settings {
        scheme: EtcdScheme::Http,
        client_port: 2379,
        peer_port: 2380,
        dial_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        pki_dir: "/nonexistent".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn members_health_and_confirmation_follow_what_etcd_reports() {
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = Etcd::connect(&cluster.endpoints(), &settings())
        .await
        .expect("connect");
    let members = etcd.members().await.expect("members");
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m.is_started() && !m.is_learner));

    // A started voter is confirmed at once.
    let m0 = cluster.member(0);
    let confirmed = etcd
        .confirm(&m0.peer_url, Duration::from_secs(5))
        .await
        .expect("confirmed");
    assert_eq!(confirmed.name, m0.name);

    // A learner that never started is an orphan to remove before any join,
    // and can never be confirmed (so never recorded).
    let orphan = cluster.add_unstarted_member(true).await;
    let orphan_url = cluster.member(orphan).peer_url;
    let started = Instant::now();
    let err = etcd
        .confirm(&orphan_url, Duration::from_secs(2))
        .await
        .expect_err("never confirmed");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(err.to_string().contains("not started yet"), "{err}");
    let health = etcd.health(&etcd.members().await.expect("members")).await;
    let (stale, ready) = join_plan(&health, "http://127.255.255.254:2380");
    assert!(
        matches!(stale.as_slice(), [Stale::OrphanLearner(m)] if m.peer_urls == vec![orphan_url.clone()]),
        "{stale:?}"
    );
    assert_eq!(ready, Ok(()));
    let Stale::OrphanLearner(m) = &stale[0] else {
        unreachable!()
    };
    etcd.remove(m.id).await.expect("remove orphan");
    assert_eq!(etcd.members().await.expect("members").len(), 3);

    // A dead voter makes the cluster unfit for a join.
    cluster.kill_member(2);
    let health = etcd.health(&etcd.members().await.expect("members")).await;
    let (_, ready) = join_plan(&health, "http://127.255.255.254:2380");
    assert!(ready
        .expect_err("unhealthy")
        .contains(&cluster.member(2).name));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_every_member_still_reads_and_removes_when_one_member_is_dead() {
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = Etcd::connect(&cluster.endpoints(), &settings())
        .await
        .expect("connect");
    // A follower dies, so no election is involved: this is about routing.
    let leader = etcd.leader().await.expect("leader");
    let members = etcd.members().await.expect("members");
    let follower = (0..3)
        .find(|&i| {
            kubeboot::etcd::find_by_peer_url(&members, &cluster.member(i).peer_url)
                .is_some_and(|m| m.id != leader)
        })
        .expect("a follower");
    let dead = cluster.member(follower);
    cluster.kill_member(follower);

    // The balanced client routes some requests to the dead member; each one
    // must still be answered by a live member, never fail with "refused".
    for round in 0..30 {
        let members = etcd
            .members()
            .await
            .unwrap_or_else(|e| panic!("member list {round} with one member dead: {e}"));
        assert_eq!(members.len(), 3);
        etcd.leader()
            .await
            .unwrap_or_else(|e| panic!("leader {round} with one member dead: {e}"));
    }

    // Removing the dead member (quorum stays at two of two) goes through too.
    let members = etcd.members().await.expect("members");
    let gone = kubeboot::etcd::find_by_peer_url(&members, &dead.peer_url)
        .expect("the dead member is listed")
        .id;
    etcd.remove(gone).await.expect("remove the dead member");
    let left = etcd.members().await.expect("members after removal");
    assert_eq!(left.len(), 2);
    assert!(left
        .iter()
        .all(|m| m.peer_urls != vec![dead.peer_url.clone()]));
    // A second removal (a retry after a lost answer) is not an error.
    etcd.remove(gone).await.expect("removing again is a no-op");
}
