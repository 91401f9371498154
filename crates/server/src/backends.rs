//! The backends: registration with the router, `/health` probes, `/metrics` scrapes, one
//! KV-event subscriber each, and DNS discovery.

use crate::State;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kvroute::router::LoadReport;
use kvroute_zmq::{PublisherConfig, Subscriber, SubscriberConfig};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// One vLLM replica.
pub struct Backend {
    /// Worker name: `host:port`.
    pub name: String,
    /// Base URL, `http://host:port`.
    pub base: String,
    /// Answered its last `/health` probe (and no request failure since).
    pub healthy: AtomicBool,
    /// Probed at least once.
    pub probed: AtomicBool,
    /// The last `/metrics` scrape failed: the load figures the router has are old.
    pub load_stale: AtomicBool,
    /// Failed scrapes.
    pub scrape_failures: AtomicU64,
    /// The KV-event subscriber.
    sub: Mutex<Option<Subscriber>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Backend {
    /// Stops the probe and scrape tasks and the subscriber (blocking: run off the runtime).
    fn stop(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        if let Some(sub) = self.sub.lock().take() {
            sub.shutdown();
        }
    }

    /// The subscriber's counters, if it has one.
    pub fn event_stats(&self) -> Option<kvroute_zmq::PublisherStats> {
        self.sub.lock().as_ref().and_then(|s| s.stats().into_iter().next())
    }
}

/// Registers a backend: router worker, tasks, subscriber.
pub fn add_backend(
    state: &Arc<State>,
    base: &str,
    kv_events: Option<String>,
    replay: Option<String>,
) -> Result<Arc<Backend>, String> {
    let name = crate::config::worker_name(base)?;
    let base = base.trim_end_matches('/').to_string();
    match state.router.add_worker(&name, 0) {
        Ok(_) | Err(kvroute::Error::WorkerExists(_)) => {}
        Err(e) => return Err(format!("backend {name}: {e}")),
    }
    let b = Arc::new(Backend {
        name: name.clone(),
        base,
        healthy: AtomicBool::new(true),
        probed: AtomicBool::new(false),
        load_stale: AtomicBool::new(true),
        scrape_failures: AtomicU64::new(0),
        sub: Mutex::new(None),
        tasks: Mutex::new(Vec::new()),
    });
    if let Some(ep) = kv_events {
        let mut p = PublisherConfig::new(ep).with_worker(name.clone());
        if let Some(t) = &state.cfg.topic {
            p.topic = t.clone();
        }
        p.replay_endpoint = replay;
        let cfg = SubscriberConfig { publishers: vec![p], ..SubscriberConfig::default() };
        let sub = Subscriber::start(cfg, state.sink.clone())
            .map_err(|e| format!("backend {name}: KV events: {e}"))?;
        *b.sub.lock() = Some(sub);
    }
    {
        let mut tasks = b.tasks.lock();
        tasks.push(tokio::spawn(probe_loop(state.clone(), b.clone())));
        if state.cfg.scrape_interval_ms > 0 {
            tasks.push(tokio::spawn(scrape_loop(state.clone(), b.clone())));
        }
    }
    state.backends.write().insert(name, b.clone());
    Ok(b)
}

/// Removes a backend (DNS record gone): the router forgets the worker and its blocks.
pub async fn remove_backend(state: &Arc<State>, name: &str) {
    let b = state.backends.write().remove(name);
    if let Some(b) = b {
        let _ = state.router.remove_worker(name, 0);
        let _ = tokio::task::spawn_blocking(move || b.stop()).await;
    }
}

/// Stops every backend's tasks and subscribers.
pub async fn stop_all(state: &Arc<State>) {
    let all: Vec<Arc<Backend>> = state.backends.read().values().cloned().collect();
    let _ = tokio::task::spawn_blocking(move || all.iter().for_each(|b| b.stop())).await;
}

async fn get(state: &State, url: &str, timeout: Duration) -> Result<(u16, Bytes), String> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = state.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| "timed out".to_string())?
}

/// Marks a backend healthy or not, in the router too.
pub fn set_health(state: &State, b: &Backend, healthy: bool) {
    let was = b.healthy.swap(healthy, Ordering::Relaxed);
    if was != healthy {
        tracing::info!(backend = %b.name, healthy, "backend health changed");
    }
    let _ = state.router.set_healthy(&b.name, 0, healthy);
}

async fn probe_loop(state: Arc<State>, b: Arc<Backend>) {
    let every = Duration::from_millis(state.cfg.health_interval_ms.max(10));
    let timeout = every.max(Duration::from_millis(state.cfg.connect_timeout_ms + 1000));
    loop {
        let ok = matches!(get(&state, &format!("{}/health", b.base), timeout).await, Ok((200, _)));
        set_health(&state, &b, ok);
        b.probed.store(true, Ordering::Relaxed);
        tokio::time::sleep(every).await;
    }
}

/// Milliseconds since the Unix epoch: the clock the router uses for a route without an
/// explicit `now_ms`.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn scrape_loop(state: Arc<State>, b: Arc<Backend>) {
    let every = Duration::from_millis(state.cfg.scrape_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let timeout =
        Duration::from_millis(state.cfg.connect_timeout_ms.max(every.as_millis() as u64 * 4));
    loop {
        tick.tick().await;
        let report = match get(&state, &format!("{}/metrics", b.base), timeout).await {
            Ok((200, body)) => parse_load(&String::from_utf8_lossy(&body)),
            Ok((status, _)) => Err(format!("status {status}")),
            Err(e) => Err(e),
        };
        // With the scrape's time (the routes' clock: the router's wall clock, as the
        // proxy routes without an explicit `now_ms`), the other router replicas' requests
        // that arrived since the previous scrape are worked off from when the engine
        // reported them, not from this replica's next route (the `kvroute` preset's rule
        // 12, docs/simulation.md).
        let at = wall_ms();
        match report.and_then(|r| {
            state.router.report_load_at(&b.name, 0, &r, at).map_err(|e| e.to_string())
        }) {
            Ok(()) => b.load_stale.store(false, Ordering::Relaxed),
            Err(e) => {
                // Stale, not zero: the router keeps the last figures; the gauge says so.
                if !b.load_stale.swap(true, Ordering::Relaxed) {
                    tracing::warn!(backend = %b.name, error = %e, "metrics scrape failed; load is stale");
                }
                b.scrape_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// vLLM's load figures from its `/metrics` text: `vllm:num_requests_waiting` and
/// `vllm:num_requests_running` summed over engines, `vllm:kv_cache_usage_perc` averaged
/// (0..1). A scrape without any of them is an error.
pub fn parse_load(text: &str) -> Result<LoadReport, String> {
    const NAMES: [&str; 4] = [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ];
    // A line the parser rejects elsewhere in the scrape must not hide the figures: on a
    // parse error, parse again only the lines of the three families.
    let (metrics, err) = match prom_text_format_parser::Scrape::parse(text) {
        Ok(s) => (s.metrics, None),
        Err(e) => {
            let keep: String = text
                .lines()
                .filter(|l| {
                    let l = l.trim_start_matches("# HELP ").trim_start_matches("# TYPE ");
                    NAMES.iter().any(|n| l.starts_with(n) && l[n.len()..].starts_with([' ', '{']))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            match prom_text_format_parser::Scrape::parse(&keep) {
                Ok(s) => (s.metrics, Some(e)),
                Err(_) => (Vec::new(), Some(e)),
            }
        }
    };
    let mut report = LoadReport::default();
    let (mut usage_sum, mut usage_n) = (0.0, 0u32);
    for m in &metrics {
        let vals = m.samples.iter().map(|s| s.value.value.as_f64()).filter(|v| v.is_finite());
        match m.name.as_str() {
            "vllm:num_requests_waiting" => {
                report.waiting = Some(vals.sum::<f64>().clamp(0.0, u32::MAX as f64) as u32)
            }
            "vllm:num_requests_running" => {
                report.running = Some(vals.sum::<f64>().clamp(0.0, u32::MAX as f64) as u32)
            }
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                for v in vals {
                    usage_sum += v;
                    usage_n += 1;
                }
            }
            _ => {}
        }
    }
    if usage_n > 0 {
        report.kv_usage = Some((usage_sum / f64::from(usage_n)).clamp(0.0, 1.0));
    }
    if report.waiting.is_none() && report.running.is_none() && report.kv_usage.is_none() {
        return Err(match err {
            Some(e) => format!("unparsable metrics: {e:?}"),
            None => "no vllm load metrics in the scrape".into(),
        });
    }
    Ok(report)
}

/// Resolves the DNS name every interval; adds and removes backends to match.
pub async fn dns_loop(state: Arc<State>, dns: crate::config::DnsBackends) {
    let every = Duration::from_secs_f64(dns.interval_s.clamp(0.05, 3600.0));
    loop {
        match tokio::net::lookup_host((dns.name.as_str(), dns.port)).await {
            Ok(addrs) => {
                let want: std::collections::BTreeSet<std::net::SocketAddr> = addrs.collect();
                let want_names: std::collections::BTreeSet<String> =
                    want.iter().map(|a| a.to_string()).collect();
                let have: Vec<String> = state
                    .backends
                    .read()
                    .keys()
                    .filter(|k| state.dns_backends.lock().contains(*k))
                    .cloned()
                    .collect();
                for name in have {
                    if !want_names.contains(&name) {
                        tracing::info!(backend = %name, "DNS record gone; removing backend");
                        state.dns_backends.lock().remove(&name);
                        remove_backend(&state, &name).await;
                    }
                }
                for a in want {
                    let name = a.to_string();
                    if state.backends.read().contains_key(&name) {
                        continue;
                    }
                    let host = match a {
                        std::net::SocketAddr::V4(v) => v.ip().to_string(),
                        std::net::SocketAddr::V6(v) => format!("[{}]", v.ip()),
                    };
                    let ev = dns.kv_events_port.map(|p| format!("tcp://{host}:{p}"));
                    let rp = dns.replay_port.map(|p| format!("tcp://{host}:{p}"));
                    let base = format!("http://{name}");
                    let st = state.clone();
                    // Subscriber::start may block briefly (socket setup): off the runtime.
                    let added = tokio::task::spawn_blocking(move || {
                        let rt = tokio::runtime::Handle::current();
                        let _g = rt.enter();
                        add_backend(&st, &base, ev, rp)
                    })
                    .await;
                    match added {
                        Ok(Ok(_)) => {
                            tracing::info!(backend = %name, "DNS record found; backend added");
                            state.dns_backends.lock().insert(name);
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot add backend"),
                        Err(e) => tracing::warn!(error = %e, "cannot add backend"),
                    }
                }
            }
            Err(e) => tracing::warn!(name = %dns.name, error = %e, "DNS resolution failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_metrics_text() {
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
"#;
        let r = parse_load(text).unwrap();
        assert_eq!(r.running, Some(5));
        assert_eq!(r.waiting, Some(7));
        assert_eq!(r.kv_usage, Some(0.375));
        assert!(parse_load("").is_err());
        assert!(parse_load("garbage {{{").is_err());
        assert!(parse_load("# TYPE other gauge\nother 1\n").is_err());
    }
}
