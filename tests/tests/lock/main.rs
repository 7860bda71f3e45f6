//! The lease lock and the fenced registry: on moto, under injected faults, as
//! regressions on virtual time, and as a seeded simulation.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test lock <module>::`.

mod lock;
mod lock_faults;
mod lock_regressions;
mod lock_simulation;
