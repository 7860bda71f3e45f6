//! [`LockStore`] on DynamoDB: each operation is one conditional write or one
//! consistent read of the `CLUSTER#<name>` / `LOCK#<purpose>` item.

use super::{Claim, LockItem, LockStore, Purpose};
use crate::table::{
    self, conditional, epoch_ms, is_condition_failed, n, s, store_error, StoreError,
    StoreErrorClass,
};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attribute names. `owner` is a DynamoDB reserved word: every expression
/// uses placeholders.
const OWNER: &str = "owner";
const RVN: &str = "rvn";
const LEASE_MS: &str = "lease_ms";
const FENCE: &str = "fence";
const RELEASED: &str = "released";
const HEARTBEAT_AT: &str = "heartbeat_at";
const ACQUIRED_AT: &str = "acquired_at";

/// Lock items of one cluster in one table.
#[derive(Debug, Clone)]
pub struct DynamoLockStore {
    client: Client,
    table: String,
    pk: String,
}

impl DynamoLockStore {
    pub fn new(client: Client, table: &str, cluster: &str) -> Self {
        DynamoLockStore {
            client,
            table: table.to_string(),
            pk: table::cluster_pk(cluster),
        }
    }

    fn key(&self, purpose: Purpose) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (
                table::PARTITION_KEY.to_string(),
                AttributeValue::S(self.pk.clone()),
            ),
            (
                table::SORT_KEY.to_string(),
                AttributeValue::S(lock_sk(purpose)),
            ),
        ])
    }

    /// An update of the lock item; attribute-name placeholders are added for
    /// exactly those the expressions use (DynamoDB rejects unused ones).
    fn update(
        &self,
        purpose: Purpose,
        update: &str,
        condition: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(purpose)))
            .update_expression(update)
            .condition_expression(condition);
        for (placeholder, name) in [
            ("#pk", table::PARTITION_KEY),
            ("#o", OWNER),
            ("#r", RVN),
            ("#l", LEASE_MS),
            ("#f", FENCE),
            ("#rel", RELEASED),
            ("#hb", HEARTBEAT_AT),
            ("#acq", ACQUIRED_AT),
        ] {
            if uses(update, placeholder) || uses(condition, placeholder) {
                req = req.expression_attribute_names(placeholder, name);
            }
        }
        req
    }

    /// Claim writes share their SET part; only the condition differs.
    async fn claim_write(
        &self,
        operation: &'static str,
        purpose: Purpose,
        condition: &str,
        observed: Option<&str>,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        let mut req = self
            .update(
                purpose,
                "SET #o = :owner, #r = :rvn, #l = :lease, #rel = :false, #hb = :wall, #acq = :wall ADD #f :one",
                condition,
            )
            .expression_attribute_values(":owner", s(claim.owner))
            .expression_attribute_values(":rvn", s(claim.rvn))
            .expression_attribute_values(":lease", n(claim.lease.as_millis()))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":wall", n(epoch_ms(claim.wall)))
            .expression_attribute_values(":one", n(1u8))
            .return_values(ReturnValue::AllNew);
        if condition.contains(":true") {
            req = req.expression_attribute_values(":true", AttributeValue::Bool(true));
        }
        if let Some(seen) = observed {
            req = req.expression_attribute_values(":seen", s(seen));
        }
        match req.send().await {
            Ok(out) => Ok(Some(parse(operation, out.attributes.as_ref())?)),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(store_error(operation, &e)),
        }
    }
}

impl LockStore for DynamoLockStore {
    async fn acquire_free(
        &self,
        purpose: Purpose,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        self.claim_write(
            "acquire lock",
            purpose,
            "attribute_not_exists(#pk) OR #rel = :true",
            None,
            claim,
        )
        .await
    }

    async fn take_over(
        &self,
        purpose: Purpose,
        observed: &str,
        claim: &Claim<'_>,
    ) -> Result<Option<LockItem>, StoreError> {
        self.claim_write(
            "take over lock",
            purpose,
            "#r = :seen AND #rel = :false",
            Some(observed),
            claim,
        )
        .await
    }

    async fn read(&self, purpose: Purpose) -> Result<Option<LockItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(purpose)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("read lock", &e))?;
        out.item
            .as_ref()
            .map(|item| parse("read lock", Some(item)))
            .transpose()
    }

    async fn heartbeat(
        &self,
        purpose: Purpose,
        owner: &str,
        old: &str,
        new: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        let result = self
            .update(
                purpose,
                "SET #r = :new, #hb = :wall",
                "#o = :owner AND #r = :old AND #rel = :false",
            )
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":old", s(old))
            .expression_attribute_values(":new", s(new))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":wall", n(epoch_ms(wall)))
            .send()
            .await;
        conditional("renew lock", result.map(|_| ()))
    }

    async fn release(
        &self,
        purpose: Purpose,
        owner: &str,
        rvn: &str,
        wall: SystemTime,
    ) -> Result<bool, StoreError> {
        let result = self
            .update(
                purpose,
                "SET #rel = :true, #hb = :wall",
                "#o = :owner AND #r = :rvn AND #rel = :false",
            )
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":rvn", s(rvn))
            .expression_attribute_values(":true", AttributeValue::Bool(true))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":wall", n(epoch_ms(wall)))
            .send()
            .await;
        conditional("release lock", result.map(|_| ()))
    }

    async fn force_release(
        &self,
        purpose: Purpose,
        observed: &str,
        wall: SystemTime,
    ) -> Result<Option<LockItem>, StoreError> {
        let result = self
            .update(
                purpose,
                "SET #rel = :true, #hb = :wall ADD #f :one",
                "#r = :seen AND #rel = :false",
            )
            .expression_attribute_values(":seen", s(observed))
            .expression_attribute_values(":true", AttributeValue::Bool(true))
            .expression_attribute_values(":false", AttributeValue::Bool(false))
            .expression_attribute_values(":wall", n(epoch_ms(wall)))
            .expression_attribute_values(":one", n(1u8))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(parse("force release", out.attributes.as_ref())?)),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(store_error("force release", &e)),
        }
    }
}

/// Whether `expr` uses `placeholder` as a whole token (`#r` is not `#rel`).
fn uses(expr: &str, placeholder: &str) -> bool {
    expr.match_indices(placeholder).any(|(i, _)| {
        !expr[i + placeholder.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Sort key of a lock item.
pub fn lock_sk(purpose: Purpose) -> String {
    table::lock_sk(purpose.as_str())
}

fn parse(
    operation: &'static str,
    item: Option<&HashMap<String, AttributeValue>>,
) -> Result<LockItem, StoreError> {
    let bad = |what: &str| StoreError {
        class: StoreErrorClass::Permanent,
        operation,
        message: format!("lock item is malformed: {what} (edited by hand?)"),
    };
    let item = item.ok_or_else(|| bad("no attributes returned"))?;
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let num = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok(LockItem {
        owner: text(OWNER).ok_or_else(|| bad("owner"))?,
        rvn: text(RVN).ok_or_else(|| bad("rvn"))?,
        lease: Duration::from_millis(num(LEASE_MS).ok_or_else(|| bad("lease_ms"))?),
        fence: num(FENCE).ok_or_else(|| bad("fence"))?,
        released: item
            .get(RELEASED)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        heartbeat_at: num(HEARTBEAT_AT).map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_match_whole_tokens() {
        assert!(super::uses("#r = :old AND #rel = :false", "#r"));
        assert!(!super::uses("#rel = :false", "#r"));
        assert!(super::uses("SET #rel = :true", "#rel"));
    }
}
