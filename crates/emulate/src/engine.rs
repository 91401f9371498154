//! The engine: vLLM v1's scheduler loop over a [`BlockPool`] in real time.
//!
//! Scheduling and timing are the simulator's engine model (`kvroute_sim::engine`, see its
//! documentation): each step first gives every prefilled running request one decode slot,
//! preempting the most recently admitted request when the pool is full, then admits waiting
//! requests first come first served within `max_num_seqs` and `max_num_batched_tokens`
//! (chunked prefill off); the step lasts `step_overhead_s + new_prefill_tokens /
//! prefill_tokens_per_s + decodes * decode_s_per_seq + decode_context * decode_s_per_ctx_token`
//! model seconds, which the engine thread sleeps times `time_scale`. At the end of the step
//! prefilled requests emit their first token and their full prompt blocks become cached;
//! decoding requests emit one token and cache each output block once it is full.
//!
//! Block keys are the u64 event hashes of vLLM's own scheme ([`BlockHasher`](kvroute::hash::BlockHasher) with the
//! configured algorithm and `PYTHONHASHSEED`), computed over prompt + output tokens, so the
//! pool's cache and the KV events name blocks exactly as a vLLM engine would. Every step
//! that changed the cache publishes one `KVEventBatch` (vLLM's `take_events` after
//! `update_from_output`).

use crate::metrics::{Finish, Metrics};
use crate::publisher::Publisher;
use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch};
use kvroute::model::{BlockPool, PoolEvent};
use kvroute_sim::EngineConfig;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What the engine tells the HTTP handler of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Emit {
    /// Output token number `index` (0-based).
    Token {
        /// Its position in the output.
        index: usize,
        /// The token id.
        id: u32,
    },
    /// The request is complete.
    Done {
        /// Prompt tokens found in the prefix cache at admission (vLLM's `cached_tokens`).
        cached_tokens: usize,
    },
    /// The engine dropped the request (restart).
    Aborted(String),
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct Submission {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// The output the engine will "generate" (its length is the output length, >= 1).
    pub output: Vec<u32>,
    /// Keys of the full blocks of prompt + output ([`kvroute::hash::BlockHasher::block_keys`]).
    pub keys: Vec<u64>,
}

struct Req {
    prompt_len: usize,
    tokens: Arc<[u32]>,
    keys: Vec<u64>,
    output_len: usize,
    computed: usize,
    generated: usize,
    sent: usize,
    prefilled: bool,
    admitted: bool,
    preempted: bool,
    cached_tokens: usize,
    arrival: Instant,
    tx: UnboundedSender<Emit>,
}

/// A pool event with, for a `Stored` one, the token sequence of its request and the index
/// of the first stored block (the pool records keys and parent; the engine knows the rest).
pub type SourcedEvent = (PoolEvent, Option<(Arc<[u32]>, usize)>);

struct State {
    pool: BlockPool,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    reqs: HashMap<u64, Req>,
    next_id: u64,
    epoch: u64,
    pending: Vec<SourcedEvent>,
    shutdown: bool,
}

/// Engine figures.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Scheduling, capacity and step-time model.
    pub engine: EngineConfig,
    /// Wall-clock seconds per model second (0.01 runs 100 times faster than the model).
    pub time_scale: f64,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    cfg: EngineSettings,
    publisher: Publisher,
    metrics: Arc<Metrics>,
}

/// A running engine (its thread stops when the last handle is dropped... or on shutdown).
#[derive(Clone)]
pub struct Engine {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn now_ts() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Turns the pool's events of one step into vLLM's `KVEventBatch` as a vLLM 0.33 engine
/// (one full-attention KV cache group, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, no LoRA,
/// data-parallel rank 0) sends it: `BlockStored` with the blocks' tokens, `medium` "GPU",
/// one `None` extra key per block, group 0 and kind `full_attention`; one `BlockRemoved`
/// per evicted block; `AllBlocksCleared` for a reset.
///
/// `stored` gives, for each `Stored` event in order, the token sequence of its request and
/// the index of the first stored block.
pub fn to_batch(events: Vec<SourcedEvent>, block_size: usize, ts: f64) -> KvEventBatch {
    let mut out = Vec::with_capacity(events.len());
    for (ev, src) in events {
        match ev {
            PoolEvent::Stored { keys, parent } => {
                let token_ids = match src {
                    Some((tokens, first)) => {
                        let from = (first * block_size).min(tokens.len());
                        let to = ((first + keys.len()) * block_size).min(tokens.len());
                        tokens[from..to].to_vec()
                    }
                    None => Vec::new(),
                };
                out.push(KvEvent::BlockStored(BlockStored {
                    extra_keys: Some(vec![None; keys.len()]),
                    block_hashes: keys.into_iter().map(EngineHash::Int).collect(),
                    parent_block_hash: parent.map(EngineHash::Int),
                    token_ids,
                    block_size: block_size as u32,
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                    kv_cache_spec_kind: Some("full_attention".into()),
                    ..BlockStored::default()
                }));
            }
            PoolEvent::Removed { keys } => {
                for k in keys {
                    out.push(KvEvent::BlockRemoved(BlockRemoved {
                        block_hashes: vec![EngineHash::Int(k)],
                        medium: Some("GPU".into()),
                        group_idx: Some(0),
                        ..BlockRemoved::default()
                    }));
                }
            }
            PoolEvent::Cleared => out.push(KvEvent::AllBlocksCleared),
        }
    }
    let mut b = KvEventBatch::new(ts, out);
    b.data_parallel_rank = Some(0);
    b
}

impl State {
    /// Moves the pool's recorded events into `pending`; a `Stored` gets `src`.
    fn collect(&mut self, src: Option<(Arc<[u32]>, usize)>) {
        for ev in self.pool.drain_events() {
            let s = matches!(ev, PoolEvent::Stored { .. }).then(|| src.clone()).flatten();
            self.pending.push((ev, s));
        }
    }

    /// Caches request `id`'s blocks up to `upto` (capped by its keys).
    fn cache(&mut self, id: u64, upto: usize) {
        let Some(r) = self.reqs.get(&id) else { return };
        let upto = upto.min(r.keys.len());
        let have = self.pool.request_cached_blocks(id).unwrap_or(0);
        if upto <= have {
            return;
        }
        let tokens = Arc::clone(&r.tokens);
        // The keys are the request's own chain and `upto` is within its blocks.
        let keys = std::mem::take(&mut self.reqs.get_mut(&id).expect("present").keys);
        let res = self.pool.cache_blocks(id, &keys, upto);
        self.reqs.get_mut(&id).expect("present").keys = keys;
        if res.is_ok() {
            self.collect(Some((tokens, have)));
        }
    }

    fn remove(&mut self, id: u64) -> Option<Req> {
        self.pool.free(id);
        self.collect(None);
        self.running.retain(|&x| x != id);
        self.waiting.retain(|&x| x != id);
        self.reqs.remove(&id)
    }
}

impl Engine {
    /// Starts the engine thread.
    pub fn start(
        cfg: EngineSettings,
        publisher: Publisher,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        cfg.engine.validate().map_err(|e| e.to_string())?;
        if !(cfg.time_scale.is_finite() && cfg.time_scale >= 0.0) {
            return Err(format!("--time-scale must be finite and >= 0, got {}", cfg.time_scale));
        }
        let pool = BlockPool::new(cfg.engine.num_gpu_blocks, cfg.engine.block_size, true)
            .map_err(|e| e.to_string())?;
        let sh = Arc::new(Shared {
            st: Mutex::new(State {
                pool,
                waiting: VecDeque::new(),
                running: Vec::new(),
                reqs: HashMap::new(),
                next_id: 0,
                epoch: 0,
                pending: Vec::new(),
                shutdown: false,
            }),
            cv: Condvar::new(),
            cfg,
            publisher,
            metrics,
        });
        let worker = Arc::clone(&sh);
        std::thread::Builder::new()
            .name("emulate-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("spawning the engine thread: {e}"))?;
        Ok(Engine { sh })
    }

    /// The engine figures.
    pub fn settings(&self) -> &EngineSettings {
        &self.sh.cfg
    }

    /// The event publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.sh.publisher
    }

    /// Queues a request. Errors if it can never run (longer than the whole KV cache).
    pub fn submit(&self, sub: Submission) -> Result<UnboundedReceiver<Emit>, String> {
        let bs = self.sh.cfg.engine.block_size;
        let usable = (self.sh.cfg.engine.num_gpu_blocks as usize - 1) * bs;
        let total = sub.prompt.len() + sub.output.len();
        if sub.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if sub.output.is_empty() {
            return Err("max_tokens must be at least 1".into());
        }
        if total > usable {
            return Err(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceed the KV cache ({usable} tokens)",
                sub.prompt.len(),
                sub.output.len()
            ));
        }
        let (tx, rx) = unbounded_channel();
        let prompt_len = sub.prompt.len();
        let output_len = sub.output.len();
        let mut tokens = sub.prompt;
        tokens.extend_from_slice(&sub.output);
        let mut st = self.sh.st.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.reqs.insert(
            id,
            Req {
                prompt_len,
                tokens: tokens.into(),
                keys: sub.keys,
                output_len,
                computed: 0,
                generated: 0,
                sent: 0,
                prefilled: false,
                admitted: false,
                preempted: false,
                cached_tokens: 0,
                arrival: Instant::now(),
                tx,
            },
        );
        st.waiting.push_back(id);
        let (r, w, u) = (st.running.len(), st.waiting.len(), st.pool.usage());
        drop(st);
        self.sh.metrics.set_gauges(r, w, u);
        self.sh.cv.notify_all();
        Ok(rx)
    }

    /// A process restart: every request is dropped (its client sees the connection end),
    /// the KV cache is empty, the event sequence starts over at 0 and the metrics are zero.
    pub fn restart(&self) {
        let mut st = self.sh.st.lock();
        st.epoch += 1;
        for (_, r) in st.reqs.drain() {
            let _ = r.tx.send(Emit::Aborted("engine restarted".into()));
        }
        st.waiting.clear();
        st.running.clear();
        st.pending.clear();
        if let Ok(p) =
            BlockPool::new(self.sh.cfg.engine.num_gpu_blocks, self.sh.cfg.engine.block_size, true)
        {
            st.pool = p;
        }
        self.sh.publisher.restart();
        self.sh.metrics.reset();
        drop(st);
        self.sh.cv.notify_all();
    }

    /// Stops the engine thread.
    pub fn shutdown(&self) {
        self.sh.st.lock().shutdown = true;
        self.sh.cv.notify_all();
    }

    /// `(running, waiting, cached blocks)`, for tests and the admin endpoint.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let st = self.sh.st.lock();
        (st.running.len(), st.waiting.len(), st.pool.num_cached_blocks())
    }
}

/// What one step scheduled.
#[derive(Default)]
struct Step {
    prefills: Vec<u64>,
    decodes: Vec<u64>,
}

impl Shared {
    fn run(self: Arc<Self>) {
        let mut st = self.st.lock();
        let mut deadline = Instant::now();
        loop {
            if st.shutdown {
                return;
            }
            self.drop_cancelled(&mut st);
            let epoch = st.epoch;
            let Some((step, dur)) = self.schedule(&mut st) else {
                self.publish(&mut st);
                self.gauges(&st);
                self.cv.wait(&mut st);
                deadline = Instant::now();
                continue;
            };
            self.gauges(&st);
            // Sleep the step's model time, scaled; a late engine does not try to catch up
            // beyond the current instant.
            let now = Instant::now();
            deadline = deadline.max(now - Duration::from_millis(5))
                + Duration::from_secs_f64(dur * self.cfg.time_scale);
            parking_lot::MutexGuard::unlocked(&mut st, || {
                let now = Instant::now();
                if deadline > now {
                    std::thread::sleep(deadline - now);
                }
            });
            if st.epoch != epoch {
                continue;
            }
            self.end_step(&mut st, step);
            self.publish(&mut st);
            self.gauges(&st);
        }
    }

    fn gauges(&self, st: &State) {
        self.metrics.set_gauges(st.running.len(), st.waiting.len(), st.pool.usage());
    }

    fn publish(&self, st: &mut State) {
        if st.pending.is_empty() {
            return;
        }
        let events = st.pending.drain(..).collect();
        let batch = to_batch(events, self.cfg.engine.block_size, now_ts());
        self.publisher.publish(kvroute::events::vllm::encode(&batch));
    }

    /// Aborts requests whose client went away (vLLM aborts on disconnect).
    fn drop_cancelled(&self, st: &mut State) {
        let gone: Vec<u64> =
            st.reqs.iter().filter(|(_, r)| r.tx.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            st.remove(id);
            self.metrics.finished(Finish::Abort);
        }
    }

    fn schedule(&self, st: &mut State) -> Option<(Step, f64)> {
        let eng = &self.cfg.engine;
        let mut step = Step::default();
        // 1. Decodes, preempting from the back when the pool is full.
        let mut i = 0;
        while i < st.running.len() {
            let id = st.running[i];
            let need = st.reqs[&id].computed + 1;
            if st.pool.grow(id, need).unwrap_or(false) {
                step.decodes.push(id);
                i += 1;
                continue;
            }
            let victim = st.running.pop().expect("running is not empty");
            st.pool.free(victim);
            st.waiting.push_front(victim);
            if let Some(r) = st.reqs.get_mut(&victim) {
                r.computed = 0;
                r.generated = 0;
                r.prefilled = false;
                r.preempted = true;
            }
            self.metrics.preempted();
            if victim == id {
                break;
            }
        }
        st.collect(None);
        // 2. Admissions.
        let bs = eng.block_size;
        let mut budget_used = step.decodes.len();
        let mut prefill_tokens = 0usize;
        while st.running.len() < eng.max_num_seqs {
            let Some(&id) = st.waiting.front() else { break };
            let r = &st.reqs[&id];
            let plen = r.prompt_len;
            let pk = &r.keys[..(plen / bs).min(r.keys.len())];
            let hits = st.pool.computed_prefix(pk, plen);
            let new = plen - hits * bs;
            let scheduled = !step.prefills.is_empty() || !step.decodes.is_empty();
            if scheduled && budget_used + new > eng.max_num_batched_tokens {
                break;
            }
            let keys = std::mem::take(&mut st.reqs.get_mut(&id).expect("present").keys);
            let alloc = st.pool.allocate(id, &keys, plen);
            st.reqs.get_mut(&id).expect("present").keys = keys;
            match alloc {
                Ok(Some(a)) => {
                    st.collect(None);
                    st.waiting.pop_front();
                    st.running.push(id);
                    let r = st.reqs.get_mut(&id).expect("present");
                    if !r.admitted {
                        r.admitted = true;
                        r.cached_tokens = a.hit_tokens;
                    }
                    if !r.preempted {
                        self.metrics.prefix_query(plen, a.hit_tokens);
                    }
                    budget_used += new;
                    prefill_tokens += new;
                    step.prefills.push(id);
                }
                Ok(None) if st.running.is_empty() => {
                    // Larger than the free cache of an idle engine: cannot ever run.
                    if let Some(r) = st.remove(id) {
                        let _ =
                            r.tx.send(Emit::Aborted("request does not fit the KV cache".into()));
                    }
                    self.metrics.finished(Finish::Abort);
                }
                _ => break,
            }
        }
        if step.prefills.is_empty() && step.decodes.is_empty() {
            return None;
        }
        let ctx: usize = step.decodes.iter().map(|id| st.reqs[id].computed).sum();
        let dur = eng.step_overhead_s
            + prefill_tokens as f64 / eng.prefill_tokens_per_s
            + step.decodes.len() as f64 * eng.decode_s_per_seq
            + ctx as f64 * eng.decode_s_per_ctx_token;
        Some((step, dur))
    }

    fn end_step(&self, st: &mut State, step: Step) {
        let bs = self.cfg.engine.block_size;
        let mut done = Vec::new();
        let mut generated = 0;
        for &id in &step.prefills {
            let Some(plen) = st.reqs.get(&id).map(|r| r.prompt_len) else { continue };
            st.cache(id, plen / bs);
            let r = st.reqs.get_mut(&id).expect("present");
            r.computed = plen;
            r.generated = 1;
            r.prefilled = true;
            if r.sent == 0 {
                self.metrics.ttft(r.arrival.elapsed().as_secs_f64() / self.scale());
                self.metrics.prompt_processed(plen);
            }
            generated += emit(r);
            if r.generated >= r.output_len {
                done.push(id);
            }
        }
        for &id in &step.decodes {
            let Some(r) = st.reqs.get_mut(&id) else { continue };
            r.computed += 1;
            r.generated += 1;
            generated += emit(r);
            let upto = r.computed / bs;
            if r.generated >= r.output_len {
                done.push(id);
            }
            st.cache(id, upto);
        }
        self.metrics.generated(generated);
        for id in done {
            if let Some(r) = st.remove(id) {
                let _ = r.tx.send(Emit::Done { cached_tokens: r.cached_tokens });
                self.metrics.finished(Finish::Length);
            }
        }
    }

    fn scale(&self) -> f64 {
        if self.cfg.time_scale > 0.0 {
            self.cfg.time_scale
        } else {
            1.0
        }
    }
}

/// Sends the tokens generated but not yet sent (a recomputed request does not repeat them).
fn emit(r: &mut Req) -> usize {
    let mut n = 0;
    while r.sent < r.generated.min(r.output_len) {
        let id = r.tokens[r.prompt_len + r.sent];
        let _ = r.tx.send(Emit::Token { index: r.sent, id });
        r.sent += 1;
        n += 1;
    }
    n
}
