//! Configuration: sources, merge order, validation and display.
//!
//! Sources, lowest precedence first:
//! 1. built-in defaults ([`schema::KEYS`]);
//! 2. the file (`--config`, `KUBEBOOT_CONFIG`, default `/etc/kubeboot/config.toml`);
//! 3. drop-ins: `config.d/*.toml` next to the file, in lexical order;
//! 4. the kubeboot part of the instance user-data (see [`userdata`]);
//! 5. `KUBEBOOT_<SECTION>_<KEY>` environment variables.
//!
//! Every source is checked key by key against the schema before merging, and
//! every problem is collected (not just the first) with the source, key, value
//! and expected form, so one `kubeboot config check` tells an operator all
//! that is wrong.

pub mod input;
pub mod model;
pub mod schema;
pub mod userdata;
pub mod value;

pub use model::{Config, MetricsSink, Role};

use crate::secret::REDACTED;
use schema::{Key, Kind};
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::path::{Path, PathBuf};
use value::Refusal;

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/kubeboot/config.toml";

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No source set it (used for "missing" problems).
    Unset,
    Default,
    /// Computed from another key (e.g. SSM prefix from the cluster name).
    Derived(&'static str),
    File(PathBuf),
    DropIn(PathBuf),
    /// Part of the instance user-data; the string says which part.
    UserData(&'static str),
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Unset => f.write_str("no source"),
            Source::Default => f.write_str("default"),
            Source::Derived(from) => write!(f, "default (derived from {from})"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::DropIn(p) => write!(f, "drop-in {}", p.display()),
            Source::UserData(part) => write!(f, "user-data ({part})"),
            Source::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// The class of a configuration problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    Syntax,
    UnknownKey,
    WrongType,
    OutOfRange,
    Invalid,
    Missing,
    /// Two sources disagree on a key that must not be overridden, or a
    /// source sets a key it may not set.
    Conflict,
    /// Keys that are fine alone but not together.
    Inconsistent,
    /// A key kubeboot no longer reads (its value is never shown).
    Retired,
}

/// One thing wrong with the configuration, with everything needed to fix it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    #[serde(serialize_with = "display")]
    pub source: Source,
    pub key: String,
    /// The offending value as written (secrets redacted); `None` when absent.
    pub value: Option<String>,
    /// What is wrong.
    pub reason: String,
    /// What would be accepted.
    pub expected: String,
}

fn display<S: serde::Serializer>(v: &Source, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Most problems listed; the rest are counted ("… and N more"), so a file
/// of 100,000 typos stays readable and fast.
pub const MAX_REPORTED: usize = 50;
/// Longest key path shown; a longer (unknown) one is cut.
const MAX_KEY_SHOWN: usize = 100;

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.key)?;
        if let Some(v) = &self.value {
            write!(f, " = {v}")?;
        }
        write!(f, ": {}; expected {}", self.reason, self.expected)
    }
}

/// Failure to produce a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration is invalid ({}){}", count(problems.len() + omitted),
        user_data_unread.as_ref().map_or(String::new(), |why| format!("; user-data not merged: {why}")))]
    Invalid {
        /// The first [`MAX_REPORTED`] problems.
        problems: Vec<Problem>,
        /// How many more were found and not listed.
        omitted: usize,
        /// Why user-data, asked for, was not read (the local sources'
        /// problems are reported whatever instance metadata does).
        user_data_unread: Option<String>,
    },
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {} is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("configuration file {} is larger than {}", path.display(), input::size(*limit))]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot list drop-in directory {}: {source}", path.display())]
    DropInDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read user-data from instance metadata: {source}")]
    Imds { source: FetchError },
    #[error("configuration deserialization failed after validation (a kubeboot bug): {0}")]
    Internal(String),
}

impl Error {

    /// Whether the failure is the operator's input (exit 2) rather than the environment (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::Imds { .. } | Error::Internal(_))
    }
}

fn count(n: usize) -> String {
    format!("{n} problem{}", if n == 1 { "" } else { "s" })
}

/// Keeps the first [`MAX_REPORTED`] problems and counts the rest.
fn invalid(mut problems: Vec<Problem>, user_data_unread: Option<String>) -> Error {
    let omitted = problems.len().saturating_sub(MAX_REPORTED);
    problems.truncate(MAX_REPORTED);
    Error::Invalid {
        problems,
        omitted,
        user_data_unread,
    }
}

/// A key path as output may show it: an unknown one can be any length.
fn shown_key(path: &str) -> String {
    if path.chars().count() <= MAX_KEY_SHOWN {
        return path.to_string();
    }
    let head: String = path.chars().take(MAX_KEY_SHOWN).collect();
    format!("{head}… ({} characters)", path.chars().count())
}

/// A value together with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: toml::Value,
    pub source: Source,
}

/// The entries one source contributes, already checked against the schema.
#[derive(Debug, Clone)]
pub struct Layer {
    pub source: Source,
    pub entries: Vec<(&'static Key, toml::Value)>,
}

/// Parses and checks one TOML document. Problems are appended, good entries kept.
pub fn parse_toml(source: Source, text: &str, problems: &mut Vec<Problem>) -> Layer {
    let mut layer = Layer {
        source: source.clone(),
        entries: Vec::new(),
    };
    if let Some(line) = input::too_deep(text, input::MAX_DEPTH) {
        problems.push(Problem {
            kind: ProblemKind::Syntax,
            source,
            key: format!("line {line}"),
            value: text.lines().nth(line - 1).map(redact_line),
            reason: format!(
                "arrays or tables nested deeper than {} levels",
                input::MAX_DEPTH
            ),
            expected:
                "a flat value: every kubeboot key is a string, number, boolean or list of strings"
                    .into(),
        });
        return layer;
    }
    match text.parse::<toml::Table>() {
        Ok(table) => flatten(&source, &table, "", &mut layer.entries, problems),
        Err(e) => problems.push(syntax_problem(source, text, &e)),
    }
    layer
}

fn syntax_problem(source: Source, text: &str, e: &toml::de::Error) -> Problem {
    let (key, value) = match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line_start = text[..span.start.min(text.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            let column = span.start.saturating_sub(line_start) + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            (
                format!("line {line_no}, column {column}"),
                Some(redact_line(line)),
            )
        }
        None => ("document".to_string(), None),
    };
    Problem {
        kind: ProblemKind::Syntax,
        source,
        key,
        value,
        reason: format!("TOML syntax error: {}", e.message()),
        expected:
            "valid TOML (strings in double quotes, one key = value per line, [section] headers)"
                .into(),
    }
}

/// A broken line may hold a secret under any key (`tokn = "..."`): only
/// what stands before its `=` is shown, or a section header, cut short.
fn redact_line(line: &str) -> String {
    let cut = |s: &str| -> String {
        let s = s.trim();
        if s.chars().count() > 60 {
            format!("{}…", s.chars().take(60).collect::<String>())
        } else {
            s.to_string()
        }
    };
    match line.split_once('=') {
        Some((key, _)) => format!("`{} = {REDACTED}`", cut(key)),
        None if line.trim_start().starts_with('[') && !line.contains(['"', '\'']) => {
            format!("`{}`", cut(line))
        }
        None => format!("`{REDACTED}` (the line is not shown)"),
    }
}

fn flatten(
    source: &Source,
    table: &toml::Table,
    prefix: &str,
    out: &mut Vec<(&'static Key, toml::Value)>,
    problems: &mut Vec<Problem>,
) {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if let Some(instead) = schema::retired(&path) {
            problems.push(retired(source.clone(), &path, instead));
        } else if let Some(key) = schema::find(&path) {
            if key.not_from_user_data && matches!(source, Source::UserData(_)) {
                problems.push(Problem {
                    kind: ProblemKind::Conflict,
                    source: source.clone(),
                    key: path,
                    value: Some(show_value(key, value)),
                    reason: "cannot be set from user-data, which is read through it".into(),
                    expected: "this key in the config file, a drop-in or the environment".into(),
                });
                continue;
            }
            match value::check(key.kind, value) {
                Ok(()) => out.push((key, value.clone())),
                Err(refusal) => problems.push(refused(source.clone(), key, value, &refusal)),
            }
        } else if schema::is_section(&path) {
            match value.as_table() {
                Some(inner) => flatten(source, inner, &path, out, problems),
                None => problems.push(Problem {
                    kind: ProblemKind::WrongType,
                    source: source.clone(),
                    key: path.clone(),
                    value: None,
                    reason: format!(
                        "is a section, not a value (a {} was given; not shown)",
                        type_name(value)
                    ),
                    expected: format!(
                        "a [{path}] table with keys {}",
                        schema::children(&path).join(", ")
                    ),
                }),
            }
        } else {
            // Never the value: an unknown key may be a misspelt secret.
            let listed = problems.len() < MAX_REPORTED;
            problems.push(unknown_key(source.clone(), &path, prefix, value, listed));
        }
    }
}

/// `listed` is false once [`MAX_REPORTED`] problems are in: the problem is
/// only counted, so the "did you mean" search is skipped.
fn unknown_key(
    source: Source,
    path: &str,
    section: &str,
    value: &toml::Value,
    listed: bool,
) -> Problem {
    let expected = match listed.then(|| schema::suggest(path)).flatten() {
        _ if !listed => String::new(),
        Some(near) => format!("a known key (did you mean `{near}`?)"),
        None if section.is_empty() => {
            format!("a known section: {}", schema::children("").join(", "))
        }
        None if schema::children(section).is_empty() => schema::retired_section(section)
            .unwrap_or("no key: kubeboot reads nothing in this section")
            .to_string(),
        None => format!(
            "a key of [{section}]: {}",
            schema::children(section).join(", ")
        ),
    };
    Problem {
        kind: ProblemKind::UnknownKey,
        source,
        key: shown_key(path),
        value: None,
        reason: format!("unknown key (its {} value is not shown)", type_name(value)),
        expected,
    }
}

fn retired(source: Source, key: &str, instead: &str) -> Problem {
    Problem {
        kind: ProblemKind::Retired,
        source,
        key: key.to_string(),
        value: None,
        reason: "kubeboot no longer reads this key (its value is not shown)".into(),
        expected: instead.to_string(),
    }
}

fn refused(source: Source, key: &Key, value: &toml::Value, refusal: &Refusal) -> Problem {
    let (kind, reason) = match refusal {
        Refusal::WrongType { .. } => (
            ProblemKind::WrongType,
            format!("wrong type ({})", type_name(value)),
        ),
        Refusal::OutOfRange { .. } => (ProblemKind::OutOfRange, "out of range".to_string()),
        Refusal::Invalid { .. } => (
            ProblemKind::Invalid,
            match value.as_str().and_then(|s| value::url_fault(key.kind, s)) {
                Some(fault) => format!("invalid URL: {fault}"),
                None => "invalid value".to_string(),
            },
        ),
    };
    Problem {
        kind,
        source,
        key: key.path.to_string(),
        value: Some(show_value(key, value)),
        reason,
        expected: refusal.expected().to_string(),
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "text",
        toml::Value::Integer(_) => "integer",
        toml::Value::Float(_) => "float",
        toml::Value::Boolean(_) => "boolean",
        toml::Value::Datetime(_) => "datetime",
        toml::Value::Array(_) => "array",
        toml::Value::Table(_) => "table",
    }
}

/// A value as it may appear in output: secrets never do, others quoted and cut short.
fn show_value(key: &Key, value: &toml::Value) -> String {
    match (key.secret, key.kind, value.as_str()) {
        (true, _, _) => REDACTED.to_string(),
        (_, Kind::AwsUrl | Kind::ImdsUrl | Kind::SocketUrl, Some(url)) => {
            value::preview(&toml::Value::String(without_credentials(url)))
        }
        _ => value::preview(value),
    }
}

/// A URL with any `user:password@` before its host replaced by `<redacted>@`.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!(
            "{}{REDACTED}{}",
            if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            },
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Builds the environment layer from `KUBEBOOT_*` variables.
pub fn parse_env<I, K, V>(vars: I, problems: &mut Vec<Problem>) -> Vec<Layer>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
        .filter(|(k, _)| {
            k.starts_with(schema::ENV_PREFIX) && !schema::ENV_RESERVED.contains(&k.as_str())
        })
        .collect();
    vars.sort();
    let mut layers = Vec::new();
    for (var, raw) in vars {
        let source = Source::Env(var.clone());
        if let Some((path, instead)) = schema::RETIRED
            .iter()
            .find(|(p, _)| schema::env_var(p) == var)
        {
            problems.push(retired(source, &format!("{var} ({path})"), instead));
            continue;
        }
        let Some(key) = schema::KEYS.iter().find(|k| schema::env_var(k.path) == var) else {
            let listed = problems.len() < MAX_REPORTED;
            let near = listed.then(|| schema::suggest_env(&var)).flatten();
            problems.push(Problem {
                kind: ProblemKind::UnknownKey,
                source,
                key: shown_key(&var),
                value: None,
                reason: "unknown kubeboot variable (its value is not shown)".into(),
                expected: match near {
                    _ if !listed => String::new(),
                    Some(near) => format!("a key override (did you mean {near}?)"),
                    None => {
                        "KUBEBOOT_CONFIG or KUBEBOOT_<SECTION>_<KEY> for a key in the reference"
                            .into()
                    }
                },
            });
            continue;
        };
        let value = env_value(key.kind, &raw);
        match value::check(key.kind, &value) {
            Ok(()) => layers.push(Layer {
                source,
                entries: vec![(key, value)],
            }),
            Err(refusal) => problems.push(refused(source, key, &value, &refusal)),
        }
    }
    layers
}

/// Environment values are text; read them as the key's type expects.
fn env_value(kind: Kind, raw: &str) -> toml::Value {
    let raw = raw.trim();
    match kind {
        Kind::Int { .. } => raw
            .parse::<i64>()
            .map_or_else(|_| toml::Value::String(raw.into()), toml::Value::Integer),
        Kind::Bool => match raw {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => toml::Value::String(raw.into()),
        },
        _ => toml::Value::String(raw.into()),
    }
}

/// The merged result: typed config plus every value's provenance.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub entries: BTreeMap<&'static str, Entry>,
}

/// Merges layers (lowest precedence first) over the defaults, then checks
/// required keys and cross-key rules. Returns every problem found.
pub fn merge(layers: &[Layer], mut problems: Vec<Problem>) -> Result<Loaded, Error> {
    let mut entries: BTreeMap<&'static str, Entry> = BTreeMap::new();
    for key in schema::KEYS {
        if let Some(lit) = key.default {
            match toml::Value::deserialize_literal(lit) {
                Some(value) => {
                    entries.insert(
                        key.path,
                        Entry {
                            value,
                            source: Source::Default,
                        },
                    );
                }
                None => {
                    return Err(Error::Internal(format!(
                        "default of {} is not TOML: {lit}",
                        key.path
                    )))
                }
            }
        }
    }
    for layer in layers {
        for (key, value) in &layer.entries {
            if let Some(prev) = entries.get(key.path) {
                if key.identity && prev.source != Source::Default && prev.value != *value {
                    problems.push(Problem {
                        kind: ProblemKind::Conflict,
                        source: layer.source.clone(),
                        key: key.path.to_string(),
                        value: Some(show_value(key, value)),
                        reason: format!(
                            "conflicts with {} from {}; this key names the cluster and may not be overridden",
                            show_value(key, &prev.value),
                            prev.source
                        ),
                        expected: "every source that sets it to agree (fix the launch template or the baked config)".into(),
                    });
                    continue;
                }
            }
            entries.insert(
                key.path,
                Entry {
                    value: value.clone(),
                    source: layer.source.clone(),
                },
            );
        }
    }
    derive_defaults(&mut entries);
    // A document that did not parse may well hold the "missing" keys: listing
    // them would bury the one real problem.
    let unparsed = problems.iter().any(|p| p.kind == ProblemKind::Syntax);
    for key in schema::KEYS.iter().filter(|k| k.required && !unparsed) {
        // A key some source set but got wrong is already reported as such.
        let refused = problems.iter().any(|p| p.key == key.path);
        if !entries.contains_key(key.path) && !refused {
            problems.push(Problem {
                kind: ProblemKind::Missing,
                source: Source::Unset,
                key: key.path.to_string(),
                value: None,
                reason: "required and not set by any source".into(),
                expected: format!(
                    "{} (in the file, a drop-in, user-data or {})",
                    value::expected_form(key.kind),
                    schema::env_var(key.path)
                ),
            });
        }
    }
    cross_check(&entries, &mut problems);
    if !problems.is_empty() {
        return Err(invalid(problems, None));
    }
    let config = nest(&entries)
        .try_into::<Config>()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Loaded { config, entries })
}

trait Literal {
    fn deserialize_literal(lit: &str) -> Option<toml::Value>;
}

impl Literal for toml::Value {
    fn deserialize_literal(lit: &str) -> Option<toml::Value> {
        format!("v = {lit}")
            .parse::<toml::Table>()
            .ok()?
            .remove("v")
    }
}

fn derive_defaults(entries: &mut BTreeMap<&'static str, Entry>) {
    let Some(name) = entries
        .get("cluster.name")
        .and_then(|e| e.value.as_str())
        .map(str::to_string)
    else {
        return;
    };
    for (path, value) in [
        ("aws.join_secret", format!("kubeboot/{name}/join")),
        (
            "aws.certificate_key_secret",
            format!("kubeboot/{name}/certificate-key"),
        ),
        ("aws.ssm_prefix", format!("/kubeboot/{name}")),
        ("metrics.log_group", format!("/kubeboot/{name}/metrics")),
    ] {
        entries.entry(path).or_insert(Entry {
            value: toml::Value::String(value),
            source: Source::Derived("cluster.name"),
        });
    }
}

fn cross_check(entries: &BTreeMap<&'static str, Entry>, problems: &mut Vec<Problem>) {
    let dur = |p: &str| {
        entries
            .get(p)
            .and_then(|e| e.value.as_str())
            .and_then(value::parse_duration)
    };
    let text = |p: &str| entries.get(p).and_then(|e| e.value.as_str());
    let set = |p: &str| entries.contains_key(p);
    let mut inconsistent = |key: &str, other: &str, reason: String, expected: &str| {
        let entry = entries.get(key);
        problems.push(Problem {
            kind: ProblemKind::Inconsistent,
            source: entry.map_or(Source::Default, |e| e.source.clone()),
            key: key.to_string(),
            value: entry.map(|e| {
                schema::find(key).map_or_else(|| e.value.to_string(), |k| show_value(k, &e.value))
            }),
            reason: format!("{reason} (see {other})"),
            expected: expected.to_string(),
        });
    };
    if let (Some(lease), Some(margin)) = (dur("lock.lease"), dur("lock.margin")) {
        if margin * 3 > lease {
            inconsistent("lock.margin", "lock.lease", format!(
                "margin is more than a third of the lease ({})", value::format_duration(lease)),
                "lock.margin <= lock.lease / 3, so a heartbeat (every lease/3) lands before the holder fences itself");
        }
    }
    if let (Some(lease), Some(margin), Some(wait)) = (
        dur("lock.lease"),
        dur("lock.margin"),
        dur("lock.acquire_timeout"),
    ) {
        if wait <= lease + margin {
            inconsistent(
                "lock.acquire_timeout",
                "lock.lease",
                format!(
                    "a waiter gives up before a dead holder's lease plus margin ({}) has passed",
                    value::format_duration(lease + margin)
                ),
                "lock.acquire_timeout > lock.lease + lock.margin (the default is 20m)",
            );
        }
    }
    if let (Some(period), Some(jitter)) = (dur("daemon.period"), dur("daemon.jitter")) {
        if jitter >= period {
            inconsistent(
                "daemon.jitter",
                "daemon.period",
                "jitter is not below the period".into(),
                "daemon.jitter < daemon.period",
            );
        }
    }
    if let (Some(stall), Some(period), Some(jitter), Some(drain)) = (
        dur("daemon.watchdog_stall"),
        dur("daemon.period"),
        dur("daemon.jitter"),
        dur("timeouts.drain"),
    ) {
        if stall <= period + jitter || stall <= drain {
            inconsistent(
                "daemon.watchdog_stall",
                "daemon.period",
                format!(
                    "a healthy turn may take longer than the stall limit (period + jitter = {}, timeouts.drain = {})",
                    value::format_duration(period + jitter),
                    value::format_duration(drain)
                ),
                "daemon.watchdog_stall > daemon.period + daemon.jitter and > timeouts.drain (the default is 15m)",
            );
        }
    }
    if let (Some(attempt), Some(op)) = (dur("aws.attempt_timeout"), dur("aws.operation_timeout")) {
        if attempt > op {
            inconsistent(
                "aws.attempt_timeout",
                "aws.operation_timeout",
                "one attempt may outlast the whole operation".into(),
                "aws.attempt_timeout <= aws.operation_timeout",
            );
        }
    }
    if let (Some(first), Some(max)) = (dur("aws.initial_backoff"), dur("aws.max_backoff")) {
        if first > max {
            inconsistent(
                "aws.initial_backoff",
                "aws.max_backoff",
                "initial backoff exceeds the cap".into(),
                "aws.initial_backoff <= aws.max_backoff",
            );
        }
    }
    if text("metrics.sink") == Some("file") && !set("metrics.file") {
        inconsistent("metrics.sink", "metrics.file", "sink is \"file\" but no file is set".into(),
            "metrics.file = \"/var/log/kubeboot/metrics.emf\" (an absolute path) with sink = \"file\"");
    }
    let backups_on = entries
        .get("backup.enabled")
        .and_then(|e| e.value.as_bool())
        == Some(true);
    if text("node.role") == Some("control-plane") && backups_on && !set("aws.backup_bucket") {
        inconsistent(
            "aws.backup_bucket",
            "backup.enabled",
            "control planes take backups but no bucket is set".into(),
            "aws.backup_bucket = \"<bucket>\", or backup.enabled = false",
        );
    }
    stack_signal_rules(entries, problems);
}

/// The stack signal's keys: both or neither, and control planes only (a
/// worker's group has no update policy waiting for it, and its role may not
/// signal). The value is not shown: the key and the rule say what is wrong.
fn stack_signal_rules(entries: &BTreeMap<&'static str, Entry>, problems: &mut Vec<Problem>) {
    const STACK: &str = "aws.cloudformation_stack";
    const RESOURCE: &str = "aws.cloudformation_resource";
    let mut problem = |key: &str, reason: String, expected: &str| {
        problems.push(Problem {
            kind: ProblemKind::Inconsistent,
            source: entries
                .get(key)
                .map_or(Source::Default, |e| e.source.clone()),
            key: key.to_string(),
            value: None,
            reason,
            expected: expected.to_string(),
        });
    };
    let worker = entries.get("node.role").and_then(|e| e.value.as_str()) == Some("worker");
    for (key, other) in [(STACK, RESOURCE), (RESOURCE, STACK)] {
        if !entries.contains_key(key) {
            continue;
        }
        if worker {
            problem(
                key,
                "set on a worker: only control planes signal their stack (see node.role)".into(),
                "no aws.cloudformation_* keys on a worker (they belong in the control planes' user-data)",
            );
        } else if !entries.contains_key(other) {
            problem(
                key,
                format!("set without {other}: the signal needs both (see {other})"),
                "aws.cloudformation_stack and aws.cloudformation_resource together, or neither",
            );
        }
    }
}

/// Turns dotted entries back into nested tables.
fn nest(entries: &BTreeMap<&'static str, Entry>) -> toml::Value {
    let mut root = toml::Table::new();
    for (path, entry) in entries {
        let mut table = &mut root;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.insert(part.to_string(), entry.value.clone());
            } else {
                let next = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match next {
                    toml::Value::Table(t) => table = t,
                    _ => break,
                }
            }
        }
    }
    toml::Value::Table(root)
}

impl Loaded {
    /// `config show` as text: one `key = value  # source` line per key, secrets redacted.
    pub fn show_text(&self) -> String {
        let width = self.entries.keys().map(|k| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for key in schema::KEYS {
            if let Some(entry) = self.entries.get(key.path) {
                let line = format!("{:width$} = {}", key.path, show_value(key, &entry.value));
                out.push_str(&format!("{line:<60}  # {}\n", entry.source));
            }
        }
        out
    }

    /// `config show --output json`: the nested config (secrets redacted) and each key's source.
    pub fn show_json(&self) -> serde_json::Value {
        let redacted: BTreeMap<&'static str, Entry> = self
            .entries
            .iter()
            .map(|(path, e)| {
                let secret = schema::find(path).is_some_and(|k| k.secret);
                let value = if secret {
                    toml::Value::String(REDACTED.into())
                } else {
                    e.value.clone()
                };
                (
                    *path,
                    Entry {
                        value,
                        source: e.source.clone(),
                    },
                )
            })
            .collect();
        let sources: BTreeMap<&str, String> = self
            .entries
            .iter()
            .map(|(p, e)| (*p, e.source.to_string()))
            .collect();
        serde_json::json!({
            "config": serde_json::to_value(nest(&redacted)).unwrap_or_default(),
            "sources": sources,
        })
    }
}

/// Where user-data comes from when loading.
#[derive(Debug, Clone)]
pub enum UserData {
    /// Ask IMDS (unless `imds.user_data = false`).
    FromImds,
    /// Read this file instead (operators checking a launch template offline).
    File(PathBuf),
    /// Ignore user-data.
    Skip,
}

/// Why [`UserDataSource`] could not fetch the user-data (the IMDS client's error).
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// Where [`UserData::FromImds`] comes from: on a node, the IMDS client
/// (`identity::UserDataFromImds`). Injected rather than called so that the
/// configuration sits below the instance identity, which is configured by it.
pub trait UserDataSource: Sync {
    /// The raw user-data (`None`: the instance has none), read with `settings`.
    fn user_data<'a>(
        &'a self,
        settings: &'a model::Imds,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, FetchError>> + Send + 'a>>;
}

/// A [`UserDataSource`] for callers that never ask IMDS: [`UserData::FromImds`] fails.
pub struct NoUserDataSource;

impl UserDataSource for NoUserDataSource {
    fn user_data<'a>(
        &'a self,
        _settings: &'a model::Imds,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, FetchError>> + Send + 'a>> {
        Box::pin(async { Err("no instance metadata client in this caller".into()) })
    }
}

/// Everything [`load`] reads, made explicit so tests control it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub path: PathBuf,
    pub user_data: UserData,
    pub env: Vec<(String, String)>,
}

impl LoadOptions {
    /// Options for the running process: its environment, user-data from IMDS.
    pub fn from_process(path: PathBuf, user_data: UserData) -> Self {
        LoadOptions {
            path,
            user_data,
            env: std::env::vars().collect(),
        }
    }
}

/// Reads every source but IMDS user-data (`UserData::FromImds` fails), merges and validates.
pub async fn load(opts: &LoadOptions) -> Result<Loaded, Error> {
    load_with(opts, &NoUserDataSource).await
}

/// Reads every source, user-data from `imds` when asked to, merges and validates.
pub async fn load_with(opts: &LoadOptions, imds: &dyn UserDataSource) -> Result<Loaded, Error> {
    let mut problems = Vec::new();
    let text = read_text(&opts.path)?;
    let mut layers = vec![parse_toml(
        Source::File(opts.path.clone()),
        &text,
        &mut problems,
    )];
    for path in drop_ins(&opts.path)? {
        let text = read_text(&path)?;
        layers.push(parse_toml(Source::DropIn(path), &text, &mut problems));
    }
    let env_layers = parse_env(
        opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut problems,
    );

    let raw_user_data = match &opts.user_data {
        UserData::Skip => None,
        UserData::File(path) => Some(read_bounded(path)?),
        UserData::FromImds => {
            let local: Vec<Layer> = layers.iter().chain(&env_layers).cloned().collect();
            let settings = imds_settings(&local);
            if settings.user_data {
                match imds.user_data(&settings).await {
                    Ok(raw) => raw,
                    // The local sources' own problems are the operator's to
                    // fix whatever instance metadata does (exit 2, not 1).
                    Err(source) if !problems.is_empty() => {
                        return Err(invalid(problems, Some(source.to_string())))
                    }
                    Err(source) => return Err(Error::Imds { source }),
                }
            } else {
                None
            }
        }
    };
    if let Some(raw) = raw_user_data {
        match userdata::extract(&raw) {
            Ok(Some(found)) => layers.push(parse_toml(
                Source::UserData(found.origin),
                &found.text,
                &mut problems,
            )),
            Ok(None) => tracing::debug!("user-data holds no kubeboot configuration"),
            Err(e) => problems.push(Problem {
                kind: match e {
                    userdata::UserDataError::MultipleParts(_) => ProblemKind::Conflict,
                    userdata::UserDataError::TooLarge { .. } => ProblemKind::OutOfRange,
                    _ => ProblemKind::Syntax,
                },
                source: Source::UserData("document"),
                key: "user-data".into(),
                value: None,
                reason: e.to_string(),
                expected: format!(
                    "one MIME part of type {} holding TOML, or a plain TOML body",
                    userdata::CONTENT_TYPE
                ),
            }),
        }
    }
    layers.extend(env_layers);
    merge(&layers, problems)
}

/// Reads a config file or drop-in: a regular file of at most
/// [`input::MAX_BYTES`], as UTF-8.
fn read_text(path: &Path) -> Result<String, Error> {
    String::from_utf8(read_bounded(path)?).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    input::read_file(path, input::MAX_BYTES).map_err(|e| match e {
        input::ReadError::NotRegular(kind) => Error::NotRegular {
            path: path.to_path_buf(),
            kind,
        },
        input::ReadError::TooLarge { limit } => Error::TooLarge {
            path: path.to_path_buf(),
            limit,
        },
        input::ReadError::Io(source) => Error::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The drop-in files next to the config file, in the order they apply.
pub fn drop_ins(config_path: &Path) -> Result<Vec<PathBuf>, Error> {
    let dir = config_path
        .parent()
        .unwrap_or(Path::new("/"))
        .join("config.d");
    let listing = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::DropInDir { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in listing {
        let path = entry
            .map_err(|source| Error::DropInDir {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// IMDS settings from the local sources only (user-data cannot set them).
pub fn imds_settings(layers: &[Layer]) -> model::Imds {
    let pick = |path: &str| {
        layers
            .iter()
            .rev()
            .flat_map(|l| l.entries.iter())
            .find(|(k, _)| k.path == path)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                schema::find(path)
                    .and_then(|k| k.default)
                    .and_then(toml::Value::deserialize_literal)
            })
    };
    let dur = |path: &str, fallback: u64| {
        pick(path)
            .and_then(|v| v.as_str().and_then(value::parse_duration))
            .unwrap_or(std::time::Duration::from_secs(fallback))
    };
    model::Imds {
        endpoint: pick("imds.endpoint")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "http://169.254.169.254".into()),
        user_data: pick("imds.user_data")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        request_timeout: dur("imds.request_timeout", 2),
        deadline: dur("imds.deadline", 300),
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
        use self::Error as E;
        match self {
            E::Invalid { .. } => &crate::catalogue::CONFIG_INVALID,
            E::Read { .. } => &crate::catalogue::CONFIG_READ,
            E::DropInDir { .. } => &crate::catalogue::CONFIG_DROPIN_DIR,
            E::Imds { .. } => &crate::catalogue::CONFIG_USERDATA,
            E::Internal(_) => &crate::catalogue::CONFIG_INTERNAL,
            E::NotRegular { .. } => &crate::catalogue::CONFIG_NOT_REGULAR,
            E::TooLarge { .. } => &crate::catalogue::CONFIG_TOO_LARGE,
        }
    }
}

impl crate::catalogue::Coded for self::ProblemKind {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
        use self::ProblemKind as K;
        match self {
            K::Syntax => &crate::catalogue::CONFIG_SYNTAX,
            K::UnknownKey => &crate::catalogue::CONFIG_UNKNOWN_KEY,
            K::WrongType => &crate::catalogue::CONFIG_WRONG_TYPE,
            K::OutOfRange => &crate::catalogue::CONFIG_OUT_OF_RANGE,
            K::Invalid => &crate::catalogue::CONFIG_INVALID_VALUE,
            K::Missing => &crate::catalogue::CONFIG_MISSING,
            K::Conflict => &crate::catalogue::CONFIG_CONFLICT,
            K::Inconsistent => &crate::catalogue::CONFIG_INCONSISTENT,
            K::Retired => &crate::catalogue::CONFIG_RETIRED,
        }
    }
}

impl crate::catalogue::Coded for self::Problem {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        #[allow(unused_imports)]
        use crate::catalogue::Coded;
        self.kind.entry()
    }
}

#[cfg(test)]
mod tests;
