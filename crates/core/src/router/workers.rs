//! The worker registry (dense ids, names, per-worker state) and the calls that add,
//! remove, drain and report on workers.

use super::predict::Learner;
use super::{metrics, LoadReport, Mode, Router};
use crate::error::{Error, Result};
use crate::model::BlockPool;
use crate::score::{Load, LoraSet};
use crate::types::{WorkerId, WorkerKey};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Per-worker state. Counters are atomics so the request path never locks.
///
/// `repr(C)` with the fields every route reads first (their declaration order is their
/// memory order): a route builds a candidate from two cache lines per worker instead of
/// from four scattered ones (the locks and the learner are large and cold).
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct WorkerState {
    // Read by every route (`route_impl`, `WorkerState::load`).
    pub(crate) id: WorkerId,
    pub(crate) healthy: AtomicBool,
    pub(crate) draining: AtomicBool,
    // Tracked by lifecycle calls.
    pub(crate) running: AtomicU32,
    pub(crate) inflight_prefill: AtomicU64,
    /// [`inflight_count`](Self::inflight_count) at the last load report.
    pub(crate) inflight_at_report: AtomicU32,
    // Reported by the host (u32::MAX / NaN bits = not reported).
    pub(crate) rep_waiting: AtomicU32,
    pub(crate) rep_running: AtomicU32,
    // Routed by this router since the last load report (requests, uncached prompt tokens),
    // so that load is never stale.
    pub(crate) since_report_routed: AtomicU32,
    pub(crate) rep_kv_usage: AtomicU64,
    pub(crate) since_report_prefill: AtomicU64,
    pub(crate) decode_blocks: AtomicU64,
    pub(crate) last_routed_ms: AtomicU64,
    /// The learned prefill rate (f64 bits), for the request path; NaN until the worker's
    /// first observation (the pool's rate stands in).
    pub(crate) rate_bits: AtomicU64,
    /// The worker's eviction horizon, seconds (f64 bits; NaN: not known): cached blocks
    /// over blocks stored per second, both from its KV events.
    pub(crate) horizon_bits: AtomicU64,
    /// Since when (ms, the requests' clock) the worker has been prefilling this router's
    /// oldest request without a first token: the last first token of one of its requests
    /// there, or the routing that found none in flight (u64::MAX: never).
    pub(crate) prefill_since_ms: AtomicU64,
    /// The current prediction TTL, ms.
    pub(crate) pred_ttl_ms: AtomicU64,
    /// Other routers' arrivals (rule 12, [`Self::note_others_arrivals`]): the other
    /// routers' active requests at the last scrape (scraped waiting plus running minus
    /// this router's requests there; u32::MAX: no scrape yet) ...
    pub(crate) others_active_at_report: AtomicU32,
    /// ... the prefill tokens of their requests that arrived since, not yet worked off
    /// at `others_stamp_ms` ...
    pub(crate) others_new_tokens: AtomicU64,
    /// ... from when they are worked off (ms, the requests' clock; u64::MAX: from the next
    /// route, the first time after the scrape that the router knows).
    pub(crate) others_stamp_ms: AtomicU64,
    // Written by the chosen worker's route, read by lifecycle calls and reports.
    pub(crate) decisions: AtomicU64,
    pub(crate) hit_tokens: AtomicU64,
    /// This router's requests there without a first token yet (waiting or prefilling).
    pub(crate) inflight_count: AtomicU32,
    pub(crate) has_events: AtomicBool,
    pub(crate) key: WorkerKey,
    pub(crate) loras: RwLock<LoraSet>,
    pub(crate) counters: Mutex<metrics::EventCounters>,
    pub(crate) model: Mutex<Option<WorkerModel>>,
    /// The routing-to-event delay and prefill-rate learner.
    pub(crate) learn: Mutex<Learner>,
    /// The `ts` of the worker's first event batch, seconds (f64 bits; NaN: none yet).
    pub(crate) first_event_ts_bits: AtomicU64,
}

/// A worker's cache model (approximate and hybrid modes).
#[derive(Debug)]
pub(crate) struct WorkerModel {
    pub(crate) pool: BlockPool,
    pub(crate) predictions_skipped: u64,
}

impl WorkerState {
    pub(crate) fn new(key: WorkerKey, id: WorkerId, model: Option<BlockPool>, ttl_ms: u64) -> Self {
        WorkerState {
            key,
            id,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            running: AtomicU32::new(0),
            inflight_prefill: AtomicU64::new(0),
            inflight_count: AtomicU32::new(0),
            inflight_at_report: AtomicU32::new(0),
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
            since_report_routed: AtomicU32::new(0),
            since_report_prefill: AtomicU64::new(0),
            learn: Mutex::new(Learner::new()),
            rate_bits: AtomicU64::new(f64::NAN.to_bits()),
            pred_ttl_ms: AtomicU64::new(ttl_ms),
            first_event_ts_bits: AtomicU64::new(f64::NAN.to_bits()),
            horizon_bits: AtomicU64::new(f64::NAN.to_bits()),
            prefill_since_ms: AtomicU64::new(u64::MAX),
            others_active_at_report: AtomicU32::new(u32::MAX),
            others_new_tokens: AtomicU64::new(0),
            others_stamp_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Rule 12 (session 6), at a scrape of `waiting` and `running`: the prefill another
    /// router has *running* there, which no waiting count shows (vLLM counts a request
    /// in prefill as running, with the decoding ones). Every request on a worker is this
    /// router's or another's; the others' active count (scraped waiting plus running,
    /// minus this router's requests there) rises between two scrapes only by their
    /// arrivals (at least that many: one that also finished meanwhile hides one). A new
    /// request is waiting or being prefilled (a prefill outlasts the scrape interval):
    /// each is priced at `mean_uncached` (the router's mean uncached tokens per request),
    /// added to what is left of the earlier ones, and worked off at `rate` from the
    /// scrape's time on ([`Self::others_new_prefill`]). At most one request's worth
    /// (`mean_uncached`) is kept: the others' requests that are not being prefilled yet
    /// wait, and the scraped waiting count already prices those; what it cannot see is the
    /// one in prefill. No parameter. `latest_route_ms`: the router's latest route, the
    /// time taken for a report without one (`now_ms` `None`).
    pub(crate) fn note_others_arrivals(
        &self,
        waiting: u32,
        running: u32,
        mean_uncached: f64,
        rate: f64,
        now_ms: Option<u64>,
        latest_route_ms: u64,
    ) {
        let own = self.running.load(Ordering::Relaxed);
        let others = waiting.saturating_add(running).saturating_sub(own);
        let before = self.others_active_at_report.swap(others, Ordering::Relaxed);
        if before == u32::MAX || others <= before {
            return;
        }
        // Without the scrape's time, what is left is taken at the latest route and the
        // clock restarts at the next one (the time between is not credited).
        let now = now_ms.unwrap_or(latest_route_ms);
        let left = self.others_new_prefill(now, rate, false);
        let add = (f64::from(others - before) * mean_uncached) as u64;
        let cap = mean_uncached as u64;
        self.others_new_tokens.store(left.saturating_add(add).min(cap), Ordering::Relaxed);
        self.others_stamp_ms.store(now_ms.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Rule 12: what is left at `now_ms` of the other routers' new requests' prefill
    /// ([`Self::note_others_arrivals`]), worked off at `rate` since the first route after
    /// the scrape that saw them (`stamp`: this call is that route, and starts the clock).
    pub(crate) fn others_new_prefill(&self, now_ms: u64, rate: f64, stamp: bool) -> u64 {
        let tokens = self.others_new_tokens.load(Ordering::Relaxed);
        if tokens == 0 {
            return 0;
        }
        let mut since = self.others_stamp_ms.load(Ordering::Relaxed);
        if since == u64::MAX {
            // (`now_ms` 0: no clock, as in metrics.)
            if !stamp || now_ms == 0 {
                return tokens;
            }
            since = match self.others_stamp_ms.compare_exchange(
                u64::MAX,
                now_ms,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => now_ms,
                Err(v) => v,
            };
        }
        if !(rate.is_finite() && rate > 0.0) || now_ms <= since {
            return tokens;
        }
        tokens.saturating_sub(((now_ms - since) as f64 / 1e3 * rate) as u64)
    }

    /// The worker's learned prefill rate, tokens/s, or `pool_rate` before its first
    /// observation (what metrics export; routing uses
    /// [`routing_rate`](super::predict::routing_rate)).
    pub(crate) fn learned_rate(&self, pool_rate: f64) -> f64 {
        let r = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
        if r.is_nan() {
            pool_rate
        } else {
            r
        }
    }

    /// The worker's load. `mean_uncached` prices a scraped waiting request in prompt
    /// tokens (the router's mean uncached tokens per routed request); `pool_rate` is the
    /// prefill rate of a worker not observed yet; `now_ms` (the requests' clock) lets the
    /// in-flight prefill count the progress made since it started.
    #[inline]
    pub(crate) fn load(
        &self,
        model_usage: Option<f64>,
        mean_uncached: f64,
        pool_rate: f64,
        now_ms: u64,
    ) -> Load {
        let rep_w = self.rep_waiting.load(Ordering::Relaxed);
        let rep_r = self.rep_running.load(Ordering::Relaxed);
        let rep_u = f64::from_bits(self.rep_kv_usage.load(Ordering::Relaxed));
        let tracked = self.running.load(Ordering::Relaxed);
        let inflight_total = self.inflight_prefill.load(Ordering::Relaxed);
        let rate = super::predict::routing_rate(
            f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
            pool_rate,
        );
        // Requests waiting there at the last scrape that are not this router's (other
        // router replicas'; 0 with one router, whose requests bound the scraped waiting).
        let others = if rep_w == u32::MAX {
            0
        } else {
            rep_w.saturating_sub(self.inflight_at_report.load(Ordering::Relaxed))
        };
        // Progress: the worker has been prefilling this router's in-flight work since its
        // last first token there (or since it had none), at the rate the router prices it
        // at; that much of the in-flight prefill is done. Without it a long prompt counts
        // in full until its first token, seconds after most of it was computed. Not while
        // other routers' requests wait there: the worker may be computing theirs (FCFS).
        let since = self.prefill_since_ms.load(Ordering::Relaxed);
        let started = since != u64::MAX && now_ms > since && others == 0;
        let done = if started && rate.is_finite() && rate > 0.0 {
            ((now_ms - since) as f64 / 1e3 * rate) as u64
        } else {
            0
        };
        let inflight = inflight_total.saturating_sub(done);
        let (mut active, mut pending) = (tracked, inflight);
        if rep_w != u32::MAX || rep_r != u32::MAX {
            // Never stale: the scrape plus what this router sent since, or this router's
            // own count if larger (the scrape is older than its latest routes).
            let since = self.since_report_routed.load(Ordering::Relaxed);
            let w = if rep_w == u32::MAX { 0 } else { rep_w };
            let r = if rep_r == u32::MAX { 0 } else { rep_r };
            active = active.max(w.saturating_add(r).saturating_add(since));
            let queued = (f64::from(w) * mean_uncached) as u64;
            pending = pending
                .max(queued.saturating_add(self.since_report_prefill.load(Ordering::Relaxed)));
            // A second lower bound: this router's own in-flight prefill, known exactly
            // (its request being prefilled included, which the scrape counts as running),
            // plus the waiting requests that are not its own (scraped waiting minus its
            // requests without a first token at the scrape, which bound its waiting ones
            // from above) at the mean. With router replicas the first bound misses every
            // running prefill, and a replica's own in-flight work is a fraction of the
            // worker's; with one router this one is its own in-flight prefill.
            // Rule 12: the others' waiting requests are a lower bound of their work here;
            // their requests that arrived since the previous scrape (running or waiting)
            // are another, which also sees the prefill they have running.
            let others_new = self.others_new_prefill(now_ms, rate, true);
            let others_waiting = (f64::from(others) * mean_uncached) as u64;
            pending = pending.max(inflight.saturating_add(others_waiting.max(others_new)));
        }
        Load {
            waiting: if rep_w == u32::MAX { 0 } else { rep_w },
            running: if rep_r == u32::MAX { tracked } else { rep_r },
            inflight_prefill_tokens: inflight_total,
            kv_usage: if rep_u.is_nan() { model_usage.unwrap_or(0.0) } else { rep_u },
            decode_blocks: self.decode_blocks.load(Ordering::Relaxed),
            pending_prefill_tokens: pending,
            active_requests: active,
            prefill_tokens_per_s: rate,
            eviction_horizon_s: f64::from_bits(self.horizon_bits.load(Ordering::Relaxed)).max(0.0),
        }
    }
}

/// The registry of workers: dense ids, names, states.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) slots: Vec<Option<Arc<WorkerState>>>,
    pub(crate) by_key: HashMap<WorkerKey, WorkerId>,
    /// Worker names by id, rebuilt when workers come and go; decisions share it.
    pub(crate) names: Arc<[Option<WorkerKey>]>,
    /// Ids of removed workers whose entries are still being cleaned up: not free yet.
    pub(crate) retiring: Vec<WorkerId>,
}

impl Registry {
    pub(crate) fn get(&self, key: &WorkerKey) -> Option<&Arc<WorkerState>> {
        let id = self.by_key.get(key)?;
        self.slots.get(id.index())?.as_ref()
    }
    pub(crate) fn live(&self) -> impl Iterator<Item = &Arc<WorkerState>> {
        self.slots.iter().flatten()
    }
    pub(crate) fn rebuild_names(&mut self) {
        self.names = self.slots.iter().map(|s| s.as_ref().map(|w| w.key.clone())).collect();
    }
}

impl Router {
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
        let slot = reg
            .slots
            .iter()
            .enumerate()
            .position(|(i, s)| s.is_none() && !reg.retiring.contains(&WorkerId(i as u32)));
        let id = WorkerId(slot.unwrap_or(reg.slots.len()) as u32);
        if id.0 > crate::index::MAX_WORKER {
            return Err(Error::invalid("too many workers"));
        }
        let state = Arc::new(WorkerState::new(key.clone(), id, model, self.initial_ttl_ms()));
        match slot {
            Some(i) => reg.slots[i] = Some(state),
            None => reg.slots.push(Some(state)),
        }
        reg.by_key.insert(key, id);
        reg.rebuild_names();
        Ok(id)
    }

    /// Removes a worker: its index entries, session entries, predictions and in-flight
    /// requests go.
    ///
    /// The whole removal runs under `apply_lock` (no event batch, prediction, snapshot or
    /// restore is half way through meanwhile), and the worker's id stays reserved until
    /// everything of it is cleaned up: the worker disappears from the registry first (routes
    /// and batches no longer find it), but [`add_worker`](Self::add_worker) cannot hand its
    /// id to a new worker before the index, session, prediction and in-flight entries of
    /// the old one are gone, so a reused id never inherits them, and the cleanup never
    /// drops entries of the new worker.
    pub fn remove_worker(&self, name: &str, dp_rank: u32) -> Result<()> {
        let key = WorkerKey::new(name, dp_rank);
        let _batch = self.apply_lock.lock();
        let (id, state) = {
            let mut reg = self.registry.write();
            let id =
                reg.by_key.remove(&key).ok_or_else(|| Error::UnknownWorker(key.to_string()))?;
            let state = reg.slots[id.index()].take();
            reg.retiring.push(id);
            reg.rebuild_names();
            (id, state)
        };
        // Routes that chose the worker before it left the registry held its read lock
        // until they recorded their session, so the session cleanup below sees them; a
        // prediction checks the registry under its read lock before it inserts.
        self.index.write().remove_worker(id);
        self.sessions.remove_worker(id);
        if let Some(state) = state {
            self.inflight.lock().retain(|_, f| !Arc::ptr_eq(&f.worker, &state));
        }
        self.overlay.write().clear_worker(id.0);
        self.registry.write().retiring.retain(|&r| r != id);
        Ok(())
    }

    /// Drops every index entry of every data-parallel rank of worker `name` (for example
    /// when its event stream restarted or a gap could not be replayed); new events
    /// rebuild them, and drops its predicted blocks too (as an `AllBlocksCleared` event
    /// does). Returns the (block, worker) pairs dropped from the index.
    ///
    /// Takes `apply_lock`, as event batches do: a batch for the worker is applied either
    /// wholly before the clear or wholly after it, never cut in two by it.
    pub fn clear_worker(&self, name: &str) -> Result<u64> {
        let _batch = self.apply_lock.lock();
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
        Ok(ids.into_iter().map(|id| self.clear_worker_state(id)).sum())
    }

    /// Drops worker `id`'s index entries and its predicted blocks, what a vLLM
    /// `AllBlocksCleared` event means (a prediction left behind would keep steering
    /// requests to a cache that is empty). The caller holds `apply_lock`. Returns the
    /// (block, worker) pairs dropped from the index.
    pub(crate) fn clear_worker_state(&self, id: WorkerId) -> u64 {
        let dropped = self.index.write().clear_worker(id);
        self.overlay.write().clear_worker(id.0);
        dropped
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
        self.report_load_impl(name, dp_rank, report, None)
    }

    /// Pushes a load report for a worker, scraped at `now_ms` (the clock of the requests'
    /// `now_ms`): the other routers' requests that arrived there since the previous scrape
    /// are worked off from then on (see the `kvroute` preset in docs/simulation.md, rule
    /// 11). [`report_load`](Self::report_load) starts that clock at the next route.
    pub fn report_load_at(
        &self,
        name: &str,
        dp_rank: u32,
        report: &LoadReport,
        now_ms: u64,
    ) -> Result<()> {
        self.report_load_impl(name, dp_rank, report, Some(now_ms))
    }

    fn report_load_impl(
        &self,
        name: &str,
        dp_rank: u32,
        report: &LoadReport,
        now_ms: Option<u64>,
    ) -> Result<()> {
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
        if report.waiting.is_some() || report.running.is_some() {
            // A fresh scrape counts everything routed before it.
            w.since_report_routed.store(0, Ordering::Relaxed);
            w.since_report_prefill.store(0, Ordering::Relaxed);
            w.inflight_at_report.store(w.inflight_count.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let (Some(wt), Some(rn)) = (report.waiting, report.running) {
            let mean = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
            let pool = f64::from_bits(self.pool_rate_bits.load(Ordering::Relaxed));
            let rate = super::predict::routing_rate(
                f64::from_bits(w.rate_bits.load(Ordering::Relaxed)),
                pool,
            );
            let latest = self.latest_route_ms.load(Ordering::Relaxed);
            w.note_others_arrivals(wt, rn, mean, rate, now_ms, latest);
        }
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
}

#[cfg(test)]
mod tests {
    //! Removal and clearing racing other calls, made deterministic by holding the locks a
    //! concurrent batch or index write would hold.

    use super::*;
    use crate::events::{BlockStored, EngineHash, KvEvent, KvEventBatch};
    use std::thread;
    use std::time::{Duration, Instant};

    fn router() -> Arc<Router> {
        Arc::new(
            Router::from_json(r#"{"hash_algo": "sha256", "workers": [{"name": "a"}]}"#).unwrap(),
        )
    }

    fn store(r: &Router, name: &str, hashes: &[u64]) {
        let ev = KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
            block_size: 16,
            ..Default::default()
        });
        r.apply_events(name, &KvEventBatch::new(1.0, vec![ev])).unwrap();
    }

    /// Waits up to `limit` for `cond`.
    fn wait_for(limit: Duration, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() && t.elapsed() < limit {
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn registered(r: &Router, name: &str) -> bool {
        r.workers().iter().any(|w| w.name == name)
    }

    #[test]
    fn a_worker_added_during_a_removal_does_not_inherit_the_removed_workers_entries() {
        let r = router();
        store(&r, "a", &[1, 2, 3]);
        let a = r.worker("a", 0).unwrap().id;
        // Hold the index write lock, as a concurrent store does: the removal gets as far
        // as its index cleanup and waits there.
        let index = r.index.write();
        let remover = {
            let r = r.clone();
            thread::spawn(move || r.remove_worker("a", 0))
        };
        wait_for(Duration::from_secs(5), || !registered(&r, "a"));
        assert!(!registered(&r, "a"), "the removal took the worker out of the registry");
        let b = r.add_worker("b", 0).unwrap();
        assert_ne!(b, a, "the removed worker's id is not reused before its cleanup");
        assert_eq!(index.worker_blocks(b), 0, "the new worker inherits nothing");
        drop(index);
        remover.join().unwrap().unwrap();
        store(&r, "b", &[4, 5]);
        assert_eq!(r.index.read().worker_blocks(b), 2);
        assert_eq!(r.index_stats().holder_blocks, 2, "the removed worker's blocks are gone");
        // Once cleaned up, the id is free again.
        assert_eq!(r.add_worker("c", 0).unwrap(), a);
        assert_eq!(r.index.read().worker_blocks(a), 0);
    }

    #[test]
    fn a_removal_waits_for_the_batch_being_applied_before_it_frees_the_id() {
        let r = router();
        store(&r, "a", &[1, 2, 3]);
        let a = r.worker("a", 0).unwrap().id;
        // Hold the apply lock, as a batch being applied does.
        let batch = r.apply_lock.lock();
        let remover = {
            let r = r.clone();
            thread::spawn(move || r.remove_worker("a", 0))
        };
        // Time for the removal to get as far as it goes without the lock.
        wait_for(Duration::from_millis(300), || !registered(&r, "a"));
        let b = r.add_worker("b", 0).unwrap();
        assert_eq!(r.index.read().worker_blocks(b), 0, "the new worker inherits nothing");
        drop(batch);
        remover.join().unwrap().unwrap();
        assert_eq!(r.index.read().worker_blocks(a), 0);
        assert_eq!(r.index.read().worker_blocks(b), 0);
        store(&r, "b", &[4]);
        assert_eq!(r.index.read().worker_blocks(b), 1);
    }

    #[test]
    fn clear_worker_never_cuts_a_batch_in_two() {
        let r = router();
        store(&r, "a", &[1, 2, 3]);
        let a = r.worker("a", 0).unwrap().id;
        // Hold the apply lock, as a batch for "a" that is half applied does.
        let batch = r.apply_lock.lock();
        let clearer = {
            let r = r.clone();
            thread::spawn(move || r.clear_worker("a"))
        };
        wait_for(Duration::from_millis(300), || clearer.is_finished());
        assert!(!clearer.is_finished(), "the clear waits for the batch");
        assert_eq!(r.index.read().worker_blocks(a), 3, "nothing cleared mid-batch");
        drop(batch);
        assert_eq!(clearer.join().unwrap().unwrap(), 3);
        assert_eq!(r.index.read().worker_blocks(a), 0);
    }
}
