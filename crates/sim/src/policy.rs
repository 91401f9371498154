//! Routing policies: the [`Policy`] trait the simulator drives, and the named policies.
//!
//! Every named policy is [`RouterPolicy`]: `kvroute::router::Router` in a mode with a
//! profile preset (see `crates/core/src/score/profile.rs` for the presets):
//!
//! | name | router mode | profile preset | what it knows | how it picks |
//! |---|---|---|---|---|
//! | `kvroute` | precise | `kvroute` | events + predicted residency + never-stale load + learned prefill rates | lowest predicted TTFT in seconds, balance guard, near-ties to the less loaded |
//! | `random` | precise | `random` | nothing | uniform |
//! | `round-robin` | precise | `round-robin` | nothing | in turn |
//! | `session-affinity` | precise | `session-affinity` | the session key (client IP) | the worker that last served the key within the TTL (2 h), else random (Kubernetes `sessionAffinity: ClientIP`) |
//! | `prefix-approx` | approximate | `prefix` | its own routing, run through a model of each worker's block pool | longest predicted prefix |
//! | `prefix-precise` | precise | `prefix` | the workers' KV events (after the event delay) | longest cached prefix |
//! | `llm-d` | precise | `llm-d` | events + scraped load | `3 x prefix + 2 x queue + 2 x KV utilization` |
//! | `cost` | precise | `cost` | events + its lifecycle tracking | Dynamo-style cost, argmin |
//! | `hybrid` | hybrid | `llm-d` | predictions for a worker until its events arrive, then events | as `llm-d` |
//!
//! Ties go uniformly at random (the router's max picker). The oracle is not a router
//! policy: see [`crate::sim::run_oracle`].

use crate::engine::{CacheEvent, EngineConfig};
use crate::router_policy::{RouterPolicy, ROUTER_POLICIES};
use crate::workload::SimRequest;
use kvroute::{Error, Result};

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
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> Result<usize>;
    /// A batch of cache events from `worker`, delivered after the configured delay.
    /// `reqs` is the workload (a `Stored` names the request index whose blocks these are).
    fn on_events(
        &mut self,
        _worker: usize,
        _evs: &[CacheEvent],
        _reqs: &[SimRequest],
        _now_s: f64,
    ) -> Result<()> {
        Ok(())
    }
    /// The request's prefill finished on `worker` (first token out).
    fn on_first_token(&mut self, _worker: usize, _req: &SimRequest, _now_s: f64) -> Result<()> {
        Ok(())
    }
    /// The request finished on `worker`, or `worker` rejected it (a prompt larger than its
    /// whole cache).
    fn on_finished(&mut self, _worker: usize, _req: &SimRequest, _now_s: f64) -> Result<()> {
        Ok(())
    }
}

/// Names of the built-in policies, in report order.
pub const BUILTIN: &[&str] = &[
    "kvroute",
    "random",
    "round-robin",
    "session-affinity",
    "prefix-approx",
    "prefix-precise",
    "llm-d",
    "cost",
    "hybrid",
];

/// Whether `name` is a built-in policy.
pub fn is_builtin(name: &str) -> bool {
    BUILTIN.contains(&name)
}

/// A built-in policy by name (see the module table), for `workers` workers of `engine`,
/// behind `replicas` router replicas ([`RouterPolicy::with_replicas`]); `seed` fixes its
/// random choices; `tail_quantile` overrides the `kvroute` profile's
/// ([`RouterPolicy::with_tail_quantile`]). Errors with [`Error::Config`] on an unknown
/// name or an out-of-range quantile.
pub fn builtin(
    name: &str,
    workers: usize,
    seed: u64,
    engine: &EngineConfig,
    replicas: usize,
    tail_quantile: Option<f64>,
) -> Result<Box<dyn Policy>> {
    if !is_builtin(name) {
        return Err(Error::config(format!(
            "unknown policy {name:?} (known: {})",
            BUILTIN.join(", ")
        )));
    }
    debug_assert!(ROUTER_POLICIES.iter().any(|(n, _, _)| *n == name));
    Ok(Box::new(
        RouterPolicy::named(name, workers, engine, seed)?
            .with_tail_quantile(tail_quantile)?
            .with_replicas(replicas)?,
    ))
}
