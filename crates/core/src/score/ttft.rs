//! The `ttft` picker: each candidate's predicted time to first token, in seconds, with a
//! balance guard and near-ties going to the less loaded worker.
//!
//! Per candidate `w` (after the filters):
//!
//! - `cached = min(matched_blocks x block_size, prompt_tokens - 1)` (vLLM recomputes the
//!   last token), `uncached = prompt_tokens - cached`;
//! - `rate` = the rate the router prices the worker at (`Load::prefill_tokens_per_s`,
//!   tokens/s: the pool's learned rate, or the worker's own when it differs from the
//!   pool's by more than a factor 2; the configured default when the router has none);
//! - `queue_s = pending_prefill_tokens / rate`: the prefill work already queued or running
//!   there, never stale (the router's own in-flight requests, or the scraped queue plus
//!   what it routed since the scrape, whichever is larger);
//! - `ttft_s = step_overhead_s + queue_s + uncached / rate`, the predicted time to first
//!   token; `saved_s = cached / rate` is what the match is worth;
//! - `cost_s = ttft_s + externality x uncached / rate`: the request's own prefill also
//!   delays the request that queues behind it on that worker (`externality` = 1), so work
//!   that a cache hit avoids counts for both. Without this term the choice is greedy for
//!   the request alone, and under load it recomputes a long shared prefix on an emptier
//!   worker, which adds work for everyone (measured in docs/simulation.md);
//! - memory (session 4): a candidate that holds less of the request than the best holder,
//!   beyond its `shared_blocks`, pays `externality x given-up tokens / rate` once more
//!   (the private history left behind, a conversation's earlier turns, is lost to its next
//!   reader and written a second time here); and a candidate whose cache turns over
//!   faster than the candidates' mean (`Load::eviction_horizon_s`, cached blocks over
//!   blocks stored per second, from its KV events) pays its own prefill's externality
//!   times `turnover / mean turnover - 1` more (a block written there evicts younger
//!   history). Nobody evicting, or a prefix everyone shares: unchanged.
//! - history within the tail (session 5): while the cheapest holder of the longest match
//!   predicts a TTFT within the router's recent TTFT tail (`RequestInfo::tail_ttft_s`, the
//!   `tail_quantile` of its observed routing-to-first-token times: p99 by default, p90
//!   before session 10), or while the candidate itself would not bring the request
//!   within it, a candidate that would give up private blocks (beyond `shared_blocks`)
//!   is priced two tie tolerances above that holder: latency
//!   objectives are percentiles, a move that leaves the request on the same side of the
//!   tail does not change them, and the recompute is certain.
//! - a move out of the tail buys only the time above it (session 6, rule 11,
//!   `out_of_tail_move_pays`): a candidate within the tail that would take the request
//!   out of it, away from that holder, keeps its cost only when its compute charges
//!   (`cost_s - ttft_s`) are below the holder's time above the tail plus the holder's own
//!   charges; otherwise it is priced as above. The holder's TTFT below the tail is worth
//!   nothing to a percentile objective either.
//!
//! The cheapest candidate wins; candidates within `tie_s` of it are near-ties (default:
//! one step overhead, the granularity at which an engine finishes prefills) and go to the
//! fewest active requests, then uniformly at random.
//!
//! **Balance guard.** With `a_w` = the worker's active requests (waiting plus running,
//! never stale), `m = min a`, `μ = mean a`: a candidate is *guarded* when `a_w - m > abs`
//! and `a_w > rel x m`, with `rel` = 1.5 (the relative threshold of SGLang's cache-aware
//! router) and, unless configured, `abs = 3 x sqrt(μ) + 1`: an imbalance larger than three
//! standard deviations of the count a uniformly random placement would produce (Poisson),
//! so random fluctuation does not trip it but a worker that attracts traffic because of a
//! prefix everyone shares does. When the cheapest candidate is guarded, the request goes
//! to the least loaded unguarded candidate that can start it at once (no queued prefill)
//! and costs no more than the cheapest one would without its match (the guard gives up the
//! prefix advantage, never more), and only if what the move gives up is *shared*: every
//! block the cheapest candidate holds and the other does not is among the request's
//! `shared_blocks` (leading blocks that more than 1/N of recent requests contain, counted
//! by the router). A prefix that popular must be held by several workers anyway; a private
//! one (a conversation's history, one group's prompt among many) would only be lost and
//! recomputed. If there is no such candidate, the queue already prices the imbalance and
//! the guard stands aside.
//!
//! **Replication.** A shared prefix contained in a share `s` of recent requests
//! (`RequestInfo::shared_share`) needs `ceil(s x N)` holders for none of them to draw more
//! than 1/N of the traffic. While fewer candidates hold it, a request whose best match is
//! that prefix goes where the guard would send it (the least loaded idle worker, under the
//! same budget), though nobody is guarded yet: the prefix spreads before it makes a hot
//! spot. This keeps a short common prefix (a system prompt) from
//! deciding placement on its own: once its first holder is guarded, the next request goes
//! to an idle worker, and from then on several workers hold the prefix.
//!
//! The total of a candidate is `best_cost / cost` (1 for the cheapest), 0 when the guard
//! decided against it; the explanation rows are `ttft_s`, `saved_s`, `queue_s`, `cost_s`,
//! `active` and `guard` (1 = guarded).

use super::{Candidate, RequestInfo};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Parameters of the `ttft` picker (JSON: `{"name": "ttft", "params": {...}}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtftParams {
    /// Prefill rate assumed before a worker's rate is learned, tokens/s.
    pub prefill_tokens_per_s: Option<f64>,
    /// Fixed per-step overhead, seconds.
    pub step_overhead_s: Option<f64>,
    /// Relative imbalance threshold of the balance guard.
    pub balance_rel: Option<f64>,
    /// Absolute imbalance threshold of the balance guard, requests (default: statistical,
    /// `3 x sqrt(mean active) + 1`).
    pub balance_abs: Option<f64>,
    /// Near-tie tolerance, seconds (default: `step_overhead_s`).
    pub tie_s: Option<f64>,
    /// Requests its prefill delays besides itself (default 1).
    pub externality: Option<f64>,
    /// The percentile of observed times to first token that the history rules protect, as
    /// a fraction in `(0, 1]` (default 0.99).
    pub tail_quantile: Option<f64>,
}

/// The `ttft` picker's policy (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TtftPolicy {
    /// Default prefill rate, tokens/s (10,000: the low end of what vLLM users report for
    /// an 8B model on one H100 with long prompts).
    pub prefill_tokens_per_s: f64,
    /// Fixed step overhead, seconds (0.01: one decode step of a mid-size model, the usual
    /// 10-20 ms order).
    pub step_overhead_s: f64,
    /// Relative imbalance threshold (1.5, SGLang's `balance_rel_threshold`).
    pub balance_rel: f64,
    /// Absolute imbalance threshold in requests; `None`: `3 x sqrt(mean active) + 1`.
    pub balance_abs: Option<f64>,
    /// Near-tie tolerance, seconds; `None`: `step_overhead_s`.
    pub tie_s: Option<f64>,
    /// How many other requests a request's own prefill delays (1: the next request that
    /// queues behind it on that worker). The cost of a candidate is its predicted TTFT
    /// plus `externality x uncached / rate`.
    pub externality: f64,
    /// The percentile of the router's observed times to first token that the history
    /// rules protect (0.99: the latency percentile that MLPerf Inference's LLM server
    /// scenarios constrain TTFT at, `target_latency_percentile = 99` in its LoadGen
    /// configuration; the tail an SLO is usually written for). A move away from a private
    /// history is worth only the time it takes off above this percentile; below it, the
    /// recompute is certain and the objective does not change. Set 0.9 for a p90
    /// objective: more moves, a lower p90, fewer cache hits (docs/simulation.md, session
    /// 10, measures both).
    pub tail_quantile: f64,
    /// Tokens per block (set by the router).
    pub block_size: u32,
}

impl Default for TtftPolicy {
    fn default() -> Self {
        TtftPolicy {
            prefill_tokens_per_s: 10_000.0,
            step_overhead_s: 0.01,
            balance_rel: 1.5,
            balance_abs: None,
            tie_s: None,
            externality: 1.0,
            tail_quantile: 0.99,
            block_size: 16,
        }
    }
}

impl TtftPolicy {
    /// Names of the explanation rows, in order.
    pub const ROWS: [&'static str; 6] =
        ["ttft_s", "saved_s", "queue_s", "cost_s", "active", "guard"];

    /// The policy from its JSON parameters, validated.
    pub fn from_params(p: &TtftParams) -> Result<Self> {
        let d = TtftPolicy::default();
        let t = TtftPolicy {
            prefill_tokens_per_s: p.prefill_tokens_per_s.unwrap_or(d.prefill_tokens_per_s),
            step_overhead_s: p.step_overhead_s.unwrap_or(d.step_overhead_s),
            balance_rel: p.balance_rel.unwrap_or(d.balance_rel),
            balance_abs: p.balance_abs,
            tie_s: p.tie_s,
            externality: p.externality.unwrap_or(d.externality),
            tail_quantile: p.tail_quantile.unwrap_or(d.tail_quantile),
            block_size: d.block_size,
        };
        t.validate()?;
        Ok(t)
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        let pos = |x: f64| x.is_finite() && x > 0.0;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        let checks = [
            ("prefill_tokens_per_s", pos(self.prefill_tokens_per_s)),
            ("step_overhead_s", nonneg(self.step_overhead_s)),
            ("balance_rel", self.balance_rel.is_finite() && self.balance_rel >= 1.0),
            ("balance_abs", self.balance_abs.is_none_or(nonneg)),
            ("tie_s", self.tie_s.is_none_or(nonneg)),
            ("externality", nonneg(self.externality)),
            ("tail_quantile", self.tail_quantile > 0.0 && self.tail_quantile <= 1.0),
        ];
        for (name, ok) in checks {
            if !ok {
                return Err(Error::config(format!(
                    "picker `ttft`: `{name}` is out of range (rates positive, times and \
                     thresholds finite and non-negative, balance_rel >= 1, tail_quantile \
                     in (0, 1])"
                )));
            }
        }
        Ok(())
    }

    #[inline]
    fn rate(&self, c: &Candidate) -> f64 {
        let r = c.load.prefill_tokens_per_s;
        if r.is_finite() && r > 0.0 {
            r
        } else {
            self.prefill_tokens_per_s
        }
    }

    /// `(ttft_s, saved_s, queue_s, cost_s)` of one candidate.
    #[inline]
    pub fn predict(&self, req: &RequestInfo, c: &Candidate) -> (f64, f64, f64, f64) {
        let rate = self.rate(c);
        let prompt = f64::from(req.prompt_tokens);
        let cached =
            (f64::from(c.matched_blocks) * f64::from(self.block_size)).min((prompt - 1.0).max(0.0));
        let queue = c.load.pending_prefill_tokens as f64 / rate;
        let own = (prompt - cached) / rate;
        let ttft = self.step_overhead_s + queue + own;
        (ttft, cached / rate, queue, ttft + self.externality * own)
    }

    /// Fills the rows (`rows.len() == 6 * n`) and totals for `cands`, and returns the
    /// chosen position.
    pub fn evaluate(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        rows: &mut [f64],
        totals: &mut [f64],
        rng: &mut SplitMix64,
    ) -> usize {
        let n = cands.len();
        let (ttft, rest) = rows.split_at_mut(n);
        let (saved, rest) = rest.split_at_mut(n);
        let (queue, rest) = rest.split_at_mut(n);
        let (cost, rest) = rest.split_at_mut(n);
        let (active, guard) = rest.split_at_mut(n);
        for (k, c) in cands.iter().enumerate() {
            let (t, s, q, x) = self.predict(req, c);
            ttft[k] = t;
            saved[k] = s;
            queue[k] = q;
            cost[k] = x;
            active[k] = f64::from(c.load.active_requests);
        }
        // The least and the sum of the active counts, in integers (no serial chain of
        // float minima and additions): every count and every partial sum (below 2^53 for
        // fewer than 2^21 candidates) is exact in f64, so these are the float results.
        let lo =
            cands.iter().map(|c| c.load.active_requests).min().map_or(f64::INFINITY, f64::from);
        let sum = if n < 1 << 21 {
            cands.iter().map(|c| u64::from(c.load.active_requests)).sum::<u64>() as f64
        } else {
            active.iter().sum::<f64>()
        };
        // Memory: a block written on a worker whose cache turns over faster than the
        // pool's on average evicts younger history there (more likely to be read again),
        // so the request's own blocks are charged the externality in proportion to the
        // worker's turnover (1 / eviction horizon) over the candidates' mean turnover
        // (0 for a worker that has not evicted). Nobody evicting: unchanged.
        let turnover = |c: &Candidate| {
            let h = c.load.eviction_horizon_s;
            if h.is_finite() && h > 0.0 {
                1.0 / h
            } else {
                0.0
            }
        };
        let mean_turnover = cands.iter().map(turnover).sum::<f64>() / n as f64;
        if mean_turnover > 0.0 {
            for (k, c) in cands.iter().enumerate() {
                let own = ttft[k] - self.step_overhead_s - queue[k];
                cost[k] += self.externality * own * (turnover(c) / mean_turnover - 1.0).max(0.0);
            }
        }
        // A private prefix given up: a candidate that holds less of the request than the
        // best holder, beyond the shared blocks, leaves that history (a conversation's
        // earlier turns, one group's prompt) behind on the holder, where it now occupies
        // memory with no one to read it, and writes a second copy here: the recompute is
        // charged once more, as the work the next reader of that history on the holder
        // (the conversation's next turn, had it stayed) would have saved.
        let mmax = cands.iter().map(|c| c.matched_blocks).max().unwrap_or(0);
        let prompt = f64::from(req.prompt_tokens);
        let tokens =
            |m: u32| (f64::from(m) * f64::from(self.block_size)).min((prompt - 1.0).max(0.0));
        for (k, c) in cands.iter().enumerate() {
            let keep = c.matched_blocks.max(req.shared_blocks);
            if mmax > keep {
                cost[k] += self.externality * (tokens(mmax) - tokens(keep)) / self.rate(c);
            }
        }
        // History within the tail: while the holder of the longest match can give the
        // request its first token within the router's recent TTFT tail (`tail_quantile`),
        // or while a candidate would not bring it within the tail either, a move away from
        // a private history buys no latency that a percentile objective counts and
        // recomputes that history for certain: such a candidate is priced above the
        // cheapest holder (by two tie tolerances, so never a near-tie).
        if req.tail_ttft_s > 0.0 && mmax > req.shared_blocks {
            let (mut hold_ttft, mut hold_cost) = (f64::INFINITY, f64::INFINITY);
            for (k, c) in cands.iter().enumerate() {
                if c.matched_blocks == mmax && cost[k] < hold_cost {
                    (hold_ttft, hold_cost) = (ttft[k], cost[k]);
                }
            }
            let floor = hold_cost + 2.0 * self.tie_s.unwrap_or(self.step_overhead_s);
            for (k, c) in cands.iter().enumerate() {
                let out_of_tail = hold_ttft > req.tail_ttft_s
                    && ttft[k] <= req.tail_ttft_s
                    && out_of_tail_move_pays(
                        req.tail_ttft_s,
                        hold_ttft,
                        hold_cost,
                        ttft[k],
                        cost[k],
                    );
                if c.matched_blocks.max(req.shared_blocks) < mmax && !out_of_tail {
                    cost[k] = cost[k].max(floor);
                }
            }
        }
        let mean = sum / n as f64;
        let abs = self.balance_abs.unwrap_or(3.0 * mean.sqrt() + 1.0);
        let tie = self.tie_s.unwrap_or(self.step_overhead_s);
        let mut fastest = 0;
        for k in 0..n {
            let a = active[k];
            guard[k] = if a - lo > abs && a > self.balance_rel * lo { 1.0 } else { 0.0 };
            if cost[k] < cost[fastest] {
                fastest = k;
            }
        }
        let best = cost[fastest];
        // The guard decides when the cheapest candidate is guarded and an unguarded one
        // can start the request at once (no queued prefill: the imbalance is one the queue
        // does not price, such as decode contention or memory) for no more than the
        // cheapest one's prefix advantage (its cost had it matched nothing). The request
        // then goes to the least loaded such worker (SGLang's rule under imbalance), which
        // also replicates the prefix that made the guarded worker attractive.
        // Within one tie tolerance: candidates' learned rates differ by estimation noise.
        let budget = best + saved[fastest] * (1.0 + self.externality) + tie;
        // A move may recompute only a *shared* prefix (one that more than 1/N of the
        // traffic contains, which must be held by several workers anyway); a private one
        // (a conversation's history, one group's prompt among many) it would only lose.
        let keeps = |k: usize| {
            let (mf, mk) = (cands[fastest].matched_blocks, cands[k].matched_blocks);
            mf <= mk.max(req.shared_blocks)
        };
        let idle = |k: usize| guard[k] == 0.0 && queue[k] <= tie && cost[k] <= budget && keeps(k);
        // A shared prefix held by fewer workers than its share of the traffic needs
        // (`ceil(share x N)`) is replicated: the request goes where the guard would send
        // it, though nobody is guarded yet.
        let mf = cands[fastest].matched_blocks;
        let replicate = mf > 0 && mf <= req.shared_blocks && {
            let holders = cands.iter().filter(|c| c.matched_blocks >= mf).count();
            (holders as f64) < (req.shared_share * n as f64).ceil()
        };
        let guarded = (guard[fastest] != 0.0 || replicate) && (0..n).any(idle);
        // Otherwise near-ties (within `tie` of the cheapest) go to the fewest active, then
        // uniformly at random.
        let near = |k: usize| if guarded { idle(k) } else { cost[k] <= best + tie };
        // (Two loops: the divisions alone vectorize.)
        for (k, t) in totals.iter_mut().enumerate() {
            *t = if guarded && guard[k] != 0.0 || cost[k] <= 0.0 { 0.0 } else { best / cost[k] };
        }
        let mut amin = f64::INFINITY;
        for (k, &a) in active.iter().enumerate() {
            if near(k) {
                amin = amin.min(a);
            }
        }
        // Equal load among near-ties: uniform. (Not the lowest cost: learned rates differ a
        // little between workers, and the busiest would win every tie.)
        let tied = |k: usize| near(k) && active[k] == amin;
        let count = (0..n).filter(|&k| tied(k)).count();
        let r = if count > 1 { rng.below(count as u64) as usize } else { 0 };
        (0..n).filter(|&k| tied(k)).nth(r).unwrap_or(0)
    }
}

/// Rule 11 (session 6), a move out of the TTFT tail buys only the time above it: a
/// candidate `k` within the tail (`ttft_k <= tail`) that would give up the private history
/// of a holder predicted above the tail (`hold_ttft > tail`) is worth moving to only when
/// its compute charges (`cost_k - ttft_k`: its own prefill's externality, the history
/// given up, the turnover surcharge) are smaller than the holder's time above the tail
/// plus the holder's own compute charges, `hold_cost - hold_ttft + (hold_ttft - tail)`.
/// The part of the holder's TTFT below the tail is worth nothing to a percentile
/// objective, as in rule 9 (history within the tail); the compute is certain. No
/// parameter.
#[inline]
pub(crate) fn out_of_tail_move_pays(
    tail: f64,
    hold_ttft: f64,
    hold_cost: f64,
    ttft_k: f64,
    cost_k: f64,
) -> bool {
    cost_k - ttft_k < hold_cost - tail.min(hold_ttft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WorkerId;

    fn cand(w: u32, matched: u32, pending: u64, active: u32, rate: f64) -> Candidate {
        let mut c = Candidate::new(WorkerId(w));
        c.matched_blocks = matched;
        c.load.pending_prefill_tokens = pending;
        c.load.active_requests = active;
        c.load.prefill_tokens_per_s = rate;
        c
    }

    fn run(p: &TtftPolicy, req: &RequestInfo, cands: &[Candidate]) -> (usize, Vec<f64>) {
        let mut rows = vec![0.0; 6 * cands.len()];
        let mut totals = vec![0.0; cands.len()];
        let k = p.evaluate(req, cands, &mut rows, &mut totals, &mut SplitMix64::new(3));
        (k, rows)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn ttft_prices_match_against_queue_in_seconds() {
        let p = TtftPolicy { step_overhead_s: 0.01, ..TtftPolicy::default() };
        // The 50 matched blocks are a shared prefix, so that giving them up is not charged
        // (see `giving_up_a_private_prefix_is_charged_once_more`).
        let req = RequestInfo {
            prompt_tokens: 1_000,
            total_blocks: 62,
            shared_blocks: 50,
            ..Default::default()
        };
        // w0 holds 50 blocks (800 tokens) but has 4,000 tokens queued; w1 is idle and cold.
        // TTFT w0: 0.01 + 0.4 + 0.02 = 0.43 s ; w1: 0.01 + 0 + 0.1 = 0.11 s.
        // Cost adds the own prefill once more: 0.45 and 0.21.
        let cands = [cand(0, 50, 4_000, 1, 10_000.0), cand(1, 0, 0, 0, 10_000.0)];
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 1);
        assert!(close(rows[0], 0.43) && close(rows[1], 0.11), "ttft {rows:?}");
        assert!(close(rows[2], 0.08), "saved_s {rows:?}");
        assert!(close(rows[4], 0.4) && close(rows[5], 0.0), "queue_s {rows:?}");
        assert!(close(rows[6], 0.45) && close(rows[7], 0.21), "cost_s {rows:?}");
        // With 400 tokens queued instead, w0 wins: 0.01 + 0.04 + 0.02 + 0.02 = 0.09 s.
        let cands = [cand(0, 50, 400, 1, 10_000.0), cand(1, 0, 0, 0, 10_000.0)];
        assert_eq!(run(&p, &req, &cands).0, 0);
        // A slower learned rate on w0 (2,000 tokens/s) makes it lose again:
        // 0.01 + 0.2 + 0.1 + 0.1 = 0.41 s against 0.21 s.
        let cands = [cand(0, 50, 400, 1, 2_000.0), cand(1, 0, 0, 0, 10_000.0)];
        assert_eq!(run(&p, &req, &cands).0, 1);
        // Without the externality the choice is the bare TTFT, and recomputing 800 tokens
        // on a slightly emptier worker looks cheaper; with it, it costs the next request.
        let bare = TtftPolicy { externality: 0.0, ..p };
        let cands = [cand(0, 50, 4_000, 1, 10_000.0), cand(1, 0, 3_000, 0, 10_000.0)];
        // w0: 0.43 (0.45) ; w1: 0.41 (0.51): the bare TTFT moves it, the cost keeps it.
        assert_eq!(run(&bare, &req, &cands).0, 1);
        assert_eq!(run(&p, &req, &cands).0, 0);
    }

    #[test]
    fn near_ties_go_to_the_less_loaded() {
        let p = TtftPolicy::default();
        let req = RequestInfo { prompt_tokens: 1_000, total_blocks: 62, ..Default::default() };
        // 1 block apart (3.2 ms of cost < one 10 ms step): tied, the less active wins.
        let cands = [cand(0, 1, 0, 3, 10_000.0), cand(1, 0, 0, 1, 10_000.0)];
        assert_eq!(run(&p, &req, &cands).0, 1);
        // 10 blocks apart (32 ms): not a tie.
        let cands = [cand(0, 10, 0, 3, 10_000.0), cand(1, 0, 0, 1, 10_000.0)];
        assert_eq!(run(&p, &req, &cands).0, 0);
        // Exact ties in cost and load are broken at random, each side sometimes.
        let cands = [cand(0, 0, 0, 1, 10_000.0), cand(1, 0, 0, 1, 10_000.0)];
        let mut seen = [false; 2];
        let mut rows = vec![0.0; 12];
        let mut totals = vec![0.0; 2];
        let mut rng = SplitMix64::new(1);
        for _ in 0..64 {
            seen[p.evaluate(&req, &cands, &mut rows, &mut totals, &mut rng)] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn balance_guard_trips_on_absolute_and_relative_imbalance() {
        let p = TtftPolicy::default();
        // The first 31 blocks are shared (in 20% of recent requests, which one holder of
        // four can take: ceil(0.2 x 4) = 1, no replication needed).
        let req = RequestInfo {
            prompt_tokens: 640,
            total_blocks: 40,
            shared_blocks: 31,
            shared_share: 0.2,
            ..Default::default()
        };
        // w0 holds the shared 31-block prefix (496 tokens, 50 ms of prefill at 10k tokens/s).
        // Active 6 vs 0, 0, 0: mean 1.5, abs = 3 x sqrt(1.5) + 1 = 4.67; 6 - 0 > 4.67 and
        // 6 > 1.5 x 0: guarded, and the idle workers cost 0.01 + 2 x 0.064 = 0.138 s, within
        // w0's 0.038 s + 2 x 0.0496 s without its match: the request goes to an idle one.
        let cands = [
            cand(0, 31, 0, 6, 10_000.0),
            cand(1, 0, 0, 0, 10_000.0),
            cand(2, 0, 0, 0, 10_000.0),
            cand(3, 0, 0, 0, 10_000.0),
        ];
        let (k, rows) = run(&p, &req, &cands);
        assert_ne!(k, 0);
        assert_eq!(&rows[20..24], &[1.0, 0.0, 0.0, 0.0], "guard row");
        // 4 vs 0: within the absolute threshold (4 < 1 + 3 x sqrt(1)): the match decides.
        let mut c = cands.clone();
        c[0].load.active_requests = 4;
        assert_eq!(run(&p, &req, &c).0, 0);
        // 12 vs 9, 9, 9: 3 < abs = 3 x sqrt(9.75) + 1. Not guarded.
        let mut c = cands.clone();
        for (i, x) in c.iter_mut().enumerate() {
            x.load.active_requests = if i == 0 { 12 } else { 9 };
        }
        assert_eq!(run(&p, &req, &c).0, 0);
        // An explicit absolute threshold of 2: 12 - 9 > 2, but 12 < 1.5 x 9: relative
        // threshold not met, still not guarded; 14 > 13.5 is.
        let p2 = TtftPolicy { balance_abs: Some(2.0), ..p };
        assert_eq!(run(&p2, &req, &c).0, 0);
        c[0].load.active_requests = 14;
        assert_ne!(run(&p2, &req, &c).0, 0);
        // The guard stands aside when every other worker has a prefill queue (the queue
        // prices the imbalance) ...
        let mut c = cands.clone();
        for x in &mut c[1..] {
            x.load.pending_prefill_tokens = 2_000;
        }
        assert_eq!(run(&p, &req, &c).0, 0);
        // ... and when moving would cost more than the guarded worker's prefix advantage:
        // a 2,000-token prompt with 1,900 tokens matched on w0.
        let mut req = RequestInfo {
            prompt_tokens: 2_000,
            total_blocks: 125,
            shared_blocks: 118,
            shared_share: 0.2,
            ..Default::default()
        };
        let mut c = cands.clone();
        c[0].matched_blocks = 118;
        let (k, rows) = run(&p, &req, &c);
        assert_eq!(rows[20], 1.0, "guarded");
        assert_ne!(k, 0, "moving costs the advantage (equal rates): allowed");
        // ... and when what the move gives up is not shared: with only the first 31 blocks
        // shared, the other 87 are private to w0 (a conversation's history), and a move
        // would lose them.
        req.shared_blocks = 31;
        assert_eq!(run(&p, &req, &c).0, 0, "a private prefix stays");
        // A worker holding the private part too may take it.
        c[2].matched_blocks = 118;
        assert_eq!(run(&p, &req, &c).0, 2, "the other holder, idle");
        req.shared_blocks = 118;
        c[2].matched_blocks = 0;
        c[1..].iter_mut().for_each(|x| x.load.prefill_tokens_per_s = 5_000.0);
        assert_eq!(run(&p, &req, &c).0, 0, "slower idle workers: moving costs more");
    }

    #[test]
    fn a_shared_prefix_is_replicated_to_its_share_of_workers() {
        let p = TtftPolicy::default();
        // Every recent request contains the first 31 blocks (a service-wide system prompt):
        // with 4 workers it needs 4 holders. w0 holds it and is a little busier (1 vs 0,
        // far from the guard's thresholds): without replication the match would win.
        let mut req = RequestInfo {
            prompt_tokens: 640,
            total_blocks: 40,
            shared_blocks: 31,
            shared_share: 1.0,
            ..Default::default()
        };
        let cands = [
            cand(0, 31, 0, 1, 10_000.0),
            cand(1, 0, 0, 0, 10_000.0),
            cand(2, 0, 0, 0, 10_000.0),
            cand(3, 0, 0, 0, 10_000.0),
        ];
        let (k, rows) = run(&p, &req, &cands);
        assert_ne!(k, 0, "replicated to an idle worker");
        assert_eq!(&rows[20..24], &[0.0; 4], "nobody guarded");
        // In a quarter of the traffic, one holder is enough: the match decides.
        req.shared_share = 0.25;
        assert_eq!(run(&p, &req, &cands).0, 0);
        // Four holders of four: nothing to replicate, the match (and then load) decides.
        req.shared_share = 1.0;
        let mut c = cands.clone();
        c.iter_mut().for_each(|x| x.matched_blocks = 31);
        c[0].load.active_requests = 0;
        c[3].load.active_requests = 1;
        let k = run(&p, &req, &c).0;
        assert_ne!(k, 3, "near-tie to the less loaded");
        // A prefix that is not shared is never replicated.
        req.shared_blocks = 0;
        assert_eq!(run(&p, &req, &cands).0, 0);
    }

    #[test]
    fn giving_up_a_private_prefix_is_charged_once_more() {
        let p = TtftPolicy::default();
        let mut req = RequestInfo { prompt_tokens: 2_000, total_blocks: 125, ..Default::default() };
        // w0 holds 100 blocks (1,600 tokens) of a private history behind 4,000 queued
        // tokens: 0.01 + 0.4 + 2 x 0.04 = 0.49 s. w1 is idle and cold: 0.01 + 2 x 0.2 =
        // 0.41 s, plus the 1,600 tokens given up once more (0.16 s) = 0.57 s.
        let cands = [cand(0, 100, 4_000, 1, 10_000.0), cand(1, 0, 0, 0, 10_000.0)];
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 0, "the history stays with its holder");
        assert!(close(rows[6], 0.49) && close(rows[7], 0.57), "{:?}", &rows[6..8]);
        // A shared prefix (one the traffic at large contains) is not charged: w1 wins.
        req.shared_blocks = 100;
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 1);
        assert!(close(rows[7], 0.41), "{}", rows[7]);
    }

    #[test]
    fn a_private_history_stays_while_its_holder_is_within_the_ttft_tail() {
        let p = TtftPolicy::default();
        let mut req = RequestInfo { prompt_tokens: 2_000, total_blocks: 125, ..Default::default() };
        // w0 holds 100 blocks (1,600 tokens) of a private history behind 10,000 queued
        // tokens: TTFT 0.01 + 1.0 + 0.04 = 1.05 s, cost 1.09 s. w1 is idle and cold: TTFT
        // 0.21 s, cost 0.41 + 0.16 = 0.57 s: the cost alone moves the request.
        let cands = [cand(0, 100, 10_000, 1, 10_000.0), cand(1, 0, 0, 0, 10_000.0)];
        assert_eq!(run(&p, &req, &cands).0, 1, "no tail known: the cost decides");
        // The router's recent TTFT p90 is 2 s: 1.05 s on the holder is within it, the
        // move would buy no latency a percentile counts: it stays, and w1 is priced above
        // it (1.09 + 2 x 0.01).
        req.tail_ttft_s = 2.0;
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 0);
        assert!(close(rows[7], 1.11), "{:?}", &rows[6..8]);
        // A tail of 0.5 s: the holder would put the request 0.55 s into the tail and w1
        // (0.21 s) takes it out, for compute charges (0.57 - 0.21 = 0.36 s) below the
        // holder's time above the tail plus its own (1.09 - 0.5 = 0.59 s): it moves.
        req.tail_ttft_s = 0.5;
        assert_eq!(run(&p, &req, &cands).0, 1);
        // A tail of 1 s: w1 still takes the request out of the tail, but the holder is
        // only 0.05 s above it, and the move's compute (0.36 s) buys only that: it stays
        // (rule 11, `a_move_out_of_the_tail_buys_only_the_time_above_it`).
        req.tail_ttft_s = 1.0;
        assert_eq!(run(&p, &req, &cands).0, 0);
        // A tail of 0.2 s: in the tail on either worker, the move buys no latency the
        // percentile counts: it stays.
        req.tail_ttft_s = 0.2;
        assert_eq!(run(&p, &req, &cands).0, 0);
        // A shared prefix is not a history to keep: the cost decides whatever the tail.
        req.tail_ttft_s = 2.0;
        req.shared_blocks = 100;
        assert_eq!(run(&p, &req, &cands).0, 1);
    }

    #[test]
    fn a_move_out_of_the_tail_buys_only_the_time_above_it() {
        // The rule alone: compute charges of the mover against the holder's time above the
        // tail plus its own compute charges.
        // Holder: TTFT 3 s, cost 3.1 s (0.1 s of own prefill); tail 2 s: 1 s above it.
        // A mover within the tail (TTFT 0.5 s) with 0.8 s of charges: 0.8 < 1.1, pays.
        assert!(out_of_tail_move_pays(2.0, 3.0, 3.1, 0.5, 1.3));
        // With 1.2 s of charges (a longer history recomputed): 1.2 > 1.1, does not.
        assert!(!out_of_tail_move_pays(2.0, 3.0, 3.1, 0.5, 1.7));
        // A tail of 1 s: 2 s above it, 1.2 s of charges pays.
        assert!(out_of_tail_move_pays(1.0, 3.0, 3.1, 0.5, 1.7));
        // A tail above the holder's TTFT cannot make the holder look cheaper than it is.
        assert!(!out_of_tail_move_pays(5.0, 3.0, 3.1, 0.5, 3.5));
        // Through the picker: w0 holds a 1,600-token private history behind 30,000 queued
        // tokens (TTFT 0.01 + 3 + 0.04 = 3.05 s, cost 3.09 s); w1 is idle and cold (TTFT
        // 0.21 s, cost 0.21 + 0.2 + 0.16 = 0.57 s, charges 0.36 s).
        let p = TtftPolicy::default();
        let mut req = RequestInfo { prompt_tokens: 2_000, total_blocks: 125, ..Default::default() };
        let cands = [cand(0, 100, 30_000, 1, 10_000.0), cand(1, 0, 0, 0, 10_000.0)];
        // Tail 2 s: the holder is 1.05 s above it, more than the move's 0.36 s: moves.
        req.tail_ttft_s = 2.0;
        assert_eq!(run(&p, &req, &cands).0, 1);
        // Tail 2.8 s: 0.25 s above it plus 0.04 s of own charges, less than 0.36 s: stays,
        // priced two tie tolerances above the holder.
        req.tail_ttft_s = 2.8;
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 0);
        assert!(close(rows[7], 3.11), "{:?}", &rows[6..8]);
    }

    #[test]
    fn a_worker_whose_cache_turns_over_faster_is_charged_for_what_it_evicts() {
        let p = TtftPolicy::default();
        let req = RequestInfo { prompt_tokens: 1_000, total_blocks: 62, ..Default::default() };
        // Equal and cold, but w0's cache turns over every 10 s, w1's every 30 s (mean
        // turnover 1/15 per second): w0 pays its own prefill (0.1 s) x (1.5 - 1) once more.
        let mut cands = [cand(0, 0, 0, 0, 10_000.0), cand(1, 0, 0, 1, 10_000.0)];
        cands[0].load.eviction_horizon_s = 10.0;
        cands[1].load.eviction_horizon_s = 30.0;
        let (k, rows) = run(&p, &req, &cands);
        assert_eq!(k, 1, "the slower cache wins although it is busier");
        assert!(close(rows[6], 0.26) && close(rows[7], 0.21), "{:?}", &rows[6..8]);
        // A worker that has not evicted yet (horizon unknown) pays nothing extra; nobody
        // evicting: the near-tie goes to the less loaded, w0.
        cands[0].load.eviction_horizon_s = 0.0;
        cands[1].load.eviction_horizon_s = 0.0;
        assert_eq!(run(&p, &req, &cands).0, 0);
    }

    #[test]
    fn params_are_validated() {
        let ok = TtftPolicy::from_params(&TtftParams::default()).unwrap();
        assert_eq!(ok, TtftPolicy::default());
        for bad in [
            TtftParams { prefill_tokens_per_s: Some(0.0), ..Default::default() },
            TtftParams { step_overhead_s: Some(f64::NAN), ..Default::default() },
            TtftParams { balance_rel: Some(0.5), ..Default::default() },
            TtftParams { balance_abs: Some(-1.0), ..Default::default() },
            TtftParams { tie_s: Some(f64::INFINITY), ..Default::default() },
            TtftParams { externality: Some(-0.1), ..Default::default() },
        ] {
            assert!(TtftPolicy::from_params(&bad).is_err(), "{bad:?}");
        }
    }
}
