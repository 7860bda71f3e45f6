//! The daemon's loops: join material refresh, lifecycle actions and
//! terminations (and their deferral), the dead-member reconciler, certificates.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test daemon <module>::`.

mod backup;
mod certificates;
mod daemon_refresh;
mod issuer;
mod lifecycle;
mod lifecycle_actions;
mod lifecycle_deferral;
mod reconciler;
mod restore;
