//! kvroute serve end to end against in-process fake vLLM backends (real HTTP over
//! loopback): streaming pass-through, lifecycle accounting under client disconnects,
//! retry and health, error bodies, limits, the dry run, load scrapes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kvroute_server::{Running, ServeConfig};
use rand::{Rng, SeedableRng};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// A fake vLLM replica.
#[derive(Default)]
struct Fake {
    /// Answer 500 to completions.
    fail: AtomicBool,
    /// Answer 503 to /health.
    sick: AtomicBool,
    /// Streamed chunks per request.
    chunks: AtomicU64,
    /// Delay between chunks, microseconds.
    gap_us: AtomicU64,
    /// When set, the stream waits for this before its second chunk.
    gate: Option<Arc<Notify>>,
    /// Completions served.
    served: AtomicU64,
    /// Bodies received (last one).
    last_body: parking_lot::Mutex<Vec<u8>>,
}

fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(p)
}

async fn fake_handle(
    fake: Arc<Fake>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, BoxErr>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let full = |s: StatusCode, b: String| {
        let mut r =
            Response::new(Full::new(Bytes::from(b)).map_err(|e: Infallible| match e {}).boxed());
        *r.status_mut() = s;
        r
    };
    match path.as_str() {
        "/health" => {
            let s = if fake.sick.load(Ordering::Relaxed) { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            Ok(full(s, String::new()))
        }
        "/metrics" => Ok(full(
            StatusCode::OK,
            format!(
                "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{engine=\"0\"}} {}\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{engine=\"0\"}} 2.0\n# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{engine=\"0\"}} 0.25\n",
                fake.served.load(Ordering::Relaxed) % 3
            ),
        )),
        "/v1/models" => Ok(full(StatusCode::OK, r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#.into())),
        "/v1/completions" | "/v1/chat/completions" => {
            *fake.last_body.lock() = body.to_vec();
            if fake.fail.load(Ordering::Relaxed) {
                return Ok(full(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":"boom"}"#.into()));
            }
            fake.served.fetch_add(1, Ordering::Relaxed);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["stream"].as_bool() != Some(true) {
                return Ok(full(StatusCode::OK, r#"{"choices":[{"text":"ok"}]}"#.into()));
            }
            let n = fake.chunks.load(Ordering::Relaxed).max(1);
            let gap = Duration::from_micros(fake.gap_us.load(Ordering::Relaxed));
            let gate = fake.gate.clone();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxErr>>(4);
            tokio::spawn(async move {
                for i in 0..n {
                    if i == 1 {
                        if let Some(g) = &gate {
                            g.notified().await;
                        }
                    }
                    let chunk = format!("data: {{\"choices\":[{{\"text\":\"t{i}\"}}]}}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                        return;
                    }
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: [DONE]\n\n")))).await;
            });
            let mut r = Response::new(ChanBody(rx).boxed());
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            Ok(r)
        }
        _ => Ok(full(StatusCode::NOT_FOUND, String::new())),
    }
}

/// An mpsc receiver as a response body.
struct ChanBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxErr>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = BoxErr;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxErr>>> {
        self.0.poll_recv(cx)
    }
}

async fn start_fake(fake: Arc<Fake>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let f = fake.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| fake_handle(f.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn config(backends: &[SocketAddr], tokenizer: Option<&str>) -> ServeConfig {
    let mut cfg = ServeConfig::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.backends = backends.iter().map(|a| format!("http://{a}")).collect();
    cfg.server.health_interval_ms = 50;
    cfg.server.scrape_interval_ms = 50;
    match tokenizer {
        Some(t) => cfg.server.tokenizer = Some(testdata(t)),
        None => cfg.router.mode = kvroute::router::Mode::Approximate,
    }
    cfg
}

/// A raw HTTP/1.1 request; returns (status, headers+body text).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    extra: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("")
}

async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn up(cfg: ServeConfig) -> Running {
    let r = kvroute_server::start(cfg).await.unwrap();
    let st = r.state.clone();
    wait_until(|| st.backends.read().values().all(|b| b.probed.load(Ordering::Relaxed)), "probes")
        .await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_chunk_by_chunk_with_lifecycle() {
    let gate = Arc::new(Notify::new());
    let fake = Arc::new(Fake { gate: Some(gate.clone()), ..Fake::default() });
    fake.chunks.store(3, Ordering::Relaxed);
    let b = start_fake(fake.clone()).await;
    let srv = up(config(&[b], Some("tokenize/chatml"))).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hello!"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The first chunk arrives while the backend holds back the second: nothing is buffered.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("t0") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("first chunk")
            .unwrap();
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("t1"));
    assert_eq!(srv.state.router.inflight_requests(), 1);
    gate.notify_one();
    while !String::from_utf8_lossy(&got).contains("[DONE]") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("rest")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(text.contains(&format!("x-kvroute-worker: {b}")), "{text}");
    let st = srv.state.clone();
    wait_until(|| st.router.inflight_requests() == 0, "finish").await;
    // The backend got the body unchanged.
    assert_eq!(fake.last_body.lock().as_slice(), body.as_bytes());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_with_random_disconnects_leave_nothing_in_flight() {
    let fakes: Vec<Arc<Fake>> = (0..3).map(|_| Arc::new(Fake::default())).collect();
    let mut addrs = Vec::new();
    for f in &fakes {
        f.chunks.store(6, Ordering::Relaxed);
        f.gap_us.store(300, Ordering::Relaxed);
        addrs.push(start_fake(f.clone()).await);
    }
    let srv = up(config(&addrs, Some("tokenize/llama3"))).await;
    let addr = srv.addr;
    let sem = Arc::new(tokio::sync::Semaphore::new(48));
    let mut handles = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..1000u32 {
        let cut: u32 = rng.random_range(0..4); // 0: full read; 1: drop after send; 2: after head; 3: after some bytes
        let stream = rng.random_bool(0.8);
        let permit = sem.clone().acquire_owned().await.unwrap();
        handles.push(tokio::spawn(async move {
            let _p = permit;
            let body = if i % 2 == 0 {
                format!(r#"{{"model":"m","stream":{stream},"prompt":"request {i} Résumé"}}"#)
            } else {
                format!(r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"hi {i}"}}]}}"#)
            };
            let path = if i % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = [0u8; 256];
            match cut {
                1 => {}
                2 | 3 => {
                    let want = if cut == 2 { 1 } else { 300 };
                    let mut got = 0;
                    while got < want {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                }
                _ => {
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out).await;
                    let t = String::from_utf8_lossy(&out);
                    assert!(t.starts_with("HTTP/1.1 200"), "{t}");
                }
            }
            drop(s);
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let st = srv.state.clone();
    wait_until(|| st.router.inflight_requests() == 0, "zero in flight").await;
    let served: u64 = fakes.iter().map(|f| f.served.load(Ordering::Relaxed)).sum();
    assert!(served > 500, "{served} served");
    assert!(srv.state.metrics.client_disconnects.load(Ordering::Relaxed) > 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_5xx_backends_are_retried_once_and_marked_unhealthy() {
    // A port with nobody listening: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let failing = Arc::new(Fake::default());
    failing.fail.store(true, Ordering::Relaxed);
    let good = Arc::new(Fake::default());
    let fa = start_fake(failing.clone()).await;
    let ga = start_fake(good.clone()).await;
    let mut cfg = config(&[dead, fa, ga], Some("tokenize/chatml"));
    cfg.server.health_interval_ms = 60_000; // probes must not hide the request path's marking
    cfg.router.profile = kvroute::router::ProfileSpec::Preset("round-robin".into());
    let srv = kvroute_server::start(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The probe marked the dead one; the failing one answers /health fine.
    for i in 0..20 {
        let (st, resp) =
            http(srv.addr, "POST", "/v1/completions", &format!(r#"{{"prompt":"x{i}"}}"#), "").await;
        // Two bad backends and one retry: a request can land on both bad ones and fail.
        assert!(st == 200 || st == 500 || st == 502, "{resp}");
    }
    let healthy =
        |a: SocketAddr| srv.state.backends.read()[&a.to_string()].healthy.load(Ordering::Relaxed);
    assert!(!healthy(fa), "the 5xx backend is marked unhealthy");
    assert!(healthy(ga));
    assert!(srv.state.metrics.retries.load(Ordering::Relaxed) >= 1);
    // Once both are out, everything goes to the good one.
    let before = good.served.load(Ordering::Relaxed);
    for i in 0..10 {
        let (st, resp) =
            http(srv.addr, "POST", "/v1/completions", &format!(r#"{{"prompt":"y{i}"}}"#), "").await;
        assert_eq!(st, 200, "{resp}");
    }
    assert_eq!(good.served.load(Ordering::Relaxed), before + 10);
    assert_eq!(srv.state.router.inflight_requests(), 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_take_backends_out_and_back() {
    let a = Arc::new(Fake::default());
    let b = Arc::new(Fake::default());
    let (aa, ba) = (start_fake(a.clone()).await, start_fake(b.clone()).await);
    let mut cfg = config(&[aa, ba], Some("tokenize/chatml"));
    cfg.router.profile = kvroute::router::ProfileSpec::Preset("round-robin".into());
    let srv = up(cfg).await;
    let (st, _) = http(srv.addr, "GET", "/ready", "", "").await;
    assert_eq!(st, 200);
    a.sick.store(true, Ordering::Relaxed);
    let s = srv.state.clone();
    let name = aa.to_string();
    wait_until(|| !s.backends.read()[&name].healthy.load(Ordering::Relaxed), "unhealthy").await;
    let before = a.served.load(Ordering::Relaxed);
    for i in 0..6 {
        let (st, _) =
            http(srv.addr, "POST", "/v1/completions", &format!(r#"{{"prompt":"z{i}"}}"#), "").await;
        assert_eq!(st, 200);
    }
    assert_eq!(a.served.load(Ordering::Relaxed), before);
    a.sick.store(false, Ordering::Relaxed);
    wait_until(|| s.backends.read()[&name].healthy.load(Ordering::Relaxed), "healthy again").await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_error_bodies_and_limits_hold() {
    let f = Arc::new(Fake::default());
    let a = start_fake(f.clone()).await;
    let mut cfg = config(&[a], Some("tokenize/gemma"));
    cfg.server.max_body_bytes = 4096;
    let srv = up(cfg).await;
    for (path, body) in [
        ("/v1/completions", "not json"),
        ("/v1/completions", "[1,2]"),
        ("/v1/completions", r#"{"prompt": {"a": 1}}"#),
        ("/v1/completions", r#"{"prompt": [1, -2]}"#),
        ("/v1/chat/completions", r#"{"messages": "x"}"#),
        ("/v1/chat/completions", r#"{"messages": [{"role": "assistant", "content": "first"}]}"#),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "yes"}"#,
        ),
        ("/kvroute/route", r#"{"neither": 1}"#),
    ] {
        let (st, resp) = http(srv.addr, "POST", path, body, "").await;
        assert_eq!(st, 400, "{body}: {resp}");
        let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The template's own reason comes back.
    let (_, resp) = http(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "assistant", "content": "x"}]}"#,
        "",
    )
    .await;
    assert!(resp.contains("Conversation roles must alternate"), "{resp}");
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5000));
    let (st, _) = http(srv.addr, "POST", "/v1/completions", &big, "").await;
    assert_eq!(st, 413);
    // hyper refuses a head beyond max_header_bytes before any handler runs.
    let (st, _) = http(
        srv.addr,
        "POST",
        "/v1/completions",
        "{}",
        &format!("x-big: {}\r\n", "h".repeat(100_000)),
    )
    .await;
    assert!(st == 431 || st == 400, "{st}");
    let (st, _) = http(srv.addr, "GET", "/nope", "", "").await;
    assert_eq!(st, 404);
    let (st, _) = http(srv.addr, "GET", "/v1/completions", "", "").await;
    assert_eq!(st, 405);
    assert_eq!(f.served.load(Ordering::Relaxed), 0, "nothing bad reached the backend");
    let (st, resp) = http(srv.addr, "GET", "/v1/models", "", "").await;
    assert_eq!(st, 200);
    assert!(resp.contains("\"id\":\"m\""));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_answers_the_hashed_ids_and_changes_nothing() {
    let f = Arc::new(Fake::default());
    let a = start_fake(f.clone()).await;
    let srv = up(config(&[a], Some("tokenize/chatml"))).await;
    let tok = kvroute_tokenize::Tokenizer::from_path(testdata("tokenize/chatml")).unwrap();
    let body = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"日本の首都はどこですか？"}]}"#;
    let want = tok.encode_chat_body(&kvroute_tokenize::Json::parse(body).unwrap()).unwrap();
    let before = srv.state.router.prometheus();
    let (st, resp) = http(srv.addr, "POST", "/kvroute/route", body, "x-session-id: s1\r\n").await;
    assert_eq!(st, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert_eq!(v["worker"], a.to_string());
    let ids: Vec<u32> = serde_json::from_value(v["prompt_token_ids"].clone()).unwrap();
    assert_eq!(ids, want);
    assert_eq!(v["total_blocks"], want.len() / 16);
    assert_eq!(v["matched_blocks"], 0);
    assert!(v["explain"]["candidates"].is_array());
    assert_eq!(srv.state.router.prometheus(), before, "a dry run changes no state");
    assert_eq!(f.served.load(Ordering::Relaxed), 0, "a dry run forwards nothing");
    // Completions and token-id prompts.
    let (_, resp) = http(srv.addr, "POST", "/kvroute/route", r#"{"prompt":[1,2,3]}"#, "").await;
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert_eq!(v["prompt_token_ids"], serde_json::json!([1, 2, 3]));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_scraped_and_a_failed_scrape_is_stale() {
    let f = Arc::new(Fake::default());
    let a = start_fake(f.clone()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let srv = up(config(&[a, dead], Some("tokenize/chatml"))).await;
    let s = srv.state.clone();
    let name = a.to_string();
    wait_until(|| !s.backends.read()[&name].load_stale.load(Ordering::Relaxed), "a scrape").await;
    let dn = dead.to_string();
    assert!(s.backends.read()[&dn].load_stale.load(Ordering::Relaxed));
    assert!(s.backends.read()[&dn].scrape_failures.load(Ordering::Relaxed) > 0);
    let (st, text) = http(srv.addr, "GET", "/metrics", "", "").await;
    assert_eq!(st, 200);
    assert!(
        text.contains(&format!("kvroute_serve_backend_load_stale{{backend=\"{dn}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("kvroute_routes_total"));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_come_from_dns() {
    let f = Arc::new(Fake::default());
    let a = start_fake(f.clone()).await;
    let mut cfg = config(&[], Some("tokenize/chatml"));
    cfg.server.dns = Some(kvroute_server::DnsBackends {
        name: "localhost".into(),
        port: a.port(),
        kv_events_port: None,
        replay_port: None,
        interval_s: 0.1,
    });
    let srv = kvroute_server::start(cfg).await.unwrap();
    let s = srv.state.clone();
    let want = a.to_string();
    wait_until(|| s.backends.read().contains_key(&want), "the DNS backend").await;
    wait_until(|| s.backends.read()[&want].probed.load(Ordering::Relaxed), "its probe").await;
    let (st, resp) = http(srv.addr, "POST", "/v1/completions", r#"{"prompt":"via dns"}"#, "").await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(f.served.load(Ordering::Relaxed), 1);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_stream_in_flight() {
    let gate = Arc::new(Notify::new());
    let fake = Arc::new(Fake { gate: Some(gate.clone()), ..Fake::default() });
    fake.chunks.store(3, Ordering::Relaxed);
    let b = start_fake(fake.clone()).await;
    let srv = up(config(&[b], Some("tokenize/chatml"))).await;
    let addr = srv.addr;
    let client = tokio::spawn(async move {
        http(addr, "POST", "/v1/completions", r#"{"prompt":"drain me","stream":true}"#, "").await
    });
    let st = srv.state.clone();
    wait_until(|| st.router.inflight_requests() == 1, "the request in flight").await;
    let shut = tokio::spawn(srv.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shut.is_finished(), "shutdown waits for the stream");
    gate.notify_one();
    let (code, resp) = client.await.unwrap();
    assert_eq!(code, 200);
    assert!(resp.contains("[DONE]"), "{resp}");
    tokio::time::timeout(Duration::from_secs(5), shut).await.unwrap().unwrap();
    assert_eq!(st.router.inflight_requests(), 0);
}

/// How a raw-socket fake upstream misbehaves on completions.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Misbehave {
    /// Answers the first completion of a connection with keep-alive, then resets the
    /// connection (RST) under the next one, as a killed process's pooled socket does.
    ResetKeptAlive,
    /// Reads the request and closes the connection without an answer.
    CloseBeforeHead,
    /// Sends a streaming response head, then closes before any body byte.
    CloseAfterHead,
}

/// Reads one HTTP/1.1 request; returns its head (lowercase) and body, `None` at the end.
async fn read_request(s: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some((head, String::from_utf8_lossy(&buf[end + 4..]).into_owned()));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A fake upstream on raw sockets; returns its address and how often it misbehaved.
async fn start_raw(mode: Misbehave) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let bad = Arc::new(AtomicU64::new(0));
    let bad2 = bad.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let bad = bad2.clone();
            tokio::spawn(async move {
                let mut completions = 0;
                while let Some((head, body)) = read_request(&mut s).await {
                    let ok = |b: &str| {
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len())
                    };
                    if !head.contains("/completions") {
                        if s.write_all(ok("").as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    completions += 1;
                    match mode {
                        Misbehave::ResetKeptAlive if completions == 1 => {
                            let r = if body.contains(r#""stream":true"#) {
                                ok("data: {\"choices\":[{\"text\":\"ok\"}]}\n\ndata: [DONE]\n\n")
                            } else {
                                ok(r#"{"choices":[{"text":"ok"}]}"#)
                            };
                            if s.write_all(r.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Misbehave::ResetKeptAlive => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            // Linger 0 never blocks: the close is an immediate RST.
                            #[allow(deprecated)]
                            let _ = s.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        Misbehave::CloseBeforeHead => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Misbehave::CloseAfterHead => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            let h = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                            let _ = s.write_all(h.as_bytes()).await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, bad)
}

/// Failures before the first byte lose nothing: a pooled keep-alive connection reset
/// under the request, a connection closed before the response head, and one closed after
/// the head but before any body byte are retried once on the other worker, and the
/// misbehaving backend is marked unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_closes_before_the_first_byte_are_retried() {
    let modes = [Misbehave::ResetKeptAlive, Misbehave::CloseBeforeHead, Misbehave::CloseAfterHead];
    for mode in modes {
        let (bad_addr, bad) = start_raw(mode).await;
        let good = Arc::new(Fake::default());
        good.chunks.store(2, Ordering::Relaxed);
        let ga = start_fake(good.clone()).await;
        let mut cfg = config(&[bad_addr, ga], Some("tokenize/chatml"));
        cfg.server.health_interval_ms = 60_000; // probes must not hide the marking
        cfg.server.scrape_interval_ms = 60_000;
        cfg.router.profile = kvroute::router::ProfileSpec::Preset("round-robin".into());
        let srv = up(cfg).await;
        for i in 0..8 {
            // Round robin alternates workers: each sees streaming and complete requests.
            let stream = i % 4 < 2;
            let body = format!(r#"{{"prompt":"x{i}","stream":{stream}}}"#);
            let (st, resp) = http(srv.addr, "POST", "/v1/completions", &body, "").await;
            assert_eq!(st, 200, "{mode:?} request {i}: {resp}");
            let done = if stream { "[DONE]" } else { "\"choices\"" };
            assert!(body_of(&resp).contains(done), "{mode:?} request {i}: {resp}");
        }
        assert!(bad.load(Ordering::Relaxed) >= 1, "{mode:?}: the fake never misbehaved");
        let healthy =
            srv.state.backends.read()[&bad_addr.to_string()].healthy.load(Ordering::Relaxed);
        assert!(!healthy, "{mode:?}: the backend is marked unhealthy");
        assert!(srv.state.metrics.retries.load(Ordering::Relaxed) >= 1);
        let st = srv.state.clone();
        wait_until(|| st.router.inflight_requests() == 0, "zero in flight").await;
        srv.shutdown().await;
    }
}

/// A multi-turn chat resends its history: the second turn's segments come from the
/// token-id cache (counted at /metrics) and its ids equal the uncached tokenizer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_turn_of_a_chat_reuses_cached_token_ids() {
    let f = Arc::new(Fake::default());
    let a = start_fake(f.clone()).await;
    let srv = up(config(&[a], Some("tokenize/chatml"))).await;
    let tok = kvroute_tokenize::Tokenizer::from_path(testdata("tokenize/chatml")).unwrap();
    let turn1 = serde_json::json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime above  100.\n"}]});
    let mut turn2 = turn1.clone();
    let msgs = turn2["messages"].as_array_mut().unwrap();
    msgs.push(serde_json::json!({"role": "assistant", "content": " 101 <|im_end|> ok"}));
    msgs.push(serde_json::json!({"role": "user", "content": "Another, 東京?"}));
    let hits = || srv.state.tokenizer.as_ref().unwrap().segment_cache_stats().unwrap().hits;
    for (i, body) in [&turn1, &turn2].into_iter().enumerate() {
        let want = tok
            .encode_chat_body(&kvroute_tokenize::Json::parse(&body.to_string()).unwrap())
            .unwrap();
        let (st, resp) = http(srv.addr, "POST", "/kvroute/route", &body.to_string(), "").await;
        assert_eq!(st, 200, "{resp}");
        let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["prompt_token_ids"].clone()).unwrap();
        assert_eq!(ids, want, "turn {i}");
        if i == 0 {
            assert_eq!(hits(), 0);
        }
    }
    assert!(hits() >= 4, "the history's segments were cached");
    let (_, m) = http(srv.addr, "GET", "/metrics", "", "").await;
    assert!(m.contains("kvroute_serve_token_cache_hits_total"), "{m}");
    srv.shutdown().await;
}
