//! Test failpoints: `KBTEST_CRASH_AT=<name>` aborts the process at the named
//! point (no destructors, like kill -9), so the crash-matrix tests can stop
//! bootstrap and the daemon at every step. `KBTEST_STALL_AT=<name>` hangs a
//! loop forever at the named point instead (the watchdog test).
//!
//! They exist only in a debug build with the `failpoints` cargo feature,
//! which the test crate enables. A release build never has them, however it
//! was built (`cargo build --release` of the whole workspace unifies the
//! test crate's features too), and the image ships a release build: no
//! environment variable on a node can crash or hang it.

/// Whether this build honours the failpoint variables (test builds only).
pub const COMPILED_IN: bool = cfg!(all(feature = "failpoints", debug_assertions));

/// Aborts the process if `KBTEST_CRASH_AT` names this point (test builds).
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn crash_point(name: &str) {
    if std::env::var("KBTEST_CRASH_AT").is_ok_and(|at| at == name) {
        tracing::warn!(crash_point = name, "crashing on purpose (KBTEST_CRASH_AT)");
        std::process::abort();
    }
}

/// A crash point in a shipped build: nothing.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Never returns if `KBTEST_STALL_AT` names this point: the loop hangs the
/// way a deadlock or a call without a timeout would, so the watchdog test
/// can see the watchdog trip (test builds).
#[cfg(all(feature = "failpoints", debug_assertions))]
pub async fn stall_point(name: &str) {
    if std::env::var("KBTEST_STALL_AT").is_ok_and(|at| at == name) {
        tracing::warn!(stall_point = name, "stalling on purpose (KBTEST_STALL_AT)");
        std::future::pending::<()>().await;
    }
}

/// A stall point in a shipped build: nothing.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub async fn stall_point(_name: &str) {}

/// A test's shorter version of a wait the real component imposes (the
/// kubelet's file-check period): `KBTEST_<name>` in milliseconds (test
/// builds only; a shipped build always waits the real time).
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn duration_override(name: &str) -> Option<std::time::Duration> {
    std::env::var(format!("KBTEST_{name}"))
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

/// No override in a shipped build.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn duration_override(_name: &str) -> Option<std::time::Duration> {
    None
}
