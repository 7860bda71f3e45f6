//! Which snapshots to delete: every verified snapshot taken within
//! `keep_all_within`, the newest of each of the `keep_hourly` newest hours
//! and of the `keep_daily` newest days that have one, and always the newest
//! verified snapshot, whatever the policy says (a cluster whose backups
//! stopped must not lose its last one to the passing of time). Pure: the
//! leader lists the bucket, asks this, and deletes what it answers.

use std::collections::BTreeSet;
use std::time::Duration;

/// The retention tiers, from `[backup]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub keep_all_within: Duration,
    pub keep_hourly: u32,
    pub keep_daily: u32,
}

/// One snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The snapshot object's key (its manifest is `<key>.json`).
    pub key: String,
    /// When it was taken (Unix seconds, from its key).
    pub taken_at: u64,
    /// Its manifest exists: the upload completed and the stream verified.
    pub verified: bool,
}

/// How old an unverified object must be before it is deleted: a snapshot
/// whose upload completed but whose manifest write failed. Never one that
/// may still be getting its manifest written.
pub const UNVERIFIED_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The keys of the snapshots to delete, oldest first.
pub fn plan(listed: &[Listed], now: u64, policy: Policy) -> Vec<String> {
    let mut verified: Vec<&Listed> = listed.iter().filter(|l| l.verified).collect();
    // Newest first; the key breaks ties so the answer never depends on
    // listing order.
    verified.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then(b.key.cmp(&a.key)));
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    if let Some(newest) = verified.first() {
        keep.insert(&newest.key);
    }
    let within = policy.keep_all_within.as_secs();
    for l in &verified {
        if now.saturating_sub(l.taken_at) < within {
            keep.insert(&l.key);
        }
    }
    for (period, count) in [(3600, policy.keep_hourly), (86_400, policy.keep_daily)] {
        let mut periods_seen = BTreeSet::new();
        for l in &verified {
            if periods_seen.len() >= count as usize
                && !periods_seen.contains(&(l.taken_at / period))
            {
                break;
            }
            // The first (newest) snapshot of each period is its keeper.
            if periods_seen.insert(l.taken_at / period) {
                keep.insert(&l.key);
            }
        }
    }
    let mut delete: Vec<&Listed> = listed
        .iter()
        .filter(|l| {
            if l.verified {
                !keep.contains(l.key.as_str())
            } else {
                now.saturating_sub(l.taken_at) >= UNVERIFIED_GRACE.as_secs()
            }
        })
        .collect();
    delete.sort_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.key.cmp(&b.key)));
    delete.into_iter().map(|l| l.key.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;
    /// 2026-12-04T00:00:00Z.
    const NOW: u64 = 1_796_342_400;

    fn at(ago: u64) -> Listed {
        Listed {
            key: format!("snap-{}", NOW - ago),
            taken_at: NOW - ago,
            verified: true,
        }
    }

    fn policy(all_h: u64, hourly: u32, daily: u32) -> Policy {
        Policy {
            keep_all_within: Duration::from_secs(all_h * HOUR),
            keep_hourly: hourly,
            keep_daily: daily,
        }
    }

    fn kept(listed: &[Listed], p: Policy) -> Vec<u64> {
        let gone = plan(listed, NOW, p);
        let mut ages: Vec<u64> = listed
            .iter()
            .filter(|l| !gone.contains(&l.key))
            .map(|l| NOW - l.taken_at)
            .collect();
        ages.sort();
        ages
    }

    #[test]
    fn every_snapshot_of_the_last_hours_then_one_an_hour_then_one_a_day() {
        // A backup every 15 minutes for ten days, the newest a second ago
        // (so hours and days start cleanly at multiples of 3600 s ago).
        let listed: Vec<Listed> = (0..10 * 96).map(|i| at(i * 900 + 1)).collect();
        let ages = kept(&listed, policy(2, 6, 3));
        // Everything younger than 2 h: 8 snapshots.
        let mut want: Vec<u64> = (0..8).map(|i| i * 900 + 1).collect();
        // The newest of each of the 6 newest hours.
        want.extend((0..6).map(|h| h * HOUR + 1));
        // The newest of each of the 3 newest days.
        want.extend((0..3).map(|d| d * DAY + 1));
        want.sort();
        want.dedup();
        assert_eq!(ages, want);
    }

    #[test]
    fn the_newest_verified_snapshot_is_never_deleted_even_by_a_policy_of_nothing() {
        let listed = vec![at(40 * DAY), at(41 * DAY)];
        assert_eq!(kept(&listed, policy(0, 0, 0)), vec![40 * DAY]);
        assert_eq!(plan(&[], NOW, policy(0, 0, 0)), Vec::<String>::new());
    }

    #[test]
    fn unverified_objects_go_after_a_day_and_never_count_as_the_newest() {
        let mut fresh = at(HOUR);
        fresh.verified = false;
        let mut stale = at(2 * DAY);
        stale.verified = false;
        let listed = vec![fresh.clone(), stale.clone(), at(3 * DAY), at(4 * DAY)];
        let gone = plan(&listed, NOW, policy(0, 0, 0));
        // The newest *verified* one (3 days) stays; the fresh unverified one
        // may still be getting its manifest.
        assert_eq!(gone, vec![at(4 * DAY).key, stale.key]);
    }

    #[test]
    fn the_answer_does_not_depend_on_listing_order() {
        let listed: Vec<Listed> = (0..200).map(|i| at(i * 1800 + (i % 7))).collect();
        let mut reversed = listed.clone();
        reversed.reverse();
        let p = policy(3, 12, 5);
        assert_eq!(plan(&listed, NOW, p), plan(&reversed, NOW, p));
    }
}
