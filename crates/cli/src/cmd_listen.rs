//! `kvroute listen`: subscribe to vLLM KV-event publishers and apply their events to a
//! router's index, showing live counters and writing per-worker statistics at the end.

use crate::CliError;
use kvroute::hash::HashAlgo;
use kvroute::router::{Router, RouterConfig};
use kvroute_zmq::{PublisherConfig, PublisherStats, RouterSink, SinkStats, SubscriberConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `kvroute listen`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A publisher's PUB endpoint (vLLM's `endpoint`); repeat for several publishers.
    #[arg(long = "endpoint", value_name = "tcp://HOST:PORT", required = true)]
    endpoints: Vec<String>,
    /// A publisher's ROUTER replay endpoint (vLLM's `replay_endpoint`), in --endpoint
    /// order: none, or one per --endpoint.
    #[arg(long = "replay-endpoint", value_name = "tcp://HOST:PORT")]
    replay_endpoints: Vec<String>,
    /// The topic to subscribe to (a prefix; "", the default, receives every topic: vLLM's
    /// default topic is "", llm-d's is kv@<pod-ip>:<port>@<model>).
    #[arg(long, default_value = kvroute_zmq::DEFAULT_TOPIC)]
    topic: String,
    /// Warn when a publisher has been connected this long without sending a batch.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    idle_warning: f64,
    /// Worker names, in --endpoint order: none (each worker is named HOST:PORT) or one
    /// per --endpoint.
    #[arg(long = "worker", value_name = "NAME")]
    workers: Vec<String>,
    /// Hash scheme: xxh3 (native: blocks are re-keyed from the events' tokens, works with
    /// any engine setting) or the engines' own (sha256, sha256_cbor, xxhash, xxhash_cbor),
    /// whose hashes are then checked and used directly.
    #[arg(long, default_value = "xxh3")]
    hash_algo: HashAlgo,
    /// The engines' PYTHONHASHSEED (vLLM schemes).
    #[arg(long, value_name = "S")]
    hash_seed: Option<String>,
    /// Tokens per block (vLLM's --block-size).
    #[arg(long, default_value_t = 16, value_name = "N")]
    block_size: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Write per-worker statistics as JSON to FILE at the end.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
}

/// One worker's statistics at the end of the run: the subscriber's [`PublisherStats`]
/// (its serialization, field for field) and what the router made of the batches.
#[derive(Serialize, Debug)]
struct WorkerReport {
    #[serde(flatten)]
    publisher: PublisherStats,
    /// (block, worker) pairs the index holds for the worker (all data-parallel ranks).
    blocks_held: u64,
    /// Batches the router applied (`batches` counts those received, applied or rejected).
    batches_applied: u64,
    /// Events in the applied batches.
    events: u64,
    blocks_stored: u64,
    blocks_removed: u64,
    blocks_dropped: u64,
    last_reset: Option<String>,
}

/// The statistics file.
#[derive(Serialize, Debug)]
struct Report {
    elapsed_s: f64,
    interrupted: bool,
    hash_algo: String,
    block_size: usize,
    index: kvroute::index::IndexStats,
    workers: Vec<WorkerReport>,
}

fn build_config(args: &Args) -> Result<SubscriberConfig, CliError> {
    let n = args.endpoints.len();
    if !args.replay_endpoints.is_empty() && args.replay_endpoints.len() != n {
        return Err(CliError(format!(
            "give one --replay-endpoint per --endpoint ({} for {n}) or none",
            args.replay_endpoints.len()
        )));
    }
    if !args.workers.is_empty() && args.workers.len() != n {
        return Err(CliError(format!(
            "give one --worker per --endpoint ({} for {n}) or none",
            args.workers.len()
        )));
    }
    let publishers = args
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            let mut p = PublisherConfig::new(ep.clone());
            p.topic = args.topic.clone();
            p.replay_endpoint = args.replay_endpoints.get(i).cloned();
            if let Some(w) = args.workers.get(i) {
                p.worker = w.clone();
            }
            p
        })
        .collect();
    let idle_warning = match args.idle_warning {
        d if d.is_finite() && d > 0.0 && d < 1e9 => Duration::from_secs_f64(d),
        d => return Err(CliError(format!("--idle-warning must be a positive number, got {d}"))),
    };
    Ok(SubscriberConfig { publishers, idle_warning, ..SubscriberConfig::default() })
}

/// Blocks held in the index, by worker name (all data-parallel ranks).
fn blocks_by_worker(router: &Router) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for w in router.metrics().workers {
        *out.entry(w.worker.name).or_insert(0) += w.index_blocks;
    }
    out
}

fn status_line(router: &Router, stats: &[PublisherStats], elapsed: Duration) -> String {
    let sum = |f: fn(&PublisherStats) -> u64| stats.iter().map(f).sum::<u64>();
    let connected = stats.iter().filter(|s| s.connected).count();
    format!(
        "kvroute listen {:>5.1}s: {} batches, {} blocks held, {} gaps, {} replays, {} errors, \
         {} resets ({connected}/{} connected)",
        elapsed.as_secs_f64(),
        sum(|s| s.batches),
        router.index_stats().holder_blocks,
        sum(|s| s.gaps),
        sum(|s| s.replays_ok + s.replays_failed),
        sum(|s| s.sink_errors),
        sum(|s| s.resets),
        stats.len()
    )
}

fn worker_report(
    st: PublisherStats,
    sink: &BTreeMap<String, SinkStats>,
    blocks: &BTreeMap<String, u64>,
) -> WorkerReport {
    let empty = SinkStats::default();
    let s = sink.get(&st.worker).unwrap_or(&empty);
    WorkerReport {
        blocks_held: blocks.get(&st.worker).copied().unwrap_or(0),
        batches_applied: s.batches,
        events: s.events,
        blocks_stored: s.blocks_stored,
        blocks_removed: s.blocks_removed,
        blocks_dropped: s.blocks_dropped,
        last_reset: s.last_reset.clone(),
        publisher: st,
    }
}

/// The warning for a publisher that is connected but has sent nothing for a while.
fn idle_warning(st: &PublisherStats, topic: &str, after: Duration) -> String {
    format!(
        "kvroute listen: warning: {} ({}) has been connected for {:.0}s without sending a \
         batch on topic {topic:?}; check --topic (\"\" receives every topic; llm-d publishes \
         on kv@<pod-ip>:<port>@<model>) and that the engine publishes KV events \
         (vLLM --kv-events-config)",
        st.worker,
        st.endpoint,
        after.as_secs_f64()
    )
}

/// Runs `kvroute listen`.
pub fn run(args: Args) -> Result<(), CliError> {
    let duration = match args.duration {
        None => None,
        Some(d) if d.is_finite() && d > 0.0 && d < 1e9 => Some(Duration::from_secs_f64(d)),
        Some(d) => return Err(CliError(format!("--duration must be a positive number, got {d}"))),
    };
    let sub_cfg = build_config(&args)?;
    let idle_after = sub_cfg.idle_warning;
    let router_cfg = RouterConfig::builder()
        .block_size(args.block_size)
        .hash_algo(args.hash_algo)
        .hash_seed(args.hash_seed.clone())
        .auto_add_workers(true)
        .build()?;
    let router = Arc::new(Router::new(router_cfg)?);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .map_err(|e| CliError(format!("cannot install the Ctrl-C handler: {e}")))?;
    }
    let sink = Arc::new(RouterSink::new(Arc::clone(&router)));
    let sub = kvroute_zmq::Subscriber::start(sub_cfg, sink.clone())?;

    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let refresh = if tty { Duration::from_millis(200) } else { Duration::from_secs(1) };
    let mut next_status = start + refresh;
    let mut stderr = std::io::stderr();
    // Publishers warned about as idle; cleared when they send again, to warn once per
    // silent spell.
    let mut warned = vec![false; args.endpoints.len()];
    let interrupted = loop {
        if stop.load(Ordering::SeqCst) {
            break true;
        }
        let now = Instant::now();
        if duration.is_some_and(|d| now.duration_since(start) >= d) {
            break false;
        }
        if now >= next_status {
            let stats = sub.stats();
            for (st, warned) in stats.iter().zip(warned.iter_mut()) {
                if st.idle && !*warned {
                    let w = idle_warning(st, &args.topic, idle_after);
                    let _ =
                        if tty { writeln!(stderr, "\r{w}\x1b[K") } else { writeln!(stderr, "{w}") };
                }
                *warned = st.idle;
            }
            let line = status_line(&router, &stats, now.duration_since(start));
            // A broken stderr must not stop the run; the statistics still get written.
            let _ = if tty { write!(stderr, "\r{line}\x1b[K") } else { writeln!(stderr, "{line}") };
            let _ = stderr.flush();
            next_status += refresh;
        }
        let mut wait = next_status.saturating_duration_since(now).min(Duration::from_millis(50));
        if let Some(d) = duration {
            wait = wait.min((start + d).saturating_duration_since(now));
        }
        std::thread::sleep(wait.max(Duration::from_millis(1)));
    };
    let elapsed = start.elapsed();
    let stats = sub.stats();
    sub.shutdown();
    let final_line = status_line(&router, &stats, elapsed);
    let _ = if tty {
        writeln!(stderr, "\r{final_line}\x1b[K")
    } else {
        writeln!(stderr, "{final_line}")
    };

    let sink_stats = sink.stats();
    let blocks = blocks_by_worker(&router);
    let report = Report {
        elapsed_s: elapsed.as_secs_f64(),
        interrupted,
        hash_algo: args.hash_algo.name().to_string(),
        block_size: args.block_size,
        index: router.index_stats(),
        workers: stats.into_iter().map(|st| worker_report(st, &sink_stats, &blocks)).collect(),
    };
    for w in &report.workers {
        let p = &w.publisher;
        let last = p.last_error.as_deref().map(|e| format!(" (last: {e})")).unwrap_or_default();
        crate::emit(format!(
            "{}: {} blocks held, {} batches, {} events, {} gaps, {} replays, {} resets, \
             {} errors{last}",
            p.worker,
            w.blocks_held,
            p.batches,
            w.events,
            p.gaps,
            p.replays_ok + p.replays_failed,
            p.resets,
            p.sink_errors
        ))?;
    }
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n")
            .map_err(|e| CliError(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}
