//! Talking to systemd: readiness, the status line, and a watchdog fed by
//! the loops' own progress.
//!
//! The units are `Type=notify`: `kubeboot bootstrap` says `READY=1` once the
//! node is bootstrapped, `kubeboot daemon` once its loops run. `STATUS=` shows
//! what the process is doing in `systemctl status`.
//!
//! The watchdog is not a timer that pings regardless: each loop calls
//! [`beat`] with the time within which it promises to beat again. A task
//! sends `WATCHDOG=1` only while every loop keeps its promise; once one
//! overruns, it logs which loop is stuck, stops pinging and sends
//! `WATCHDOG=trigger`, so systemd restarts the daemon (and the lease of any
//! lock it held expires, letting another node take over). Outside systemd
//! (no `NOTIFY_SOCKET`) every call here is a no-op apart from the log line.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Tells systemd the service is up.
pub fn ready(status: &str) {
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Sets the one-line status `systemctl status` shows.
pub fn status(line: &str) {
    send(&[sd_notify::NotifyState::Status(line)]);
}

/// Tells systemd the service is stopping (so a slow exit is not a hang).
pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

fn send(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// A loop's promise: it beats again before `due`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promise {
    due: Instant,
}

static LOOPS: Mutex<BTreeMap<&'static str, Promise>> = Mutex::new(BTreeMap::new());

/// Records that loop `name` made progress and will again within `within`.
pub fn beat(name: &'static str, within: Duration) {
    if let Ok(mut loops) = LOOPS.lock() {
        loops.insert(
            name,
            Promise {
                due: Instant::now() + within,
            },
        );
    }
}

/// Removes a loop that ended on purpose (shutdown, own termination done).
pub fn done(name: &'static str) {
    if let Ok(mut loops) = LOOPS.lock() {
        loops.remove(name);
    }
}

/// The loops that broke their promise at `now`, with how long they overran.
fn overdue(loops: &BTreeMap<&'static str, Promise>, now: Instant) -> Vec<(&'static str, Duration)> {
    loops
        .iter()
        .filter(|(_, p)| now > p.due)
        .map(|(name, p)| (*name, now - p.due))
        .collect()
}

/// How often the watchdog task looks: half systemd's interval (as
/// sd_watchdog_enabled(3) advises), at most every second so a stuck loop is
/// reported promptly even without systemd.
pub fn check_interval(watchdog: Option<Duration>) -> Duration {
    match watchdog {
        Some(d) => (d / 2).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        None => Duration::from_secs(1),
    }
}

/// Runs the watchdog until the process ends: pings systemd while every
/// loop keeps its promise; trips it once one does not.
pub async fn watchdog() {
    let enabled = sd_notify::watchdog_enabled();
    let every = check_interval(enabled);
    let mut tripped = false;
    loop {
        tokio::time::sleep(every).await;
        let late = match LOOPS.lock() {
            Ok(loops) => overdue(&loops, Instant::now()),
            Err(_) => Vec::new(),
        };
        if late.is_empty() {
            if tripped {
                tracing::info!("all daemon loops make progress again");
                tripped = false;
            }
            if enabled.is_some() {
                send(&[sd_notify::NotifyState::Watchdog]);
            }
            continue;
        }
        if !tripped {
            tripped = true;
            let names: Vec<String> = late
                .iter()
                .map(|(n, d)| {
                    format!(
                        "{n} (late by {})",
                        crate::config::value::format_duration(*d)
                    )
                })
                .collect();
            let line = format!("stuck: {}", names.join(", "));
            tracing::error!(
                loops = %names.join(", "),
                hint = "a loop made no progress within its allowance (daemon.watchdog_stall); systemd restarts the daemon; look at the last lines this loop logged",
                "daemon loop stuck; tripping the watchdog"
            );
            if enabled.is_some() {
                send(&[
                    sd_notify::NotifyState::Status(&line),
                    sd_notify::NotifyState::WatchdogTrigger,
                ]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loops_past_their_promise_are_overdue() {
        let now = Instant::now();
        let mut loops = BTreeMap::new();
        loops.insert(
            "leader",
            Promise {
                due: now + Duration::from_secs(5),
            },
        );
        loops.insert(
            "own-termination",
            Promise {
                due: now - Duration::from_secs(2),
            },
        );
        assert_eq!(
            overdue(&loops, now),
            vec![("own-termination", Duration::from_secs(2))]
        );
        assert!(overdue(&loops, now - Duration::from_secs(3)).is_empty());
        assert_eq!(overdue(&loops, now + Duration::from_secs(6)).len(), 2);
    }

    #[test]
    fn the_check_runs_at_half_the_systemd_interval_within_bounds() {
        assert_eq!(
            check_interval(Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
        assert_eq!(
            check_interval(Some(Duration::from_millis(800))),
            Duration::from_millis(400)
        );
        assert_eq!(
            check_interval(Some(Duration::from_millis(10))),
            Duration::from_millis(50)
        );
        assert_eq!(check_interval(None), Duration::from_secs(1));
    }
}
