//! The router facade: owns the workers, the hasher, the prefix index, the cache models
//! (approximate and hybrid modes), the session table and the scoring profile.
//!
//! # Request path
//!
//! [`Router::route`] hashes the tokens (per-thread scratch, no allocation per block),
//! matches the keys against the index under a *read* lock, builds one
//! [`Candidate`](crate::score::Candidate) per live worker from the match and the worker's
//! load (atomics), and lets the profile filter, score and pick. Nothing on this path takes
//! a write lock except the session table's short record at the end, and only for requests
//! that carry a session key.
//!
//! # Lifecycle
//!
//! The host reports what happens to a routed request: [`Router::on_routed`] (it was sent:
//! the worker's running count and in-flight prefill tokens grow; in approximate and hybrid
//! modes the worker's cache model takes the request's blocks), [`Router::on_first_token`]
//! (prefill is done) and [`Router::on_finished`] (the request left the worker: its model
//! blocks are freed, in vLLM's order). Load reports scraped from the engines
//! ([`Router::report_load`]) override the tracked waiting/running/usage figures.
//!
//! # Event path
//!
//! [`Router::apply_events`] validates a whole batch first (worker, block size, token
//! counts, engine-hash check) and only then applies it under the index write lock, so a
//! bad batch changes nothing.

mod config;
mod events;
mod metrics;
mod snapshot;

pub use config::{Mode, OnHashMismatch, ProfileSpec, RouterConfig, WorkerConfig};
pub use events::{ApplyReport, APPLY_CHUNK, MAX_AUTO_RANK};
pub use metrics::{RouterMetrics, WorkerMetrics};

use crate::error::{Error, Result};
use crate::hash::{BlockHasher, RequestExtras};
use crate::index::{IndexStats, MatchOptions, Matches, PrefixIndex};
use crate::model::BlockPool;
use crate::rng::{splitmix64, SplitMix64};
use crate::score::{
    Candidate, Load, LoraSet, Profile, RequestInfo, ScoreContext, ScoreScratch, SessionTable,
};
use crate::types::{BlockKey, Tier, WorkerId, WorkerKey};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// A request to route.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// The prompt's token ids.
    pub tokens: &'a [u32],
    /// A session key: the client IP or a session id.
    pub session: Option<&'a str>,
    /// The LoRA adapter's name, if any (used for LoRA affinity and, in vLLM schemes,
    /// folded into the hash together with `extras`).
    pub lora: Option<&'a str>,
    /// Extra hash inputs (LoRA path, cache salt, multimodal items, prompt embeddings).
    pub extras: Option<&'a RequestExtras>,
    /// The arrival time in milliseconds; `None` uses the wall clock.
    pub now_ms: Option<u64>,
}

impl<'a> Request<'a> {
    /// A request for `tokens` with nothing else set.
    pub fn new(tokens: &'a [u32]) -> Self {
        Request { tokens, ..Request::default() }
    }
}

/// One candidate's part of a decision. Its worker's name and its per-scorer scores are on
/// the [`Decision`] ([`Decision::candidate_worker`], [`Decision::candidate_scores`]), so
/// that routing does not allocate per candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidateScore {
    /// The worker's dense id.
    pub worker_id: WorkerId,
    /// Blocks of the prompt the worker holds (longest prefix).
    pub matched_blocks: u32,
    /// Of those, by best tier: GPU, CPU, disk.
    pub matched_by_tier: [u32; 3],
    /// The combined total.
    pub total: f64,
}

/// One candidate, spelled out with names (see [`Decision::explain`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateExplanation {
    /// The worker.
    pub worker: WorkerKey,
    /// Blocks of the prompt the worker holds (longest prefix).
    pub matched_blocks: u32,
    /// Of those, by best tier: GPU, CPU, disk.
    pub matched_by_tier: [u32; 3],
    /// Each scorer's score (or the cost policy's rows), by name.
    pub scores: Vec<(String, f64)>,
    /// The combined total.
    pub total: f64,
}

/// The router's choice for one request, with every candidate's scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// An id for lifecycle calls ([`Router::on_routed`] and after).
    pub request_id: u64,
    /// The chosen worker.
    pub worker: WorkerKey,
    /// The chosen worker's dense id.
    pub worker_id: WorkerId,
    /// Blocks of the prompt the chosen worker holds.
    pub matched_blocks: u32,
    /// Full blocks in the prompt.
    pub total_blocks: u32,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Every candidate that passed the filters.
    pub candidates: Vec<CandidateScore>,
    /// The prompt's block keys (kept only in approximate and hybrid modes, where
    /// [`Router::on_routed`] feeds them to the cache model).
    pub keys: Vec<BlockKey>,
    /// Worker names by dense id, as the registry had them at decision time (shared).
    names: Arc<[Option<WorkerKey>]>,
    /// Names of the score rows (shared by every decision of a router).
    score_names: Arc<[String]>,
    /// `candidates.len() x score_names.len()` scores, candidate-major.
    scores: Vec<f64>,
}

impl Decision {
    /// The names of the per-candidate scores (the profile's scorers, or the cost policy's
    /// rows), in the order of [`candidate_scores`](Self::candidate_scores).
    pub fn score_names(&self) -> &[String] {
        &self.score_names
    }

    /// Candidate `i`'s scores, aligned with [`score_names`](Self::score_names); empty if
    /// `i` is out of range.
    pub fn candidate_scores(&self, i: usize) -> &[f64] {
        let n = self.score_names.len();
        self.scores.get(i * n..(i + 1) * n).unwrap_or(&[])
    }

    /// Candidate `i`'s worker.
    pub fn candidate_worker(&self, i: usize) -> Option<&WorkerKey> {
        let c = self.candidates.get(i)?;
        self.names.get(c.worker_id.index())?.as_ref()
    }

    /// Every candidate with its worker name and named scores, for logs.
    pub fn explain(&self) -> Vec<CandidateExplanation> {
        (0..self.candidates.len())
            .map(|i| {
                let c = &self.candidates[i];
                CandidateExplanation {
                    worker: self
                        .candidate_worker(i)
                        .cloned()
                        .unwrap_or_else(|| WorkerKey::new(format!("#{}", c.worker_id.0), 0)),
                    matched_blocks: c.matched_blocks,
                    matched_by_tier: c.matched_by_tier,
                    scores: self
                        .score_names
                        .iter()
                        .cloned()
                        .zip(self.candidate_scores(i).iter().copied())
                        .collect(),
                    total: c.total,
                }
            })
            .collect()
    }
}

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Decision", 7)?;
        st.serialize_field("request_id", &self.request_id)?;
        st.serialize_field("worker", &self.worker)?;
        st.serialize_field("matched_blocks", &self.matched_blocks)?;
        st.serialize_field("total_blocks", &self.total_blocks)?;
        st.serialize_field("prompt_tokens", &self.prompt_tokens)?;
        st.serialize_field("candidates", &self.explain())?;
        st.end()
    }
}

/// A load report pushed by the host, for example scraped from vLLM's `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadReport {
    /// `vllm:num_requests_waiting`.
    pub waiting: Option<u32>,
    /// `vllm:num_requests_running`.
    pub running: Option<u32>,
    /// `vllm:kv_cache_usage_perc`, 0..1.
    pub kv_usage: Option<f64>,
    /// LoRA adapters loaded on the worker.
    pub loras: Option<Vec<String>>,
}

/// Per-worker state. Counters are atomics so the request path never locks.
#[derive(Debug)]
pub(crate) struct WorkerState {
    pub(crate) key: WorkerKey,
    pub(crate) id: WorkerId,
    healthy: AtomicBool,
    draining: AtomicBool,
    // Tracked by lifecycle calls.
    running: AtomicU32,
    inflight_prefill: AtomicU64,
    decode_blocks: AtomicU64,
    // Reported by the host (u32::MAX / NaN bits = not reported).
    rep_waiting: AtomicU32,
    rep_running: AtomicU32,
    rep_kv_usage: AtomicU64,
    loras: RwLock<LoraSet>,
    pub(crate) decisions: AtomicU64,
    last_routed_ms: AtomicU64,
    pub(crate) hit_tokens: AtomicU64,
    pub(crate) has_events: AtomicBool,
    pub(crate) counters: Mutex<metrics::EventCounters>,
    model: Mutex<Option<WorkerModel>>,
}

/// A worker's cache model (approximate and hybrid modes).
#[derive(Debug)]
struct WorkerModel {
    pool: BlockPool,
    predictions_skipped: u64,
}

impl WorkerState {
    fn new(key: WorkerKey, id: WorkerId, model: Option<BlockPool>) -> Self {
        WorkerState {
            key,
            id,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            running: AtomicU32::new(0),
            inflight_prefill: AtomicU64::new(0),
            decode_blocks: AtomicU64::new(0),
            rep_waiting: AtomicU32::new(u32::MAX),
            rep_running: AtomicU32::new(u32::MAX),
            rep_kv_usage: AtomicU64::new(f64::NAN.to_bits()),
            loras: RwLock::new(LoraSet::new()),
            decisions: AtomicU64::new(0),
            last_routed_ms: AtomicU64::new(u64::MAX),
            hit_tokens: AtomicU64::new(0),
            has_events: AtomicBool::new(false),
            counters: Mutex::new(metrics::EventCounters::default()),
            model: Mutex::new(model.map(|pool| WorkerModel { pool, predictions_skipped: 0 })),
        }
    }

    fn load(&self, model_usage: Option<f64>) -> Load {
        let rep_w = self.rep_waiting.load(Ordering::Relaxed);
        let rep_r = self.rep_running.load(Ordering::Relaxed);
        let rep_u = f64::from_bits(self.rep_kv_usage.load(Ordering::Relaxed));
        let tracked = self.running.load(Ordering::Relaxed);
        Load {
            waiting: if rep_w == u32::MAX { 0 } else { rep_w },
            running: if rep_r == u32::MAX { tracked } else { rep_r },
            inflight_prefill_tokens: self.inflight_prefill.load(Ordering::Relaxed),
            kv_usage: if rep_u.is_nan() { model_usage.unwrap_or(0.0) } else { rep_u },
            decode_blocks: self.decode_blocks.load(Ordering::Relaxed),
        }
    }
}

/// The registry of workers: dense ids, names, states.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) slots: Vec<Option<Arc<WorkerState>>>,
    pub(crate) by_key: HashMap<WorkerKey, WorkerId>,
    /// Worker names by id, rebuilt when workers come and go; decisions share it.
    names: Arc<[Option<WorkerKey>]>,
}

impl Registry {
    pub(crate) fn get(&self, key: &WorkerKey) -> Option<&Arc<WorkerState>> {
        let id = self.by_key.get(key)?;
        self.slots.get(id.index())?.as_ref()
    }
    fn live(&self) -> impl Iterator<Item = &Arc<WorkerState>> {
        self.slots.iter().flatten()
    }
    fn rebuild_names(&mut self) {
        self.names = self.slots.iter().map(|s| s.as_ref().map(|w| w.key.clone())).collect();
    }
}

/// A request in flight, for lifecycle load tracking.
#[derive(Debug, Clone)]
struct Inflight {
    worker: Arc<WorkerState>,
    prefill_tokens: u64,
    blocks: u64,
    prefill_done: bool,
    modelled: bool,
}

#[derive(Default)]
struct Scratch {
    keys: Vec<BlockKey>,
    matches: Matches,
    cands: Vec<Candidate>,
    score: ScoreScratch,
}

/// Attempts at the index read lock before a route blocks (see `Router::read_index`).
const READ_SPINS: u32 = 4096;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The router. `Send + Sync`: share it behind an `Arc` and call it from any thread.
pub struct Router {
    cfg: RouterConfig,
    hasher: BlockHasher,
    profile: Profile,
    score_names: Arc<[String]>,
    pub(crate) index: RwLock<PrefixIndex>,
    pub(crate) registry: RwLock<Registry>,
    sessions: RwLock<SessionTable>,
    inflight: Mutex<HashMap<u64, Inflight>>,
    /// The next request id; also numbers the decisions for their random streams.
    next_request: AtomicU64,
    pub(crate) metrics: metrics::Counters,
    /// Serializes event batches with each other and with snapshots (see `apply_ops`).
    pub(crate) apply_lock: Mutex<()>,
    /// Publisher stream positions recorded by the event transport (for snapshots).
    pub(crate) streams: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("mode", &self.cfg.mode)
            .field("hash_algo", &self.cfg.hash_algo)
            .field("workers", &self.registry.read().by_key.len())
            .finish_non_exhaustive()
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Router {
    /// Builds a router from a configuration.
    pub fn new(cfg: RouterConfig) -> Result<Router> {
        let hasher = BlockHasher::new(cfg.hash_config())?;
        let profile = cfg.profile.resolve()?.build()?;
        if cfg.session_capacity == 0 {
            return Err(Error::config("session_capacity must be positive"));
        }
        let sessions = SessionTable::new(cfg.session_capacity, cfg.session_ttl_s * 1000)?;
        if cfg.mode != Mode::Precise {
            // Validate the default capacity now rather than at the first worker.
            cfg.capacity.num_gpu_blocks(cfg.block_size)?;
        }
        let score_names = profile.row_names().into_iter().map(String::from).collect();
        let router = Router {
            hasher,
            profile,
            score_names,
            index: RwLock::new(PrefixIndex::new(cfg.index.clone())),
            registry: RwLock::new(Registry::default()),
            sessions: RwLock::new(sessions),
            inflight: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(0),
            metrics: metrics::Counters::default(),
            apply_lock: Mutex::new(()),
            streams: Mutex::new(Default::default()),
            cfg,
        };
        for w in router.cfg.workers.clone() {
            router.add_worker_with(&w.name, w.dp_rank, w.capacity.as_ref())?;
        }
        Ok(router)
    }

    /// Builds a router from a JSON configuration ([`RouterConfig`]).
    pub fn from_json(json: &str) -> Result<Router> {
        Router::new(RouterConfig::from_json(json)?)
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The block hasher.
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    // ----- workers -----------------------------------------------------------------

    /// Adds a worker (name and data-parallel rank) with the default capacity.
    pub fn add_worker(&self, name: &str, dp_rank: u32) -> Result<WorkerId> {
        self.add_worker_with(name, dp_rank, None)
    }

    /// Adds a worker with an explicit capacity for its cache model.
    pub fn add_worker_with(
        &self,
        name: &str,
        dp_rank: u32,
        capacity: Option<&crate::model::CapacitySpec>,
    ) -> Result<WorkerId> {
        if name.is_empty() {
            return Err(Error::invalid("worker name must not be empty"));
        }
        let key = WorkerKey::new(name, dp_rank);
        let model = if self.cfg.mode == Mode::Precise {
            None
        } else {
            let cap = capacity.unwrap_or(&self.cfg.capacity);
            let blocks = cap.num_gpu_blocks(self.cfg.block_size)?;
            Some(BlockPool::new(blocks, self.cfg.block_size, true)?)
        };
        let mut reg = self.registry.write();
        if reg.by_key.contains_key(&key) {
            return Err(Error::WorkerExists(key.to_string()));
        }
        let slot = reg.slots.iter().position(Option::is_none);
        let id = WorkerId(slot.unwrap_or(reg.slots.len()) as u32);
        if id.0 > crate::index::MAX_WORKER {
            return Err(Error::invalid("too many workers"));
        }
        let state = Arc::new(WorkerState::new(key.clone(), id, model));
        match slot {
            Some(i) => reg.slots[i] = Some(state),
            None => reg.slots.push(Some(state)),
        }
        reg.by_key.insert(key, id);
        reg.rebuild_names();
        Ok(id)
    }

    /// Removes a worker: its index entries, session entries and in-flight requests go.
    pub fn remove_worker(&self, name: &str, dp_rank: u32) -> Result<()> {
        let key = WorkerKey::new(name, dp_rank);
        let id = {
            let mut reg = self.registry.write();
            let id =
                reg.by_key.remove(&key).ok_or_else(|| Error::UnknownWorker(key.to_string()))?;
            reg.slots[id.index()] = None;
            reg.rebuild_names();
            id
        };
        // Under apply_lock, so that no event batch or prediction for the removed worker
        // is half way through: those re-check the registry under the same lock and drop
        // their work if their worker is gone, so a reused id never inherits blocks.
        {
            let _batch = self.apply_lock.lock();
            self.index.write().remove_worker(id);
        }
        self.sessions.write().remove_worker(id);
        self.inflight.lock().retain(|_, f| f.worker.id != id);
        Ok(())
    }

    /// Drops every index entry of every data-parallel rank of worker `name` (for example
    /// when its event stream restarted or a gap could not be replayed); new events
    /// rebuild them. Returns the (block, worker) pairs dropped.
    pub fn clear_worker(&self, name: &str) -> Result<u64> {
        let ids: Vec<WorkerId> = self
            .registry
            .read()
            .slots
            .iter()
            .flatten()
            .filter(|w| w.key.name == name)
            .map(|w| w.id)
            .collect();
        if ids.is_empty() {
            return Err(Error::UnknownWorker(name.to_string()));
        }
        let mut index = self.index.write();
        Ok(ids.into_iter().map(|id| index.clear_worker(id)).sum())
    }

    /// Marks a worker healthy or not; unhealthy workers are filtered out by profiles with
    /// the `healthy` filter (all presets).
    pub fn set_healthy(&self, name: &str, dp_rank: u32, healthy: bool) -> Result<()> {
        let w = self.worker(name, dp_rank)?;
        w.healthy.store(healthy, Ordering::Relaxed);
        Ok(())
    }

    /// Drains a worker: it gets no new requests (it is reported unhealthy to filters) but
    /// keeps its index entries and in-flight requests.
    pub fn drain_worker(&self, name: &str, dp_rank: u32, draining: bool) -> Result<()> {
        let w = self.worker(name, dp_rank)?;
        w.draining.store(draining, Ordering::Relaxed);
        Ok(())
    }

    /// Pushes a load report for a worker.
    pub fn report_load(&self, name: &str, dp_rank: u32, report: &LoadReport) -> Result<()> {
        if let Some(u) = report.kv_usage {
            if !(0.0..=1.0).contains(&u) {
                return Err(Error::invalid(format!("kv_usage {u} is outside 0..1")));
            }
        }
        let loras = match &report.loras {
            Some(names) => Some(LoraSet::from_names(names.iter().map(String::as_str))?),
            None => None,
        };
        let w = self.worker(name, dp_rank)?;
        if let Some(v) = report.waiting {
            w.rep_waiting.store(v.min(u32::MAX - 1), Ordering::Relaxed);
        }
        if let Some(v) = report.running {
            w.rep_running.store(v.min(u32::MAX - 1), Ordering::Relaxed);
        }
        if let Some(u) = report.kv_usage {
            w.rep_kv_usage.store(u.to_bits(), Ordering::Relaxed);
        }
        if let Some(set) = loras {
            *w.loras.write() = set;
        }
        Ok(())
    }

    /// The registered workers, ordered by id.
    pub fn workers(&self) -> Vec<WorkerKey> {
        self.registry.read().live().map(|w| w.key.clone()).collect()
    }

    pub(crate) fn worker(&self, name: &str, dp_rank: u32) -> Result<Arc<WorkerState>> {
        let key = WorkerKey::new(name, dp_rank);
        self.registry.read().get(&key).cloned().ok_or_else(|| Error::UnknownWorker(key.to_string()))
    }

    // ----- hashing -----------------------------------------------------------------

    /// The block keys the router uses for `tokens` (full blocks only).
    pub fn block_keys(&self, tokens: &[u32], extras: Option<&RequestExtras>) -> Result<Vec<u64>> {
        self.check_tokens(tokens)?;
        let mut out = Vec::new();
        self.hash_into(tokens, None, extras, &mut out);
        Ok(out)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(v) = self.cfg.vocab_size {
            if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t >= v) {
                return Err(Error::invalid(format!(
                    "token id {t} at position {i} is outside the vocabulary (size {v})"
                )));
            }
        }
        Ok(())
    }

    fn hash_into(
        &self,
        tokens: &[u32],
        lora: Option<&str>,
        extras: Option<&RequestExtras>,
        out: &mut Vec<u64>,
    ) {
        static NONE: std::sync::OnceLock<RequestExtras> = std::sync::OnceLock::new();
        match (extras, lora) {
            (Some(e), _) => self.hasher.block_keys(tokens, e, out),
            (None, Some(name)) => {
                let e = RequestExtras {
                    lora: Some(crate::hash::Lora { name: name.to_string(), path: None }),
                    ..RequestExtras::default()
                };
                self.hasher.block_keys(tokens, &e, out)
            }
            (None, None) => {
                self.hasher.block_keys(tokens, NONE.get_or_init(RequestExtras::default), out)
            }
        }
    }

    // ----- routing -----------------------------------------------------------------

    /// Chooses a worker for `req`. See the [module documentation](self).
    pub fn route(&self, req: &Request) -> Result<Decision> {
        self.check_tokens(req.tokens)?;
        let now = req.now_ms.unwrap_or_else(wall_ms);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let s = &mut *s;
            let need_prefix = self.profile.needs_prefix();
            let keep_keys = self.cfg.mode != Mode::Precise;
            if need_prefix || keep_keys {
                self.hash_into(req.tokens, req.lora, req.extras, &mut s.keys);
            } else {
                s.keys.clear();
            }
            let total_blocks = (req.tokens.len() / self.cfg.block_size) as u32;
            if need_prefix && !s.keys.is_empty() {
                self.read_index().find_matches(&s.keys, MatchOptions::default(), &mut s.matches);
            } else {
                s.matches = Matches::new();
            }
            let reg = self.registry.read();
            s.cands.clear();
            // Live workers come in id order and overlaps are sorted by id: merge them.
            let overlaps = s.matches.overlaps();
            let mut j = 0;
            for w in reg.live() {
                while j < overlaps.len() && overlaps[j].worker < w.id {
                    j += 1;
                }
                let m = overlaps.get(j).filter(|o| o.worker == w.id);
                let last = w.last_routed_ms.load(Ordering::Relaxed);
                let usage = if self.cfg.mode == Mode::Precise {
                    None
                } else {
                    w.model.try_lock().and_then(|m| m.as_ref().map(|m| m.pool.usage()))
                };
                s.cands.push(Candidate {
                    worker: w.id,
                    matched_blocks: m.map_or(0, |o| o.blocks),
                    matched_by_tier: m.map_or([0; 3], |o| o.by_tier),
                    load: w.load(usage),
                    loaded_loras: if req.lora.is_some() { *w.loras.read() } else { LoraSet::new() },
                    last_routed_ms: (last != u64::MAX).then_some(last),
                    healthy: w.healthy.load(Ordering::Relaxed)
                        && !w.draining.load(Ordering::Relaxed),
                });
            }
            if s.cands.is_empty() {
                return Err(Error::NoWorkers("no workers are registered".into()));
            }
            let info = RequestInfo {
                prompt_tokens: req.tokens.len() as u32,
                total_blocks,
                session: req.session,
                lora: req.lora,
                now_ms: now,
            };
            let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let mut rng = SplitMix64::new(splitmix64(self.cfg.seed ^ splitmix64(request_id)));
            let decision = {
                let sessions = self.sessions.read();
                let ctx = ScoreContext::new(&sessions);
                self.profile.decide(&info, &s.cands, &ctx, &mut rng, &mut s.score)?
            };
            let chosen = reg.slots[decision.worker.index()]
                .as_ref()
                .ok_or_else(|| Error::Internal("chosen worker vanished".into()))?;
            // The explanation: one Copy entry per kept candidate and one flat score matrix,
            // so a decision costs two allocations however many workers there are.
            let (kept, totals, rows) = (s.score.kept(), s.score.totals(), s.score.n_rows());
            let mut candidates = Vec::with_capacity(kept.len());
            let mut scores = Vec::with_capacity(kept.len() * rows);
            for (pos, &ci) in kept.iter().enumerate() {
                let c = &s.cands[ci];
                candidates.push(CandidateScore {
                    worker_id: c.worker,
                    matched_blocks: c.matched_blocks,
                    matched_by_tier: c.matched_by_tier,
                    total: totals[pos],
                });
                scores.extend((0..rows).map(|j| s.score.row(j)[pos]));
            }
            let matched = s.cands[decision.index].matched_blocks;
            chosen.decisions.fetch_add(1, Ordering::Relaxed);
            chosen.last_routed_ms.store(now, Ordering::Relaxed);
            let hit_tokens = u64::from(matched) * self.cfg.block_size as u64;
            chosen.hit_tokens.fetch_add(hit_tokens, Ordering::Relaxed);
            self.metrics.record_route(info.prompt_tokens, hit_tokens);
            if let Some(key) = req.session {
                self.sessions.write().record(key, chosen.id, now);
            }
            Ok(Decision {
                request_id,
                worker: chosen.key.clone(),
                worker_id: chosen.id,
                matched_blocks: matched,
                total_blocks,
                prompt_tokens: info.prompt_tokens,
                candidates,
                keys: if keep_keys { s.keys.clone() } else { Vec::new() },
                names: reg.names.clone(),
                score_names: self.score_names.clone(),
                scores,
            })
        })
    }

    /// The index read lock for the request path. Event batches hold the write lock for at
    /// most one chunk of [`APPLY_CHUNK`] blocks (a few microseconds), so spinning that long
    /// is cheaper than parking the thread, whose wake-up alone costs tens of microseconds
    /// on a virtual machine. Past the spin budget it blocks like any reader.
    fn read_index(&self) -> parking_lot::RwLockReadGuard<'_, PrefixIndex> {
        for i in 0..READ_SPINS {
            if let Some(g) = self.index.try_read() {
                return g;
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.index.read()
    }

    // ----- lifecycle ---------------------------------------------------------------

    /// The request of `decision` was sent to its worker. Tracks load, and in approximate
    /// and hybrid modes runs the request through the worker's cache model, whose stores
    /// and evictions update the index. Calling it twice for one request is an error.
    pub fn on_routed(&self, decision: &Decision) -> Result<()> {
        let worker = self
            .registry
            .read()
            .slots
            .get(decision.worker_id.index())
            .and_then(|s| s.clone())
            .filter(|w| w.key == decision.worker)
            .ok_or_else(|| Error::UnknownWorker(decision.worker.to_string()))?;
        let prompt = u64::from(decision.prompt_tokens);
        let cached = u64::from(decision.matched_blocks) * self.cfg.block_size as u64;
        let prefill = prompt.saturating_sub(cached.min(prompt.saturating_sub(1)));
        let blocks = prompt.div_ceil(self.cfg.block_size as u64);
        let predict = match self.cfg.mode {
            Mode::Precise => false,
            Mode::Approximate => true,
            Mode::Hybrid => !worker.has_events.load(Ordering::Relaxed),
        };
        {
            let mut inflight = self.inflight.lock();
            if inflight.contains_key(&decision.request_id) {
                return Err(Error::invalid(format!(
                    "request {} was already reported as routed",
                    decision.request_id
                )));
            }
            inflight.insert(
                decision.request_id,
                Inflight {
                    worker: worker.clone(),
                    prefill_tokens: prefill,
                    blocks,
                    prefill_done: false,
                    modelled: predict,
                },
            );
            // Inside the lock: on_first_token/on_finished for this id (which take it too)
            // must never subtract before these adds.
            worker.running.fetch_add(1, Ordering::Relaxed);
            worker.inflight_prefill.fetch_add(prefill, Ordering::Relaxed);
        }
        if predict {
            self.predict(&worker, decision);
        }
        Ok(())
    }

    /// Runs a routed request through the worker's cache model and applies its events.
    fn predict(&self, worker: &WorkerState, decision: &Decision) {
        let mut guard = worker.model.lock();
        let Some(model) = guard.as_mut() else {
            return;
        };
        let tokens = decision.prompt_tokens as usize;
        if tokens == 0 {
            return;
        }
        match model.pool.allocate(decision.request_id, &decision.keys, tokens) {
            Ok(Some(_)) => {
                let n = decision.keys.len();
                let _ = model.pool.cache_blocks(decision.request_id, &decision.keys, n);
            }
            _ => {
                model.predictions_skipped += 1;
                return;
            }
        }
        let events = model.pool.drain_events();
        drop(guard);
        self.apply_pool_events(worker, events);
    }

    fn apply_pool_events(&self, worker: &WorkerState, events: Vec<crate::model::PoolEvent>) {
        use crate::model::PoolEvent;
        if events.is_empty() {
            return;
        }
        let _batch = self.apply_lock.lock();
        // The worker may have been removed (its id possibly reused), or, in hybrid mode,
        // its first events may have arrived since the prediction was made: events win.
        if !self.is_registered(worker)
            || (self.cfg.mode == Mode::Hybrid && worker.has_events.load(Ordering::Relaxed))
        {
            return;
        }
        let id = worker.id;
        let mut index = self.index.write();
        for e in events {
            match e {
                PoolEvent::Stored { keys, parent } => {
                    let _ = index.store(id, Tier::Gpu, parent, &keys);
                }
                PoolEvent::Removed { keys } => {
                    index.remove(id, Tier::Gpu, &keys);
                }
                PoolEvent::Cleared => {
                    index.clear_worker(id);
                }
            }
        }
    }

    /// True when `worker` is still the registered worker of its id.
    pub(crate) fn is_registered(&self, worker: &WorkerState) -> bool {
        self.registry
            .read()
            .slots
            .get(worker.id.index())
            .and_then(|s| s.as_deref())
            .is_some_and(|w| std::ptr::eq(w, worker))
    }

    /// The first token of the request came back: its prefill is done.
    pub fn on_first_token(&self, request_id: u64) -> Result<()> {
        let mut inflight = self.inflight.lock();
        let f = inflight
            .get_mut(&request_id)
            .ok_or_else(|| Error::invalid(format!("unknown request id {request_id}")))?;
        if !f.prefill_done {
            f.prefill_done = true;
            f.worker.inflight_prefill.fetch_sub(f.prefill_tokens, Ordering::Relaxed);
            f.worker.decode_blocks.fetch_add(f.blocks, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The request finished (or failed): it leaves the worker's load, and its model blocks
    /// are freed.
    pub fn on_finished(&self, request_id: u64) -> Result<()> {
        let f = self
            .inflight
            .lock()
            .remove(&request_id)
            .ok_or_else(|| Error::invalid(format!("unknown request id {request_id}")))?;
        if f.prefill_done {
            f.worker.decode_blocks.fetch_sub(f.blocks, Ordering::Relaxed);
        } else {
            f.worker.inflight_prefill.fetch_sub(f.prefill_tokens, Ordering::Relaxed);
        }
        f.worker.running.fetch_sub(1, Ordering::Relaxed);
        if f.modelled {
            let mut guard = f.worker.model.lock();
            if let Some(m) = guard.as_mut() {
                m.pool.free(request_id);
                let events = m.pool.drain_events();
                drop(guard);
                self.apply_pool_events(&f.worker, events);
            }
        }
        Ok(())
    }

    /// Requests reported routed and not yet finished.
    pub fn inflight_requests(&self) -> usize {
        self.inflight.lock().len()
    }

    // ----- state -------------------------------------------------------------------

    /// Index statistics.
    pub fn index_stats(&self) -> IndexStats {
        self.index.read().stats()
    }

    /// Records the last sequence number applied from an event publisher (the transport
    /// calls this), so that snapshots can say where to resume.
    pub fn set_stream_position(&self, publisher: &str, seq: u64) {
        self.streams.lock().insert(publisher.to_string(), seq);
    }

    /// The recorded stream positions.
    pub fn stream_positions(&self) -> std::collections::BTreeMap<String, u64> {
        self.streams.lock().clone()
    }
}
