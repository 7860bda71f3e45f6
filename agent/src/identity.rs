//! Who this instance is, from the instance metadata service (IMDSv2 only).
//!
//! Early in boot IMDS may not answer yet, so every read retries transient
//! failures (connection refused, timeouts, 5xx, 429) until `imds.deadline`,
//! then fails with the last error. A session token is fetched with `PUT`,
//! cached for most of its TTL and refreshed once on 401. Bodies are returned
//! as bytes: user-data may be gzip-compressed, which a `String` API cannot carry.

use crate::config::model;
use crate::retry::{self, Classify, RetryClass, WaitPolicy};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Token lifetime requested from IMDS (the maximum, six hours).
const TOKEN_TTL_SECS: u64 = 21_600;
/// Refresh the cached token this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Metadata documents are small; refuse anything absurd.
const MAX_BODY: usize = 1024 * 1024;

/// Failure to read instance metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IMDS endpoint {endpoint:?} is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("IMDS request {method} {path} to {endpoint} failed: {reason}")]
    Request {
        method: &'static str,
        path: String,
        endpoint: String,
        reason: String,
        transient: bool,
    },
    #[error("IMDS answered {status} to {method} {path} at {endpoint}")]
    Status {
        method: &'static str,
        path: String,
        endpoint: String,
        status: u16,
    },
    #[error("IMDS at {endpoint} has no {path} (404)")]
    Missing { path: String, endpoint: String },
    #[error("IMDS at {endpoint} did not answer {path} within {}: {last}", crate::config::value::format_duration(*deadline))]
    Deadline {
        path: String,
        endpoint: String,
        deadline: Duration,
        last: String,
    },
}

impl Classify for Error {
    fn retry_class(&self) -> RetryClass {
        match self {
            Error::Request {
                transient: true, ..
            } => RetryClass::Transient,
            Error::Status { status, .. } if *status >= 500 || *status == 429 || *status == 401 => {
                RetryClass::Transient
            }
            _ => RetryClass::Permanent,
        }
    }
}

/// Who this instance is: what bootstrap needs before anything else.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub instance_id: String,
    /// Primary private IPv4: the API server's and etcd's advertise address.
    pub private_ip: String,
    /// EC2 private DNS name: the Node name kubeadm registers.
    pub hostname: String,
    pub availability_zone: String,
    pub region: String,
}

/// The IMDS paths the agent reads, named once.
pub mod paths {
    pub const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
    pub const LOCAL_IPV4: &str = "/latest/meta-data/local-ipv4";
    pub const LOCAL_HOSTNAME: &str = "/latest/meta-data/local-hostname";
    pub const AVAILABILITY_ZONE: &str = "/latest/meta-data/placement/availability-zone";
    pub const REGION: &str = "/latest/meta-data/placement/region";
    pub const USER_DATA: &str = "/latest/user-data";
    /// The ASG's target lifecycle state for this instance.
    pub const TARGET_LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
    /// The ASG name tag (needs InstanceMetadataTags on the launch template).
    pub const ASG_NAME_TAG: &str = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
}

/// An IMDSv2 client with early-boot retries.
#[derive(Debug)]
pub struct Imds {
    endpoint: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    request_timeout: Duration,
    deadline: Duration,
    token: Mutex<Option<(String, Instant)>>,
}

impl Imds {
    /// A client for the configured endpoint; no request is made yet.
    pub fn new(settings: &model::Imds) -> Result<Self, Error> {
        let endpoint = settings.endpoint.trim_end_matches('/').to_string();
        if !endpoint.starts_with("http://") {
            return Err(Error::Endpoint {
                endpoint,
                reason: "only plain http:// is served by IMDS".into(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.request_timeout));
        Ok(Imds {
            endpoint,
            client: Client::builder(TokioExecutor::new()).build(connector),
            request_timeout: settings.request_timeout,
            deadline: settings.deadline,
            token: Mutex::new(None),
        })
    }

    /// Reads the instance's identity (each read retried through the early-boot window).
    pub async fn identity(&self) -> Result<Identity, Error> {
        Ok(Identity {
            instance_id: self.text(paths::INSTANCE_ID).await?,
            private_ip: self.text(paths::LOCAL_IPV4).await?,
            hostname: self.text(paths::LOCAL_HOSTNAME).await?,
            availability_zone: self.text(paths::AVAILABILITY_ZONE).await?,
            region: self.text(paths::REGION).await?,
        })
    }

    /// The instance's region, `None` if IMDS has none.
    pub async fn region(&self) -> Result<Option<String>, Error> {
        self.optional_text(paths::REGION).await
    }

    /// The Auto Scaling group's target lifecycle state for this instance
    /// (`InService`, `Terminated`, ...), `None` outside a group.
    pub async fn target_lifecycle_state(&self) -> Result<Option<String>, Error> {
        self.optional_text(paths::TARGET_LIFECYCLE_STATE).await
    }

    /// The name of this instance's Auto Scaling group from its tags, `None`
    /// unless the launch template enables InstanceMetadataTags.
    pub async fn asg_name(&self) -> Result<Option<String>, Error> {
        self.optional_text(paths::ASG_NAME_TAG).await
    }

    async fn optional_text(&self, path: &str) -> Result<Option<String>, Error> {
        Ok(self
            .get(path)
            .await?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// A metadata value that must exist, as trimmed text.
    pub async fn text(&self, path: &str) -> Result<String, Error> {
        match self.get(path).await? {
            Some(bytes) => Ok(String::from_utf8_lossy(&bytes).trim().to_string()),
            None => Err(Error::Missing {
                path: path.to_string(),
                endpoint: self.endpoint.clone(),
            }),
        }
    }

    /// The raw user-data, or `None` when the instance has none (IMDS answers 404).
    pub async fn user_data(&self) -> Result<Option<Vec<u8>>, Error> {
        self.get(paths::USER_DATA).await
    }

    /// Reads a metadata path such as `/latest/meta-data/instance-id`;
    /// `None` on 404. Retries transient failures until the deadline. The
    /// agent reads through the typed methods above; tests probe the double.
    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let policy = WaitPolicy {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: 10_000,
            deadline: Some(self.deadline),
        };
        retry::with_retries("imds", &policy, || self.get_once(path))
            .await
            .map_err(|e| match e {
                retry::RetryError::Failed(e) => e,
                retry::RetryError::Deadline { deadline, last, .. } => Error::Deadline {
                    path: path.to_string(),
                    endpoint: self.endpoint.clone(),
                    deadline,
                    last: last.unwrap_or_else(|| "no answer".into()),
                },
            })
    }

    async fn get_once(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let token = self.token().await?;
        let (status, body) = self
            .send(Method::GET, path, &[("x-aws-ec2-metadata-token", &token)])
            .await?;
        match status {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_FOUND => Ok(None),
            other => {
                if other == StatusCode::UNAUTHORIZED {
                    *self.token.lock().await = None;
                }
                Err(self.status_error("GET", path, other))
            }
        }
    }

    async fn token(&self) -> Result<String, Error> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref() {
            if Instant::now() + TOKEN_REFRESH_MARGIN < *expires {
                return Ok(token.clone());
            }
        }
        let path = "/latest/api/token";
        let ttl = TOKEN_TTL_SECS.to_string();
        let started = Instant::now();
        let (status, body) = self
            .send(
                Method::PUT,
                path,
                &[("x-aws-ec2-metadata-token-ttl-seconds", &ttl)],
            )
            .await?;
        if status != StatusCode::OK {
            return Err(self.status_error("PUT", path, status));
        }
        let token = String::from_utf8(body).map_err(|_| Error::Request {
            method: "PUT",
            path: path.into(),
            endpoint: self.endpoint.clone(),
            reason: "token is not text".into(),
            transient: false,
        })?;
        *cached = Some((token.clone(), started + Duration::from_secs(TOKEN_TTL_SECS)));
        Ok(token)
    }

    fn status_error(&self, method: &'static str, path: &str, status: StatusCode) -> Error {
        Error::Status {
            method,
            path: path.into(),
            endpoint: self.endpoint.clone(),
            status: status.as_u16(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Vec<u8>), Error> {
        let method_name: &'static str = if method == Method::PUT { "PUT" } else { "GET" };
        let fail = |reason: String, transient: bool| Error::Request {
            method: method_name,
            path: path.to_string(),
            endpoint: self.endpoint.clone(),
            reason,
            transient,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoint));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| fail(e.to_string(), false))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(e.to_string(), true))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string(), true))?
                .to_bytes();
            if body.len() > MAX_BODY {
                return Err(fail(
                    format!("answer of {} bytes is too large", body.len()),
                    false,
                ));
            }
            Ok((status, body.to_vec()))
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.request_timeout), true))?
    }
}
/// Reads the user-data through IMDSv2 for [`crate::config::load_with`].
pub struct UserDataFromImds;

impl crate::config::UserDataSource for UserDataFromImds {
    async fn user_data(
        &self,
        settings: &model::Imds,
    ) -> Result<Option<Vec<u8>>, crate::config::FetchError> {
        Ok(Imds::new(settings)?.user_data().await?)
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Endpoint { .. } => &crate::catalogue::IMDS_ENDPOINT,
            E::Request { .. } => &crate::catalogue::IMDS_REQUEST,
            E::Status { status: 403, .. } => &crate::catalogue::IMDS_FORBIDDEN,
            E::Status { .. } => &crate::catalogue::IMDS_STATUS,
            E::Missing { .. } => &crate::catalogue::IMDS_MISSING,
            E::Deadline { .. } => &crate::catalogue::IMDS_DEADLINE,
        }
    }
}
