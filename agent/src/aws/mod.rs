//! AWS SDK configuration shared by every client the agent builds.
//!
//! One place applies the region, the credential chain (environment, then the
//! instance role through the configured IMDS endpoint), the SDK's standard
//! retry mode and timeouts from `[aws]`, and per-service endpoint overrides,
//! so that tests and the local demo reach moto_server through the very same
//! clients that reach AWS in production.
//!
//! The calls to each service live in the submodule named for it (its
//! adapter: the calls, their errors and the types AWS answers with), so
//! "where do we call SQS" is answered by the file tree. DynamoDB's are
//! `crate::table` (shared) and the lock's and the registry's own
//! `dynamo.rs`; CloudFormation's signal is `crate::cloudformation`.

pub mod autoscaling;
pub mod ec2;
pub mod s3;
pub mod secrets;
pub mod sqs;
pub mod ssm;

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
    CloudFormation,
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
            Service::CloudFormation => endpoints.cloudformation.as_deref(),
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

/// Refuses, before anything is sent, a call that `iam::OPERATIONS` does not
/// grant this node's role: the instance role in infra/ is generated from the
/// same list and would deny it in production, so a test reaching the call
/// fails now with the reason instead.
#[derive(Debug)]
struct OperationGuard {
    /// The IAM service prefix (`dynamodb`, `secretsmanager`, ...).
    service: &'static str,
    role: crate::config::model::Role,
}

impl aws_smithy_runtime_api::client::interceptors::Intercept for OperationGuard {
    fn name(&self) -> &'static str {
        "kubeboot-operation-guard"
    }

    // Not read_before_execution: a client interceptor runs that before the
    // operation's configuration (which holds its name) is applied.
    fn read_before_serialization(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let Some(meta) = cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
        else {
            return Err(format!(
                "{} call without operation metadata: cannot check it against agent/src/iam.rs",
                self.service
            )
            .into());
        };
        let action = format!("{}:{}", self.service, meta.name());
        if crate::iam::permits(self.role, &action) {
            Ok(())
        } else {
            Err(crate::iam::refusal(self.role, &action).into())
        }
    }
}

macro_rules! client {
    ($name:ident, $krate:ident, $service:expr, $iam:literal) => {
        /// A client with the endpoint override, the retry and timeout
        /// settings of `[aws]`, the retry counter and the operation guard.
        pub fn $name(base: &SdkConfig, cfg: &Config) -> $krate::Client {
            let conf = $krate::config::Builder::from(&for_service(base, cfg, $service))
                .interceptor(RetryCounter)
                .interceptor(OperationGuard {
                    service: $iam,
                    role: cfg.node.role,
                })
                .build();
            $krate::Client::from_conf(conf)
        }
    };
}

client!(
    dynamodb_client,
    aws_sdk_dynamodb,
    Service::DynamoDb,
    "dynamodb"
);
client!(ssm_client, aws_sdk_ssm, Service::Ssm, "ssm");
client!(
    secretsmanager_client,
    aws_sdk_secretsmanager,
    Service::SecretsManager,
    "secretsmanager"
);
client!(ec2_client, aws_sdk_ec2, Service::Ec2, "ec2");

/// The S3 client: as [`client!`]'s, with the bucket addressing of
/// `aws.s3_force_path_style` (path-style for moto and some endpoints).
pub fn s3_client(base: &SdkConfig, cfg: &Config) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(&for_service(base, cfg, Service::S3))
        .force_path_style(cfg.aws.s3_force_path_style)
        .interceptor(RetryCounter)
        .interceptor(OperationGuard {
            service: "s3",
            role: cfg.node.role,
        })
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}
client!(sqs_client, aws_sdk_sqs, Service::Sqs, "sqs");
client!(
    autoscaling_client,
    aws_sdk_autoscaling,
    Service::AutoScaling,
    "autoscaling"
);

client!(
    cloudformation_client,
    aws_sdk_cloudformation,
    Service::CloudFormation,
    "cloudformation"
);

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        match self {
            self::Error::ImdsEndpoint { .. } => &crate::catalogue::AWS_IMDS_ENDPOINT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{merge, parse_toml, Source};

    fn config(role: &str) -> Config {
        let toml = format!(
            "[cluster]\nname = \"guard\"\nkubernetes_version = \"1.31.2\"\n\
             control_plane_endpoint = \"api.guard.internal:6443\"\n\
             [node]\nrole = \"{role}\"\n[aws]\ntable = \"kubeboot-guard\"\nmax_attempts = 1\n\
             backup_bucket = \"kubeboot-guard\"\n\
             [aws.endpoints]\ndynamodb = \"http://127.0.0.1:1\"\n"
        );
        let mut problems = Vec::new();
        let layer = parse_toml(Source::File("guard.toml".into()), &toml, &mut problems);
        merge(&[layer], problems).expect("valid config").config
    }

    fn base() -> SdkConfig {
        SdkConfig::builder()
            .region(Region::new("eu-west-1"))
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
                aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"),
            ))
            .build()
    }

    async fn update_item(role: &str) -> String {
        let cfg = config(role);
        let client = dynamodb_client(&base(), &cfg);
        let err = client
            .update_item()
            .table_name("kubeboot-guard")
            .key("pk", aws_sdk_dynamodb::types::AttributeValue::S("x".into()))
            .send()
            .await
            .expect_err("nothing listens on port 1");
        aws_smithy_types::error::display::DisplayErrorContext(&err).to_string()
    }

    #[tokio::test]
    async fn a_worker_updating_an_item_is_refused_before_anything_is_sent() {
        let message = update_item("worker").await;
        assert!(
            message.contains("does not perform dynamodb:UpdateItem as a worker node"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_control_plane_updating_an_item_gets_as_far_as_the_network() {
        let message = update_item("control-plane").await;
        assert!(!message.contains("does not perform"), "{message}");
    }
}
