//! What the router predicts between routing and the engines' reports: the *predicted
//! residency* overlay (precise mode) and the per-worker prefill-rate learner.
//!
//! # Predicted residency
//!
//! In precise mode the index only learns a block exists when the engine's `BlockStored`
//! event arrives, which is after the request's prefill (seconds under load). Until then a
//! second request with the same prefix would see nothing and could land anywhere. So when a
//! request is routed ([`Router::on_routed`](super::Router::on_routed)), the blocks it will
//! create on the chosen worker (its prompt blocks past the matched prefix) become
//! *predicted* there, in this overlay: never mixed into the event-fed index, read by the
//! request path after the index match, extending a worker's matched prefix.
//!
//! A prediction ends when:
//!
//! - that worker's events store the block (*confirmed*; the delay since routing is an
//!   observation of the worker's routing-to-event delay), or
//! - it is older than the worker's TTL (*expired*). The TTL adapts per worker: until the
//!   first confirmation it is the configured `ttl_s`; after that it is `mean + 4 x mean
//!   absolute deviation` of the observed delays (exponentially weighted, 1/16 per
//!   observation), bounded to `[min_ttl_s, max_ttl_s]`: a prediction lives a little longer
//!   than events usually take to confirm it, and no longer;
//! - the overlay holds `capacity` predictions and a newer one needs the room (oldest
//!   first: *dropped*).
//!
//! Hybrid mode has its own prediction (a block-pool model per worker feeding the index
//! until the worker's first events); the overlay is for precise mode, where events are the
//! only source of truth and predictions must never outlive them.
//!
//! # Prefill rates
//!
//! Each worker's prefill rate (tokens per second) is learned from the lifecycle calls the
//! host already makes: at [`on_routed`](super::Router::on_routed) the router notes the
//! prefill work ahead of the request on that worker (queued prompt tokens not yet
//! prefilled, plus the request's own uncached tokens) and at
//! [`on_first_token_at`](super::Router::on_first_token_at) the elapsed time. With a fixed
//! step overhead `o`, `elapsed = o + work / rate`, so the estimate is
//! `rate = (W0 + sum work_i) / (T0 + sum (elapsed_i - o))` over exponentially weighted
//! observations (1/64 per observation), where the prior `(W0, T0)` is one second of the
//! *pool's* rate, decaying like an observation (it keeps the estimate defined while a
//! worker has had few requests, and fades once it has its own). The pool's rate is the
//! same estimate over every worker's observations, from one second of the configured
//! default rate; a worker not observed yet is assumed to be as fast as the pool (workers
//! behind one router are usually alike; an unobserved worker priced at the configured
//! default would look slower than observed ones, never be chosen, and never be
//! observed). The rate includes what slows prefill down on a busy engine (decode steps
//! batched with it), which is what a time-to-first-token prediction needs.

use crate::types::BlockKey;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Configuration of the predicted-residency overlay (precise mode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictionConfig {
    /// Whether routed requests' blocks are predicted on their worker (precise mode, with
    /// the `ttft` picker of the `kvroute` preset; other profiles keep their behaviour).
    pub enabled: bool,
    /// TTL of a prediction before the worker's first confirmation, seconds (2 s, llm-d's
    /// fixed speculative-entry TTL).
    pub ttl_s: f64,
    /// Lower bound of the adaptive TTL, seconds (0.1 s: below a few engine steps a
    /// prediction is useless).
    pub min_ttl_s: f64,
    /// Upper bound of the adaptive TTL, seconds (120 s: a prefill queued longer than that
    /// means the worker is overloaded, and its predictions should not attract more).
    pub max_ttl_s: f64,
    /// Most predictions held at once (oldest dropped first). Each costs about 64 bytes.
    pub capacity: usize,
}

impl Default for PredictionConfig {
    fn default() -> Self {
        PredictionConfig {
            enabled: true,
            ttl_s: 2.0,
            min_ttl_s: 0.1,
            max_ttl_s: 120.0,
            capacity: 1 << 20,
        }
    }
}

impl PredictionConfig {
    /// Checks the values.
    pub fn validate(&self) -> crate::Result<()> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !(ok(self.ttl_s) && ok(self.min_ttl_s) && ok(self.max_ttl_s)) {
            return Err(crate::Error::config(
                "predictions: ttl_s, min_ttl_s and max_ttl_s must be positive and finite",
            ));
        }
        if self.min_ttl_s > self.max_ttl_s {
            return Err(crate::Error::config("predictions: min_ttl_s exceeds max_ttl_s"));
        }
        if self.capacity == 0 {
            return Err(crate::Error::config("predictions: capacity must be positive"));
        }
        Ok(())
    }
}

/// Counters of the overlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredictionCounters {
    /// Predictions made (a block newly predicted on a worker).
    pub made: u64,
    /// Predictions ended by a covering `BlockStored` event of their worker.
    pub confirmed: u64,
    /// Predictions ended by their TTL.
    pub expired: u64,
    /// Predictions dropped to stay under the capacity.
    pub dropped: u64,
}

/// The overlay: `(worker, block) -> creation time`, with a FIFO for expiry and the cap.
///
/// Expired predictions are kept a while longer as *tombstones* (invisible to routes): a
/// covering event that arrives after the TTL is still an observation of the worker's
/// delay. Without it the TTL would learn only from the delays shorter than itself and
/// shrink towards its lower bound.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    map: HashMap<(u32, BlockKey), u64>,
    /// How many workers `map` predicts each block on: a route asks once per distinct
    /// match length whether anyone predicts the next block, instead of probing `map` for
    /// each of its workers (almost always a miss).
    holders: HashMap<BlockKey, u32>,
    /// Insertion order; entries whose time no longer matches the map are stale (the block
    /// was predicted again, confirmed or expired) and skipped.
    fifo: VecDeque<(u32, BlockKey, u64)>,
    /// Expired predictions, by expiry order (bounded like the live ones).
    tombs: HashMap<(u32, BlockKey), u64>,
    tomb_fifo: VecDeque<(u32, BlockKey, u64)>,
    pub(crate) counters: PredictionCounters,
}

/// One worker fewer predicts `key` (the entry goes at zero).
fn release(holders: &mut HashMap<BlockKey, u32>, key: BlockKey) {
    if let hashbrown::hash_map::Entry::Occupied(mut e) = holders.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

impl Overlay {
    /// Predictions held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is predicted.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `key` is predicted on any worker (TTLs aside); when
    /// not, [`extend`](Self::extend) from a match ending just before `key` changes
    /// nothing for any worker.
    #[inline]
    pub(crate) fn predicted_anywhere(&self, key: BlockKey) -> bool {
        self.holders.contains_key(&key)
    }

    fn held(&mut self, key: BlockKey) {
        *self.holders.entry(key).or_insert(0) += 1;
    }

    fn released(&mut self, key: BlockKey) {
        release(&mut self.holders, key);
    }

    /// Extends `matched` (a prefix length of `keys` already held by `worker`) over the
    /// blocks predicted on `worker` and still within `ttl_ms` at `now_ms`.
    pub(crate) fn extend(
        &self,
        worker: u32,
        keys: &[BlockKey],
        mut matched: usize,
        now_ms: u64,
        ttl_ms: u64,
    ) -> usize {
        while let Some(&k) = keys.get(matched) {
            match self.map.get(&(worker, k)) {
                Some(&t) if now_ms.saturating_sub(t) <= ttl_ms => matched += 1,
                _ => break,
            }
        }
        matched
    }

    /// Predicts `keys` on `worker` at `now_ms`, then expires what is due and drops the
    /// oldest beyond `capacity`. `ttl_ms(worker)` gives each worker's current TTL.
    pub(crate) fn insert(
        &mut self,
        worker: u32,
        keys: &[BlockKey],
        now_ms: u64,
        capacity: usize,
        ttl_ms: impl Fn(u32) -> u64,
    ) {
        for &k in keys {
            if self.map.insert((worker, k), now_ms).is_none() {
                self.counters.made += 1;
                self.held(k);
            }
            self.fifo.push_back((worker, k, now_ms));
        }
        // Expire from the front while the oldest live entry is past its worker's TTL.
        while let Some(&(w, k, t)) = self.fifo.front() {
            let live = self.map.get(&(w, k)) == Some(&t);
            if !live {
                self.fifo.pop_front();
            } else if now_ms.saturating_sub(t) > ttl_ms(w) {
                self.map.remove(&(w, k));
                self.released(k);
                self.counters.expired += 1;
                self.fifo.pop_front();
                self.tombs.insert((w, k), t);
                self.tomb_fifo.push_back((w, k, t));
            } else {
                break;
            }
        }
        while self.tomb_fifo.len() > capacity {
            if let Some((w, k, t)) = self.tomb_fifo.pop_front() {
                if self.tombs.get(&(w, k)) == Some(&t) {
                    self.tombs.remove(&(w, k));
                }
            }
        }
        // The cap: the FIFO (live and stale entries) bounds the memory.
        while self.fifo.len() > capacity {
            if let Some((w, k, t)) = self.fifo.pop_front() {
                if self.map.get(&(w, k)) == Some(&t) {
                    self.map.remove(&(w, k));
                    self.released(k);
                    self.counters.dropped += 1;
                }
            }
        }
    }

    /// `worker`'s events stored `keys` at `now_ms`: the predictions they cover end
    /// (confirmed). Calls `observe(delay_ms)` for each confirmed one.
    pub(crate) fn confirm(
        &mut self,
        worker: u32,
        keys: &[BlockKey],
        now_ms: u64,
        mut observe: impl FnMut(u64),
    ) {
        if self.map.is_empty() && self.tombs.is_empty() {
            return;
        }
        for &k in keys {
            if let Some(t) = self.map.remove(&(worker, k)) {
                self.released(k);
                self.counters.confirmed += 1;
                observe(now_ms.saturating_sub(t));
            } else if let Some(t) = self.tombs.remove(&(worker, k)) {
                observe(now_ms.saturating_sub(t));
            }
        }
    }

    /// Forgets every prediction for `worker` (removed or cleared).
    pub(crate) fn clear_worker(&mut self, worker: u32) {
        let holders = &mut self.holders;
        self.map.retain(|&(w, k), _| {
            if w != worker {
                return true;
            }
            release(holders, k);
            false
        });
        self.tombs.retain(|&(w, _), _| w != worker);
    }

    /// Whether there is nothing to confirm (no prediction, no tombstone).
    pub(crate) fn nothing_to_confirm(&self) -> bool {
        self.map.is_empty() && self.tombs.is_empty()
    }

    /// Entries in the FIFO, live or stale (what the cap bounds).
    #[cfg(test)]
    pub(crate) fn fifo_len(&self) -> usize {
        self.fifo.len()
    }
}

/// How far a worker's learned prefill rate must be from the pool's (as a factor, either
/// way) before routing prices it at its own rate rather than the pool's: 2. Hardware that
/// changes the prefill rate comes in steps of about that much or more (tensor parallelism
/// doubled, a GPU generation: A100 to H100 is about 3x in dense BF16 FLOP/s), while a
/// worker's observations also carry work the router cannot see, which differs from worker
/// to worker because of routing itself: the requests of other router replicas (with 4
/// replicas the learned rates of identical simulated workers spread from 0.6x to 1.4x of
/// their pool's; docs/simulation.md), preemptions, decode steps. Routing on those
/// differences moved requests away from the prefixes they held.
pub(crate) const DISTINCT_RATE_FACTOR: f64 = 2.0;

/// The prefill rate routing uses for a worker whose learned rate is `own` (NaN: not
/// observed yet) in a pool whose rate is `pool`: its own when it differs from the pool's
/// by more than [`DISTINCT_RATE_FACTOR`] (different hardware), otherwise the pool's.
pub(crate) fn routing_rate(own: f64, pool: f64) -> f64 {
    if own.is_nan() {
        return pool;
    }
    if !(pool.is_finite() && pool > 0.0) {
        return own;
    }
    if own > pool * DISTINCT_RATE_FACTOR || own * DISTINCT_RATE_FACTOR < pool {
        own
    } else {
        pool
    }
}

/// Per-worker learned figures: the routing-to-event delay (for the TTL) and the prefill
/// rate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Learner {
    /// Exponentially weighted mean of the routing-to-event delay, ms (NaN: none yet).
    delay_mean_ms: f64,
    /// Exponentially weighted mean absolute deviation of that delay, ms.
    delay_dev_ms: f64,
    /// Decayed sums of prefill work (tokens) and prefill time (seconds).
    work: f64,
    time: f64,
    /// Seconds the prior is still worth (it decays like an observation).
    prior_s: f64,
    /// Decayed sums for the least-squares line `time = fixed + work / rate`: weight,
    /// work, time, work squared, work x time.
    fit: [f64; 5],
    /// Observations of the prefill rate so far.
    pub(crate) rate_samples: u64,
}

/// Weight of a new delay observation.
const DELAY_ALPHA: f64 = 1.0 / 16.0;
/// Deviations added to the mean delay for the TTL.
const DELAY_DEVS: f64 = 4.0;
/// Decay of the rate sums per observation (a memory of about 64 requests).
const RATE_DECAY: f64 = 1.0 - 1.0 / 64.0;
/// Seconds of the default rate the prior is worth.
const RATE_PRIOR_S: f64 = 1.0;
/// Observations (decayed weight) before the marginal rate is fitted: a line through
/// fewer points than this is mostly noise.
const FIT_MIN_SAMPLES: f64 = 16.0;
/// Spread of the work (coefficient of variation) the fit needs: with prompts of nearly
/// one size the slope is undetermined and the ratio of the sums is the rate.
const FIT_MIN_CV: f64 = 0.25;

impl Learner {
    pub(crate) fn new() -> Self {
        Learner {
            delay_mean_ms: f64::NAN,
            delay_dev_ms: 0.0,
            work: 0.0,
            time: 0.0,
            prior_s: RATE_PRIOR_S,
            fit: [0.0; 5],
            rate_samples: 0,
        }
    }

    /// A routing-to-event delay was observed.
    pub(crate) fn observe_delay(&mut self, delay_ms: f64) {
        if self.delay_mean_ms.is_nan() {
            self.delay_mean_ms = delay_ms;
            self.delay_dev_ms = delay_ms / 2.0;
        } else {
            let dev = (delay_ms - self.delay_mean_ms).abs();
            self.delay_mean_ms += DELAY_ALPHA * (delay_ms - self.delay_mean_ms);
            self.delay_dev_ms += DELAY_ALPHA * (dev - self.delay_dev_ms);
        }
    }

    /// The prediction TTL, ms, within the configured bounds.
    pub(crate) fn ttl_ms(&self, cfg: &PredictionConfig) -> u64 {
        let s = if self.delay_mean_ms.is_nan() {
            cfg.ttl_s
        } else {
            (self.delay_mean_ms + DELAY_DEVS * self.delay_dev_ms) / 1e3
        };
        (s.clamp(cfg.min_ttl_s, cfg.max_ttl_s) * 1e3) as u64
    }

    /// A prefill of `work_tokens` (queued ahead plus its own) took `prefill_s` seconds
    /// (elapsed minus the step overhead).
    pub(crate) fn observe_prefill(&mut self, work_tokens: f64, prefill_s: f64) {
        if !(work_tokens > 0.0 && prefill_s.is_finite()) {
            return;
        }
        // An engine step cannot be shorter than a millisecond; a smaller figure is a clock
        // artefact (both calls in one tick).
        let t = prefill_s.max(1e-3);
        self.work = self.work * RATE_DECAY + work_tokens;
        self.time = self.time * RATE_DECAY + t;
        self.prior_s *= RATE_DECAY;
        let f = &mut self.fit;
        for (v, x) in
            f.iter_mut().zip([1.0, work_tokens, t, work_tokens * work_tokens, work_tokens * t])
        {
            *v = *v * RATE_DECAY + x;
        }
        self.rate_samples += 1;
    }

    /// The prefill rate, tokens per second, from `prior` (tokens/s) worth one second at
    /// first and decaying like an observation (so a well-observed worker's rate is its
    /// own, not pulled towards a configured figure).
    pub(crate) fn rate(&self, prior: f64) -> f64 {
        if let Some(r) = self.marginal_rate() {
            return r;
        }
        (prior * self.prior_s + self.work) / (self.prior_s + self.time)
    }

    /// The marginal prefill rate: the slope of the least-squares line `time = fixed +
    /// work / rate` through the observations, when they determine it (enough of them, and
    /// work that varies: a coefficient of variation of at least [`FIT_MIN_CV`]) and the
    /// line is physical (a positive rate, a non-negative fixed time). A prefill's time is
    /// not proportional to its work: every request also waits for the step in progress
    /// and the decode work of the steps it spans, the same for a short prompt as for a
    /// long one, so the ratio of the sums prices long prompts at the rate of short ones
    /// (on the Mooncake trace half the engine's rate: a 120 k-token prefill predicted at
    /// 17 s instead of 9 s).
    fn marginal_rate(&self) -> Option<f64> {
        let [n, sx, sy, sxx, sxy] = self.fit;
        if n < FIT_MIN_SAMPLES {
            return None;
        }
        let (mx, my) = (sx / n, sy / n);
        let var = sxx / n - mx * mx;
        if var.is_nan() || var <= (FIT_MIN_CV * mx).powi(2) {
            return None;
        }
        let slope = (sxy / n - mx * my) / var;
        let fixed = my - slope * mx;
        (slope > 0.0 && fixed >= 0.0).then(|| 1.0 / slope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_prices_a_worker_at_its_own_rate_only_when_it_is_distinct() {
        // Within a factor 2 of the pool's rate: the pool's.
        assert_eq!(routing_rate(6_000.0, 7_000.0), 7_000.0);
        assert_eq!(routing_rate(13_000.0, 7_000.0), 7_000.0);
        assert_eq!(routing_rate(3_600.0, 7_000.0), 7_000.0);
        // Beyond it (other hardware): its own, either way.
        assert_eq!(routing_rate(3_000.0, 7_000.0), 3_000.0);
        assert_eq!(routing_rate(15_000.0, 7_000.0), 15_000.0);
        // Not observed yet: the pool's; no usable pool rate: its own.
        assert_eq!(routing_rate(f64::NAN, 7_000.0), 7_000.0);
        assert_eq!(routing_rate(5_000.0, f64::NAN), 5_000.0);
    }

    /// `holders` recomputed from `map` (the naive definition).
    fn naive_holders(o: &Overlay) -> HashMap<BlockKey, u32> {
        let mut h = HashMap::new();
        for &(_, k) in o.map.keys() {
            *h.entry(k).or_insert(0) += 1;
        }
        h
    }

    #[test]
    fn overlay_holder_counts_follow_every_change() {
        let mut o = Overlay::default();
        let mut rng = crate::rng::SplitMix64::new(7);
        for step in 0..4_000u64 {
            let w = (rng.next_u64() % 5) as u32;
            let start = rng.next_u64() % 12;
            let keys: Vec<u64> = (start..start + 1 + rng.next_u64() % 4).collect();
            match rng.next_u64() % 10 {
                0..=5 => o.insert(w, &keys, step, 40, |w| 20 + u64::from(w) * 30),
                6..=8 => o.confirm(w, &keys, step, |_| {}),
                _ => o.clear_worker(w),
            }
            assert_eq!(o.holders, naive_holders(&o), "step {step}");
            for k in 0..16 {
                let anyone = (0..5).any(|w| o.map.contains_key(&(w, k)));
                assert_eq!(o.predicted_anywhere(k), anyone);
            }
        }
        assert!(o.counters.expired > 0 && o.counters.dropped > 0 && o.counters.confirmed > 0);
    }

    #[test]
    fn overlay_extends_expires_confirms_and_caps() {
        let mut o = Overlay::default();
        let keys: Vec<u64> = (1..=6).collect();
        o.insert(0, &keys[..4], 1_000, 100, |_| 500);
        assert_eq!(o.counters.made, 4);
        // Visible to worker 0 only, from any matched start, within the TTL.
        assert_eq!(o.extend(0, &keys, 0, 1_200, 500), 4);
        assert_eq!(o.extend(0, &keys, 2, 1_200, 500), 4);
        assert_eq!(o.extend(1, &keys, 0, 1_200, 500), 0);
        assert_eq!(o.extend(0, &keys, 0, 1_501, 500), 0, "past its TTL");
        // Confirmed by a covering store: gone, delay observed.
        let mut delays = Vec::new();
        o.confirm(0, &keys[..2], 1_300, |d| delays.push(d));
        assert_eq!(delays, vec![300, 300]);
        assert_eq!(o.counters.confirmed, 2);
        assert_eq!(o.extend(0, &keys, 0, 1_300, 500), 0);
        assert_eq!(o.extend(0, &keys, 2, 1_300, 500), 4);
        // A later insert expires what is past its TTL.
        o.insert(1, &keys[4..5], 2_000, 100, |_| 500);
        assert_eq!(o.counters.expired, 2);
        assert_eq!(o.len(), 1);
        // The cap under a flood of unique blocks.
        for i in 0..10_000u64 {
            o.insert(2, &[1_000 + i], 2_000, 64, |_| 1_000_000);
            assert!(o.fifo_len() <= 64 && o.len() <= 64);
        }
        assert_eq!(o.counters.made, 4 + 1 + 10_000);
        assert!(o.counters.dropped >= 10_000 - 64);
        o.clear_worker(2);
        assert!(o.is_empty());
    }

    #[test]
    fn the_rate_is_the_slope_of_time_against_work() {
        // Every prefill waits 0.3 s besides its work at 12,000 tokens/s, prompts of 1 k to
        // 20 k tokens: the ratio of the sums says ~9,000 tokens/s, the slope 12,000.
        let mut l = Learner::new();
        let mut g = crate::rng::SplitMix64::new(5);
        let (mut work, mut time) = (0.0, 0.0);
        for _ in 0..400 {
            let w = 1_000.0 + g.below(19_000) as f64;
            l.observe_prefill(w, 0.3 + w / 12_000.0);
            work += w;
            time += 0.3 + w / 12_000.0;
        }
        assert!((l.rate(10_000.0) - 12_000.0).abs() < 1.0, "{}", l.rate(10_000.0));
        assert!(work / time < 9_500.0);
        // Prompts of one size: the slope is undetermined, the ratio of the sums stands
        // (with the prior decayed away).
        let mut l = Learner::new();
        for _ in 0..1_000 {
            l.observe_prefill(8_000.0, 1.0);
        }
        assert!((l.rate(10_000.0) - 8_000.0).abs() < 1.0, "{}", l.rate(10_000.0));
        // A line with a negative fixed time is not physical: the ratio stands.
        let mut l = Learner::new();
        for i in 0..400 {
            let w = 1_000.0 + 100.0 * f64::from(i % 100);
            l.observe_prefill(w, (w / 10_000.0 - 0.05).max(0.001));
        }
        let ratio = l.rate(10_000.0);
        assert!(ratio > 10_000.0 && ratio < 12_000.0, "{ratio}");
    }

    #[test]
    fn ttl_follows_observed_delays_within_bounds() {
        let cfg = PredictionConfig::default();
        let mut l = Learner::new();
        assert_eq!(l.ttl_ms(&cfg), 2_000);
        for _ in 0..200 {
            l.observe_delay(300.0);
        }
        assert!((300..=320).contains(&l.ttl_ms(&cfg)), "{}", l.ttl_ms(&cfg));
        for _ in 0..200 {
            l.observe_delay(1e9);
        }
        assert_eq!(l.ttl_ms(&cfg), 120_000);
        let mut l = Learner::new();
        l.observe_delay(1.0);
        for _ in 0..100 {
            l.observe_delay(0.0);
        }
        assert_eq!(l.ttl_ms(&cfg), 100);
    }
}
