//! `moto_server` as the AWS endpoint, reached through the real SDK clients.
//!
//! Using the real SDK against a faithful emulator exercises request signing,
//! serialization and error mapping that a mocked client trait would skip.
//! Credentials are static fakes: tests must never be able to touch a real
//! AWS account, whatever the environment holds.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};
use tempfile::TempDir;

use crate::net::{free_port, http_request};
use crate::process::ChildGuard;
use crate::workspace::workspace_root;

/// Region every test account lives in.
pub const REGION: &str = "us-east-1";

/// How long moto gets to start answering HTTP (it is a cold Python start).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A private `moto_server` for one test: its own port and in-memory state,
/// stopped (and reaped) on drop.
#[derive(Debug)]
pub struct Moto {
    process: ChildGuard,
    port: u16,
    /// Holds the server log; declared last so it outlives the process.
    _dir: TempDir,
}

impl Moto {
    /// Starts `moto_server` on 127.0.0.1 and a free port and waits until it
    /// answers HTTP. Retries on a new port if the chosen one was taken in
    /// the meantime; panics with the server log if it never comes up.
    ///
    /// Runs moto's server through `tests/support/moto_linearizable.py`, which
    /// makes each request atomic inside moto as each conditional write is in
    /// DynamoDB (moto alone lets two concurrent conditional writes both pass).
    /// Interpreter: `KBTEST_MOTO_PYTHON`, else `<workspace>/.venv/moto/bin/python`.
    pub async fn start() -> Self {
        let bin = moto_python();
        let script = workspace_root().join("tests/support/moto_linearizable.py");
        let dir = tempfile::Builder::new()
            .prefix("kbtest-moto-")
            .tempdir()
            .expect("create temp dir for moto_server");
        let log = dir.path().join("moto.log");
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let mut cmd = Command::new(&bin);
            cmd.arg(&script)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            let mut process = ChildGuard::spawn("moto_server", cmd, &log)
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()))
                .with_grace(Duration::from_millis(500));
            let endpoint = format!("http://127.0.0.1:{port}");
            loop {
                if !process.is_running() {
                    break;
                }
                // Ours, not another test's moto that drew the same port
                // (then ours fails to bind, exits, and is started again).
                if http_request(&endpoint, "GET", "/moto-api/", &[], b"")
                    .await
                    .is_ok()
                    && crate::process::listens_on(process.pid(), port)
                {
                    return Self {
                        process,
                        port,
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline {
                    panic!(
                        "moto_server did not answer on {endpoint} within {READY_TIMEOUT:?}; log tail:\n{}",
                        process.log_tail(40)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if attempts >= 3 || Instant::now() >= deadline {
                panic!(
                    "moto_server exited during startup ({attempts} attempts); log tail:\n{}",
                    process.log_tail(40)
                );
            }
        }
    }

    /// Base URL for SDK `endpoint_url`, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// TCP port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Server pid, for "nothing survives" assertions.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Last `n` lines of the server log (one line per request), for failures.
    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    /// SDK config pointing every service at this moto with fake static
    /// credentials and region `us-east-1`.
    ///
    /// Built explicitly rather than via `aws_config::defaults` so nothing is
    /// read from the environment, profile files or IMDS: no real credential
    /// or endpoint can leak into a test.
    pub async fn sdk_config(&self) -> SdkConfig {
        let creds = Credentials::new("testing", "testing", None, None, "kbtest-static");
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(SharedCredentialsProvider::new(creds))
            .endpoint_url(self.endpoint())
            .build()
    }

    /// A DynamoDB client on this moto.
    pub async fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config().await)
    }

    /// An S3 client on this moto (path-style, as moto needs).
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::from(&self.sdk_config().await)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

/// Path of `moto_server`; panics with a setup hint if it is missing.
fn moto_python() -> PathBuf {
    let path = std::env::var_os("KBTEST_MOTO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/moto/bin/python"));
    assert!(
        path.is_file(),
        "moto's Python not found at {}: run scripts/setup.sh (or set KBTEST_MOTO_PYTHON)",
        path.display()
    );
    path
}
