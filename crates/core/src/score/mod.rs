//! Scoring: filters, scorers and pickers that turn prefix matches and load into a decision.
//!
//! A request is routed in three steps, all driven by a [`Profile`]:
//!
//! 1. **filters** ([`Filter`]) drop candidates that must not be chosen (unhealthy workers,
//!    workers without the request's LoRA adapter, workers with a queue that is too long);
//! 2. **scorers** ([`Scorer`]) give every remaining candidate a score in `[0, 1]`, one row per
//!    scorer; the total of a candidate is `sum(weight_i * clamp(score_i, 0, 1))`
//!    (see [`combine_into`]);
//! 3. a **picker** ([`Picker`]) turns the totals into one choice (max with a uniform random
//!    tie-break, softmax with a temperature, weighted random, round-robin).
//!
//! A profile may instead be of the *cost* kind ([`CostPolicy`]), modelled on NVIDIA Dynamo's
//! KV router: cost = `overlap_weight * prefill blocks left + decode blocks`, lowest cost wins
//! or softmax sampling over normalized negative costs.
//!
//! Profiles are configured by JSON ([`ProfileConfig`]) or built from presets
//! ([`ProfileConfig::preset`]). Every decision can be explained: the scratch space keeps the
//! per-scorer scores and the totals of every kept candidate ([`Profile::explain`]).
//!
//! The inputs ([`RequestInfo`], [`Candidate`], [`ScoreContext`]) are plain data that the
//! router fills from its index, its load tracking and its [`SessionTable`].
//!
//! ```
//! use kvroute::rng::SplitMix64;
//! use kvroute::score::{Candidate, ProfileConfig, RequestInfo, ScoreContext, ScoreScratch};
//! use kvroute::score::SessionTable;
//! use kvroute::WorkerId;
//!
//! let profile = ProfileConfig::preset("llm-d")?.build()?;
//! let sessions = SessionTable::default();
//! let mut warm = Candidate::new(WorkerId(0));
//! warm.matched_blocks = 6; // 6 of the prompt's 8 full blocks are cached there
//! let cold = Candidate::new(WorkerId(1));
//! let req = RequestInfo { prompt_tokens: 130, total_blocks: 8, ..Default::default() };
//! let mut scratch = ScoreScratch::new();
//! let ctx = ScoreContext::new(&sessions);
//! let d = profile.decide(&req, &[warm, cold], &ctx, &mut SplitMix64::new(7), &mut scratch)?;
//! // prefix 3 * 6/8 + queue 2 * 1 + KV 2 * 1 = 6.25 against 0 + 2 + 2 = 4.
//! assert_eq!(d.worker, WorkerId(0));
//! assert_eq!(scratch.totals(), &[6.25, 4.0]);
//! let why = profile.explain(&scratch);
//! assert_eq!(why.rows[0], ("prefix", &[0.75, 0.0][..]));
//! # Ok::<(), kvroute::Error>(())
//! ```

pub mod builtin;
pub mod filters;
pub mod picker;
pub mod profile;
pub mod session;
pub mod ttft;

pub use builtin::{
    CostPolicy, KvUtilizationScorer, LoadNorm, LoraScorer, LruScorer, PrefillScorer, PrefixScorer,
    QueueScorer, RandomScorer, RunningScorer, SessionScorer, TierWeights,
};
pub use filters::{HealthyFilter, LoraLoadedFilter, MaxQueueFilter};
pub use picker::{MaxPicker, RoundRobinPicker, SoftmaxPicker, WeightedRandomPicker};
pub use profile::{
    Explanation, FilterConfig, Pick, PickerConfig, Profile, ProfileConfig, ProfileKind,
    ScorerConfig,
};
pub use session::{SessionLookup, SessionTable, ShardedSessionTable, SESSION_SHARDS};
pub use ttft::{TtftParams, TtftPolicy};

use crate::rng::SplitMix64;
use crate::types::WorkerId;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Two totals closer than this are a tie for [`MaxPicker`] (and the cost policy at
/// temperature 0), broken uniformly at random.
pub const TIE_EPSILON: f64 = 1e-9;

/// What the scorers know about the request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestInfo<'a> {
    /// Number of tokens in the prompt.
    pub prompt_tokens: u32,
    /// Number of full blocks in the prompt (only full blocks are cached and matched).
    pub total_blocks: u32,
    /// The session key: a client IP or a session id, if the caller has one.
    pub session: Option<&'a str>,
    /// The LoRA adapter the request asks for, if any.
    pub lora: Option<&'a str>,
    /// The request's arrival time in milliseconds (any monotonic epoch shared with the
    /// session table and `Candidate::last_routed_ms`).
    pub now_ms: u64,
    /// Leading prompt blocks that more than a fair share (1/N of N live workers) of the
    /// router's recent requests contain: a prefix that must be held by several workers.
    /// Read by the `ttft` picker's balance guard; 0 when the router does not count.
    pub shared_blocks: u32,
    /// The share of the router's recent requests that contain the last of the
    /// `shared_blocks` (0 when there are none): a prefix in a share `s` of the traffic
    /// needs `ceil(s x N)` holders for none of them to draw more than 1/N of it.
    pub shared_share: f64,
    /// The tail (the `ttft` picker's `tail_quantile`, p99 by default) of the router's
    /// recently observed times to first token, seconds (0: not known). The `ttft` picker
    /// keeps a request on the holder of its private history while the predicted TTFT there
    /// is within it.
    pub tail_ttft_s: f64,
}

/// Load of a worker as last reported by the host or tracked by lifecycle calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Load {
    /// Requests waiting in the worker's queue (vLLM `num_requests_waiting`).
    pub waiting: u32,
    /// Requests running on the worker (vLLM `num_requests_running`).
    pub running: u32,
    /// Prompt tokens routed to the worker whose prefill has not finished yet.
    pub inflight_prefill_tokens: u64,
    /// Fraction of the worker's KV cache in use, `0..=1` (vLLM `kv_cache_usage_perc`).
    pub kv_usage: f64,
    /// KV blocks held by requests in their decode phase (Dynamo's "active blocks").
    pub decode_blocks: u64,
    /// Prompt tokens queued or in prefill on the worker, never stale: the largest of the
    /// router's own in-flight prefill, the last scraped queue (priced at the router's mean
    /// uncached tokens per request) plus what the router sent since that scrape, and the
    /// router's own in-flight prefill plus the scraped waiting requests that are not its
    /// own (other router replicas'), at the mean.
    pub pending_prefill_tokens: u64,
    /// Requests waiting or running on the worker, never stale: the larger of the router's
    /// own in-flight count and the last scraped `waiting + running` plus what the router
    /// sent since that scrape.
    pub active_requests: u32,
    /// The prefill rate the router prices the worker at, tokens per second (0: not
    /// known): the pool's learned rate (every worker's observations together), or the
    /// worker's own learned rate when that differs from the pool's by more than a factor
    /// 2 (other hardware; see `router::predict::DISTINCT_RATE_FACTOR`).
    pub prefill_tokens_per_s: f64,
    /// The worker's eviction horizon, seconds: its cached blocks over the blocks it stores
    /// per second, both from its KV events (NaN or 0: not known). A block written there
    /// now is evicted after about this long unless it is used again.
    pub eviction_horizon_s: f64,
}

/// The 64-bit key of a LoRA adapter name (XXH3-64 of its UTF-8 bytes), as stored in
/// [`LoraSet`].
#[inline]
pub fn lora_key(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// The LoRA adapters loaded on a worker: a small inline set of adapter-name hashes
/// ([`lora_key`]), so that a [`Candidate`] stays free of heap allocations.
///
/// It holds at most [`LoraSet::CAPACITY`] adapters (vLLM's `--max-loras` defaults to 1, and
/// GPU-resident adapters are few).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct LoraSet {
    keys: [u64; LoraSet::CAPACITY],
    len: u8,
}

impl LoraSet {
    /// How many adapters the set can hold.
    pub const CAPACITY: usize = 8;

    /// An empty set.
    pub const fn new() -> Self {
        LoraSet { keys: [0; LoraSet::CAPACITY], len: 0 }
    }

    /// A set holding the given adapter names.
    ///
    /// Returns [`Error::InvalidInput`] if there are more than [`LoraSet::CAPACITY`] distinct
    /// names.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut s = LoraSet::new();
        for n in names {
            s.insert(n)?;
        }
        Ok(s)
    }

    /// Adds the adapter `name`; adding a name twice keeps one copy.
    ///
    /// Returns [`Error::InvalidInput`] if the set is full.
    pub fn insert(&mut self, name: &str) -> Result<()> {
        self.insert_key(lora_key(name))
    }

    /// Adds an adapter by its [`lora_key`].
    ///
    /// Returns [`Error::InvalidInput`] if the set is full.
    pub fn insert_key(&mut self, key: u64) -> Result<()> {
        if self.contains_key(key) {
            return Ok(());
        }
        if self.len() == Self::CAPACITY {
            return Err(Error::invalid(format!(
                "a worker can list at most {} loaded LoRA adapters",
                Self::CAPACITY
            )));
        }
        self.keys[self.len()] = key;
        self.len += 1;
        Ok(())
    }

    /// Removes the adapter `name`; returns whether it was present.
    pub fn remove(&mut self, name: &str) -> bool {
        let key = lora_key(name);
        let n = self.len();
        if let Some(pos) = self.keys[..n].iter().position(|&k| k == key) {
            self.keys[pos] = self.keys[n - 1];
            self.len -= 1;
            true
        } else {
            false
        }
    }

    /// Whether the adapter `name` is loaded.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.contains_key(lora_key(name))
    }

    /// Whether the adapter with this [`lora_key`] is loaded.
    #[inline]
    pub fn contains_key(&self, key: u64) -> bool {
        self.keys[..self.len()].contains(&key)
    }

    /// Number of adapters in the set.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys of the adapters in the set.
    pub fn keys(&self) -> &[u64] {
        &self.keys[..self.len()]
    }
}

impl std::fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys().iter().map(|k| format!("{k:016x}"))).finish()
    }
}

/// One candidate worker for a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The worker.
    pub worker: WorkerId,
    /// Length of the longest consecutive prefix of the prompt's blocks the worker holds, in
    /// any tier.
    pub matched_blocks: u32,
    /// Of `matched_blocks`, how many are held at best in each tier: GPU, CPU, disk. Blocks
    /// of `matched_blocks` not attributed here count as GPU.
    pub matched_by_tier: [u32; 3],
    /// The worker's load.
    pub load: Load,
    /// The LoRA adapters loaded on the worker.
    pub loaded_loras: LoraSet,
    /// When a request was last routed to the worker, if ever (same clock as
    /// [`RequestInfo::now_ms`]).
    pub last_routed_ms: Option<u64>,
    /// Whether the worker is healthy.
    pub healthy: bool,
}

impl Candidate {
    /// A healthy candidate for `worker` with no match, no load and no adapters.
    pub fn new(worker: WorkerId) -> Self {
        Candidate {
            worker,
            matched_blocks: 0,
            matched_by_tier: [0; 3],
            load: Load::default(),
            loaded_loras: LoraSet::new(),
            last_routed_ms: None,
            healthy: true,
        }
    }
}

/// Shared state owned by the router and handed to scorers.
#[derive(Clone, Copy, Debug)]
pub struct ScoreContext<'a> {
    /// The session-affinity table (read only during scoring; the router records the chosen
    /// worker with [`ShardedSessionTable::record`] after each decision, which also
    /// refreshes the entry's time to live). A [`SessionTable`] or the router's
    /// [`ShardedSessionTable`].
    pub sessions: &'a dyn SessionLookup,
    /// A fresh random value for this decision, for scorers that need randomness (the
    /// [`RandomScorer`]). [`Profile::decide`] overwrites it with a draw from its generator.
    pub seed: u64,
}

impl<'a> ScoreContext<'a> {
    /// A context over `sessions`.
    pub fn new(sessions: &'a dyn SessionLookup) -> Self {
        ScoreContext { sessions, seed: 0 }
    }
}

/// Drops candidates that must not be chosen.
pub trait Filter: Send + Sync {
    /// The filter's name, as used in configuration.
    fn name(&self) -> &str;
    /// Whether `cand` may serve `req`.
    fn keep(&self, req: &RequestInfo, cand: &Candidate) -> bool;
}

/// Scores candidates.
pub trait Scorer: Send + Sync {
    /// The scorer's name, as used in configuration and explanations.
    fn name(&self) -> &str;
    /// Writes one score in `[0, 1]` per candidate into `out` (`out.len() == cands.len()`,
    /// zero-filled on entry). Scoring is by batch so that scorers can normalize across
    /// candidates. Values outside `[0, 1]` are clamped by the combination, NaN counts as 0.
    fn score(&self, req: &RequestInfo, cands: &[Candidate], ctx: &ScoreContext, out: &mut [f64]);
    /// Whether the scorer reads `Candidate::matched_blocks` / `matched_by_tier`; profiles
    /// whose scorers all answer `false` let the router skip index matching.
    fn needs_prefix(&self) -> bool {
        false
    }
    /// Whether the scorer reads the session table.
    fn uses_sessions(&self) -> bool {
        false
    }
}

/// Turns totals into one choice.
pub trait Picker: Send + Sync {
    /// The picker's name, as used in configuration.
    fn name(&self) -> &str;
    /// The index of the chosen total. `totals` is never empty when called by
    /// [`Profile::decide`]; the result must be `< totals.len()`.
    fn pick(&self, totals: &[f64], rng: &mut SplitMix64) -> usize;
}

/// A score as the combination uses it: clamped to `[0, 1]`, NaN as 0.
#[inline]
pub fn sanitize_score(s: f64) -> f64 {
    if s.is_nan() {
        0.0
    } else {
        s.clamp(0.0, 1.0)
    }
}

/// The combination: clamps every score of `row` in place ([`sanitize_score`]) and adds
/// `weight * score` to `totals`, so that after all rows `totals[k] = sum(weight_i *
/// clamp(score_i[k], 0, 1))`.
///
/// `row` and `totals` must have the same length.
pub fn combine_into(weight: f64, row: &mut [f64], totals: &mut [f64]) {
    debug_assert_eq!(row.len(), totals.len());
    for (s, t) in row.iter_mut().zip(totals.iter_mut()) {
        *s = sanitize_score(*s);
        *t += weight * *s;
    }
}

/// Reusable buffers for [`Profile::decide`], so that routing does not allocate per call once
/// the buffers have grown. After a decision it holds the explanation of that decision.
#[derive(Clone, Debug, Default)]
pub struct ScoreScratch {
    /// Original indices of the kept candidates.
    pub(crate) kept: Vec<usize>,
    /// Copies of the kept candidates, used only when a filter dropped some.
    pub(crate) filtered: Vec<Candidate>,
    /// Row-major matrix: `rows[j * n + k]` is row `j`'s value for kept candidate `k`.
    pub(crate) rows: Vec<f64>,
    /// Number of rows in `rows`.
    pub(crate) n_rows: usize,
    /// Total per kept candidate.
    pub(crate) totals: Vec<f64>,
}

impl ScoreScratch {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Original indices (into the `cands` slice given to `decide`) of the candidates that
    /// passed the filters, in order.
    pub fn kept(&self) -> &[usize] {
        &self.kept
    }

    /// The total of each kept candidate (parallel to [`ScoreScratch::kept`]).
    pub fn totals(&self) -> &[f64] {
        &self.totals
    }

    /// Number of explanation rows (one per scorer, or the cost policy's rows).
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Row `j` of the explanation: one value per kept candidate. Empty if out of range.
    pub fn row(&self, j: usize) -> &[f64] {
        let n = self.kept.len();
        if j >= self.n_rows {
            return &[];
        }
        &self.rows[j * n..(j + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_set_inserts_dedups_and_bounds() {
        let mut s = LoraSet::new();
        s.insert("a").unwrap();
        s.insert("a").unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.contains("a"));
        assert!(!s.contains("b"));
        for i in 1..LoraSet::CAPACITY {
            s.insert(&format!("x{i}")).unwrap();
        }
        assert_eq!(s.len(), LoraSet::CAPACITY);
        assert!(matches!(s.insert("overflow"), Err(Error::InvalidInput(_))));
        assert!(s.remove("a"));
        assert!(!s.contains("a"));
        assert!(s.contains("x3"));
        assert_eq!(s.len(), LoraSet::CAPACITY - 1);
        assert!(!s.remove("a"));
    }

    #[test]
    fn combination_clamps_and_weights() {
        // Two rows over three candidates, with out-of-range and NaN values.
        let mut totals = vec![0.0; 3];
        let mut r1 = vec![0.5, 1.5, -0.2];
        let mut r2 = vec![f64::NAN, 0.25, 1.0];
        combine_into(3.0, &mut r1, &mut totals);
        combine_into(2.0, &mut r2, &mut totals);
        assert_eq!(r1, vec![0.5, 1.0, 0.0]);
        assert_eq!(r2, vec![0.0, 0.25, 1.0]);
        // 3*0.5 + 2*0 ; 3*1 + 2*0.25 ; 3*0 + 2*1
        assert_eq!(totals, vec![1.5, 3.5, 2.0]);
    }
}
