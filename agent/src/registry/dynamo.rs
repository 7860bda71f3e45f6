//! [`RegistryStore`] on DynamoDB: every write is a TransactWriteItems of a
//! ConditionCheck on the fencing lock item plus the record write.

use super::{
    ClusterState, InitClaim, JoinPointer, MemberRecord, Origin, Phase, RefreshRequest,
    RegistryStore, Wants, WriteResult,
};
use crate::lock::Fence;
use crate::table::{self, epoch_ms, n, s, store_error, StoreError, StoreErrorClass};
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Records of one cluster in one table.
#[derive(Debug, Clone)]
pub struct DynamoRegistryStore {
    client: Client,
    table: String,
    pk: String,
    /// The partition any node may write: refresh requests.
    requests_pk: String,
}

type Item = HashMap<String, AttributeValue>;

fn item_key(pk: &str, sk: String) -> Item {
    HashMap::from([
        (
            table::PARTITION_KEY.to_string(),
            AttributeValue::S(pk.to_string()),
        ),
        (table::SORT_KEY.to_string(), AttributeValue::S(sk)),
    ])
}

impl DynamoRegistryStore {
    pub fn new(client: Client, table: &str, cluster: &str) -> Self {
        DynamoRegistryStore {
            client,
            table: table.to_string(),
            pk: table::cluster_pk(cluster),
            requests_pk: table::requests_pk(cluster),
        }
    }

    fn key(&self, sk: String) -> Item {
        item_key(&self.pk, sk)
    }

    fn request_key(&self, sk: &str) -> Item {
        item_key(&self.requests_pk, sk.to_string())
    }

    fn fence_check(&self, fence: Fence) -> Result<TransactWriteItem, StoreError> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(table::lock_sk(fence.purpose.as_str()))))
            .condition_expression("#f = :fence AND #rel = :false")
            .expression_attribute_names("#f", "fence")
            .expression_attribute_names("#rel", "released")
            .expression_attribute_values(":fence", n(fence.value))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .build()
            .map_err(|e| invalid("fence check", &e))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    async fn transact(
        &self,
        operation: &'static str,
        fence: Fence,
        write: TransactWriteItem,
    ) -> Result<WriteResult, StoreError> {
        let result = self
            .client
            .transact_write_items()
            .transact_items(self.fence_check(fence)?)
            .transact_items(write)
            .send()
            .await;
        match result {
            Ok(_) => Ok(WriteResult::Applied),
            Err(SdkError::ServiceError(se))
                if matches!(
                    se.err(),
                    TransactWriteItemsError::TransactionCanceledException(_)
                ) =>
            {
                let TransactWriteItemsError::TransactionCanceledException(tce) = se.err() else {
                    return Err(StoreError {
                        class: StoreErrorClass::Permanent,
                        operation,
                        message: "unreachable".into(),
                    });
                };
                let codes: Vec<&str> = tce
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().unwrap_or("None"))
                    .collect();
                Ok(cancellation(&codes)).and_then(|r| {
                    r.map_err(|(class, why)| StoreError {
                        class,
                        operation,
                        message: format!("transaction cancelled: {why}: {codes:?}"),
                    })
                })
            }
            Err(SdkError::ServiceError(se))
                if matches!(
                    se.err(),
                    TransactWriteItemsError::TransactionInProgressException(_)
                ) =>
            {
                // An earlier attempt with the same idempotency token is still being applied.
                Err(StoreError {
                    class: StoreErrorClass::OutcomeUnknown,
                    operation,
                    message: "an earlier attempt of this transaction is still in progress".into(),
                })
            }
            Err(e) => Err(store_error(operation, &e)),
        }
    }
}

impl RegistryStore for DynamoRegistryStore {
    async fn read_state(&self) -> Result<Option<ClusterState>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(table::STATE_SK.into())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("read state", &e))?;
        out.item.as_ref().map(parse_state).transpose()
    }

    async fn begin_init(
        &self,
        fence: Fence,
        expected_generation: u64,
        claim: &InitClaim,
    ) -> Result<WriteResult, StoreError> {
        // A restore replaces whatever generation it read, initialized or
        // not, and names its snapshot; an init never replaces an
        // initialized generation, and clears the name.
        const SET: &str = "SET #phase = :initializing, #gen = :next, #ep = :ep, #ver = :ver, #by = :by, #run = :run, #f = :fence, #at = :wall";
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(table::STATE_SK.into())))
            .expression_attribute_names("#pk", table::PARTITION_KEY)
            .expression_attribute_names("#phase", "phase")
            .expression_attribute_names("#gen", "generation")
            .expression_attribute_names("#ep", "endpoint")
            .expression_attribute_names("#ver", "kubernetes_version")
            .expression_attribute_names("#by", "initialized_by")
            .expression_attribute_names("#run", "init_run_id")
            .expression_attribute_names("#f", "fence")
            .expression_attribute_names("#at", "updated_at")
            .expression_attribute_names("#rf", "restored_from")
            .expression_attribute_values(":initializing", s(Phase::Initializing.as_str()))
            .expression_attribute_values(":next", n(expected_generation + 1))
            .expression_attribute_values(":expected", n(expected_generation))
            .expression_attribute_values(":ep", s(&claim.endpoint))
            .expression_attribute_values(":ver", s(&claim.kubernetes_version))
            .expression_attribute_values(":by", s(&claim.initialized_by))
            .expression_attribute_values(":run", s(&claim.run_id))
            .expression_attribute_values(":fence", n(fence.value))
            .expression_attribute_values(":wall", n(epoch_ms(claim.wall)));
        let update = match &claim.restored_from {
            Some(snapshot) => update
                .update_expression(format!("{SET}, #rf = :rf"))
                .condition_expression("attribute_not_exists(#pk) OR #gen = :expected")
                .expression_attribute_values(":rf", s(snapshot)),
            None => update
                .update_expression(format!("{SET} REMOVE #rf"))
                .condition_expression(
                    "attribute_not_exists(#pk) OR (#gen = :expected AND #phase <> :initialized)",
                )
                .expression_attribute_values(":initialized", s(Phase::Initialized.as_str())),
        };
        let update = update.build().map_err(|e| invalid("begin init", &e))?;
        self.transact(
            "begin init",
            fence,
            TransactWriteItem::builder().update(update).build(),
        )
        .await
    }

    async fn finish_init(
        &self,
        fence: Fence,
        generation: u64,
        run_id: &str,
        wall: SystemTime,
    ) -> Result<WriteResult, StoreError> {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(table::STATE_SK.into())))
            .update_expression("SET #phase = :initialized, #at = :wall")
            .condition_expression("#phase = :initializing AND #gen = :gen AND #run = :run")
            .expression_attribute_names("#phase", "phase")
            .expression_attribute_names("#gen", "generation")
            .expression_attribute_names("#run", "init_run_id")
            .expression_attribute_names("#at", "updated_at")
            .expression_attribute_values(":initializing", s(Phase::Initializing.as_str()))
            .expression_attribute_values(":initialized", s(Phase::Initialized.as_str()))
            .expression_attribute_values(":gen", n(generation))
            .expression_attribute_values(":run", s(run_id))
            .expression_attribute_values(":wall", n(epoch_ms(wall)))
            .build()
            .map_err(|e| invalid("mark initialized", &e))?;
        self.transact(
            "mark initialized",
            fence,
            TransactWriteItem::builder().update(update).build(),
        )
        .await
    }

    async fn put_member(
        &self,
        fence: Fence,
        record: &MemberRecord,
    ) -> Result<WriteResult, StoreError> {
        let mut item = self.key(member_sk(&record.instance_id));
        item.insert("instance_id".into(), s(&record.instance_id));
        item.insert("member_id".into(), n(record.member_id));
        item.insert("name".into(), s(&record.name));
        item.insert("peer_url".into(), s(&record.peer_url));
        item.insert("confirmed_at".into(), n(epoch_ms(record.confirmed_at)));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| invalid("record member", &e))?;
        self.transact(
            "record member",
            fence,
            TransactWriteItem::builder().put(put).build(),
        )
        .await
    }

    async fn delete_member(
        &self,
        fence: Fence,
        instance_id: &str,
    ) -> Result<WriteResult, StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(member_sk(instance_id))))
            .build()
            .map_err(|e| invalid("forget member", &e))?;
        self.transact(
            "forget member",
            fence,
            TransactWriteItem::builder().delete(delete).build(),
        )
        .await
    }

    async fn put_join(
        &self,
        fence: Fence,
        pointer: &JoinPointer,
    ) -> Result<WriteResult, StoreError> {
        let mut item = self.key(table::JOIN_SK.into());
        item.insert("secret_version".into(), s(&pointer.secret_version));
        if let Some(key_version) = &pointer.key_version {
            item.insert("key_version".into(), s(key_version));
        }
        item.insert("seq".into(), n(pointer.seq));
        item.insert("endpoint".into(), s(&pointer.endpoint));
        item.insert(
            "ca_cert_hashes".into(),
            AttributeValue::L(pointer.ca_cert_hashes.iter().map(|h| s(h)).collect()),
        );
        item.insert(
            "token_expires_at".into(),
            n(epoch_ms(pointer.token_expires_at)),
        );
        if let Some(at) = pointer.certs_expire_at {
            item.insert("certs_expire_at".into(), n(epoch_ms(at)));
        }
        item.insert("published_at".into(), n(epoch_ms(pointer.published_at)));
        item.insert("fence".into(), n(fence.value));
        // Compare-and-swap on the publication number: a late-landing or
        // concurrent publish cannot roll the pointer back or skip one, and no
        // host's clock is compared with another's.
        let previous = pointer.seq.saturating_sub(1);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .expression_attribute_names("#seq", "seq");
        let put = if previous == 0 {
            put.condition_expression("attribute_not_exists(#pk) OR attribute_not_exists(#seq)")
                .expression_attribute_names("#pk", table::PARTITION_KEY)
        } else {
            put.condition_expression("#seq = :previous")
                .expression_attribute_values(":previous", n(previous))
        };
        let put = put
            .build()
            .map_err(|e| invalid("publish join pointer", &e))?;
        self.transact(
            "publish join pointer",
            fence,
            TransactWriteItem::builder().put(put).build(),
        )
        .await
    }

    async fn read_join(&self) -> Result<Option<JoinPointer>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(table::JOIN_SK.into())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("read join pointer", &e))?;
        out.item.as_ref().map(parse_join).transpose()
    }

    async fn put_refresh(&self, request: &RefreshRequest) -> Result<(), StoreError> {
        let operation = "request join material refresh";
        match request.origin {
            // Workers may write the request partition only (PutItem there).
            Origin::Worker => {
                let mut item = self.request_key(table::REFRESH_SK);
                item.insert("requested_by".into(), s(&request.requested_by));
                item.insert("what".into(), s(request.what.as_str()));
                item.insert("stale_version".into(), s(&request.stale_version));
                item.insert("requested_at".into(), n(epoch_ms(request.requested_at)));
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .send()
                    .await
                    .map_err(|e| store_error(operation, &e))?;
            }
            // Control planes write the cluster partition, which the worker
            // role cannot (UpdateItem, which they already have for the locks).
            Origin::ControlPlane => {
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(self.key(table::REFRESH_SK.into())))
                    .update_expression(
                        "SET requested_by = :by, #what = :what, stale_version = :stale, requested_at = :at",
                    )
                    .expression_attribute_names("#what", "what")
                    .expression_attribute_values(":by", s(&request.requested_by))
                    .expression_attribute_values(":what", s(request.what.as_str()))
                    .expression_attribute_values(":stale", s(&request.stale_version))
                    .expression_attribute_values(":at", n(epoch_ms(request.requested_at)))
                    .send()
                    .await
                    .map_err(|e| store_error(operation, &e))?;
            }
        }
        Ok(())
    }

    async fn read_refresh(&self) -> Result<Vec<RefreshRequest>, StoreError> {
        let mut requests = Vec::new();
        for (origin, key) in [
            (Origin::Worker, self.request_key(table::REFRESH_SK)),
            (Origin::ControlPlane, self.key(table::REFRESH_SK.into())),
        ] {
            let out = self
                .client
                .get_item()
                .table_name(&self.table)
                .set_key(Some(key))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| store_error("read refresh request", &e))?;
            if let Some(item) = out.item.as_ref() {
                requests.push(parse_refresh(item, origin)?);
            }
        }
        Ok(requests)
    }

    async fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        let mut members = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_names("#pk", table::PARTITION_KEY)
                .expression_attribute_names("#sk", table::SORT_KEY)
                .expression_attribute_values(":pk", s(&self.pk))
                .expression_attribute_values(":prefix", s(table::MEMBER_SK_PREFIX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("list members", &e))?;
            for item in out.items() {
                members.push(parse_member(item)?);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        members.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(members)
    }
}

/// Reads TransactionCanceledException's reasons, in item order: the fence
/// check first, the record write second.
fn cancellation(codes: &[&str]) -> Result<WriteResult, (StoreErrorClass, &'static str)> {
    const TRANSIENT: &[&str] = &[
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    ];
    match codes {
        ["ConditionalCheckFailed", ..] => Ok(WriteResult::FenceRejected),
        [_, "ConditionalCheckFailed"] => Ok(WriteResult::ConditionFailed),
        _ if codes.iter().any(|c| TRANSIENT.contains(c)) => {
            Err((StoreErrorClass::Transient, "conflict or throttling"))
        }
        _ => Err((StoreErrorClass::Permanent, "rejected by DynamoDB")),
    }
}

/// Sort key of a member record.
pub fn member_sk(instance_id: &str) -> String {
    format!("{}{instance_id}", table::MEMBER_SK_PREFIX)
}

fn parse_state(item: &Item) -> Result<ClusterState, StoreError> {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let num = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let phase = text("phase")
        .and_then(|p| Phase::parse(&p))
        .ok_or_else(|| malformed("read state", "phase"))?;
    Ok(ClusterState {
        phase,
        generation: num("generation").ok_or_else(|| malformed("read state", "generation"))?,
        endpoint: text("endpoint"),
        kubernetes_version: text("kubernetes_version"),
        initialized_by: text("initialized_by"),
        init_run_id: text("init_run_id"),
        fence: num("fence"),
        restored_from: text("restored_from"),
        updated_at: num("updated_at").map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    })
}

fn parse_member(item: &Item) -> Result<MemberRecord, StoreError> {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let num = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok(MemberRecord {
        instance_id: text("instance_id").ok_or_else(|| malformed("list members", "instance_id"))?,
        member_id: num("member_id").ok_or_else(|| malformed("list members", "member_id"))?,
        name: text("name").unwrap_or_default(),
        peer_url: text("peer_url").unwrap_or_default(),
        confirmed_at: UNIX_EPOCH + Duration::from_millis(num("confirmed_at").unwrap_or(0)),
    })
}

fn parse_join(item: &Item) -> Result<JoinPointer, StoreError> {
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let time = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    };
    Ok(JoinPointer {
        secret_version: text("secret_version")
            .ok_or_else(|| malformed("read join pointer", "secret_version"))?,
        key_version: text("key_version"),
        // A pointer an older agent wrote has no number: publication 0.
        seq: item
            .get("seq")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0),
        endpoint: text("endpoint").unwrap_or_default(),
        ca_cert_hashes: item
            .get("ca_cert_hashes")
            .and_then(|v| v.as_l().ok())
            .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
            .unwrap_or_default(),
        token_expires_at: time("token_expires_at")
            .ok_or_else(|| malformed("read join pointer", "token_expires_at"))?,
        certs_expire_at: time("certs_expire_at"),
        published_at: time("published_at").unwrap_or(UNIX_EPOCH),
    })
}

fn parse_refresh(item: &Item, origin: Origin) -> Result<RefreshRequest, StoreError> {
    let text = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| malformed("read refresh request", k))
    };
    Ok(RefreshRequest {
        origin,
        requested_by: text("requested_by")?,
        what: Wants::parse(&text("what")?),
        stale_version: text("stale_version")?,
        requested_at: item
            .get("requested_at")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(UNIX_EPOCH, |ms| UNIX_EPOCH + Duration::from_millis(ms)),
    })
}

fn malformed(operation: &'static str, what: &str) -> StoreError {
    StoreError {
        class: StoreErrorClass::Permanent,
        operation,
        message: format!("record is malformed: {what} (edited by hand?)"),
    }
}

fn invalid(operation: &'static str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError {
        class: StoreErrorClass::Permanent,
        operation,
        message: format!("request could not be built: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancellation_reasons_name_the_failed_item() {
        assert_eq!(
            cancellation(&["ConditionalCheckFailed", "None"]),
            Ok(WriteResult::FenceRejected)
        );
        assert_eq!(
            cancellation(&["None", "ConditionalCheckFailed"]),
            Ok(WriteResult::ConditionFailed)
        );
        assert!(matches!(
            cancellation(&["TransactionConflict", "None"]),
            Err((StoreErrorClass::Transient, _))
        ));
        assert!(matches!(
            cancellation(&["None", "ValidationError"]),
            Err((StoreErrorClass::Permanent, _))
        ));
        assert!(matches!(
            cancellation(&[]),
            Err((StoreErrorClass::Permanent, _))
        ));
    }
}
