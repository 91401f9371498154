//! Counters and gauges a host can export, and their Prometheus text rendering.

use super::{PredictionCounters, Router};
use crate::index::IndexStats;
use crate::types::WorkerKey;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Router-wide counters (atomics, updated on the request and event paths).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) routes: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) predicted_hit_tokens: AtomicU64,
    pub(crate) event_batches: AtomicU64,
    pub(crate) event_errors: AtomicU64,
    pub(crate) hash_mismatches: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) prediction_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn record_route(&self, prompt_tokens: u32, hit_tokens: u64) {
        self.routes.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        self.predicted_hit_tokens.fetch_add(hit_tokens, Ordering::Relaxed);
    }
}

/// Per-worker event counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventCounters {
    /// Batches applied.
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// Blocks stored.
    pub blocks_stored: u64,
    /// Blocks removed.
    pub blocks_removed: u64,
    /// Removals of blocks the worker did not hold.
    pub unknown_removals: u64,
    /// Stored runs with an unknown parent.
    pub orphans: u64,
    /// Placeholder events skipped.
    pub placeholders_skipped: u64,
    /// Engine hashes that disagreed with the router's.
    pub hash_mismatches: u64,
    /// Unknown msgpack fields the decoder skipped.
    pub skipped_fields: u64,
    /// Unknown event types the decoder skipped.
    pub skipped_events: u64,
    /// Batches rejected (bad block size, malformed, hash mismatch, worker removed).
    pub errors: u64,
    /// Blocks of validated events that the index refused to store (0 unless something
    /// is wrong; counted rather than dropped silently).
    #[serde(default)]
    pub store_errors: u64,
    /// The `ts` of the last batch applied (seconds since the epoch; 0 = none yet).
    pub last_event_ts: f64,
}

/// One worker's metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    /// The worker.
    pub worker: WorkerKey,
    /// Requests routed to it.
    pub decisions: u64,
    /// Prompt tokens predicted to hit its cache when routed.
    pub predicted_hit_tokens: u64,
    /// (block, worker) pairs it holds in the index.
    pub index_blocks: u64,
    /// Requests reported routed and not finished.
    pub running: u32,
    /// Prompt tokens routed whose prefill has not finished.
    pub inflight_prefill_tokens: u64,
    /// Prompt tokens queued or in prefill, never stale (see [`crate::score::Load`]).
    pub pending_prefill_tokens: u64,
    /// Requests waiting or running, never stale (see [`crate::score::Load`]).
    pub active_requests: u32,
    /// Its learned prefill rate, tokens per second (the configured default until its
    /// first requests' first tokens).
    pub prefill_tokens_per_s: f64,
    /// Observations behind that rate (requests whose first token was reported).
    pub prefill_rate_samples: u64,
    /// The TTL of its predictions, seconds (adapted to its routing-to-event delay).
    pub prediction_ttl_s: f64,
    /// Whether it is healthy (and not draining).
    pub healthy: bool,
    /// Whether it is draining.
    pub draining: bool,
    /// Whether any KV event arrived from it since it was added. A worker in precise mode
    /// with `false` here after a while is misconfigured (no publisher, wrong endpoint).
    pub has_events: bool,
    /// Its event counters.
    pub events: EventCounters,
    /// Routed requests its cache model had no room for, so no blocks were predicted
    /// (approximate and hybrid modes).
    #[serde(default)]
    pub predictions_skipped: u64,
    /// The last sequence number applied from its event stream, if a transport recorded
    /// one ([`Router::set_stream_position`] under the worker's name).
    pub last_seq: Option<u64>,
}

/// A snapshot of all metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterMetrics {
    /// Requests routed.
    pub routes: u64,
    /// Prompt tokens routed.
    pub prompt_tokens: u64,
    /// Prompt tokens predicted to hit the chosen worker's cache.
    pub predicted_hit_tokens: u64,
    /// Event batches applied.
    pub event_batches: u64,
    /// Event batches rejected.
    pub event_errors: u64,
    /// Engine hashes that disagreed with the router's computation.
    pub hash_mismatches: u64,
    /// Blocks of validated events that the index refused to store (all workers).
    #[serde(default)]
    pub store_errors: u64,
    /// Cache-model predictions the model or the index refused (approximate and hybrid
    /// modes).
    #[serde(default)]
    pub prediction_errors: u64,
    /// Requests in flight.
    pub inflight_requests: u64,
    /// The tail of the recently observed times to first token that the `kvroute`
    /// profile's history rules protect (its `tail_quantile`, p99 by default, of the last
    /// 1,024 routing-to-first-token times), seconds; 0 until 64 have been observed.
    #[serde(default)]
    pub tail_ttft_s: f64,
    /// Predicted residency (precise mode): predictions made, confirmed, expired, dropped.
    pub predictions: PredictionCounters,
    /// Predictions held now.
    pub predictions_held: u64,
    /// Index statistics.
    pub index: IndexStats,
    /// Per worker.
    pub workers: Vec<WorkerMetrics>,
}

impl Router {
    /// A snapshot of every counter and gauge.
    pub fn metrics(&self) -> RouterMetrics {
        let index = self.index.read();
        let stats = index.stats();
        let reg = self.registry.read();
        let streams = self.streams.lock().clone();
        let mean = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
        let pool_rate = f64::from_bits(self.pool_rate_bits.load(Ordering::Relaxed));
        let workers = reg
            .slots
            .iter()
            .flatten()
            .map(|w| {
                // No clock here: the in-flight prefill without progress.
                let load = w.load(None, mean, pool_rate, 0);
                WorkerMetrics {
                    worker: w.key.clone(),
                    decisions: w.decisions.load(Ordering::Relaxed),
                    predicted_hit_tokens: w.hit_tokens.load(Ordering::Relaxed),
                    index_blocks: index.worker_blocks(w.id),
                    running: load.running,
                    inflight_prefill_tokens: load.inflight_prefill_tokens,
                    pending_prefill_tokens: load.pending_prefill_tokens,
                    active_requests: load.active_requests,
                    prefill_tokens_per_s: w.learned_rate(pool_rate),
                    prefill_rate_samples: w.learn.lock().rate_samples,
                    prediction_ttl_s: w.pred_ttl_ms.load(Ordering::Relaxed) as f64 / 1e3,
                    healthy: w.healthy.load(Ordering::Relaxed)
                        && !w.draining.load(Ordering::Relaxed),
                    draining: w.draining.load(Ordering::Relaxed),
                    has_events: w.has_events.load(Ordering::Relaxed),
                    events: w.counters.lock().clone(),
                    predictions_skipped: w
                        .model
                        .lock()
                        .as_ref()
                        .map_or(0, |m| m.predictions_skipped),
                    last_seq: streams.get(&w.key.name).copied(),
                }
            })
            .collect();
        drop(reg);
        drop(index);
        let overlay = {
            let o = self.overlay.read();
            (o.counters, o.len() as u64)
        };
        let c = &self.metrics;
        RouterMetrics {
            routes: c.routes.load(Ordering::Relaxed),
            prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
            predicted_hit_tokens: c.predicted_hit_tokens.load(Ordering::Relaxed),
            event_batches: c.event_batches.load(Ordering::Relaxed),
            event_errors: c.event_errors.load(Ordering::Relaxed),
            hash_mismatches: c.hash_mismatches.load(Ordering::Relaxed),
            store_errors: c.store_errors.load(Ordering::Relaxed),
            prediction_errors: c.prediction_errors.load(Ordering::Relaxed),
            inflight_requests: self.inflight_requests() as u64,
            tail_ttft_s: self.tail.value_s(),
            predictions: overlay.0,
            predictions_held: overlay.1,
            index: stats,
            workers,
        }
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let m = self.metrics();
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP kvroute_{name} {help}");
            let _ = writeln!(out, "# TYPE kvroute_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "kvroute_{name}{labels} {v}");
            }
        };
        let one = |v: u64| vec![(String::new(), v as f64)];
        family("routes_total", "counter", "Requests routed.", &one(m.routes));
        family("prompt_tokens_total", "counter", "Prompt tokens routed.", &one(m.prompt_tokens));
        family(
            "predicted_hit_tokens_total",
            "counter",
            "Prompt tokens predicted to hit the chosen worker's KV cache.",
            &one(m.predicted_hit_tokens),
        );
        family(
            "event_batches_total",
            "counter",
            "KV event batches applied.",
            &one(m.event_batches),
        );
        family("event_errors_total", "counter", "KV event batches rejected.", &one(m.event_errors));
        family(
            "hash_mismatches_total",
            "counter",
            "Engine block hashes that disagree with the router's own.",
            &one(m.hash_mismatches),
        );
        family(
            "store_errors_total",
            "counter",
            "Blocks of validated KV events the index refused to store.",
            &one(m.store_errors),
        );
        family(
            "prediction_errors_total",
            "counter",
            "Cache-model predictions refused by the model or the index.",
            &one(m.prediction_errors),
        );
        family(
            "inflight_requests",
            "gauge",
            "Requests routed and not finished.",
            &one(m.inflight_requests),
        );
        family(
            "ttft_tail_seconds",
            "gauge",
            "Tail (tail_quantile, p99 by default) of the last 1,024 observed times to first token.",
            &[(String::new(), m.tail_ttft_s)],
        );
        family(
            "index_blocks",
            "gauge",
            "Distinct blocks in the prefix index.",
            &one(m.index.blocks),
        );
        family(
            "index_holder_blocks",
            "gauge",
            "(block, worker) pairs in the prefix index.",
            &one(m.index.holder_blocks),
        );
        family(
            "index_heap_bytes",
            "gauge",
            "Heap bytes held by the prefix index.",
            &one(m.index.heap_bytes),
        );
        family(
            "index_evictions_total",
            "counter",
            "(block, worker) pairs evicted by the index cap.",
            &one(m.index.evictions),
        );
        for (name, help, v) in [
            (
                "predictions_made_total",
                "Blocks predicted on a worker at routing.",
                m.predictions.made,
            ),
            (
                "predictions_confirmed_total",
                "Predictions ended by the worker's covering KV event.",
                m.predictions.confirmed,
            ),
            ("predictions_expired_total", "Predictions ended by their TTL.", m.predictions.expired),
            (
                "predictions_dropped_total",
                "Predictions dropped to stay under the capacity.",
                m.predictions.dropped,
            ),
        ] {
            family(name, "counter", help, &one(v));
        }
        family("predictions", "gauge", "Predictions held.", &one(m.predictions_held));
        let per = |f: &dyn Fn(&WorkerMetrics) -> f64| -> Vec<(String, f64)> {
            m.workers
                .iter()
                .map(|w| {
                    (
                        format!(
                            "{{worker=\"{}\",dp_rank=\"{}\"}}",
                            escape(&w.worker.name),
                            w.worker.dp_rank
                        ),
                        f(w),
                    )
                })
                .collect()
        };
        family(
            "worker_decisions_total",
            "counter",
            "Requests routed to the worker.",
            &per(&|w| w.decisions as f64),
        );
        family(
            "worker_predicted_hit_tokens_total",
            "counter",
            "Prompt tokens predicted to hit the worker's cache.",
            &per(&|w| w.predicted_hit_tokens as f64),
        );
        family(
            "worker_index_blocks",
            "gauge",
            "Blocks the index holds for the worker.",
            &per(&|w| w.index_blocks as f64),
        );
        family(
            "worker_running",
            "gauge",
            "Requests running on the worker (tracked or reported).",
            &per(&|w| f64::from(w.running)),
        );
        family(
            "worker_prefill_tokens_per_second",
            "gauge",
            "The worker's prefill rate learned from routing to first token.",
            &per(&|w| w.prefill_tokens_per_s),
        );
        family(
            "worker_prediction_ttl_seconds",
            "gauge",
            "TTL of the worker's predicted blocks, adapted to its routing-to-event delay.",
            &per(&|w| w.prediction_ttl_s),
        );
        family(
            "worker_pending_prefill_tokens",
            "gauge",
            "Prompt tokens queued or in prefill on the worker (never stale).",
            &per(&|w| w.pending_prefill_tokens as f64),
        );
        family(
            "worker_healthy",
            "gauge",
            "1 if the worker may receive requests.",
            &per(&|w| f64::from(u8::from(w.healthy))),
        );
        family(
            "worker_event_batches_total",
            "counter",
            "KV event batches applied for the worker.",
            &per(&|w| w.events.batches as f64),
        );
        family(
            "worker_event_errors_total",
            "counter",
            "KV event batches rejected for the worker.",
            &per(&|w| w.events.errors as f64),
        );
        family(
            "worker_predictions_skipped_total",
            "counter",
            "Routed requests the worker's cache model had no room for.",
            &per(&|w| w.predictions_skipped as f64),
        );
        out
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
