//! An in-process HTTP proxy in front of `moto_server` that injects AWS-shaped
//! faults and can answer actions moto lacks.
//!
//! moto answers every request promptly and successfully, but the agent's
//! hardest code paths are the ones AWS exercises under load: throttling, 5xx,
//! attempts that time out, and — worst of all — conditional writes that were
//! applied but whose answer never arrived. This proxy sits between the real
//! SDK clients and moto so tests can produce exactly those conditions, with
//! a seeded RNG so a failing run can be replayed bit for bit.
//!
//! It also answers actions moto lacks: Auto Scaling's
//! `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat` (moto 5.2
//! answers them 500) are built in, see [`AwsProxy::enable_lifecycle_actions`]
//! and [`crate::lifecycle_actions`]; for anything else a [`Handler`] hook
//! answers exactly the actions it knows and the rest is forwarded.
//!
//! Faults are decided *per request that reaches the proxy*, so SDK retries
//! each get their own decision, just as each attempt against AWS would.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::{JoinHandle, JoinSet};

use crate::lifecycle_actions::LifecycleActions;
use crate::lock;

/// Environment variable that replaces the random default fault seed, to
/// replay a failing run (the seed is printed whenever faults are set).
pub const SEED_ENV: &str = "KBTEST_AWSPROXY_SEED";

/// How long a [`FaultKind::Timeout`] holds a request by default: longer than
/// any attempt timeout a test configures, so the client gives up first.
pub const DEFAULT_TIMEOUT_DURATION: Duration = Duration::from_secs(30);

/// Headers that describe one hop's connection, not the message; they must
/// not be copied across the proxy (RFC 9110 §7.6.1). `expect` is dropped too
/// because the proxy has already read the whole body.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// The kinds of failure the proxy can inject, each modelled on what AWS (or
/// the network to it) really does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Not forwarded; answered with the service's throttling error
    /// (`ThrottlingException`, `Throttling`, or EC2's
    /// `RequestLimitExceeded`), which SDKs retry with backoff.
    Throttle,
    /// Not forwarded; answered 500 with the service's internal-error shape.
    ServerError,
    /// Not forwarded; the request is held for
    /// [`FaultPlan::timeout_duration`] and the connection then closed
    /// without an answer, so the client's attempt timeout fires first.
    Timeout,
    /// **Forwarded — the request takes effect upstream** — but the answer is
    /// thrown away: the proxy waits [`FaultPlan::drop_delay`] and closes the
    /// connection without answering. This is the "conditional write timed
    /// out, outcome unknown" case: the client sees a timeout (if the delay
    /// exceeds its attempt timeout) or a broken connection, yet the write
    /// happened, and only a consistent read-back can tell.
    DropAfterForward,
    /// **Not forwarded — the write did not happen.** DynamoDB's answer to a
    /// write racing another on the same item, which moto (serializing every
    /// request) never gives: `TransactWriteItems` is refused with
    /// `TransactionCanceledException` whose `CancellationReasons` has one
    /// entry per `TransactItems` entry, `TransactionConflict` ("Transaction is
    /// ongoing for the item") for the item [`FaultPlan::transact_item`] names
    /// (the first by default) and `None` for the others; `PutItem`,
    /// `UpdateItem` and `DeleteItem` get `TransactionConflictException`.
    /// Neither is retried by the SDK (not in aws-runtime's throttling or
    /// transient codes). Other requests pass through.
    TransactionConflict,
    /// **Not forwarded — the write did not happen.** The write's condition
    /// refused: `ConditionalCheckFailedException` ("The conditional request
    /// failed") for `PutItem`/`UpdateItem`/`DeleteItem`, or
    /// `TransactionCanceledException` with `ConditionalCheckFailed` for the
    /// item [`FaultPlan::transact_item`] names (by default the last one with
    /// a condition expression) and `None` for the others. With `with_item`,
    /// the item as it is upstream (a consistent read) is returned as AWS
    /// returns it — only where the request asked with
    /// `ReturnValuesOnConditionCheckFailure: ALL_OLD` and the item exists
    /// (`Item` in the error, or in that cancellation reason); without it,
    /// never. Other requests pass through.
    ConditionalCheckFailed { with_item: bool },
}

/// Which faults to inject and how often; set with [`AwsProxy::set_faults`].
///
/// Rates are probabilities in `0..=1` per matching request and must sum to
/// at most 1: one uniform draw per matching request picks at most one fault.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Probability of [`FaultKind::Throttle`].
    pub throttle: f64,
    /// Probability of [`FaultKind::ServerError`].
    pub server_error: f64,
    /// Probability of [`FaultKind::Timeout`].
    pub timeout: f64,
    /// Probability of [`FaultKind::DropAfterForward`].
    pub drop_after_forward: f64,
    /// How long a [`FaultKind::Timeout`] holds the request before closing.
    pub timeout_duration: Duration,
    /// How long a [`FaultKind::DropAfterForward`] holds the connection after
    /// upstream answered, before closing it unanswered. Zero (the default)
    /// gives the client a broken connection at once; above the client's
    /// attempt timeout it gives the client a timeout instead.
    pub drop_delay: Duration,
    /// When set, only requests whose operation (`X-Amz-Target` suffix such as
    /// `UpdateItem`, or query `Action`) is listed are eligible for faults —
    /// so a test can break one call without breaking its own setup.
    pub only_targets: Option<Vec<String>>,
    /// Probability of [`FaultKind::TransactionConflict`].
    pub transaction_conflict: f64,
    /// Probability of [`FaultKind::ConditionalCheckFailed`].
    pub condition_failed: f64,
    /// Whether an injected [`FaultKind::ConditionalCheckFailed`] returns the
    /// item (where the request asked for it).
    pub condition_failed_with_item: bool,
    /// Which `TransactItems` entry (from 0) an injected conflict or
    /// condition failure names; `None` for the default of each kind.
    pub transact_item: Option<usize>,
}

impl Default for FaultPlan {
    /// No faults: every request passes through.
    fn default() -> Self {
        Self {
            throttle: 0.0,
            server_error: 0.0,
            timeout: 0.0,
            drop_after_forward: 0.0,
            timeout_duration: DEFAULT_TIMEOUT_DURATION,
            drop_delay: Duration::ZERO,
            only_targets: None,
            transaction_conflict: 0.0,
            condition_failed: 0.0,
            condition_failed_with_item: false,
            transact_item: None,
        }
    }
}

impl FaultPlan {
    /// A plan that applies `kind` to every matching request — the common
    /// "this call always fails like so" setup.
    pub fn always(kind: FaultKind) -> Self {
        let mut plan = Self::default();
        *plan.rate_mut(kind) = 1.0;
        if let FaultKind::ConditionalCheckFailed { with_item } = kind {
            plan.condition_failed_with_item = with_item;
        }
        plan
    }

    /// Restricts the plan to the given operations (see
    /// [`FaultPlan::only_targets`]).
    pub fn only(mut self, operations: &[&str]) -> Self {
        self.only_targets = Some(operations.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Whether any fault can fire at all.
    pub fn is_active(&self) -> bool {
        self.throttle
            + self.server_error
            + self.timeout
            + self.drop_after_forward
            + self.transaction_conflict
            + self.condition_failed
            > 0.0
    }

    fn rate_mut(&mut self, kind: FaultKind) -> &mut f64 {
        match kind {
            FaultKind::Throttle => &mut self.throttle,
            FaultKind::ServerError => &mut self.server_error,
            FaultKind::Timeout => &mut self.timeout,
            FaultKind::DropAfterForward => &mut self.drop_after_forward,
            FaultKind::TransactionConflict => &mut self.transaction_conflict,
            FaultKind::ConditionalCheckFailed { .. } => &mut self.condition_failed,
        }
    }

    fn applies_to(&self, operation: &str) -> bool {
        self.only_targets
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|o| o == operation))
    }

    /// Maps one uniform draw in `[0, 1)` to a fault by cumulative rate.
    fn pick(&self, u: f64) -> Option<FaultKind> {
        let mut edge = 0.0;
        for (rate, kind) in [
            (self.throttle, FaultKind::Throttle),
            (self.server_error, FaultKind::ServerError),
            (self.timeout, FaultKind::Timeout),
            (self.drop_after_forward, FaultKind::DropAfterForward),
            (self.transaction_conflict, FaultKind::TransactionConflict),
            (
                self.condition_failed,
                FaultKind::ConditionalCheckFailed {
                    with_item: self.condition_failed_with_item,
                },
            ),
        ] {
            edge += rate;
            if rate > 0.0 && u < edge {
                return Some(kind);
            }
        }
        None
    }

    fn validate(&self) {
        let rates = [
            self.throttle,
            self.server_error,
            self.timeout,
            self.drop_after_forward,
            self.transaction_conflict,
            self.condition_failed,
        ];
        assert!(
            rates.iter().all(|r| (0.0..=1.0).contains(r)),
            "fault rates must be within 0..=1: {self:?}"
        );
        assert!(
            rates.iter().sum::<f64>() <= 1.0 + 1e-9,
            "fault rates must sum to at most 1: {self:?}"
        );
    }
}

/// Counters over the proxy's lifetime, for "the client really retried" and
/// "the fault really fired" assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests sent upstream, including those whose answer was then dropped.
    pub forwarded: u64,
    /// Requests answered by the proxy itself (built-in lifecycle actions or
    /// the custom [`Handler`]) instead of upstream.
    pub handled: u64,
    /// Requests answered with a throttling error.
    pub throttled: u64,
    /// Requests answered with a 500.
    pub server_errors: u64,
    /// Requests held until the client gave up.
    pub timeouts: u64,
    /// Requests applied upstream whose answer was dropped.
    pub dropped_after_forward: u64,
    /// Writes refused with a transaction conflict (not applied).
    pub transaction_conflicts: u64,
    /// Writes refused with a condition failure (not applied).
    pub conditions_failed: u64,
}

/// One request as the proxy saw it, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// `X-Amz-Target` suffix (`GetItem`), query `Action`
    /// (`DescribeInstances`), or `METHOD /path` for REST protocols.
    pub operation: String,
    /// The fault injected, if any.
    pub fault: Option<FaultKind>,
    /// Status sent to the client; `None` while in flight or when no answer
    /// was sent (timeouts, dropped answers).
    pub status: Option<u16>,
    /// Status upstream answered; `None` if the request was not forwarded.
    /// For a dropped answer this says whether the write succeeded.
    pub upstream_status: Option<u16>,
    /// Whether the proxy answered itself (built-in lifecycle actions or the
    /// custom [`Handler`]) instead of upstream.
    pub handled: bool,
}

/// A request as handed to a [`Handler`], fully read and pre-parsed so
/// handlers can dispatch on the operation and read query parameters.
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path without the query, e.g. `/`.
    pub path: String,
    /// Raw query string without `?` (empty if none).
    pub query: String,
    /// Headers in arrival order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The whole request body.
    pub body: Vec<u8>,
    /// Operation name, as in [`ProxiedRequest::operation`].
    pub operation: String,
    /// Form parameters of query-protocol requests (URL query string and
    /// `application/x-www-form-urlencoded` body, decoded; body wins).
    pub params: BTreeMap<String, String>,
}

impl IncomingRequest {
    /// First value of a header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A decoded query-protocol parameter, e.g. `param("LifecycleHookName")`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Body as JSON, for awsJson handlers.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn protocol(&self) -> Protocol {
        if let Some(target) = self.header("x-amz-target") {
            let content_type = self
                .header("content-type")
                .filter(|c| c.starts_with("application/x-amz-json-"))
                .unwrap_or("application/x-amz-json-1.0")
                .to_string();
            let prefix = target.split('.').next().unwrap_or_default().to_string();
            return Protocol::Json {
                prefix,
                content_type,
            };
        }
        if self.params.contains_key("Action") {
            // EC2 is the only query service on API version 2016-11-15, and
            // its error document differs from every other query service's.
            if self.param("Version") == Some("2016-11-15") {
                return Protocol::Ec2;
            }
            return Protocol::Query;
        }
        Protocol::Rest
    }
}

/// An answer produced by the proxy itself (a [`Handler`] or a fault) rather
/// than forwarded from upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers to send; `content-length` is computed from the body.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl ProxyResponse {
    /// A response with a `content-type` and a fresh `x-amzn-RequestId`, the
    /// two headers every AWS answer carries.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![
                ("content-type".into(), content_type.into()),
                ("x-amzn-requestid".into(), request_id()),
            ],
            body: body.into(),
        }
    }

    /// An awsJson answer; `content_type` should echo the request's
    /// (`application/x-amz-json-1.0` or `-1.1`).
    pub fn json(status: u16, content_type: &str, body: &serde_json::Value) -> Self {
        Self::new(status, content_type, body.to_string())
    }

    /// A query-protocol (XML) answer.
    pub fn xml(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/xml", body)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The service-shaped throttling error for `req`'s protocol.
    pub fn throttling_for(req: &IncomingRequest) -> Self {
        match req.protocol() {
            Protocol::Json {
                prefix,
                content_type,
            } => {
                let (ty, message) = if prefix.starts_with("DynamoDB") {
                    (
                        "com.amazonaws.dynamodb.v20120810#ThrottlingException",
                        "Rate of requests exceeds the allowed throughput.",
                    )
                } else {
                    ("ThrottlingException", "Rate exceeded")
                };
                Self::json(
                    400,
                    &content_type,
                    &serde_json::json!({"__type": ty, "message": message}),
                )
            }
            // EC2 really answers RequestLimitExceeded with 503, not 400.
            Protocol::Ec2 => ec2_error(503, "RequestLimitExceeded", "Request limit exceeded."),
            Protocol::Query => query_error(400, "Sender", "Throttling", "Rate exceeded"),
            Protocol::Rest => Self::new(429, "application/json", r#"{"message":"Rate exceeded"}"#)
                .with_header("x-amzn-errortype", "ThrottlingException"),
        }
    }

    /// The service-shaped 500 for `req`'s protocol.
    pub fn server_error_for(req: &IncomingRequest) -> Self {
        match req.protocol() {
            Protocol::Json {
                prefix,
                content_type,
            } => {
                let ty = if prefix.starts_with("DynamoDB") {
                    "com.amazonaws.dynamodb.v20120810#InternalServerError"
                } else {
                    "InternalServerError"
                };
                Self::json(
                    500,
                    &content_type,
                    &serde_json::json!({"__type": ty, "message": "Internal server error"}),
                )
            }
            Protocol::Ec2 => ec2_error(500, "InternalError", "An internal error has occurred"),
            Protocol::Query => query_error(
                500,
                "Receiver",
                "InternalFailure",
                "The request processing has failed because of an unknown error, exception or failure.",
            ),
            Protocol::Rest => Self::new(
                500,
                "application/json",
                r#"{"message":"Internal server error"}"#,
            )
            .with_header("x-amzn-errortype", "InternalFailure"),
        }
    }

    fn into_hyper(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                resp.headers_mut().append(k, v);
            }
        }
        resp
    }
}

/// A function that may answer a request itself (`Some`) or let it through
/// to upstream (`None`). Faults are decided first, so a handled action can
/// still be throttled.
pub type Handler = Arc<dyn Fn(&IncomingRequest) -> Option<ProxyResponse> + Send + Sync>;

enum Protocol {
    Json {
        prefix: String,
        content_type: String,
    },
    Ec2,
    Query,
    Rest,
}

fn ec2_error(status: u16, code: &str, message: &str) -> ProxyResponse {
    let id = request_id();
    ProxyResponse::xml(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{id}</RequestID></Response>"
        ),
    )
}

fn query_error(status: u16, kind: &str, code: &str, message: &str) -> ProxyResponse {
    let id = request_id();
    ProxyResponse::xml(
        status,
        format!(
            "<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{id}</RequestId></ErrorResponse>"
        ),
    )
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// SplitMix64: tiny, well-distributed, and fully determined by its seed,
/// which is all fault replay needs.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct State {
    plan: FaultPlan,
    seed: u64,
    rng: SplitMix64,
    stats: ProxyStats,
    log: Vec<ProxiedRequest>,
}

struct Shared {
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    state: Mutex<State>,
    handler: RwLock<Option<Handler>>,
    /// Built-in lifecycle actions, consulted before the custom handler.
    lifecycle: RwLock<Option<LifecycleActions>>,
}

/// A running proxy on `127.0.0.1:<port>`; it stops (dropping every open
/// connection and held request) when dropped.
pub struct AwsProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for AwsProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl AwsProxy {
    /// Starts a proxy forwarding to `upstream` (e.g. [`crate::moto::Moto::endpoint`]),
    /// with no faults and a fault seed from [`SEED_ENV`] or random.
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_end_matches('/').to_string();
        assert!(
            upstream
                .parse::<Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("http")),
            "awsproxy upstream must be an http:// URL, got {upstream:?}"
        );
        let seed = std::env::var(SEED_ENV)
            .ok()
            .map(|s| {
                s.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{SEED_ENV}={s:?} is not a u64: {e}"))
            })
            .unwrap_or_else(|| {
                let b = crate::net::random_bytes();
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            });
        let shared = Arc::new(Shared {
            upstream,
            client: Client::builder(TokioExecutor::new()).build_http(),
            state: Mutex::new(State {
                plan: FaultPlan::default(),
                seed,
                rng: SplitMix64(seed),
                stats: ProxyStats::default(),
                log: Vec::new(),
            }),
            handler: RwLock::new(None),
            lifecycle: RwLock::new(None),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind awsproxy on 127.0.0.1");
        let addr = listener.local_addr().expect("awsproxy local address");
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self { shared, addr, task }
    }

    /// Reseeds the fault RNG, so a test's fault sequence is fixed (or a
    /// failing run replayed).
    pub fn with_seed(self, seed: u64) -> Self {
        {
            let mut st = lock(&self.shared.state);
            st.seed = seed;
            st.rng = SplitMix64(seed);
        }
        self
    }

    /// The seed the fault RNG started from.
    pub fn seed(&self) -> u64 {
        lock(&self.shared.state).seed
    }

    /// Base URL for SDK `endpoint_url`, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Socket address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the fault plan; takes effect for the next request. Panics on
    /// rates outside `0..=1` or summing above 1 (a test bug).
    pub fn set_faults(&self, plan: FaultPlan) {
        plan.validate();
        let mut st = lock(&self.shared.state);
        if plan.is_active() {
            eprintln!(
                "awsproxy {}: faults {plan:?}, seed {} (replay with {SEED_ENV}={})",
                self.addr, st.seed, st.seed
            );
        }
        st.plan = plan;
    }

    /// Turns every fault off.
    pub fn clear_faults(&self) {
        self.set_faults(FaultPlan::default());
    }

    /// Installs a handler consulted before forwarding (see [`Handler`]),
    /// after the built-in lifecycle actions if those are enabled.
    pub fn set_handler(&self, handler: Handler) {
        *self
            .shared
            .handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    /// Removes the handler; everything is forwarded again.
    pub fn clear_handler(&self) {
        *self
            .shared
            .handler
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Starts answering `CompleteLifecycleAction` and
    /// `RecordLifecycleActionHeartbeat` like AWS, from a fresh state on
    /// tokio's clock; returns the handle to register pending actions and
    /// inspect calls. Replaces any state set before. Faults still apply
    /// first (a dropped answer still completes the action, as on AWS).
    pub fn enable_lifecycle_actions(&self) -> LifecycleActions {
        let actions = LifecycleActions::new();
        self.set_lifecycle_actions(&actions);
        actions
    }

    /// Like [`AwsProxy::enable_lifecycle_actions`] with a state the test
    /// built, e.g. [`LifecycleActions::with_manual_clock`], or one shared by
    /// several proxies.
    pub fn set_lifecycle_actions(&self, actions: &LifecycleActions) {
        *self
            .shared
            .lifecycle
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(actions.clone());
    }

    /// Stops answering lifecycle actions; they are forwarded to moto again.
    pub fn clear_lifecycle_actions(&self) {
        *self
            .shared
            .lifecycle
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Counters so far.
    pub fn stats(&self) -> ProxyStats {
        lock(&self.shared.state).stats
    }

    /// Every request so far, in arrival order.
    pub fn log(&self) -> Vec<ProxiedRequest> {
        lock(&self.shared.state).log.clone()
    }

    /// Log entries for one operation, e.g. every `GetItem` attempt.
    pub fn log_for(&self, operation: &str) -> Vec<ProxiedRequest> {
        lock(&self.shared.state)
            .log
            .iter()
            .filter(|r| r.operation == operation)
            .cloned()
            .collect()
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every
        // connection task — including requests held by Timeout faults.
        self.task.abort();
    }
}

/// Returned by the service to make hyper close the connection without
/// writing a response — the only way to "lose" an answer on purpose.
#[derive(Debug)]
struct Hangup;

impl fmt::Display for Hangup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("awsproxy closed the connection without answering (injected fault)")
    }
}

impl std::error::Error for Hangup {}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("awsproxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { shared.handle(req).await }
            });
            // Errors here are client disconnects or our own Hangup.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Shared {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Hangup> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Err(Hangup),
        };
        let incoming = parse_request(&parts, &body);

        let (index, fault, plan) = {
            let mut st = lock(&self.state);
            let plan = st.plan.clone();
            let fault = if plan.applies_to(&incoming.operation) {
                let u = st.rng.next_f64();
                plan.pick(u)
            } else {
                None
            };
            // A refused write exists only for DynamoDB's writes.
            let fault = fault.filter(|f| !f.refuses_a_write() || dynamodb_write(&incoming));
            match fault {
                Some(FaultKind::Throttle) => st.stats.throttled += 1,
                Some(FaultKind::ServerError) => st.stats.server_errors += 1,
                Some(FaultKind::Timeout) => st.stats.timeouts += 1,
                Some(FaultKind::DropAfterForward) => st.stats.dropped_after_forward += 1,
                Some(FaultKind::TransactionConflict) => st.stats.transaction_conflicts += 1,
                Some(FaultKind::ConditionalCheckFailed { .. }) => st.stats.conditions_failed += 1,
                None => {}
            }
            st.log.push(ProxiedRequest {
                operation: incoming.operation.clone(),
                fault,
                status: None,
                upstream_status: None,
                handled: false,
            });
            (st.log.len() - 1, fault, plan)
        };
        let record = |f: &dyn Fn(&mut ProxiedRequest)| {
            if let Some(entry) = lock(&self.state).log.get_mut(index) {
                f(entry);
            }
        };

        match fault {
            Some(FaultKind::Throttle) => {
                let resp = ProxyResponse::throttling_for(&incoming);
                record(&|e| e.status = Some(resp.status));
                return Ok(resp.into_hyper());
            }
            Some(FaultKind::ServerError) => {
                let resp = ProxyResponse::server_error_for(&incoming);
                record(&|e| e.status = Some(resp.status));
                return Ok(resp.into_hyper());
            }
            Some(FaultKind::Timeout) => {
                tokio::time::sleep(plan.timeout_duration).await;
                return Err(Hangup);
            }
            Some(FaultKind::TransactionConflict) => {
                let resp = write_refusal(&incoming, Refused::Conflict, plan.transact_item, None);
                record(&|e| e.status = Some(resp.status));
                return Ok(resp.into_hyper());
            }
            Some(FaultKind::ConditionalCheckFailed { with_item }) => {
                let index = condition_item(&incoming, plan.transact_item);
                let item = match (with_item, index) {
                    (true, Some(i)) => self.item_for(&parts, &incoming, i).await,
                    (true, None) => self.item_for(&parts, &incoming, usize::MAX).await,
                    _ => None,
                };
                let resp = write_refusal(&incoming, Refused::Condition, index, item);
                record(&|e| e.status = Some(resp.status));
                return Ok(resp.into_hyper());
            }
            Some(FaultKind::DropAfterForward) | None => {}
        }

        let lifecycle = self
            .lifecycle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let handler = self
            .handler
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let handled = lifecycle
            .and_then(|l| l.handle(&incoming))
            .or_else(|| handler.and_then(|h| h(&incoming)));
        let resp = match handled {
            Some(resp) => {
                lock(&self.state).stats.handled += 1;
                let status = resp.status;
                record(&|e| {
                    e.handled = true;
                    e.upstream_status = None;
                    e.status = Some(status);
                });
                resp.into_hyper()
            }
            None => {
                lock(&self.state).stats.forwarded += 1;
                let resp = self.forward(&parts, body).await;
                let status = resp.status().as_u16();
                record(&|e| e.upstream_status = Some(status));
                resp
            }
        };

        if fault == Some(FaultKind::DropAfterForward) {
            if !plan.drop_delay.is_zero() {
                tokio::time::sleep(plan.drop_delay).await;
            }
            return Err(Hangup);
        }
        let status = resp.status().as_u16();
        record(&|e| e.status = Some(status));
        Ok(resp)
    }

    /// Sends the request upstream unchanged except for hop-by-hop headers.
    /// `Host` is kept as the client sent it: the SigV4 signature covers it
    /// (moto does not check, but it keeps the request byte-faithful) and any
    /// URL moto builds from it points back at the proxy.
    async fn forward(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = match format!("{}{path_and_query}", self.upstream).parse::<Uri>() {
            Ok(u) => u,
            Err(e) => return bad_gateway(&format!("cannot build upstream URI: {e}")),
        };
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        for (k, v) in &parts.headers {
            if !is_hop_by_hop(k.as_str()) {
                up.headers_mut().append(k.clone(), v.clone());
            }
        }
        let answer = match self.client.request(up).await {
            Ok(a) => a,
            Err(e) => return bad_gateway(&format!("upstream {} failed: {e}", self.upstream)),
        };
        let (aparts, abody) = answer.into_parts();
        let abody = match abody.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return bad_gateway(&format!("upstream body failed: {e}")),
        };
        let mut resp = Response::new(Full::new(abody));
        *resp.status_mut() = aparts.status;
        for (k, v) in &aparts.headers {
            if !is_hop_by_hop(k.as_str()) {
                resp.headers_mut().append(k.clone(), v.clone());
            }
        }
        resp
    }
}

impl FaultKind {
    /// Whether this fault answers as DynamoDB refusing a write (not applied).
    fn refuses_a_write(self) -> bool {
        matches!(
            self,
            FaultKind::TransactionConflict | FaultKind::ConditionalCheckFailed { .. }
        )
    }
}

/// DynamoDB's JSON error type prefix.
const DYNAMODB_ERROR: &str = "com.amazonaws.dynamodb.v20120810#";

/// A DynamoDB write a conflict or condition failure can refuse.
fn dynamodb_write(req: &IncomingRequest) -> bool {
    req.header("x-amz-target")
        .is_some_and(|t| t.starts_with("DynamoDB_"))
        && matches!(
            req.operation.as_str(),
            "TransactWriteItems" | "PutItem" | "UpdateItem" | "DeleteItem"
        )
}

/// What refused an injected write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refused {
    Conflict,
    Condition,
}

/// The `TransactItems` entries of a `TransactWriteItems` request, each as
/// `(action, body)` (`ConditionCheck`, `Put`, `Update`, `Delete`).
fn transact_items(req: &IncomingRequest) -> Vec<(String, serde_json::Value)> {
    req.json()
        .and_then(|v| v.get("TransactItems").and_then(|t| t.as_array()).cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| {
            let (action, body) = entry.as_object()?.iter().next()?;
            Some((action.clone(), body.clone()))
        })
        .collect()
}

/// The transaction entry an injected condition failure names: `wanted`, or
/// the last entry with a condition expression. `None` for a single-item write.
fn condition_item(req: &IncomingRequest, wanted: Option<usize>) -> Option<usize> {
    if req.operation != "TransactWriteItems" {
        return None;
    }
    let items = transact_items(req);
    wanted.or_else(|| {
        items
            .iter()
            .rposition(|(_, body)| body.get("ConditionExpression").is_some())
    })
}

impl Shared {
    /// The item a refused write concerns, as upstream has it (a consistent
    /// GetItem), if the request asked for it with
    /// `ReturnValuesOnConditionCheckFailure: ALL_OLD`; `index` picks the
    /// transaction entry (ignored for a single-item write).
    async fn item_for(
        &self,
        parts: &hyper::http::request::Parts,
        req: &IncomingRequest,
        index: usize,
    ) -> Option<serde_json::Value> {
        let body = if req.operation == "TransactWriteItems" {
            transact_items(req).get(index)?.1.clone()
        } else {
            req.json()?
        };
        if body.get("ReturnValuesOnConditionCheckFailure")?.as_str()? != "ALL_OLD" {
            return None;
        }
        let key = match (body.get("Key"), body.get("Item")) {
            (Some(k), _) => k.clone(),
            // A Put names its key inside the item; the key schema decides
            // which attributes, and the agent's tables use pk/sk.
            (None, Some(item)) => {
                let mut key = serde_json::Map::new();
                for name in ["pk", "sk"] {
                    if let Some(v) = item.get(name) {
                        key.insert(name.into(), v.clone());
                    }
                }
                serde_json::Value::Object(key)
            }
            _ => return None,
        };
        let get = serde_json::json!({
            "TableName": body.get("TableName")?,
            "Key": key,
            "ConsistentRead": true,
        });
        let mut up = Request::new(Full::new(Bytes::from(get.to_string())));
        *up.method_mut() = hyper::Method::POST;
        *up.uri_mut() = format!("{}/", self.upstream).parse().ok()?;
        for (k, v) in &parts.headers {
            let name = k.as_str();
            if !is_hop_by_hop(name) && name != "content-length" && name != "x-amz-target" {
                up.headers_mut().append(k.clone(), v.clone());
            }
        }
        up.headers_mut().insert(
            HeaderName::from_static("x-amz-target"),
            HeaderValue::from_static("DynamoDB_20120810.GetItem"),
        );
        let answer = self.client.request(up).await.ok()?;
        let bytes = answer.into_body().collect().await.ok()?.to_bytes();
        let got: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        got.get("Item").cloned()
    }
}

/// DynamoDB refusing a write without applying it, in AWS's JSON shapes:
/// `TransactionCanceledException` (capital `Message`, one reason per
/// item, `{"Code": "None"}` for the others, the failing reason with its
/// `Message` and, where returned, `Item`) for a transaction, else the
/// operation's own exception (lower-case `message`, `Item` where returned).
fn write_refusal(
    req: &IncomingRequest,
    refused: Refused,
    index: Option<usize>,
    item: Option<serde_json::Value>,
) -> ProxyResponse {
    let content_type = req
        .header("content-type")
        .unwrap_or("application/x-amz-json-1.0")
        .to_string();
    let (code, message) = match refused {
        Refused::Conflict => ("TransactionConflict", "Transaction is ongoing for the item"),
        Refused::Condition => ("ConditionalCheckFailed", "The conditional request failed"),
    };
    if req.operation == "TransactWriteItems" {
        let count = transact_items(req).len().max(1);
        let failing = index.unwrap_or(0).min(count - 1);
        let reasons: Vec<serde_json::Value> = (0..count)
            .map(|i| {
                if i != failing {
                    return serde_json::json!({"Code": "None"});
                }
                let mut reason = serde_json::json!({"Code": code, "Message": message});
                if let Some(item) = &item {
                    reason["Item"] = item.clone();
                }
                reason
            })
            .collect();
        let codes: Vec<&str> = reasons
            .iter()
            .map(|r| r["Code"].as_str().unwrap_or("None"))
            .collect();
        return ProxyResponse::json(
            400,
            &content_type,
            &serde_json::json!({
                "__type": format!("{DYNAMODB_ERROR}TransactionCanceledException"),
                "Message": format!(
                    "Transaction cancelled, please refer cancellation reasons for specific reasons [{}]",
                    codes.join(", ")
                ),
                "CancellationReasons": reasons,
            }),
        );
    }
    let exception = match refused {
        Refused::Conflict => "TransactionConflictException",
        Refused::Condition => "ConditionalCheckFailedException",
    };
    let mut body = serde_json::json!({
        "__type": format!("{DYNAMODB_ERROR}{exception}"),
        "message": message,
    });
    if let Some(item) = item {
        body["Item"] = item;
    }
    ProxyResponse::json(400, &content_type, &body)
}

fn bad_gateway(message: &str) -> Response<Full<Bytes>> {
    eprintln!("awsproxy: {message}");
    ProxyResponse::new(502, "text/plain", format!("awsproxy: {message}")).into_hyper()
}

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn parse_request(parts: &hyper::http::request::Parts, body: &[u8]) -> IncomingRequest {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let mut params = parse_form(&query);
    let is_form = headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        params.extend(parse_form(&String::from_utf8_lossy(body)));
    }
    let target = headers
        .iter()
        .find(|(k, _)| k == "x-amz-target")
        .map(|(_, v)| v.rsplit('.').next().unwrap_or(v).to_string());
    let operation = target
        .or_else(|| params.get("Action").cloned())
        .unwrap_or_else(|| format!("{} {}", parts.method, parts.uri.path()));
    IncomingRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        headers,
        body: body.to_vec(),
        operation,
        params,
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a
/// byte); malformed escapes are kept literally rather than rejected.
fn parse_form(s: &str) -> BTreeMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_percent_and_junk() {
        let p = parse_form("Action=CompleteLifecycleAction&Hook=a+b%2Fc&Bad=%zz&Tail=%4");
        assert_eq!(p["Action"], "CompleteLifecycleAction");
        assert_eq!(p["Hook"], "a b/c");
        assert_eq!(p["Bad"], "%zz");
        assert_eq!(p["Tail"], "%4");
    }

    #[test]
    fn pick_respects_cumulative_rates() {
        let plan = FaultPlan {
            throttle: 0.25,
            server_error: 0.25,
            ..FaultPlan::default()
        };
        assert_eq!(plan.pick(0.1), Some(FaultKind::Throttle));
        assert_eq!(plan.pick(0.3), Some(FaultKind::ServerError));
        assert_eq!(plan.pick(0.6), None);
        assert_eq!(FaultPlan::default().pick(0.0), None);
    }
}
