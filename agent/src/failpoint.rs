//! Test failpoints: `KBTEST_CRASH_AT=<name>` aborts the process at the named
//! point (no destructors, like kill -9), so the crash-matrix tests can stop
//! bootstrap and the daemon at every step. Unset in production, where a
//! point costs one environment lookup. `KBTEST_STALL_AT=<name>` hangs a
//! loop forever at the named point instead (the watchdog test).

/// Aborts the process if `KBTEST_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    if std::env::var("KBTEST_CRASH_AT").is_ok_and(|at| at == name) {
        tracing::warn!(crash_point = name, "crashing on purpose (KBTEST_CRASH_AT)");
        std::process::abort();
    }
}

/// Never returns if `KBTEST_STALL_AT` names this point: the loop hangs the
/// way a deadlock or a call without a timeout would, so the watchdog test
/// can see the watchdog trip.
pub async fn stall_point(name: &str) {
    if std::env::var("KBTEST_STALL_AT").is_ok_and(|at| at == name) {
        tracing::warn!(stall_point = name, "stalling on purpose (KBTEST_STALL_AT)");
        std::future::pending::<()>().await;
    }
}
