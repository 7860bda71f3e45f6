//! Secrets Manager: one version of a secret read, a new version written (the
//! secret created on its first write). The calls only; what the secrets hold
//! and which version is current is [`crate::join_material`]'s.

use crate::retry::{classify_sdk_error, RetryClass};
use crate::secret::Secret;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

/// A Secrets Manager call failed (after the SDK's retries). Never carries a
/// secret's value: the SDK's messages name the secret, not its content.
#[derive(Debug, thiserror::Error)]
#[error("Secrets Manager {operation} on secret {secret}: {message}")]
pub struct Error {
    pub operation: &'static str,
    pub secret: String,
    pub class: RetryClass,
    pub message: String,
}

impl Error {
    fn new<E>(operation: &'static str, secret: &str, e: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Error {
            operation,
            secret: secret.to_string(),
            class: classify_sdk_error(e),
            message: DisplayErrorContext(e).to_string(),
        }
    }
}

/// The Secrets Manager client.
#[derive(Debug, Clone)]
pub struct Secrets {
    client: aws_sdk_secretsmanager::Client,
}

impl Secrets {
    pub fn new(client: aws_sdk_secretsmanager::Client) -> Self {
        Secrets { client }
    }

    /// The string of version `version` of `secret`; `None` when that version
    /// holds binary data instead.
    pub async fn get_string(
        &self,
        secret: &str,
        version: &str,
    ) -> Result<Option<Secret<String>>, Error> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(secret)
            .version_id(version)
            .send()
            .await
            .map_err(|e| Error::new("GetSecretValue", secret, &e))?;
        Ok(out.secret_string.map(Secret::new))
    }

    /// Writes `body` as a new version of `secret` with `request_token` (a
    /// write that repeats the token and content is the same request: no
    /// second version), creating the secret with `description` if it does
    /// not exist yet, and putting the version after all if another writer
    /// created it first. Returns the new VersionId, which Secrets Manager
    /// takes from the token.
    pub async fn put(
        &self,
        secret: &str,
        request_token: &str,
        body: &Secret<String>,
        description: &str,
    ) -> Result<String, Error> {
        let put = || {
            self.client
                .put_secret_value()
                .secret_id(secret)
                .client_request_token(request_token)
                .secret_string(body.expose())
                .send()
        };
        let version = match put().await {
            Ok(out) => out.version_id,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                tracing::info!(secret, "the secret does not exist yet; creating it");
                let created = self
                    .client
                    .create_secret()
                    .name(secret)
                    .description(description)
                    .client_request_token(request_token)
                    .secret_string(body.expose())
                    .send()
                    .await;
                match created {
                    Ok(out) => out.version_id,
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_exists_exception()) =>
                    {
                        // Another writer created it first: put our version.
                        put()
                            .await
                            .map_err(|e| Error::new("PutSecretValue", secret, &e))?
                            .version_id
                    }
                    Err(e) => return Err(Error::new("CreateSecret", secret, &e)),
                }
            }
            Err(e) => return Err(Error::new("PutSecretValue", secret, &e)),
        };
        Ok(version.unwrap_or_else(|| request_token.to_string()))
    }
}
