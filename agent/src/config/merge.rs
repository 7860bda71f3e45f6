//! Merging the layers over the defaults, then the checks that need the
//! merged view: required keys, derived defaults and cross-key rules.

use super::show::show_value;
use super::{
    invalid, schema, value, Config, Entry, Error, Layer, Literal, Problem, ProblemKind, Source,
};
use std::collections::BTreeMap;

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
    if text("node.role") == Some("control-plane")
        && set("cluster.service_account_issuer")
        && !set("aws.oidc_bucket")
    {
        inconsistent(
            "aws.oidc_bucket",
            "cluster.service_account_issuer",
            "control planes publish the issuer's documents but no bucket is set".into(),
            "aws.oidc_bucket = \"<bucket>\" (the bucket serving the issuer's URL), or no issuer",
        );
    }
    if text("node.role") == Some("control-plane")
        && set("addons.cluster_autoscaler_role_arn")
        && !set("cluster.service_account_issuer")
    {
        inconsistent(
            "addons.cluster_autoscaler_role_arn",
            "cluster.service_account_issuer",
            "cluster-autoscaler assumes its role with service-account tokens, which AWS trusts only from a published issuer".into(),
            "cluster.service_account_issuer = \"https://...\" (infra/'s ServiceAccountIssuer output), or no cluster-autoscaler role",
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
pub(super) fn nest(entries: &BTreeMap<&'static str, Entry>) -> toml::Value {
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
