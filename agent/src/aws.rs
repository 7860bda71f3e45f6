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

/// Counts the SDK's own retries as the `Retries` metric (Kind `aws`): the
/// SDK retries inside one call, so without this a throttled table or a
/// flaky endpoint would be invisible until calls start failing.
#[derive(Debug)]
struct RetryCounter;

impl aws_smithy_runtime_api::client::interceptors::Intercept for RetryCounter {
    fn name(&self) -> &'static str {
        "kubeboot-retry-counter"
    }

    fn read_before_attempt(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let attempts = cfg
            .load::<aws_smithy_runtime_api::client::retries::RequestAttempts>()
            .map(|a| a.attempts())
            .unwrap_or(0);
        if attempts > 1 {
            crate::metrics::record(crate::metrics::RETRIES, 1.0, &[("Kind", "aws")]);
        }
        Ok(())
    }
}

macro_rules! client {
    ($name:ident, $krate:ident, $service:expr) => {
        /// A client with the endpoint override, the retry and timeout
        /// settings of `[aws]`, and the retry counter.
        pub fn $name(base: &SdkConfig, cfg: &Config) -> $krate::Client {
            let conf = $krate::config::Builder::from(&for_service(base, cfg, $service))
                .interceptor(RetryCounter)
                .build();
            $krate::Client::from_conf(conf)
        }
    };
}

client!(dynamodb_client, aws_sdk_dynamodb, Service::DynamoDb);
client!(ssm_client, aws_sdk_ssm, Service::Ssm);
client!(
    secretsmanager_client,
    aws_sdk_secretsmanager,
    Service::SecretsManager
);
client!(ec2_client, aws_sdk_ec2, Service::Ec2);
client!(sqs_client, aws_sdk_sqs, Service::Sqs);
client!(
    autoscaling_client,
    aws_sdk_autoscaling,
    Service::AutoScaling
);
