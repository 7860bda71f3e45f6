//! SSM Parameter Store: plain (not secret) string parameters written. The
//! call only; which parameters and when is [`crate::join_material`]'s.

use crate::retry::{classify_sdk_error, RetryClass};
use aws_sdk_ssm::error::DisplayErrorContext;

/// An SSM call failed (after the SDK's retries).
#[derive(Debug, thiserror::Error)]
#[error("SSM {operation} on parameter {parameter}: {message}")]
pub struct Error {
    pub operation: &'static str,
    pub parameter: String,
    pub class: RetryClass,
    pub message: String,
}

/// The SSM client.
#[derive(Debug, Clone)]
pub struct Parameters {
    client: aws_sdk_ssm::Client,
}

impl Parameters {
    /// SSM answers `TooManyUpdates` to a parameter updated in quick
    /// succession, which the SDK's default classifiers do not retry: the
    /// client given is rebuilt so that the SDK's own retry strategy treats
    /// it as throttling.
    pub fn new(client: aws_sdk_ssm::Client) -> Self {
        let client = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::Client::config(&client)
                .to_builder()
                .retry_classifier(crate::retry::ThrottlingCodes::<
                    aws_sdk_ssm::operation::put_parameter::PutParameterError,
                >::new(crate::retry::SSM_THROTTLING_CODES))
                .build(),
        );
        Parameters { client }
    }

    /// Writes `value` to the String parameter `name`, overwriting it.
    pub async fn put_string(&self, name: &str, value: &str) -> Result<(), Error> {
        self.client
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| Error {
                operation: "PutParameter",
                parameter: name.to_string(),
                class: classify_sdk_error(&e),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }
}
