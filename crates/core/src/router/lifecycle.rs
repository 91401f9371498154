//! The lifecycle of a routed request: sent, first token, finished; and, in approximate
//! and hybrid modes, the cache-model prediction that `on_routed` makes.

use super::{Decision, Mode, Router, WorkerState};
use crate::error::{Error, Result};
use crate::types::Tier;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A request in flight, for lifecycle load tracking.
#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) worker: Arc<WorkerState>,
    pub(crate) prefill_tokens: u64,
    pub(crate) blocks: u64,
    pub(crate) prefill_done: bool,
    pub(crate) modelled: bool,
    /// When it was routed (the request's `now_ms`).
    pub(crate) routed_ms: u64,
    /// Prefill tokens ahead of it on its worker at routing, its own included.
    pub(crate) work_tokens: u64,
}

impl Router {
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
        // The cache model caches one key per full block: more keys than that is a
        // decision that was not made for this prompt (the model would refuse it later).
        let full_blocks = prompt / self.cfg.block_size as u64;
        if self.cfg.mode != Mode::Precise && decision.keys.len() as u64 > full_blocks {
            return Err(Error::invalid(format!(
                "decision of request {} has {} block keys for {} full blocks of its {prompt} \
                 prompt tokens",
                decision.request_id,
                decision.keys.len(),
                full_blocks
            )));
        }
        let mean = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
        let pool_rate = f64::from_bits(self.pool_rate_bits.load(Ordering::Relaxed));
        let ahead = worker.load(None, mean, pool_rate, decision.routed_ms).pending_prefill_tokens;
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
                    routed_ms: decision.routed_ms,
                    work_tokens: ahead.saturating_add(prefill),
                },
            );
            // Inside the lock: on_first_token/on_finished for this id (which take it too)
            // must never subtract before these adds.
            worker.running.fetch_add(1, Ordering::Relaxed);
            worker.inflight_prefill.fetch_add(prefill, Ordering::Relaxed);
            if worker.inflight_count.fetch_add(1, Ordering::Relaxed) == 0 {
                // Nothing of this router's in flight there: its prefill starts now.
                worker.prefill_since_ms.store(decision.routed_ms, Ordering::Relaxed);
            }
            worker.since_report_routed.fetch_add(1, Ordering::Relaxed);
            worker.since_report_prefill.fetch_add(prefill, Ordering::Relaxed);
            // Mean uncached tokens per request, weight 1/64 per request.
            let next =
                if mean == 0.0 { prefill as f64 } else { mean + (prefill as f64 - mean) / 64.0 };
            self.mean_uncached.store(next.to_bits(), Ordering::Relaxed);
        }
        if predict {
            self.predict(&worker, decision);
        }
        if self.predictions_on() {
            self.popular.record(&decision.keys);
            self.predict_residency(&worker, decision);
        }
        Ok(())
    }

    /// Precise mode: the blocks the request will create on its worker (past the matched
    /// prefix) become predicted there until events confirm them or the TTL ends.
    fn predict_residency(&self, worker: &WorkerState, decision: &Decision) {
        let from = (decision.matched_blocks as usize).min(decision.keys.len());
        if from == decision.keys.len() {
            return;
        }
        let reg = self.registry.read();
        // A worker removed since it was chosen gets no predictions: its cleanup ran (or
        // runs after this read lock), and its id may already be reused.
        let registered = reg
            .slots
            .get(worker.id.index())
            .and_then(|s| s.as_deref())
            .is_some_and(|w| std::ptr::eq(w, worker));
        if !registered {
            return;
        }
        let ttl = |w: u32| {
            reg.slots
                .get(w as usize)
                .and_then(|s| s.as_ref())
                .map_or(0, |s| s.pred_ttl_ms.load(Ordering::Relaxed))
        };
        let cap = self.cfg.predictions.capacity;
        self.overlay.write().insert(
            worker.id.0,
            &decision.keys[from..],
            decision.routed_ms,
            cap,
            ttl,
        );
    }

    /// `worker`'s events stored `keys` (router keys) at `ts_ms`: predictions they cover
    /// are confirmed, and the delays adapt the worker's TTL.
    pub(crate) fn confirm_predictions(&self, worker: &WorkerState, keys: &[u64], ts_ms: u64) {
        let mut overlay = self.overlay.write();
        if overlay.nothing_to_confirm() {
            return;
        }
        let mut learn = worker.learn.lock();
        let mut seen = false;
        overlay.confirm(worker.id.0, keys, ts_ms, |d| {
            learn.observe_delay(d as f64);
            seen = true;
        });
        if seen {
            worker.pred_ttl_ms.store(learn.ttl_ms(&self.cfg.predictions), Ordering::Relaxed);
        }
    }

    /// Runs a routed request through the worker's cache model and applies its events.
    /// A request the model has no room for is counted as skipped (`predictions_skipped`
    /// in the worker's metrics); a refusal by the model or the index is counted in
    /// `prediction_errors`.
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
                if model.pool.cache_blocks(decision.request_id, &decision.keys, n).is_err() {
                    // Whatever the allocation evicted is still drained and applied below.
                    self.metrics.prediction_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(None) => {
                model.predictions_skipped += 1;
                return;
            }
            Err(_) => {
                self.metrics.prediction_errors.fetch_add(1, Ordering::Relaxed);
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
        let mut errors = 0;
        for e in events {
            match e {
                PoolEvent::Stored { keys, parent } => {
                    if index.store(id, Tier::Gpu, parent, &keys).is_err() {
                        errors += 1;
                    }
                }
                PoolEvent::Removed { keys } => {
                    index.remove(id, Tier::Gpu, &keys);
                }
                PoolEvent::Cleared => {
                    index.clear_worker(id);
                }
            }
        }
        if errors > 0 {
            self.metrics.prediction_errors.fetch_add(errors, Ordering::Relaxed);
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

    /// The first token of the request came back: its prefill is done. The time is the
    /// wall clock; a host that routes with its own `now_ms` calls
    /// [`on_first_token_at`](Self::on_first_token_at) with the same clock.
    pub fn on_first_token(&self, request_id: u64) -> Result<()> {
        self.on_first_token_at(request_id, super::wall_ms())
    }

    /// The first token of the request came back at `now_ms` (the clock of the request's
    /// `now_ms`): its prefill is done, and the time since routing is an observation of
    /// the worker's prefill rate (learned for the `ttft` picker). Observations on
    /// another clock (negative, or longer than an hour) teach nothing and are skipped.
    pub fn on_first_token_at(&self, request_id: u64, now_ms: u64) -> Result<()> {
        let mut inflight = self.inflight.lock();
        let f = inflight
            .get_mut(&request_id)
            .ok_or_else(|| Error::invalid(format!("unknown request id {request_id}")))?;
        if !f.prefill_done {
            f.prefill_done = true;
            f.worker.inflight_prefill.fetch_sub(f.prefill_tokens, Ordering::Relaxed);
            f.worker.inflight_count.fetch_sub(1, Ordering::Relaxed);
            // The next in-flight request there starts its prefill now (FCFS). (A time on
            // another clock than the routing's is ignored, as for the rate below.)
            if now_ms >= f.routed_ms {
                f.worker.prefill_since_ms.store(now_ms, Ordering::Relaxed);
            }
            f.worker.decode_blocks.fetch_add(f.blocks, Ordering::Relaxed);
            if now_ms >= f.routed_ms && now_ms - f.routed_ms <= 3_600_000 {
                let elapsed = (now_ms - f.routed_ms) as f64 / 1e3;
                self.tail.observe(elapsed);
                let (work, secs) = (f.work_tokens as f64, elapsed - self.step_overhead_s());
                let pool = {
                    let mut pool = self.pool_learn.lock();
                    pool.observe_prefill(work, secs);
                    let r = pool.rate(self.prior_rate());
                    self.pool_rate_bits.store(r.to_bits(), Ordering::Relaxed);
                    r
                };
                // The worker's own observations, from the pool's rate as their prior.
                let mut learn = f.worker.learn.lock();
                learn.observe_prefill(work, secs);
                f.worker.rate_bits.store(learn.rate(pool).to_bits(), Ordering::Relaxed);
            }
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
            f.worker.inflight_count.fetch_sub(1, Ordering::Relaxed);
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
}
