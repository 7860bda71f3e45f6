//! Test failpoints: `KBTEST_CRASH_AT=<name>` aborts the process at the named
//! point (no destructors, like kill -9), so the crash-matrix tests can stop
//! bootstrap and the daemon at every step. Unset in production, where a
//! point costs one environment lookup.

/// Aborts the process if `KBTEST_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    if std::env::var("KBTEST_CRASH_AT").is_ok_and(|at| at == name) {
        tracing::warn!(crash_point = name, "crashing on purpose (KBTEST_CRASH_AT)");
        std::process::abort();
    }
}
