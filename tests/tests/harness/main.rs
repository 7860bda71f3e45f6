//! The harness itself, the kubeadm stand-in and API double, and the infra/
//! templates against the agent.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test harness <module>::`.

mod harness;
mod infra;
mod standin;
