//! `kubeboot config check` and `kubeboot config show`: the configuration as
//! the sources merge it, linted or printed.

use super::{load, print, CheckArgs, Cli, ConfigArgs, Output};
use crate::config::{self, LoadOptions, Loaded, UserData};
use crate::error::{Error, EXIT_USAGE};
use std::process::ExitCode;

/// Prints the merged configuration, secrets redacted, with each value's source.
pub(super) async fn show(cli: &Cli, args: &ConfigArgs) -> Result<ExitCode, Error> {
    let loaded = load(cli, args.sources.user_data()).await?;
    let out = match args.output {
        Output::Text => loaded.show_text(),
        Output::Json => format!("{:#}\n", loaded.show_json()),
    };
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Lints every source and prints every problem; any problem exits 2.
pub(super) async fn check(cli: &Cli, args: &CheckArgs) -> Result<ExitCode, Error> {
    let user_data = args.user_data();
    let result = config::load_with(
        &LoadOptions::from_process(cli.config.clone(), user_data.clone()),
        &crate::identity::UserDataFromImds,
    )
    .await;
    let (problems, omitted, unread) = match &result {
        Ok(_) => (Vec::new(), 0, None),
        Err(config::Error::Invalid {
            problems,
            omitted,
            user_data_unread,
        }) => (problems.clone(), *omitted, user_data_unread.clone()),
        Err(_) => return result.map(|_| ExitCode::SUCCESS).map_err(Error::from),
    };
    let user_data_note = match (&user_data, unread) {
        (_, Some(why)) => format!("user-data not merged: {why}"),
        (UserData::Skip, None) => "user-data not merged (pass --with-user-data to fetch it from \
            instance metadata, or --user-data FILE)"
            .to_string(),
        _ => "user-data merged".to_string(),
    };
    let out = match args.output {
        Output::Json => format!(
            "{:#}\n",
            serde_json::json!({
                "ok": problems.is_empty(),
                "problems": coded(&problems),
                "omitted": omitted,
                "user_data": user_data_note,
            })
        ),
        Output::Text => format!(
            "{}{user_data_note}\n",
            check_report(result.as_ref().ok(), &problems, omitted)
        ),
    };
    print(&out)?;
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

/// Problems as JSON objects with their catalogue code beside the fields.
fn coded(problems: &[config::Problem]) -> Vec<serde_json::Value> {
    problems
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or(serde_json::Value::Null);
            if let Some(map) = v.as_object_mut() {
                map.insert("code".into(), crate::catalogue::Coded::code(p).into());
            }
            v
        })
        .collect()
}

fn check_report(loaded: Option<&Loaded>, problems: &[config::Problem], omitted: usize) -> String {
    if let Some(l) = loaded {
        let mut sources: Vec<String> = l.entries.values().map(|e| e.source.to_string()).collect();
        sources.retain(|s| !s.starts_with("default"));
        sources.sort();
        sources.dedup();
        return format!(
            "configuration OK: cluster {}, role {}, from {}\n",
            l.config.cluster.name,
            l.config.node.role.as_str(),
            if sources.is_empty() {
                "defaults only".to_string()
            } else {
                sources.join(", ")
            }
        );
    }
    let total = problems.len() + omitted;
    let mut out = format!(
        "configuration has {total} problem{}:\n",
        if total == 1 { "" } else { "s" }
    );
    for (i, p) in problems.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}. [{}] {p}\n",
            i + 1,
            crate::catalogue::Coded::code(p)
        ));
    }
    if omitted > 0 {
        out.push_str(&format!(
            "     … and {omitted} more not listed: fix the ones above and check again\n"
        ));
    }
    out
}
