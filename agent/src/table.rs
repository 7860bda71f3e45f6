//! The one DynamoDB table: its key schema and item keys.
//!
//! Defined once here and used by the lock, the registry, the tests (which
//! create tables from it) and the CloudFormation cross-check, so the code,
//! the tests and the template cannot drift apart. The helpers both stores
//! share (the lock's and the registry's) live here too: how a DynamoDB
//! error becomes a [`StoreError`], attribute values, epoch milliseconds.

use crate::retry::{self, RetryClass};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TimeToLiveSpecification,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use std::time::{SystemTime, UNIX_EPOCH};

/// Partition key attribute (string): `CLUSTER#<name>`.
pub const PARTITION_KEY: &str = "pk";
/// Sort key attribute (string): `STATE`, `JOIN`, `REFRESH`, `LOCK#<purpose>`, `MEMBER#<instance-id>`.
pub const SORT_KEY: &str = "sk";
/// TTL attribute (epoch seconds), used for garbage only: never for the lock or records that matter.
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// Sort key of the cluster record.
pub const STATE_SK: &str = "STATE";
/// Sort key of the pointer to the current join material.
pub const JOIN_SK: &str = "JOIN";
/// Sort key of a joiner's request for fresh join material.
pub const REFRESH_SK: &str = "REFRESH";
/// Prefix of lock items' sort keys.
pub const LOCK_SK_PREFIX: &str = "LOCK#";
/// Prefix of member records' sort keys.
pub const MEMBER_SK_PREFIX: &str = "MEMBER#";

/// The partition key of a cluster's items.
pub fn cluster_pk(cluster: &str) -> String {
    format!("CLUSTER#{cluster}")
}

/// The sort key of the lock named `purpose` (`LOCK#<purpose>`).
pub fn lock_sk(purpose: &str) -> String {
    format!("{LOCK_SK_PREFIX}{purpose}")
}

/// The partition of requests any node may write (`REQUESTS#<name>`; today the
/// join-material refresh request). Kept apart from the cluster's records so an
/// instance role can be allowed to put items here and nowhere else
/// (`dynamodb:LeadingKeys`): a worker cannot overwrite STATE, a lock or a member.
pub fn requests_pk(cluster: &str) -> String {
    format!("REQUESTS#{cluster}")
}

/// Failure to create the table (tests and the local demo only; production uses the template).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create DynamoDB table {table}: {message}")]
    Create { table: String, message: String },
}

/// Creates the table as the template does: on demand, `pk`/`sk` strings, TTL on `expires_at`.
pub async fn create(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), Error> {
    let fail = |e: &dyn std::fmt::Display| Error::Create {
        table: table.to_string(),
        message: e.to_string(),
    };
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr(PARTITION_KEY).map_err(|e| fail(&e))?)
        .attribute_definitions(attr(SORT_KEY).map_err(|e| fail(&e))?)
        .key_schema(key(PARTITION_KEY, KeyType::Hash).map_err(|e| fail(&e))?)
        .key_schema(key(SORT_KEY, KeyType::Range).map_err(|e| fail(&e))?)
        .send()
        .await
        .map_err(|e| fail(&aws_sdk_dynamodb::error::DisplayErrorContext(&e)))?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(TTL_ATTRIBUTE)
                .enabled(true)
                .build()
                .map_err(|e| fail(&e))?,
        )
        .send()
        .await
        .map_err(|e| fail(&aws_sdk_dynamodb::error::DisplayErrorContext(&e)))?;
    Ok(())
}

/// How a store call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorClass {
    /// Nothing happened; trying again may work (throttling, 5xx after the SDK's retries).
    Transient,
    /// Nothing happened and trying again will not help (denied, no table).
    Permanent,
    /// We do not know whether the write applied (timeout): read back.
    OutcomeUnknown,
}

/// A store call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct StoreError {
    pub class: StoreErrorClass,
    pub operation: &'static str,
    pub message: String,
}

impl StoreError {
    /// The AWS call behind this error when it failed as weather (throttled,
    /// 5xx, or no answer and no read-back) rather than for good.
    pub fn weather(&self) -> Option<retry::AwsCall> {
        (self.class != StoreErrorClass::Permanent).then_some(retry::AwsCall {
            service: "DynamoDB",
            operation: self.operation,
        })
    }
}

/// The outcome of a conditional write: `Ok(false)` when its condition refused it.
pub fn conditional<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
    result: Result<(), SdkError<E, HttpResponse>>,
) -> Result<bool, StoreError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_condition_failed(&e) => Ok(false),
        Err(e) => Err(store_error(operation, &e)),
    }
}

/// Whether a write was refused by its condition (the expected "no").
pub fn is_condition_failed<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    matches!(e, SdkError::ServiceError(se) if se.err().code() == Some("ConditionalCheckFailedException"))
}

/// Maps an SDK error to the store's classes (the SDK already retried it).
pub fn store_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
    e: &SdkError<E, HttpResponse>,
) -> StoreError {
    let class = if retry::outcome_unknown(e) {
        StoreErrorClass::OutcomeUnknown
    } else if retry::classify_sdk_error(e) == RetryClass::Transient {
        StoreErrorClass::Transient
    } else {
        StoreErrorClass::Permanent
    };
    StoreError {
        class,
        operation,
        message: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
    }
}

/// A string attribute value.
pub fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

/// A number attribute value.
pub fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Milliseconds since the epoch; a clock before 1970 reads as 0 (display only).
pub fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
