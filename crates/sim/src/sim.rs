//! The discrete-event loop, the oracle and the metrics.

use crate::engine::{CacheEvent, EngineConfig, ReqState, Worker};
use crate::keys::segment_keys;
use crate::policy::{ClusterView, Policy, Routed, WorkerView};
use crate::workload::Workload;
use kvroute::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

/// Cluster-level settings of a run.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    /// Number of workers.
    pub workers: usize,
    /// Each worker's engine model.
    pub engine: EngineConfig,
    /// Seconds between a cache change on a worker and a precise policy seeing it.
    pub event_delay_s: f64,
    /// Seed for the policies' random choices.
    pub seed: u64,
    /// Router replicas each policy runs behind (requests spread round-robin; 1 = one
    /// router).
    pub router_replicas: usize,
    /// The `kvroute` policy's `tail_quantile` (`None`: the preset's 0.99).
    pub tail_quantile: Option<f64>,
}

/// A workload with the simulator's block keys computed once for all runs.
pub struct Prepared {
    /// The workload.
    pub workload: Workload,
    /// Block size the keys were computed at.
    pub block_size: usize,
    /// Per request: keys of the full blocks of prompt + output.
    pub keys: Vec<Vec<u64>>,
}

impl Prepared {
    /// Hashes every request's tokens into block keys (in parallel).
    pub fn new(workload: Workload, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::config("block_size must be positive"));
        }
        let keys = workload
            .requests
            .par_iter()
            .map(|r| {
                let mut k = Vec::with_capacity((r.prompt_len() + r.output_len()) / block_size);
                segment_keys(r.prompt.iter().chain([&r.output]), block_size, &mut k);
                k
            })
            .collect();
        Ok(Prepared { workload, block_size, keys })
    }
}

/// The outcome of one policy on one workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunResult {
    /// Policy name.
    pub policy: String,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests completed.
    pub completed: usize,
    /// Requests rejected (prompt larger than a worker's whole cache).
    pub rejected: usize,
    /// Cached prompt tokens / prompt tokens at first admission, as vLLM counts it.
    pub hit_rate: f64,
    /// Leading full prompt blocks found cached on the chosen worker at admission (no
    /// last-token rule) / full prompt blocks: the trace papers' block hit rate.
    pub block_hit_rate: f64,
    /// Share of requests sent to the busiest worker.
    pub top_worker_share: f64,
    /// Requests on the busiest worker / mean requests per worker.
    pub load_imbalance: f64,
    /// Time to first token percentiles, seconds (`None` for cache-only runs).
    pub ttft_p50_s: Option<f64>,
    /// p90 TTFT.
    pub ttft_p90_s: Option<f64>,
    /// p99 TTFT.
    pub ttft_p99_s: Option<f64>,
    /// Mean end-to-end latency, seconds.
    pub e2e_mean_s: Option<f64>,
    /// p90 end-to-end latency, seconds.
    pub e2e_p90_s: Option<f64>,
    /// Output tokens per second from the first arrival to the last completion.
    pub throughput_tok_s: Option<f64>,
    /// Cached blocks evicted (all workers).
    pub evictions: u64,
    /// Preemptions (all workers).
    pub preemptions: u64,
    /// Requests per worker.
    pub per_worker: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    StepEnd(usize),
    Deliver(usize),
}

#[derive(Clone, Copy, Debug)]
struct Ev {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    // Reversed: BinaryHeap is a max-heap, we pop the earliest (then the first pushed).
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

struct Run<'a> {
    p: &'a Prepared,
    cfg: &'a SimConfig,
    policy: &'a mut dyn Policy,
    workers: Vec<Worker>,
    state: Vec<ReqState>,
    heap: BinaryHeap<Ev>,
    seq: u64,
    deliveries: Vec<VecDeque<Vec<CacheEvent>>>,
    views: Vec<WorkerView>,
    // per request
    worker_of: Vec<usize>,
    admitted: Vec<bool>,
    hit_tokens: Vec<usize>,
    block_hits: Vec<usize>,
    ttft: Vec<Option<f64>>,
    e2e: Vec<Option<f64>>,
    rejected: usize,
    last_finish: f64,
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl<'a> Run<'a> {
    fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Ev { t, seq: self.seq, kind });
    }

    fn prompt_keys(&self, r: usize) -> &'a [u64] {
        let p: &'a Prepared = self.p;
        let n = p.workload.requests[r].prompt_len() / p.block_size;
        &p.keys[r][..n.min(p.keys[r].len())]
    }

    fn flush_events(&mut self, w: usize, now: f64) {
        if self.workers[w].pending_events.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.workers[w].pending_events);
        self.deliveries[w].push_back(batch);
        self.push(now + self.cfg.event_delay_s, Kind::Deliver(w));
    }

    fn arrive(&mut self, r: usize, now: f64) -> Result<()> {
        let p: &'a Prepared = self.p;
        let req = &p.workload.requests[r];
        for (v, wk) in self.views.iter_mut().zip(&self.workers) {
            *v = WorkerView {
                waiting: wk.waiting.len(),
                running: wk.running.len(),
                kv_usage: wk.pool.usage(),
                waiting_prompt_tokens: wk.waiting_prompt_tokens,
            };
        }
        let view = ClusterView {
            now_s: now,
            block_size: self.p.block_size,
            num_gpu_blocks: self.cfg.engine.num_gpu_blocks,
            workers: &self.views,
        };
        let routed = Routed { req, prompt_keys: self.prompt_keys(r), prompt_len: req.prompt_len() };
        let w = self.policy.route(&routed, &view)?;
        if w >= self.workers.len() {
            return Err(Error::Internal(format!(
                "policy {} chose worker {w} of {}",
                self.policy.name(),
                self.workers.len()
            )));
        }
        self.worker_of[r] = w;
        if self.cfg.engine.instant {
            return self.serve_instantly(r, w, now);
        }
        let wk = &mut self.workers[w];
        wk.waiting.push_back(r);
        wk.waiting_prompt_tokens += req.prompt_len();
        if !wk.busy {
            self.start_step(w, now)?;
        }
        Ok(())
    }

    fn serve_instantly(&mut self, r: usize, w: usize, now: f64) -> Result<()> {
        let p: &'a Prepared = self.p;
        let req = &p.workload.requests[r];
        let keys = &p.keys[r];
        let pk = self.prompt_keys(r);
        let bs = self.p.block_size;
        let plen = req.prompt_len();
        let total = plen + req.output_len();
        let wk = &mut self.workers[w];
        self.block_hits[r] = wk.pool.computed_prefix(pk, (pk.len() + 1) * bs);
        let hit_tokens = wk.pool.computed_prefix(pk, plen) * bs;
        match wk.pool.allocate(r as u64, keys, total)? {
            Some(_) => {
                self.hit_tokens[r] = hit_tokens;
                self.admitted[r] = true;
                wk.collect_events(r as u64, 0);
                // Everything computed but the last output token.
                wk.cache(r, keys, (total - 1) / bs)?;
                wk.pool.free(r as u64);
                self.ttft[r] = Some(0.0);
                self.e2e[r] = Some(0.0);
                self.policy.on_first_token(w, req, now)?;
                self.policy.on_finished(w, req, now)?;
            }
            None => {
                self.rejected += 1;
                self.policy.on_finished(w, req, now)?;
            }
        }
        self.flush_events(w, now);
        Ok(())
    }

    fn start_step(&mut self, w: usize, now: f64) -> Result<()> {
        let p: &'a Prepared = self.p;
        let eng = &self.cfg.engine;
        let bs = p.block_size;
        let mut step = std::mem::take(&mut self.workers[w].step);
        step.prefills.clear();
        step.decodes.clear();
        // 1. Decodes, preempting from the back when the pool is full.
        let mut i = 0;
        while i < self.workers[w].running.len() {
            let r = self.workers[w].running[i];
            let need = self.state[r].computed + 1;
            if self.workers[w].pool.grow(r as u64, need)? {
                step.decodes.push(r);
                i += 1;
                continue;
            }
            let victim = self.workers[w].running.pop().expect("running is not empty");
            let wk = &mut self.workers[w];
            wk.pool.free(victim as u64);
            wk.preemptions += 1;
            wk.waiting.push_front(victim);
            wk.waiting_prompt_tokens += self.p.workload.requests[victim].prompt_len();
            self.state[victim] = ReqState::default();
            if victim == r {
                break;
            }
        }
        self.workers[w].collect_events(u64::MAX, 0);
        // 2. Admissions.
        let mut budget_used = step.decodes.len();
        let mut prefill_tokens = 0usize;
        loop {
            let wk = &mut self.workers[w];
            if wk.running.len() >= eng.max_num_seqs {
                break;
            }
            let Some(&r) = wk.waiting.front() else { break };
            let req = &p.workload.requests[r];
            let plen = req.prompt_len();
            let keys = &p.keys[r];
            let pk = &keys[..(plen / bs).min(keys.len())];
            let hits = wk.pool.computed_prefix(pk, plen);
            let new = plen - hits * bs;
            // A step's first prefill is always admitted, decodes or not: vLLM without
            // chunked prefill requires `max_num_batched_tokens >= max_model_len`, so any
            // prompt fits its budget next to the running requests' one token each (its
            // scheduler skips only a prompt larger than the budget left). Only further
            // prefills of the step are held to `max_num_batched_tokens`.
            let scheduled = !step.prefills.is_empty();
            if scheduled && budget_used + new > eng.max_num_batched_tokens {
                break;
            }
            let block_hits = wk.pool.computed_prefix(pk, (pk.len() + 1) * bs);
            match wk.pool.allocate(r as u64, keys, plen)? {
                Some(a) => {
                    wk.collect_events(u64::MAX, 0);
                    wk.waiting.pop_front();
                    wk.waiting_prompt_tokens -= plen;
                    wk.running.push(r);
                    if !self.admitted[r] {
                        self.admitted[r] = true;
                        self.hit_tokens[r] = a.hit_tokens;
                        self.block_hits[r] = block_hits;
                    }
                    budget_used += new;
                    prefill_tokens += new;
                    step.prefills.push(r);
                }
                None => {
                    if wk.running.is_empty() {
                        // Larger than the whole cache: vLLM rejects such a prompt.
                        wk.waiting.pop_front();
                        wk.waiting_prompt_tokens -= plen;
                        self.rejected += 1;
                        self.policy.on_finished(w, req, now)?;
                        continue;
                    }
                    break;
                }
            }
        }
        if step.prefills.is_empty() && step.decodes.is_empty() {
            self.workers[w].busy = false;
            self.workers[w].step = step;
            self.flush_events(w, now);
            return Ok(());
        }
        let ctx: usize = step.decodes.iter().map(|&r| self.state[r].computed).sum();
        let dur = eng.step_overhead_s
            + prefill_tokens as f64 / eng.prefill_tokens_per_s
            + step.decodes.len() as f64 * eng.decode_s_per_seq
            + ctx as f64 * eng.decode_s_per_ctx_token;
        self.workers[w].busy = true;
        self.workers[w].step = step;
        self.flush_events(w, now);
        self.push(now + dur, Kind::StepEnd(w));
        Ok(())
    }

    fn end_step(&mut self, w: usize, now: f64) -> Result<()> {
        let p: &'a Prepared = self.p;
        let bs = p.block_size;
        let step = std::mem::take(&mut self.workers[w].step);
        let mut done = Vec::new();
        for &r in &step.prefills {
            let req = &p.workload.requests[r];
            let plen = req.prompt_len();
            self.workers[w].cache(r, &p.keys[r], plen / bs)?;
            let st = &mut self.state[r];
            st.computed = plen;
            st.generated = 1;
            st.prefilled = true;
            if self.ttft[r].is_none() {
                self.ttft[r] = Some(now - req.arrival_s);
                self.policy.on_first_token(w, req, now)?;
            }
            if st.generated >= req.output_len() {
                done.push(r);
            }
        }
        for &r in &step.decodes {
            let req = &p.workload.requests[r];
            let st = &mut self.state[r];
            st.computed += 1;
            st.generated += 1;
            let upto = st.computed / bs;
            let fin = st.generated >= req.output_len();
            self.workers[w].cache(r, &p.keys[r], upto)?;
            if fin {
                done.push(r);
            }
        }
        for r in done {
            let req = &p.workload.requests[r];
            let wk = &mut self.workers[w];
            wk.pool.free(r as u64);
            wk.running.retain(|&x| x != r);
            self.e2e[r] = Some(now - req.arrival_s);
            self.last_finish = now;
            self.policy.on_finished(w, req, now)?;
        }
        self.workers[w].step = step;
        self.start_step(w, now)
    }

    fn deliver(&mut self, w: usize, now: f64) -> Result<()> {
        match self.deliveries[w].pop_front() {
            Some(batch) => self.policy.on_events(w, &batch, &self.p.workload.requests, now),
            None => Ok(()),
        }
    }
}

/// Runs `policy` over the prepared workload. Deterministic: the same inputs (and a
/// deterministic policy) give the same result.
pub fn run(p: &Prepared, cfg: &SimConfig, policy: &mut dyn Policy) -> Result<RunResult> {
    run_with_progress(p, cfg, policy, &|_| {})
}

/// [`run`], calling `progress(k)` as `k` more requests have arrived (in steps of 256; the
/// calls add up to the number of requests).
pub fn run_with_progress(
    p: &Prepared,
    cfg: &SimConfig,
    policy: &mut dyn Policy,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RunResult> {
    cfg.engine.validate()?;
    if cfg.workers == 0 {
        return Err(Error::config("at least one worker is needed"));
    }
    if cfg.engine.block_size != p.block_size {
        return Err(Error::config(format!(
            "workload hashed at block size {}, engine uses {}",
            p.block_size, cfg.engine.block_size
        )));
    }
    if !(cfg.event_delay_s.is_finite() && cfg.event_delay_s >= 0.0) {
        return Err(Error::config("event_delay_s must be finite and >= 0"));
    }
    let n = p.workload.requests.len();
    let record = policy.wants_events();
    let workers =
        (0..cfg.workers).map(|_| Worker::new(&cfg.engine, record)).collect::<Result<Vec<_>>>()?;
    let mut run = Run {
        p,
        cfg,
        policy,
        workers,
        state: vec![ReqState::default(); n],
        heap: BinaryHeap::new(),
        seq: 0,
        deliveries: vec![VecDeque::new(); cfg.workers],
        views: vec![WorkerView::default(); cfg.workers],
        worker_of: vec![0; n],
        admitted: vec![false; n],
        hit_tokens: vec![0; n],
        block_hits: vec![0; n],
        ttft: vec![None; n],
        e2e: vec![None; n],
        rejected: 0,
        last_finish: 0.0,
    };
    let mut next = 0usize;
    loop {
        let arrival = p.workload.requests.get(next).map(|r| r.arrival_s);
        let top = run.heap.peek().map(|e| e.t);
        match (arrival, top) {
            (None, None) => break,
            (Some(a), t) if t.is_none_or(|t| a < t) => {
                run.arrive(next, a)?;
                next += 1;
                if next % 256 == 0 {
                    progress(256);
                }
            }
            _ => {
                let ev = run.heap.pop().expect("peeked");
                match ev.kind {
                    Kind::StepEnd(w) => run.end_step(w, ev.t)?,
                    Kind::Deliver(w) => run.deliver(w, ev.t)?,
                }
            }
        }
    }
    progress((n % 256) as u64);
    Ok(summarize(&run, cfg))
}

fn summarize(run: &Run<'_>, cfg: &SimConfig) -> RunResult {
    let p = run.p;
    let n = p.workload.requests.len();
    let bs = p.block_size;
    let (mut prompt_tokens, mut hit_tokens, mut blocks, mut block_hits) = (0usize, 0, 0, 0);
    let mut per_worker = vec![0usize; cfg.workers];
    let mut output_tokens = 0usize;
    for r in 0..n {
        if !run.admitted[r] {
            continue;
        }
        let req = &p.workload.requests[r];
        prompt_tokens += req.prompt_len();
        hit_tokens += run.hit_tokens[r];
        blocks += req.prompt_len() / bs;
        block_hits += run.block_hits[r];
        per_worker[run.worker_of[r]] += 1;
        if run.e2e[r].is_some() {
            output_tokens += req.output_len();
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let routed: usize = per_worker.iter().sum();
    let top = per_worker.iter().copied().max().unwrap_or(0);
    let timed = !cfg.engine.instant;
    let mut ttft: Vec<f64> = run.ttft.iter().flatten().copied().collect();
    let mut e2e: Vec<f64> = run.e2e.iter().flatten().copied().collect();
    ttft.sort_by(f64::total_cmp);
    e2e.sort_by(f64::total_cmp);
    let first = p.workload.requests.first().map_or(0.0, |r| r.arrival_s);
    let span = run.last_finish - first;
    let stored: u64 = run.workers.iter().map(|w| w.stored_blocks).sum();
    let present: u64 = run.workers.iter().map(|w| w.pool.num_cached_blocks() as u64).sum();
    RunResult {
        policy: run.policy.name(),
        requests: n,
        completed: e2e.len(),
        rejected: run.rejected,
        hit_rate: ratio(hit_tokens, prompt_tokens),
        block_hit_rate: ratio(block_hits, blocks),
        top_worker_share: ratio(top, routed),
        load_imbalance: if routed == 0 {
            0.0
        } else {
            top as f64 * cfg.workers as f64 / routed as f64
        },
        ttft_p50_s: timed.then(|| percentile(&ttft, 0.5)).flatten(),
        ttft_p90_s: timed.then(|| percentile(&ttft, 0.9)).flatten(),
        ttft_p99_s: timed.then(|| percentile(&ttft, 0.99)).flatten(),
        e2e_mean_s: (timed && !e2e.is_empty()).then(|| e2e.iter().sum::<f64>() / e2e.len() as f64),
        e2e_p90_s: timed.then(|| percentile(&e2e, 0.9)).flatten(),
        throughput_tok_s: (timed && span > 0.0).then(|| output_tokens as f64 / span),
        evictions: stored - present,
        preemptions: run.workers.iter().map(|w| w.preemptions).sum(),
        per_worker,
    }
}

/// The ceiling: one worker with an unbounded cache and no time effects sees every request
/// (every prefix ever computed is still there). Reported as policy `oracle`.
pub fn run_oracle(p: &Prepared, cfg: &SimConfig) -> Result<RunResult> {
    let total_blocks: usize = p
        .workload
        .requests
        .iter()
        .map(|r| (r.prompt_len() + r.output_len()).div_ceil(p.block_size))
        .sum();
    let cap = u32::try_from(total_blocks + 2)
        .map_err(|_| Error::config("workload too large for an unbounded oracle cache"))?;
    run_one_cache(p, cfg, cap.max(2), "oracle")
}

/// The bound of capacity: one LRU cache as large as the whole cluster (`workers x
/// num_gpu_blocks`, one null block in all), no time effects, every request to it. What a
/// router could reach if placement cost nothing (no moves, no second copies, one eviction
/// order for every worker's blocks); the oracle's hit rate minus this one is lost to
/// capacity by any LRU placement. Reported as policy `shared-lru`.
pub fn run_shared_lru(p: &Prepared, cfg: &SimConfig) -> Result<RunResult> {
    // Each worker's count includes vLLM's null block: one null block for the shared cache.
    let blocks = (cfg.engine.num_gpu_blocks.saturating_sub(1))
        .checked_mul(u32::try_from(cfg.workers).unwrap_or(u32::MAX))
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| Error::config("workers x num_gpu_blocks overflows u32"))?;
    run_one_cache(p, cfg, blocks.max(2), "shared-lru")
}

/// Every request of `p` to one instant worker of `num_gpu_blocks` blocks, reported as
/// `name`, with the cluster-wide figures (traffic shares) that one cache cannot have set
/// to their balanced values.
fn run_one_cache(
    p: &Prepared,
    cfg: &SimConfig,
    num_gpu_blocks: u32,
    name: &'static str,
) -> Result<RunResult> {
    let mut engine = cfg.engine.clone();
    engine.instant = true;
    engine.num_gpu_blocks = num_gpu_blocks;
    let ocfg = SimConfig {
        workers: 1,
        engine,
        event_delay_s: 0.0,
        seed: cfg.seed,
        router_replicas: 1,
        tail_quantile: None,
    };
    struct One(&'static str);
    impl Policy for One {
        fn name(&self) -> String {
            self.0.into()
        }
        fn route(&mut self, _r: &Routed<'_>, _v: &ClusterView<'_>) -> Result<usize> {
            Ok(0)
        }
    }
    let mut res = run(p, &ocfg, &mut One(name))?;
    // One cache stands for the whole cluster: traffic shares are not meaningful.
    res.top_worker_share = 1.0 / cfg.workers as f64;
    res.load_imbalance = 1.0;
    res.per_worker = Vec::new();
    Ok(res)
}
