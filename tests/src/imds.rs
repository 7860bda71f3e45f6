//! An IMDSv2 double that speaks EC2's wire format.
//!
//! There is no installable IMDS emulator, and the agent relies on the details
//! (token PUT with TTL header, 401 without a token, 404 for absent user-data,
//! 503 during early boot), so this double reproduces them exactly enough for
//! the real `aws-config` IMDS client and raw HTTP probes alike. Runtime
//! setters let a test change what the "instance" reports while it runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use tokio::sync::oneshot;

use crate::lock;
use crate::net::{random_bytes, serve_local};

/// Header carrying the requested token lifetime on `PUT /latest/api/token`.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Header carrying the session token on every metadata request.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Longest token lifetime EC2 grants (6 h).
pub const MAX_TTL_SECONDS: u64 = 21_600;

/// What the fake instance reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsIdentity {
    /// `i-` + 17 hex digits.
    pub instance_id: String,
    /// `local-ipv4`; tests often set an etcd member's loopback IP here.
    pub private_ip: Ipv4Addr,
    /// `placement/availability-zone`, e.g. `us-east-1a`.
    pub availability_zone: String,
    /// `placement/region`, e.g. `us-east-1`.
    pub region: String,
    /// `instance-type`, e.g. `m5.large`.
    pub instance_type: String,
    /// `ami-id`: `ami-` + 17 hex digits.
    pub ami_id: String,
    /// `mac` of the primary interface.
    pub mac: String,
    /// Instance-profile role name under `iam/security-credentials/`.
    pub iam_role: String,
}

impl Default for ImdsIdentity {
    /// A random, plausible `us-east-1` instance, so parallel tests that each
    /// start a "node" never share an identity.
    fn default() -> Self {
        let b = random_bytes();
        Self {
            instance_id: random_ec2_id("i"),
            private_ip: Ipv4Addr::new(10, 0, b[0], 1 + b[1] % 254),
            availability_zone: "us-east-1a".into(),
            region: "us-east-1".into(),
            instance_type: "m5.large".into(),
            ami_id: random_ec2_id("ami"),
            mac: format!(
                "0e:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                b[2], b[3], b[4], b[5], b[6]
            ),
            iam_role: "kubeboot-node".into(),
        }
    }
}

impl ImdsIdentity {
    /// EC2's DNS name for the private IP (`ip-10-0-1-2.ec2.internal` in
    /// us-east-1, `ip-…​.<region>.compute.internal` elsewhere).
    pub fn local_hostname(&self) -> String {
        let dashed = self.private_ip.to_string().replace('.', "-");
        if self.region == "us-east-1" {
            format!("ip-{dashed}.ec2.internal")
        } else {
            format!("ip-{dashed}.{}.compute.internal", self.region)
        }
    }
}

/// `<prefix>-` + 17 lowercase hex digits, the shape of modern EC2 ids.
pub fn random_ec2_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &hex[..17])
}

/// One request the double received, for asserting what a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsRequest {
    /// HTTP method.
    pub method: String,
    /// Request path (no query).
    pub path: String,
    /// Status answered.
    pub status: u16,
}

#[derive(Debug)]
struct Inner {
    identity: ImdsIdentity,
    pending_time: String,
    user_data: Mutex<Option<Vec<u8>>>,
    lifecycle_state: Mutex<String>,
    /// Instance tags served under `meta-data/tags/instance/` (the launch
    /// template enables InstanceMetadataTags).
    tags: Mutex<BTreeMap<String, String>>,
    fail_next: AtomicU32,
    requests: AtomicU64,
    log: Mutex<Vec<ImdsRequest>>,
    /// token -> expiry
    tokens: Mutex<HashMap<String, Instant>>,
}

/// A running IMDSv2 double on `127.0.0.1:<port>`; the server stops on drop.
#[derive(Debug)]
pub struct Imds {
    inner: Arc<Inner>,
    addr: SocketAddr,
    /// Dropped with the double: the server shuts down.
    _shutdown: oneshot::Sender<()>,
}

impl Imds {
    /// Starts a double for a random default instance.
    pub async fn start() -> Self {
        Self::start_with(ImdsIdentity::default()).await
    }

    /// Starts a double reporting `identity`.
    pub async fn start_with(identity: ImdsIdentity) -> Self {
        let inner = Arc::new(Inner {
            identity,
            pending_time: rfc3339(SystemTime::now()),
            user_data: Mutex::new(None),
            lifecycle_state: Mutex::new("InService".into()),
            tags: Mutex::new(BTreeMap::new()),
            fail_next: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, tx) = serve_local(app, "IMDS double").await;
        Self {
            inner,
            addr,
            _shutdown: tx,
        }
    }

    /// Base URL for IMDS clients, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Socket address the double listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The identity being served.
    pub fn identity(&self) -> &ImdsIdentity {
        &self.inner.identity
    }

    /// Sets (or, with `None`, removes → 404) the instance user-data.
    pub fn set_user_data(&self, data: Option<Vec<u8>>) {
        *lock(&self.inner.user_data) = data;
    }

    /// Sets `autoscaling/target-lifecycle-state` (e.g. `Terminated` to tell
    /// the agent its ASG is scaling the instance in).
    pub fn set_lifecycle_state(&self, state: &str) {
        *lock(&self.inner.lifecycle_state) = state.to_string();
    }

    /// Sets an instance tag (e.g. `aws:autoscaling:groupName`, which the ASG
    /// puts on its instances).
    pub fn set_tag(&self, key: &str, value: &str) {
        lock(&self.inner.tags).insert(key.to_string(), value.to_string());
    }

    /// Makes the next `n` requests (of any kind) answer 503, like IMDS in
    /// the first moments of boot.
    pub fn fail_next(&self, n: u32) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// Invalidates every issued token, so the next metadata GET gets 401 and
    /// a correct client must fetch a new token.
    pub fn expire_tokens(&self) {
        lock(&self.inner.tokens).clear();
    }

    /// Total requests received (including failed and rejected ones).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn request_log(&self) -> Vec<ImdsRequest> {
        lock(&self.inner.log).clone()
    }
}

async fn handle(
    State(s): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let path = uri.path().to_string();
    let resp = respond(&s, &method, &path, &headers);
    lock(&s.log).push(ImdsRequest {
        method: method.to_string(),
        path,
        status: resp.status().as_u16(),
    });
    resp
}

fn respond(s: &Inner, method: &Method, path: &str, headers: &HeaderMap) -> Response {
    let failing = s
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return empty(StatusCode::METHOD_NOT_ALLOWED);
        }
        return issue_token(s, headers);
    }
    if method != Method::GET && method != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    if !token_valid(s, headers) {
        return empty(StatusCode::UNAUTHORIZED);
    }
    let Some(rest) = path.strip_prefix("/latest/") else {
        return empty(StatusCode::NOT_FOUND);
    };
    if rest == "user-data" || rest == "user-data/" {
        return match lock(&s.user_data).clone() {
            Some(data) => body(StatusCode::OK, "application/octet-stream", data),
            None => empty(StatusCode::NOT_FOUND),
        };
    }
    let tree = metadata_tree(s);
    if let Some(leaf) = tree.get(rest) {
        // EC2 serves every metadata value, JSON documents included, as text/plain.
        return body(StatusCode::OK, "text/plain", leaf.clone().into_bytes());
    }
    // A directory: list immediate children, sub-directories with a '/'.
    let dir = format!("{}/", rest.trim_end_matches('/'));
    let children: BTreeSet<String> = tree
        .keys()
        .filter_map(|k| k.strip_prefix(&dir))
        .map(|r| match r.split_once('/') {
            Some((d, _)) => format!("{d}/"),
            None => r.to_string(),
        })
        .collect();
    if rest.is_empty() || children.is_empty() {
        return empty(StatusCode::NOT_FOUND);
    }
    let listing = children.into_iter().collect::<Vec<_>>().join("\n");
    body(StatusCode::OK, "text/plain", listing.into_bytes())
}

/// `PUT /latest/api/token`, with EC2's checks.
fn issue_token(s: &Inner, headers: &HeaderMap) -> Response {
    // IMDS refuses anything that looks proxied, to stop SSRF relays.
    if headers.contains_key("x-forwarded-for") {
        return empty(StatusCode::FORBIDDEN);
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|t| (1..=MAX_TTL_SECONDS).contains(t));
    let Some(ttl) = ttl else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let token = {
        let a = uuid::Uuid::new_v4().simple().to_string();
        let b = uuid::Uuid::new_v4().simple().to_string();
        format!("AQAEA{a}{b}")[..56].to_string()
    };
    let now = Instant::now();
    {
        let mut tokens = lock(&s.tokens);
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(token.clone(), now + Duration::from_secs(ttl));
    }
    let mut resp = body(StatusCode::OK, "text/plain", token.into_bytes());
    resp.headers_mut().insert(TTL_HEADER, ttl.into());
    resp
}

fn token_valid(s: &Inner, headers: &HeaderMap) -> bool {
    let Some(token) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    lock(&s.tokens)
        .get(token)
        .is_some_and(|exp| *exp > Instant::now())
}

/// Every leaf document under `/latest/`, keyed by path relative to it.
fn metadata_tree(s: &Inner) -> BTreeMap<String, String> {
    let id = &s.identity;
    let now = SystemTime::now();
    let updated = rfc3339(now);
    let expires = rfc3339(now + Duration::from_secs(6 * 3600));
    let role = &id.iam_role;
    let creds = serde_json::json!({
        "Code": "Success",
        "LastUpdated": updated,
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIAKBTESTFAKEFAKE00",
        "SecretAccessKey": "kbtest/fake/secret/access/key/not/real/00",
        "Token": "kbtest-fake-session-token",
        "Expiration": expires,
    });
    let iam_info = serde_json::json!({
        "Code": "Success",
        "LastUpdated": updated,
        "InstanceProfileArn": format!("arn:aws:iam::000000000000:instance-profile/{role}"),
        "InstanceProfileId": "AIPAKBTESTFAKEFAKE000",
    });
    let document = serde_json::json!({
        "accountId": "000000000000",
        "architecture": "x86_64",
        "availabilityZone": id.availability_zone,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": id.ami_id,
        "instanceId": id.instance_id,
        "instanceType": id.instance_type,
        "kernelId": null,
        "pendingTime": s.pending_time,
        "privateIp": id.private_ip.to_string(),
        "ramdiskId": null,
        "region": id.region,
        "version": "2017-09-30",
    });
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).expect("serialize IMDS JSON document")
    };
    let md = |k: &str| format!("meta-data/{k}");
    let tags = lock(&s.tags).clone();
    let mut paths = BTreeMap::from([
        (md("ami-id"), id.ami_id.clone()),
        (
            md("autoscaling/target-lifecycle-state"),
            lock(&s.lifecycle_state).clone(),
        ),
        (md("hostname"), id.local_hostname()),
        (md("iam/info"), pretty(&iam_info)),
        (
            md(&format!("iam/security-credentials/{role}")),
            pretty(&creds),
        ),
        (md("instance-id"), id.instance_id.clone()),
        (md("instance-type"), id.instance_type.clone()),
        (md("local-hostname"), id.local_hostname()),
        (md("local-ipv4"), id.private_ip.to_string()),
        (md("mac"), id.mac.clone()),
        (
            md("placement/availability-zone"),
            id.availability_zone.clone(),
        ),
        (md("placement/region"), id.region.clone()),
        (
            "dynamic/instance-identity/document".to_string(),
            pretty(&document),
        ),
    ]);
    if !tags.is_empty() {
        paths.insert(
            md("tags/instance"),
            tags.keys().cloned().collect::<Vec<_>>().join("\n"),
        );
        for (k, v) in tags {
            paths.insert(md(&format!("tags/instance/{k}")), v);
        }
    }
    paths
}

fn body(status: StatusCode, content_type: &'static str, bytes: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("content-type", content_type.parse().expect("static header"));
    h.insert("server", "EC2ws".parse().expect("static header"));
    resp
}

/// EC2 error answers carry no body.
fn empty(status: StatusCode) -> Response {
    body(status, "text/plain", Vec::new())
}

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC, the timestamp shape IMDS documents use.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
