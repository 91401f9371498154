//! `kvroute-e2e`: the reference experiment over real sockets, next to `kvroute simulate`
//! for the same workload.
//!
//! ```text
//! cargo build --release -p kvroute-cli -p kvroute-e2e
//! target/release/kvroute-e2e --workload seed --time-scale 0.05
//! target/release/kvroute-e2e --workload shared-prefix --time-scale 0.05
//! target/release/kvroute-e2e --workload seed --fault restart
//! ```

use clap::Parser;
use kvroute_e2e::{kvroute_bin, run, scaled_default_preset, ClusterSpec, Fault};
use kvroute_sim::SimulateSpec;

/// The reference experiment end to end: emulated vLLM replicas, kvroute serve, hit rates
/// from the replicas' /metrics; compared with kvroute simulate.
#[derive(Parser, Debug)]
struct Args {
    /// seed (5 replicas) or shared-prefix (8 replicas).
    #[arg(long, default_value = "seed")]
    workload: String,
    /// Replicas (default: 5 for seed, 8 for shared-prefix, as kvroute simulate).
    #[arg(long)]
    replicas: Option<usize>,
    /// Replay only the first N requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Wall-clock seconds per model second, for the replicas and the arrival times.
    #[arg(long, default_value_t = 0.05)]
    time_scale: f64,
    /// Router runs, comma-separated: a kvroute preset name, or "default" for kvroute serve
    /// without --profile.
    #[arg(long, default_value = "session-affinity,default")]
    profiles: String,
    /// Send the load to the replicas in turn, with no router.
    #[arg(long)]
    no_router: bool,
    /// A fault halfway through each run on replica 0: kill, restart, drop, error500, hang.
    #[arg(long)]
    fault: Option<Fault>,
    /// KV blocks per replica (default: the engine preset's estimate).
    #[arg(long)]
    capacity_blocks: Option<u32>,
    /// Also run kvroute simulate with these policies for comparison ("" to skip).
    #[arg(long, default_value = "session-affinity,default")]
    sim_policies: String,
    /// Directory for the processes' logs.
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
    /// Save each run's final router /metrics here (`<dir>/<profile>.prom`).
    #[arg(long)]
    router_metrics_dir: Option<std::path::PathBuf>,
    /// Write the summaries as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(main_async(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvroute-e2e: error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The simulator's policy for kvroute serve's default preset.
fn sim_default() -> String {
    let all = kvroute_sim::spec::all_policies();
    ["kvroute", "prefix-precise"]
        .iter()
        .find(|p| all.iter().any(|a| a == *p))
        .map_or("prefix-precise".into(), |s| s.to_string())
}

async fn main_async(args: Args) -> Result<(), String> {
    let spec = SimulateSpec {
        workloads: vec![args.workload.clone()],
        workers: args.replicas.map(|n| n as u32),
        requests: args.requests,
        capacity_blocks: args.capacity_blocks,
        ..SimulateSpec::default()
    };
    let workload = spec.workload(&args.workload).map_err(|e| e.to_string())?;
    let cluster = spec.cluster(&args.workload).map_err(|e| e.to_string())?;
    let engine_model = if args.workload == "shared-prefix" { "qwen3-32b" } else { "llama-3-8b" };
    let base = ClusterSpec {
        bin: kvroute_bin()?,
        replicas: cluster.workers,
        time_scale: args.time_scale,
        capacity_blocks: args.capacity_blocks,
        engine_model: engine_model.into(),
        hash_seed: None,
        model: "llama-3-8b".into(),
        tokenizer: None,
        router_tokenizer: Some(kvroute_e2e::test_tokenizer().0),
        vocab: Some(kvroute_e2e::test_tokenizer().1),
        serve: None,
        log_dir: args.log_dir.clone(),
    };
    println!(
        "workload {}: {} requests over {:.0} model seconds ({:.1} s wall at time scale {}), {} replicas of {} blocks",
        args.workload,
        workload.requests.len(),
        workload.requests.last().map_or(0.0, |r| r.arrival_s),
        workload.requests.last().map_or(0.0, |r| r.arrival_s) * args.time_scale,
        args.time_scale,
        cluster.workers,
        cluster.engine.num_gpu_blocks
    );
    let fault = args.fault.map(|f| (f, 0));
    let mut summaries = Vec::new();
    if let Some(d) = &args.router_metrics_dir {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let runs: Vec<(String, String, Option<Vec<String>>)> = if args.no_router {
        vec![("no router (round robin)".into(), "round-robin".into(), None)]
    } else {
        args.profiles
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let extra = if p == "default" {
                    scaled_default_preset(base.time_scale)?
                } else {
                    vec!["--profile".into(), p.to_string()]
                };
                Ok((format!("kvroute serve --profile {p}"), p.to_string(), Some(extra)))
            })
            .collect::<Result<_, String>>()?
    };
    for (label, name, serve) in runs {
        let (s, router_metrics) =
            run(ClusterSpec { serve, ..base.clone() }, &workload, &label, fault).await?;
        print!("{s}");
        if let (Some(d), Some(m)) = (&args.router_metrics_dir, router_metrics) {
            let p = d.join(format!("{name}.prom"));
            std::fs::write(&p, m).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        summaries.push(s);
    }
    if !args.sim_policies.is_empty() {
        let policies: Vec<String> = args
            .sim_policies
            .split(',')
            .map(|p| if p == "default" { sim_default() } else { p.to_string() })
            .collect();
        let reports =
            kvroute_sim::simulate(&SimulateSpec { policies: Some(policies), ..spec.clone() })
                .map_err(|e| e.to_string())?;
        for r in &reports {
            for res in &r.results {
                println!(
                    "kvroute simulate {} / {}: hit rate {:.1}%, busiest replica {:.0}% of requests, per replica {:?}",
                    r.workload,
                    res.policy,
                    100.0 * res.hit_rate,
                    100.0 * res.top_worker_share,
                    res.per_worker
                );
            }
        }
    }
    if let Some(p) = args.json {
        let text = serde_json::to_string_pretty(&summaries).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
