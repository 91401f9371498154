//! [`RouterPolicy`]: a [`Policy`] that routes through [`kvroute::router::Router`], so a
//! simulation measures what kvroute's router does, not a re-implementation of it.
//!
//! # What the router is told, and when
//!
//! - **Requests.** Each arrival's prompt tokens (generated from the workload's segments)
//!   go to [`Router::route`] with the client address as the session key and the simulated
//!   time; the decision is reported sent ([`Router::on_routed`]) at once.
//! - **Lifecycle.** [`Router::on_first_token`] when the simulated prefill ends,
//!   [`Router::on_finished`] when the request completes (or the worker rejects it).
//! - **KV events** (precise and hybrid modes). Every cache change of a simulated worker
//!   becomes a vLLM-shaped [`KvEventBatch`] delivered `event_delay_s` later:
//!   `BlockStored` with the simulator's block keys as integer engine hashes, the parent
//!   key, the blocks' token ids and the block size; `BlockRemoved`; `AllBlocksCleared`. The
//!   router keys blocks by its own XXH3 chain over the tokens and maps engine hashes to
//!   those keys per worker, exactly as it does for a real vLLM running another hash.
//! - **Load.** llm-d's endpoint picker scrapes each pod's `/metrics`
//!   (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`)
//!   every 50 ms ([`METRICS_REFRESH_S`], the Gateway API Inference Extension's
//!   `--refresh-metrics-interval` default). The simulator knows those figures exactly, so
//!   the policy pushes them with [`Router::report_load`] when the last push is at least
//!   that old: a route sees figures up to 50 ms stale, as llm-d's scorers do. The router's
//!   own lifecycle tracking (in-flight prefill tokens, decode blocks) is kept alongside,
//!   which is what the `cost` profile reads.

use crate::engine::{CacheEvent, EngineConfig};
use crate::policy::{ClusterView, Policy, Routed};
use crate::workload::SimRequest;
use hashbrown::HashMap;
use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch};
use kvroute::hash::HashAlgo;
use kvroute::model::CapacitySpec;
use kvroute::rng::splitmix64;
use kvroute::router::{
    Decision, LoadReport, Mode, ProfileSpec, Request, Router, RouterConfig, WorkerConfig,
};
use kvroute::score::{PickerConfig, Profile, ProfileConfig};
use kvroute::{Error, Result};

/// llm-d's metrics scrape interval, seconds (GIE `--refresh-metrics-interval`, 50 ms).
pub const METRICS_REFRESH_S: f64 = 0.05;

/// Session-affinity time to live given to the router, seconds (2 h).
pub const SESSION_TTL_S: u64 = 7_200;

/// The named router policies: `(name, mode, profile preset)`.
pub const ROUTER_POLICIES: &[(&str, Mode, &str)] = &[
    ("kvroute", Mode::Precise, "kvroute"),
    ("random", Mode::Precise, "random"),
    ("round-robin", Mode::Precise, "round-robin"),
    ("session-affinity", Mode::Precise, "session-affinity"),
    ("prefix-approx", Mode::Approximate, "prefix"),
    ("prefix-precise", Mode::Precise, "prefix"),
    ("llm-d", Mode::Precise, "llm-d"),
    ("cost", Mode::Precise, "cost"),
    ("hybrid", Mode::Hybrid, "llm-d"),
];

/// The mode and profile preset of a named router policy.
pub fn router_spec(name: &str) -> Option<(Mode, &'static str)> {
    ROUTER_POLICIES.iter().find(|(n, _, _)| *n == name).map(|&(_, m, p)| (m, p))
}

/// A [`Policy`] backed by one [`Router`], or by several independent replicas of it (see
/// [`RouterPolicy::with_replicas`]).
pub struct RouterPolicy {
    name: String,
    /// The replicas; requests go to them in turn, each applies every worker's events.
    routers: Vec<Router>,
    /// The next replica to route.
    next_replica: usize,
    /// The configuration the replicas were built from (for more replicas).
    cfg: RouterConfig,
    mode: Mode,
    /// Whether the profile reads prefix matches (otherwise events would be wasted work).
    needs_prefix: bool,
    block_size: usize,
    /// Worker names, by simulator index (`w0`, `w1`, ...).
    names: Vec<String>,
    /// Simulator request id -> (replica, router request id), for requests in flight.
    ids: HashMap<u64, (usize, u64)>,
    tokens: Vec<u32>,
    /// Load push interval, seconds; `None`: no load reports.
    refresh_s: Option<f64>,
    next_push_s: f64,
    /// The last decision, and the replica that made it (for per-decision traces).
    last: Option<(usize, Decision)>,
}

impl RouterPolicy {
    /// A router in `mode` with the profile `preset`, one worker per simulated one (named
    /// `w0..`), the engine's block size and KV capacity (`num_gpu_blocks`, so approximate
    /// and hybrid predictions model the same pool as the engine), XXH3 keys, `seed` for its
    /// random choices and a 2 h session TTL. Load is pushed every [`METRICS_REFRESH_S`].
    /// `name` is the name shown in reports.
    // Fields are assigned one by one, never by a struct literal: the configuration may
    // become non-exhaustive with a builder.
    #[allow(clippy::field_reassign_with_default)]
    pub fn new(
        name: &str,
        mode: Mode,
        preset: &str,
        workers: usize,
        engine: &EngineConfig,
        seed: u64,
    ) -> Result<Self> {
        if workers == 0 {
            return Err(Error::config("at least one worker is needed"));
        }
        let names: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
        let needs_prefix = Profile::preset(preset)?.needs_prefix();
        let cfg = RouterConfig::builder()
            .block_size(engine.block_size)
            .hash_algo(HashAlgo::Xxh3)
            .mode(mode)
            .profile(ProfileSpec::Preset(preset.to_string()))
            .workers(
                names
                    .iter()
                    .map(|n| WorkerConfig { name: n.clone(), dp_rank: 0, capacity: None })
                    .collect(),
            )
            .capacity(CapacitySpec::blocks(engine.num_gpu_blocks))
            .session_ttl_s(SESSION_TTL_S)
            .seed(seed)
            .build()?;
        Ok(RouterPolicy {
            name: name.to_string(),
            routers: vec![Router::new(cfg.clone())?],
            next_replica: 0,
            cfg,
            mode,
            needs_prefix,
            block_size: engine.block_size,
            names,
            ids: HashMap::new(),
            tokens: Vec::new(),
            refresh_s: Some(METRICS_REFRESH_S),
            next_push_s: f64::NEG_INFINITY,
            last: None,
        })
    }

    /// A named router policy (see [`ROUTER_POLICIES`]); the router's seed is derived from
    /// `seed` and the name. Errors with [`Error::Config`] on an unknown name.
    pub fn named(name: &str, workers: usize, engine: &EngineConfig, seed: u64) -> Result<Self> {
        let (mode, preset) = router_spec(name)
            .ok_or_else(|| Error::config(format!("{name:?} is not a router policy")))?;
        let salt = name.bytes().fold(0x7265_7574_6572u64, |h, b| splitmix64(h ^ u64::from(b)));
        Self::new(name, mode, preset, workers, engine, splitmix64(seed ^ salt))
    }

    /// Sets the `kvroute` profile's `tail_quantile` (the percentile of observed times to
    /// first token its history rules protect; `None` keeps the preset's 0.99). Other
    /// policies have no tail and are unchanged. Call before [`Self::with_replicas`].
    pub fn with_tail_quantile(mut self, q: Option<f64>) -> Result<Self> {
        let Some(q) = q else { return Ok(self) };
        if self.cfg.profile != ProfileSpec::Preset("kvroute".into()) {
            return Ok(self);
        }
        let mut profile = ProfileConfig::preset("kvroute")?;
        let mut picker = PickerConfig::new("ttft");
        picker.params = Some(serde_json::json!({ "tail_quantile": q }));
        profile.picker = Some(picker);
        self.cfg.profile = ProfileSpec::Config(profile);
        // `Router::new` validates the configuration (the quantile's range).
        self.routers = vec![Router::new(self.cfg.clone())?];
        Ok(self)
    }

    /// Sets how often the workers' load figures are pushed to the router: `Some(0.0)`
    /// before every route, `None` never (the router then only knows what its lifecycle
    /// tracking counts: running requests and in-flight prefill, no queue, no KV usage).
    pub fn with_load_refresh(mut self, refresh_s: Option<f64>) -> Self {
        self.refresh_s = refresh_s;
        self
    }

    /// Spreads requests over `replicas` independent routers (round-robin, as a
    /// Kubernetes Service in front of them): each applies every worker's events and load
    /// reports but sees only its own routings (its predictions, its in-flight load, its
    /// learned rates). Replica 0 is the router of a single-router run (same seed), so one
    /// replica is exactly the single-router run; replica `i` draws its random choices from
    /// a seed derived from the policy's and `i`.
    pub fn with_replicas(mut self, replicas: usize) -> Result<Self> {
        if replicas == 0 {
            return Err(Error::config("router_replicas must be at least 1"));
        }
        self.routers.truncate(1);
        for i in 1..replicas {
            let mut cfg = self.cfg.clone();
            cfg.seed = splitmix64(self.cfg.seed ^ splitmix64(i as u64));
            self.routers.push(Router::new(cfg)?);
        }
        Ok(self)
    }

    /// The router (the first replica), for inspection (metrics, index statistics).
    pub fn router(&self) -> &Router {
        &self.routers[0]
    }

    /// Every replica.
    pub fn routers(&self) -> &[Router] {
        &self.routers
    }

    /// The last routing decision and the replica that made it (for per-decision traces:
    /// `crates/sim/examples/decisions.rs`).
    pub fn last_decision(&self) -> Option<(usize, &Decision)> {
        self.last.as_ref().map(|(r, d)| (*r, d))
    }

    fn push_load(&mut self, view: &ClusterView<'_>) -> Result<()> {
        let Some(refresh) = self.refresh_s else {
            return Ok(());
        };
        if view.now_s < self.next_push_s {
            return Ok(());
        }
        self.next_push_s = view.now_s + refresh;
        for (name, v) in self.names.iter().zip(view.workers) {
            let report = LoadReport {
                waiting: Some(u32::try_from(v.waiting).unwrap_or(u32::MAX)),
                running: Some(u32::try_from(v.running).unwrap_or(u32::MAX)),
                kv_usage: Some(v.kv_usage.clamp(0.0, 1.0)),
                loras: None,
            };
            let now_ms = (view.now_s.max(0.0) * 1_000.0).round() as u64;
            for router in &self.routers {
                router.report_load_at(name, 0, &report, now_ms)?;
            }
        }
        Ok(())
    }

    /// Whether the router reads the prompt's content (it hashes it to match prefixes or
    /// to feed its cache model), as opposed to only its length.
    fn needs_tokens(&self) -> bool {
        self.needs_prefix || self.mode != Mode::Precise
    }

    fn router_id(&self, req: &SimRequest) -> Result<(usize, u64)> {
        self.ids.get(&req.id).copied().ok_or_else(|| {
            Error::Internal(format!("{}: request {} was not routed", self.name, req.id))
        })
    }
}

impl Policy for RouterPolicy {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Precise and hybrid routers whose profile reads prefix matches: the others would
    /// index events they never look at (same decisions, wasted time).
    fn wants_events(&self) -> bool {
        self.mode != Mode::Approximate && self.needs_prefix
    }

    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> Result<usize> {
        self.push_load(view)?;
        if self.needs_tokens() {
            r.req.prompt_tokens(&mut self.tokens);
        } else {
            // A precise router whose profile reads no prefix never hashes the prompt: it
            // reads only its length. Skip generating the tokens.
            self.tokens.clear();
            self.tokens.resize(r.prompt_len, 0);
        }
        let req = Request {
            tokens: &self.tokens,
            session: r.req.session.as_deref(),
            now_ms: Some((view.now_s.max(0.0) * 1_000.0).round() as u64),
            ..Request::default()
        };
        let replica = self.next_replica;
        self.next_replica = (replica + 1) % self.routers.len();
        let router = &self.routers[replica];
        let d = router.route(&req)?;
        router.on_routed(&d)?;
        let w = d.worker_id.index();
        if self.names.get(w) != Some(&d.worker.name) {
            return Err(Error::Internal(format!(
                "{}: router chose {} (id {w}), not a simulated worker",
                self.name, d.worker
            )));
        }
        self.ids.insert(r.req.id, (replica, d.request_id));
        self.last = Some((replica, d));
        Ok(w)
    }

    fn on_events(
        &mut self,
        worker: usize,
        evs: &[CacheEvent],
        reqs: &[SimRequest],
        now_s: f64,
    ) -> Result<()> {
        let bs = self.block_size;
        let mut events = Vec::with_capacity(evs.len());
        for ev in evs {
            let next = match ev {
                CacheEvent::Stored { req, first_block, keys, parent } => {
                    let r =
                        usize::try_from(*req).ok().and_then(|i| reqs.get(i)).ok_or_else(|| {
                            Error::Internal(format!("stored blocks of unknown request {req}"))
                        })?;
                    let mut token_ids = Vec::with_capacity(keys.len() * bs);
                    r.tokens_range(
                        first_block * bs,
                        (first_block + keys.len()) * bs,
                        &mut token_ids,
                    );
                    KvEvent::BlockStored(BlockStored {
                        block_hashes: keys.iter().map(|&k| EngineHash::Int(k)).collect(),
                        parent_block_hash: parent.map(EngineHash::Int),
                        token_ids,
                        block_size: bs as u32,
                        medium: None,
                        ..BlockStored::default()
                    })
                }
                CacheEvent::Removed { key } => {
                    // Consecutive evictions go in one event (vLLM sends one hash per event;
                    // the format takes a list and the index then removes whole runs at once).
                    if let Some(KvEvent::BlockRemoved(prev)) = events.last_mut() {
                        prev.block_hashes.push(EngineHash::Int(*key));
                        continue;
                    }
                    KvEvent::BlockRemoved(BlockRemoved {
                        block_hashes: vec![EngineHash::Int(*key)],
                        ..BlockRemoved::default()
                    })
                }
                CacheEvent::Cleared => KvEvent::AllBlocksCleared,
            };
            events.push(next);
        }
        let name = self
            .names
            .get(worker)
            .ok_or_else(|| Error::Internal(format!("events from unknown worker {worker}")))?;
        let batch = KvEventBatch::new(now_s, events);
        for router in &self.routers {
            router.apply_events(name, &batch)?;
        }
        Ok(())
    }

    fn on_first_token(&mut self, _worker: usize, req: &SimRequest, now_s: f64) -> Result<()> {
        let (replica, id) = self.router_id(req)?;
        self.routers[replica].on_first_token_at(id, (now_s.max(0.0) * 1_000.0).round() as u64)
    }

    fn on_finished(&mut self, _worker: usize, req: &SimRequest, _now_s: f64) -> Result<()> {
        let (replica, id) = self.router_id(req)?;
        self.ids.remove(&req.id);
        self.routers[replica].on_finished(id)
    }
}
