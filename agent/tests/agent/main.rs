//! The agent's black-box tests in one binary (linking is most of the suite's
//! cost): one module per former test file, e.g.
//! `cargo nextest run -p kubeboot --test agent errors::`.
//!
//! `telemetry` stays a binary of its own: it installs the process-global log
//! subscriber, as `error_report::logging_set_up_twice_has_its_code` does
//! here, and under plain `cargo test` (one process per binary) the two would
//! meet.

mod cli;
mod common;
mod error_report;
mod errors;
mod no_shell;
mod readme;
