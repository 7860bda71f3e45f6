//! Auto Scaling lifecycle actions, answered by the [`crate::awsproxy`] proxy
//! because moto 5.2 does not implement them.
//!
//! moto answers `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat`
//! with a 500 and never holds an instance in `Pending:Wait` or
//! `Terminating:Wait`. The agent completes its own lifecycle actions through
//! the real `aws-sdk-autoscaling` client, so the tests need both calls to
//! behave like AWS: the Query protocol on the wire, `ValidationError`s with
//! AWS's codes and messages, and above all **one completion per action** — a
//! second `CompleteLifecycleAction` (a retry whose first answer was lost, or a
//! second process) is refused with "No active Lifecycle Action found ...",
//! which is how the agent learns the action is already done.
//!
//! A test registers the pending actions AWS would have created
//! ([`LifecycleActions::register`]), enables them on the proxy
//! ([`crate::awsproxy::AwsProxy::enable_lifecycle_actions`]) and afterwards
//! asks what happened: each action's [`ActionState`], its heartbeats, and
//! every call with its parameters and outcome ([`LifecycleActions::calls`]).
//! Every other request still goes to moto.
//!
//! Timeouts follow AWS: an action whose heartbeat timeout passes without a
//! heartbeat or completion ends with the hook's default result, and so does
//! one that reaches its global timeout whatever the heartbeats. Expiry is
//! evaluated whenever the state is touched, against a clock that is either
//! tokio's (real time) or manual ([`LifecycleActions::with_manual_clock`],
//! moved only by [`LifecycleActions::advance`]) for deterministic tests.
//!
//! Messages: "No active Lifecycle Action found with instance ID i-..." and
//! "... with token ..." are AWS's, as seen in real error logs; the Coral
//! "N validation error(s) detected" shape is AWS's for constraint failures.
//! AWS does not document its messages for an unknown group, an unknown
//! hook, a missing token and instance id, or a bad result; the ones here
//! follow the wording AWS uses for the same problems in other Auto Scaling
//! calls, and tests should match on the `ValidationError` code, not on those.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::awsproxy::{IncomingRequest, ProxyResponse};

/// XML namespace of every Auto Scaling answer.
pub const NAMESPACE: &str = "http://autoscaling.amazonaws.com/doc/2011-01-01/";

/// The Auto Scaling Query API version the SDK sends as `Version`.
pub const API_VERSION: &str = "2011-01-01";

/// Query `Action` of the completion call.
pub const COMPLETE_ACTION: &str = "CompleteLifecycleAction";

/// Query `Action` of the call that tells which group holds an instance and
/// in which lifecycle state.
pub const DESCRIBE_INSTANCES_ACTION: &str = "DescribeAutoScalingInstances";

/// Query `Action` of cluster-autoscaler's scale-in call (and `aws
/// autoscaling terminate-instance-in-auto-scaling-group`).
pub const TERMINATE_INSTANCE_ACTION: &str = "TerminateInstanceInAutoScalingGroup";

/// Query `Action` of the heartbeat call.
pub const HEARTBEAT_ACTION: &str = "RecordLifecycleActionHeartbeat";

/// The error code AWS uses for every refusal modelled here; the agent
/// matches on it.
pub const VALIDATION_ERROR: &str = "ValidationError";

/// AWS's default `HeartbeatTimeout` for a hook (one hour).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3600);

/// AWS caps a hook's global timeout at 48 hours.
pub const MAX_GLOBAL_TIMEOUT: Duration = Duration::from_secs(48 * 3600);

/// Which instance transition a hook pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `autoscaling:EC2_INSTANCE_LAUNCHING`: the instance waits in
    /// `Pending:Wait`.
    Launching,
    /// `autoscaling:EC2_INSTANCE_TERMINATING`: the instance waits in
    /// `Terminating:Wait`.
    Terminating,
}

impl Transition {
    /// The wire name, as in `LifecycleTransition`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Launching => "autoscaling:EC2_INSTANCE_LAUNCHING",
            Transition::Terminating => "autoscaling:EC2_INSTANCE_TERMINATING",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result a lifecycle action ends with (`LifecycleActionResult`, or the
/// hook's `DefaultResult` on timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleResult {
    /// `CONTINUE`: go on launching (or terminating) the instance.
    Continue,
    /// `ABANDON`: terminate a launching instance; for a terminating one,
    /// the same as `CONTINUE` but other hooks are skipped.
    Abandon,
}

impl LifecycleResult {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleResult::Continue => "CONTINUE",
            LifecycleResult::Abandon => "ABANDON",
        }
    }

    /// Parses the wire name; case-sensitive, as AWS.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "CONTINUE" => Some(LifecycleResult::Continue),
            "ABANDON" => Some(LifecycleResult::Abandon),
            _ => None,
        }
    }
}

impl fmt::Display for LifecycleResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle action as AWS creates it when a hook pauses an instance:
/// what a test registers to put an instance "in the wait state".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAction {
    /// The Auto Scaling group.
    pub asg_name: String,
    /// The lifecycle hook that paused the instance.
    pub hook_name: String,
    /// The paused instance.
    pub instance_id: String,
    /// The action's token (a UUID), as in the hook's notification.
    pub token: String,
    /// Launching or terminating.
    pub transition: Transition,
    /// Time allowed between registration (or the last heartbeat) and
    /// completion before the default result applies.
    pub heartbeat_timeout: Duration,
    /// Time allowed from registration whatever the heartbeats.
    pub global_timeout: Duration,
    /// The hook's `DefaultResult`, applied on timeout.
    pub default_result: LifecycleResult,
}

impl PendingAction {
    /// An action with a fresh token and AWS's hook defaults: heartbeat
    /// timeout one hour, global timeout 100 heartbeat timeouts (at most
    /// 48 h), default result `ABANDON`.
    pub fn new(asg_name: &str, hook_name: &str, instance_id: &str, transition: Transition) -> Self {
        Self {
            asg_name: asg_name.into(),
            hook_name: hook_name.into(),
            instance_id: instance_id.into(),
            token: uuid::Uuid::new_v4().to_string(),
            transition,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            global_timeout: global_timeout_for(DEFAULT_HEARTBEAT_TIMEOUT),
            default_result: LifecycleResult::Abandon,
        }
    }

    /// An instance held in `Terminating:Wait` (see [`PendingAction::new`]).
    pub fn terminating(asg_name: &str, hook_name: &str, instance_id: &str) -> Self {
        Self::new(asg_name, hook_name, instance_id, Transition::Terminating)
    }

    /// An instance held in `Pending:Wait` (see [`PendingAction::new`]).
    pub fn launching(asg_name: &str, hook_name: &str, instance_id: &str) -> Self {
        Self::new(asg_name, hook_name, instance_id, Transition::Launching)
    }

    /// Uses this token instead of a fresh one.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = token.into();
        self
    }

    /// Sets the heartbeat timeout, and the global timeout as AWS derives it
    /// (100 × heartbeat, at most 48 h); call
    /// [`PendingAction::with_global_timeout`] afterwards to override that.
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self.global_timeout = global_timeout_for(timeout);
        self
    }

    /// Sets the global timeout.
    pub fn with_global_timeout(mut self, timeout: Duration) -> Self {
        self.global_timeout = timeout;
        self
    }

    /// Sets the hook's default result.
    pub fn with_default_result(mut self, result: LifecycleResult) -> Self {
        self.default_result = result;
        self
    }
}

fn global_timeout_for(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(100).min(MAX_GLOBAL_TIMEOUT)
}

/// Where a registered action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionState {
    /// Still waiting: the instance is in `Pending:Wait` / `Terminating:Wait`.
    Pending,
    /// Ended by an accepted `CompleteLifecycleAction` with this result.
    Completed(LifecycleResult),
    /// Ended by its heartbeat or global timeout; the hook's default result
    /// applied.
    TimedOut(LifecycleResult),
}

impl ActionState {
    /// The result the action ended with, if it ended.
    pub fn result(self) -> Option<LifecycleResult> {
        match self {
            ActionState::Pending => None,
            ActionState::Completed(r) | ActionState::TimedOut(r) => Some(r),
        }
    }
}

/// A snapshot of one registered action, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionStatus {
    /// The action as registered.
    pub action: PendingAction,
    /// Pending, completed or timed out (as of the snapshot).
    pub state: ActionState,
    /// Accepted heartbeats.
    pub heartbeats: u32,
    /// When it was registered, on the [`LifecycleActions::now`] clock.
    pub registered_at: Duration,
    /// When it times out (or timed out) unless completed first.
    pub deadline: Duration,
    /// When it ended, if it did.
    pub ended_at: Option<Duration>,
}

/// The two actions this module answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleOperation {
    /// `CompleteLifecycleAction`.
    Complete,
    /// `RecordLifecycleActionHeartbeat`.
    Heartbeat,
}

impl LifecycleOperation {
    /// The Query `Action` name.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleOperation::Complete => COMPLETE_ACTION,
            LifecycleOperation::Heartbeat => HEARTBEAT_ACTION,
        }
    }

    fn from_action(action: &str) -> Option<Self> {
        match action {
            COMPLETE_ACTION => Some(LifecycleOperation::Complete),
            HEARTBEAT_ACTION => Some(LifecycleOperation::Heartbeat),
            _ => None,
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// Answered 200; names the action it applied to.
    Accepted {
        /// The matched action's token.
        token: String,
        /// The matched action's instance.
        instance_id: String,
    },
    /// Answered with an AWS error.
    Refused {
        /// HTTP status sent.
        status: u16,
        /// AWS error code, e.g. [`VALIDATION_ERROR`].
        code: String,
        /// AWS error message.
        message: String,
    },
}

/// One `CompleteLifecycleAction` or `RecordLifecycleActionHeartbeat` as
/// received, with its outcome: the audit trail behind "completed exactly
/// once" assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleCall {
    /// Which action.
    pub operation: LifecycleOperation,
    /// When, on the [`LifecycleActions::now`] clock.
    pub at: Duration,
    /// `AutoScalingGroupName` as sent.
    pub asg_name: Option<String>,
    /// `LifecycleHookName` as sent.
    pub hook_name: Option<String>,
    /// `LifecycleActionToken` as sent.
    pub token: Option<String>,
    /// `InstanceId` as sent.
    pub instance_id: Option<String>,
    /// `LifecycleActionResult` as sent (completions only).
    pub result: Option<String>,
    /// The instance of the registered action the call referred to (by
    /// token, else by instance id), whether or not that action was still
    /// pending: lets a refused retry by token count against its instance.
    pub action_instance_id: Option<String>,
    /// Accepted or refused.
    pub outcome: CallOutcome,
}

impl LifecycleCall {
    /// Whether the call was answered 200.
    pub fn accepted(&self) -> bool {
        matches!(self.outcome, CallOutcome::Accepted { .. })
    }

    /// The error code of a refused call.
    pub fn error_code(&self) -> Option<&str> {
        match &self.outcome {
            CallOutcome::Refused { code, .. } => Some(code),
            CallOutcome::Accepted { .. } => None,
        }
    }

    /// Whether the call concerned `instance_id`: it named it, or named the
    /// token of that instance's action.
    pub fn concerns(&self, instance_id: &str) -> bool {
        self.instance_id.as_deref() == Some(instance_id)
            || self.action_instance_id.as_deref() == Some(instance_id)
    }
}

/// The lifecycle actions the proxy answers, shared between the proxy and the
/// test (clones share state).
#[derive(Clone)]
pub struct LifecycleActions {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for LifecycleActions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("LifecycleActions")
            .field("actions", &inner.actions.len())
            .field("calls", &inner.calls.len())
            .finish_non_exhaustive()
    }
}

impl Default for LifecycleActions {
    /// Same as [`LifecycleActions::new`].
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
enum Clock {
    /// Tokio's clock, from this start.
    Real(tokio::time::Instant),
    /// A clock that only [`LifecycleActions::advance`] moves.
    Manual(Duration),
}

#[derive(Debug)]
struct Action {
    spec: PendingAction,
    registered_at: Duration,
    deadline: Duration,
    global_deadline: Duration,
    state: ActionState,
    heartbeats: u32,
    ended_at: Option<Duration>,
}

impl Action {
    fn status(&self) -> ActionStatus {
        ActionStatus {
            action: self.spec.clone(),
            state: self.state,
            heartbeats: self.heartbeats,
            registered_at: self.registered_at,
            deadline: self.deadline.min(self.global_deadline),
            ended_at: self.ended_at,
        }
    }
}

#[derive(Debug)]
struct Inner {
    clock: Clock,
    /// `(group, hook)` pairs that exist.
    hooks: BTreeSet<(String, String)>,
    actions: Vec<Action>,
    calls: Vec<LifecycleCall>,
    /// Instances declared `InService` in a group (instance → group).
    in_service: std::collections::BTreeMap<String, String>,
    /// `TerminateInstanceInAutoScalingGroup` calls answered: group,
    /// instance, `ShouldDecrementDesiredCapacity`.
    scale_ins: Vec<(String, String, bool)>,
}

impl Inner {
    fn now(&self) -> Duration {
        match &self.clock {
            Clock::Real(start) => start.elapsed(),
            Clock::Manual(now) => *now,
        }
    }

    /// Ends every pending action whose deadline has passed, with its
    /// default result, as AWS does on timeout.
    fn expire(&mut self) {
        let now = self.now();
        for a in &mut self.actions {
            let deadline = a.deadline.min(a.global_deadline);
            if a.state == ActionState::Pending && now >= deadline {
                a.state = ActionState::TimedOut(a.spec.default_result);
                a.ended_at = Some(deadline);
            }
        }
    }
}

/// An AWS error to answer with.
struct Refusal {
    status: u16,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn validation(message: String) -> Self {
        Self {
            status: 400,
            kind: "Sender",
            code: VALIDATION_ERROR,
            message,
        }
    }
}

impl LifecycleActions {
    /// Empty state on tokio's clock: timeouts pass in real time (use short
    /// heartbeat timeouts in tests).
    pub fn new() -> Self {
        Self::with_clock(Clock::Real(tokio::time::Instant::now()))
    }

    /// Empty state on a manual clock starting at zero: nothing times out
    /// until [`LifecycleActions::advance`] says so, so timeout tests are
    /// deterministic.
    pub fn with_manual_clock() -> Self {
        Self::with_clock(Clock::Manual(Duration::ZERO))
    }

    fn with_clock(clock: Clock) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                clock,
                hooks: BTreeSet::new(),
                actions: Vec::new(),
                calls: Vec::new(),
                in_service: Default::default(),
                scale_ins: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Poison-tolerant: a panicking test must not take the proxy down.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_expired(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        inner.expire();
        inner
    }

    /// Time since this state was created, on its clock.
    pub fn now(&self) -> Duration {
        self.lock().now()
    }

    /// Moves a manual clock forward (actions whose deadline passes time out).
    /// Panics on a real clock: a test bug.
    pub fn advance(&self, by: Duration) {
        let mut inner = self.lock();
        match &mut inner.clock {
            Clock::Manual(now) => *now += by,
            Clock::Real(_) => panic!("LifecycleActions::advance needs with_manual_clock()"),
        }
        inner.expire();
    }

    /// Declares that `hook_name` exists on `asg_name` without any pending
    /// action, so calls for it get "No active Lifecycle Action found" rather
    /// than an unknown-hook refusal. [`LifecycleActions::register`] declares
    /// its hook too.
    pub fn declare_hook(&self, asg_name: &str, hook_name: &str) {
        self.lock()
            .hooks
            .insert((asg_name.to_string(), hook_name.to_string()));
    }

    /// Declares an instance `InService` in `asg_name` (until an action is
    /// registered for it), for `DescribeAutoScalingInstances`.
    pub fn in_service(&self, asg_name: &str, instance_id: &str) {
        self.lock()
            .in_service
            .insert(instance_id.to_string(), asg_name.to_string());
    }

    /// The group and lifecycle state AWS would report for `instance_id`: its
    /// latest action's (`Pending:Wait`/`Terminating:Wait` while pending,
    /// `InService`/`Terminating:Proceed` once ended), else the declared
    /// `InService`, else `None` (no group holds it).
    pub fn lifecycle_state(&self, instance_id: &str) -> Option<(String, String)> {
        let inner = self.lock_expired();
        if let Some(a) = inner
            .actions
            .iter()
            .rev()
            .find(|a| a.spec.instance_id == instance_id)
        {
            let state = match (a.spec.transition, a.state) {
                (Transition::Launching, ActionState::Pending) => "Pending:Wait",
                (Transition::Launching, _) => "InService",
                (Transition::Terminating, ActionState::Pending) => "Terminating:Wait",
                (Transition::Terminating, _) => "Terminating:Proceed",
            };
            return Some((a.spec.asg_name.clone(), state.to_string()));
        }
        inner
            .in_service
            .get(instance_id)
            .map(|asg| (asg.clone(), "InService".to_string()))
    }

    /// The scale-in calls answered so far: `(group, instance, decrement)`.
    pub fn scale_ins(&self) -> Vec<(String, String, bool)> {
        self.lock().scale_ins.clone()
    }

    /// `TerminateInstanceInAutoScalingGroup`, as AWS answers it for an
    /// instance of a group: an `InProgress` activity, and, when the group
    /// has a lifecycle hook, the instance held in `Terminating:Wait` with a
    /// pending action (whose EventBridge event the test delivers, see
    /// [`crate::termination::Terminations::scale_in`]). Refused as AWS
    /// refuses it: both parameters are required, and an instance no group
    /// holds is "not found".
    fn terminate_instance(&self, req: &IncomingRequest) -> ProxyResponse {
        let request_id = uuid::Uuid::new_v4().to_string();
        let refuse = |message: String| {
            let body = format!(
                "<ErrorResponse xmlns=\"{NAMESPACE}\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{VALIDATION_ERROR}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
                xml_escape(&message)
            );
            xml_response(400, request_id.clone(), body)
        };
        let Some(instance_id) = req.param("InstanceId") else {
            return refuse("1 validation error detected: Value null at 'instanceId' failed to satisfy constraint: Member must not be null".into());
        };
        let decrement = match req.param("ShouldDecrementDesiredCapacity") {
            Some("true") => true,
            Some("false") => false,
            _ => return refuse("1 validation error detected: Value null at 'shouldDecrementDesiredCapacity' failed to satisfy constraint: Member must not be null".into()),
        };
        let Some((asg, state)) = self.lifecycle_state(instance_id) else {
            return refuse(format!(
                "Instance Id not found - No managed instance found for instance ID: {instance_id}"
            ));
        };
        if state == "InService" {
            let hook = self
                .lock()
                .hooks
                .iter()
                .find(|(g, _)| *g == asg)
                .map(|(_, h)| h.clone());
            match hook {
                Some(hook) => {
                    self.register(PendingAction::terminating(&asg, &hook, instance_id));
                }
                None => {
                    self.lock().in_service.remove(instance_id);
                }
            }
        }
        self.lock()
            .scale_ins
            .push((asg.clone(), instance_id.to_string(), decrement));
        let body = format!(
            "<TerminateInstanceInAutoScalingGroupResponse xmlns=\"{NAMESPACE}\">\n  <TerminateInstanceInAutoScalingGroupResult>\n    <Activity>\n      <ActivityId>{}</ActivityId>\n      <AutoScalingGroupName>{}</AutoScalingGroupName>\n      <Description>Terminating EC2 instance: {}</Description>\n      <Cause>At 2026-12-04T00:00:00Z instance {} was taken out of service in response to a user request{}.</Cause>\n      <StartTime>2026-12-04T00:00:00Z</StartTime>\n      <StatusCode>InProgress</StatusCode>\n      <Progress>0</Progress>\n      <Details>{{}}</Details>\n    </Activity>\n  </TerminateInstanceInAutoScalingGroupResult>\n  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</TerminateInstanceInAutoScalingGroupResponse>\n",
            uuid::Uuid::new_v4(),
            xml_escape(&asg),
            xml_escape(instance_id),
            xml_escape(instance_id),
            if decrement { ", shrinking the capacity" } else { "" },
        );
        xml_response(200, request_id, body)
    }

    fn describe_instances(&self, req: &IncomingRequest) -> ProxyResponse {
        let mut members = String::new();
        for n in 1.. {
            let Some(id) = req.param(&format!("InstanceIds.member.{n}")) else {
                break;
            };
            if let Some((asg, state)) = self.lifecycle_state(id) {
                members.push_str(&format!(
                    "      <member>\n        <InstanceId>{}</InstanceId>\n        <InstanceType>m6i.large</InstanceType>\n        <AutoScalingGroupName>{}</AutoScalingGroupName>\n        <AvailabilityZone>us-east-1a</AvailabilityZone>\n        <LifecycleState>{state}</LifecycleState>\n        <HealthStatus>HEALTHY</HealthStatus>\n        <ProtectedFromScaleIn>false</ProtectedFromScaleIn>\n      </member>\n",
                    xml_escape(id),
                    xml_escape(&asg)
                ));
            }
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let body = format!(
            "<DescribeAutoScalingInstancesResponse xmlns=\"{NAMESPACE}\">\n  <DescribeAutoScalingInstancesResult>\n    <AutoScalingInstances>\n{members}    </AutoScalingInstances>\n  </DescribeAutoScalingInstancesResult>\n  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</DescribeAutoScalingInstancesResponse>\n"
        );
        xml_response(200, request_id, body)
    }

    /// Puts an instance in the wait state: the action becomes pending from
    /// now, and its group and hook become known. Returns its token.
    ///
    /// Panics if the token is already registered, or if the instance already
    /// has a pending action for the same hook (AWS never creates either).
    pub fn register(&self, action: PendingAction) -> String {
        let mut inner = self.lock_expired();
        assert!(
            !inner.actions.iter().any(|a| a.spec.token == action.token),
            "lifecycle action token {} registered twice",
            action.token
        );
        assert!(
            !inner.actions.iter().any(|a| a.state == ActionState::Pending
                && a.spec.asg_name == action.asg_name
                && a.spec.hook_name == action.hook_name
                && a.spec.instance_id == action.instance_id),
            "instance {} already has a pending action for hook {} of {}",
            action.instance_id,
            action.hook_name,
            action.asg_name
        );
        let now = inner.now();
        inner
            .hooks
            .insert((action.asg_name.clone(), action.hook_name.clone()));
        let token = action.token.clone();
        inner.actions.push(Action {
            registered_at: now,
            deadline: now.saturating_add(action.heartbeat_timeout),
            global_deadline: now.saturating_add(action.global_timeout),
            spec: action,
            state: ActionState::Pending,
            heartbeats: 0,
            ended_at: None,
        });
        token
    }

    /// The action with this token, if registered.
    pub fn status(&self, token: &str) -> Option<ActionStatus> {
        self.lock_expired()
            .actions
            .iter()
            .find(|a| a.spec.token == token)
            .map(Action::status)
    }

    /// The state of the action with this token, if registered.
    pub fn state(&self, token: &str) -> Option<ActionState> {
        self.status(token).map(|s| s.state)
    }

    /// Every action registered for this instance, oldest first.
    pub fn statuses_for_instance(&self, instance_id: &str) -> Vec<ActionStatus> {
        self.lock_expired()
            .actions
            .iter()
            .filter(|a| a.spec.instance_id == instance_id)
            .map(Action::status)
            .collect()
    }

    /// Every registered action, oldest first.
    pub fn statuses(&self) -> Vec<ActionStatus> {
        self.lock_expired()
            .actions
            .iter()
            .map(Action::status)
            .collect()
    }

    /// Every call received, in arrival order.
    pub fn calls(&self) -> Vec<LifecycleCall> {
        self.lock().calls.clone()
    }

    /// Calls of one operation that concern an instance (see
    /// [`LifecycleCall::concerns`]), accepted or not.
    pub fn calls_for(
        &self,
        operation: LifecycleOperation,
        instance_id: &str,
    ) -> Vec<LifecycleCall> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.operation == operation && c.concerns(instance_id))
            .cloned()
            .collect()
    }

    /// How many `CompleteLifecycleAction` calls were accepted for this
    /// instance: the number a "completed exactly once" test asserts is 1.
    pub fn accepted_completions(&self, instance_id: &str) -> usize {
        self.calls_for(LifecycleOperation::Complete, instance_id)
            .iter()
            .filter(|c| c.accepted())
            .count()
    }

    /// Answers `CompleteLifecycleAction`, `RecordLifecycleActionHeartbeat` and
    /// `DescribeAutoScalingInstances` (from the registered actions and
    /// declared instances) query requests; `None` for anything else, which
    /// the proxy forwards.
    /// Usable as an [`crate::awsproxy::Handler`] body too.
    pub fn handle(&self, req: &IncomingRequest) -> Option<ProxyResponse> {
        // Only the Query protocol: a JSON request with the same target is
        // some other service's.
        if req.header("x-amz-target").is_some() {
            return None;
        }
        if req.param("Action")? == DESCRIBE_INSTANCES_ACTION {
            return Some(self.describe_instances(req));
        }
        if req.param("Action")? == TERMINATE_INSTANCE_ACTION {
            return Some(self.terminate_instance(req));
        }
        let operation = LifecycleOperation::from_action(req.param("Action")?)?;
        let param = |name: &str| req.param(name).map(str::to_string);
        let mut inner = self.lock_expired();
        let outcome = apply(&mut inner, operation, req);
        let action_instance_id = match req.param("LifecycleActionToken") {
            Some(t) => inner
                .actions
                .iter()
                .find(|a| a.spec.token == t)
                .map(|a| a.spec.instance_id.clone()),
            None => param("InstanceId"),
        };
        let call = LifecycleCall {
            operation,
            at: inner.now(),
            asg_name: param("AutoScalingGroupName"),
            hook_name: param("LifecycleHookName"),
            token: param("LifecycleActionToken"),
            instance_id: param("InstanceId"),
            result: match operation {
                LifecycleOperation::Complete => param("LifecycleActionResult"),
                LifecycleOperation::Heartbeat => None,
            },
            action_instance_id,
            outcome: match &outcome {
                Ok((token, instance_id)) => CallOutcome::Accepted {
                    token: token.clone(),
                    instance_id: instance_id.clone(),
                },
                Err(r) => CallOutcome::Refused {
                    status: r.status,
                    code: r.code.to_string(),
                    message: r.message.clone(),
                },
            },
        };
        inner.calls.push(call);
        drop(inner);
        let request_id = uuid::Uuid::new_v4().to_string();
        let (status, body) = match outcome {
            Ok(_) => {
                let action = operation.as_str();
                (
                    200,
                    format!(
                        "<{action}Response xmlns=\"{NAMESPACE}\">\n  <{action}Result/>\n  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</{action}Response>\n"
                    ),
                )
            }
            Err(r) => (
                r.status,
                format!(
                    "<ErrorResponse xmlns=\"{NAMESPACE}\">\n  <Error>\n    <Type>{}</Type>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
                    r.kind,
                    r.code,
                    xml_escape(&r.message)
                ),
            ),
        };
        Some(ProxyResponse {
            status,
            headers: vec![
                ("content-type".into(), "text/xml".into()),
                ("x-amzn-requestid".into(), request_id),
            ],
            body: body.into_bytes(),
        })
    }
}

/// Validates and applies one call; on success, the matched action's token
/// and instance.
fn apply(
    inner: &mut Inner,
    operation: LifecycleOperation,
    req: &IncomingRequest,
) -> Result<(String, String), Refusal> {
    // Constraint checks first, all reported at once, as AWS's front end does.
    let mut problems = Vec::new();
    let mut field = |wire: &str, member: &str, required: bool, min: usize, max: usize| {
        let value = req.param(wire);
        match value {
            None if required => problems.push(format!(
                "Value null at '{member}' failed to satisfy constraint: Member must not be null"
            )),
            None => {}
            Some(v) => {
                let len = v.chars().count();
                if len < min {
                    problems.push(format!(
                        "Value '{v}' at '{member}' failed to satisfy constraint: Member must have length greater than or equal to {min}"
                    ));
                } else if len > max {
                    problems.push(format!(
                        "Value '{v}' at '{member}' failed to satisfy constraint: Member must have length less than or equal to {max}"
                    ));
                }
            }
        }
        value.filter(|v| (min..=max).contains(&v.chars().count()))
    };
    let hook = field("LifecycleHookName", "lifecycleHookName", true, 1, 255);
    let asg = field(
        "AutoScalingGroupName",
        "autoScalingGroupName",
        true,
        1,
        1600,
    );
    let token = field(
        "LifecycleActionToken",
        "lifecycleActionToken",
        false,
        36,
        36,
    );
    let instance = field("InstanceId", "instanceId", false, 1, 19);
    let result = match operation {
        LifecycleOperation::Complete => field(
            "LifecycleActionResult",
            "lifecycleActionResult",
            true,
            0,
            usize::MAX,
        ),
        LifecycleOperation::Heartbeat => None,
    };
    if !problems.is_empty() {
        let n = problems.len();
        let s = if n == 1 { "" } else { "s" };
        return Err(Refusal::validation(format!(
            "{n} validation error{s} detected: {}",
            problems.join("; ")
        )));
    }
    let (Some(hook), Some(asg)) = (hook, asg) else {
        return Err(Refusal::validation(
            "AutoScalingGroupName and LifecycleHookName are required".into(),
        ));
    };
    let result = match (operation, result) {
        (LifecycleOperation::Complete, Some(r)) => match LifecycleResult::parse(r) {
            Some(r) => Some(r),
            None => {
                return Err(Refusal::validation(format!(
                    "Invalid value '{r}' for LifecycleActionResult: must be CONTINUE or ABANDON"
                )))
            }
        },
        _ => None,
    };
    if !inner.hooks.iter().any(|(g, _)| g == asg) {
        return Err(Refusal::validation(format!(
            "AutoScalingGroup name not found - AutoScalingGroup '{asg}' not found"
        )));
    }
    if !inner.hooks.contains(&(asg.to_string(), hook.to_string())) {
        return Err(Refusal::validation(format!(
            "No Lifecycle Hook found with name '{hook}' for group '{asg}'"
        )));
    }
    if token.is_none() && instance.is_none() {
        return Err(Refusal::validation(
            "Either LifecycleActionToken or InstanceId must be specified".into(),
        ));
    }
    let now = inner.now();
    let found = inner.actions.iter_mut().find(|a| {
        a.state == ActionState::Pending
            && a.spec.asg_name == asg
            && a.spec.hook_name == hook
            && token.is_none_or(|t| a.spec.token == t)
            && instance.is_none_or(|i| a.spec.instance_id == i)
    });
    let Some(action) = found else {
        return Err(Refusal::validation(match token {
            Some(t) => format!("No active Lifecycle Action found with token {t}"),
            None => format!(
                "No active Lifecycle Action found with instance ID {}",
                instance.unwrap_or_default()
            ),
        }));
    };
    match result {
        Some(r) => {
            action.state = ActionState::Completed(r);
            action.ended_at = Some(now);
        }
        None => {
            action.heartbeats += 1;
            action.deadline = now.saturating_add(action.spec.heartbeat_timeout);
        }
    }
    Ok((action.spec.token.clone(), action.spec.instance_id.clone()))
}

/// Escapes text content (quotes need no escaping outside attributes).
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

/// An Auto Scaling Query answer: XML with its request id.
fn xml_response(status: u16, request_id: String, body: String) -> ProxyResponse {
    ProxyResponse {
        status,
        headers: vec![
            ("content-type".into(), "text/xml".into()),
            ("x-amzn-requestid".into(), request_id),
        ],
        body: body.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "bcd2f1b8-9a78-44d3-8a7a-4dd07d7cf635";

    fn request(params: &[(&str, &str)]) -> IncomingRequest {
        IncomingRequest {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![(
                "content-type".into(),
                "application/x-www-form-urlencoded".into(),
            )],
            body: Vec::new(),
            operation: params
                .iter()
                .find(|(k, _)| *k == "Action")
                .map(|(_, v)| v.to_string())
                .unwrap_or_default(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn heartbeat(token: &str) -> IncomingRequest {
        request(&[
            ("Action", HEARTBEAT_ACTION),
            ("Version", API_VERSION),
            ("AutoScalingGroupName", "asg"),
            ("LifecycleHookName", "hook"),
            ("LifecycleActionToken", token),
        ])
    }

    fn body(resp: &ProxyResponse) -> String {
        String::from_utf8_lossy(&resp.body).into_owned()
    }

    #[test]
    fn heartbeats_extend_up_to_the_global_timeout_then_the_default_applies() {
        let la = LifecycleActions::with_manual_clock();
        la.register(
            PendingAction::terminating("asg", "hook", "i-1")
                .with_token(TOKEN)
                .with_heartbeat_timeout(Duration::from_secs(60))
                .with_global_timeout(Duration::from_secs(150))
                .with_default_result(LifecycleResult::Continue),
        );
        for _ in 0..2 {
            la.advance(Duration::from_secs(59));
            let resp = la.handle(&heartbeat(TOKEN)).expect("handled");
            assert_eq!(resp.status, 200, "{}", body(&resp));
        }
        let status = la.status(TOKEN).expect("registered");
        assert_eq!((status.heartbeats, status.state), (2, ActionState::Pending));
        // 118 s now; the last heartbeat allows 178 s but the global cap is 150 s.
        assert_eq!(status.deadline, Duration::from_secs(150));
        la.advance(Duration::from_secs(32));
        let status = la.status(TOKEN).expect("registered");
        assert_eq!(
            status.state,
            ActionState::TimedOut(LifecycleResult::Continue)
        );
        assert_eq!(status.ended_at, Some(Duration::from_secs(150)));
        let resp = la.handle(&heartbeat(TOKEN)).expect("handled");
        assert_eq!(resp.status, 400);
        assert!(body(&resp).contains(&format!(
            "<Message>No active Lifecycle Action found with token {TOKEN}</Message>"
        )));
    }

    #[test]
    fn constraint_failures_are_reported_together_and_escaped() {
        let la = LifecycleActions::with_manual_clock();
        let resp = la
            .handle(&request(&[
                ("Action", COMPLETE_ACTION),
                ("LifecycleActionToken", "<short>"),
            ]))
            .expect("handled");
        assert_eq!(resp.status, 400);
        let text = body(&resp);
        assert!(text.contains("<Code>ValidationError</Code>"), "{text}");
        assert!(
            text.contains("4 validation errors detected: Value null at 'lifecycleHookName'"),
            "{text}"
        );
        assert!(
            text.contains("Value '&lt;short&gt;' at 'lifecycleActionToken'"),
            "{text}"
        );
        assert!(
            text.contains("Value null at 'lifecycleActionResult'"),
            "{text}"
        );
        assert_eq!(la.calls().len(), 1);
    }

    #[test]
    fn other_actions_and_json_requests_are_not_ours() {
        let la = LifecycleActions::new();
        assert!(la
            .handle(&request(&[("Action", "DescribeAutoScalingGroups")]))
            .is_none());
        let mut json = heartbeat(TOKEN);
        json.headers.push((
            "x-amz-target".into(),
            "X.RecordLifecycleActionHeartbeat".into(),
        ));
        assert!(la.handle(&json).is_none());
        assert!(la.calls().is_empty());
    }
}
