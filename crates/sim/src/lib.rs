//! kvroute-sim: replays LLM serving workloads against simulated vLLM workers to compare
//! routing policies.
//!
//! - [`workload`]: the requests (seed experiment, shared-prefix groups, multi-turn chat,
//!   Mooncake traces via [`trace`]).
//! - [`engine`]: one worker = a [`kvroute::model::BlockPool`] plus a step-based time model
//!   with continuous batching.
//! - [`policy`]: the [`Policy`] trait and the named policies, all of them
//!   [`router_policy::RouterPolicy`]: kvroute's own router driven by the simulation.
//! - [`sim`]: the deterministic discrete-event loop, the oracle and the metrics.
//! - [`report`]: running several policies in parallel, the table, JSON and SVG outputs.
//!
//! See `docs/simulation.md` for the model, its calibration and the comparisons with
//! published results.

pub mod chart;
pub mod engine;
pub mod keys;
pub mod policy;
pub mod report;
pub mod router_policy;
pub mod sim;
pub mod spec;
pub mod trace;
pub mod workload;

pub use engine::{CacheEvent, EngineConfig};
pub use policy::{ClusterView, Policy, Routed, WorkerView};
pub use router_policy::RouterPolicy;
pub use sim::{run, run_oracle, run_shared_lru, Prepared, RunResult, SimConfig};
pub use spec::{reports_json, simulate, SimulateSpec};
pub use workload::{SimRequest, Workload};
