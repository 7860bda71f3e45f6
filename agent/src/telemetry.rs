//! Logs: one JSON object per line for journald and CloudWatch, or readable
//! text on a terminal.
//!
//! Every line carries the process context once it is known (`cluster`,
//! `instance_id`, `role`, `run_id`) and the fields of the spans it was logged
//! in, flattened to the top level (`phase` in particular), so a Logs Insights
//! query such as `filter run_id = "..."` finds one bootstrap across all nodes.
//! Secrets cannot leak through here: they are [`crate::secret::Secret`]s,
//! whose every formatting path prints a marker.

use serde_json::{Map, Value};
use std::fmt;
use std::io::IsTerminal;
use std::sync::RwLock;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// Reads the config key's spelling (`auto`, `json`, `text`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(LogFormat::Auto),
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            _ => None,
        }
    }

    fn resolve(self) -> LogFormat {
        match self {
            LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

/// Process-wide facts added to every line once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKey {
    Cluster,
    InstanceId,
    Role,
    RunId,
    /// The run id of the `kubeadm init` that started this cluster generation.
    InitRunId,
}

impl ContextKey {
    fn name(self) -> &'static str {
        match self {
            ContextKey::Cluster => "cluster",
            ContextKey::InstanceId => "instance_id",
            ContextKey::Role => "role",
            ContextKey::RunId => "run_id",
            ContextKey::InitRunId => "init_run_id",
        }
    }
}

static CONTEXT: RwLock<Vec<(&'static str, String)>> = RwLock::new(Vec::new());

/// Records a context value; later lines carry it.
pub fn set_context(key: ContextKey, value: impl Into<String>) {
    if let Ok(mut ctx) = CONTEXT.write() {
        let value = value.into();
        match ctx.iter_mut().find(|(k, _)| *k == key.name()) {
            Some(slot) => slot.1 = value,
            None => ctx.push((key.name(), value)),
        }
    }
}

/// A span naming the step in progress; its `phase` field is on every line inside it.
pub fn phase(name: &'static str) -> tracing::Span {
    tracing::info_span!("phase", phase = name)
}

/// Failure to set up logging.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log level {0:?} is not valid")]
    Level(String),
    #[error("logging was already initialized")]
    AlreadyInitialized,
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Lets the level change after the configuration is loaded.
#[derive(Debug, Clone)]
pub struct LogHandle(FilterHandle);

impl LogHandle {
    /// Applies a new level (`trace`..`error`).
    pub fn set_level(&self, level: &str) -> Result<(), Error> {
        self.0
            .reload(filter(level)?)
            .map_err(|_| Error::Level(level.to_string()))
    }
}

/// Our crate at `level`; dependencies only warn (their debug output is noise at 3 a.m.).
fn filter(level: &str) -> Result<EnvFilter, Error> {
    if !["trace", "debug", "info", "warn", "error"].contains(&level) {
        return Err(Error::Level(level.to_string()));
    }
    let deps = if level == "trace" { "debug" } else { "warn" };
    EnvFilter::try_new(format!("{deps},kubeboot={level}"))
        .map_err(|_| Error::Level(level.to_string()))
}

/// Installs the global subscriber writing to stderr (stdout is for command output).
pub fn init(format: LogFormat, level: &str) -> Result<LogHandle, Error> {
    init_with_writer(format, level, std::io::stderr)
}

/// Like [`init`], writing wherever `writer` says (tests capture lines this way).
pub fn init_with_writer<W>(format: LogFormat, level: &str, writer: W) -> Result<LogHandle, Error>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter_layer, handle) = reload::Layer::new(filter(level)?);
    let fmt_layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .event_format(LineFormat {
            json: format.resolve() == LogFormat::Json,
        });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(SpanFieldsLayer)
        .with(fmt_layer)
        .try_init()
        .map_err(|_| Error::AlreadyInitialized)?;
    Ok(LogHandle(handle))
}

/// Span fields kept for flattening into each line.
#[derive(Debug, Default)]
struct SpanFields(Map<String, Value>);

/// When a `phase` span began, so its close can report `PhaseDuration`.
struct PhaseStart(std::time::Instant);

/// Stores span fields in the span's extensions as they are recorded, and
/// times `phase` spans: every phase, in bootstrap or the daemon, reports its
/// wall time as the `PhaseDuration` metric without its own code.
struct SpanFieldsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanFieldsLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = SpanFields::default();
        attrs.record(&mut JsonVisitor(&mut fields.0));
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            ext.insert(fields);
            if span.name() == "phase" {
                ext.insert(PhaseStart(std::time::Instant::now()));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        let (Some(start), Some(fields)) = (ext.get::<PhaseStart>(), ext.get::<SpanFields>()) else {
            return;
        };
        if let Some(Value::String(phase)) = fields.0.get("phase") {
            crate::metrics::record(
                crate::metrics::PHASE_DURATION,
                crate::metrics::ms(start.0.elapsed()),
                &[("Phase", phase)],
            );
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<SpanFields>() {
                values.record(&mut JsonVisitor(&mut fields.0));
            }
        }
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

/// Builds one line: timestamp, level, context, span fields, event fields.
struct LineFormat {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        if let Ok(context) = CONTEXT.read() {
            for (k, v) in context.iter() {
                fields.insert((*k).into(), Value::from(v.as_str()));
            }
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    fields.extend(f.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        let mut own = Map::new();
        event.record(&mut JsonVisitor(&mut own));
        let message = own.remove("message").unwrap_or(Value::Null);
        fields.extend(own);
        let meta = event.metadata();
        let timestamp = rfc3339(std::time::SystemTime::now());
        if self.json {
            let mut line = Map::new();
            line.insert("timestamp".into(), Value::from(timestamp));
            line.insert("level".into(), Value::from(meta.level().as_str()));
            line.insert("target".into(), Value::from(meta.target()));
            line.insert("message".into(), message);
            line.extend(fields);
            writeln!(writer, "{}", Value::Object(line))
        } else {
            let message = match message {
                Value::String(s) => s,
                other => other.to_string(),
            };
            write!(writer, "{timestamp} {:5} {message}", meta.level().as_str())?;
            for (k, v) in fields {
                match v {
                    Value::String(s) if !s.contains(' ') => write!(writer, " {k}={s}")?,
                    other => write!(writer, " {k}={other}")?,
                }
            }
            writeln!(writer)
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date-time dependency.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (H. Hinnant), valid for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Level(_) => &crate::catalogue::LOG_LEVEL,
            E::AlreadyInitialized => &crate::catalogue::LOG_TWICE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)),
            "2026-11-18T11:06:40.123Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn filter_rejects_unknown_levels() {
        assert!(filter("info").is_ok());
        assert!(filter("loud").is_err());
    }
}
