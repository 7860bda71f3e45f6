//! The top-level error: what reaches the operator, with a hint and an exit code.
//!
//! Exit codes (documented in the README, relied on by the systemd units):
//! - 0: success;
//! - 2: configuration or usage error: restarting cannot help, so the units set
//!   `RestartPreventExitStatus=2`;
//! - 1: any other failure (AWS, etcd, kubeadm, IMDS...): restartable.
//!
//! Every failure also has a stable code from [`crate::catalogue`]
//! ([`Error::code`]), which `kubeboot explain` expands.

use std::process::ExitCode;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for failures that a restart may fix.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for configuration and usage errors.
pub const EXIT_USAGE: u8 = 2;

/// Every failure a command can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::Error),
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    #[error(transparent)]
    Aws(#[from] crate::aws::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::Error),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    Status(#[from] crate::status::Error),
    #[error(transparent)]
    Bootstrap(#[from] crate::bootstrap::Error),
    #[error(transparent)]
    Membership(#[from] crate::membership::Error),
    #[error(transparent)]
    Backup(#[from] crate::backup::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write command output: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    UnknownCode(#[from] crate::catalogue::UnknownCode),
}

impl Error {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(e) if e.is_usage() => EXIT_USAGE,
            Error::Telemetry(crate::telemetry::Error::Level(_)) => EXIT_USAGE,
            Error::Usage(_) | Error::UnknownCode(_) => EXIT_USAGE,
            Error::Backup(crate::backup::Error::NoBucket) => EXIT_USAGE,
            Error::Bootstrap(crate::bootstrap::Error::Restore(
                crate::restore::Error::NotControlPlane,
            )) => EXIT_USAGE,
            // The image and the cluster disagree: a restart changes neither.
            Error::Bootstrap(crate::bootstrap::Error::Kubeadm(
                crate::kubeadm::Error::VersionMismatch { .. }
                | crate::kubeadm::Error::VersionUnknown { .. },
            )) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// The stable catalogue code, e.g. `KB-LOCK-001` (see `docs/errors.md`).
    pub fn code(&self) -> &'static str {
        crate::catalogue::Coded::code(self)
    }

    /// The catalogue entry: title, probable cause, what to check.
    pub fn entry(&self) -> &'static crate::catalogue::Entry {
        crate::catalogue::Coded::entry(self)
    }

    /// As a process exit code.
    pub fn to_exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Config(e) => e.entry(),
            E::Telemetry(e) => e.entry(),
            E::Identity(e) => e.entry(),
            E::Aws(e) => e.entry(),
            E::Lock(e) => e.entry(),
            E::Registry(e) => e.entry(),
            E::Status(e) => e.entry(),
            E::Bootstrap(e) => e.entry(),
            E::Membership(e) => e.entry(),
            E::Backup(e) => e.entry(),
            E::Usage(_) => &crate::catalogue::CLI_USAGE,
            E::Runtime(_) => &crate::catalogue::CLI_RUNTIME,
            E::Output(_) => &crate::catalogue::CLI_OUTPUT,
            E::UnknownCode(_) => &crate::catalogue::CLI_UNKNOWN_CODE,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::Bootstrap(e) => e.detail(),
            _ => None,
        }
    }
}

// Every catalogue code a unit test can reach, provoked through the real
// functions. Here, at the top of the error types, because it uses them all.
#[cfg(test)]
mod provoke;
