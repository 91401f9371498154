//! The server's own Prometheus metrics, appended to the router's at `/metrics`.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds of the latency histograms, seconds.
const BOUNDS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BOUNDS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BOUNDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let wrap = |l: &str| if l.is_empty() { String::new() } else { format!("{{{l}}}") };
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{} {sum}", wrap(labels));
        let _ = writeln!(out, "{name}_count{} {n}", wrap(labels));
    }
}

/// Counters and histograms of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses by (endpoint, status).
    pub requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Request latency as the client sees it until the response head, by endpoint.
    pub latency: Mutex<BTreeMap<&'static str, std::sync::Arc<Histogram>>>,
    /// Router overhead per proxied request: from the handler's start (reading the body
    /// included) to the upstream request built and handed to the HTTP client,
    /// tokenization excluded.
    pub overhead: Histogram,
    /// Tokenization and template rendering per request.
    pub tokenize: Histogram,
    /// Upstream errors by (backend, kind).
    pub upstream_errors: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Requests retried on another worker.
    pub retries: AtomicU64,
    /// Requests routed without token ids (content the tokenizer cannot handle, or text
    /// without a tokenizer outside precise mode).
    pub untokenized: AtomicU64,
    /// Client disconnects before the response ended.
    pub client_disconnects: AtomicU64,
    /// Recent overhead samples in nanoseconds (a ring of the last 65,536), for benches.
    pub overhead_samples: Mutex<Vec<u64>>,
    /// The part of each overhead sample (same index) spent reading the request body,
    /// nanoseconds, for benches.
    pub body_read_samples: Mutex<Vec<u64>>,
    overhead_next: AtomicU64,
}

/// Samples kept for [`Metrics::overhead_samples`].
const RING: usize = 65_536;

impl Metrics {
    /// Counts a response.
    pub fn count(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().entry((endpoint, status)).or_insert(0) += 1;
    }

    /// Records a latency.
    pub fn latency(&self, endpoint: &'static str, d: Duration) {
        let h = self.latency.lock().entry(endpoint).or_default().clone();
        h.observe(d);
    }

    /// Records one router overhead, of which `body_read` was spent reading the body.
    pub fn overhead(&self, d: Duration, body_read: Duration) {
        self.overhead.observe(d);
        let i = self.overhead_next.fetch_add(1, Ordering::Relaxed) as usize;
        for (ring, d) in [(&self.overhead_samples, d), (&self.body_read_samples, body_read)] {
            let mut s = ring.lock();
            let ns = d.as_nanos() as u64;
            if s.len() < RING {
                s.push(ns);
            } else {
                s[i % RING] = ns;
            }
        }
    }

    /// Counts an upstream error.
    pub fn upstream_error(&self, backend: &str, kind: &'static str) {
        *self.upstream_errors.lock().entry((backend.to_string(), kind)).or_insert(0) += 1;
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ =
            writeln!(out, "# HELP kvroute_serve_requests_total Responses by endpoint and status.");
        let _ = writeln!(out, "# TYPE kvroute_serve_requests_total counter");
        for ((ep, st), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "kvroute_serve_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kvroute_serve_request_duration_seconds Time to the response head, by endpoint."
        );
        let _ = writeln!(out, "# TYPE kvroute_serve_request_duration_seconds histogram");
        for (ep, h) in self.latency.lock().iter() {
            h.write(out, "kvroute_serve_request_duration_seconds", &format!("endpoint=\"{ep}\""));
        }
        let _ = writeln!(out, "# HELP kvroute_serve_overhead_seconds Router overhead per proxied request (handler start, body read included, to the upstream request handed to the HTTP client; tokenization excluded).");
        let _ = writeln!(out, "# TYPE kvroute_serve_overhead_seconds histogram");
        self.overhead.write(out, "kvroute_serve_overhead_seconds", "");
        let _ = writeln!(out, "# HELP kvroute_serve_tokenize_seconds Tokenization and chat template rendering per request.");
        let _ = writeln!(out, "# TYPE kvroute_serve_tokenize_seconds histogram");
        self.tokenize.write(out, "kvroute_serve_tokenize_seconds", "");
        let _ = writeln!(out, "# HELP kvroute_serve_upstream_errors_total Upstream failures by backend and kind (connect, timeout, status_5xx, body).");
        let _ = writeln!(out, "# TYPE kvroute_serve_upstream_errors_total counter");
        for ((b, k), n) in self.upstream_errors.lock().iter() {
            let _ = writeln!(
                out,
                "kvroute_serve_upstream_errors_total{{backend=\"{b}\",kind=\"{k}\"}} {n}"
            );
        }
        for (name, help, v) in [
            ("retries_total", "Requests retried on the next best worker.", &self.retries),
            ("untokenized_total", "Requests routed without token ids.", &self.untokenized),
            (
                "client_disconnects_total",
                "Clients gone before their response ended.",
                &self.client_disconnects,
            ),
        ] {
            let _ = writeln!(out, "# HELP kvroute_serve_{name} {help}");
            let _ = writeln!(out, "# TYPE kvroute_serve_{name} counter");
            let _ = writeln!(out, "kvroute_serve_{name} {}", v.load(Ordering::Relaxed));
        }
    }
}
