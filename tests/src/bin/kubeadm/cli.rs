//! Command line: flags as cobra parses them, and the subcommands.

use crate::certs::certs;
use crate::helpers::{plain_err, R};
use crate::init::{init, init_phase};
use crate::join::{join, join_phase};
use crate::noop::{noop_init, noop_join};
use crate::reset::reset;
use crate::token::token;
use crate::{NOOP_ENV, VERSION};
use serde_json::json;
use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// Parsed flags of one subcommand.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    pub(crate) positional: Vec<String>,
    pub(crate) values: BTreeMap<&'static str, String>,
    pub(crate) switches: BTreeSet<&'static str>,
}

impl Flags {
    pub(crate) fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub(crate) fn on(&self, name: &str) -> bool {
        self.switches.contains(name)
    }
}

/// Cobra-like parsing: `--name value`, `--name=value`, boolean switches,
/// `-f`/`-o`/`-v` short forms; unknown flags fail as cobra fails.
pub(crate) fn parse_flags(args: &[String], spec: &[(&'static str, bool)]) -> R<Flags> {
    let mut all: Vec<(&'static str, bool)> = spec.to_vec();
    all.push(("v", true));
    let short = |c: &str| match c {
        "f" => Some("force"),
        "o" => Some("output"),
        "v" => Some("v"),
        _ => None,
    };
    let mut flags = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline) = if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            }
        } else if let Some(s) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let (n, v) = match s.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (s, None),
            };
            match short(n) {
                Some(long) => (long.to_string(), v),
                None => return Err(plain_err(format!("unknown shorthand flag: '{n}' in {a}"))),
            }
        } else {
            flags.positional.push(a.clone());
            continue;
        };
        let Some((key, takes_value)) = all.iter().find(|(n, _)| *n == name) else {
            return Err(plain_err(format!("unknown flag: --{name}")));
        };
        if *takes_value {
            let value = match inline {
                Some(v) => v,
                None => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| plain_err(format!("flag needs an argument: --{name}")))?;
                    i += 1;
                    v.clone()
                }
            };
            flags.values.insert(key, value);
        } else if inline.as_deref() != Some("false") {
            flags.switches.insert(key);
        }
    }
    Ok(flags)
}

pub(crate) async fn run(args: &[String]) -> R<()> {
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            println!("Usage:\n  kubeadm [command]\n\nAvailable Commands:\n  init, join, reset, token, version");
            return Ok(());
        }
    };
    let noop = std::env::var(NOOP_ENV).is_ok_and(|v| v == "1");
    match cmd {
        "init" if noop && rest.first().map(String::as_str) != Some("phase") => {
            noop_init(rest).await
        }
        "join" if noop && rest.first().map(String::as_str) != Some("phase") => {
            noop_join(rest).await
        }
        "init" if rest.first().map(String::as_str) == Some("phase") => init_phase(&rest[1..]).await,
        "init" => init(rest).await,
        "join" if rest.first().map(String::as_str) == Some("phase") => join_phase(&rest[1..]).await,
        "join" => join(rest).await,
        "reset" => reset(rest).await,
        "token" => token(rest).await,
        "certs" => certs(rest).await,
        "version" => version(rest),
        other => Err(plain_err(format!(
            "unknown command {other:?} for \"kubeadm\"\nRun 'kubeadm --help' for usage."
        ))),
    }
}

pub(crate) fn version(args: &[String]) -> R<()> {
    let flags = parse_flags(args, &[("output", true)])?;
    match flags.value("output").unwrap_or("") {
        "short" => println!("{VERSION}"),
        "json" => println!(
            "{}",
            json!({"clientVersion": {"major": "1", "minor": "31", "gitVersion": VERSION, "gitTreeState": "clean", "goVersion": "go1.22.8", "compiler": "gc", "platform": "linux/amd64"}})
        ),
        "" => println!(
            "kubeadm version: &version.Info{{Major:\"1\", Minor:\"31\", GitVersion:\"{VERSION}\", GitTreeState:\"clean\", GoVersion:\"go1.22.8\", Compiler:\"gc\", Platform:\"linux/amd64\"}}"
        ),
        other => return Err(plain_err(format!("invalid output format: {other}"))),
    }
    Ok(())
}
