//! kubeboot: the on-node agent for self-managed kubeadm clusters on EC2 Auto
//! Scaling Groups. The binary is a thin shell over [`cli::main`]; every
//! concern lives in its own module, named for what it is.

pub mod addons;
pub mod aws;
pub mod backup;
pub mod bootstrap;
pub mod catalogue;
pub mod certs;
pub mod cli;
pub mod cloudformation;
pub mod config;
pub mod context;
pub mod daemon;
pub mod error;
pub mod etcd;
pub mod failpoint;
pub mod health;
pub mod iam;
pub mod identity;
pub mod issuer;
pub mod join_material;
pub mod kubeadm;
pub mod kubernetes;
pub mod lifecycle;
pub mod lock;
pub mod membership;
pub mod metrics;
pub mod oidc;
pub mod pacing;
pub mod quorum;
pub mod reconciler;
pub mod refresh;
pub mod registry;
pub mod restore;
pub mod retry;
pub mod secret;
pub mod status;
pub mod systemd;
pub mod table;
pub mod telemetry;
#[cfg(test)]
mod testing;
