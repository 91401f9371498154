//! `kvroute serve` overhead and tokenization throughput (issue 11's targets: router
//! overhead per request p50 <= 100 us and p99 <= 1 ms at 2,000 requests/s with 8,192-token
//! prompts against in-process fake backends; tokens/s of tokenizing 8,192-token chats).
//!
//! Overhead: 4 in-process fake vLLM backends (answer at once) behind a real `kvroute
//! serve` (precise mode, the chatml tokenizer of testdata/tokenize, the default profile),
//! driven open-loop at `--rate` requests/s (default 2,000) for `--seconds` (default 5) by
//! a pool of keep-alive HTTP/1.1 connections, with `/v1/completions` bodies of 8,192
//! token ids (32 shared prefixes, so the prefix scorer works). The server's own overhead
//! samples (whole body read -> upstream request sent, tokenization excluded; the
//! `kvroute_serve_overhead_seconds` histogram) give p50/p99; the client's end-to-end
//! latencies through the router and straight to a backend are reported beside them.
//!
//! Request path: the body parse and the routing decision per 8,192-token request, in a
//! loop, as thread CPU time and wall time.
//!
//! Tokenization: 8,192-token multi-turn chats through the template and the tokenizer
//! (`Tokenizer::encode_chat_body`), and an 8,192-token completion, in tokens/s.
//!
//! Run: `cargo bench -p kvroute-benches --bench serve -- [--seconds S] [--rate R]
//! [--compare]` (`--compare`: first a run with the serde pass alone, the token-id reader
//! before the byte scanner, then one with the scanner's SWAR loop alone (no AVX-512 or AVX2),
//! then one with its AVX2 block reader (no AVX-512), then the normal run, all under the
//! same load).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvroute_benches::{fmt_ns, quantile};
use kvroute_tokenize::{Json, Tokenizer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(p)
}

async fn fake(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    let body = match path.as_str() {
        "/metrics" => "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.1\n",
        "/health" => "",
        _ => r#"{"choices":[{"text":"ok"}]}"#,
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::OK;
    Ok(r)
}

async fn start_fake() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(fake);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn q(v: &mut [u64], p: f64) -> String {
    fmt_ns(quantile(v, p) as f64)
}

async fn drive(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    bodies: &[Bytes],
    rate: f64,
    seconds: f64,
) -> (Vec<u64>, usize) {
    let n = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let req = Request::post(format!("{base}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(bodies[i % bodies.len()].clone()))
            .unwrap();
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = match c.request(req).await {
                Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                Err(_) => false,
            };
            (t.elapsed().as_nanos() as u64, ok)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    for t in tasks {
        let (ns, ok) = t.await.unwrap();
        lat.push(ns);
        failed += usize::from(!ok);
    }
    (lat, failed)
}

fn tokenization() {
    let tok = Tokenizer::from_path(testdata("tokenize/chatml")).unwrap();
    // A multi-turn chat of about 8,192 tokens.
    let para = "Routing requests to the worker that already holds the prefix saves prefill time. \
                Le cache KV garde les clés et les valeurs des jetons déjà vus. 東京の天気は晴れです。 ";
    let mut msgs =
        vec![serde_json::json!({"role": "system", "content": "You are a helpful assistant."})];
    let mut turn = 0;
    let body = loop {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        msgs.push(serde_json::json!({"role": role, "content": para.repeat(3)}));
        turn += 1;
        let b = serde_json::json!({"messages": msgs}).to_string();
        let j = Json::parse(&b).unwrap();
        if tok.encode_chat_body(&j).unwrap().len() >= 8192 {
            break j;
        }
    };
    let ids = tok.encode_chat_body(&body).unwrap();
    let iters = 40;
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(tok.encode_chat_body(&body).unwrap());
    }
    let chat = t.elapsed().as_secs_f64() / iters as f64;
    let req = kvroute_tokenize::ChatRequest::from_body(&body).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(tok.render_chat(&req).unwrap());
    }
    let render = t.elapsed().as_secs_f64() / iters as f64;
    let text = tok.render_chat(&req).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(tok.encode(&text, false).unwrap());
    }
    let encode = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "tokenize chat: {} tokens, {} messages: {:.2} ms per request ({:.2} M tokens/s); template render {:.3} ms, encode {:.2} ms",
        ids.len(),
        msgs.len(),
        chat * 1e3,
        ids.len() as f64 / chat / 1e6,
        render * 1e3,
        encode * 1e3
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = arg("--seconds", 5.0);
    let rate = arg("--rate", 2000.0);
    tokenization();
    // The router runs on its own runtime, as its own process would; the load generator
    // and the fake backends share another. (They still share the machine's cores.)
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(arg("--server-threads", 2.0) as usize)
        .thread_name("serve")
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut backends = Vec::new();
        for _ in 0..4 {
            backends.push(start_fake().await);
        }
        let mut cfg = kvroute_server::ServeConfig::default();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.server.backends = backends.iter().map(|a| format!("http://{a}")).collect();
        cfg.server.tokenizer = Some(testdata("tokenize/chatml"));
        let srv = server_rt.spawn(kvroute_server::start(cfg)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 8,192-token prompts as token ids: 32 shared 6,144-token prefixes, unique tails.
        let bodies: Vec<Bytes> = (0..256u32)
            .map(|i| {
                let p = i % 32;
                let ids: Vec<u32> = (0..8192u32).map(|t| if t < 6144 { (p * 7919 + t) % 600 } else { (i * 31 + t) % 600 }).collect();
                Bytes::from(serde_json::json!({"model": "m", "prompt": ids, "max_tokens": 1}).to_string())
            })
            .collect();
        cpu_breakdown(&srv.state, &bodies);
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(http);
        // Warm up connections, then measure.
        let _ = drive(&client, &format!("http://{}", srv.addr), &bodies, rate, 0.5).await;
        // `--compare`: runs with the token-id reader switched back to older paths first, then
        // the normal run, under the same load.
        if std::env::args().any(|a| a == "--compare") {
            use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
            // The serde pass alone (the reader before the byte scanner), the byte scanner's
            // portable SWAR loop alone (what CPUs without AVX2 run), then its AVX2 block
            // reader (what CPUs with AVX2 but without AVX-512 VBMI2 run).
            let avx2_label = if kvroute_tokenize::ids::scan_has_avx2() {
                "AVX2 scanner, no AVX-512"
            } else {
                "AVX2 scanner requested, but this CPU has no AVX2: SWAR"
            };
            let switches: [(&AtomicBool, &str); 3] = [
                (&kvroute_server::bench::SERDE_ONLY, "serde pass only"),
                (&kvroute_server::bench::PORTABLE_IDS, "SWAR scanner, no AVX-512 or AVX2"),
                (&kvroute_server::bench::AVX2_IDS, avx2_label),
            ];
            for (switch, label) in switches {
                switch.store(true, Relaxed);
                srv.state.metrics.overhead_samples.lock().clear();
                let load0 = loadavg();
                let (_, failed) = drive(&client, &format!("http://{}", srv.addr), &bodies, rate, seconds).await;
                let mut over = srv.state.metrics.overhead_samples.lock().clone();
                println!(
                    "[{label}] serve overhead at {rate} req/s for {seconds} s: p50 {}, p99 {}, p999 {} ({} samples, {failed} failed); load average before / after: {load0} / {}",
                    q(&mut over, 0.5),
                    q(&mut over, 0.99),
                    q(&mut over, 0.999),
                    over.len(),
                    loadavg()
                );
                switch.store(false, Relaxed);
            }
        }
        srv.state.metrics.overhead_samples.lock().clear();
        srv.state.metrics.body_read_samples.lock().clear();
        let load0 = loadavg();
        let sched0 = schedstat("serve");
        let (mut via, failed) = drive(&client, &format!("http://{}", srv.addr), &bodies, rate, seconds).await;
        let sched1 = schedstat("serve");
        let mut over = srv.state.metrics.overhead_samples.lock().clone();
        let mut body_read = srv.state.metrics.body_read_samples.lock().clone();
        let (mut direct, _) = drive(&client, &format!("http://{}", backends[0]), &bodies, rate, seconds.min(2.0)).await;
        println!(
            "serve overhead at {rate} req/s for {seconds} s, 8,192-token prompts, 4 backends: p50 {}, p99 {}, p999 {} ({} samples, {failed} failed)",
            q(&mut over, 0.5),
            q(&mut over, 0.99),
            q(&mut over, 0.999),
            over.len()
        );
        println!(
            "  of which waiting for the whole body: p50 {}, p99 {}; load average before / after the run: {load0} / {}",
            q(&mut body_read, 0.5),
            q(&mut body_read, 0.99),
            loadavg()
        );
        let n = via.len().max(1) as f64;
        println!(
            "  the router's threads per request (all of its work, whole run, /proc schedstat): on a core {}, runnable but waiting for a core {}",
            fmt_ns((sched1.0 - sched0.0) as f64 / n),
            fmt_ns((sched1.1 - sched0.1) as f64 / n)
        );
        println!(
            "client end to end: through kvroute serve p50 {}, p99 {}; straight to a backend p50 {}, p99 {}",
            q(&mut via, 0.5),
            q(&mut via, 0.99),
            q(&mut direct, 0.5),
            q(&mut direct, 0.99)
        );
        server_rt.spawn(srv.shutdown()).await.unwrap();
    });
}

/// The request path's CPU work, one step at a time, in a loop on this thread: the body's
/// parse (token ids out of 40 KB of JSON) and the routing decision (hash, index match,
/// scores; `preview`, which changes no state).
fn cpu_breakdown(state: &kvroute_server::State, bodies: &[Bytes]) {
    let iters = 2000;
    let (w0, c0) = (Instant::now(), thread_cpu_ns());
    let mut toks = Vec::new();
    for i in 0..iters {
        toks = kvroute_server::bench::prepare(state, &bodies[i % bodies.len()], true).unwrap();
    }
    let parse = (w0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
    assert_eq!(toks.len(), 8192);
    // The serde_json pass the server ran before the byte scanner, for comparison.
    let (w0, c0) = (Instant::now(), thread_cpu_ns());
    for i in 0..iters {
        std::hint::black_box(kvroute_tokenize::ids::parse_serde(&bodies[i % bodies.len()]));
    }
    let serde = (w0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
    // The byte scanner without its vector block readers (AVX-512, AVX2).
    let (w0, c0) = (Instant::now(), thread_cpu_ns());
    for i in 0..iters {
        std::hint::black_box(kvroute_tokenize::ids::scan_portable(&bodies[i % bodies.len()]));
    }
    let swar = (w0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
    let (w0, c0) = (Instant::now(), thread_cpu_ns());
    for _ in 0..iters {
        let req = kvroute::router::Request {
            tokens: &toks,
            session: Some("s"),
            lora: None,
            extras: None,
            now_ms: None,
        };
        std::hint::black_box(state.router.preview(&req).unwrap());
    }
    let route = (w0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
    // What a proxied request does: route (records the prediction), on_routed, on_finished.
    let (w0, c0) = (Instant::now(), thread_cpu_ns());
    for i in 0..iters {
        let t = kvroute_server::bench::prepare(state, &bodies[i % bodies.len()], true).unwrap();
        let req = kvroute::router::Request {
            tokens: &t,
            session: Some("s"),
            lora: None,
            extras: None,
            now_ms: None,
        };
        let d = state.router.route(&req).unwrap();
        let _ = state.router.on_routed(&d);
        let _ = state.router.on_finished(d.request_id);
    }
    let live = (w0.elapsed().as_nanos() as f64, (thread_cpu_ns() - c0) as f64);
    // The same three router calls timed one by one (thread CPU time, summed over the
    // loop): which of them the router's share of a request is.
    let (mut t_route, mut t_routed, mut t_finished) = (0u64, 0u64, 0u64);
    for i in 0..iters {
        let t = kvroute_server::bench::prepare(state, &bodies[i % bodies.len()], true).unwrap();
        let req = kvroute::router::Request {
            tokens: &t,
            session: Some("s"),
            lora: None,
            extras: None,
            now_ms: None,
        };
        let c0 = thread_cpu_ns();
        let d = state.router.route(&req).unwrap();
        let c1 = thread_cpu_ns();
        let _ = state.router.on_routed(&d);
        let c2 = thread_cpu_ns();
        let _ = state.router.on_finished(d.request_id);
        let c3 = thread_cpu_ns();
        t_route += c1 - c0;
        t_routed += c2 - c1;
        t_finished += c3 - c2;
    }
    let n = iters as f64;
    println!(
        "  router calls one by one (thread CPU time per request): route {}, on_routed {}, on_finished {}",
        fmt_ns(t_route as f64 / n),
        fmt_ns(t_routed as f64 / n),
        fmt_ns(t_finished as f64 / n)
    );
    println!(
        "request path per 8,192-token request (thread CPU time; wall time on this loaded machine; scanner: AVX-512 {}): body parse {} ({}) [serde_json pass {} ({}); SWAR scanner, no AVX-512 or AVX2, {} ({})], route (preview) {} ({}); parse + route + on_routed + on_finished (as a proxied request) {} ({})",
        kvroute_tokenize::ids::scan_uses_avx512(),
        fmt_ns(parse.1 / n),
        fmt_ns(parse.0 / n),
        fmt_ns(serde.1 / n),
        fmt_ns(serde.0 / n),
        fmt_ns(swar.1 / n),
        fmt_ns(swar.0 / n),
        fmt_ns(route.1 / n),
        fmt_ns(route.0 / n),
        fmt_ns(live.1 / n),
        fmt_ns(live.0 / n)
    );
}

/// The summed (time on a CPU, time runnable and waiting for a CPU), nanoseconds, of this
/// process's threads whose name starts with `prefix` (Linux `/proc/self/task/*/schedstat`;
/// zeros elsewhere).
fn schedstat(prefix: &str) -> (u64, u64) {
    let mut sum = (0u64, 0u64);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return sum };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let st = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut f = st.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        sum.0 += f.next().unwrap_or(0);
        sum.1 += f.next().unwrap_or(0);
    }
    sum
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// This thread's CPU time (time it ran, not time it waited for a core), nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is valid on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
