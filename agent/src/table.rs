//! The one DynamoDB table: its key schema and item keys.
//!
//! Defined once here and used by the lock, the registry, the tests (which
//! create tables from it) and the CloudFormation cross-check, so the code,
//! the tests and the template cannot drift apart.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

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
