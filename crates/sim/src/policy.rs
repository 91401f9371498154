//! Routing policies: the [`Policy`] trait and the simulator's built-in policies.
//!
//! | name | what it knows | how it picks |
//! |---|---|---|
//! | `random` | nothing | uniform |
//! | `round-robin` | nothing | in turn |
//! | `session-affinity` | the session key (client IP) | Kubernetes `sessionAffinity: ClientIP`: a new key goes to a random worker, then sticks while it was seen within the TTL (2 h) |
//! | `prefix-approx` | its own routing history, run through a per-worker cache model | longest predicted prefix, ties to the least loaded |
//! | `prefix-precise` | the workers' KV events (after the event delay) | longest cached prefix, ties to the least loaded |
//! | `llm-d` | events + load | `3 x prefix share + 2 x queue score + 2 x (1 - KV usage)` (llm-d's precise-prefix-cache scorer with its queue and KV-utilization scorers) |
//! | `cost` | events + load | Dynamo-style cost: `new prefill blocks after the cache credit + in-flight prefill blocks + active blocks` (as tracked from its own routing: prompts routed there and not finished), argmin |
//! | `hybrid` | events, plus its own predictions for blocks not yet announced | as `llm-d` |
//!
//! Ties are broken by fewer waiting + running requests, then at random (seeded).

use crate::engine::CacheEvent;
use crate::workload::SimRequest;
use hashbrown::HashMap;
use kvroute::model::BlockPool;
use kvroute::rng::SplitMix64;
use std::sync::Arc;

/// What a policy sees of one worker when it routes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerView {
    /// Requests waiting to be scheduled.
    pub waiting: usize,
    /// Requests running (prefill or decode).
    pub running: usize,
    /// KV cache usage in `[0, 1]` as vLLM reports it.
    pub kv_usage: f64,
    /// Prompt tokens of the waiting requests.
    pub waiting_prompt_tokens: usize,
}

/// What a policy sees of the cluster when it routes.
#[derive(Clone, Copy, Debug)]
pub struct ClusterView<'a> {
    /// Simulated time, seconds.
    pub now_s: f64,
    /// Tokens per block.
    pub block_size: usize,
    /// KV blocks per worker (`num_gpu_blocks`).
    pub num_gpu_blocks: u32,
    /// One entry per worker.
    pub workers: &'a [WorkerView],
}

/// A request as the simulator hands it to a policy.
#[derive(Clone, Copy, Debug)]
pub struct Routed<'a> {
    /// The request.
    pub req: &'a SimRequest,
    /// The simulator's keys of the prompt's full blocks.
    pub prompt_keys: &'a [u64],
    /// Prompt length in tokens.
    pub prompt_len: usize,
}

/// A routing policy under simulation. One instance serves one run; it must be
/// deterministic given its construction (seed) and the calls it receives.
pub trait Policy: Send {
    /// The name shown in reports.
    fn name(&self) -> String;
    /// Whether it wants the workers' cache events (precise policies). Recording costs time.
    fn wants_events(&self) -> bool {
        false
    }
    /// Picks a worker index in `0..view.workers.len()` for `r`.
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> usize;
    /// A batch of cache events from `worker`, delivered after the configured delay.
    /// `reqs` is the workload (a `Stored` names the request index whose blocks these are).
    fn on_events(
        &mut self,
        _worker: usize,
        _evs: &[CacheEvent],
        _reqs: &[SimRequest],
        _now_s: f64,
    ) {
    }
    /// The request's prefill finished on `worker` (first token out).
    fn on_first_token(&mut self, _worker: usize, _req: &SimRequest, _now_s: f64) {}
    /// The request finished on `worker`.
    fn on_finished(&mut self, _worker: usize, _req: &SimRequest, _now_s: f64) {}
}

/// Names of the built-in policies, in report order.
pub const BUILTIN: &[&str] = &[
    "random",
    "round-robin",
    "session-affinity",
    "prefix-approx",
    "prefix-precise",
    "llm-d",
    "cost",
    "hybrid",
];

/// A built-in policy by name (see the module table), for `workers` workers; `None` if the
/// name is unknown. `seed` fixes its random choices.
pub fn builtin(
    name: &str,
    workers: usize,
    seed: u64,
    engine: &crate::EngineConfig,
) -> Option<Box<dyn Policy>> {
    let rng = SplitMix64::new(seed ^ kvroute::rng::splitmix64(name.len() as u64 ^ 0x9011c7));
    Some(match name {
        "random" => Box::new(Random { rng }),
        "round-robin" => Box::new(RoundRobin { next: 0, workers }),
        "session-affinity" => {
            Box::new(SessionAffinity { rng, ttl_s: 7_200.0, table: HashMap::new() })
        }
        "prefix-approx" => Box::new(PrefixApprox {
            rng,
            models: (0..workers)
                .map(|_| BlockPool::new(engine.num_gpu_blocks, engine.block_size, false))
                .collect::<kvroute::Result<Vec<_>>>()
                .ok()?,
            next_id: 0,
        }),
        "prefix-precise" | "llm-d" | "cost" | "hybrid" => Box::new(Precise {
            name: name.to_string(),
            rng,
            scoring: match name {
                "prefix-precise" => Scoring::PrefixOnly,
                "cost" => Scoring::Cost,
                _ => Scoring::LlmD,
            },
            index: (0..workers).map(|_| HashMap::new()).collect(),
            predicted: if name == "hybrid" {
                Some((0..workers).map(|_| HashMap::new()).collect())
            } else {
                None
            },
            active_blocks: vec![0; workers],
            prefill_blocks: vec![0; workers],
            routed_to: HashMap::new(),
        }),
        _ => return None,
    })
}

/// Index of the best score (higher is better); ties to fewer waiting + running, then random.
fn pick(scores: &[f64], view: &ClusterView<'_>, rng: &mut SplitMix64) -> usize {
    let mut best = f64::NEG_INFINITY;
    let mut cands: Vec<usize> = Vec::new();
    for (i, &s) in scores.iter().enumerate() {
        if s > best + 1e-12 {
            best = s;
            cands.clear();
            cands.push(i);
        } else if (s - best).abs() <= 1e-12 {
            cands.push(i);
        }
    }
    let load = |i: usize| view.workers[i].waiting + view.workers[i].running;
    let min_load = cands.iter().map(|&i| load(i)).min().unwrap_or(0);
    cands.retain(|&i| load(i) == min_load);
    cands[rng.below(cands.len() as u64) as usize]
}

struct Random {
    rng: SplitMix64,
}

impl Policy for Random {
    fn name(&self) -> String {
        "random".into()
    }
    fn route(&mut self, _r: &Routed<'_>, view: &ClusterView<'_>) -> usize {
        self.rng.below(view.workers.len() as u64) as usize
    }
}

struct RoundRobin {
    next: usize,
    workers: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> String {
        "round-robin".into()
    }
    fn route(&mut self, _r: &Routed<'_>, _view: &ClusterView<'_>) -> usize {
        let w = self.next % self.workers;
        self.next += 1;
        w
    }
}

struct SessionAffinity {
    rng: SplitMix64,
    ttl_s: f64,
    table: HashMap<Arc<str>, (usize, f64)>,
}

impl Policy for SessionAffinity {
    fn name(&self) -> String {
        "session-affinity".into()
    }
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> usize {
        let n = view.workers.len() as u64;
        let Some(key) = &r.req.session else {
            return self.rng.below(n) as usize;
        };
        let now = view.now_s;
        let w = match self.table.get(key) {
            Some(&(w, last)) if now - last <= self.ttl_s => w,
            _ => self.rng.below(n) as usize,
        };
        self.table.insert(key.clone(), (w, now));
        w
    }
}

struct PrefixApprox {
    rng: SplitMix64,
    models: Vec<BlockPool>,
    next_id: u64,
}

impl Policy for PrefixApprox {
    fn name(&self) -> String {
        "prefix-approx".into()
    }
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> usize {
        let scores: Vec<f64> = self
            .models
            .iter()
            .map(|m| m.computed_prefix(r.prompt_keys, r.prompt_len) as f64)
            .collect();
        let w = pick(&scores, view, &mut self.rng);
        // The chosen worker's model takes the prompt: cached now, freed at once (LRU).
        let m = &mut self.models[w];
        self.next_id += 1;
        if let Ok(Some(_)) = m.allocate(self.next_id, r.prompt_keys, r.prompt_len) {
            let _ = m.cache_blocks(self.next_id, r.prompt_keys, r.prompt_keys.len());
            m.free(self.next_id);
        }
        w
    }
}

enum Scoring {
    PrefixOnly,
    LlmD,
    Cost,
}

/// Event-driven policies: a per-worker index of cached keys (with copy counts).
struct Precise {
    name: String,
    rng: SplitMix64,
    scoring: Scoring,
    index: Vec<HashMap<u64, u32>>,
    /// Hybrid: keys predicted on a worker, with the time the prediction expires.
    predicted: Option<Vec<HashMap<u64, f64>>>,
    /// Blocks of the prompts routed to each worker and not finished.
    active_blocks: Vec<usize>,
    /// Uncached prompt blocks routed to each worker whose prefill has not finished.
    prefill_blocks: Vec<usize>,
    /// Request id -> (worker, active blocks, pending prefill blocks).
    routed_to: HashMap<u64, (usize, usize, usize)>,
}

/// How long a hybrid prediction stands in for events that have not arrived yet, seconds.
const PREDICTION_TTL_S: f64 = 30.0;

impl Precise {
    fn matched(&self, w: usize, keys: &[u64], max: usize, now: f64) -> usize {
        let idx = &self.index[w];
        let pred = self.predicted.as_ref().map(|p| &p[w]);
        keys[..max.min(keys.len())]
            .iter()
            .take_while(|k| {
                idx.contains_key(*k)
                    || pred.is_some_and(|p| p.get(*k).is_some_and(|&exp| exp > now))
            })
            .count()
    }
}

impl Policy for Precise {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn wants_events(&self) -> bool {
        true
    }
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> usize {
        let bs = view.block_size;
        let max = r.prompt_len.saturating_sub(1) / bs;
        let n = view.workers.len();
        let matched: Vec<usize> =
            (0..n).map(|w| self.matched(w, r.prompt_keys, max, view.now_s)).collect();
        let total = r.prompt_keys.len().max(1) as f64;
        let scores: Vec<f64> = match self.scoring {
            Scoring::PrefixOnly => matched.iter().map(|&m| m as f64).collect(),
            Scoring::LlmD => {
                let q: Vec<usize> = view.workers.iter().map(|v| v.waiting).collect();
                let (qmin, qmax) = (*q.iter().min().unwrap_or(&0), *q.iter().max().unwrap_or(&0));
                (0..n)
                    .map(|w| {
                        let prefix = matched[w] as f64 / total;
                        let queue = if qmax == qmin {
                            1.0
                        } else {
                            (qmax - q[w]) as f64 / (qmax - qmin) as f64
                        };
                        let kv = 1.0 - view.workers[w].kv_usage;
                        3.0 * prefix + 2.0 * queue + 2.0 * kv
                    })
                    .collect()
            }
            Scoring::Cost => (0..n)
                .map(|w| {
                    let prefill = r.prompt_len.div_ceil(bs) - matched[w];
                    -((prefill + self.prefill_blocks[w] + self.active_blocks[w]) as f64)
                })
                .collect(),
        };
        let w = pick(&scores, view, &mut self.rng);
        // Dynamo's active-sequence tracking: the prompt's blocks from routing on.
        let blocks = r.prompt_len.div_ceil(bs);
        let prefill = r.prompt_len.div_ceil(bs) - matched[w];
        self.active_blocks[w] += blocks;
        self.prefill_blocks[w] += prefill;
        self.routed_to.insert(r.req.id, (w, blocks, prefill));
        if let Some(pred) = &mut self.predicted {
            let p = &mut pred[w];
            if p.len() > 1 << 20 {
                let now = view.now_s;
                p.retain(|_, exp| *exp > now);
            }
            for &k in r.prompt_keys {
                p.insert(k, view.now_s + PREDICTION_TTL_S);
            }
        }
        w
    }
    fn on_events(&mut self, worker: usize, evs: &[CacheEvent], _reqs: &[SimRequest], _now: f64) {
        let idx = &mut self.index[worker];
        for ev in evs {
            match ev {
                CacheEvent::Stored { keys, .. } => {
                    for &k in keys {
                        *idx.entry(k).or_insert(0) += 1;
                    }
                }
                CacheEvent::Removed { key } => {
                    if let Some(c) = idx.get_mut(key) {
                        *c -= 1;
                        if *c == 0 {
                            idx.remove(key);
                        }
                    }
                }
                CacheEvent::Cleared => idx.clear(),
            }
        }
    }
    fn on_first_token(&mut self, _worker: usize, req: &SimRequest, _now_s: f64) {
        if let Some((w, _, p)) = self.routed_to.get_mut(&req.id) {
            self.prefill_blocks[*w] -= std::mem::take(p);
        }
    }
    fn on_finished(&mut self, _worker: usize, req: &SimRequest, _now_s: f64) {
        if let Some((w, b, p)) = self.routed_to.remove(&req.id) {
            self.active_blocks[w] -= b;
            self.prefill_blocks[w] -= p;
        }
    }
}
