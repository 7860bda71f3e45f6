//! DynamoDB answers moto never gives (issue 14 item 12), injected by the AWS
//! proxy as "not applied" refusals: a transaction conflict (a
//! TransactWriteItems racing another write on the same item, e.g. the lock
//! heartbeat's UpdateItem on the lock item the registry's fence check
//! reads) and a condition failure with and without the item returned.
//!
//! What AWS answers, and the proxy too (`FaultKind` docs): a cancelled
//! transaction is `TransactionCanceledException` with one
//! `CancellationReasons` entry per item (`{"Code":"None"}` for the items
//! that did not cause it; the DynamoDB API Reference, TransactWriteItems
//! Errors; real answers quoted in aws/aws-sdk-net#1292 and
//! erlcloud/erlcloud#607); a single write racing a transaction is
//! `TransactionConflictException`; a refused condition is
//! `ConditionalCheckFailedException`, with `Item` only when the request
//! asked with `ReturnValuesOnConditionCheckFailure: ALL_OLD`. The SDK
//! retries none of them (aws-runtime's `THROTTLING_ERRORS` and
//! `TRANSIENT_ERRORS` name neither TransactionCanceledException nor
//! TransactionConflictException): the agent must read back and try again.

use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use kubeboot::lock::dynamo::DynamoLockStore;
use kubeboot::lock::{Locker, Owner, Purpose, Settings};
use kubeboot::registry::dynamo::DynamoRegistryStore;
use kubeboot::registry::{Error as RegistryError, JoinPointer, MemberRecord, Registry};
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::fixtures::{self, MotoTable};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const CLUSTER: &str = "conflicts";

struct Setup {
    _aws: MotoTable,
    proxy: AwsProxy,
    /// Through the proxy, with the agent's standard retry mode.
    client: aws_sdk_dynamodb::Client,
    table: String,
}

async fn setup() -> Setup {
    let aws = MotoTable::start().await;
    // Seeded: a rate-based plan injects the same faults on every run.
    let proxy = AwsProxy::start(&aws.moto.endpoint()).await.with_seed(14);
    let backoff = Duration::from_millis(10);
    let sdk = fixtures::through(&aws.sdk, &proxy.endpoint(), 3, backoff, backoff * 5);
    Setup {
        client: aws_sdk_dynamodb::Client::new(&sdk),
        table: aws.table.clone(),
        _aws: aws,
        proxy,
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn settings() -> Settings {
    fixtures::lock_settings(
        Duration::from_secs(3),
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
}

fn code(e: &impl aws_sdk_dynamodb::error::ProvideErrorMetadata) -> String {
    e.code().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_refuses_writes_in_dynamodbs_shapes_without_applying_them() {
    let t = setup().await;
    let key = |sk: &str| {
        std::collections::HashMap::from([("pk".to_string(), s("P")), ("sk".to_string(), s(sk))])
    };
    t.client
        .put_item()
        .table_name(&t.table)
        .item("pk", s("P"))
        .item("sk", s("A"))
        .item("v", s("old"))
        .send()
        .await
        .expect("seed");
    let update = |sk: &str| {
        t.client
            .update_item()
            .table_name(&t.table)
            .set_key(Some(key(sk)))
            .update_expression("SET v = :new")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":new", s("new"))
    };
    let transaction = |all_old: bool| {
        let check = ConditionCheck::builder()
            .table_name(&t.table)
            .set_key(Some(key("A")))
            .condition_expression("attribute_exists(pk)")
            .build()
            .expect("check");
        let mut put = Put::builder()
            .table_name(&t.table)
            .item("pk", s("P"))
            .item("sk", s("A"))
            .item("v", s("new"))
            .condition_expression("attribute_exists(pk)");
        if all_old {
            put = put.return_values_on_condition_check_failure(
                ReturnValuesOnConditionCheckFailure::AllOld,
            );
        }
        t.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(
                TransactWriteItem::builder()
                    .put(put.build().expect("put"))
                    .build(),
            )
    };
    let value = || async {
        t.client
            .get_item()
            .table_name(&t.table)
            .set_key(Some(key("A")))
            .consistent_read(true)
            .send()
            .await
            .expect("read")
            .item
            .and_then(|i| i.get("v").cloned())
    };

    // A transaction conflict: one reason per item, the SDK does not retry.
    t.proxy.set_faults(
        FaultPlan::always(FaultKind::TransactionConflict).only(&["TransactWriteItems"]),
    );
    let e = transaction(false).send().await.expect_err("conflict");
    let tce = e.as_service_error().expect("service error");
    assert!(tce.is_transaction_canceled_exception(), "{e:?}");
    let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tce) = tce else {
        unreachable!()
    };
    let codes: Vec<_> = tce
        .cancellation_reasons()
        .iter()
        .map(|r| r.code().unwrap_or_default().to_string())
        .collect();
    assert_eq!(codes, ["TransactionConflict", "None"]);
    assert_eq!(
        t.proxy.log_for("TransactWriteItems").len(),
        1,
        "not retried by the SDK"
    );

    // A single write racing a transaction.
    t.proxy
        .set_faults(FaultPlan::always(FaultKind::TransactionConflict).only(&["UpdateItem"]));
    let e = update("A").send().await.expect_err("conflict");
    assert_eq!(
        code(&e.into_service_error()),
        "TransactionConflictException"
    );
    assert_eq!(
        t.proxy.log_for("UpdateItem").len(),
        1,
        "not retried by the SDK"
    );

    // A refused condition, with the item only where it was asked for.
    t.proxy.set_faults(
        FaultPlan::always(FaultKind::ConditionalCheckFailed { with_item: true })
            .only(&["UpdateItem", "TransactWriteItems"]),
    );
    let e = update("A")
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
        .send()
        .await
        .expect_err("refused");
    let ccf = e.into_service_error();
    assert!(ccf.is_conditional_check_failed_exception(), "{ccf:?}");
    let aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(
        ccf,
    ) = ccf
    else {
        unreachable!()
    };
    assert_eq!(ccf.item().and_then(|i| i.get("v")), Some(&s("old")));
    let e = update("A").send().await.expect_err("refused");
    let aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(
        ccf,
    ) = e.into_service_error()
    else {
        panic!("not a condition failure")
    };
    assert!(ccf.item().is_none(), "not asked for");
    let e = transaction(true).send().await.expect_err("refused");
    let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tce) = e.into_service_error() else {
        panic!("not a cancellation")
    };
    let reasons = tce.cancellation_reasons();
    assert_eq!(reasons[0].code(), Some("None"));
    assert_eq!(reasons[1].code(), Some("ConditionalCheckFailed"));
    assert_eq!(reasons[1].item().and_then(|i| i.get("v")), Some(&s("old")));
    t.proxy.set_faults(
        FaultPlan::always(FaultKind::ConditionalCheckFailed { with_item: false })
            .only(&["TransactWriteItems"]),
    );
    let e = transaction(true).send().await.expect_err("refused");
    let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tce) = e.into_service_error() else {
        panic!("not a cancellation")
    };
    assert!(tce.cancellation_reasons()[1].item().is_none());

    // None of them applied.
    t.proxy.clear_faults();
    assert_eq!(value().await, Some(s("old")));
    let stats = t.proxy.stats();
    assert_eq!(
        (stats.transaction_conflicts, stats.conditions_failed),
        (2, 4)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lock_is_acquired_renewed_and_released_through_transaction_conflicts() {
    let t = setup().await;
    let store = Arc::new(DynamoLockStore::new(t.client.clone(), &t.table, CLUSTER));
    let locker = Locker::new(store.clone(), Owner::new("i-0000000000000000a"), settings());

    // Every other lock write races a transaction on the lock item.
    t.proxy.set_faults(
        FaultPlan {
            transaction_conflict: 0.5,
            ..FaultPlan::default()
        }
        .only(&["UpdateItem"]),
    );
    let guard = locker.acquire(Purpose::Membership).await.expect("acquired");
    // Several lease periods of renewals, half of them refused by a conflict.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        guard.is_held(),
        "a conflict was read as a lost lock: {}",
        guard.lost_reason()
    );
    let conflicts = t.proxy.stats().transaction_conflicts;
    assert!(conflicts >= 2, "only {conflicts} conflicts injected");

    // The release meets a conflict that lasts a moment (the registry's
    // transaction on the lock item): it is tried again after it, not given
    // up after attempts back to back that all meet it.
    t.proxy
        .set_faults(FaultPlan::always(FaultKind::TransactionConflict).only(&["UpdateItem"]));
    let clear = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        t.proxy.clear_faults();
    };
    let (released, ()) = tokio::join!(guard.release(), clear);
    released.expect("released once the conflict passed");
    // Released: another owner takes it at once.
    let other = Locker::new(store, Owner::new("i-0000000000000000b"), settings());
    let taken = tokio::time::timeout(Duration::from_secs(2), other.acquire(Purpose::Membership))
        .await
        .expect("free at once")
        .expect("acquired");
    taken.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_lock_write_without_the_item_is_read_back_not_assumed() {
    let t = setup().await;
    let store = Arc::new(DynamoLockStore::new(t.client.clone(), &t.table, CLUSTER));
    let locker = Locker::new(store.clone(), Owner::new("i-0000000000000000a"), settings());
    let guard = locker.acquire(Purpose::Membership).await.expect("acquired");

    // Renewals refused by their condition (no item returned: the agent does
    // not ask for it): the record still carries our version, so the guard
    // reads back, keeps the lock and tries again.
    t.proxy.set_faults(
        FaultPlan::always(FaultKind::ConditionalCheckFailed { with_item: false })
            .only(&["UpdateItem"]),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reads = t.proxy.log_for("GetItem").len();
    assert!(reads >= 1, "a refused renewal was not read back");
    t.proxy.clear_faults();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(guard.is_held(), "lost: {}", guard.lost_reason());
    guard.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_writes_through_conflicts_apply_once_and_refusals_are_read_back() {
    let t = setup().await;
    let store = Arc::new(DynamoLockStore::new(t.client.clone(), &t.table, CLUSTER));
    let locker = Locker::new(store, Owner::new("i-0000000000000000a"), settings());
    let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
        t.client.clone(),
        &t.table,
        CLUSTER,
    )));
    let guard = locker.acquire(Purpose::Membership).await.expect("acquired");
    let record = MemberRecord {
        instance_id: "i-0000000000000000c".into(),
        member_id: 7,
        name: "cp-c".into(),
        peer_url: "https://10.0.0.3:2380".into(),
        confirmed_at: SystemTime::now(),
    };

    // The fence check (item 0), or the record (item 1), races another
    // write for a moment: transient, read back, written again once it
    // passed, applied once; the lock is not taken for lost.
    for item in [0, 1] {
        for write in ["record", "forget"] {
            t.proxy.set_faults(
                FaultPlan {
                    transact_item: Some(item),
                    ..FaultPlan::always(FaultKind::TransactionConflict)
                }
                .only(&["TransactWriteItems"]),
            );
            let before = t.proxy.stats().transaction_conflicts;
            let clear = async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                t.proxy.clear_faults();
            };
            let written = async {
                match write {
                    "record" => registry.record_member(&guard, &record).await,
                    _ => registry.forget_member(&guard, &record.instance_id).await,
                }
            };
            let (written, ()) = tokio::join!(written, clear);
            written.unwrap_or_else(|e| panic!("{write} with a conflict on item {item}: {e}"));
            assert!(t.proxy.stats().transaction_conflicts > before);
            assert!(guard.is_held(), "{}", guard.lost_reason());
            let members = registry.members().await.expect("members");
            assert_eq!(members.len(), usize::from(write == "record"), "{members:?}");
        }
    }
    t.proxy.clear_faults();
    registry
        .record_member(&guard, &record)
        .await
        .expect("recorded");
    let members = registry.members().await.expect("members");
    assert_eq!(
        members
            .iter()
            .map(|m| (m.instance_id.as_str(), m.member_id))
            .collect::<Vec<_>>(),
        [(record.instance_id.as_str(), record.member_id)]
    );

    // A publication refused by its condition (the sequence CAS), with or
    // without the item: read back consistently; not ours there, so a
    // conflict — never a lost lock, never assumed applied.
    let leader = locker.acquire(Purpose::Leader).await.expect("leader");
    let pointer = JoinPointer {
        secret_version: "v1".into(),
        key_version: None,
        seq: 1,
        endpoint: "api:6443".into(),
        ca_cert_hashes: vec!["sha256:00".into()],
        token_expires_at: SystemTime::now(),
        certs_expire_at: None,
        published_at: SystemTime::now(),
    };
    // The agent never asks for the item (ReturnValuesOnConditionCheckFailure),
    // so DynamoDB's refusal carries none and the read-back is its only
    // path: the proxy offers the item (with_item) and, like DynamoDB, sends
    // it only when asked. Whoever makes the agent ask must test that path.
    let asks_for_item = agent_sources_mentioning("return_values_on_condition_check_failure");
    assert!(
        asks_for_item.is_empty(),
        "the agent now asks for the refused item in {asks_for_item:?}: test what it does with it"
    );
    {
        t.proxy.set_faults(
            FaultPlan::always(FaultKind::ConditionalCheckFailed { with_item: true })
                .only(&["TransactWriteItems"]),
        );
        let before = t.proxy.log_for("GetItem").len();
        let e = registry
            .publish_join(&leader, &pointer)
            .await
            .expect_err("refused");
        assert!(matches!(e, RegistryError::Conflict { .. }), "{e}");
        assert!(leader.is_held(), "{}", leader.lost_reason());
        assert!(
            t.proxy.log_for("GetItem").len() > before,
            "the refusal was not read back"
        );
        assert_eq!(registry.join_pointer().await.expect("read"), None);
    }
    // The same refusal on the fence check is a lost lock (the fence moved).
    t.proxy.set_faults(
        FaultPlan {
            transact_item: Some(0),
            ..FaultPlan::always(FaultKind::ConditionalCheckFailed { with_item: false })
        }
        .only(&["TransactWriteItems"]),
    );
    let e = registry
        .publish_join(&leader, &pointer)
        .await
        .expect_err("fence refused");
    assert!(matches!(e, RegistryError::LockLost { .. }), "{e}");
    t.proxy.clear_faults();
    registry
        .publish_join(&guard_for_publish(&locker).await, &pointer)
        .await
        .expect("published once the refusals stop");
    guard.release().await.expect("released");
}

async fn guard_for_publish(locker: &Locker<DynamoLockStore>) -> kubeboot::lock::Guard {
    // The leader guard above was told it lost; take the lock anew (it is
    // still ours in the table, so wait out its lease like any contender).
    locker.acquire(Purpose::Leader).await.expect("leader again")
}

/// The agent's source files (agent/src) that contain `needle`.
fn agent_sources_mentioning(needle: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, needle: &str, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("agent/src readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, needle, found);
            } else if path.extension().is_some_and(|e| e == "rs")
                && std::fs::read_to_string(&path)
                    .expect("source")
                    .contains(needle)
            {
                found.push(path);
            }
        }
    }
    let mut found = vec![];
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
    walk(&src, needle, &mut found);
    found
}
