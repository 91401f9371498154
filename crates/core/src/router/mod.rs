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
//! that carry a session key; the table is sharded by key
//! ([`ShardedSessionTable`]), so two such requests rarely wait on each other.
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
//! counts, engine-hash check) and only then applies it, holding the index write lock over
//! at most [`APPLY_CHUNK`] blocks at a time (consecutive events share a hold) so that
//! routes never wait long; a bad batch changes nothing.

mod config;
mod events;
mod lifecycle;
mod metrics;
mod popular;
mod predict;
mod request;
mod route;
mod snapshot;
mod tail;
mod workers;

pub use config::{
    Mode, OnHashMismatch, ProfileSpec, RouterConfig, RouterConfigBuilder, WorkerConfig,
    MAX_SESSION_TTL_S,
};
pub use events::{ApplyReport, APPLY_CHUNK, MAX_AUTO_RANK};
pub use metrics::{RouterMetrics, WorkerMetrics};
pub use predict::{PredictionConfig, PredictionCounters};
pub use request::{CandidateExplanation, CandidateScore, Decision, LoadReport, Request};

use crate::error::{Error, Result};
use crate::hash::BlockHasher;
use crate::index::{IndexStats, PrefixIndex};
use crate::score::{Profile, ShardedSessionTable};
use hashbrown::HashMap;
use lifecycle::Inflight;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
pub(crate) use workers::{Registry, WorkerState};

/// The router. `Send + Sync`: share it behind an `Arc` and call it from any thread.
pub struct Router {
    cfg: RouterConfig,
    hasher: BlockHasher,
    profile: Profile,
    score_names: Arc<[String]>,
    pub(crate) index: RwLock<PrefixIndex>,
    pub(crate) registry: RwLock<Registry>,
    sessions: ShardedSessionTable,
    inflight: Mutex<HashMap<u64, Inflight>>,
    /// The next request id; also numbers the decisions for their random streams.
    next_request: AtomicU64,
    /// The time of the latest route (ms, the requests' clock): what a load report without
    /// a time is taken at (the `kvroute` preset's rule 12).
    latest_route_ms: AtomicU64,
    pub(crate) metrics: metrics::Counters,
    /// Serializes event batches with each other and with snapshots (see `apply_ops`).
    pub(crate) apply_lock: Mutex<()>,
    /// Publisher stream positions recorded by the event transport (for snapshots).
    pub(crate) streams: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Predicted residency (precise mode; see [`predict`]).
    pub(crate) overlay: RwLock<predict::Overlay>,
    /// Mean uncached prompt tokens per routed request (f64 bits), to price a scraped
    /// waiting request.
    pub(crate) mean_uncached: AtomicU64,
    /// The prefill rate of the pool: every worker's observations together, from the
    /// configured default. A worker not yet observed is assumed to be as fast as the
    /// workers observed so far (see [`predict`]).
    pub(crate) pool_learn: Mutex<predict::Learner>,
    /// [`pool_learn`](Self::pool_learn)'s rate (f64 bits), for the request path.
    pub(crate) pool_rate_bits: AtomicU64,
    /// Which prompt prefixes recent traffic shares (for the `ttft` picker's guard).
    pub(crate) popular: popular::Popularity,
    /// The tail (p90) of observed times to first token (for the `ttft` picker).
    pub(crate) tail: tail::Tail,
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

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Router {
    /// Builds a router from a configuration.
    pub fn new(cfg: RouterConfig) -> Result<Router> {
        cfg.validate()?;
        let hasher = BlockHasher::new(cfg.hash_config())?;
        let mut profile = cfg.profile.resolve()?.build()?;
        profile.set_block_size(cfg.block_size);
        cfg.predictions.validate()?;
        if cfg.session_capacity == 0 {
            return Err(Error::config("session_capacity must be positive"));
        }
        let sessions = ShardedSessionTable::new(cfg.session_capacity, cfg.session_ttl_s * 1000)?;
        if cfg.mode != Mode::Precise {
            // Validate the default capacity now rather than at the first worker.
            cfg.capacity.num_gpu_blocks(cfg.block_size)?;
        }
        let score_names = profile.row_names().into_iter().map(String::from).collect();
        let ttft = profile.ttft().copied().unwrap_or_default();
        let router = Router {
            hasher,
            profile,
            score_names,
            index: RwLock::new(PrefixIndex::new(cfg.index.clone())),
            registry: RwLock::new(Registry::default()),
            sessions,
            inflight: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(0),
            latest_route_ms: AtomicU64::new(0),
            metrics: metrics::Counters::default(),
            apply_lock: Mutex::new(()),
            streams: Mutex::new(Default::default()),
            overlay: RwLock::new(predict::Overlay::default()),
            mean_uncached: AtomicU64::new(0f64.to_bits()),
            pool_learn: Mutex::new(predict::Learner::new()),
            pool_rate_bits: AtomicU64::new(ttft.prefill_tokens_per_s.to_bits()),
            popular: popular::Popularity::default(),
            tail: tail::Tail::new(ttft.tail_quantile),
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

    /// Whether routed requests' blocks are predicted on their worker: precise mode,
    /// predictions enabled, and a profile that uses them (the `ttft` picker, as in the
    /// `kvroute` preset; the presets that model peers keep their peers' behaviour).
    pub(crate) fn predictions_on(&self) -> bool {
        self.cfg.mode == Mode::Precise
            && self.cfg.predictions.enabled
            && self.profile.ttft().is_some()
    }

    /// The prefill rate a worker starts from, tokens/s (the `ttft` picker's default).
    pub(crate) fn prior_rate(&self) -> f64 {
        self.profile.ttft().copied().unwrap_or_default().prefill_tokens_per_s
    }

    /// The fixed step overhead subtracted from observed prefill times, seconds.
    pub(crate) fn step_overhead_s(&self) -> f64 {
        self.profile.ttft().copied().unwrap_or_default().step_overhead_s
    }

    /// The prediction TTL before any observation, ms.
    pub(crate) fn initial_ttl_ms(&self) -> u64 {
        let p = &self.cfg.predictions;
        (p.ttl_s.clamp(p.min_ttl_s, p.max_ttl_s) * 1e3) as u64
    }

    /// The recorded stream positions.
    pub fn stream_positions(&self) -> std::collections::BTreeMap<String, u64> {
        self.streams.lock().clone()
    }
}
