//! The fault-injecting AWS proxy: transparent without faults, AWS-shaped
//! errors that the real SDK classifies and retries like the real thing,
//! timeouts and lost answers that the SDK sees as such, deterministic fault
//! sequences per seed, and a hook that answers actions moto lacks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::get_item::{GetItemError, GetItemOutput};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan, IncomingRequest, ProxyResponse};
use kubeboot_tests::fixtures::create_pk_table;
use kubeboot_tests::moto::Moto;
use kubeboot_tests::net::http_request;

const TABLE: &str = "kbtest-proxy";

/// A DynamoDB client that goes through `proxy`, with tiny backoff so retry
/// tests stay fast.
fn client_via(
    sdk: &SdkConfig,
    proxy: &AwsProxy,
    max_attempts: u32,
    attempt_timeout: Option<Duration>,
) -> Client {
    let sdk = sdk.to_builder().endpoint_url(proxy.endpoint()).build();
    let mut timeouts = TimeoutConfig::builder();
    if let Some(t) = attempt_timeout {
        timeouts = timeouts.operation_attempt_timeout(t);
    }
    let conf = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts)
                .with_initial_backoff(Duration::from_millis(5))
                .with_max_backoff(Duration::from_millis(50)),
        )
        .timeout_config(timeouts.build())
        .build();
    Client::from_conf(conf)
}

async fn put(ddb: &Client, pk: &str, value: &str) -> Result<(), String> {
    ddb.put_item()
        .table_name(TABLE)
        .item("pk", AttributeValue::S(pk.into()))
        .item("v", AttributeValue::S(value.into()))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// A plain (eventually consistent) GetItem of `pk`.
async fn get_item(
    ddb: &Client,
    pk: &str,
) -> Result<GetItemOutput, SdkError<GetItemError, HttpResponse>> {
    ddb.get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S(pk.into()))
        .send()
        .await
}

async fn get(ddb: &Client, pk: &str) -> Option<String> {
    let out = ddb
        .get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S(pk.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("consistent get_item");
    out.item()
        .and_then(|i| i.get("v"))
        .and_then(|v| v.as_s().ok())
        .cloned()
}

/// Moto, a proxy in front of it, and a table created through the proxy.
async fn setup() -> (Moto, AwsProxy, SdkConfig) {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let sdk = moto.sdk_config().await;
    create_pk_table(&client_via(&sdk, &proxy, 1, None), TABLE).await;
    (moto, proxy, sdk)
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_pass_through_unchanged_without_faults() {
    let (_moto, proxy, sdk) = setup().await;
    let ddb = client_via(&sdk, &proxy, 1, None);

    put(&ddb, "a", "one").await.expect("put_item");
    // Several calls on one client exercise keep-alive reuse through the proxy.
    for _ in 0..3 {
        assert_eq!(get(&ddb, "a").await.as_deref(), Some("one"));
    }
    assert_eq!(get(&ddb, "missing").await, None);
    let tables = ddb.list_tables().send().await.expect("list_tables");
    assert_eq!(tables.table_names(), [TABLE]);

    let stats = proxy.stats();
    assert_eq!(stats.forwarded, 7, "{stats:?}");
    assert_eq!(
        (stats.throttled, stats.server_errors, stats.timeouts),
        (0, 0, 0)
    );
    let log = proxy.log();
    let ops: Vec<&str> = log.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "CreateTable",
            "PutItem",
            "GetItem",
            "GetItem",
            "GetItem",
            "GetItem",
            "ListTables"
        ]
    );
    assert!(log
        .iter()
        .all(|r| r.fault.is_none() && r.status == Some(200) && r.upstream_status == Some(200)));
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_answered_in_the_service_shape_and_the_sdk_retries_it() {
    let (_moto, proxy, sdk) = setup().await;
    let proxy = proxy.with_seed(7);
    put(&client_via(&sdk, &proxy, 1, None), "k", "v")
        .await
        .expect("put_item");

    proxy.set_faults(FaultPlan::always(FaultKind::Throttle).only(&["GetItem"]));
    let ddb = client_via(&sdk, &proxy, 3, None);
    let err = get_item(&ddb, "k")
        .await
        .expect_err("every GetItem is throttled");
    assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
    assert_eq!(
        err.message(),
        Some("Rate of requests exceeds the allowed throughput.")
    );
    assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(400));
    let attempts = proxy.log_for("GetItem");
    assert_eq!(
        attempts.len(),
        3,
        "SDK should retry throttling: {attempts:?}"
    );
    assert!(attempts
        .iter()
        .all(|r| r.fault == Some(FaultKind::Throttle) && r.status == Some(400)));

    // Half the attempts throttled: a patient client still gets through.
    proxy.set_faults(FaultPlan {
        throttle: 0.5,
        ..FaultPlan::default()
    });
    let patient = client_via(&sdk, &proxy, 10, None);
    for _ in 0..5 {
        assert_eq!(get(&patient, "k").await.as_deref(), Some("v"));
    }
    let stats = proxy.stats();
    assert!(
        stats.throttled > 3,
        "seed 7 throttles some retries: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_500s() {
    let (_moto, proxy, sdk) = setup().await;
    proxy.set_faults(FaultPlan::always(FaultKind::ServerError).only(&["GetItem"]));
    let ddb = client_via(&sdk, &proxy, 2, None);
    let err = get_item(&ddb, "k").await.expect_err("every GetItem fails");
    assert_eq!(err.code(), Some("InternalServerError"), "{err:?}");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    let attempts = proxy.log_for("GetItem");
    assert_eq!(attempts.len(), 2, "SDK should retry a 500: {attempts:?}");
    assert_eq!(proxy.stats().server_errors, 2);

    // Other operations are untouched by a targeted plan.
    put(&ddb, "k", "v").await.expect("put_item is not targeted");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_trip_the_client_attempt_timeout() {
    let (_moto, proxy, sdk) = setup().await;
    proxy.set_faults(FaultPlan::always(FaultKind::Timeout));
    let ddb = client_via(&sdk, &proxy, 1, Some(Duration::from_millis(300)));
    let started = Instant::now();
    let err = ddb
        .list_tables()
        .send()
        .await
        .expect_err("held request must time out");
    let took = started.elapsed();
    assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "attempt timeout should fire at ~300 ms, took {took:?}"
    );
    let stats = proxy.stats();
    assert_eq!((stats.timeouts, stats.forwarded), (1, 1), "{stats:?}");
    let last = proxy.log().pop().expect("logged");
    assert_eq!(
        (last.operation.as_str(), last.fault, last.status),
        ("ListTables", Some(FaultKind::Timeout), None)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_answer_still_applied_the_write() {
    let (_moto, proxy, sdk) = setup().await;
    let ddb = client_via(&sdk, &proxy, 1, Some(Duration::from_millis(300)));

    // Connection closed right after upstream applied the write.
    proxy.set_faults(FaultPlan::always(FaultKind::DropAfterForward).only(&["PutItem"]));
    let err = put(&ddb, "reset", "applied")
        .await
        .expect_err("the answer was dropped");
    assert!(
        err.contains("DispatchFailure") || err.contains("ResponseError"),
        "{err}"
    );

    // Answer held past the client's attempt timeout: looks like a timeout.
    proxy.set_faults(FaultPlan {
        drop_delay: Duration::from_secs(5),
        ..FaultPlan::always(FaultKind::DropAfterForward).only(&["PutItem"])
    });
    let err = put(&ddb, "held", "applied")
        .await
        .expect_err("the answer was held");
    assert!(err.starts_with("TimeoutError"), "{err}");

    proxy.clear_faults();
    assert_eq!(get(&ddb, "reset").await.as_deref(), Some("applied"));
    assert_eq!(get(&ddb, "held").await.as_deref(), Some("applied"));
    let puts = proxy.log_for("PutItem");
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(puts
        .iter()
        .all(|r| r.fault == Some(FaultKind::DropAfterForward)
            && r.upstream_status == Some(200)
            && r.status.is_none()));
    assert_eq!(proxy.stats().dropped_after_forward, 2);
}

/// A signed-looking DynamoDB request (moto routes by the credential scope
/// and never checks the signature).
async fn raw_dynamodb(endpoint: &str, operation: &str, body: &str) -> (u16, String) {
    let target = format!("DynamoDB_20120810.{operation}");
    let resp = http_request(
        endpoint,
        "POST",
        "/",
        &[
            ("Content-Type", "application/x-amz-json-1.0"),
            ("X-Amz-Target", &target),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=00",
            ),
        ],
        body.as_bytes(),
    )
    .await
    .expect("raw request through the proxy");
    (resp.status, resp.text())
}

#[tokio::test(flavor = "multi_thread")]
async fn same_seed_same_faults() {
    let moto = Moto::start().await;
    let plan = FaultPlan {
        throttle: 0.3,
        server_error: 0.3,
        ..FaultPlan::default()
    };
    let mut runs = Vec::new();
    for seed in [42, 42, 43] {
        let proxy = AwsProxy::start(&moto.endpoint()).await.with_seed(seed);
        proxy.set_faults(plan.clone());
        for _ in 0..50 {
            raw_dynamodb(&proxy.endpoint(), "ListTables", "{}").await;
        }
        let faults: Vec<Option<FaultKind>> = proxy.log().iter().map(|r| r.fault).collect();
        assert_eq!(faults.len(), 50);
        runs.push(faults);
    }
    assert_eq!(runs[0], runs[1], "same seed, same decisions");
    assert_ne!(runs[0], runs[2], "another seed, other decisions");
    for kind in [
        Some(FaultKind::Throttle),
        Some(FaultKind::ServerError),
        None,
    ] {
        let n = runs[0].iter().filter(|f| **f == kind).count();
        assert!(
            (5..=30).contains(&n),
            "{kind:?} drawn {n}/50 times at ~30-40%"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_handler_answers_an_action_moto_lacks() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let seen: Arc<Mutex<Vec<IncomingRequest>>> = Arc::default();
    let seen_by_handler = seen.clone();
    proxy.set_handler(Arc::new(move |req: &IncomingRequest| {
        seen_by_handler.lock().expect("seen lock").push(req.clone());
        match req.operation.as_str() {
            "DescribeLimits" => Some(ProxyResponse::json(
                200,
                "application/x-amz-json-1.0",
                &serde_json::json!({"AccountMaxReadCapacityUnits": 4242}),
            )),
            "CompleteLifecycleAction" => Some(ProxyResponse::xml(
                200,
                "<CompleteLifecycleActionResponse><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>",
            )),
            _ => None,
        }
    }));

    let (status, body) = raw_dynamodb(&proxy.endpoint(), "DescribeLimits", "{}").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"AccountMaxReadCapacityUnits":4242}"#)
    );

    // A query-protocol action, with its form parameters decoded.
    let resp = http_request(
        &proxy.endpoint(),
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")],
        b"Action=CompleteLifecycleAction&Version=2011-01-01&LifecycleHookName=drain+etcd&AutoScalingGroupName=cp%2Fasg",
    )
    .await
    .expect("query request");
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains("CompleteLifecycleActionResponse"));
    {
        let seen = seen.lock().expect("seen lock");
        let req = seen.last().expect("handler saw the request");
        assert_eq!(req.param("LifecycleHookName"), Some("drain etcd"));
        assert_eq!(req.param("AutoScalingGroupName"), Some("cp/asg"));
    }

    // Everything else still reaches moto.
    let (status, body) = raw_dynamodb(&proxy.endpoint(), "ListTables", "{}").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("TableNames"), "{body}");

    // Faults come first: a handled action can still be throttled, in shape.
    proxy.set_faults(FaultPlan::always(FaultKind::Throttle).only(&["CompleteLifecycleAction"]));
    let resp = http_request(
        &proxy.endpoint(),
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"Action=CompleteLifecycleAction&Version=2011-01-01",
    )
    .await
    .expect("query request");
    assert_eq!(resp.status, 400);
    assert!(
        resp.text().contains("<Code>Throttling</Code>"),
        "{}",
        resp.text()
    );
    assert!(resp.header("x-amzn-requestid").is_some());

    let stats = proxy.stats();
    assert_eq!(
        (stats.handled, stats.forwarded, stats.throttled),
        (2, 1, 1),
        "{stats:?}"
    );
    let handled: Vec<bool> = proxy.log().iter().map(|r| r.handled).collect();
    assert_eq!(handled, [true, true, false, false]);
}
