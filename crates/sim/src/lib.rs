//! kvroute-sim: replays LLM serving workloads against simulated vLLM workers.
//!
//! Each simulated worker will be a [`kvroute::model::BlockPool`] plus a time model; this
//! first part provides the workload readers:
//!
//! - [`trace`]: request traces in the Mooncake FAST'25 format.

pub mod trace;
