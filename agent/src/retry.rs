//! Retries, in one place.
//!
//! Two kinds, never stacked on each other:
//! - AWS calls retry inside the SDK (standard mode) with attempts, backoff and
//!   timeouts from `[aws]`; callers do not wrap them in a second loop.
//! - Application-level waits (IMDS in early boot, "etcd healthy yet?",
//!   "node Ready yet?") use [`with_retries`] over `backon`, always with an
//!   explicit attempt limit and, where it matters, a deadline.
//!
//! Whether an error is worth another attempt is decided here: by
//! [`Classify`] for our own errors and [`classify_sdk_error`] for AWS.

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use backon::{ExponentialBuilder, Retryable};
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Throttling, timeouts, connection failures, 5xx: try again.
    Transient,
    /// Bad input, denied, not found, failed condition: trying again changes nothing.
    Permanent,
}

/// Errors that know whether they are worth retrying.
pub trait Classify {
    fn retry_class(&self) -> RetryClass;
}

/// An application-level wait policy: exponential backoff with jitter, an
/// attempt limit that is always explicit, and an optional overall deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Attempts in total, including the first. Never unbounded.
    pub max_attempts: usize,
    /// Wall-clock bound over all attempts and sleeps.
    pub deadline: Option<Duration>,
}

impl WaitPolicy {
    /// The backon builder for this policy (retries = attempts - 1).
    pub fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.max_attempts.saturating_sub(1))
    }
}

/// Error of [`with_retries`]: the last error, or the deadline.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    #[error("{0}")]
    Failed(E),
    #[error("{what}: gave up after {} (deadline); last error: {}", crate::config::value::format_duration(*deadline), last.as_deref().unwrap_or("none"))]
    Deadline {
        what: &'static str,
        deadline: Duration,
        last: Option<String>,
    },
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts or
/// passes the policy's deadline. Each retry is logged with the attempt and delay.
pub async fn with_retries<T, E, F, Fut>(
    what: &'static str,
    policy: &WaitPolicy,
    op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Classify + Display,
{
    let last = std::sync::Mutex::new(None::<String>);
    let run = retry_loop(what, policy, Some(&last), op);
    match policy.deadline {
        None => run.await.map_err(RetryError::Failed),
        Some(deadline) => match tokio::time::timeout(deadline, run).await {
            Ok(result) => result.map_err(RetryError::Failed),
            Err(_) => Err(RetryError::Deadline {
                what,
                deadline,
                last: last.lock().ok().and_then(|l| l.clone()),
            }),
        },
    }
}

/// The attempts of [`with_retries`], without its deadline. Each retry is
/// logged, counted in the `Retries` metric and its error kept in `last`.
async fn retry_loop<T, E, F, Fut>(
    what: &'static str,
    policy: &WaitPolicy,
    last: Option<&std::sync::Mutex<Option<String>>>,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Classify + Display,
{
    let attempt = std::sync::atomic::AtomicUsize::new(1);
    op.retry(policy.builder())
        .sleep(tokio::time::sleep)
        .when(|e: &E| e.retry_class() == RetryClass::Transient)
        .notify(|e: &E, delay: Duration| {
            let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(Ok(mut l)) = last.map(|l| l.lock()) {
                *l = Some(e.to_string());
            }
            tracing::warn!(what, attempt = n, max_attempts = policy.max_attempts, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
            crate::metrics::record(crate::metrics::RETRIES, 1.0, &[("Kind", "wait")]);
        })
        .await
}

/// One failed attempt of a loop whose errors are already its own: `Again`
/// is worth another attempt, `Stop` ends the loop with it.
#[derive(Debug)]
pub enum Attempt<E> {
    Again(E),
    Stop(E),
}

impl<E> Attempt<E> {
    fn into_inner(self) -> E {
        match self {
            Attempt::Again(e) | Attempt::Stop(e) => e,
        }
    }
}

impl<E> Classify for Attempt<E> {
    fn retry_class(&self) -> RetryClass {
        match self {
            Attempt::Again(_) => RetryClass::Transient,
            Attempt::Stop(_) => RetryClass::Permanent,
        }
    }
}

impl<E: Display> Display for Attempt<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Again(e) | Attempt::Stop(e) => e.fmt(f),
        }
    }
}

/// [`with_retries`] for a short loop bounded by its attempts alone (no
/// deadline): the last error is the loop's error, as it was.
pub async fn with_attempts<T, E, F, Fut>(
    what: &'static str,
    first_delay: Duration,
    max_attempts: usize,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
    E: Display,
{
    let policy = WaitPolicy {
        first_delay,
        max_delay: first_delay * 16,
        max_attempts,
        deadline: None,
    };
    retry_loop(what, &policy, None, op)
        .await
        .map_err(Attempt::into_inner)
}

/// SDK retry settings: standard mode, attempts and backoff from `[aws]`.
pub fn aws_retry_config(aws: &crate::config::model::Aws) -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(aws.max_attempts)
        .with_initial_backoff(aws.initial_backoff)
        .with_max_backoff(aws.max_backoff)
}

/// SDK timeouts: per attempt and per operation (including retries).
pub fn aws_timeout_config(aws: &crate::config::model::Aws) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(aws.attempt_timeout.min(Duration::from_secs(5)))
        .operation_attempt_timeout(aws.attempt_timeout)
        .operation_timeout(aws.operation_timeout)
        .build()
}

/// AWS error codes that mean "later" rather than "no".
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "TransactionInProgressException",
    "TransactionConflictException",
    "ReplicatedWriteConflictException",
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
];

/// Whether `E` is an operation error of the DynamoDB SDK. Its
/// `LimitExceededException` means "too many control-plane operations at
/// once" (DynamoDB API reference, Common Errors: "wait and retry"), so it is
/// weather; the same code from Secrets Manager is a quota ("the request
/// failed because it would exceed one of the Secrets Manager quotas", e.g.
/// versions of a secret in 24 hours, PutSecretValue, Errors) that holds for
/// hours, so it is permanent there. The error carries no service name; its
/// type does (`aws_sdk_dynamodb::operation::...`).
fn is_dynamodb_error<E>() -> bool {
    std::any::type_name::<E>().starts_with("aws_sdk_dynamodb::")
}

/// A dispatch failure is weather only when the request could not get
/// through: a timeout, an I/O error, or an `other` failure the connector
/// itself marked transient. The orchestrator also reports as dispatch
/// failures what fails before transmission — loading credentials
/// (`CredentialsNotLoaded` on a node without an instance profile),
/// resolving the endpoint, signing — as `ConnectorError::other(.., None)`
/// (aws-smithy-runtime, `orchestrator.rs`, `try_attempt`: "BeforeTransmit"
/// errors `.map_err(|e| OrchestratorError::other(..))` then
/// `SdkError::dispatch_failure(ConnectorError::other(..))`): trying again
/// does not help those, except a credentials provider that timed out (IMDS
/// slow to answer), found by its message in the source chain because the
/// error types (`aws_credential_types::provider::error::CredentialsError::
/// ProviderTimedOut`, the identity cache's private `TimedOutError`) are not
/// reachable from here.
fn classify_dispatch_failure(
    failure: &aws_smithy_runtime_api::client::result::DispatchFailure,
) -> RetryClass {
    use aws_smithy_types::retry::ErrorKind;
    if failure.is_timeout() || failure.is_io() {
        return RetryClass::Transient;
    }
    if matches!(
        failure.as_other(),
        Some(ErrorKind::TransientError | ErrorKind::ThrottlingError | ErrorKind::ServerError)
    ) {
        return RetryClass::Transient;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = failure
        .as_connector_error()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        let text = e.to_string();
        // aws-credential-types `CredentialsError::ProviderTimedOut` and
        // aws-smithy-runtime's identity cache `TimedOutError`.
        if text.starts_with("credentials provider timed out")
            || text.starts_with("identity resolver timed out")
        {
            return RetryClass::Transient;
        }
        source = e.source();
    }
    RetryClass::Permanent
}

/// Classifies an AWS SDK error after the SDK's own retries gave up: still
/// transient (the caller may re-run its whole step later) or permanent.
pub fn classify_sdk_error<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> RetryClass {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => RetryClass::Transient,
        SdkError::DispatchFailure(failure) => classify_dispatch_failure(failure),
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            let status = service.raw().status().as_u16();
            if TRANSIENT_CODES.contains(&code)
                || SSM_THROTTLING_CODES.contains(&code)
                || (code == "LimitExceededException" && is_dynamodb_error::<E>())
                || status == 429
                || status >= 500
            {
                RetryClass::Transient
            } else {
                RetryClass::Permanent
            }
        }
        _ => RetryClass::Permanent,
    }
}

/// Error codes that SSM answers for "one update at a time" on the same
/// resource and that the SDK's default classifiers do not retry: the
/// AWS SDKs' throttling list (aws-runtime `THROTTLING_ERRORS`) lacks them.
/// `TooManyUpdates` is PutParameter's (HTTP 400, `__type` `TooManyUpdates`:
/// "There are concurrent updates for a resource that supports one update
/// at a time", SSM API reference, PutParameter, Errors). It is throttling in
/// substance: the same request succeeds a moment later.
pub const SSM_THROTTLING_CODES: &[&str] = &["TooManyUpdates"];

/// An SDK retry classifier that marks the modeled error codes `codes` of
/// operation error `E` as throttling, so the SDK's own retry strategy
/// (attempts and backoff from `[aws]`) retries them like any throttling
/// error. Attached to a client's config, never wrapped around a call.
pub struct ThrottlingCodes<E> {
    codes: &'static [&'static str],
    _error: std::marker::PhantomData<fn() -> E>,
}

impl<E> ThrottlingCodes<E> {
    pub fn new(codes: &'static [&'static str]) -> Self {
        ThrottlingCodes {
            codes,
            _error: std::marker::PhantomData,
        }
    }
}

impl<E> std::fmt::Debug for ThrottlingCodes<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottlingCodes")
            .field("codes", &self.codes)
            .finish()
    }
}

impl<E> aws_smithy_runtime_api::client::retries::classifiers::ClassifyRetry for ThrottlingCodes<E>
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    fn classify_retry(
        &self,
        ctx: &aws_smithy_runtime_api::client::interceptors::context::InterceptorContext,
    ) -> aws_smithy_runtime_api::client::retries::classifiers::RetryAction {
        use aws_smithy_runtime_api::client::retries::classifiers::RetryAction;
        let code = match ctx.output_or_error() {
            Some(Err(err)) => err
                .as_operation_error()
                .and_then(|e| e.downcast_ref::<E>())
                .and_then(|e| e.code()),
            _ => None,
        };
        match code {
            Some(code) if self.codes.contains(&code) => RetryAction::throttling_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "kubeboot throttling codes"
    }
}

/// The AWS service and operation an error came from, for a caller that
/// waits out AWS weather at its step and counts it
/// ([`crate::metrics::AWS_CALLS_EXHAUSTED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsCall {
    pub service: &'static str,
    pub operation: &'static str,
}

/// Counts and logs (warn) one AWS call whose SDK retries gave up on
/// throttling, 5xx, a timeout or a dispatch failure, while `step` waits on.
pub fn note_weather(step: &str, call: AwsCall, error: &dyn Display) {
    tracing::warn!(
        step,
        service = call.service,
        operation = call.operation,
        error = %error,
        "AWS is throttling or failing (the SDK's attempts are spent); waiting and trying the step again"
    );
    crate::metrics::record(
        crate::metrics::AWS_CALLS_EXHAUSTED,
        1.0,
        &[("Service", call.service), ("Operation", call.operation)],
    );
}

/// Whether an AWS call may have taken effect although we saw no answer: the
/// case where a conditional write must be resolved by reading back.
pub fn outcome_unknown<E>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(err, SdkError::TimeoutError(_) | SdkError::ResponseError(_))
        || matches!(err, SdkError::DispatchFailure(d) if d.is_timeout() || d.is_io())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct Svc(ErrorMetadata);
    impl std::fmt::Display for Svc {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0.code())
        }
    }
    impl std::error::Error for Svc {}
    impl ProvideErrorMetadata for Svc {
        fn meta(&self) -> &ErrorMetadata {
            &self.0
        }
    }

    fn service(code: &str, status: u16) -> SdkError<Svc, HttpResponse> {
        let raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(Svc(ErrorMetadata::builder().code(code).build()), raw)
    }

    #[test]
    fn throttling_and_5xx_are_transient_conditions_are_not() {
        assert_eq!(
            classify_sdk_error(&service("ThrottlingException", 400)),
            RetryClass::Transient
        );
        assert_eq!(
            classify_sdk_error(&service("ProvisionedThroughputExceededException", 400)),
            RetryClass::Transient
        );
        assert_eq!(
            classify_sdk_error(&service("Whatever", 503)),
            RetryClass::Transient
        );
        assert_eq!(
            classify_sdk_error(&service("TooManyUpdates", 400)),
            RetryClass::Transient
        );
        assert_eq!(
            classify_sdk_error(&service("ConditionalCheckFailedException", 400)),
            RetryClass::Permanent
        );
        assert_eq!(
            classify_sdk_error(&service("AccessDeniedException", 400)),
            RetryClass::Permanent
        );
        let timeout: SdkError<Svc, HttpResponse> = SdkError::timeout_error("slow");
        assert_eq!(classify_sdk_error(&timeout), RetryClass::Transient);
        assert!(outcome_unknown(&timeout));
        assert!(!outcome_unknown(&service("ThrottlingException", 400)));
    }

    fn dispatch(
        c: aws_smithy_runtime_api::client::result::ConnectorError,
    ) -> SdkError<Svc, HttpResponse> {
        SdkError::dispatch_failure(c)
    }

    /// An error with a source, like the identity resolver's wrapping of a
    /// credentials provider's error.
    #[derive(Debug)]
    struct Wrapped(&'static str, Box<dyn std::error::Error + Send + Sync>);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.1.as_ref())
        }
    }

    #[test]
    fn a_dispatch_failure_is_weather_only_when_the_request_could_not_get_through() {
        use aws_smithy_runtime_api::client::result::ConnectorError;
        // No credentials (no instance profile): the orchestrator reports the
        // identity resolver's error as ConnectorError::other(.., None).
        let no_credentials = dispatch(ConnectorError::other(
            Box::new(Wrapped(
                "failed to resolve identity",
                "the credential provider was not enabled".into(),
            )),
            None,
        ));
        assert_eq!(classify_sdk_error(&no_credentials), RetryClass::Permanent);
        let no_endpoint = dispatch(ConnectorError::other(
            "failed to resolve endpoint: invalid region".into(),
            None,
        ));
        assert_eq!(classify_sdk_error(&no_endpoint), RetryClass::Permanent);
        let user = dispatch(ConnectorError::user("bad request body".into()));
        assert_eq!(classify_sdk_error(&user), RetryClass::Permanent);
        let io = dispatch(ConnectorError::io(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into(),
        ));
        assert_eq!(classify_sdk_error(&io), RetryClass::Transient);
        let timeout = dispatch(ConnectorError::timeout("connect timed out".into()));
        assert_eq!(classify_sdk_error(&timeout), RetryClass::Transient);
        let provider_timeout = dispatch(ConnectorError::other(
            Box::new(Wrapped(
                "failed to resolve identity",
                "credentials provider timed out after 5 seconds".into(),
            )),
            None,
        ));
        assert_eq!(classify_sdk_error(&provider_timeout), RetryClass::Transient);
        let marked = dispatch(ConnectorError::other(
            "connection reset".into(),
            Some(aws_smithy_types::retry::ErrorKind::TransientError),
        ));
        assert_eq!(classify_sdk_error(&marked), RetryClass::Transient);
    }

    #[test]
    fn limit_exceeded_is_weather_for_dynamodb_only() {
        // Secrets Manager's (here any non-DynamoDB error type) is a quota.
        assert_eq!(
            classify_sdk_error(&service("LimitExceededException", 400)),
            RetryClass::Permanent
        );
        let raw = HttpResponse::new(StatusCode::try_from(400).unwrap(), SdkBody::empty());
        let dynamo: SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError, HttpResponse> =
            SdkError::service_error(
                aws_sdk_dynamodb::operation::put_item::PutItemError::generic(
                    ErrorMetadata::builder()
                        .code("LimitExceededException")
                        .build(),
                ),
                raw,
            );
        assert_eq!(classify_sdk_error(&dynamo), RetryClass::Transient);
        let raw = HttpResponse::new(StatusCode::try_from(400).unwrap(), SdkBody::empty());
        let secrets: SdkError<
            aws_sdk_secretsmanager::operation::put_secret_value::PutSecretValueError,
            HttpResponse,
        > = SdkError::service_error(
            aws_sdk_secretsmanager::operation::put_secret_value::PutSecretValueError::generic(
                ErrorMetadata::builder()
                    .code("LimitExceededException")
                    .build(),
            ),
            raw,
        );
        assert_eq!(classify_sdk_error(&secrets), RetryClass::Permanent);
    }

    #[derive(Debug)]
    struct E(RetryClass);
    impl Classify for E {
        fn retry_class(&self) -> RetryClass {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    const FAST: WaitPolicy = WaitPolicy {
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
        max_attempts: 4,
        deadline: None,
    };

    #[tokio::test]
    async fn transient_errors_stop_at_the_attempt_limit() {
        let calls = AtomicUsize::new(0);
        let r: Result<(), _> = with_retries("test", &FAST, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(RetryClass::Transient))
        })
        .await;
        assert!(matches!(r, Err(RetryError::Failed(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicUsize::new(0);
        let r: Result<(), _> = with_retries("test", &FAST, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(RetryClass::Permanent))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn success_after_transient_failures() {
        let calls = AtomicUsize::new(0);
        let r = with_retries("test", &FAST, || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(E(RetryClass::Transient))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
    }

    #[tokio::test]
    async fn deadline_cuts_a_long_wait_and_keeps_the_last_error() {
        let policy = WaitPolicy {
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            max_attempts: 1000,
            deadline: Some(Duration::from_millis(150)),
        };
        let r: Result<(), _> =
            with_retries("imds", &policy, || async { Err(E(RetryClass::Transient)) }).await;
        match r {
            Err(RetryError::Deadline { what, last, .. }) => {
                assert_eq!(what, "imds");
                assert_eq!(last.as_deref(), Some("Transient"));
            }
            other => panic!("expected deadline, got {other:?}"),
        }
    }
}
