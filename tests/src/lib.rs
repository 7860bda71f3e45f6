//! Test harness for kubeboot: real parts, not mocks.
//!
//! Every test talks to the same kinds of processes the agent meets on a node —
//! real `etcd` members, `moto_server` standing in for AWS, and a wire-faithful
//! IMDSv2 double — so that bugs in framing, retries and timing show up here
//! rather than on EC2. Every process a test starts is owned by a
//! [`process::ChildGuard`], so nothing outlives its test, even on panic.
//!
//! Harness knobs are environment variables prefixed `KBTEST_` (never
//! `KUBEBOOT_`, which belongs to the agent's own configuration).

pub mod awsproxy;
pub mod cfn;
pub mod cfn_signal;
pub mod emf;
pub mod etcd;
pub mod fixtures;
pub mod imds;
pub mod kubeapi;
pub mod lifecycle_actions;
pub mod machine;
pub mod memstore;
pub mod moto;
pub mod net;
pub mod pki;
pub mod process;
pub mod simcluster;
pub mod standin;
pub mod termination;
pub mod workspace;

/// Poison-tolerant lock: a panicking test must not cascade into the doubles
/// that share its state.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
