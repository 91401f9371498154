//! The tail of this router's observed times to first token: the 90th percentile of the
//! last [`WINDOW`] requests' routing-to-first-token times (`on_routed` ->
//! `on_first_token_at`), for the `ttft` picker's history rule.
//!
//! Latency objectives are stated as percentiles (TTFT p90 or p99; the llm-d benchmarks and
//! this project's acceptance report p90): a request whose TTFT stays below the tail costs
//! nothing against them, a recompute costs compute. The picker therefore keeps a request
//! on the worker that holds its private history while the predicted TTFT there is within
//! this tail. The window is the popularity sketch's (about a thousand requests: a minute
//! or less of traffic at tens of requests per second), and the percentile is recomputed
//! every [`EVERY`] observations (a selection over the window, a few microseconds).

use std::sync::atomic::{AtomicU64, Ordering};

/// Observations kept.
pub(crate) const WINDOW: usize = 1_024;
/// Observations between two recomputations (and before the first).
pub(crate) const EVERY: usize = 64;
/// The percentile.
const Q: f64 = 0.9;

/// The ring of observations and the current percentile.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    ring: parking_lot::Mutex<Ring>,
    /// The percentile, seconds (f64 bits); 0: not enough observations yet.
    p90_bits: AtomicU64,
}

#[derive(Debug, Default)]
struct Ring {
    xs: Vec<f32>,
    next: usize,
    since: usize,
    scratch: Vec<f32>,
}

impl Tail {
    /// A request's time to first token, seconds.
    pub(crate) fn observe(&self, secs: f64) {
        if !(secs.is_finite() && secs >= 0.0) {
            return;
        }
        let mut r = self.ring.lock();
        if r.xs.len() < WINDOW {
            r.xs.push(secs as f32);
        } else {
            let i = r.next;
            r.xs[i] = secs as f32;
        }
        r.next = (r.next + 1) % WINDOW;
        r.since += 1;
        if r.since >= EVERY {
            r.since = 0;
            let Ring { xs, scratch, .. } = &mut *r;
            scratch.clear();
            scratch.extend_from_slice(xs);
            let k = ((scratch.len() as f64 * Q).ceil() as usize).clamp(1, scratch.len()) - 1;
            let (_, v, _) = scratch.select_nth_unstable_by(k, f32::total_cmp);
            self.p90_bits.store(f64::from(*v).to_bits(), Ordering::Relaxed);
        }
    }

    /// The 90th percentile of the window, seconds; 0 before [`EVERY`] observations.
    pub(crate) fn p90_s(&self) -> f64 {
        f64::from_bits(self.p90_bits.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_nearest_rank_p90_of_the_window() {
        let t = Tail::default();
        for i in 0..EVERY - 1 {
            t.observe(i as f64);
        }
        assert_eq!(t.p90_s(), 0.0, "not enough observations");
        t.observe(63.0);
        // 0..=63: nearest rank ceil(0.9 x 64) = 58th value = 57.
        assert_eq!(t.p90_s(), 57.0);
        // The window forgets: 1,024 observations of 1 s replace everything.
        for _ in 0..WINDOW {
            t.observe(1.0);
        }
        assert_eq!(t.p90_s(), 1.0);
        t.observe(f64::NAN);
        assert_eq!(t.p90_s(), 1.0);
    }
}
