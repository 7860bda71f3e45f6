//! Reading one source into a [`Layer`]: a TOML document (the file, a
//! drop-in, the user-data part) or the `KUBEBOOT_*` environment, checked key
//! by key against the schema.

use super::schema::{self, Key, Kind};
use super::show::show_value;
use super::value::{self, Refusal};
use super::{input, shown_key, Layer, Problem, ProblemKind, Source, MAX_REPORTED};
use crate::secret::REDACTED;

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
