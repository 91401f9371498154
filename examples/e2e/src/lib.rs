//! The reference experiment end to end over real sockets.
//!
//! [`Cluster`] starts `kvroute emulate` replicas (one process each, KV events on ZeroMQ,
//! `/metrics` as vLLM's) and `kvroute serve` in front of them; [`replay`] sends a
//! [`kvroute_sim::Workload`] over HTTP at its arrival times (scaled by the time scale) with
//! its session keys in `x-session-id`; [`scrape`] reads each replica's
//! `vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total` and request counts,
//! the way the reference setup read them in Grafana. This crate holds no routing logic:
//! requests go to the router (or, with no router, to the replicas in turn).
//!
//! Each replica publishes its KV events on its own topic, as deploy/kubernetes configures
//! the pods (llm-d's `kv@<host>:<port>@<model>`), and the router subscribes with kvroute's
//! default topic `""`, which receives them all.

use kvroute_sim::Workload;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String], name: &str, log: Option<&Path>) -> Result<Proc, String> {
        let (out, err) = match log {
            Some(p) => {
                let f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let g = f.try_clone().map_err(|e| e.to_string())?;
                (Stdio::from(f), Stdio::from(g))
            }
            None => (Stdio::null(), Stdio::inherit()),
        };
        let child = Command::new(bin)
            .args(args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", bin.display(), args.join(" ")))?;
        Ok(Proc { child: Some(child), name: name.to_string() })
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kvroute serve` arguments for the default (`kvroute`) preset with its two times in
/// seconds scaled like engines emulated at `time_scale` (replicas that run `1/time_scale`
/// times faster than real ones take that much less per step and prefill that much faster):
/// the step overhead (also the near-tie tolerance) and the prefill rate assumed before one
/// is learned. Unscaled, the 10 ms step overhead is longer than an emulated prefill's
/// wall time at small scales, every candidate is a near-tie and the prefix decides nothing.
/// Writes the configuration to a file in the temporary directory named after the scale
/// (`kvroute-e2e-preset-<scale bits>.json`: every run at one scale rewrites one file, none
/// is left per call or per process; written to a private name and renamed over it, so
/// concurrent runs never read a partial file) and returns `--config FILE`.
pub fn scaled_default_preset(time_scale: f64) -> Result<Vec<String>, String> {
    if !(time_scale.is_finite() && time_scale > 0.0) {
        return Err(format!("time scale must be a positive number, got {time_scale}"));
    }
    let dir = std::env::temp_dir();
    let path = dir.join(format!("kvroute-e2e-preset-{:016x}.json", time_scale.to_bits()));
    let params = serde_json::json!({
        "step_overhead_s": 0.01 * time_scale,
        "prefill_tokens_per_s": 10_000.0 / time_scale,
    });
    let profile = serde_json::json!({"picker": {"name": "ttft", "params": params}});
    let config = serde_json::json!({"router": {"profile": profile}}).to_string();
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("kvroute-e2e-preset-{}-{n}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, &config).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        // (Best effort: the write or the rename already failed, which is the error to report.)
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(vec!["--config".into(), path.to_string_lossy().into_owned()])
}

/// The small test tokenizer in testdata/tokenize (a BPE with `vocab` ids) that kvroute serve
/// loads for precise mode; workload token ids are mapped into its vocabulary.
pub fn test_tokenizer() -> (String, u32) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tokenize/chatml");
    (dir.display().to_string(), VOCAB)
}

/// Token ids of testdata/tokenize/chatml (its `model.vocab`, added tokens included).
pub const VOCAB: u32 = 600;

/// A free TCP port on 127.0.0.1 (bound once and released), never one this process handed
/// out before (the OS may offer a just-released port again).
pub fn free_port() -> Result<u16, String> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let p = l.local_addr().map_err(|e| e.to_string())?.port();
        let mut given = GIVEN.lock().map_err(|e| e.to_string())?;
        if !given.contains(&p) {
            given.push(p);
            return Ok(p);
        }
    }
    Err("no free port".into())
}

/// The kvroute binary: `$KVROUTE_BIN`, else the newer of `target/release/kvroute` and
/// `target/debug/kvroute`.
pub fn kvroute_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KVROUTE_BIN").filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    ["target/release/kvroute", "target/debug/kvroute"]
        .iter()
        .map(|p| root.join(p))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| "no kvroute binary: cargo build -p kvroute-cli (or set KVROUTE_BIN)".into())
}

/// One emulated replica.
#[derive(Debug)]
pub struct Replica {
    /// `host:port` of its HTTP API (its worker name in kvroute serve).
    pub http: String,
    /// Its KV-event PUB endpoint.
    pub kv_events: String,
    /// Its replay endpoint.
    pub replay: String,
    /// Its KV-event topic (`kv@<http>@<model>`).
    pub topic: String,
    /// The process.
    pub proc: Proc,
}

/// How to start the cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The kvroute binary.
    pub bin: PathBuf,
    /// Number of replicas.
    pub replicas: usize,
    /// `--time-scale` of the replicas.
    pub time_scale: f64,
    /// `--capacity-blocks` of the replicas (default: the engine preset's estimate).
    pub capacity_blocks: Option<u32>,
    /// `--engine-model` of the replicas.
    pub engine_model: String,
    /// The engines' PYTHONHASHSEED (`--hash-seed`), if any.
    pub hash_seed: Option<String>,
    /// The served model name.
    pub model: String,
    /// `--tokenizer` for the replicas.
    pub tokenizer: Option<String>,
    /// `--tokenizer` for the router (precise mode needs one even for token-id prompts).
    pub router_tokenizer: Option<String>,
    /// Token ids of the workload are taken modulo this (the router's vocabulary size).
    pub vocab: Option<u32>,
    /// Start `kvroute serve` with these extra arguments (`--profile NAME`, ...); `None`: no
    /// router.
    pub serve: Option<Vec<String>>,
    /// Directory for the processes' logs (none: discarded).
    pub log_dir: Option<PathBuf>,
}

/// Running replicas and, maybe, the router.
#[derive(Debug)]
pub struct Cluster {
    /// The replicas.
    pub replicas: Vec<Replica>,
    /// The router process and its `host:port`.
    pub router: Option<(Proc, String)>,
    spec: ClusterSpec,
}

async fn wait_ok(
    http: &reqwest::Client,
    url: &str,
    proc: &mut Proc,
    within: Duration,
) -> Result<(), String> {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_millis(500)).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if !proc.alive() {
            return Err(format!("{} exited before {url} answered", proc.name()));
        }
        if t.elapsed() > within {
            return Err(format!("{url} did not answer 200 within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Starts the replicas, waits for their `/health`, then the router and its `/ready`.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, String> {
        let http = reqwest::Client::new();
        let mut replicas = Vec::new();
        for i in 0..spec.replicas {
            let (h, k, r) = (free_port()?, free_port()?, free_port()?);
            let rep = Replica {
                http: format!("127.0.0.1:{h}"),
                kv_events: format!("tcp://127.0.0.1:{k}"),
                replay: format!("tcp://127.0.0.1:{r}"),
                topic: format!("kv@127.0.0.1:{h}@{}", spec.model),
                proc: Proc { child: None, name: format!("replica {i}") },
            };
            let mut args: Vec<String> = vec![
                "emulate".into(),
                "--listen".into(),
                rep.http.clone(),
                "--kv-events".into(),
                rep.kv_events.clone(),
                "--replay-endpoint".into(),
                rep.replay.clone(),
                "--model".into(),
                spec.model.clone(),
                "--time-scale".into(),
                spec.time_scale.to_string(),
                "--engine-model".into(),
                spec.engine_model.clone(),
                "--topic".into(),
                rep.topic.clone(),
            ];
            if let Some(c) = spec.capacity_blocks {
                args.extend(["--capacity-blocks".into(), c.to_string()]);
            }
            if let Some(s) = &spec.hash_seed {
                args.extend(["--hash-seed".into(), s.clone()]);
            }
            if let Some(t) = &spec.tokenizer {
                args.extend(["--tokenizer".into(), t.clone()]);
            }
            let log = spec.log_dir.as_ref().map(|d| d.join(format!("replica-{i}.log")));
            let proc = Proc::spawn(&spec.bin, &args, &format!("replica {i}"), log.as_deref())?;
            replicas.push(Replica { proc, ..rep });
        }
        for r in &mut replicas {
            wait_ok(
                &http,
                &format!("http://{}/health", r.http),
                &mut r.proc,
                Duration::from_secs(20),
            )
            .await?;
        }
        let mut cluster = Cluster { replicas, router: None, spec: spec.clone() };
        if let Some(extra) = &spec.serve {
            let port = free_port()?;
            let listen = format!("127.0.0.1:{port}");
            let mut args: Vec<String> = vec!["serve".into(), "--listen".into(), listen.clone()];
            for r in &cluster.replicas {
                args.extend(["--backend".into(), format!("http://{}", r.http)]);
            }
            for r in &cluster.replicas {
                args.extend(["--kv-events".into(), r.kv_events.clone()]);
            }
            for r in &cluster.replicas {
                args.extend(["--replay-endpoint".into(), r.replay.clone()]);
            }
            args.extend(["--hash-algo".into(), "sha256".into()]);
            if let Some(s) = &spec.hash_seed {
                args.extend(["--hash-seed".into(), s.clone()]);
            }
            if let Some(t) = &spec.router_tokenizer {
                args.extend(["--tokenizer".into(), t.clone()]);
            }
            args.extend(extra.iter().cloned());
            let log = spec.log_dir.as_ref().map(|d| d.join("serve.log"));
            let mut proc = Proc::spawn(&spec.bin, &args, "kvroute serve", log.as_deref())?;
            wait_ok(&http, &format!("http://{listen}/ready"), &mut proc, Duration::from_secs(30))
                .await?;
            cluster.router = Some((proc, listen));
        }
        Ok(cluster)
    }

    /// The settings it was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Where clients send requests: the router, or every replica in turn without one.
    pub fn target(&self) -> Target {
        match &self.router {
            Some((_, addr)) => Target::Router(format!("http://{addr}")),
            None => Target::RoundRobin(
                self.replicas.iter().map(|r| format!("http://{}", r.http)).collect(),
            ),
        }
    }

    /// Applies a fault to replica `i`.
    pub async fn fault(&mut self, i: usize, fault: Fault) -> Result<(), String> {
        let http = reqwest::Client::new();
        let base = format!("http://{}", self.replicas[i].http);
        let path = match fault {
            Fault::Kill => {
                self.replicas[i].proc.kill();
                return Ok(());
            }
            Fault::Restart { down_ms } => format!("/admin/restart?down_ms={down_ms}"),
            Fault::DropBatches(n) => format!("/admin/drop-batch?n={n}"),
            Fault::Error500 => "/admin/error500".into(),
            Fault::Hang => "/admin/hang".into(),
            Fault::Recover => "/admin/recover".into(),
        };
        let r = http.post(format!("{base}{path}")).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("{base}{path}: {}", r.status()));
        }
        Ok(())
    }
}

/// A fault switch of `kvroute emulate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Kill the process.
    Kill,
    /// Restart: cache cleared, sequence back to 0, requests dropped; 503 for `down_ms`.
    Restart {
        /// Milliseconds of downtime.
        down_ms: u64,
    },
    /// Keep the next n event batches off the live stream (replay still has them).
    DropBatches(u64),
    /// Answer 500 to everything.
    Error500,
    /// Stop answering.
    Hang,
    /// Undo Error500 and Hang.
    Recover,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "kill" => Fault::Kill,
            "restart" => Fault::Restart { down_ms: 500 },
            "drop" => Fault::DropBatches(3),
            "error500" => Fault::Error500,
            "hang" => Fault::Hang,
            _ => return Err(format!("unknown fault {s:?} (kill, restart, drop, error500, hang)")),
        })
    }
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// One router URL.
    Router(String),
    /// Replica URLs, used in turn (no router: a plain Service without affinity).
    RoundRobin(Vec<String>),
}

/// What happened to one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// HTTP status (0: no response).
    pub status: u16,
    /// Whether the whole stream arrived, ending with `[DONE]`.
    pub complete: bool,
    /// Seconds to the first streamed token (wall clock).
    pub ttft_s: Option<f64>,
    /// Seconds to the end of the response.
    pub e2e_s: Option<f64>,
    /// Prompt tokens served from the cache, as the replica reported in `usage`.
    pub cached_tokens: Option<u64>,
    /// The error, if any.
    pub error: Option<String>,
}

/// Sends every request of `w` at `arrival_s * time_scale` seconds after the start, as a
/// streaming `/v1/completions` with token-id prompts, `max_tokens` = its output length and
/// its session in `x-session-id`. `vocab` maps token ids into `0..vocab` when the replicas
/// use a real (small) tokenizer. Returns one outcome per request, in workload order.
pub async fn replay(
    w: &Workload,
    target: &Target,
    model: &str,
    time_scale: f64,
    vocab: Option<u32>,
) -> Vec<Outcome> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap_or_default();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(w.requests.len());
    for (i, r) in w.requests.iter().enumerate() {
        let mut prompt = Vec::new();
        r.prompt_tokens(&mut prompt);
        if let Some(v) = vocab {
            for t in &mut prompt {
                *t %= v;
            }
        }
        let url = match target {
            Target::Router(u) => format!("{u}/v1/completions"),
            Target::RoundRobin(us) => format!("{}/v1/completions", us[i % us.len()]),
        };
        let body = serde_json::json!({
            "model": model, "prompt": prompt, "max_tokens": r.output_len(), "stream": true,
            "stream_options": {"include_usage": true},
        });
        let at = Duration::from_secs_f64(r.arrival_s * time_scale);
        let session = r.session.as_deref().map(str::to_string);
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
            one(&http, &url, body, session).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Outcome { error: Some(e.to_string()), ..Outcome::default() }),
        );
    }
    out
}

async fn one(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
    session: Option<String>,
) -> Outcome {
    let t0 = Instant::now();
    let mut req = http.post(url).json(&body).timeout(Duration::from_secs(120));
    if let Some(s) = session {
        req = req.header("x-session-id", s);
    }
    let mut o = Outcome::default();
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(e.to_string());
            return o;
        }
    };
    o.status = resp.status().as_u16();
    if !resp.status().is_success() {
        o.error = Some(resp.text().await.unwrap_or_default());
        return o;
    }
    let mut buf = String::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if o.ttft_s.is_none() {
                    o.ttft_s = Some(t0.elapsed().as_secs_f64());
                }
                buf.push_str(&String::from_utf8_lossy(&c));
            }
            Ok(None) => break,
            Err(e) => {
                o.error = Some(format!("stream broken: {e}"));
                return o;
            }
        }
    }
    o.e2e_s = Some(t0.elapsed().as_secs_f64());
    o.complete = buf.trim_end().ends_with("data: [DONE]");
    for ev in buf.split("\n\n") {
        if let Some(j) = ev
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        {
            if let Some(c) =
                j.pointer("/usage/prompt_tokens_details/cached_tokens").and_then(|v| v.as_u64())
            {
                o.cached_tokens = Some(c);
            }
        }
    }
    if !o.complete {
        o.error = Some("the stream ended without [DONE]".into());
    }
    o
}

/// What one replica's `/metrics` says.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplicaMetrics {
    /// `vllm:prefix_cache_queries_total`.
    pub queries: f64,
    /// `vllm:prefix_cache_hits_total`.
    pub hits: f64,
    /// `vllm:request_success_total{finished_reason="length"}`: requests served to the end.
    pub requests: f64,
    /// `vllm:request_success_total{finished_reason="abort"}`.
    pub aborted: f64,
}

/// The value of the first sample line `name{...labels containing want...} value`.
pub fn sample(text: &str, name: &str, want: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(want) {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

/// Reads a replica's counters.
pub async fn scrape(http_addr: &str) -> Result<ReplicaMetrics, String> {
    let text = reqwest::get(format!("http://{http_addr}/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let get =
        |n: &str, w: &str| sample(&text, n, w).ok_or_else(|| format!("{http_addr}: no {n} {w}"));
    Ok(ReplicaMetrics {
        queries: get("vllm:prefix_cache_queries_total", "")?,
        hits: get("vllm:prefix_cache_hits_total", "")?,
        requests: get("vllm:request_success_total", "finished_reason=\"length\"")?,
        aborted: get("vllm:request_success_total", "finished_reason=\"abort\"")?,
    })
}

/// One run's summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// What ran.
    pub label: String,
    /// Requests sent.
    pub sent: usize,
    /// Requests answered completely.
    pub completed: usize,
    /// Requests that failed (no answer, error status, broken stream).
    pub failed: usize,
    /// Failed requests that got no response head, or an error status: nothing had reached
    /// the client, so a router could have retried them on another replica. Zero is the
    /// goal of kvroute serve's retries.
    pub lost_before_head: usize,
    /// Failed requests whose stream broke after the `200` head (tokens may have reached
    /// the client): no router can retry them, as with vLLM.
    pub broken_after_head: usize,
    /// The router's `kvroute_serve_retries_total` at the end (no router: `None`).
    pub router_retries: Option<f64>,
    /// The router's `kvroute_serve_upstream_errors_total` by kind (connect, timeout,
    /// status_5xx, body), summed over backends.
    pub router_upstream_errors: std::collections::BTreeMap<String, f64>,
    /// The router's `kvroute_index_blocks` at the end.
    pub router_index_blocks: Option<f64>,
    /// KV-event batches the router received from each replica
    /// (`kvroute_serve_backend_event_batches_total`), in replica order.
    pub router_event_batches: Vec<f64>,
    /// Sum of hits / sum of queries over the replicas.
    pub hit_rate: f64,
    /// Requests on the busiest replica / all requests the replicas served.
    pub top_share: f64,
    /// Per replica.
    pub replicas: Vec<ReplicaMetrics>,
    /// Median TTFT, wall-clock seconds.
    pub ttft_p50_s: Option<f64>,
    /// Every failed request's error, in workload order (Display prints the first few).
    pub errors: Vec<String>,
}

/// Summarizes outcomes and replica counters (`counters` may include earlier readings of a
/// replica that restarted: they are added).
pub fn summarize(label: &str, outcomes: &[Outcome], replicas: Vec<ReplicaMetrics>) -> Summary {
    let completed = outcomes.iter().filter(|o| o.complete).count();
    let (hits, queries): (f64, f64) =
        replicas.iter().fold((0.0, 0.0), |a, r| (a.0 + r.hits, a.1 + r.queries));
    let served: f64 = replicas.iter().map(|r| r.requests).sum();
    let top = replicas.iter().map(|r| r.requests).fold(0.0, f64::max);
    let mut ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.ttft_s).collect();
    ttft.sort_by(f64::total_cmp);
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.complete).collect();
    let broken_after_head = failed.iter().filter(|o| (200..300).contains(&o.status)).count();
    Summary {
        label: label.to_string(),
        sent: outcomes.len(),
        completed,
        failed: failed.len(),
        lost_before_head: failed.len() - broken_after_head,
        broken_after_head,
        hit_rate: if queries > 0.0 { hits / queries } else { 0.0 },
        top_share: if served > 0.0 { top / served } else { 0.0 },
        replicas,
        ttft_p50_s: ttft.get(ttft.len() / 2).copied(),
        errors: outcomes.iter().filter_map(|o| o.error.clone()).collect(),
        ..Summary::default()
    }
}

/// The sum of every sample of `name` whose labels contain `want`.
pub fn sample_sum(text: &str, name: &str, want: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(want) {
                return None;
            }
            rest.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

impl Summary {
    /// Fills the router's figures from its `/metrics` text (`replicas`: their `host:port`
    /// names, in order).
    pub fn add_router_metrics(&mut self, text: &str, replicas: &[String]) {
        self.router_retries = sample(text, "kvroute_serve_retries_total", "");
        self.router_index_blocks = sample(text, "kvroute_index_blocks", "");
        for kind in ["connect", "timeout", "status_5xx", "body"] {
            let n = sample_sum(
                text,
                "kvroute_serve_upstream_errors_total",
                &format!("kind=\"{kind}\""),
            );
            if n > 0.0 {
                self.router_upstream_errors.insert(kind.to_string(), n);
            }
        }
        self.router_event_batches = replicas
            .iter()
            .map(|r| {
                sample(
                    text,
                    "kvroute_serve_backend_event_batches_total",
                    &format!("backend=\"{r}\""),
                )
                .unwrap_or(0.0)
            })
            .collect();
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} sent, {} completed, {} failed; prefix cache hit rate {:.1}% (sum of hits / sum of queries), busiest replica {:.0}% of requests",
            self.label,
            self.sent,
            self.completed,
            self.failed,
            100.0 * self.hit_rate,
            100.0 * self.top_share
        )?;
        for (i, r) in self.replicas.iter().enumerate() {
            let rate = if r.queries > 0.0 { 100.0 * r.hits / r.queries } else { 0.0 };
            writeln!(
                f,
                "  replica {i}: {:>4} requests ({} aborted), hits {:>8} / queries {:>8} = {rate:.1}%",
                r.requests, r.aborted, r.hits, r.queries
            )?;
        }
        if self.failed > 0 || self.router_retries.is_some() {
            write!(
                f,
                "  failed requests: {} lost before the response head (retryable: a router could have sent them elsewhere), {} broken after the head (not retryable)",
                self.lost_before_head, self.broken_after_head
            )?;
            if let Some(r) = self.router_retries {
                write!(f, "; router retries {r}")?;
            }
            if !self.router_upstream_errors.is_empty() {
                write!(f, ", upstream errors {:?}", self.router_upstream_errors)?;
            }
            writeln!(f)?;
        }
        if let Some(b) = self.router_index_blocks {
            writeln!(
                f,
                "  router: index {b} blocks at the end; KV-event batches received per replica {:?}",
                self.router_event_batches
            )?;
        }
        for e in self.errors.iter().take(5) {
            writeln!(f, "  error: {}", e.lines().next().unwrap_or(""))?;
        }
        Ok(())
    }
}

/// Runs one experiment: starts the cluster, replays `w` (applying `fault` to replica
/// `fault_replica` halfway through, and recovering it a moment later), reads the counters
/// and stops everything.
pub async fn run(
    spec: ClusterSpec,
    w: &Workload,
    label: &str,
    fault: Option<(Fault, usize)>,
) -> Result<(Summary, Option<String>), String> {
    let mut cluster = Cluster::start(spec.clone()).await?;
    let target = cluster.target();
    let vocab = spec.vocab;
    let duration = w.requests.last().map_or(0.0, |r| r.arrival_s) * spec.time_scale;
    let load = {
        let w = w.clone();
        let model = spec.model.clone();
        let ts = spec.time_scale;
        tokio::spawn(async move { replay(&w, &target, &model, ts, vocab).await })
    };
    let mut before: Vec<ReplicaMetrics> = vec![ReplicaMetrics::default(); cluster.replicas.len()];
    if let Some((f, i)) = fault {
        tokio::time::sleep(Duration::from_secs_f64(duration / 2.0)).await;
        if matches!(f, Fault::Restart { .. } | Fault::Kill) {
            // A restart zeroes the process's counters: keep what it had counted.
            before[i] = scrape(&cluster.replicas[i].http).await.unwrap_or_default();
        }
        cluster.fault(i, f).await?;
        if matches!(f, Fault::Error500 | Fault::Hang) {
            tokio::time::sleep(Duration::from_secs_f64((duration / 10.0).max(0.2))).await;
            cluster.fault(i, Fault::Recover).await?;
        }
    }
    let outcomes = load.await.map_err(|e| e.to_string())?;
    let mut counters = Vec::new();
    for (i, r) in cluster.replicas.iter().enumerate() {
        let now = if r.proc.child.is_some() {
            scrape(&r.http).await.unwrap_or_default()
        } else {
            ReplicaMetrics::default()
        };
        counters.push(ReplicaMetrics {
            queries: now.queries + before[i].queries,
            hits: now.hits + before[i].hits,
            requests: now.requests + before[i].requests,
            aborted: now.aborted + before[i].aborted,
        });
    }
    let router_metrics = match &cluster.router {
        Some((_, addr)) => {
            reqwest::get(format!("http://{addr}/metrics")).await.ok().map(|r| r.text())
        }
        None => None,
    };
    let router_metrics = match router_metrics {
        Some(f) => f.await.ok(),
        None => None,
    };
    let mut summary = summarize(label, &outcomes, counters);
    if let Some(m) = &router_metrics {
        let names: Vec<String> = cluster.replicas.iter().map(|r| r.http.clone()).collect();
        summary.add_router_metrics(m, &names);
    }
    Ok((summary, router_metrics))
}

#[cfg(test)]
mod tests {
    use super::scaled_default_preset;

    /// One file per scale, rewritten in place (no file per call), holding the scaled
    /// picker parameters; a scale that is not a positive number is refused.
    #[test]
    fn scaled_preset_is_one_file_per_scale_with_the_scaled_times() {
        let a = scaled_default_preset(0.25).unwrap();
        let b = scaled_default_preset(0.25).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], "--config");
        let text = std::fs::read_to_string(&a[1]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let params = &v["router"]["profile"]["picker"]["params"];
        assert_eq!(v["router"]["profile"]["picker"]["name"], "ttft");
        assert_eq!(params["step_overhead_s"].as_f64(), Some(0.01 * 0.25));
        assert_eq!(params["prefill_tokens_per_s"].as_f64(), Some(10_000.0 / 0.25));
        assert_ne!(scaled_default_preset(0.5).unwrap()[1], a[1]);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(scaled_default_preset(bad).is_err(), "{bad}");
        }
    }
}
