//! The emulator over real sockets: HTTP requests with reqwest, its KV events read by
//! kvroute's own ZeroMQ subscriber (sequence tracking, replay, restart detection), its
//! `/metrics` parsed by a Prometheus text parser.

use kvroute::events::{vllm, EngineHash, KvEvent, KvEventBatch};
use kvroute::hash::{BlockHasher, HashAlgo, HashConfig, RequestExtras};
use kvroute_emulate::{Args, Emulator};
use kvroute_zmq::{
    EventSink, PublisherConfig, PublisherInfo, ResetReason, Subscriber, SubscriberConfig,
};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Env {
    emu: Emulator,
    base: String,
    sub: Subscriber,
    sink: Arc<Sink>,
    http: reqwest::Client,
}

#[derive(Default)]
struct Sink {
    seen: Mutex<Vec<Result<(u64, KvEventBatch), String>>>,
}

impl EventSink for Sink {
    fn on_batch(&self, _: &PublisherInfo, seq: u64, payload: &[u8]) -> kvroute::Result<()> {
        let b = vllm::decode(payload)?;
        self.seen.lock().push(Ok((seq, b)));
        Ok(())
    }
    fn on_reset(&self, _: &PublisherInfo, reason: ResetReason) {
        self.seen.lock().push(Err(reason.to_string()));
    }
}

impl Sink {
    fn batches(&self) -> Vec<(u64, KvEventBatch)> {
        self.seen.lock().iter().filter_map(|r| r.as_ref().ok().cloned()).collect()
    }
    fn wait_for(&self, n: usize) -> Vec<(u64, KvEventBatch)> {
        let t = Instant::now();
        while self.batches().len() < n {
            assert!(t.elapsed() < Duration::from_secs(10), "only {} batches", self.batches().len());
            std::thread::sleep(Duration::from_millis(10));
        }
        self.batches()
    }
}

fn args(capacity: u32, time_scale: f64) -> (Args, String, String) {
    let (h, p, r) = (port(), port(), port());
    let pub_ep = format!("tcp://127.0.0.1:{p}");
    let rep_ep = format!("tcp://127.0.0.1:{r}");
    let a = Args {
        listen: format!("127.0.0.1:{h}"),
        kv_events: pub_ep.clone(),
        replay_endpoint: rep_ep.clone(),
        tokenizer: None,
        model: "emu-model".into(),
        capacity_blocks: Some(capacity),
        time_scale,
        hash_algo: "sha256".into(),
        hash_seed: None,
        topic: "kv-events".into(),
        block_size: 16,
        engine_model: "llama-3-8b".into(),
        engine_gpu: "h100-80gb".into(),
        max_model_len: 4096,
        default_max_tokens: 16,
    };
    (a, pub_ep, rep_ep)
}

fn start(capacity: u32, time_scale: f64) -> Env {
    start_with(capacity, time_scale, |_| {})
}

fn start_with(capacity: u32, time_scale: f64, tweak: impl FnOnce(&mut Args)) -> Env {
    let (mut a, pub_ep, rep_ep) = args(capacity, time_scale);
    tweak(&mut a);
    let emu = Emulator::start(a).expect("start emulator");
    let sink = Arc::new(Sink::default());
    let cfg = SubscriberConfig {
        publishers: vec![PublisherConfig::new(pub_ep).with_replay(rep_ep)],
        ..SubscriberConfig::default()
    };
    let sub = Subscriber::start(cfg, sink.clone()).unwrap();
    let t = Instant::now();
    while !sub.stats()[0].connected {
        assert!(t.elapsed() < Duration::from_secs(5), "subscriber never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the subscription reach the PUB socket (ZeroMQ's slow joiner).
    std::thread::sleep(Duration::from_millis(300));
    let base = format!("http://{}", emu.addr());
    Env { emu, base, sub, sink, http: reqwest::Client::new() }
}

impl Env {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap()
    }
    async fn complete(&self, prompt: &[u32], max_tokens: usize) -> Value {
        let r = self
            .post(
                "/v1/completions",
                json!({"model": "emu-model", "prompt": prompt, "max_tokens": max_tokens}),
            )
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
    async fn metrics(&self) -> Scrape {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap();
        parse_metrics(&text.text().await.unwrap())
    }
}

/// The Python interpreter: `$KVROUTE_PYTHON`, else `<root>/.venv/bin/python`, else
/// `python3`. It needs `prometheus_client` (scripts/test.sh installs it).
fn python() -> std::path::PathBuf {
    match std::env::var_os("KVROUTE_PYTHON") {
        Some(p) if !p.is_empty() => p.into(),
        _ => {
            let venv =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
            if venv.exists() {
                venv
            } else {
                "python3".into()
            }
        }
    }
}

/// Families as prometheus_client's own text parser reads them: name -> (type, samples of
/// (sample name, labels, value)). This is the library vLLM renders its metrics with.
type Scrape = std::collections::BTreeMap<
    String,
    (String, Vec<(String, std::collections::BTreeMap<String, String>, f64)>),
>;

fn parse_metrics(text: &str) -> Scrape {
    use std::io::Write;
    let script = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as f\n\
        out = {fam.name: [fam.type, [[s.name, s.labels, s.value] for s in fam.samples]] for fam in f(sys.stdin.read())}\n\
        print(json.dumps(out))";
    let py = python();
    let mut child = std::process::Command::new(&py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); set KVROUTE_PYTHON to a Python with prometheus_client",
                py.display()
            )
        });
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "prometheus_client could not parse /metrics (pip install prometheus_client into .venv, or set KVROUTE_PYTHON): {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn value(s: &Scrape, sample: &str, label: Option<(&str, &str)>) -> f64 {
    s.values()
        .flat_map(|(_, v)| v)
        .find(|(n, l, _)| {
            n == sample && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {sample}"))
        .2
}

fn hasher() -> BlockHasher {
    BlockHasher::new(HashConfig { algo: HashAlgo::Sha256, block_size: 16, ..HashConfig::default() })
        .unwrap()
}

fn stored(batches: &[(u64, KvEventBatch)]) -> Vec<(Option<u64>, Vec<u64>, Vec<u32>)> {
    let mut v = Vec::new();
    for (_, b) in batches {
        for e in &b.events {
            if let KvEvent::BlockStored(s) = e {
                v.push((
                    s.parent_block_hash.as_ref().map(EngineHash::to_u64),
                    s.block_hashes.iter().map(EngineHash::to_u64).collect(),
                    s.token_ids.clone(),
                ));
            }
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_events_and_metrics_agree_with_vllm() {
    let env = start(64, 0.001);
    let prompt: Vec<u32> = (0..100).collect();
    let a = env.complete(&prompt, 20).await;
    assert_eq!(a["usage"]["prompt_tokens"], 100);
    assert_eq!(a["usage"]["completion_tokens"], 20);
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let out =
        kvroute_emulate::http::output_tokens(&prompt, 20, kvroute_sim::workload::VOCAB as u32);
    let text: String = out.iter().map(|t| format!("<{t}>")).collect();
    assert_eq!(a["choices"][0]["text"], text.as_str());
    // The same prompt again: its 6 full prompt blocks are cached (vLLM looks up at most
    // prompt - 1 tokens, in full blocks).
    let b = env.complete(&prompt, 20).await;
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    assert_eq!(b["choices"][0]["text"], a["choices"][0]["text"]);

    // Events: prompt blocks at the end of prefill, then the output block that filled during
    // decode (100 + 19 computed tokens = 7 full blocks), keyed by vLLM's sha256 scheme.
    let mut all = prompt.clone();
    all.extend_from_slice(&out);
    let mut keys = Vec::new();
    hasher().block_keys(&all, &RequestExtras::default(), &mut keys);
    // The second request computes the output block again (it lies past the prompt's hit
    // limit) and, as vLLM's BlockPool does, registers and announces it again.
    let batches = env.sink.wait_for(3);
    assert_eq!(batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    let st = stored(&batches);
    assert_eq!(st.len(), 3, "{st:?}");
    assert_eq!(st[2], st[1]);
    assert_eq!(st[0], (None, keys[..6].to_vec(), all[..96].to_vec()));
    assert_eq!(st[1], (Some(keys[5]), keys[6..7].to_vec(), all[96..112].to_vec()));
    assert_eq!(batches[0].1.data_parallel_rank, Some(0));

    // Metrics: vLLM's names, types and labels, values as vLLM counts them.
    let m = env.metrics().await;
    // Families with the names, types and labels of vLLM 0.33 (vllm/v1/metrics/loggers.py).
    for (name, ty) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries", "counter"),
        ("vllm:prefix_cache_hits", "counter"),
        ("vllm:num_preemptions", "counter"),
        ("vllm:prompt_tokens", "counter"),
        ("vllm:generation_tokens", "counter"),
        ("vllm:request_success", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
    ] {
        let (got, samples) = m.get(name).unwrap_or_else(|| panic!("no family {name}"));
        assert_eq!(got, ty, "{name}");
        for (sample, labels, _) in samples {
            assert_eq!(labels.get("model_name").map(String::as_str), Some("emu-model"), "{sample}");
            assert_eq!(labels.get("engine").map(String::as_str), Some("0"), "{sample}");
        }
    }
    let le: Vec<&str> = m["vllm:time_to_first_token_seconds"]
        .1
        .iter()
        .filter_map(|(_, l, _)| l.get("le").map(String::as_str))
        .collect();
    assert_eq!(le.len(), 23, "22 vLLM buckets and +Inf: {le:?}");
    assert_eq!(value(&m, "vllm:prefix_cache_queries_total", None), 200.0);
    assert_eq!(value(&m, "vllm:prefix_cache_hits_total", None), 96.0);
    assert_eq!(value(&m, "vllm:request_success_total", Some(("finished_reason", "length"))), 2.0);
    assert_eq!(value(&m, "vllm:generation_tokens_total", None), 40.0);
    assert_eq!(value(&m, "vllm:time_to_first_token_seconds_count", None), 2.0);
    assert_eq!(value(&m, "vllm:num_requests_running", None), 0.0);

    // Streaming: one chunk per token, the final chunk, usage, [DONE].
    let r = env
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let chunks: Vec<&str> = body.split("\n\n").filter(|c| !c.is_empty()).collect();
    assert_eq!(chunks.len(), 5 + 1 + 1 + 1, "{body}");
    assert_eq!(chunks[7], "data: [DONE]");
    let usage: Value = serde_json::from_str(chunks[6].trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let streamed: String = chunks[..5]
        .iter()
        .map(|c| {
            serde_json::from_str::<Value>(c.trim_start_matches("data: ")).unwrap()["choices"][0]
                ["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, out[..5].iter().map(|t| format!("<{t}>")).collect::<String>());

    // Bad input: a clear 4xx, nothing changes.
    assert_eq!(env.post("/v1/completions", json!({"prompt": "text"})).await.status(), 400);
    assert_eq!(
        env.post("/v1/completions", json!({"model": "other", "prompt": [1]})).await.status(),
        404
    );
    assert_eq!(env.post("/v1/completions", json!({"prompt": [1, -2]})).await.status(), 400);
    assert_eq!(env.post("/v1/chat/completions", json!({"messages": []})).await.status(), 400);
    let models: Value =
        env.http.get(format!("{}/v1/models", env.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "emu-model");
    drop(env.sub);
    env.emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_drop_restart_error_and_hang() {
    let env = start(64, 0.001);
    // A dropped batch: the subscriber sees the gap at the next batch and replays it.
    env.complete(&(0..40).collect::<Vec<_>>(), 2).await;
    env.sink.wait_for(1);
    env.post("/admin/drop-batch", json!({})).await;
    env.complete(&(1000..1040).collect::<Vec<_>>(), 2).await;
    env.complete(&(2000..2040).collect::<Vec<_>>(), 2).await;
    let batches = env.sink.wait_for(3);
    assert_eq!(batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    let stats = &env.sub.stats()[0];
    assert_eq!((stats.gaps, stats.replays_ok), (1, 1), "{stats:?}");
    let state: Value = env
        .http
        .get(format!("{}/admin/state", env.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["batches_dropped"], 1);

    // A restart: the cache is empty, the sequence starts over, the counters are zero.
    let r = env.post("/admin/restart", json!({})).await;
    assert_eq!(r.status(), 200);
    let again = env.complete(&(0..40).collect::<Vec<_>>(), 2).await;
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let t = Instant::now();
    // The restart count and the sink's record of the batch that revealed it are not
    // updated together: wait for both (a full CI run once saw the count first).
    while env.sub.stats()[0].restarts == 0 || env.sink.batches().last().map(|b| b.0) != Some(0) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?} last batch {:?}",
            env.sub.stats(),
            env.sink.batches().last().map(|b| b.0)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = env.metrics().await;
    assert_eq!(value(&m, "vllm:prefix_cache_queries_total", None), 40.0);

    // 500s, then recovery.
    env.post("/admin/error500", json!({})).await;
    assert_eq!(env.post("/v1/completions", json!({"prompt": [1, 2, 3]})).await.status(), 500);
    assert_eq!(env.http.get(format!("{}/health", env.base)).send().await.unwrap().status(), 500);
    env.post("/admin/recover", json!({})).await;
    assert_eq!(env.http.get(format!("{}/health", env.base)).send().await.unwrap().status(), 200);

    // Not answering: the client times out; after recovery it is answered.
    env.post("/admin/hang", json!({})).await;
    let hung = env
        .http
        .get(format!("{}/health", env.base))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.is_err_and(|e| e.is_timeout()));
    env.post("/admin/recover", json!({})).await;
    assert_eq!(env.http.get(format!("{}/health", env.base)).send().await.unwrap().status(), 200);
    drop(env.sub);
    env.emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_breaks_live_streams_and_a_disconnect_aborts() {
    // Real time (scale 1): 2000 output tokens take seconds, so the stream is live.
    let env = start(512, 1.0);
    let r = env
        .post(
            "/v1/completions",
            json!({"prompt": (0..64).collect::<Vec<u32>>(), "max_tokens": 2000, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut r = r;
    assert!(r.chunk().await.unwrap().is_some());
    env.post("/admin/restart", json!({})).await;
    let mut broke = false;
    loop {
        match r.chunk().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    assert!(broke, "the stream ended cleanly despite the restart");

    // A client that goes away mid-stream: the engine aborts its request.
    let mut r = env
        .post(
            "/v1/completions",
            json!({"prompt": (0..64).collect::<Vec<u32>>(), "max_tokens": 2000, "stream": true}),
        )
        .await;
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    let t = Instant::now();
    loop {
        let (running, waiting, _) = env.emu.engine().snapshot();
        if running + waiting == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "request never aborted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = env.metrics().await;
    assert_eq!(value(&m, "vllm:request_success_total", Some(("finished_reason", "abort"))), 1.0);
    drop(env.sub);
    env.emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_chat_are_tokenized_as_vllm_does() {
    // testdata/tokenize: three model directories and 210 requests whose token ids Python
    // transformers computed (tokenizer + chat template), as vLLM 0.33 would.
    let root = format!("{}/../../testdata/tokenize", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(format!("{root}/vectors.json")).unwrap();
    let vectors: Value = serde_json::from_str(&text).unwrap();
    let ordered = kvroute_tokenize::Json::parse(&text).unwrap();
    let ordered = ordered.get("requests").unwrap().as_array().unwrap().to_vec();
    for model in ["chatml", "llama3", "gemma"] {
        let env = start_with(4096, 0.001, |a| {
            a.tokenizer = Some(format!("{root}/{model}"));
            a.model = model.into();
        });
        let mut checked = 0;
        let mut completed = false;
        // vLLM's /tokenize takes one text prompt or messages (no batches, no token ids).
        let tokenizable = |r: &&Value| r["body"]["prompt"].is_string() || r["kind"] == "chat";
        for (i, r) in vectors["requests"].as_array().unwrap().iter().enumerate() {
            if r["model"] != model || !tokenizable(&r) {
                continue;
            }
            let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
            // The body as written in the vectors, in its key order (chat templates render
            // tool schemas with tojson, which keeps the client's order).
            let body = ordered[i].get("body").unwrap();
            let got: Value = env
                .http
                .post(format!("{}/tokenize", env.base))
                .header("content-type", "application/json")
                .body(serde_json::to_string(body).unwrap())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(got["tokens"], json!(ids), "{model}: {}", r["body"]);
            checked += 1;
            // One generation per model whose prompt fills a block: the KV event carries
            // exactly those token ids.
            if !completed && ids.len() >= 16 && r["kind"] == "chat" {
                completed = true;
                let resp = env
                    .http
                    .post(format!("{}/v1/chat/completions", env.base))
                    .header("content-type", "application/json")
                    .body(serde_json::to_string(body).unwrap())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let v: Value = resp.json().await.unwrap();
                assert_eq!(v["usage"]["prompt_tokens"], ids.len());
                let batches = env.sink.wait_for(1);
                let st = stored(&batches);
                let full = ids.len() / 16 * 16;
                assert_eq!(st[0].2[..full], ids[..full], "{model}");
            }
        }
        assert!(checked >= 60 && completed, "{model}: {checked}");
        drop(env.sub);
        env.emu.stop();
    }
}

/// A per-pod topic, llm-d style (`kv@<pod-ip>:<port>@<model>`, what deploy/kubernetes
/// gives each pod): every live message and every replayed batch carries it as its topic
/// frame, byte for byte, and a subscription to "" (kvroute's default) receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_pod_topic_is_the_topic_frame_live_and_in_replay() {
    let topic = "kv@10.1.0.7:8000@emu-model";
    let (mut a, pub_ep, rep_ep) = args(64, 0.001);
    a.topic = topic.into();
    let emu = Emulator::start(a).unwrap();
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.set_rcvtimeo(100).unwrap();
    sub.connect(&pub_ep).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/completions", emu.addr());
    // Send until the subscription has joined (ZeroMQ drops messages before that). Each
    // attempt is a new prompt: a repeated one would hit the prefix cache and store (and
    // publish) nothing, so a first batch lost before the join would never be followed.
    let t = Instant::now();
    let mut attempt = 0u32;
    let live = loop {
        assert!(t.elapsed() < Duration::from_secs(10), "no live batch");
        let first = attempt * 40;
        attempt += 1;
        let r = http
            .post(&url)
            .json(&json!({"prompt": (first..first + 40).collect::<Vec<u32>>(), "max_tokens": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if let Ok(f) = sub.recv_multipart(0) {
            break f;
        }
    };
    assert_eq!(live.len(), 3);
    assert_eq!(live[0], topic.as_bytes());
    assert_eq!(live[1].len(), 8);

    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_rcvtimeo(5000).unwrap();
    dealer.connect(&rep_ep).unwrap();
    dealer.send_multipart([&b""[..], &0u64.to_be_bytes()], 0).unwrap();
    let first = dealer.recv_multipart(0).unwrap();
    assert_eq!(first.len(), 4, "[\"\", topic, seq, payload]");
    assert_eq!((first[0].as_slice(), first[1].as_slice()), (&b""[..], topic.as_bytes()));
    assert_eq!(first[2], 0u64.to_be_bytes());
    vllm::decode(&first[3]).unwrap();
    emu.stop();
}
