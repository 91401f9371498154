//! The built-in scorers and the Dynamo-style cost policy.
//!
//! Every scorer documents its formula; `n` is the number of candidates after filtering and
//! "across candidates" means over those `n`.

use super::{Candidate, RequestInfo, ScoreContext, Scorer};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How much a matched block is worth by the tier it sits in (1 = a GPU hit that skips
/// prefill entirely).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierWeights {
    /// Weight of a block held in GPU memory (default 1.0).
    pub gpu: f64,
    /// Weight of a block held in host memory (default 0.8).
    pub cpu: f64,
    /// Weight of a block held on disk (default 0.5).
    pub disk: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        TierWeights { gpu: 1.0, cpu: 0.8, disk: 0.5 }
    }
}

impl TierWeights {
    /// Checks that every weight is finite and in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [("gpu", self.gpu), ("cpu", self.cpu), ("disk", self.disk)] {
            if !(0.0..=1.0).contains(&w) {
                return Err(Error::config(format!(
                    "tier weight `{name}` must be in [0, 1], got {w}"
                )));
            }
        }
        Ok(())
    }

    /// The cache credit of a candidate, in blocks:
    /// `gpu * (by_tier[0] + unattributed) + cpu * by_tier[1] + disk * by_tier[2]`, where
    /// `unattributed = matched_blocks - sum(by_tier)` (saturating) counts as GPU.
    #[inline]
    pub fn credit(&self, cand: &Candidate) -> f64 {
        let [g, c, d] = cand.matched_by_tier;
        let attributed = g as u64 + c as u64 + d as u64;
        let rest = (cand.matched_blocks as u64).saturating_sub(attributed);
        self.gpu * (g as u64 + rest) as f64 + self.cpu * c as f64 + self.disk * d as f64
    }
}

/// Prefix-cache scorer.
///
/// `credit = TierWeights::credit(cand)` (tier-weighted matched blocks),
/// `share = min(1, credit / total_blocks)` (0 when the prompt has no full block),
/// `length = min(1, credit / length_norm_blocks)`, and
///
/// `score = (1 - length_weight) * share + length_weight * length`.
///
/// With `length_weight = 0` (the default) this is the matched share of the prompt, as in
/// llm-d's prefix-cache scorer; a positive `length_weight` adds an absolute term so that a
/// short prompt fully matched does not beat a long prefix partly matched on percentage
/// alone.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixScorer {
    /// Weights of GPU, CPU and disk hits.
    pub tiers: TierWeights,
    /// Weight `a` of the absolute-length term, in `[0, 1]`.
    pub length_weight: f64,
    /// Blocks of credit at which the absolute-length term saturates (positive).
    pub length_norm_blocks: f64,
}

impl Default for PrefixScorer {
    fn default() -> Self {
        PrefixScorer { tiers: TierWeights::default(), length_weight: 0.0, length_norm_blocks: 64.0 }
    }
}

/// JSON parameters of [`PrefixScorer`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixParams {
    /// Tier weights (defaults GPU 1.0, CPU 0.8, disk 0.5).
    pub tier_weights: Option<TierWeights>,
    /// Weight of the absolute-length term (default 0).
    pub length_weight: Option<f64>,
    /// Blocks at which the absolute-length term saturates (default 64).
    pub length_norm_blocks: Option<f64>,
}

impl PrefixScorer {
    /// A prefix scorer from its parameters, validated.
    pub fn from_params(p: PrefixParams) -> Result<Self> {
        let d = PrefixScorer::default();
        let s = PrefixScorer {
            tiers: p.tier_weights.unwrap_or(d.tiers),
            length_weight: p.length_weight.unwrap_or(d.length_weight),
            length_norm_blocks: p.length_norm_blocks.unwrap_or(d.length_norm_blocks),
        };
        s.tiers.validate()?;
        if !(0.0..=1.0).contains(&s.length_weight) {
            return Err(Error::config(format!(
                "prefix: length_weight must be in [0, 1], got {}",
                s.length_weight
            )));
        }
        if !(s.length_norm_blocks.is_finite() && s.length_norm_blocks > 0.0) {
            return Err(Error::config(format!(
                "prefix: length_norm_blocks must be positive, got {}",
                s.length_norm_blocks
            )));
        }
        Ok(s)
    }

    /// The score of one candidate (see the type's formula).
    #[inline]
    pub fn score_one(&self, req: &RequestInfo, cand: &Candidate) -> f64 {
        let credit = self.tiers.credit(cand);
        let share =
            if req.total_blocks == 0 { 0.0 } else { (credit / req.total_blocks as f64).min(1.0) };
        let length = (credit / self.length_norm_blocks).min(1.0);
        (1.0 - self.length_weight) * share + self.length_weight * length
    }
}

impl Scorer for PrefixScorer {
    fn name(&self) -> &str {
        "prefix"
    }
    fn score(&self, req: &RequestInfo, cands: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(cands) {
            *o = self.score_one(req, c);
        }
    }
    fn needs_prefix(&self) -> bool {
        true
    }
}

/// How a load figure `x` (lower is better) becomes a score across candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadNorm {
    /// `(max - x) / (max - min)`, 1 for all when `max == min`. The best candidate gets 1 and
    /// the worst 0, whatever the absolute figures (as the Gateway API inference extension's
    /// and llm-d's queue scorer).
    MinMax,
    /// `1 - x / max`, 1 for all when `max == 0`. Proportional: an idle worker gets 1, the
    /// busiest 0, and the rest in proportion.
    Max,
    /// `1 / (1 + x / scale)`: independent of the other candidates; 0.5 at `x = scale`.
    Scale(f64),
}

impl LoadNorm {
    /// Writes the normalized score of `xs[k]` into `out[k]`.
    pub fn apply(&self, xs: impl Iterator<Item = f64> + Clone, out: &mut [f64]) {
        match *self {
            LoadNorm::MinMax => {
                let (lo, hi) = xs
                    .clone()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
                for (o, x) in out.iter_mut().zip(xs) {
                    *o = if hi > lo { (hi - x) / (hi - lo) } else { 1.0 };
                }
            }
            LoadNorm::Max => {
                let hi = xs.clone().fold(0.0f64, f64::max);
                for (o, x) in out.iter_mut().zip(xs) {
                    *o = if hi > 0.0 { 1.0 - x / hi } else { 1.0 };
                }
            }
            LoadNorm::Scale(scale) => {
                for (o, x) in out.iter_mut().zip(xs) {
                    *o = 1.0 / (1.0 + x / scale);
                }
            }
        }
    }
}

/// JSON name of a [`LoadNorm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadNormName {
    /// [`LoadNorm::MinMax`].
    MinMax,
    /// [`LoadNorm::Max`].
    Max,
    /// [`LoadNorm::Scale`] (needs `scale`).
    Scale,
}

/// JSON parameters of the load scorers (`queue`, `running`, `prefill`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadParams {
    /// The normalization (`min-max`, `max` or `scale`).
    pub norm: Option<LoadNormName>,
    /// The scale for `norm: "scale"` (positive).
    pub scale: Option<f64>,
}

impl LoadParams {
    /// The normalization these parameters describe, `default` if none is named.
    pub fn to_norm(&self, scorer: &str, default: LoadNorm) -> Result<LoadNorm> {
        match (self.norm, self.scale) {
            (None, None) => Ok(default),
            (Some(LoadNormName::MinMax), None) => Ok(LoadNorm::MinMax),
            (Some(LoadNormName::Max), None) => Ok(LoadNorm::Max),
            (Some(LoadNormName::Scale), Some(s)) if s.is_finite() && s > 0.0 => {
                Ok(LoadNorm::Scale(s))
            }
            (Some(LoadNormName::Scale), Some(s)) => {
                Err(Error::config(format!("{scorer}: scale must be positive, got {s}")))
            }
            (Some(LoadNormName::Scale), None) => {
                Err(Error::config(format!("{scorer}: norm `scale` needs a `scale` parameter")))
            }
            (_, Some(_)) => Err(Error::config(format!(
                "{scorer}: parameter `scale` applies only to norm `scale`"
            ))),
        }
    }
}

macro_rules! load_scorer {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $default:expr, |$c:ident| $x:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $ty {
            /// How the figure is normalized across candidates.
            pub norm: LoadNorm,
        }

        impl Default for $ty {
            fn default() -> Self {
                $ty { norm: $default }
            }
        }

        impl $ty {
            /// The default normalization of this scorer.
            pub const DEFAULT_NORM: LoadNorm = $default;

            /// The load figure this scorer reads (lower is better).
            #[inline]
            pub fn figure($c: &Candidate) -> f64 {
                $x
            }
        }

        impl Scorer for $ty {
            fn name(&self) -> &str {
                $name
            }
            fn score(&self, _: &RequestInfo, cands: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
                self.norm.apply(cands.iter().map(Self::figure), out);
            }
        }
    };
}

load_scorer!(
    /// Queue-depth scorer: the figure is `load.waiting`, normalized by [`LoadNorm`]
    /// (default [`LoadNorm::MinMax`]: `(max - waiting) / (max - min)`, 1 for all when every
    /// queue is equal, as the llm-d queue scorer).
    QueueScorer, "queue", LoadNorm::MinMax, |c| c.load.waiting as f64
);

load_scorer!(
    /// Running-requests scorer: the figure is `load.running`, normalized by [`LoadNorm`]
    /// (default [`LoadNorm::MinMax`]).
    RunningScorer, "running", LoadNorm::MinMax, |c| c.load.running as f64
);

load_scorer!(
    /// In-flight prefill scorer: the figure is `load.inflight_prefill_tokens`, normalized by
    /// [`LoadNorm`] (default [`LoadNorm::Max`]: `1 - tokens / max_tokens`, 1 for all when no
    /// worker has a prefill in flight; token counts are continuous, so proportional
    /// normalization keeps a 10-token difference from weighing like a 10,000-token one).
    PrefillScorer, "prefill", LoadNorm::Max, |c| c.load.inflight_prefill_tokens as f64
);

/// KV-cache utilization scorer: `score = 1 - clamp(kv_usage, 0, 1)` (NaN usage counts as
/// full).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvUtilizationScorer;

impl Scorer for KvUtilizationScorer {
    fn name(&self) -> &str {
        "kv-utilization"
    }
    fn score(&self, _: &RequestInfo, cands: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(cands) {
            let u = c.load.kv_usage;
            *o = if u.is_nan() { 0.0 } else { 1.0 - u.clamp(0.0, 1.0) };
        }
    }
}

/// Session-affinity scorer: `score = 1` for the candidate that is the live entry of the
/// request's session key in the [`super::SessionTable`], 0 for all others (all 0 when the
/// request has no key, the key is unknown or expired, or its worker was filtered out).
///
/// With a max picker, a new key therefore lands uniformly at random, as Kubernetes
/// `sessionAffinity: ClientIP` picks a random endpoint for a new client.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionScorer;

impl Scorer for SessionScorer {
    fn name(&self) -> &str {
        "session"
    }
    fn score(&self, req: &RequestInfo, cands: &[Candidate], ctx: &ScoreContext, out: &mut [f64]) {
        let Some(key) = req.session else { return };
        let Some(w) = ctx.sessions.get(key, req.now_ms) else {
            return;
        };
        for (o, c) in out.iter_mut().zip(cands) {
            *o = if c.worker == w { 1.0 } else { 0.0 };
        }
    }
    fn uses_sessions(&self) -> bool {
        true
    }
}

/// LoRA-affinity scorer: when the request names an adapter, `score = 1` for candidates that
/// have it loaded and 0 for the others; when it names none, 0 for all (no signal).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraScorer;

impl Scorer for LoraScorer {
    fn name(&self) -> &str {
        "lora"
    }
    fn score(&self, req: &RequestInfo, cands: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
        let Some(name) = req.lora else { return };
        let key = super::lora_key(name);
        for (o, c) in out.iter_mut().zip(cands) {
            *o = if c.loaded_loras.contains_key(key) { 1.0 } else { 0.0 };
        }
    }
}

/// Least-recently-used scorer, for cold requests: prefers the candidate routed longest ago.
///
/// `age = now_ms - last_routed_ms` (saturating; a never-routed candidate has
/// `age = now_ms + 1`, older than any routed one), `score = age / max_age` across candidates
/// (1 for all when `max_age = 0`).
///
/// With `cold_only` (the default) the scorer speaks only for cold requests, those with no
/// matched block on any candidate; for warm requests it scores 0 for all, leaving the choice
/// to the cache-aware terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LruScorer {
    /// Score only requests that match nothing anywhere.
    pub cold_only: bool,
}

impl Default for LruScorer {
    fn default() -> Self {
        LruScorer { cold_only: true }
    }
}

/// JSON parameters of [`LruScorer`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LruParams {
    /// Score only cold requests (default true).
    pub cold_only: Option<bool>,
}

impl LruScorer {
    #[inline]
    fn age(now: u64, c: &Candidate) -> f64 {
        match c.last_routed_ms {
            Some(t) => now.saturating_sub(t) as f64,
            None => now as f64 + 1.0,
        }
    }
}

impl Scorer for LruScorer {
    fn name(&self) -> &str {
        "lru"
    }
    fn score(&self, req: &RequestInfo, cands: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
        if self.cold_only && cands.iter().any(|c| c.matched_blocks > 0) {
            return;
        }
        let now = req.now_ms;
        let max_age = cands.iter().map(|c| Self::age(now, c)).fold(0.0f64, f64::max);
        for (o, c) in out.iter_mut().zip(cands) {
            *o = if max_age > 0.0 { Self::age(now, c) / max_age } else { 1.0 };
        }
    }
    fn needs_prefix(&self) -> bool {
        self.cold_only
    }
}

/// Random scorer: `score` uniform in `[0, 1)`, independent per candidate, drawn from a
/// SplitMix64 stream seeded by [`ScoreContext::seed`] (so a seeded decision is reproducible).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RandomScorer;

impl Scorer for RandomScorer {
    fn name(&self) -> &str {
        "random"
    }
    fn score(&self, _: &RequestInfo, _: &[Candidate], ctx: &ScoreContext, out: &mut [f64]) {
        let mut r = SplitMix64::new(ctx.seed);
        for o in out.iter_mut() {
            *o = r.next_f64();
        }
    }
}

/// The cost policy in the style of NVIDIA Dynamo's KV router.
///
/// Per candidate:
///
/// - `prefill_blocks = max(0, total_blocks - credit)`, the blocks left to prefill after the
///   tier-weighted cache credit ([`TierWeights::credit`]);
/// - `decode_blocks = load.decode_blocks`;
/// - `cost = overlap_weight * prefill_blocks + decode_blocks`.
///
/// Dynamo counts prefill in fractional blocks of all prompt tokens; counting full blocks
/// only shifts every cost by the same constant, which changes neither the argmin nor the
/// normalized costs below.
///
/// Lowest cost wins at `temperature = 0` (ties within [`super::TIE_EPSILON`] broken
/// uniformly at random). At `temperature > 0` the choice is sampled with probability
/// `p_i ∝ exp(-x_i / temperature)`, with the costs normalized to
/// `x_i = (cost_i - min) / (max - min)` (uniform when all costs are equal), as Dynamo's
/// `softmax_sample`.
///
/// Its total per candidate is `1 - x_i`, in `[0, 1]` (1 for all when costs are equal); its
/// explanation rows are `prefill_blocks`, `decode_blocks` and `cost`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostPolicy {
    /// Weight of the prefill term (Dynamo's `overlap_score_weight`, default 1.0).
    pub overlap_weight: f64,
    /// Softmax temperature (Dynamo's `router_temperature`, default 0.0 = argmin).
    pub temperature: f64,
    /// Cache credit per tier.
    pub tiers: TierWeights,
}

impl Default for CostPolicy {
    fn default() -> Self {
        CostPolicy { overlap_weight: 1.0, temperature: 0.0, tiers: TierWeights::default() }
    }
}

impl CostPolicy {
    /// Names of the explanation rows, in order.
    pub const ROWS: [&'static str; 3] = ["prefill_blocks", "decode_blocks", "cost"];

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(Error::config(format!(
                "cost: overlap_weight must be finite and non-negative, got {}",
                self.overlap_weight
            )));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::config(format!(
                "cost: temperature must be finite and non-negative, got {}",
                self.temperature
            )));
        }
        self.tiers.validate()
    }

    /// `(prefill_blocks, decode_blocks, cost)` of one candidate.
    #[inline]
    pub fn cost(&self, req: &RequestInfo, cand: &Candidate) -> (f64, f64, f64) {
        let prefill = (req.total_blocks as f64 - self.tiers.credit(cand)).max(0.0);
        let decode = cand.load.decode_blocks as f64;
        (prefill, decode, self.overlap_weight * prefill + decode)
    }

    /// Fills the three rows (`rows.len() == 3 * n`) and the totals (`1 - x_i`) for `cands`.
    pub fn evaluate(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        rows: &mut [f64],
        totals: &mut [f64],
    ) {
        let n = cands.len();
        let (pre, rest) = rows.split_at_mut(n);
        let (dec, cost) = rest.split_at_mut(n);
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for (k, c) in cands.iter().enumerate() {
            let (p, d, x) = self.cost(req, c);
            pre[k] = p;
            dec[k] = d;
            cost[k] = x;
            lo = lo.min(x);
            hi = hi.max(x);
        }
        for (t, &x) in totals.iter_mut().zip(cost.iter()) {
            *t = if hi > lo { 1.0 - (x - lo) / (hi - lo) } else { 1.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{LoraSet, SessionTable};
    use super::*;
    use crate::types::WorkerId;

    fn cand(w: u32) -> Candidate {
        Candidate::new(WorkerId(w))
    }

    fn req(total_blocks: u32) -> RequestInfo<'static> {
        RequestInfo { prompt_tokens: total_blocks * 16 + 5, total_blocks, ..Default::default() }
    }

    fn run(
        s: &dyn Scorer,
        r: &RequestInfo,
        cands: &[Candidate],
        sessions: &SessionTable,
    ) -> Vec<f64> {
        let mut out = vec![0.0; cands.len()];
        s.score(r, cands, &ScoreContext::new(sessions), &mut out);
        out
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn prefix_share_with_tier_weights() {
        let t = SessionTable::default();
        let mut a = cand(0);
        a.matched_blocks = 10;
        a.matched_by_tier = [6, 2, 2]; // 6 + 1.6 + 1.0 = 8.6
        let mut b = cand(1);
        b.matched_blocks = 5; // unattributed: counts as GPU
        let mut c = cand(2);
        c.matched_blocks = 20;
        c.matched_by_tier = [20, 0, 0]; // capped at the prompt
        let s = PrefixScorer::default();
        close(
            &run(&s, &req(20), &[a.clone(), b.clone(), c.clone(), cand(3)], &t),
            &[0.43, 0.25, 1.0, 0.0],
        );
        // No full block in the prompt: share is 0 for everyone.
        close(&run(&s, &req(0), &[a.clone()], &t), &[0.0]);
    }

    #[test]
    fn prefix_absolute_length_term() {
        let t = SessionTable::default();
        let s = PrefixScorer::from_params(PrefixParams {
            length_weight: Some(0.5),
            length_norm_blocks: Some(8.0),
            ..Default::default()
        })
        .unwrap();
        // A 2-block prompt fully matched vs. a 40-block prompt with 16 matched.
        let mut short = cand(0);
        short.matched_blocks = 2;
        let mut long = cand(1);
        long.matched_blocks = 16;
        // short: 0.5*1 + 0.5*min(1, 2/8) = 0.625
        close(&run(&s, &req(2), &[short], &t), &[0.625]);
        // long: 0.5*0.4 + 0.5*min(1, 16/8) = 0.7
        close(&run(&s, &req(40), &[long], &t), &[0.7]);
        assert!(PrefixScorer::from_params(PrefixParams {
            length_weight: Some(1.5),
            ..Default::default()
        })
        .is_err());
        assert!(PrefixScorer::from_params(PrefixParams {
            tier_weights: Some(TierWeights { gpu: 1.0, cpu: 2.0, disk: 0.5 }),
            ..Default::default()
        })
        .is_err());
    }

    fn with_load(w: u32, f: impl FnOnce(&mut super::super::Load)) -> Candidate {
        let mut c = cand(w);
        f(&mut c.load);
        c
    }

    #[test]
    fn queue_min_max() {
        let t = SessionTable::default();
        let cs: Vec<_> = [0u32, 4, 8, 2]
            .iter()
            .enumerate()
            .map(|(i, &q)| with_load(i as u32, |l| l.waiting = q))
            .collect();
        // (8 - q) / (8 - 0)
        close(&run(&QueueScorer::default(), &req(1), &cs, &t), &[1.0, 0.5, 0.0, 0.75]);
        // All equal: neutral 1.
        let eq: Vec<_> = (0..3).map(|i| with_load(i, |l| l.waiting = 5)).collect();
        close(&run(&QueueScorer::default(), &req(1), &eq, &t), &[1.0, 1.0, 1.0]);
    }

    #[test]
    fn running_and_prefill_norms() {
        let t = SessionTable::default();
        let cs: Vec<_> = [2u32, 6, 10]
            .iter()
            .enumerate()
            .map(|(i, &r)| with_load(i as u32, |l| l.running = r))
            .collect();
        // min-max: (10 - r) / 8
        close(&run(&RunningScorer::default(), &req(1), &cs, &t), &[1.0, 0.5, 0.0]);
        // max: 1 - r/10
        close(&run(&RunningScorer { norm: LoadNorm::Max }, &req(1), &cs, &t), &[0.8, 0.4, 0.0]);
        // scale 2: 1/(1 + r/2)
        close(
            &run(&RunningScorer { norm: LoadNorm::Scale(2.0) }, &req(1), &cs, &t),
            &[0.5, 0.25, 1.0 / 6.0],
        );
        let ps: Vec<_> = [0u64, 1000, 4000]
            .iter()
            .enumerate()
            .map(|(i, &p)| with_load(i as u32, |l| l.inflight_prefill_tokens = p))
            .collect();
        // Default for prefill is max: 1 - p/4000.
        close(&run(&PrefillScorer::default(), &req(1), &ps, &t), &[1.0, 0.75, 0.0]);
        let idle: Vec<_> = (0..2).map(cand).collect();
        close(&run(&PrefillScorer::default(), &req(1), &idle, &t), &[1.0, 1.0]);
    }

    #[test]
    fn load_params_validation() {
        let p = LoadParams { norm: Some(LoadNormName::Scale), scale: Some(4.0) };
        assert_eq!(p.to_norm("queue", LoadNorm::MinMax).unwrap(), LoadNorm::Scale(4.0));
        let e = LoadParams { norm: Some(LoadNormName::Scale), scale: None }
            .to_norm("queue", LoadNorm::MinMax)
            .unwrap_err();
        assert!(e.to_string().contains("scale"), "{e}");
        assert!(LoadParams { norm: None, scale: Some(1.0) }.to_norm("q", LoadNorm::Max).is_err());
        assert!(LoadParams { norm: Some(LoadNormName::Scale), scale: Some(0.0) }
            .to_norm("q", LoadNorm::Max)
            .is_err());
    }

    #[test]
    fn kv_utilization() {
        let t = SessionTable::default();
        let cs: Vec<_> = [0.0, 0.25, 1.0, 1.5, f64::NAN]
            .iter()
            .enumerate()
            .map(|(i, &u)| with_load(i as u32, |l| l.kv_usage = u))
            .collect();
        close(&run(&KvUtilizationScorer, &req(1), &cs, &t), &[1.0, 0.75, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn session_affinity() {
        let mut t = SessionTable::new(16, 1000).unwrap();
        t.record("10.1.2.3", WorkerId(2), 100);
        let cs: Vec<_> = (0..4).map(cand).collect();
        let mut r = req(1);
        r.now_ms = 500;
        close(&run(&SessionScorer, &r, &cs, &t), &[0.0; 4]);
        r.session = Some("10.1.2.3");
        close(&run(&SessionScorer, &r, &cs, &t), &[0.0, 0.0, 1.0, 0.0]);
        r.now_ms = 1100; // expired
        close(&run(&SessionScorer, &r, &cs, &t), &[0.0; 4]);
        r.session = Some("10.9.9.9");
        r.now_ms = 500;
        close(&run(&SessionScorer, &r, &cs, &t), &[0.0; 4]);
    }

    #[test]
    fn lora_affinity() {
        let t = SessionTable::default();
        let mut a = cand(0);
        a.loaded_loras = LoraSet::from_names(["sql", "chat"]).unwrap();
        let b = cand(1);
        let mut c = cand(2);
        c.loaded_loras = LoraSet::from_names(["chat"]).unwrap();
        let cs = [a, b, c];
        let mut r = req(1);
        close(&run(&LoraScorer, &r, &cs, &t), &[0.0, 0.0, 0.0]);
        r.lora = Some("sql");
        close(&run(&LoraScorer, &r, &cs, &t), &[1.0, 0.0, 0.0]);
        r.lora = Some("chat");
        close(&run(&LoraScorer, &r, &cs, &t), &[1.0, 0.0, 1.0]);
    }

    #[test]
    fn lru_prefers_longest_idle_for_cold_requests() {
        let t = SessionTable::default();
        let mut cs: Vec<_> = (0..4).map(cand).collect();
        cs[0].last_routed_ms = Some(900); // age 100
        cs[1].last_routed_ms = Some(600); // age 400
        cs[2].last_routed_ms = Some(1000); // age 0
        cs[3].last_routed_ms = None; // age now+1 = 1001
        let mut r = req(4);
        r.now_ms = 1000;
        close(
            &run(&LruScorer::default(), &r, &cs, &t),
            &[100.0 / 1001.0, 400.0 / 1001.0, 0.0, 1.0],
        );
        cs[3].last_routed_ms = Some(0); // age 1000: now the oldest routed
        close(&run(&LruScorer::default(), &r, &cs, &t), &[0.1, 0.4, 0.0, 1.0]);
        // Warm request: silent unless cold_only is off.
        cs[2].matched_blocks = 1;
        close(&run(&LruScorer::default(), &r, &cs, &t), &[0.0; 4]);
        close(&run(&LruScorer { cold_only: false }, &r, &cs, &t), &[0.1, 0.4, 0.0, 1.0]);
        // Everyone routed just now: all 1.
        for c in cs.iter_mut() {
            c.last_routed_ms = Some(1000);
            c.matched_blocks = 0;
        }
        close(&run(&LruScorer::default(), &r, &cs, &t), &[1.0; 4]);
    }

    #[test]
    fn random_is_seeded_and_in_range() {
        let t = SessionTable::default();
        let cs: Vec<_> = (0..16).map(cand).collect();
        let mut ctx = ScoreContext::new(&t);
        ctx.seed = 7;
        let mut a = vec![0.0; 16];
        let mut b = vec![0.0; 16];
        RandomScorer.score(&req(1), &cs, &ctx, &mut a);
        RandomScorer.score(&req(1), &cs, &ctx, &mut b);
        assert_eq!(a, b);
        let mut r = SplitMix64::new(7);
        let expect: Vec<f64> = (0..16).map(|_| r.next_f64()).collect();
        assert_eq!(a, expect);
        ctx.seed = 8;
        RandomScorer.score(&req(1), &cs, &ctx, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn cost_policy_formula() {
        let p = CostPolicy { overlap_weight: 2.0, ..Default::default() };
        let r = req(10);
        let mut a = cand(0);
        a.matched_blocks = 10;
        a.matched_by_tier = [4, 5, 1]; // credit 4 + 4 + 0.5 = 8.5 -> prefill 1.5
        a.load.decode_blocks = 20; // cost 2*1.5 + 20 = 23
        let mut b = cand(1);
        b.load.decode_blocks = 3; // prefill 10, cost 23 too
        let mut c = cand(2);
        c.matched_blocks = 4;
        c.load.decode_blocks = 7; // prefill 6, cost 19
        let cs = [a, b, c];
        let mut rows = vec![0.0; 9];
        let mut totals = vec![0.0; 3];
        p.evaluate(&r, &cs, &mut rows, &mut totals);
        close(&rows[0..3], &[1.5, 10.0, 6.0]);
        close(&rows[3..6], &[20.0, 3.0, 7.0]);
        close(&rows[6..9], &[23.0, 23.0, 19.0]);
        // x = (cost - 19) / 4 -> totals 1 - x
        close(&totals, &[0.0, 0.0, 1.0]);
        // Equal costs: all 1.
        p.evaluate(&r, &[cand(0), cand(1)], &mut rows[..6], &mut totals[..2]);
        close(&totals[..2], &[1.0, 1.0]);
        assert!(CostPolicy { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(CostPolicy { overlap_weight: f64::NAN, ..Default::default() }.validate().is_err());
    }
}
