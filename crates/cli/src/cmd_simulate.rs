//! `kvroute simulate`: replay a workload against simulated vLLM workers under several
//! routing policies and compare them (see docs/simulation.md).

use crate::CliError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvroute_sim::report::{compare, table, Report};
use kvroute_sim::trace::read_mooncake;
use kvroute_sim::workload::{self, ChatParams, SeedParams, SharedPrefixParams, TraceOptions};
use kvroute_sim::{EngineConfig, Prepared, SimConfig, Workload};
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
    /// Comma-separated policies: random, round-robin, session-affinity, prefix-approx,
    /// prefix-precise, llm-d, cost, hybrid, oracle (default: all).
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
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG chart (hit rate and p90 TTFT by policy) to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

const ALL: &[&str] = &[
    "random",
    "round-robin",
    "session-affinity",
    "prefix-approx",
    "prefix-precise",
    "llm-d",
    "cost",
    "hybrid",
    "oracle",
];

fn build_workload(kind: &str, seed: u64) -> Result<Workload, CliError> {
    Ok(match kind {
        "seed" => workload::seed_experiment(&SeedParams { seed, ..SeedParams::default() }),
        "shared-prefix" => {
            workload::shared_prefix(&SharedPrefixParams { seed, ..SharedPrefixParams::default() })
        }
        "chat" => workload::chat(&ChatParams { seed, ..ChatParams::default() }),
        _ => match kind.strip_prefix("trace:") {
            Some(path) if !path.is_empty() => {
                let trace = read_mooncake(path)?;
                workload::from_mooncake(
                    kind,
                    &trace,
                    &TraceOptions { pad_partial_blocks: false, seed },
                )
            }
            _ => {
                return Err(CliError(format!(
                    "unknown workload {kind:?} (expected seed, shared-prefix, chat or trace:PATH)"
                )))
            }
        },
    })
}

fn run_one(args: &Opts, kind: &str, policies: &[String]) -> Result<Report, CliError> {
    let mut w = build_workload(kind, args.seed)?;
    if let Some(n) = args.requests {
        w.truncate(n);
    }
    if args.rate != 1.0 {
        w.scale_rate(args.rate);
    }
    let bs = args.block_size as usize;
    let model = args.model.clone().unwrap_or_else(|| {
        if kind == "shared-prefix" {
            "qwen3-32b".into()
        } else {
            "llama-3-8b".into()
        }
    });
    let mut engine = EngineConfig::preset(&model, &args.gpu, bs)?;
    if let Some(c) = args.capacity_blocks {
        engine.num_gpu_blocks = c;
    }
    let workers = args.workers.map_or(if kind == "seed" { 5 } else { 8 }, |n| n as usize);
    let cfg = SimConfig { workers, engine, event_delay_s: args.event_delay, seed: args.seed };
    let n = w.requests.len();
    let prepared = Prepared::new(w, bs)?;
    // Hidden at first; shown on stderr (if it is a terminal) once a run takes over a second.
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

fn check(args: &Opts) -> Result<Vec<String>, CliError> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(CliError(format!("--rate must be positive, got {}", args.rate)));
    }
    if !(args.event_delay.is_finite() && args.event_delay >= 0.0) {
        return Err(CliError("--event-delay must be >= 0".into()));
    }
    if args.requests == Some(0) {
        return Err(CliError("--requests must be at least 1".into()));
    }
    let policies: Vec<String> = match &args.policies {
        Some(p) => p.iter().map(|s| s.trim().to_string()).collect(),
        None => ALL.iter().map(|s| s.to_string()).collect(),
    };
    for p in &policies {
        if !ALL.contains(&p.as_str()) {
            return Err(CliError(format!("unknown policy {p:?} (known: {})", ALL.join(", "))));
        }
    }
    if policies.is_empty() {
        return Err(CliError("--policies is empty".into()));
    }
    Ok(policies)
}

/// Runs `kvroute simulate`.
pub fn run(args: Args) -> Result<(), CliError> {
    let args = *args.opts;
    let policies = check(&args)?;
    let kinds: Vec<String> = match &args.workload {
        Some(k) => vec![k.clone()],
        None => vec!["seed".into(), "shared-prefix".into()],
    };
    let mut reports = Vec::new();
    for kind in &kinds {
        let started = std::time::Instant::now();
        let rep = run_one(&args, kind, &policies)?;
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
        let text = if reports.len() == 1 {
            serde_json::to_string_pretty(&reports[0])
        } else {
            serde_json::to_string_pretty(&reports)
        }
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
