//! An Embedded Metric Format checker, written from the specification rather
//! than from the agent's encoder, so a bug in one is not mirrored in the
//! other. CloudWatch silently drops documents that break these rules; here
//! they fail the test that produced them.

use serde_json::Value;

/// Units CloudWatch accepts.
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// CloudWatch Logs' largest event; a longer line is truncated and unreadable.
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Checks one line against the EMF specification; the error says which rule.
pub fn validate(line: &str) -> Result<Value, String> {
    if line.len() > MAX_EVENT_BYTES {
        return Err(format!("{} bytes, more than a log event holds", line.len()));
    }
    if line.contains('\n') {
        return Err("a document spans lines".into());
    }
    let doc: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let root = doc.as_object().ok_or("the root is not an object")?;
    let aws = root
        .get("_aws")
        .and_then(Value::as_object)
        .ok_or("no _aws object")?;
    let ts = aws
        .get("Timestamp")
        .and_then(Value::as_u64)
        .ok_or("_aws.Timestamp is not a whole number of milliseconds")?;
    // 2020-01-01 .. 2100-01-01: seconds instead of milliseconds fail here.
    if !(1_577_836_800_000..4_102_444_800_000).contains(&ts) {
        return Err(format!("_aws.Timestamp {ts} is not epoch milliseconds"));
    }
    if let Some(group) = aws.get("LogGroupName") {
        let group = group.as_str().ok_or("LogGroupName is not a string")?;
        if group.is_empty() || group.len() > 512 {
            return Err("LogGroupName must be 1-512 characters".into());
        }
    }
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(Value::as_array)
        .ok_or("_aws.CloudWatchMetrics is not an array")?;
    if directives.is_empty() {
        return Err("no metric directive".into());
    }
    for d in directives {
        let ns = d
            .get("Namespace")
            .and_then(Value::as_str)
            .ok_or("a directive without a Namespace string")?;
        if ns.is_empty() || ns.len() > 255 || ns.starts_with(':') {
            return Err(format!("Namespace {ns:?} is not valid"));
        }
        let sets = d
            .get("Dimensions")
            .and_then(Value::as_array)
            .ok_or("Dimensions is not an array of arrays")?;
        for set in sets {
            let keys = set.as_array().ok_or("a dimension set is not an array")?;
            if keys.len() > 30 {
                return Err(format!("{} dimension keys, more than 30", keys.len()));
            }
            for key in keys {
                let key = key.as_str().ok_or("a dimension key is not a string")?;
                let value = root
                    .get(key)
                    .ok_or(format!("dimension {key} has no top-level value"))?;
                let value = value
                    .as_str()
                    .ok_or(format!("dimension {key}'s value is not a string"))?;
                if value.is_empty() || value.len() > 1024 {
                    return Err(format!("dimension {key} value must be 1-1024 characters"));
                }
            }
        }
        let metrics = d
            .get("Metrics")
            .and_then(Value::as_array)
            .ok_or("Metrics is not an array")?;
        if metrics.is_empty() || metrics.len() > 100 {
            return Err(format!("{} metrics in a directive (1-100)", metrics.len()));
        }
        for m in metrics {
            let name = m
                .get("Name")
                .and_then(Value::as_str)
                .ok_or("a metric without a Name string")?;
            if name.is_empty() || name.len() > 255 {
                return Err(format!("metric name {name:?} must be 1-255 characters"));
            }
            if let Some(unit) = m.get("Unit") {
                let unit = unit.as_str().ok_or("Unit is not a string")?;
                if !UNITS.contains(&unit) {
                    return Err(format!(
                        "metric {name}: unit {unit:?} is not a CloudWatch unit"
                    ));
                }
            }
            if let Some(res) = m.get("StorageResolution") {
                if res != 1 && res != 60 {
                    return Err(format!("metric {name}: StorageResolution must be 1 or 60"));
                }
            }
            let value = root
                .get(name)
                .ok_or(format!("metric {name} has no top-level value"))?;
            let ok = match value {
                Value::Number(_) => true,
                Value::Array(values) => {
                    !values.is_empty() && values.len() <= 100 && values.iter().all(Value::is_number)
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "metric {name}'s value is not a number (or up to 100 numbers)"
                ));
            }
        }
    }
    Ok(doc)
}

/// Checks every line of an EMF stream; returns the documents.
pub fn validate_all(text: &str) -> Vec<Value> {
    // Complete lines only: the last one without its newline is a line a live
    // writer has not finished yet (a read can see part of a write), which
    // the CloudWatch agent, reading up to a newline, does not take either.
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            validate(line).unwrap_or_else(|e| panic!("EMF line {}: {e}\n{line}", i + 1))
        })
        .collect()
}

/// The metric names a set of documents carries.
pub fn metric_names(docs: &[Value]) -> std::collections::BTreeSet<String> {
    docs.iter()
        .flat_map(|d| {
            d["_aws"]["CloudWatchMetrics"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|dir| dir["Metrics"].as_array().into_iter().flatten())
                .filter_map(|m| m["Name"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"_aws":{"Timestamp":1764000000000,"CloudWatchMetrics":[{"Namespace":"Kubeboot","Dimensions":[["ClusterName","Role"]],"Metrics":[{"Name":"EtcdMembers","Unit":"Count"}]}]},"ClusterName":"c","Role":"control-plane","EtcdMembers":3}"#;

    #[test]
    fn a_line_not_finished_yet_is_not_read() {
        let half = &GOOD[..GOOD.len() / 2];
        assert_eq!(validate_all(&format!("{GOOD}\n{GOOD}\n{half}")).len(), 2);
        assert!(validate_all(half).is_empty());
    }

    #[test]
    fn the_checker_accepts_a_valid_document_and_names_each_broken_rule() {
        assert!(validate(GOOD).is_ok());
        for (broken, rule) in [
            (
                GOOD.replace("1764000000000", "1764000000"),
                "epoch milliseconds",
            ),
            (GOOD.replace(",\"EtcdMembers\":3", ""), "no top-level value"),
            (
                GOOD.replace("\"Role\":\"control-plane\",", ""),
                "dimension Role",
            ),
            (
                GOOD.replace("\"Count\"", "\"Things\""),
                "not a CloudWatch unit",
            ),
            (
                GOOD.replace("\"EtcdMembers\":3", "\"EtcdMembers\":\"3\""),
                "not a number",
            ),
            (GOOD.replace("\"Namespace\":\"Kubeboot\",", ""), "Namespace"),
            ("[]".to_string(), "not an object"),
        ] {
            let err = validate(&broken).expect_err(rule);
            assert!(err.contains(rule), "{err} (wanted {rule})");
        }
    }
}
