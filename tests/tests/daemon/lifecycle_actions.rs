//! The proxy's built-in Auto Scaling lifecycle actions, driven through the
//! real `aws-sdk-autoscaling` client as the agent will: completion by token
//! and by instance id, exactly one completion per action (a second one is
//! refused the way AWS refuses it, which is how the agent learns "already
//! done"), heartbeats and timeouts, AWS's validation errors surfaced by the
//! SDK with their code, and every other Auto Scaling call still served by
//! moto.

use std::fmt::Debug;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::SdkConfig;
use aws_sdk_autoscaling::config::http::HttpResponse;
use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::operation::complete_lifecycle_action::{
    CompleteLifecycleActionError, CompleteLifecycleActionOutput,
};
use aws_sdk_autoscaling::operation::RequestId;
use aws_sdk_autoscaling::Client;
use kubeboot_tests::awsproxy::{AwsProxy, FaultKind, FaultPlan};
use kubeboot_tests::lifecycle_actions::{
    ActionState, CallOutcome, LifecycleActions, LifecycleOperation, LifecycleResult, PendingAction,
    COMPLETE_ACTION, HEARTBEAT_ACTION, NAMESPACE, VALIDATION_ERROR,
};
use kubeboot_tests::moto::Moto;
use kubeboot_tests::net::http_request;

const ASG: &str = "kbtest-cp";
const HOOK: &str = "kubeboot-drain";
const INSTANCE: &str = "i-0123456789abcdef0";

/// An Auto Scaling client that goes through `proxy`; one attempt unless the
/// test asks for retries, so call counts are exact.
fn asg_client(sdk: &SdkConfig, proxy: &AwsProxy, max_attempts: u32) -> Client {
    let sdk = sdk.to_builder().endpoint_url(proxy.endpoint()).build();
    let conf = aws_sdk_autoscaling::config::Builder::from(&sdk)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts)
                .with_initial_backoff(Duration::from_millis(5))
                .with_max_backoff(Duration::from_millis(50)),
        )
        .build();
    Client::from_conf(conf)
}

/// Moto, a proxy with lifecycle actions enabled, and a client through it.
async fn setup() -> (Moto, AwsProxy, LifecycleActions, Client) {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let actions = proxy.enable_lifecycle_actions();
    let client = asg_client(&moto.sdk_config().await, &proxy, 1);
    (moto, proxy, actions, client)
}

/// The error code and message of a call that must have been refused.
fn refusal<T: Debug, E: ProvideErrorMetadata + Debug, R: Debug>(
    result: Result<T, SdkError<E, R>>,
) -> (String, String) {
    let err = result.expect_err("the call must be refused");
    let service = err
        .as_service_error()
        .unwrap_or_else(|| panic!("a service error, not a transport one: {err:?}"));
    (
        service.code().unwrap_or_default().to_string(),
        service.message().unwrap_or_default().to_string(),
    )
}

type CompleteResult =
    Result<CompleteLifecycleActionOutput, SdkError<CompleteLifecycleActionError, HttpResponse>>;

async fn complete_by_token(client: &Client, token: &str, result: &str) -> CompleteResult {
    client
        .complete_lifecycle_action()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .lifecycle_action_token(token)
        .lifecycle_action_result(result)
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_by_token_is_accepted_once_and_the_second_is_refused_like_aws() {
    let (_moto, proxy, actions, client) = setup().await;
    let token = actions.register(PendingAction::terminating(ASG, HOOK, INSTANCE));

    let out = client
        .complete_lifecycle_action()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .lifecycle_action_token(&token)
        .lifecycle_action_result("CONTINUE")
        .send()
        .await
        .expect("first completion");
    assert!(out.request_id().is_some(), "AWS answers carry a request id");
    assert_eq!(
        actions.state(&token),
        Some(ActionState::Completed(LifecycleResult::Continue))
    );

    // A retry or a second process: refused, and the SDK surfaces the code.
    let second = client
        .complete_lifecycle_action()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .lifecycle_action_token(&token)
        .lifecycle_action_result("ABANDON")
        .send()
        .await;
    let err = second.expect_err("second completion");
    assert_eq!(err.code(), Some(VALIDATION_ERROR));
    assert!(err.request_id().is_some(), "errors carry a request id too");
    let service = err.into_service_error();
    assert_eq!(service.code(), Some("ValidationError"));
    assert_eq!(
        service.message(),
        Some(format!("No active Lifecycle Action found with token {token}").as_str())
    );
    // The refused call did not change the result.
    assert_eq!(
        actions.state(&token),
        Some(ActionState::Completed(LifecycleResult::Continue))
    );

    assert_eq!(actions.accepted_completions(INSTANCE), 1);
    let calls = actions.calls_for(LifecycleOperation::Complete, INSTANCE);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].token.as_deref(), Some(token.as_str()));
    assert_eq!(calls[0].result.as_deref(), Some("CONTINUE"));
    assert_eq!(calls[1].error_code(), Some(VALIDATION_ERROR));

    // The proxy answered both itself; nothing reached moto.
    let log = proxy.log_for(COMPLETE_ACTION);
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|r| r.handled && r.upstream_status.is_none()));
    assert_eq!(
        log.iter().map(|r| r.status).collect::<Vec<_>>(),
        [Some(200), Some(400)]
    );
    assert_eq!(proxy.stats().forwarded, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_by_instance_id_and_its_double_refusal() {
    let (_moto, _proxy, actions, client) = setup().await;
    let token = actions.register(PendingAction::launching(ASG, HOOK, INSTANCE));
    // Another instance waiting on the same hook is left alone.
    let other = actions.register(PendingAction::launching(ASG, HOOK, "i-0fedcba9876543210"));

    let complete = || {
        client
            .complete_lifecycle_action()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .instance_id(INSTANCE)
            .lifecycle_action_result("ABANDON")
            .send()
    };
    complete().await.expect("completion by instance id");
    let status = actions.status(&token).expect("registered");
    assert_eq!(
        status.state,
        ActionState::Completed(LifecycleResult::Abandon)
    );
    assert!(status.ended_at.is_some());
    assert_eq!(actions.state(&other), Some(ActionState::Pending));

    let (code, message) = refusal(complete().await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        format!("No active Lifecycle Action found with instance ID {INSTANCE}")
    );

    let calls = actions.calls_for(LifecycleOperation::Complete, INSTANCE);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].outcome,
        CallOutcome::Accepted {
            token: token.clone(),
            instance_id: INSTANCE.into()
        }
    );
    assert!(matches!(
        &calls[1].outcome,
        CallOutcome::Refused { status: 400, code, .. } if code == VALIDATION_ERROR
    ));
    assert_eq!(actions.accepted_completions(INSTANCE), 1);
    assert_eq!(actions.accepted_completions("i-0fedcba9876543210"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_then_completion_then_heartbeats_are_refused() {
    let (_moto, _proxy, actions, client) = setup().await;
    let token = actions.register(PendingAction::terminating(ASG, HOOK, INSTANCE));

    let heartbeat = || {
        client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .instance_id(INSTANCE)
            .send()
    };
    heartbeat().await.expect("first heartbeat");
    client
        .record_lifecycle_action_heartbeat()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .lifecycle_action_token(&token)
        .send()
        .await
        .expect("heartbeat by token");
    let status = actions.status(&token).expect("registered");
    assert_eq!((status.heartbeats, status.state), (2, ActionState::Pending));

    complete_by_token(&client, &token, "CONTINUE")
        .await
        .expect("completion after heartbeats");
    let (code, message) = refusal(heartbeat().await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        format!("No active Lifecycle Action found with instance ID {INSTANCE}")
    );
    assert_eq!(actions.status(&token).expect("registered").heartbeats, 2);

    let beats = actions.calls_for(LifecycleOperation::Heartbeat, INSTANCE);
    assert_eq!(
        beats.iter().map(|c| c.accepted()).collect::<Vec<_>>(),
        [true, true, false]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_apply_the_default_result_and_end_the_action() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint()).await;
    let actions = LifecycleActions::with_manual_clock();
    proxy.set_lifecycle_actions(&actions);
    let client = asg_client(&moto.sdk_config().await, &proxy, 1);

    let beat = Duration::from_secs(60);
    let kept = actions.register(
        PendingAction::terminating(ASG, HOOK, INSTANCE)
            .with_heartbeat_timeout(beat)
            .with_global_timeout(Duration::from_secs(150))
            .with_default_result(LifecycleResult::Continue),
    );
    let idle = actions.register(
        PendingAction::launching(ASG, HOOK, "i-0aaaaaaaaaaaaaaaa").with_heartbeat_timeout(beat),
    );

    // Heartbeats keep `kept` alive past its first deadline; `idle` lapses.
    for _ in 0..3 {
        actions.advance(Duration::from_secs(45));
        client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .lifecycle_action_token(&kept)
            .send()
            .await
            .expect("heartbeat within the timeout");
    }
    assert_eq!(actions.state(&kept), Some(ActionState::Pending));
    let idle_status = actions.status(&idle).expect("registered");
    assert_eq!(
        idle_status.state,
        ActionState::TimedOut(LifecycleResult::Abandon),
        "AWS's default result is ABANDON"
    );
    assert_eq!(idle_status.ended_at, Some(beat));
    let (code, message) = refusal(complete_by_token(&client, &idle, "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        format!("No active Lifecycle Action found with token {idle}")
    );

    // The global timeout ends `kept` whatever the heartbeats: the last one
    // (at 135 s) allowed until 195 s, the global timeout only 150 s.
    assert_eq!(
        actions.status(&kept).expect("registered").deadline,
        Duration::from_secs(150)
    );
    actions.advance(Duration::from_secs(20));
    let kept_status = actions.status(&kept).expect("registered");
    assert_eq!(
        kept_status.state,
        ActionState::TimedOut(LifecycleResult::Continue),
        "the hook's default result applies"
    );
    assert_eq!(kept_status.ended_at, Some(Duration::from_secs(150)));
    assert_eq!(kept_status.heartbeats, 3);
    let (code, _) = refusal(complete_by_token(&client, &kept, "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert_eq!(actions.accepted_completions(INSTANCE), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn real_time_heartbeat_timeout_lapses_on_its_own() {
    let (_moto, _proxy, actions, client) = setup().await;
    let token = actions.register(
        PendingAction::terminating(ASG, HOOK, INSTANCE)
            .with_heartbeat_timeout(Duration::from_millis(300)),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, message) = refusal(complete_by_token(&client, &token, "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert!(
        message.starts_with("No active Lifecycle Action found"),
        "{message}"
    );
    assert_eq!(
        actions.state(&token),
        Some(ActionState::TimedOut(LifecycleResult::Abandon))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_with_validation_errors_and_change_nothing() {
    let (_moto, _proxy, actions, client) = setup().await;
    let token = actions.register(PendingAction::terminating(ASG, HOOK, INSTANCE));
    actions.declare_hook(ASG, "kubeboot-launch");

    let complete = |asg: &str, hook: &str, result: &str| {
        client
            .complete_lifecycle_action()
            .auto_scaling_group_name(asg)
            .lifecycle_hook_name(hook)
            .instance_id(INSTANCE)
            .lifecycle_action_result(result)
            .send()
    };

    let (code, message) = refusal(complete("no-such-asg", HOOK, "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        "AutoScalingGroup name not found - AutoScalingGroup 'no-such-asg' not found"
    );

    let (code, message) = refusal(complete(ASG, "no-such-hook", "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        format!("No Lifecycle Hook found with name 'no-such-hook' for group '{ASG}'")
    );

    // A hook that exists but holds nothing for this instance.
    let (code, message) = refusal(complete(ASG, "kubeboot-launch", "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        format!("No active Lifecycle Action found with instance ID {INSTANCE}")
    );

    for bad in ["continue", "PROCEED", ""] {
        let (code, message) = refusal(complete(ASG, HOOK, bad).await);
        assert_eq!(code, "ValidationError", "result {bad:?}");
        assert!(message.contains("LifecycleActionResult"), "{message}");
    }

    let (code, message) = refusal(
        client
            .complete_lifecycle_action()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await,
    );
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        "Either LifecycleActionToken or InstanceId must be specified"
    );

    let (code, message) = refusal(
        client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .send()
            .await,
    );
    assert_eq!(code, "ValidationError");
    assert_eq!(
        message,
        "Either LifecycleActionToken or InstanceId must be specified"
    );

    // Required members and length constraints, in AWS's front-end shape.
    let (code, message) = refusal(
        client
            .complete_lifecycle_action()
            .lifecycle_action_token("not-a-uuid")
            .send()
            .await,
    );
    assert_eq!(code, "ValidationError");
    assert!(
        message.starts_with("4 validation errors detected: Value null at 'lifecycleHookName' failed to satisfy constraint: Member must not be null"),
        "{message}"
    );
    assert!(
        message.contains("Value 'not-a-uuid' at 'lifecycleActionToken' failed to satisfy constraint: Member must have length greater than or equal to 36"),
        "{message}"
    );

    // A token that belongs to another instance does not match.
    let (_, message) = refusal(
        client
            .complete_lifecycle_action()
            .auto_scaling_group_name(ASG)
            .lifecycle_hook_name(HOOK)
            .lifecycle_action_token(&token)
            .instance_id("i-0fffffffffffffff0")
            .lifecycle_action_result("CONTINUE")
            .send()
            .await,
    );
    assert_eq!(
        message,
        format!("No active Lifecycle Action found with token {token}")
    );

    // None of that touched the pending action; it still completes once.
    assert_eq!(actions.state(&token), Some(ActionState::Pending));
    assert_eq!(actions.accepted_completions(INSTANCE), 0);
    assert!(actions.calls().iter().all(|c| !c.accepted()));
    complete(ASG, HOOK, "CONTINUE")
        .await
        .expect("the valid completion");
    assert_eq!(actions.accepted_completions(INSTANCE), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wire_answers_are_aws_query_xml() {
    let (_moto, proxy, actions, _client) = setup().await;
    let token = actions.register(PendingAction::terminating(ASG, HOOK, INSTANCE));
    let post = |body: String| {
        let endpoint = proxy.endpoint();
        async move {
            http_request(
                &endpoint,
                "POST",
                "/",
                &[(
                    "Content-Type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                )],
                body.as_bytes(),
            )
            .await
            .expect("raw query request")
        }
    };
    let form = |action: &str| {
        format!(
            "Action={action}&Version=2011-01-01&AutoScalingGroupName={ASG}&LifecycleHookName={HOOK}&LifecycleActionToken={token}&LifecycleActionResult=CONTINUE"
        )
    };

    let ok = post(form(HEARTBEAT_ACTION)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("content-type"), Some("text/xml"));
    let text = ok.text();
    assert!(
        text.starts_with(&format!(
            "<RecordLifecycleActionHeartbeatResponse xmlns=\"{NAMESPACE}\">"
        )),
        "{text}"
    );
    assert!(
        text.contains("<RecordLifecycleActionHeartbeatResult/>"),
        "{text}"
    );
    let request_id = ok.header("x-amzn-requestid").expect("request id header");
    assert!(
        text.contains(&format!(
            "<ResponseMetadata>\n    <RequestId>{request_id}</RequestId>"
        )),
        "{text}"
    );

    let ok = post(form(COMPLETE_ACTION)).await;
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("<CompleteLifecycleActionResult/>"));

    let refused = post(form(COMPLETE_ACTION)).await;
    assert_eq!(refused.status, 400);
    let text = refused.text();
    let request_id = refused
        .header("x-amzn-requestid")
        .expect("request id header");
    for part in [
        format!("<ErrorResponse xmlns=\"{NAMESPACE}\">"),
        "<Type>Sender</Type>".to_string(),
        "<Code>ValidationError</Code>".to_string(),
        format!("<Message>No active Lifecycle Action found with token {token}</Message>"),
        format!("<RequestId>{request_id}</RequestId>"),
    ] {
        assert!(text.contains(&part), "{part} missing from {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn other_autoscaling_calls_still_reach_moto() {
    let (moto, proxy, actions, client) = setup().await;
    client
        .create_launch_configuration()
        .launch_configuration_name("kbtest-lc")
        .image_id("ami-12c6146b")
        .instance_type("t3.small")
        .send()
        .await
        .expect("create_launch_configuration through the proxy");
    client
        .create_auto_scaling_group()
        .auto_scaling_group_name(ASG)
        .launch_configuration_name("kbtest-lc")
        .min_size(1)
        .max_size(1)
        .desired_capacity(1)
        .availability_zones("us-east-1a")
        .send()
        .await
        .expect("create_auto_scaling_group through the proxy");
    let groups = client
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(ASG)
        .send()
        .await
        .expect("describe_auto_scaling_groups through the proxy");
    let group = groups
        .auto_scaling_groups()
        .first()
        .expect("moto has the group");
    assert_eq!(group.auto_scaling_group_name(), Some(ASG));
    let instance = group
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .expect("moto launched one instance")
        .to_string();

    // The instance moto launched waits on our hook; the agent completes it.
    let token = actions.register(PendingAction::terminating(ASG, HOOK, &instance));
    client
        .complete_lifecycle_action()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .instance_id(&instance)
        .lifecycle_action_result("CONTINUE")
        .send()
        .await
        .expect("completion for moto's instance");
    assert_eq!(
        actions.state(&token),
        Some(ActionState::Completed(LifecycleResult::Continue))
    );

    let log = proxy.log();
    let seen: Vec<(&str, bool, Option<u16>)> = log
        .iter()
        .map(|r| (r.operation.as_str(), r.handled, r.upstream_status))
        .collect();
    assert_eq!(
        seen,
        [
            ("CreateLaunchConfiguration", false, Some(200)),
            ("CreateAutoScalingGroup", false, Some(200)),
            ("DescribeAutoScalingGroups", false, Some(200)),
            ("CompleteLifecycleAction", true, None),
        ]
    );

    // Disabled, the action goes to moto, which does not implement it.
    proxy.clear_lifecycle_actions();
    let forwarded = client
        .complete_lifecycle_action()
        .auto_scaling_group_name(ASG)
        .lifecycle_hook_name(HOOK)
        .instance_id(&instance)
        .lifecycle_action_result("CONTINUE")
        .send()
        .await;
    assert!(forwarded.is_err(), "moto 5.2 lacks CompleteLifecycleAction");
    let last = proxy.log().pop().expect("logged");
    assert!(!last.handled, "{last:?}");
    assert_eq!(
        last.upstream_status,
        Some(500),
        "moto's not-implemented answer"
    );
    assert_eq!(actions.calls().len(), 1, "the disabled state saw nothing");
    drop(moto);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_answer_still_completed_and_the_retry_learns_it_is_done() {
    let (_moto, proxy, actions, client) = setup().await;
    let token = actions.register(PendingAction::terminating(ASG, HOOK, INSTANCE));

    // The completion applies, but its answer never arrives.
    proxy.set_faults(FaultPlan::always(FaultKind::DropAfterForward).only(&[COMPLETE_ACTION]));
    let lost = complete_by_token(&client, &token, "CONTINUE").await;
    let err = lost.expect_err("the answer was dropped");
    assert!(
        err.as_service_error().is_none(),
        "a transport failure, not an AWS answer: {err:?}"
    );
    assert_eq!(
        actions.state(&token),
        Some(ActionState::Completed(LifecycleResult::Continue))
    );

    // The caller tries again and is told, in AWS's words, that it is done.
    proxy.clear_faults();
    let (code, message) = refusal(complete_by_token(&client, &token, "CONTINUE").await);
    assert_eq!(code, "ValidationError");
    assert!(
        message.starts_with("No active Lifecycle Action found"),
        "{message}"
    );
    assert_eq!(actions.accepted_completions(INSTANCE), 1);
    assert_eq!(proxy.log_for(COMPLETE_ACTION).len(), 2);
}
