//! The lock and the registry with one DynamoDB request in five failing:
//! throttled, 500, timed out, or — the nasty one — applied upstream with the
//! answer lost. Contenders retry their step like bootstrap does; the state
//! must still move exactly once and no record may be lost or doubled.

use aws_config::timeout::TimeoutConfig;
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Locker, Owner, Purpose};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{MemberRecord, Phase, Registry};
use kubeboot_tests::awsproxy::{AwsProxy, FaultPlan};
use kubeboot_tests::fixtures::{self, MotoTable};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CONTENDERS: usize = 6;
const ROUNDS: u64 = 3;

fn fault_plan() -> FaultPlan {
    FaultPlan {
        throttle: 0.05,
        server_error: 0.05,
        timeout: 0.05,
        drop_after_forward: 0.05,
        timeout_duration: Duration::from_secs(5),
        ..FaultPlan::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn at_twenty_percent_faults_init_happens_once_and_no_member_record_is_lost() {
    let aws = MotoTable::start().await;
    let table = &aws.table;
    let cluster = "faulty";
    let proxy = AwsProxy::start(&aws.moto.endpoint()).await;
    proxy.set_faults(fault_plan());
    let retried = Duration::from_millis(20);
    let sdk = fixtures::through(&aws.sdk, &proxy.endpoint(), 6, retried, retried * 10)
        .to_builder()
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_millis(400))
                .build(),
        )
        .build();
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let settings = fixtures::lock_settings(
        Duration::from_secs(3),
        Duration::from_secs(1),
        Duration::from_secs(120),
    );
    let lock_store = Arc::new(DynamoLockStore::new(client.clone(), table, cluster));
    let registry = Arc::new(Registry::new(Arc::new(DynamoRegistryStore::new(
        client.clone(),
        table,
        cluster,
    ))));
    let inits = Arc::new(AtomicUsize::new(0));
    let step_retries = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for i in 0..CONTENDERS {
        let locker = Locker::new(
            lock_store.clone(),
            Owner::new(&format!("i-{i:017x}")),
            settings.clone(),
        );
        let (registry, inits, step_retries) =
            (registry.clone(), inits.clone(), step_retries.clone());
        tasks.push(tokio::spawn(async move {
            let instance = format!("i-{i:017x}");
            // Like bootstrap: each step is retried until it converges.
            for attempt in 0..20 {
                let result: Result<(), String> = async {
                    let guard = locker
                        .acquire(Purpose::Init)
                        .await
                        .map_err(|e| e.to_string())?;
                    let state = registry.state().await.map_err(|e| e.to_string())?;
                    if state.phase != Phase::Initialized {
                        let run = format!("run-{i}-{attempt}");
                        let claim = fixtures::init_claim(&run, &instance, "api:6443");
                        let generation = registry
                            .begin_init(&guard, &state, &claim)
                            .await
                            .map_err(|e| e.to_string())?;
                        registry
                            .mark_initialized(&guard, generation, &run, SystemTime::now())
                            .await
                            .map_err(|e| e.to_string())?;
                        inits.fetch_add(1, Ordering::SeqCst);
                    }
                    guard.release().await.map_err(|e| e.to_string())?;
                    for round in 0..ROUNDS {
                        let guard = locker
                            .acquire(Purpose::Membership)
                            .await
                            .map_err(|e| e.to_string())?;
                        let record = MemberRecord {
                            instance_id: format!("{instance}-{round}"),
                            member_id: 1000 * (i as u64 + 1) + round,
                            name: format!("m{i}-{round}"),
                            peer_url: format!("http://127.0.0.{}:2380", i + 1),
                            confirmed_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
                        };
                        registry
                            .record_member(&guard, &record)
                            .await
                            .map_err(|e| e.to_string())?;
                        guard.release().await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => return,
                    Err(e) => {
                        step_retries.fetch_add(1, Ordering::SeqCst);
                        eprintln!("contender {i} attempt {attempt}: {e}");
                    }
                }
            }
            panic!("contender {i} never converged");
        }));
    }
    for t in tasks {
        t.await.expect("contender converged");
    }
    proxy.clear_faults();

    let stats = proxy.stats();
    eprintln!(
        "proxy: {stats:?}; step retries: {}",
        step_retries.load(Ordering::SeqCst)
    );
    assert!(
        stats.throttled + stats.server_errors + stats.timeouts + stats.dropped_after_forward > 0,
        "faults were injected"
    );
    assert_eq!(
        inits.load(Ordering::SeqCst),
        1,
        "exactly one contender initialized the cluster"
    );
    let state = registry.state().await.expect("state");
    assert_eq!(state.phase, Phase::Initialized);
    let members = registry.members().await.expect("members");
    assert_eq!(
        members.len(),
        CONTENDERS * ROUNDS as usize,
        "every record once, none lost or doubled: {members:?}"
    );
    for (i, m) in members.iter().enumerate() {
        assert_eq!(
            m.member_id,
            1000 * (i as u64 / ROUNDS + 1) + i as u64 % ROUNDS
        );
    }
}
