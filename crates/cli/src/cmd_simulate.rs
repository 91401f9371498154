//! `kvroute simulate`: replay a workload against simulated vLLM workers under several
//! routing policies and compare them (see docs/simulation.md).

use crate::CliError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvroute_sim::report::{compare, table, Report};
use kvroute_sim::SimulateSpec;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Arguments of `kvroute simulate` (boxed: they are large beside other subcommands').
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    opts: Box<Opts>,
}

/// The options of `kvroute simulate`.
#[derive(clap::Args, Debug)]
struct Opts {
    /// `seed`, `shared-prefix`, `chat` or `trace:PATH` (Mooncake JSONL). Default: the seed
    /// experiment, then a shared-prefix workload.
    #[arg(long)]
    workload: Option<String>,
    /// Number of workers (default: 5 for seed, 8 otherwise).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    workers: Option<u32>,
    /// Comma-separated policies: kvroute, random, round-robin, session-affinity,
    /// prefix-approx, prefix-precise, llm-d, cost, hybrid, oracle (default: all).
    #[arg(long, value_delimiter = ',')]
    policies: Option<Vec<String>>,
    /// Model preset (llama-3-8b, qwen3-8b, qwen3-32b, llama-3-70b; default: llama-3-8b,
    /// qwen3-32b for shared-prefix).
    #[arg(long)]
    model: Option<String>,
    /// GPU preset (a100-40gb, a100-80gb, h100-80gb, h200-141gb).
    #[arg(long, default_value = "h100-80gb")]
    gpu: String,
    /// KV blocks per worker (vLLM num_gpu_blocks), instead of the model/GPU estimate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    capacity_blocks: Option<u32>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    block_size: u32,
    /// Request-rate multiplier: arrival times are divided by it (traces: 2 replays twice
    /// as fast).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Replay only the first N requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Seed for workload generation and policies.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds before a precise policy sees a worker's cache events.
    #[arg(long, default_value_t = 0.05)]
    event_delay: f64,
    /// Independent router replicas in front of the workers: requests are spread over them
    /// round-robin; each sees every worker's events but only its own routings.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    router_replicas: u32,
    /// The `kvroute` policy's tail: the percentile of observed times to first token (a
    /// fraction in (0, 1]) that its history rules protect (default 0.99).
    #[arg(long, value_name = "Q")]
    tail_quantile: Option<f64>,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG chart (hit rate and p90 TTFT by policy) to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

impl Opts {
    /// The run these flags describe.
    fn spec(&self) -> SimulateSpec {
        let defaults = SimulateSpec::default();
        SimulateSpec {
            workloads: self.workload.clone().map_or(defaults.workloads, |w| vec![w]),
            workers: self.workers,
            policies: self.policies.clone(),
            model: self.model.clone(),
            gpu: self.gpu.clone(),
            capacity_blocks: self.capacity_blocks,
            block_size: self.block_size,
            rate: self.rate,
            requests: self.requests,
            seed: self.seed,
            event_delay: self.event_delay,
            router_replicas: self.router_replicas as usize,
            tail_quantile: self.tail_quantile,
        }
    }
}

/// Runs one workload with a progress bar that appears on stderr (if it is a terminal)
/// once the run takes over a second.
fn run_one(spec: &SimulateSpec, kind: &str, policies: &[String]) -> Result<Report, CliError> {
    let (prepared, cfg) = spec.prepare(kind)?;
    let n = prepared.workload.requests.len();
    let bar = ProgressBar::with_draw_target(
        Some((n * policies.len()) as u64),
        ProgressDrawTarget::hidden(),
    );
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {percent}% {elapsed}")
            .map_err(|e| CliError(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_message(format!("simulating {kind}"));
    let started = std::time::Instant::now();
    let shown = AtomicBool::new(false);
    let progress = |k: u64| {
        bar.inc(k);
        if started.elapsed().as_millis() > 1_000 && !shown.swap(true, Ordering::Relaxed) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    };
    let report = compare(&prepared, &cfg, policies, &progress);
    bar.finish_and_clear();
    Ok(report?)
}

/// Runs `kvroute simulate`.
pub fn run(args: Args) -> Result<(), CliError> {
    let args = *args.opts;
    let spec = args.spec();
    let policies = spec.validate()?;
    let mut reports = Vec::new();
    for kind in &spec.workloads {
        let started = std::time::Instant::now();
        let rep = run_one(&spec, kind, &policies)?;
        let cluster = &rep.config["cluster"];
        crate::emit(format!(
            "workload {} : {} requests, {} workers, {} ({} blocks of {} tokens each), {:.1} s",
            rep.workload,
            rep.config["requests"],
            cluster["workers"],
            cluster["engine"]["label"].as_str().unwrap_or(""),
            cluster["engine"]["num_gpu_blocks"],
            cluster["engine"]["block_size"],
            started.elapsed().as_secs_f64()
        ))?;
        crate::emit(table(&rep))?;
        reports.push(rep);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&kvroute_sim::reports_json(&reports)?)
            .map_err(|e| CliError(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    }
    if let Some(path) = &args.svg {
        let svg = kvroute_sim::chart::svg(&reports)?;
        std::fs::write(path, svg).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}
