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
#[derive(Debug)]
pub(crate) struct WorkerState {
    pub(crate) key: WorkerKey,
    pub(crate) id: WorkerId,
    pub(crate) healthy: AtomicBool,
    pub(crate) draining: AtomicBool,
    // Tracked by lifecycle calls.
    pub(crate) running: AtomicU32,
    pub(crate) inflight_prefill: AtomicU64,
    pub(crate) decode_blocks: AtomicU64,
    // Reported by the host (u32::MAX / NaN bits = not reported).
    pub(crate) rep_waiting: AtomicU32,
    pub(crate) rep_running: AtomicU32,
    pub(crate) rep_kv_usage: AtomicU64,
    pub(crate) loras: RwLock<LoraSet>,
    pub(crate) decisions: AtomicU64,
    pub(crate) last_routed_ms: AtomicU64,
    pub(crate) hit_tokens: AtomicU64,
    pub(crate) has_events: AtomicBool,
    pub(crate) counters: Mutex<metrics::EventCounters>,
    pub(crate) model: Mutex<Option<WorkerModel>>,
    // Routed by this router since the last load report (requests, uncached prompt tokens),
    // so that load is never stale.
    pub(crate) since_report_routed: AtomicU32,
    pub(crate) since_report_prefill: AtomicU64,
    /// The routing-to-event delay and prefill-rate learner.
    pub(crate) learn: Mutex<Learner>,
    /// The learned prefill rate (f64 bits), for the request path; NaN until the worker's
    /// first observation (the pool's rate stands in).
    pub(crate) rate_bits: AtomicU64,
    /// The current prediction TTL, ms.
    pub(crate) pred_ttl_ms: AtomicU64,
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
        }
    }

    /// The worker's load. `mean_uncached` prices a scraped waiting request in prompt
    /// tokens (the router's mean uncached tokens per routed request); `pool_rate` is the
    /// prefill rate of a worker not observed yet.
    pub(crate) fn load(
        &self,
        model_usage: Option<f64>,
        mean_uncached: f64,
        pool_rate: f64,
    ) -> Load {
        let rep_w = self.rep_waiting.load(Ordering::Relaxed);
        let rep_r = self.rep_running.load(Ordering::Relaxed);
        let rep_u = f64::from_bits(self.rep_kv_usage.load(Ordering::Relaxed));
        let tracked = self.running.load(Ordering::Relaxed);
        let inflight = self.inflight_prefill.load(Ordering::Relaxed);
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
        }
        Load {
            waiting: if rep_w == u32::MAX { 0 } else { rep_w },
            running: if rep_r == u32::MAX { tracked } else { rep_r },
            inflight_prefill_tokens: inflight,
            kv_usage: if rep_u.is_nan() { model_usage.unwrap_or(0.0) } else { rep_u },
            decode_blocks: self.decode_blocks.load(Ordering::Relaxed),
            pending_prefill_tokens: pending,
            active_requests: active,
            prefill_tokens_per_s: {
                let r = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
                if r.is_nan() {
                    pool_rate
                } else {
                    r
                }
            },
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
        let slot = reg.slots.iter().position(Option::is_none);
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
        self.sessions.remove_worker(id);
        self.inflight.lock().retain(|_, f| f.worker.id != id);
        self.overlay.write().clear_worker(id.0);
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
        if report.waiting.is_some() || report.running.is_some() {
            // A fresh scrape counts everything routed before it.
            w.since_report_routed.store(0, Ordering::Relaxed);
            w.since_report_prefill.store(0, Ordering::Relaxed);
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
