//! Metrics as CloudWatch Embedded Metric Format (EMF) documents.
//!
//! One JSON document per line, written to the CloudWatch agent's EMF socket
//! (`tcp://` or `udp://127.0.0.1:25888`), to a file the agent tails, or to
//! stdout. Emitting never blocks and never fails the work it measures: a
//! document goes into a bounded queue (`metrics.buffer`); when the queue is
//! full or the sink is down the document is dropped and counted, and the count
//! goes out as `MetricsDropped` once the sink takes documents again.
//!
//! Every document has the dimensions `ClusterName` and `Role` plus the
//! metric's own (at most a few cheap ones such as `Path` or `Phase`);
//! `InstanceId` is a property, not a dimension, so it costs nothing in
//! CloudWatch yet a Logs Insights query can still filter on it.
//!
//! Adding a metric is one line in [`catalogue!`] below; alarms in infra/ and
//! the tests read [`ALL`], so they see it too.
//!
//! Encoder: written here rather than taken from awslabs' `metrique` (whose
//! EMF writer was evaluated). metrique is built for wide per-request events
//! through its own entry structs and background thread writing to an
//! `io::Write`; the agent needs periodic gauges with per-metric dimension sets,
//! a TCP sink that reconnects without blocking, and a drop counter it reports
//! itself. The format is small; [`document`] builds it and the tests validate
//! every line an end-to-end run writes against the specification's rules.

use crate::config::{model, MetricsSink};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

/// CloudWatch units the agent's metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Milliseconds,
    Seconds,
    Bytes,
    Count,
}

impl Unit {
    /// The spelling CloudWatch expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Milliseconds => "Milliseconds",
            Unit::Seconds => "Seconds",
            Unit::Bytes => "Bytes",
            Unit::Count => "Count",
        }
    }
}

/// A metric the agent emits: its name, unit and extra dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub unit: Unit,
    /// Dimensions beyond `ClusterName` and `Role`, each with a small value set.
    pub dimensions: &'static [&'static str],
    /// What the metric tells an operator (docs and the alarm descriptions).
    pub help: &'static str,
}

/// The dimensions every document carries.
pub const BASE_DIMENSIONS: [&str; 2] = ["ClusterName", "Role"];

macro_rules! catalogue {
    ($($id:ident = $name:literal, $unit:ident, [$($dim:literal),*], $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $id: Metric = Metric {
                name: $name,
                unit: Unit::$unit,
                dimensions: &[$($dim),*],
                help: $help,
            };
        )*
        /// Every metric the agent can emit.
        pub const ALL: &[Metric] = &[$($id),*];
    };
}

catalogue! {
    BOOTSTRAP_SUCCESS = "BootstrapSuccess", Count, ["Path"], "A bootstrap finished; Path is init, control-plane-join or worker-join.";
    BOOTSTRAP_FAILURE = "BootstrapFailure", Count, ["Path"], "A bootstrap ended in an error (Path unknown when it failed before choosing).";
    BOOTSTRAP_DURATION = "BootstrapDuration", Milliseconds, ["Path"], "Wall time of one bootstrap run, start to end.";
    PHASE_DURATION = "PhaseDuration", Milliseconds, ["Phase"], "Wall time of one named phase (bootstrap steps and daemon tasks).";
    LOCK_WAIT = "LockWait", Milliseconds, ["Purpose"], "Time from asking for a lock to holding it.";
    RETRIES = "Retries", Count, ["Kind"], "Retried attempts: Kind aws (inside the SDK) or wait (application waits).";
    AWS_CALLS_EXHAUSTED = "AwsCallsExhausted", Count, ["Service", "Operation"], "AWS calls that were still throttled or failing (5xx, timeout) after the SDK's attempts while a bootstrap step waited on within its deadline; Service DynamoDB, SecretsManager or SSM.";
    ETCD_MEMBERS = "EtcdMembers", Count, [], "etcd members, voters and learners.";
    ETCD_VOTERS = "EtcdVoters", Count, [], "etcd voting members.";
    ETCD_LEARNERS = "EtcdLearners", Count, [], "etcd learners (a join in progress, or an orphan).";
    ETCD_HEALTHY_MEMBERS = "EtcdHealthyMembers", Count, [], "etcd members answering a status request.";
    ETCD_DB_SIZE = "EtcdDbSize", Bytes, [], "Largest etcd backend size among the members.";
    ETCD_LEADER_CHANGES = "EtcdLeaderChanges", Count, [], "etcd leader changes seen since the last period.";
    API_SERVER_READY = "ApiServerReady", Count, [], "1 when the Kubernetes API answers /readyz, else 0.";
    NODES_READY = "NodesReady", Count, [], "Nodes whose Ready condition is True.";
    NODES_NOT_READY = "NodesNotReady", Count, [], "Nodes whose Ready condition is not True.";
    LIFECYCLE_ACTIONS_COMPLETED = "LifecycleActionsCompleted", Count, [], "Termination lifecycle actions completed.";
    LIFECYCLE_ACTIONS_FAILED = "LifecycleActionsFailed", Count, [], "Termination lifecycle actions that could not be completed this turn.";
    DRAIN_FAILURES = "DrainFailures", Count, [], "Worker drains that left Pods behind or failed.";
    JOIN_MATERIAL_AGE = "JoinMaterialAge", Seconds, [], "Age of the published join material.";
    METRICS_DROPPED = "MetricsDropped", Count, [], "Metric documents dropped because the sink was down, slow or the buffer full.";
    CERTIFICATE_DAYS_LEFT = "CertificateDaysLeft", Count, [], "Days until this control plane's first kubeadm leaf certificate expires (negative once expired); renewed at 30.";
    CERTIFICATE_RENEWALS = "CertificateRenewals", Count, [], "Certificate renewals (kubeadm certs renew all and a control-plane restart) that completed.";
    CERTIFICATE_RENEWAL_FAILURES = "CertificateRenewalFailures", Count, [], "Certificate renewals that failed this turn (retried next turn).";
    CERTIFICATE_RENEWALS_DEFERRED = "CertificateRenewalsDeferred", Count, [], "Certificate renewals put off this turn because restarting the control plane would cost etcd's quorum (retried next turn).";
    BACKUP_DURATION = "BackupDuration", Milliseconds, ["Trigger"], "Wall time of one etcd backup, stream opened to manifest written; Trigger scheduled, manual or membership-change.";
    BACKUP_SIZE = "BackupSize", Bytes, [], "Bytes of the last verified etcd snapshot (database and its sha256).";
    BACKUP_FAILURES = "BackupFailures", Count, ["Trigger"], "etcd backups that failed (stream, verification or upload); their uploads were aborted.";
    BACKUP_AGE = "BackupAge", Seconds, [], "Age of the newest verified etcd backup, reported by the leader each period.";
    STACK_SIGNAL_FAILED = "StackSignalFailed", Count, [], "A bootstrapped control plane could not signal its CloudFormation stack (refused, throttled or timed out); a rolling update waiting for it times out and rolls back.";
}

/// Looks a metric up by name (alarms and docs name metrics by string).
pub fn by_name(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| m.name == name)
}

/// Limits from the EMF specification.
pub const MAX_METRICS_PER_DIRECTIVE: usize = 100;
/// Limits from the EMF specification.
pub const MAX_DIMENSION_KEYS: usize = 30;

/// What every document says about where it comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub namespace: String,
    pub cluster: String,
    pub role: String,
    pub instance_id: Option<String>,
    /// `LogGroupName` for the CloudWatch agent; `None` for files and stdout.
    pub log_group: Option<String>,
}

/// Builds one EMF document: `metrics` share the dimension values `dims`
/// (which must name exactly each metric's own dimensions).
pub fn document(
    origin: &Origin,
    timestamp_ms: u64,
    metrics: &[(Metric, f64)],
    dims: &[(&str, &str)],
) -> Value {
    let mut keys: Vec<Value> = BASE_DIMENSIONS.iter().map(|k| Value::from(*k)).collect();
    keys.extend(dims.iter().map(|(k, _)| Value::from(*k)));
    let definitions: Vec<Value> = metrics
        .iter()
        .take(MAX_METRICS_PER_DIRECTIVE)
        .map(|(m, _)| serde_json::json!({"Name": m.name, "Unit": m.unit.as_str()}))
        .collect();
    let mut aws = Map::new();
    aws.insert("Timestamp".into(), timestamp_ms.into());
    if let Some(group) = &origin.log_group {
        aws.insert("LogGroupName".into(), group.clone().into());
    }
    aws.insert(
        "CloudWatchMetrics".into(),
        serde_json::json!([{
            "Namespace": origin.namespace,
            "Dimensions": [keys],
            "Metrics": definitions,
        }]),
    );
    let mut doc = Map::new();
    doc.insert("_aws".into(), Value::Object(aws));
    doc.insert("ClusterName".into(), origin.cluster.clone().into());
    doc.insert("Role".into(), origin.role.clone().into());
    for (k, v) in dims {
        doc.insert((*k).into(), (*v).into());
    }
    for (m, v) in metrics.iter().take(MAX_METRICS_PER_DIRECTIVE) {
        doc.insert(m.name.into(), number(*v));
    }
    if let Some(id) = &origin.instance_id {
        doc.insert("InstanceId".into(), id.clone().into());
    }
    Value::Object(doc)
}

/// Whole numbers as integers (readable), others as floats; NaN/inf as 0.
fn number(v: f64) -> Value {
    if !v.is_finite() {
        return Value::from(0);
    }
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// Whether the dimension names given match what the metrics declare.
fn dims_match(metrics: &[(Metric, f64)], dims: &[(&str, &str)]) -> bool {
    metrics.iter().all(|(m, _)| {
        m.dimensions.len() == dims.len() && m.dimensions.iter().zip(dims).all(|(a, (b, _))| a == b)
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Where the writer puts lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tcp(String),
    Udp(String),
    File(std::path::PathBuf),
    Stdout,
}

impl Destination {
    /// The destination `[metrics]` asks for; `None` when metrics are off.
    pub fn from_config(m: &model::Metrics) -> Option<Destination> {
        match m.sink {
            MetricsSink::Off => None,
            MetricsSink::Stdout => Some(Destination::Stdout),
            MetricsSink::File => m.file.clone().map(Destination::File),
            MetricsSink::Agent => {
                let (scheme, addr) = m.agent_endpoint.split_once("://")?;
                match scheme {
                    "udp" => Some(Destination::Udp(addr.to_string())),
                    _ => Some(Destination::Tcp(addr.to_string())),
                }
            }
        }
    }
}

enum Message {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// How long one connect or write to the sink may take before the document
/// is dropped. The CloudWatch agent listens on loopback, where a connect
/// takes microseconds; this bounds what a wedged agent can cost, also at exit.
pub const SINK_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed connect, documents are dropped (not queued) for this long.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(5);

/// How long a command waits at exit for queued documents to be written.
pub const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// A handle that emits documents; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    origin: Arc<std::sync::RwLock<Origin>>,
    tx: Option<mpsc::Sender<Message>>,
    dropped: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Metrics {
    /// A handle that emits nothing (metrics off, or before configuration).
    pub fn off() -> Metrics {
        Metrics {
            origin: Default::default(),
            tx: None,
            dropped: Default::default(),
            sent: Default::default(),
        }
    }

    /// Starts the writer task for `dest` with a queue of `buffer` documents.
    /// Must be called inside a tokio runtime.
    pub fn start(origin: Origin, dest: Option<Destination>, buffer: usize) -> Metrics {
        let mut m = Metrics::off();
        if let Ok(mut o) = m.origin.write() {
            *o = origin;
        }
        if let Some(dest) = dest {
            let (tx, rx) = mpsc::channel(buffer.max(1));
            let writer = Writer {
                dest,
                rx,
                origin: m.origin.clone(),
                dropped: m.dropped.clone(),
                sent: m.sent.clone(),
                reported_dropped: 0,
            };
            tokio::spawn(writer.run());
            m.tx = Some(tx);
        }
        m
    }

    /// Adds the instance id once IMDS has told it.
    pub fn set_instance_id(&self, id: &str) {
        if let Ok(mut o) = self.origin.write() {
            o.instance_id = Some(id.to_string());
        }
    }

    /// Emits one document; never waits. `dims` gives each metric's own
    /// dimensions (in the order the metric declares them).
    pub fn emit(&self, metrics: &[(Metric, f64)], dims: &[(&str, &str)]) {
        let Some(tx) = &self.tx else { return };
        if metrics.is_empty() {
            return;
        }
        if !dims_match(metrics, dims) {
            tracing::warn!(
                metric = metrics[0].0.name,
                "metric emitted with the wrong dimensions; dropped"
            );
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let line = match self.origin.read() {
            Ok(o) => document(&o, now_ms(), metrics, dims).to_string(),
            Err(_) => return,
        };
        if tx.try_send(Message::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One metric, one value.
    pub fn record(&self, metric: Metric, value: f64, dims: &[(&str, &str)]) {
        self.emit(&[(metric, value)], dims);
    }

    /// Waits at most `grace` for queued documents to be written (at exit).
    pub async fn flush(&self, grace: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        let _ = tokio::time::timeout(grace, async {
            if tx.send(Message::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
        .await;
    }

    /// Documents dropped so far (buffer full, sink down or slow).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Documents written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

enum Sink {
    Tcp(tokio::net::TcpStream),
    Udp(tokio::net::UdpSocket),
    File(tokio::fs::File),
    Stdout,
}

struct Writer {
    dest: Destination,
    rx: mpsc::Receiver<Message>,
    origin: Arc<std::sync::RwLock<Origin>>,
    dropped: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    reported_dropped: u64,
}

impl Writer {
    async fn run(mut self) {
        let mut sink: Option<Sink> = None;
        let mut down_until: Option<tokio::time::Instant> = None;
        while let Some(msg) = self.rx.recv().await {
            let line = match msg {
                Message::Line(line) => line,
                Message::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            if down_until.is_some_and(|t| tokio::time::Instant::now() < t) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if sink.is_none() {
                match tokio::time::timeout(SINK_TIMEOUT, open(&self.dest)).await {
                    Ok(Ok(s)) => {
                        sink = Some(s);
                        down_until = None;
                    }
                    Ok(Err(e)) => {
                        self.down(&mut down_until, &e.to_string());
                        continue;
                    }
                    Err(_) => {
                        self.down(&mut down_until, "connect timed out");
                        continue;
                    }
                }
            }
            let mut lines = vec![line];
            if let Some(report) = self.dropped_report() {
                lines.push(report);
            }
            for line in lines {
                let Some(s) = sink.as_mut() else { break };
                match tokio::time::timeout(SINK_TIMEOUT, write_line(s, &line)).await {
                    Ok(Ok(())) => {
                        self.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        sink = None;
                        self.down(&mut down_until, &e.to_string());
                    }
                    Err(_) => {
                        sink = None;
                        self.down(&mut down_until, "write timed out");
                    }
                }
            }
        }
    }

    fn down(&self, down_until: &mut Option<tokio::time::Instant>, why: &str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if down_until.is_none() {
            tracing::warn!(sink = ?self.dest, error = why, hint = "is the CloudWatch agent running with an EMF listener (or the metrics file writable)?", "metrics sink unavailable; dropping metrics for a while");
        }
        *down_until = Some(tokio::time::Instant::now() + RECONNECT_AFTER);
    }

    /// A `MetricsDropped` document when more were dropped since the last report.
    fn dropped_report(&mut self) -> Option<String> {
        let total = self.dropped.load(Ordering::Relaxed);
        if total <= self.reported_dropped {
            return None;
        }
        let delta = total - self.reported_dropped;
        self.reported_dropped = total;
        let origin = self.origin.read().ok()?;
        Some(document(&origin, now_ms(), &[(METRICS_DROPPED, delta as f64)], &[]).to_string())
    }
}

async fn open(dest: &Destination) -> std::io::Result<Sink> {
    Ok(match dest {
        Destination::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Sink::Tcp(s)
        }
        Destination::Udp(addr) => {
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            s.connect(addr).await?;
            Sink::Udp(s)
        }
        Destination::File(path) => {
            let mut options = tokio::fs::OpenOptions::new();
            options.create(true).append(true).mode(0o640);
            Sink::File(options.open(path).await?)
        }
        Destination::Stdout => Sink::Stdout,
    })
}

async fn write_line(sink: &mut Sink, line: &str) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    match sink {
        Sink::Tcp(s) => s.write_all(&bytes).await,
        Sink::Udp(s) => s.send(&bytes).await.map(|_| ()),
        Sink::File(f) => f.write_all(&bytes).await,
        // Local mode only: a short blocking write on the writer task, never the caller's.
        Sink::Stdout => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()
        }
    }
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// Makes `m` the process's metrics handle (first call wins).
pub fn install(m: Metrics) {
    let _ = GLOBAL.set(m);
}

/// The process's metrics handle; emits nothing until [`install`]ed.
pub fn global() -> Metrics {
    GLOBAL.get().cloned().unwrap_or_else(Metrics::off)
}

/// Emits through the process's handle.
pub fn emit(metrics: &[(Metric, f64)], dims: &[(&str, &str)]) {
    if let Some(m) = GLOBAL.get() {
        m.emit(metrics, dims);
    }
}

/// Records one value through the process's handle.
pub fn record(metric: Metric, value: f64, dims: &[(&str, &str)]) {
    emit(&[(metric, value)], dims);
}

/// Milliseconds of a duration, as a metric value (microsecond resolution,
/// so the JSON stays short: 2322.929, not 2322.9290159999996).
pub fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            namespace: "Kubeboot".into(),
            cluster: "prod-a".into(),
            role: "control-plane".into(),
            instance_id: Some("i-0123456789abcdef0".into()),
            log_group: Some("/kubeboot/prod-a/metrics".into()),
        }
    }

    #[test]
    fn a_document_declares_its_metrics_and_carries_their_values_at_the_top_level() {
        let doc = document(
            &origin(),
            1_764_000_000_000,
            &[(BOOTSTRAP_DURATION, 228.4), (BOOTSTRAP_SUCCESS, 1.0)],
            &[("Path", "init")],
        );
        assert_eq!(doc["_aws"]["Timestamp"], 1_764_000_000_000u64);
        assert_eq!(doc["_aws"]["LogGroupName"], "/kubeboot/prod-a/metrics");
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Kubeboot");
        assert_eq!(
            directive["Dimensions"],
            serde_json::json!([["ClusterName", "Role", "Path"]])
        );
        assert_eq!(
            directive["Metrics"],
            serde_json::json!([
                {"Name": "BootstrapDuration", "Unit": "Milliseconds"},
                {"Name": "BootstrapSuccess", "Unit": "Count"}
            ])
        );
        assert_eq!(doc["BootstrapDuration"], 228.4);
        assert_eq!(doc["BootstrapSuccess"], 1);
        assert_eq!(doc["Path"], "init");
        assert_eq!(doc["ClusterName"], "prod-a");
        assert_eq!(doc["InstanceId"], "i-0123456789abcdef0");
        assert!(!doc.to_string().contains('\n'));
    }

    #[test]
    fn the_catalogue_names_are_unique_and_fit_cloudwatch() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate metric names");
        for m in ALL {
            assert!(!m.name.is_empty() && m.name.len() <= 255, "{}", m.name);
            assert!(m.dimensions.len() + BASE_DIMENSIONS.len() <= MAX_DIMENSION_KEYS);
            assert!(!m.help.is_empty());
            assert_eq!(by_name(m.name), Some(m));
        }
    }

    #[test]
    fn a_metric_with_the_wrong_dimensions_is_refused() {
        assert!(dims_match(&[(LOCK_WAIT, 1.0)], &[("Purpose", "init")]));
        assert!(!dims_match(&[(LOCK_WAIT, 1.0)], &[]));
        assert!(!dims_match(&[(LOCK_WAIT, 1.0)], &[("Phase", "init")]));
        assert!(!dims_match(
            &[(LOCK_WAIT, 1.0), (ETCD_MEMBERS, 3.0)],
            &[("Purpose", "init")]
        ));
    }

    #[test]
    fn durations_are_milliseconds_with_short_decimals() {
        assert_eq!(ms(Duration::from_nanos(2_322_929_016)), 2322.929);
        assert_eq!(
            number(ms(Duration::from_nanos(2_322_929_016))).to_string(),
            "2322.929"
        );
        assert_eq!(ms(Duration::from_secs(2)), 2000.0);
    }

    #[test]
    fn odd_values_stay_valid_json_numbers() {
        assert_eq!(number(f64::NAN), Value::from(0));
        assert_eq!(number(f64::INFINITY), Value::from(0));
        assert_eq!(number(3.0), Value::from(3));
        assert_eq!(number(0.5), Value::from(0.5));
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_instead_of_waiting() {
        // A TCP sink that accepts nothing: the writer blocks on connect for
        // at most SINK_TIMEOUT while the buffer of 1 fills.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let m = Metrics::start(origin(), Some(Destination::Tcp(addr)), 1);
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            m.record(ETCD_MEMBERS, 3.0, &[]);
        }
        // Waiting on the sink would take a SINK_TIMEOUT per record (over 4
        // minutes); a loaded machine still records 1000 in well under 10 s.
        assert!(started.elapsed() < 40 * SINK_TIMEOUT);
        assert!(m.dropped() >= 998, "dropped {}", m.dropped());
    }
}
