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

mod load;
mod merge;
mod parse;
mod show;

pub use load::{
    drop_ins, imds_settings, load_offline, load_with, FetchError, LoadOptions, NoUserDataSource,
    UserData, UserDataSource,
};
pub use merge::{merge, Loaded};
pub use model::{Config, MetricsSink, PodNetwork, Role};
pub use parse::{parse_env, parse_toml};

use schema::Key;
use std::fmt;
use std::path::PathBuf;

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

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
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
        self.kind.entry()
    }
}

#[cfg(test)]
mod tests;
