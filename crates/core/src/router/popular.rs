//! Which leading blocks of a prompt are *shared*: contained in more than a fair share
//! (1/N, with N live workers) of the requests this router routed recently.
//!
//! A prefix that more than 1/N of the traffic contains cannot live on one worker without
//! drawing more than that worker's share of requests to it: it must be held by several
//! workers. A prefix that fewer requests contain (a conversation's history, one group's
//! system prompt among many) can live on one worker without unbalancing the cluster by
//! itself. The `ttft` picker's balance guard uses this to decide what a move may give up:
//! it may recompute a shared prefix on a less loaded worker (which replicates it), never a
//! private one (which would only be lost).
//!
//! Counts are kept in a count-min sketch (two rows of 2^16 counters indexed by different
//! bits of the block key; a key's count is the smaller of its two counters, which can only
//! overestimate), incremented for every full block of every routed prompt. Every
//! [`WINDOW`] routed requests all counters and the request total are halved, so the shares
//! describe about the last `2 x WINDOW` requests. 1,024: telling a share of 1/N from a
//! share near zero takes a few times N requests, and with N up to about 100 workers a
//! window of a thousand requests holds ten or more expected sightings of a shared block,
//! while at tens of requests per second it follows a change of traffic within a minute.
//! Collisions add about `blocks in the window / 2^16` to a count: with 500-block prompts
//! about 8 of the window's 1,024 requests, far below 1/N for N < 100.

use std::sync::atomic::{AtomicU32, Ordering};

/// Counters per row.
const SLOTS: usize = 1 << 16;
/// Requests between two halvings.
pub(crate) const WINDOW: u32 = 1_024;

/// The sketch (see the module documentation).
pub(crate) struct Popularity {
    rows: Box<[AtomicU32]>,
    /// Routed requests, decayed like the counters.
    total: AtomicU32,
    /// Requests since the last halving.
    since: AtomicU32,
    halving: parking_lot::Mutex<()>,
}

impl std::fmt::Debug for Popularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Popularity").field("total", &self.total).finish_non_exhaustive()
    }
}

impl Default for Popularity {
    fn default() -> Self {
        Popularity {
            rows: (0..2 * SLOTS).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU32::new(0),
            since: AtomicU32::new(0),
            halving: parking_lot::Mutex::new(()),
        }
    }
}

#[inline]
fn slots(key: u64) -> (usize, usize) {
    // Block keys are already hashes; mix once more so that keys differing only in high
    // bits do not share both slots.
    let h = crate::rng::splitmix64(key);
    ((h as usize) & (SLOTS - 1), SLOTS + ((h >> 32) as usize & (SLOTS - 1)))
}

impl Popularity {
    /// A request whose prompt has the full blocks `keys` was routed.
    ///
    /// The counters are bumped with a plain load and store, not an atomic add: a locked
    /// read-modify-write costs about 20 cycles, 1,024 of them for an 8,192-token prompt
    /// (in a perf profile of the `serve` bench this function took 3.7% of the samples,
    /// the whole route 5.2%).
    /// Two threads bumping the same counter at the same instant can lose one increment;
    /// the halving already races the same way. A lost increment undercounts a block by
    /// one request among the window's 1,024, which moves its share by 0.1%: the sketch
    /// answers "more than 1/N of recent requests", which is not that sharp.
    pub(crate) fn record(&self, keys: &[u64]) {
        for &k in keys {
            let (a, b) = slots(k);
            let (a, b) = (&self.rows[a], &self.rows[b]);
            a.store(a.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
            b.store(b.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.since.fetch_add(1, Ordering::Relaxed) + 1 >= WINDOW {
            if let Some(_g) = self.halving.try_lock() {
                if self.since.load(Ordering::Relaxed) >= WINDOW {
                    self.since.store(0, Ordering::Relaxed);
                    for c in self.rows.iter() {
                        let v = c.load(Ordering::Relaxed);
                        if v != 0 {
                            c.store(v / 2, Ordering::Relaxed);
                        }
                    }
                    let t = self.total.load(Ordering::Relaxed);
                    self.total.store(t / 2, Ordering::Relaxed);
                }
            }
        }
    }

    /// The (decayed) number of recent requests containing `key` (an overestimate).
    #[inline]
    pub(crate) fn count(&self, key: u64) -> u32 {
        let (a, b) = slots(key);
        self.rows[a].load(Ordering::Relaxed).min(self.rows[b].load(Ordering::Relaxed))
    }

    /// How many leading blocks of `keys` more than `1 / workers` of the recent requests
    /// contain (and at least two: a block one request brought is not shared yet), and the
    /// share of recent requests that contain the last of them (0 when there is none).
    /// A block's count never exceeds its parent's (every request containing a block
    /// contains its prefix), so the answer is found by bisection.
    pub(crate) fn shared_prefix(&self, keys: &[u64], workers: usize) -> (u32, f64) {
        let total = f64::from(self.total.load(Ordering::Relaxed));
        let need = (total / workers.max(1) as f64).max(1.0);
        let shared = |k: u64| f64::from(self.count(k)) > need;
        let (mut lo, mut hi) = (0usize, keys.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if shared(keys[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let share = match lo.checked_sub(1) {
            Some(i) if total > 0.0 => (f64::from(self.count(keys[i])) / total).min(1.0),
            _ => 0.0,
        };
        (lo as u32, share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_most_requests_contain_is_shared_a_private_one_is_not() {
        let p = Popularity::default();
        // 8 workers; every request carries the same 10-block system prompt, then 20
        // blocks of its own; one group of 40 requests (1/25 of them) also shares a
        // 5-block group prompt after the system prompt.
        let system: Vec<u64> = (0..10).map(|i| 1_000 + i).collect();
        let mut group_prompt = system.clone();
        group_prompt.extend(50_000..50_005);
        for r in 0..1_000u64 {
            let mut keys = if r % 25 == 0 { group_prompt.clone() } else { system.clone() };
            keys.extend((0..20).map(|i| 1_000_000 + r * 100 + i));
            p.record(&keys);
        }
        let mut probe = group_prompt.clone();
        probe.extend(9_000_000..9_000_020);
        // The system prompt is shared, the group prompt (4% < 1/8) and the rest are not.
        assert_eq!(p.shared_prefix(&probe, 8).0, 10);
        assert!(p.shared_prefix(&probe, 8).1 > 0.99);
        // With 30 workers 4% is more than a fair share (1/30): the group prompt is shared.
        let (n, share) = p.shared_prefix(&probe, 30);
        assert_eq!(n, 15);
        assert!((0.03..0.06).contains(&share), "{share}");
        // A prompt nobody sent shares nothing.
        assert_eq!(p.shared_prefix(&[7, 8, 9], 8), (0, 0.0));
        // Halving keeps the shares: the total stays within the window.
        assert!(p.total.load(Ordering::Relaxed) < 2 * WINDOW);
        assert!(p.count(system[9]) >= p.total.load(Ordering::Relaxed) - 1);
    }

    #[test]
    fn traffic_that_moves_on_is_forgotten() {
        let p = Popularity::default();
        let old: Vec<u64> = (0..8).collect();
        for _ in 0..2_000 {
            p.record(&old);
        }
        assert_eq!(p.shared_prefix(&old, 4).0, 8);
        // Then 10 windows of unrelated requests: the old prompt's share decays to nothing.
        for r in 0..10 * u64::from(WINDOW) {
            p.record(&[100 + r]);
        }
        assert_eq!(p.shared_prefix(&old, 4).0, 0);
    }
}
