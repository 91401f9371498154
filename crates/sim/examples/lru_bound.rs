//! The hit rate of one shared LRU cache as large as the whole cluster: what a router
//! could reach if placement cost nothing (no moves, no duplicates, one eviction order for
//! every worker's blocks). A diagnostic for docs/simulation.md ("Session 7"), not part of
//! the CLI.
//!
//! ```text
//! cargo run --release -p kvroute-sim --example lru_bound -- \
//!     trace:testdata/mooncake/conversation_trace.jsonl 10 187501
//! ```
//!
//! It runs the oracle's engine (one worker, no time effects) with the capacity of `workers
//! x capacity_blocks` instead of an unbounded cache, beside the oracle itself. The gap
//! between the oracle and this bound is lost to capacity (evictions) by any placement; a
//! router's gap to this bound is what its placement adds (moves, uneven caches).

use kvroute::Result;
use kvroute_sim::{ClusterView, Policy, Routed, SimConfig, SimulateSpec};

/// Every request to worker 0.
struct One;

impl Policy for One {
    fn name(&self) -> String {
        "global-lru".into()
    }
    fn route(&mut self, _r: &Routed<'_>, _v: &ClusterView<'_>) -> Result<usize> {
        Ok(0)
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let workload = a.first().cloned().unwrap_or_else(|| "chat".into());
    let mut spec = SimulateSpec { workloads: vec![workload.clone()], ..Default::default() };
    spec.workers = a.get(1).and_then(|s| s.parse().ok()).filter(|&n| n > 0);
    spec.capacity_blocks = a.get(2).and_then(|s| s.parse().ok()).filter(|&n| n > 0);
    let (prepared, cfg) = spec.prepare(&workload)?;
    let oracle = kvroute_sim::run_oracle(&prepared, &cfg)?;
    let mut engine = cfg.engine.clone();
    engine.instant = true;
    // Each worker's count includes vLLM's null block: one null block for the shared cache.
    engine.num_gpu_blocks = (engine.num_gpu_blocks - 1)
        .checked_mul(cfg.workers as u32)
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| kvroute::Error::config("workers x capacity overflows u32"))?;
    let one = SimConfig { workers: 1, engine, event_delay_s: 0.0, ..cfg };
    let shared = kvroute_sim::run(&prepared, &one, &mut One)?;
    println!(
        "oracle hit {:.3}%; one shared LRU of {} x {} blocks: hit {:.3}% ({:.1}% of the \
         oracle's), {} evictions",
        100.0 * oracle.hit_rate,
        cfg.workers,
        cfg.engine.num_gpu_blocks,
        100.0 * shared.hit_rate,
        100.0 * shared.hit_rate / oracle.hit_rate,
        shared.evictions,
    );
    Ok(())
}
