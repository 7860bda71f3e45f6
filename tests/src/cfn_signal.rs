//! CloudFormation's `SignalResource`, answered by the [`crate::awsproxy`]
//! proxy's [`Handler`] hook because moto 5.2 does not implement it.
//!
//! A test declares the stacks CloudFormation would hold
//! ([`StackSignals::stack`]): a status, and for each logical id whether the
//! resource waits for signals (a create under a `CreationPolicy`, or a
//! rolling update with `WaitOnResourceSignals`). Every call is recorded with
//! its parameters, the time it arrived and its answer ([`StackSignals::calls`]).
//!
//! What the real API refuses, refused here the same way (Query protocol,
//! XML `ErrorResponse`, HTTP 400 `ValidationError` unless said otherwise):
//! - a request that is not a Query-protocol POST of API version `2010-05-15`
//!   (`InvalidAction` for another version, as Query services answer);
//! - a missing `StackName`, `LogicalResourceId`, `UniqueId` or `Status`, a
//!   `UniqueId` outside 1-64 characters, a `Status` other than `SUCCESS` or
//!   `FAILURE`, a `StackName` outside its pattern — in AWS's "N validation
//!   error(s) detected" form (the API reference lists these constraints:
//!   SignalResource, "Request Parameters");
//! - a stack that does not exist: "Stack with id NAME does not exist";
//! - a stack that is not being created or updated: "Stack ARN is in STATUS
//!   state and cannot be signaled" (the wording cfn-signal users report from
//!   real stacks, e.g. aws-cloudformation-templates#34, and
//!   kubernetes-on-aws#538 for UPDATE_COMPLETE);
//! - a logical id the stack does not have, and a resource of an updating
//!   stack that is not waiting for signals: AWS does not document these
//!   messages; the ones here ("Resource X does not exist for stack NAME",
//!   "Resource X is not in a state to accept signals") follow its wording
//!   for the same problems, and tests should match on the code;
//! - a caller whose role lacks `cloudformation:SignalResource`
//!   ([`StackSignals::deny`]): 403 `AccessDenied`, IAM's message.
//!
//! - a second SUCCESS with a `UniqueId` already counted: "Signal with ID X
//!   already exists. Signals may only be updated with a FAILURE status."
//!   (AWS documents no wording; this is the API's open implementations'),
//!   so an agent that lost the first answer must not read the second as a
//!   failure. A FAILURE replaces an earlier SUCCESS.
//!
//! CloudFormation counts signals per unique id, which is why an instance
//! signals with its instance id: [`StackSignals::received`] shows the
//! signals a waiting resource counts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::awsproxy::{Handler, IncomingRequest, ProxyResponse};
use crate::lock;

/// XML namespace of every CloudFormation answer.
pub const NAMESPACE: &str = "http://cloudformation.amazonaws.com/doc/2010-05-15/";

/// The CloudFormation Query API version the SDK sends as `Version`.
pub const API_VERSION: &str = "2010-05-15";

/// The Query `Action` this module answers.
pub const SIGNAL_ACTION: &str = "SignalResource";

/// The account in the stack ARNs.
pub const ACCOUNT: &str = "123456789012";

/// The region in the stack ARNs.
pub const REGION: &str = "us-east-1";

/// One resource of a declared stack.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resource {
    /// Whether a create or rolling update waits for its signals now.
    awaiting: bool,
    /// Signals received while awaiting: unique id → status (a repeat
    /// replaces).
    received: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct StackState {
    arn: String,
    status: String,
    resources: BTreeMap<String, Resource>,
    denied: bool,
}

/// One `SignalResource` as received, with its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalCall {
    /// When it arrived.
    pub at: SystemTime,
    /// `StackName` as sent.
    pub stack: Option<String>,
    /// `LogicalResourceId` as sent.
    pub resource: Option<String>,
    /// `UniqueId` as sent.
    pub unique_id: Option<String>,
    /// `Status` as sent.
    pub status: Option<String>,
    /// HTTP status answered.
    pub answer_status: u16,
    /// AWS error code answered, `None` when accepted.
    pub error_code: Option<String>,
    /// AWS error message answered.
    pub error_message: Option<String>,
}

impl SignalCall {
    /// Whether CloudFormation took the signal.
    pub fn accepted(&self) -> bool {
        self.error_code.is_none()
    }
}

#[derive(Debug, Default)]
struct State {
    stacks: BTreeMap<String, StackState>,
    calls: Vec<SignalCall>,
}

/// The stacks and the calls; clones share them.
#[derive(Debug, Clone, Default)]
pub struct StackSignals {
    state: Arc<Mutex<State>>,
}

impl StackSignals {
    /// No stacks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares (or replaces) stack `name` in `status` (e.g.
    /// `UPDATE_IN_PROGRESS`, `CREATE_COMPLETE`) with its resources and
    /// whether each waits for signals now.
    pub fn stack(&self, name: &str, status: &str, resources: &[(&str, bool)]) {
        let arn = format!(
            "arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{name}/{}",
            uuid::Uuid::new_v4()
        );
        let resources = resources
            .iter()
            .map(|(id, awaiting)| {
                (
                    id.to_string(),
                    Resource {
                        awaiting: *awaiting,
                        received: BTreeMap::new(),
                    },
                )
            })
            .collect();
        lock(&self.state).stacks.insert(
            name.to_string(),
            StackState {
                arn,
                status: status.to_string(),
                resources,
                denied: false,
            },
        );
    }

    /// The caller's role may not signal stack `name` (403 AccessDenied).
    pub fn deny(&self, name: &str) {
        if let Some(s) = lock(&self.state).stacks.get_mut(name) {
            s.denied = true;
        }
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<SignalCall> {
        lock(&self.state).calls.clone()
    }

    /// The signals resource `logical_id` of `stack` counts: unique id → status.
    pub fn received(&self, stack: &str, logical_id: &str) -> BTreeMap<String, String> {
        lock(&self.state)
            .stacks
            .get(stack)
            .and_then(|s| s.resources.get(logical_id))
            .map(|r| r.received.clone())
            .unwrap_or_default()
    }

    /// The proxy hook: answers `SignalResource`, lets everything else through.
    pub fn handler(&self) -> Handler {
        let this = self.clone();
        Arc::new(move |req: &IncomingRequest| this.handle(req))
    }

    /// Answers one request if it is a `SignalResource`.
    pub fn handle(&self, req: &IncomingRequest) -> Option<ProxyResponse> {
        if req.param("Action") != Some(SIGNAL_ACTION) {
            return None;
        }
        let param = |k: &str| req.param(k).map(str::to_string);
        let mut call = SignalCall {
            at: SystemTime::now(),
            stack: param("StackName"),
            resource: param("LogicalResourceId"),
            unique_id: param("UniqueId"),
            status: param("Status"),
            answer_status: 200,
            error_code: None,
            error_message: None,
        };
        let mut state = lock(&self.state);
        let answer = answer(&mut state, req, &call);
        let response = match answer {
            Ok(()) => ProxyResponse::xml(
                200,
                format!(
                    "<SignalResourceResponse xmlns=\"{NAMESPACE}\">\n  <ResponseMetadata>\n    <RequestId>{}</RequestId>\n  </ResponseMetadata>\n</SignalResourceResponse>\n",
                    uuid::Uuid::new_v4()
                ),
            ),
            Err((status, code, message)) => {
                call.answer_status = status;
                call.error_code = Some(code.to_string());
                call.error_message = Some(message.clone());
                error_response(status, code, &message)
            }
        };
        state.calls.push(call);
        Some(response)
    }
}

type Refusal = (u16, &'static str, String);

fn validation(message: String) -> Refusal {
    (400, "ValidationError", message)
}

/// The Coral constraint form AWS answers for malformed parameters.
fn constraints(errors: &[String]) -> Refusal {
    let n = errors.len();
    validation(format!(
        "{n} validation error{} detected: {}",
        if n == 1 { "" } else { "s" },
        errors.join("; ")
    ))
}

/// CreateStack's StackName pattern, which SignalResource's StackNameOrId
/// extends with ARNs: `([a-zA-Z][-a-zA-Z0-9]*)|(arn:...)`.
fn stack_name_ok(s: &str) -> bool {
    (s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        || (s.starts_with("arn:aws")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-:/._+".contains(c)))
}

fn answer(state: &mut State, req: &IncomingRequest, call: &SignalCall) -> Result<(), Refusal> {
    if req.param("Version") != Some(API_VERSION) {
        return Err((
            400,
            "InvalidAction",
            format!(
                "Could not find operation {SIGNAL_ACTION} for version {}",
                req.param("Version").unwrap_or("NO_VERSION_SPECIFIED")
            ),
        ));
    }
    if req.method != "POST" {
        return Err(validation(format!(
            "{SIGNAL_ACTION} is sent as a POST by every SDK; got {}",
            req.method
        )));
    }
    let mut errors = Vec::new();
    let null = |field: &str| {
        format!("Value null at '{field}' failed to satisfy constraint: Member must not be null")
    };
    match &call.stack {
        None => errors.push(null("stackName")),
        Some(s) if !stack_name_ok(s) => errors.push(format!(
            "Value '{s}' at 'stackName' failed to satisfy constraint: Member must satisfy regular expression pattern: ([a-zA-Z][-a-zA-Z0-9]*)|(arn:\\b(aws|aws-us-gov|aws-cn)\\b:[-a-zA-Z0-9:/._+]*)"
        )),
        Some(_) => {}
    }
    if call.resource.is_none() {
        errors.push(null("logicalResourceId"));
    }
    match &call.unique_id {
        None => errors.push(null("uniqueId")),
        Some(u) if u.is_empty() => errors.push(format!(
            "Value '{u}' at 'uniqueId' failed to satisfy constraint: Member must have length greater than or equal to 1"
        )),
        Some(u) if u.chars().count() > 64 => errors.push(format!(
            "Value '{u}' at 'uniqueId' failed to satisfy constraint: Member must have length less than or equal to 64"
        )),
        Some(_) => {}
    }
    match call.status.as_deref() {
        None => errors.push(null("status")),
        Some("SUCCESS" | "FAILURE") => {}
        Some(other) => errors.push(format!(
            "Value '{other}' at 'status' failed to satisfy constraint: Member must satisfy enum value set: [SUCCESS, FAILURE]"
        )),
    }
    if !errors.is_empty() {
        return Err(constraints(&errors));
    }
    let (Some(name), Some(logical_id), Some(unique_id), Some(status)) = (
        call.stack.as_deref(),
        call.resource.as_deref(),
        call.unique_id.as_deref(),
        call.status.as_deref(),
    ) else {
        return Err(validation("incomplete request".into()));
    };
    let Some(stack) = state.stacks.get_mut(name) else {
        return Err(validation(format!("Stack with id {name} does not exist")));
    };
    if stack.denied {
        return Err((
            403,
            "AccessDenied",
            format!(
                "User: arn:aws:sts::{ACCOUNT}:assumed-role/kubeboot-control-plane/i-0 is not authorized to perform: cloudformation:SignalResource on resource: {} because no identity-based policy allows the cloudformation:SignalResource action",
                stack.arn
            ),
        ));
    }
    if !stack.status.ends_with("_IN_PROGRESS") {
        return Err(validation(format!(
            "Stack {} is in {} state and cannot be signaled",
            stack.arn, stack.status
        )));
    }
    let Some(resource) = stack.resources.get_mut(logical_id) else {
        return Err(validation(format!(
            "Resource {logical_id} does not exist for stack {name}"
        )));
    };
    if !resource.awaiting {
        return Err(validation(format!(
            "Resource {logical_id} is not in a state to accept signals"
        )));
    }
    if status == "SUCCESS"
        && resource.received.get(unique_id).map(String::as_str) == Some("SUCCESS")
    {
        return Err(validation(format!(
            "Signal with ID {unique_id} already exists. Signals may only be updated with a FAILURE status."
        )));
    }
    resource
        .received
        .insert(unique_id.to_string(), status.to_string());
    Ok(())
}

fn error_response(status: u16, code: &str, message: &str) -> ProxyResponse {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    ProxyResponse::xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"{NAMESPACE}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{code}</Code>\n    <Message>{message}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
            uuid::Uuid::new_v4()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(params: &[(&str, &str)]) -> IncomingRequest {
        let mut all: BTreeMap<String, String> = [
            ("Action", SIGNAL_ACTION),
            ("Version", API_VERSION),
            ("StackName", "prod"),
            ("LogicalResourceId", "ControlPlaneGroup"),
            ("UniqueId", "i-0123456789abcdef0"),
            ("Status", "SUCCESS"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in params {
            if v.is_empty() && *k != "UniqueId" {
                all.remove(*k);
            } else {
                all.insert(k.to_string(), v.to_string());
            }
        }
        IncomingRequest {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
            operation: SIGNAL_ACTION.into(),
            params: all,
        }
    }

    fn refused(s: &StackSignals, params: &[(&str, &str)]) -> (u16, String, String) {
        let resp = s.handle(&request(params)).expect("answered");
        let call = s.calls().pop().expect("recorded");
        assert_eq!(resp.status, call.answer_status);
        let body = String::from_utf8(resp.body).expect("utf-8");
        assert!(body.starts_with("<ErrorResponse"), "{body}");
        (
            call.answer_status,
            call.error_code.expect("refused"),
            call.error_message.expect("message"),
        )
    }

    #[test]
    fn an_awaiting_resource_counts_one_signal_per_unique_id() {
        let s = StackSignals::new();
        s.stack("prod", "UPDATE_IN_PROGRESS", &[("ControlPlaneGroup", true)]);
        let resp = s.handle(&request(&[])).expect("answered");
        assert_eq!(resp.status, 200);
        assert!(String::from_utf8_lossy(&resp.body).contains("<SignalResourceResponse"));
        let again = s.handle(&request(&[])).expect("answered");
        assert_eq!(again.status, 400, "a second SUCCESS for the same id");
        assert!(String::from_utf8_lossy(&again.body).contains("already exists"));
        assert_eq!(s.received("prod", "ControlPlaneGroup").len(), 1);
        let failure = s
            .handle(&request(&[("Status", "FAILURE")]))
            .expect("answered");
        assert_eq!(failure.status, 200, "a FAILURE replaces it");
        assert_eq!(
            s.received("prod", "ControlPlaneGroup")
                .values()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["FAILURE"]
        );
        assert_eq!(s.calls().len(), 3);
    }

    #[test]
    fn what_cloudformation_refuses_is_refused() {
        let s = StackSignals::new();
        s.stack(
            "prod",
            "UPDATE_IN_PROGRESS",
            &[("ControlPlaneGroup", true), ("WorkerGroup", false)],
        );
        s.stack("done", "CREATE_COMPLETE", &[("ControlPlaneGroup", false)]);
        /// (parameters changed, status, error code, message part)
        type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("Status", "WARNING")],
                400,
                "ValidationError",
                "enum value set: [SUCCESS, FAILURE]",
            ),
            (&[("Status", "")], 400, "ValidationError", "at 'status'"),
            (
                &[("UniqueId", "")],
                400,
                "ValidationError",
                "greater than or equal to 1",
            ),
            (
                &[("UniqueId", &"x".repeat(65))],
                400,
                "ValidationError",
                "less than or equal to 64",
            ),
            (
                &[("LogicalResourceId", "")],
                400,
                "ValidationError",
                "'logicalResourceId'",
            ),
            (
                &[("StackName", "1prod")],
                400,
                "ValidationError",
                "regular expression",
            ),
            (
                &[("StackName", "gone")],
                400,
                "ValidationError",
                "Stack with id gone does not exist",
            ),
            (
                &[("StackName", "done")],
                400,
                "ValidationError",
                "CREATE_COMPLETE state and cannot be signaled",
            ),
            (
                &[("LogicalResourceId", "Nope")],
                400,
                "ValidationError",
                "Resource Nope does not exist",
            ),
            (
                &[("LogicalResourceId", "WorkerGroup")],
                400,
                "ValidationError",
                "not in a state to accept signals",
            ),
            (
                &[("Version", "2011-01-01")],
                400,
                "InvalidAction",
                "Could not find operation",
            ),
        ];
        for (params, status, code, needle) in cases {
            let (got_status, got_code, message) = refused(&s, params);
            assert_eq!(
                (got_status, got_code.as_str()),
                (*status, *code),
                "{params:?}: {message}"
            );
            assert!(message.contains(needle), "{params:?}: {message}");
        }
        assert!(s.received("prod", "ControlPlaneGroup").is_empty());
        s.deny("prod");
        let (status, code, _) = refused(&s, &[]);
        assert_eq!((status, code.as_str()), (403, "AccessDenied"));
        assert!(s.received("prod", "ControlPlaneGroup").is_empty());
    }

    #[test]
    fn other_actions_pass_through() {
        let s = StackSignals::new();
        let mut req = request(&[]);
        req.params.insert("Action".into(), "DescribeStacks".into());
        assert!(s.handle(&req).is_none());
        assert!(s.calls().is_empty());
    }
}
