//! `/metrics`: the subset of vLLM 0.33's Prometheus metrics a router and a dashboard read,
//! with vLLM's names, help texts, types, labels and buckets (`vllm/v1/metrics/loggers.py`,
//! `vllm/v1/metrics/buckets.py` of the 0.33.0 sdist), rendered the way Python's
//! `prometheus_client` renders them (text format 0.0.4).
//!
//! The exposition is written here rather than with a Rust Prometheus crate because vLLM's
//! output has `prometheus_client`'s particular shape, which no Rust crate reproduces:
//! counters named `<name>_total` with a `<name>_created` gauge family after them, labels
//! sorted by name (`engine`, `le`, `model_name`), and floats in Python's `repr` (`0.0`,
//! `1.79e+09`).
//!
//! Counting follows vLLM's scheduler: `vllm:prefix_cache_queries` / `_hits` grow when a
//! request is admitted for the first time (a preempted request's re-admission is not
//! counted, `PrefixCacheStats.record`), by the prompt's token count and the cached tokens
//! found (at most `prompt - 1`, on full blocks).

use parking_lot::Mutex;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// vLLM 0.33's `TIME_TO_FIRST_TOKEN_BUCKETS`.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's `FinishReason` values as `str(reason)` gives them (the `finished_reason` label).
pub const FINISH_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The output reached `max_tokens`.
    Length,
    /// The client went away (or the engine restarted).
    Abort,
}

impl Finish {
    fn index(self) -> usize {
        match self {
            Finish::Length => 1,
            Finish::Abort => 2,
        }
    }
}

#[derive(Clone, Debug)]
struct Values {
    created: f64,
    running: f64,
    waiting: f64,
    kv_usage: f64,
    queries: f64,
    hits: f64,
    prompt_tokens: f64,
    generation_tokens: f64,
    preemptions: f64,
    success: [f64; 5],
    ttft_buckets: [u64; TTFT_BUCKETS.len()],
    ttft_count: u64,
    ttft_sum: f64,
}

impl Values {
    fn new() -> Self {
        Values {
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            running: 0.0,
            waiting: 0.0,
            kv_usage: 0.0,
            queries: 0.0,
            hits: 0.0,
            prompt_tokens: 0.0,
            generation_tokens: 0.0,
            preemptions: 0.0,
            success: [0.0; 5],
            ttft_buckets: [0; TTFT_BUCKETS.len()],
            ttft_count: 0,
            ttft_sum: 0.0,
        }
    }
}

/// The engine's metrics. Cheap to update from the engine thread; rendered on scrape.
#[derive(Debug)]
pub struct Metrics {
    model: String,
    v: Mutex<Values>,
}

impl Metrics {
    /// Zeroed metrics for the served model name (the `model_name` label).
    pub fn new(model: &str) -> Self {
        Metrics { model: model.to_string(), v: Mutex::new(Values::new()) }
    }

    /// Back to zero, as a restarted process starts.
    pub fn reset(&self) {
        *self.v.lock() = Values::new();
    }

    /// Sets the scheduler gauges (vLLM sets them from every step's `SchedulerStats`).
    pub fn set_gauges(&self, running: usize, waiting: usize, kv_usage: f64) {
        let mut v = self.v.lock();
        v.running = running as f64;
        v.waiting = waiting as f64;
        v.kv_usage = kv_usage;
    }

    /// A first admission: `prompt_tokens` queried, `hit_tokens` found cached.
    pub fn prefix_query(&self, prompt_tokens: usize, hit_tokens: usize) {
        let mut v = self.v.lock();
        v.queries += prompt_tokens as f64;
        v.hits += hit_tokens as f64;
    }

    /// A prefill finished: its prompt tokens count as processed.
    pub fn prompt_processed(&self, tokens: usize) {
        self.v.lock().prompt_tokens += tokens as f64;
    }

    /// Tokens generated in one step.
    pub fn generated(&self, tokens: usize) {
        self.v.lock().generation_tokens += tokens as f64;
    }

    /// A request was preempted.
    pub fn preempted(&self) {
        self.v.lock().preemptions += 1.0;
    }

    /// A request finished.
    pub fn finished(&self, why: Finish) {
        self.v.lock().success[why.index()] += 1.0;
    }

    /// A time to first token, seconds.
    pub fn ttft(&self, secs: f64) {
        let mut v = self.v.lock();
        for (i, &le) in TTFT_BUCKETS.iter().enumerate() {
            if secs <= le {
                v.ttft_buckets[i] += 1;
            }
        }
        v.ttft_count += 1;
        v.ttft_sum += secs;
    }

    /// `(queries, hits)` so far (for tests and logs).
    pub fn prefix_counts(&self) -> (f64, f64) {
        let v = self.v.lock();
        (v.queries, v.hits)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let v = self.v.lock().clone();
        let mut out = String::with_capacity(8 << 10);
        let labels = |extra: &[(&str, &str)]| -> String {
            let mut all: Vec<(&str, String)> =
                vec![("model_name", escape(&self.model)), ("engine", "0".to_string())];
            all.extend(extra.iter().map(|(k, v)| (*k, escape(v))));
            all.sort_by(|a, b| a.0.cmp(b.0));
            let parts: Vec<String> = all.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{{{}}}", parts.join(","))
        };
        let base = labels(&[]);
        let gauge = |out: &mut String, name: &str, help: &str, val: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{base} {}",
                py(val)
            );
        };
        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            v.running,
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            v.waiting,
        );
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            v.kv_usage,
        );
        let counter = |out: &mut String, name: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name}_total {help}\n# TYPE {name}_total counter");
            for (l, val) in samples {
                let _ = writeln!(out, "{name}_total{l} {}", py(*val));
            }
            let _ = writeln!(out, "# HELP {name}_created {help}\n# TYPE {name}_created gauge");
            for (l, _) in samples {
                let _ = writeln!(out, "{name}_created{l} {}", py(v.created));
            }
        };
        counter(
            &mut out,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            &[(base.clone(), v.queries)],
        );
        counter(
            &mut out,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            &[(base.clone(), v.hits)],
        );
        counter(
            &mut out,
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            &[(base.clone(), v.preemptions)],
        );
        counter(
            &mut out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            &[(base.clone(), v.prompt_tokens)],
        );
        counter(
            &mut out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            &[(base.clone(), v.generation_tokens)],
        );
        let success: Vec<(String, f64)> = FINISH_REASONS
            .iter()
            .zip(v.success)
            .map(|(r, n)| (labels(&[("finished_reason", r)]), n))
            .collect();
        counter(
            &mut out,
            "vllm:request_success",
            "Count of successfully processed requests.",
            &success,
        );
        let name = "vllm:time_to_first_token_seconds";
        let help = "Histogram of time to first token in seconds.";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, n) in TTFT_BUCKETS.iter().zip(v.ttft_buckets) {
            let _ = writeln!(out, "{name}_bucket{} {}", labels(&[("le", &py(*le))]), py(n as f64));
        }
        let _ =
            writeln!(out, "{name}_bucket{} {}", labels(&[("le", "+Inf")]), py(v.ttft_count as f64));
        let _ = writeln!(out, "{name}_count{base} {}", py(v.ttft_count as f64));
        let _ = writeln!(out, "{name}_sum{base} {}", py(v.ttft_sum));
        let _ = writeln!(out, "# HELP {name}_created {help}\n# TYPE {name}_created gauge");
        let _ = writeln!(out, "{name}_created{base} {}", py(v.created));
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', r"\\").replace('\n', r"\n").replace('"', "\\\"")
}

/// A float as `prometheus_client.utils.floatToGoString` writes it: Python's `repr`, with
/// Go's earlier switch to an exponent for large positive values.
pub fn py(d: f64) -> String {
    if d.is_nan() {
        return "NaN".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    // Python's repr: the shortest round-trip digits, an exponent below 1e-4 and from 1e16.
    let a = d.abs();
    let s = if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let e = format!("{d:e}"); // "1.5e-5"
        let (m, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else if d.fract() == 0.0 {
        format!("{d:.1}")
    } else {
        format!("{d}")
    };
    let dot = s.find('.');
    match dot {
        Some(dot) if d > 0.0 && dot > 6 && !s.contains('e') => {
            let mantissa = format!("{}.{}", &s[..1], &s[1..dot]) + &s[dot + 1..];
            let mantissa = mantissa.trim_end_matches(['0', '.']);
            format!("{mantissa}e+0{}", dot - 1)
        }
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::py;

    #[test]
    fn floats_are_written_as_prometheus_client_writes_them() {
        // Values checked against prometheus_client 0.26's floatToGoString.
        assert_eq!(py(0.0), "0.0");
        assert_eq!(py(5.0), "5.0");
        assert_eq!(py(0.25), "0.25");
        assert_eq!(py(0.001), "0.001");
        assert_eq!(py(2560.0), "2560.0");
        assert_eq!(py(1796055274.98601), "1.79605527498601e+09");
        assert_eq!(py(123456789.0), "1.23456789e+08");
        assert_eq!(py(f64::INFINITY), "+Inf");
        assert_eq!(py(1.5e-5), "1.5e-05");
    }
}
