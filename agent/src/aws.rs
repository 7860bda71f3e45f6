//! AWS SDK configuration shared by every client the agent builds.
//!
//! One place applies the region, the credential chain (environment, then the
//! instance role through the configured IMDS endpoint), the SDK's standard
//! retry mode and timeouts from `[aws]`, and per-service endpoint overrides,
//! so that tests and the local demo reach moto_server through the very same
//! clients that reach AWS in production.

use crate::config::{model, Config};
use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// The AWS services the agent calls; each may have its own endpoint override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    DynamoDb,
    Ssm,
    SecretsManager,
    Ec2,
    S3,
    Sqs,
    AutoScaling,
    Sts,
}

impl Service {
    /// The override for this service, if configured.
    pub fn endpoint(self, endpoints: &model::Endpoints) -> Option<&str> {
        match self {
            Service::DynamoDb => endpoints.dynamodb.as_deref(),
            Service::Ssm => endpoints.ssm.as_deref(),
            Service::SecretsManager => endpoints.secretsmanager.as_deref(),
            Service::Ec2 => endpoints.ec2.as_deref(),
            Service::S3 => endpoints.s3.as_deref(),
            Service::Sqs => endpoints.sqs.as_deref(),
            Service::AutoScaling => endpoints.autoscaling.as_deref(),
            Service::Sts => endpoints.sts.as_deref(),
        }
    }
}

/// Failure to prepare AWS access.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IMDS endpoint {endpoint:?} is not usable for instance-role credentials: {reason}")]
    ImdsEndpoint { endpoint: String, reason: String },
}

/// Builds the base SDK configuration for `region`.
pub async fn sdk_config(cfg: &Config, region: &str) -> Result<SdkConfig, Error> {
    let imds = aws_config::imds::Client::builder()
        .endpoint(cfg.imds.endpoint.as_str())
        .map_err(|e| Error::ImdsEndpoint {
            endpoint: cfg.imds.endpoint.clone(),
            reason: e.to_string(),
        })?
        .read_timeout(cfg.imds.request_timeout)
        .connect_timeout(cfg.imds.request_timeout)
        .build();
    let credentials = CredentialsProviderChain::first_try(
        "Environment",
        EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else(
        "InstanceRole",
        ImdsCredentialsProvider::builder().imds_client(imds).build(),
    );
    Ok(aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .credentials_provider(credentials)
        .retry_config(crate::retry::aws_retry_config(&cfg.aws))
        .timeout_config(crate::retry::aws_timeout_config(&cfg.aws))
        .load()
        .await)
}

/// The base configuration with `service`'s endpoint override applied.
pub fn for_service(base: &SdkConfig, cfg: &Config, service: Service) -> SdkConfig {
    match service.endpoint(&cfg.aws.endpoints) {
        Some(url) => base.to_builder().endpoint_url(url).build(),
        None => base.clone(),
    }
}
