//! The tail of this router's observed times to first token: a percentile (the `ttft`
//! picker's `tail_quantile`, 0.99 by default) of the last [`WINDOW`] requests'
//! routing-to-first-token times (`on_routed` -> `on_first_token_at`), for the `ttft`
//! picker's history rules.
//!
//! Latency objectives are stated as percentiles (MLPerf Inference constrains an LLM
//! server's TTFT at its 99th percentile; the llm-d benchmarks and this project's acceptance
//! report p90 as well): a request whose TTFT stays below the tail costs nothing against
//! them, a recompute costs compute. The picker therefore keeps a request
//! on the worker that holds its private history while the predicted TTFT there is within
//! this tail. The window is the popularity sketch's (about a thousand requests: a minute
//! or less of traffic at tens of requests per second; at p99 about ten observations lie
//! above the percentile), and the percentile is recomputed every [`EVERY`] observations
//! (a selection over the window, a few microseconds), by nearest rank.

use std::sync::atomic::{AtomicU64, Ordering};

/// Observations kept.
pub(crate) const WINDOW: usize = 1_024;
/// Observations between two recomputations (and before the first).
pub(crate) const EVERY: usize = 64;
/// The ring of observations and the current percentile.
#[derive(Debug)]
pub(crate) struct Tail {
    /// The percentile, a fraction in `(0, 1]`.
    q: f64,
    ring: parking_lot::Mutex<Ring>,
    /// The percentile, seconds (f64 bits); 0: not enough observations yet.
    bits: AtomicU64,
}

#[derive(Debug, Default)]
struct Ring {
    xs: Vec<f32>,
    next: usize,
    since: usize,
    scratch: Vec<f32>,
}

impl Tail {
    /// A tail at percentile `q`, a fraction in `(0, 1]` (`TtftPolicy::validate` checks it;
    /// any other value still selects a rank within the window, clamped).
    pub(crate) fn new(q: f64) -> Self {
        Tail { q, ring: Default::default(), bits: AtomicU64::new(0) }
    }

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
            let k = ((scratch.len() as f64 * self.q).ceil() as usize).clamp(1, scratch.len()) - 1;
            let (_, v, _) = scratch.select_nth_unstable_by(k, f32::total_cmp);
            self.bits.store(f64::from(*v).to_bits(), Ordering::Relaxed);
        }
    }

    /// The percentile of the window, seconds; 0 before [`EVERY`] observations.
    pub(crate) fn value_s(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest-rank percentile of `xs`, sorted naively: the reference.
    fn nearest_rank(xs: &[f64], q: f64) -> f64 {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    }

    #[test]
    fn the_tail_is_the_nearest_rank_p90_of_the_window() {
        let t = Tail::new(0.9);
        for i in 0..EVERY - 1 {
            t.observe(i as f64);
        }
        assert_eq!(t.value_s(), 0.0, "not enough observations");
        t.observe(63.0);
        // 0..=63: nearest rank ceil(0.9 x 64) = 58th value = 57.
        assert_eq!(t.value_s(), 57.0);
        // The window forgets: 1,024 observations of 1 s replace everything.
        for _ in 0..WINDOW {
            t.observe(1.0);
        }
        assert_eq!(t.value_s(), 1.0);
        t.observe(f64::NAN);
        assert_eq!(t.value_s(), 1.0);
    }

    #[test]
    fn every_quantile_matches_a_sorted_reference_over_the_full_window() {
        // A scrambled permutation of 0..2048 ms: the ring keeps the last 1,024.
        let xs: Vec<f64> = (0..2 * WINDOW as u64)
            .map(|i| ((i * 1_103) % (2 * WINDOW as u64)) as f64 / 1000.0)
            .collect();
        for q in [0.5, 0.9, 0.95, 0.99, 1.0] {
            let t = Tail::new(q);
            for &x in &xs {
                t.observe(x);
            }
            let want = nearest_rank(&xs[xs.len() - WINDOW..], q);
            assert_eq!(t.value_s(), f64::from(want as f32), "q = {q}");
        }
        // p99 of 1,024: the 1,014th value, so ten observations lie above it.
        let t = Tail::new(0.99);
        for i in 0..WINDOW {
            t.observe(i as f64);
        }
        assert_eq!(t.value_s(), 1_013.0);
    }
}
