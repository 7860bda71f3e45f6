//! How the daemon's loops pace themselves: the stop signal they watch, the
//! jittered delay between turns, and the watchdog's names and allowance for
//! each loop. Kept below the daemon and the workflows it runs (certificate
//! renewal, the lifecycle queue), which beat the same watchdog.

use crate::config::Config;
use std::time::Duration;
use tokio::sync::watch;

/// Watchdog name of the own-termination loop (every node).
pub const OWN_LOOP: &str = "own-termination";
/// Watchdog name of the leader loop (control planes).
pub const LEADER_LOOP: &str = "leader";

/// How long a loop may go without progress: one turn may take up to
/// `daemon.watchdog_stall`, plus the sleep before it.
pub fn allowance(cfg: &Config) -> Duration {
    cfg.daemon.watchdog_stall + cfg.daemon.period + cfg.daemon.jitter
}

/// A stop signal the loops watch: `true` once shutdown began.
pub type Stop = watch::Receiver<bool>;

/// Resolves once `stop` says so (or its sender is gone).
pub async fn stopped(stop: &mut Stop) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// `period` plus a uniformly random share of `jitter`.
pub fn next_delay(period: Duration, jitter: Duration, random: u64) -> Duration {
    let jitter_ms = jitter.as_millis() as u64;
    let extra = if jitter_ms == 0 {
        0
    } else {
        random % (jitter_ms + 1)
    };
    period + Duration::from_millis(extra)
}

/// A random number for the jitter.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_the_period_plus_at_most_the_jitter() {
        let period = Duration::from_secs(30);
        let jitter = Duration::from_secs(5);
        assert_eq!(next_delay(period, Duration::ZERO, 12345), period);
        for random in [0, 1, 4999, 5000, 5001, u64::MAX] {
            let d = next_delay(period, jitter, random);
            assert!(d >= period && d <= period + jitter, "{d:?}");
        }
        assert_eq!(next_delay(period, jitter, 5000), period + jitter);
    }

    #[tokio::test]
    async fn stopped_resolves_on_the_signal_or_a_dropped_sender() {
        let (tx, mut rx) = watch::channel(false);
        tx.send(true).expect("send");
        stopped(&mut rx).await;
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        stopped(&mut rx).await;
    }
}
