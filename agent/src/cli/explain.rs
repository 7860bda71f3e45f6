//! `kubeboot explain`: the error catalogue, offline.

use super::{print, ExplainArgs, Output};
use crate::error::Error;
use std::process::ExitCode;

/// One entry, or the list; an unknown code is a usage error.
pub(super) fn run(args: &ExplainArgs) -> Result<ExitCode, Error> {
    use crate::catalogue::{self, ENTRIES};
    let out = match (&args.code, args.output) {
        (Some(code), Output::Text) => catalogue::render_text(catalogue::lookup(code)?),
        (Some(code), Output::Json) => {
            format!("{:#}\n", serde_json::json!(catalogue::lookup(code)?))
        }
        (None, Output::Text) => catalogue::render_list(),
        (None, Output::Json) => format!("{:#}\n", serde_json::json!(ENTRIES)),
    };
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}
