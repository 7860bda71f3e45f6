//! The agent's command line and what it prints: configuration and its errors,
//! error codes, `status`, `etcd`, metrics and logs, and the build that ships.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test cli <module>::`.

mod agent_config;
mod config_bad_input;
mod error_codes;
mod etcd_cli;
mod metrics_sink;
mod observability;
mod shipped_build;
mod status_cli;
