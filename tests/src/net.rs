//! Addresses for test servers, and a bare HTTP/1.1 client.
//!
//! Parallel tests must never fight over ports, and an etcd member should look
//! like a real node (its own IP, standard ports 2379/2380). The whole
//! 127.0.0.0/8 block routes to loopback on Linux, so each member gets a fresh
//! random 127.x.y.z address instead of juggling port numbers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// etcd's standard client port; every member uses it on its own IP.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's standard peer port; every member uses it on its own IP.
pub const ETCD_PEER_PORT: u16 = 2380;

/// A port on `ip` that was free a moment ago (the OS picks it), for servers
/// that must be told their port up front. Small race by nature: callers that
/// spawn a process on it should retry with a new port if it fails to bind.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind an ephemeral port on {ip}: {e}"))
}

/// Random bytes without pulling in an RNG crate: UUIDv4 is 122 bits from the
/// OS CSPRNG, plenty for picking addresses and fake identifiers.
pub fn random_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

/// A random loopback address `127.(1..=254).(0..=255).(1..=254)` on which
/// ports 2379 and 2380 are both bindable right now, so an etcd member can use
/// the standard ports without colliding with tests running in parallel.
///
/// Avoids 127.0.x.x (so never 127.0.0.1, where real services live).
pub fn fresh_loopback_ip() -> Ipv4Addr {
    for _ in 0..200 {
        let b = random_bytes();
        let ip = Ipv4Addr::new(127, 1 + b[0] % 254, b[1], 1 + b[2] % 254);
        let client = TcpListener::bind((ip, ETCD_CLIENT_PORT));
        let peer = TcpListener::bind((ip, ETCD_PEER_PORT));
        if client.is_ok() && peer.is_ok() {
            return ip;
        }
    }
    panic!("no 127.x.y.z address with ports 2379 and 2380 free after 200 tries: is loopback 127.0.0.0/8 routable here?")
}

/// A parsed HTTP/1.1 response from [`http_request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code, e.g. 401.
    pub status: u16,
    /// Header names lowercased; the last value wins on repeats.
    pub headers: BTreeMap<String, String>,
    /// Body bytes, exactly as sent (chunked encoding is decoded).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Body as lossy UTF-8, for assertions on text endpoints.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Value of a header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Sends one HTTP/1.1 request over a fresh TCP connection and reads the whole
/// response (`Connection: close`).
///
/// Deliberately not a real client: tests use it to send exactly the bytes
/// they mean (missing headers, no token, odd methods) that SDK clients would
/// never produce. `endpoint` is `http://host:port`; `path` starts with `/`.
pub async fn http_request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<RawResponse> {
    let authority = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("not an http:// endpoint: {endpoint}")))?
        .trim_end_matches('/');
    let io = async {
        let mut stream = TcpStream::connect(authority).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| std::io::Error::other(format!("{method} {endpoint}{path} timed out")))??;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<RawResponse> {
    let bad = |what: &str| std::io::Error::other(format!("malformed HTTP response: {what}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(status_line))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        decode_chunked(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&rest[..eol]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// A loopback address nothing listens on (connection refused): bound for a
/// moment to pick a free port, then closed.
pub fn closed_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// A TCP endpoint that takes no more connections: its accept queue is full,
/// so a new connect hangs (SYNs are dropped) like a wedged peer's. Returns
/// the listener and the connections that fill its queue (both must be kept
/// for the endpoint to stay stalled) and its address.
pub fn stalled_endpoint() -> (TcpListener, Vec<std::net::TcpStream>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..4096 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => return (listener, held, addr.to_string()),
        }
    }
    panic!("the accept queue never filled");
}

/// Serves `app` on a fresh port of 127.0.0.1 in a task of its own, until
/// the returned sender fires or is dropped (a graceful shutdown); `what`
/// names the double in panics.
pub async fn serve_local(
    app: axum::Router,
    what: &str,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap_or_else(|e| panic!("bind {what} on 127.0.0.1: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{what} local address: {e}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    (addr, tx)
}

/// A TCP forwarder (a load balancer in front of one server): every
/// connection to [`Forwarder::addr`] is piped to the target. Stops with the
/// value.
pub struct Forwarder {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listens on `listen` (panics if it cannot) and forwards to `to`.
    pub async fn start(listen: SocketAddr, to: SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("forwarder cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("forwarder address");
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Forwarder { addr, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP server collecting newline-delimited lines, as the CloudWatch
/// agent's EMF listener receives them. Stops with the value.
pub struct LineSink {
    addr: SocketAddr,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LineSink {
    /// Listens on 127.0.0.1, an ephemeral port.
    pub async fn start() -> LineSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("line sink listens");
        let addr = listener.local_addr().expect("line sink address");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = lines.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt as _;
                    let mut reader = tokio::io::BufReader::new(stream).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        shared.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    }
                });
            }
        });
        LineSink { addr, lines, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every line received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for LineSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
