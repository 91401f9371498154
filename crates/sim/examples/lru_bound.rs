//! The hit rate of one shared LRU cache as large as the whole cluster: what a router
//! could reach if placement cost nothing (no moves, no duplicates, one eviction order for
//! every worker's blocks). A diagnostic for docs/simulation.md ("Session 7"), not part of
//! the CLI.
//!
//! ```text
//! cargo run --release -p kvroute-sim --example lru_bound -- \
//!     trace:testdata/mooncake/conversation_trace.jsonl 10 187501 [REQUESTS]
//! ```
//!
//! It runs [`kvroute_sim::run_shared_lru`] (the oracle's engine, one worker and no time
//! effects, with the capacity of `workers x capacity_blocks` instead of an unbounded cache)
//! beside the oracle itself. The gap between the oracle and this bound is lost to capacity
//! (evictions) by any placement; a router's gap to this bound is what its placement adds
//! (moves, uneven caches).

mod common;

use kvroute::Result;

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (workload, spec) = common::spec_from_args(&a);
    let (prepared, cfg) = spec.prepare(&workload)?;
    let oracle = kvroute_sim::run_oracle(&prepared, &cfg)?;
    let shared = kvroute_sim::run_shared_lru(&prepared, &cfg)?;
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
