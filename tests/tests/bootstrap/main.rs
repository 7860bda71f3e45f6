//! Bootstrap end to end on simulated nodes: the happy paths, the crash matrix,
//! join material a joiner must refuse, the agent's etcd module, and the rolling
//! replacement.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test bootstrap <module>::`.

mod addons;
mod agent_etcd;
mod bootstrap_crash;
mod bootstrap_e2e;
mod bootstrap_join_material;
mod rolling_replacement;
