//! The units under systemd: real boots in a throwaway machine, the notify
//! socket and the watchdog, and what `systemd-analyze` says of the units.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test systemd <module>::`.

mod image;
mod systemd_boot;
mod systemd_notify;
mod systemd_units;
