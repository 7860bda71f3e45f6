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

/// The health of the member behind `peer_url`, as the agent judges it.
fn health_of<'a>(
    health: &'a [kubeboot::etcd::Health],
    peer_url: &str,
) -> &'a kubeboot::etcd::Health {
    health
        .iter()
        .find(|h| h.member.peer_urls.iter().any(|u| u == peer_url))
        .unwrap_or_else(|| panic!("no member with peer URL {peer_url} in {health:?}"))
}

/// Two of three members are gone: the survivor still answers Status, but it
/// has no leader (Status.leader = 0) and can commit nothing. It must not
/// count as healthy, and cannot be confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_answers_but_has_no_leader_is_unhealthy_and_never_confirmed() {
    let mut cluster = EtcdCluster::start(3).await;
    let survivor = cluster.member(0);
    cluster.kill_member(1);
    cluster.kill_member(2);
    let etcd = Etcd::connect(std::slice::from_ref(&survivor.client_url), &settings())
        .await
        .expect("connect to the survivor");
    let deadline = Instant::now() + Duration::from_secs(15);
    let health = loop {
        let health = etcd.health(&etcd.members().await.expect("members")).await;
        let h = health_of(&health, &survivor.peer_url);
        if !h.healthy {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor of three sees leader {:?} yet counts as healthy: {h:?}",
            h.leader
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let h = health_of(&health, &survivor.peer_url);
    let reason = h.error.as_deref().unwrap_or_default();
    assert!(reason.contains("no leader"), "{h:?}");
    let (_, ready) = join_plan(&health, "http://127.255.255.254:2380");
    let why = ready.expect_err("no join into a cluster without a leader");
    assert!(
        why.contains(&survivor.name) && why.contains("no leader"),
        "{why}"
    );
    let err = etcd
        .confirm(&survivor.peer_url, Duration::from_secs(2))
        .await
        .expect_err("a member without a leader is not confirmed");
    assert!(err.to_string().contains("no leader"), "{err}");
}

/// An active NOSPACE alarm puts the whole cluster in maintenance mode (no
/// writes): every member is unhealthy while it lasts, a join is refused with
/// what to do, the quorum guard refuses a removal it would otherwise allow,
/// and everything is healthy again once the alarm is disarmed.
#[tokio::test(flavor = "multi_thread")]
async fn an_active_nospace_alarm_blocks_joins_and_confirmation_with_a_hint_but_not_a_removal() {
    use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = Etcd::connect(&cluster.endpoints(), &settings())
        .await
        .expect("connect");
    let raiser = cluster.member(0);
    let mut options = AlarmOptions::new();
    options.with_member(raiser.id);
    let mut client = cluster.client().await;
    client
        .alarm(
            AlarmAction::Activate,
            AlarmType::Nospace,
            Some(options.clone()),
        )
        .await
        .expect("activate NOSPACE");

    let health = etcd.health(&etcd.members().await.expect("members")).await;
    for h in &health {
        assert!(
            !h.healthy,
            "a member counts as healthy under NOSPACE: {h:?}"
        );
        let reason = h.error.as_deref().unwrap_or_default();
        assert!(reason.contains("NOSPACE"), "{h:?}");
    }
    let (_, ready) = join_plan(&health, "http://127.255.255.254:2380");
    let why = ready.expect_err("no join under NOSPACE");
    for what in [
        "NOSPACE",
        "defrag",
        "compact",
        "quota-backend-bytes",
        "alarm disarm",
    ] {
        assert!(
            why.contains(what),
            "the refusal does not say {what:?}: {why}"
        );
    }
    // A removal is judged without the alarm: it stops writes, not raft's
    // configuration changes, and a terminating member refused here would
    // die as a voter.
    let victim = health_of(&health, &cluster.member(2).peer_url).member.id;
    let members = etcd.members().await.expect("members");
    let for_removal = etcd.health_for_removal(&members).await;
    assert!(for_removal.iter().all(|h| h.healthy), "{for_removal:?}");
    kubeboot::quorum::check_removal(&for_removal, victim, false)
        .expect("the guard allows the removal under NOSPACE");
    let err = etcd
        .confirm(&cluster.member(1).peer_url, Duration::from_secs(2))
        .await
        .expect_err("no member is confirmed under NOSPACE");
    assert!(err.to_string().contains("NOSPACE"), "{err}");

    // A fresh cluster refuses membership changes for its first ~5 s
    // ("unhealthy cluster"): retry past that, as the agent's removal does.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match etcd.remove(victim).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                println!("removal under NOSPACE not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("etcd refuses the configuration change under NOSPACE: {e}"),
        }
    }
    // etcd 3.4 answers MemberList from whichever member the client reaches,
    // without a quorum read (linearizable MemberList came in 3.5): a member
    // that has not applied the removal yet still lists three for a moment.
    // The list without the victim is kept: a later MemberList can still
    // reach the removed member itself before it shuts down.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let listed = etcd.members().await.expect("members");
        if listed.len() == 2 {
            break listed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removal is still not applied everywhere after 10 s: {} members listed",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A removed member's host goes with it (the instance terminates).
    cluster.kill_member(2);

    // The removed member may have been the leader: the disarm (a raft
    // proposal) waits for the election that follows; retry past it.
    let mut client = cluster.client_for(0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .alarm(
                AlarmAction::Deactivate,
                AlarmType::Nospace,
                Some(options.clone()),
            )
            .await
        {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                println!("disarm NOSPACE not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("disarm NOSPACE: {e}"),
        }
    }
    let health = etcd.health(&remaining).await;
    assert!(health.iter().all(|h| h.healthy), "{health:?}");
    assert_eq!(join_plan(&health, "http://127.255.255.254:2380").1, Ok(()));
    etcd.confirm(&cluster.member(1).peer_url, Duration::from_secs(2))
        .await
        .expect("confirmed once the alarm is gone");
}
