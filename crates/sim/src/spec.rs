//! One description of a simulation run, shared by `kvroute simulate` and the Python
//! `kvroute.simulate(...)`: which workload, cluster and policies, and the function that
//! runs it. Front ends only map their arguments onto [`SimulateSpec`].

use crate::policy::BUILTIN;
use crate::report::{compare, Report, ORACLE};
use crate::trace::read_mooncake;
use crate::workload::{self, ChatParams, SeedParams, SharedPrefixParams, TraceOptions};
use crate::{EngineConfig, Prepared, SimConfig, Workload};
use kvroute::score::{TtftParams, TtftPolicy};
use kvroute::{Error, Result};
use serde::{Deserialize, Serialize};

/// Every policy name `simulate` knows, in the default order.
pub fn all_policies() -> Vec<String> {
    BUILTIN.iter().map(|s| s.to_string()).chain([ORACLE.to_string()]).collect()
}

/// A simulation run. Every field has a default (`{}` runs the built-in default: the seed
/// experiment, then the shared-prefix workload, with every policy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateSpec {
    /// Workloads to run one after the other: `seed`, `shared-prefix`, `chat` or
    /// `trace:PATH` (Mooncake JSONL).
    pub workloads: Vec<String>,
    /// Workers (default: 5 for `seed`, 8 otherwise).
    pub workers: Option<u32>,
    /// Policies (default: all of [`all_policies`]).
    pub policies: Option<Vec<String>>,
    /// Model preset (default: `llama-3-8b`; `qwen3-32b` for `shared-prefix`).
    pub model: Option<String>,
    /// GPU preset.
    pub gpu: String,
    /// KV blocks per worker (vLLM `num_gpu_blocks`) instead of the model/GPU estimate.
    pub capacity_blocks: Option<u32>,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Request-rate multiplier (arrival times are divided by it).
    pub rate: f64,
    /// Replay only the first N requests.
    pub requests: Option<usize>,
    /// Seed of workload generation and policies.
    pub seed: u64,
    /// Seconds before a precise policy sees a worker's cache events.
    pub event_delay: f64,
    /// Independent router replicas in front of the workers (requests round-robin).
    pub router_replicas: usize,
    /// The `kvroute` policy's `tail_quantile` (`None`: the preset's 0.99).
    pub tail_quantile: Option<f64>,
}

impl Default for SimulateSpec {
    fn default() -> Self {
        SimulateSpec {
            workloads: vec!["seed".into(), "shared-prefix".into()],
            workers: None,
            policies: None,
            model: None,
            gpu: "h100-80gb".into(),
            capacity_blocks: None,
            block_size: 16,
            rate: 1.0,
            requests: None,
            seed: 0,
            event_delay: 0.05,
            router_replicas: 1,
            tail_quantile: None,
        }
    }
}

impl SimulateSpec {
    /// Parses a spec from JSON; unknown fields are errors naming the field.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::config(format!("simulate spec: {e}")))
    }

    /// Checks every setting and returns the policies to run.
    pub fn validate(&self) -> Result<Vec<String>> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(Error::config(format!("rate must be positive, got {}", self.rate)));
        }
        if !(self.event_delay.is_finite() && self.event_delay >= 0.0) {
            return Err(Error::config("event_delay must be >= 0"));
        }
        if self.requests == Some(0) {
            return Err(Error::config("requests must be at least 1"));
        }
        if self.workers == Some(0) || self.workers.is_some_and(|w| w > 4096) {
            return Err(Error::config("workers must be between 1 and 4096"));
        }
        if !(1..=4096).contains(&self.block_size) {
            return Err(Error::config("block_size must be between 1 and 4096"));
        }
        if self.capacity_blocks.is_some_and(|c| c < 2) {
            return Err(Error::config("capacity_blocks must be at least 2"));
        }
        if !(1..=64).contains(&self.router_replicas) {
            return Err(Error::config("router_replicas must be between 1 and 64"));
        }
        if let Some(q) = self.tail_quantile {
            // The picker's own range check, with a message in this spec's terms.
            let params = TtftParams { tail_quantile: Some(q), ..TtftParams::default() };
            TtftPolicy::from_params(&params)
                .map_err(|_| Error::config("tail_quantile must be in (0, 1], for example 0.99"))?;
        }
        if self.workloads.is_empty() {
            return Err(Error::config("no workload given"));
        }
        let known = all_policies();
        let policies: Vec<String> = match &self.policies {
            Some(p) => p.iter().map(|s| s.trim().to_string()).collect(),
            None => known.clone(),
        };
        if policies.is_empty() {
            return Err(Error::config("the policy list is empty"));
        }
        for p in &policies {
            if !known.contains(p) {
                return Err(Error::config(format!(
                    "unknown policy {p:?} (known: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(policies)
    }

    /// The workload named `kind`, generated (or read) with this spec's seed, truncated and
    /// rate-scaled as asked.
    pub fn workload(&self, kind: &str) -> Result<Workload> {
        let seed = self.seed;
        let mut w = match kind {
            "seed" => workload::seed_experiment(&SeedParams { seed, ..SeedParams::default() }),
            "shared-prefix" => workload::shared_prefix(&SharedPrefixParams {
                seed,
                ..SharedPrefixParams::default()
            }),
            "chat" => workload::chat(&ChatParams { seed, ..ChatParams::default() }),
            _ => match kind.strip_prefix("trace:") {
                Some(path) if !path.is_empty() => workload::from_mooncake(
                    kind,
                    &read_mooncake(path)?,
                    &TraceOptions { pad_partial_blocks: false, seed },
                ),
                _ => {
                    return Err(Error::config(format!(
                    "unknown workload {kind:?} (expected seed, shared-prefix, chat or trace:PATH)"
                )))
                }
            },
        };
        if let Some(n) = self.requests {
            w.truncate(n);
        }
        if self.rate != 1.0 {
            w.scale_rate(self.rate);
        }
        Ok(w)
    }

    /// The cluster for workload `kind`.
    pub fn cluster(&self, kind: &str) -> Result<SimConfig> {
        let model = self.model.clone().unwrap_or_else(|| {
            if kind == "shared-prefix" { "qwen3-32b" } else { "llama-3-8b" }.into()
        });
        let mut engine = EngineConfig::preset(&model, &self.gpu, self.block_size as usize)?;
        if let Some(c) = self.capacity_blocks {
            engine.num_gpu_blocks = c;
        }
        let workers = self.workers.map_or(if kind == "seed" { 5 } else { 8 }, |n| n as usize);
        Ok(SimConfig {
            workers,
            engine,
            event_delay_s: self.event_delay,
            seed: self.seed,
            router_replicas: self.router_replicas,
            tail_quantile: self.tail_quantile,
        })
    }

    /// Generates workload `kind` and its cluster, ready to run.
    pub fn prepare(&self, kind: &str) -> Result<(Prepared, SimConfig)> {
        let cfg = self.cluster(kind)?;
        let prepared = Prepared::new(self.workload(kind)?, self.block_size as usize)?;
        Ok((prepared, cfg))
    }
}

/// Runs every workload of `spec` and returns one report each.
pub fn simulate(spec: &SimulateSpec) -> Result<Vec<Report>> {
    let policies = spec.validate()?;
    spec.workloads
        .iter()
        .map(|k| {
            let (prepared, cfg) = spec.prepare(k)?;
            compare(&prepared, &cfg, &policies, &|_| {})
        })
        .collect()
}

/// What `kvroute simulate --json` writes for `reports`: one report object for one
/// workload, an array of them for several.
pub fn reports_json(reports: &[Report]) -> Result<serde_json::Value> {
    let v = if reports.len() == 1 {
        serde_json::to_value(&reports[0])
    } else {
        serde_json::to_value(reports)
    };
    v.map_err(|e| Error::Internal(e.to_string()))
}
