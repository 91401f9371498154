//! Running several policies, and the outputs: a terminal table and the JSON report.

use crate::policy::{builtin, is_builtin};
use crate::sim::{run_oracle, run_with_progress, Prepared, RunResult, SimConfig};
use kvroute::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;

/// The name of the oracle row.
pub const ORACLE: &str = "oracle";

/// The JSON report of one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Workload name.
    pub workload: String,
    /// The settings: workload parameters, cluster and engine.
    pub config: serde_json::Value,
    /// One row per policy, in the order asked.
    pub results: Vec<RunResult>,
}

/// Runs each named policy (the built-ins, or [`ORACLE`]) over `p` in parallel, each run
/// deterministic for `cfg.seed`. `progress(k)` is called as `k` more requests are done
/// (summed over runs). Errors with [`Error::Config`] on an unknown policy name.
pub fn compare(
    p: &Prepared,
    cfg: &SimConfig,
    policies: &[String],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report> {
    for name in policies {
        if name != ORACLE && !is_builtin(name) {
            return Err(Error::config(format!(
                "unknown policy {name:?} (known: {}, {ORACLE})",
                crate::policy::BUILTIN.join(", ")
            )));
        }
    }
    let results = policies
        .par_iter()
        .map(|name| {
            if name == ORACLE {
                let r = run_oracle(p, cfg);
                progress(p.workload.requests.len() as u64);
                return r;
            }
            let mut pol = builtin(
                name,
                cfg.workers,
                cfg.seed,
                &cfg.engine,
                cfg.router_replicas,
                cfg.tail_quantile,
            )?;
            run_with_progress(p, cfg, pol.as_mut(), progress)
        })
        .collect::<Result<Vec<_>>>()?;
    let config = serde_json::json!({
        "workload": p.workload.params,
        "requests": p.workload.requests.len(),
        "cluster": cfg,
    });
    Ok(Report { workload: p.workload.name.clone(), config, results })
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 10.0 => format!("{s:.3}"),
        Some(s) => format!("{s:.1}"),
    }
}

/// The report as a fixed-width table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{:<17} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}\n",
        "policy",
        "hit%",
        "block%",
        "top%",
        "max/μ",
        "ttft p50",
        "ttft p90",
        "ttft p99",
        "e2e avg",
        "out tok/s",
        "evictions"
    );
    for x in &r.results {
        out += &format!(
            "{:<17} {:>7.1} {:>7.1} {:>6.1} {:>6.2} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}\n",
            x.policy,
            x.hit_rate * 100.0,
            x.block_hit_rate * 100.0,
            x.top_worker_share * 100.0,
            x.load_imbalance,
            secs(x.ttft_p50_s),
            secs(x.ttft_p90_s),
            secs(x.ttft_p99_s),
            secs(x.e2e_mean_s),
            x.throughput_tok_s.map_or("-".into(), |t| format!("{t:.0}")),
            x.evictions
        );
    }
    out
}
