//! `kvroute serve`: a KV-cache-aware, OpenAI-compatible HTTP router in front of vLLM.
//!
//! The server is a thin shell around [`kvroute::router::Router`], which makes every
//! routing decision. Per request it reads the body, computes the prompt's token ids
//! exactly as vLLM would ([`kvroute_tokenize`]), asks the router for a worker, forwards
//! the request unchanged and streams the answer back chunk by chunk, reporting the
//! request's lifecycle (`on_routed`, `on_first_token`, `on_finished`) to the router.
//! Around it: one KV-event subscriber per backend (kvroute-zmq), `/metrics` scrapes for
//! load, `/health` probes, one retry on a refused connection or a 5xx before the first
//! byte, limits and timeouts, DNS discovery and graceful shutdown.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `POST /kvroute/route` (dry run), `GET /health`, `GET /ready`, `GET /metrics`.

pub mod backends;
pub mod config;
pub mod metrics;
mod proxy;

/// Entry points for benches (not a stable interface).
#[doc(hidden)]
pub mod bench {
    /// Parses a request body as the request path does (`/v1/completions` when
    /// `completion`, else chat) and returns its token ids.
    pub fn prepare(state: &crate::State, body: &[u8], completion: bool) -> Option<Vec<u32>> {
        let kind =
            if completion { crate::proxy::Kind::Completion } else { crate::proxy::Kind::Chat };
        crate::proxy::prepare_body(state, body, Some(kind)).ok().map(|p| p.tokens)
    }

    /// When set, token-id prompts are read by the serde pass alone (what the server did
    /// before the byte scanner), for A/B runs of the serve bench in one process.
    pub static SERDE_ONLY: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// When set, token-id prompts are read by the byte scanner without its vector block
    /// readers (AVX-512, AVX2): the SWAR loop every CPU has (`ids::scan_portable`), then
    /// serde, for A/B runs of the serve bench in one process.
    pub static PORTABLE_IDS: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// When set, token-id prompts are read by the byte scanner with its AVX2 block reader
    /// (`ids::scan_avx2`: what CPUs with AVX2 but without AVX-512 VBMI2 run; the SWAR loop
    /// on CPUs without AVX2), then serde, for A/B runs of the serve bench in one process.
    pub static AVX2_IDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
}

pub use config::{DnsBackends, ServeConfig, ServerConfig};

use backends::Backend;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvroute::router::{Mode, Router};
use kvroute_tokenize::Tokenizer;
use kvroute_zmq::RouterSink;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The shared state of a running server.
pub struct State {
    /// The server section of the configuration.
    pub cfg: ServerConfig,
    /// The router.
    pub router: Arc<Router>,
    /// The tokenizer, if configured.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Backends by worker name.
    pub backends: RwLock<BTreeMap<String, Arc<Backend>>>,
    /// Backends that came from DNS (the others are static).
    pub(crate) dns_backends: Mutex<BTreeSet<String>>,
    /// The upstream HTTP client.
    pub(crate) client: Client<HttpConnector, Full<Bytes>>,
    /// The KV-event sink shared by the subscribers.
    pub sink: Arc<RouterSink>,
    /// Counters.
    pub metrics: metrics::Metrics,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// A started server. Drop does not stop it: call [`Running::shutdown`].
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its state (router, backends, metrics).
    pub state: Arc<State>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to the drain timeout), stops the
    /// backends' tasks and subscribers.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        backends::stop_all(&self.state).await;
    }
}

/// Checks the configuration and builds the router and tokenizer.
fn build_state(cfg: ServeConfig) -> Result<Arc<State>, String> {
    let ServeConfig { router: rcfg, server: scfg } = cfg;
    if scfg.backends.is_empty() && scfg.dns.is_none() {
        return Err("no backends: give --backend URL (or server.backends / server.dns)".into());
    }
    let n = scfg.backends.len();
    for (flag, list) in
        [("--kv-events", &scfg.kv_events), ("--replay-endpoint", &scfg.replay_endpoints)]
    {
        if !list.is_empty() && list.len() != n {
            return Err(format!("give one {flag} per --backend ({} for {n}) or none", list.len()));
        }
    }
    let tokenizer = match &scfg.tokenizer {
        Some(p) => {
            let mut t =
                Tokenizer::from_path(p).map_err(|e| format!("tokenizer {}: {e}", p.display()))?;
            if let Some(ct) = &scfg.chat_template {
                let src = std::fs::read_to_string(ct)
                    .map_err(|e| format!("chat template {}: {e}", ct.display()))?;
                t.set_chat_template(&src)
                    .map_err(|e| format!("chat template {}: {e}", ct.display()))?;
            }
            match scfg.chat_template_content_format.as_deref() {
                None | Some("auto") => {}
                Some("string") => {
                    t.set_content_format(Some(kvroute_tokenize::ContentFormat::String))
                }
                Some("openai") => {
                    t.set_content_format(Some(kvroute_tokenize::ContentFormat::OpenAi))
                }
                Some(o) => {
                    return Err(format!(
                        "chat_template_content_format {o:?}: use string, openai or auto"
                    ))
                }
            }
            t.exclude_tools_when_tool_choice_none = scfg.exclude_tools_when_tool_choice_none;
            if let Err(why) = t.enable_segment_cache(scfg.token_cache_bytes) {
                tracing::warn!(%why, "chat token-id cache off: this tokenizer cannot be split exactly");
            }
            if let Some(kw) = &scfg.default_chat_template_kwargs {
                let j =
                    kvroute_tokenize::Json::parse(&kw.to_string()).map_err(|e| e.to_string())?;
                match j {
                    kvroute_tokenize::Json::Object(kv) => t.default_chat_template_kwargs = kv,
                    _ => return Err("default_chat_template_kwargs must be an object".into()),
                }
            }
            Some(Arc::new(t))
        }
        None if rcfg.mode == Mode::Precise => {
            return Err("precise mode needs the model's tokenizer (--tokenizer DIR): without it \
                        the router's block keys can never match the engines' KV events. Give \
                        --tokenizer, or --mode approximate to route text prompts by load only"
                .into())
        }
        None => None,
    };
    let router = Arc::new(Router::new(rcfg).map_err(|e| format!("router config: {e}"))?);
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_millis(scfg.connect_timeout_ms.max(1))));
    http.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(http);
    let sink = Arc::new(RouterSink::new(router.clone()));
    Ok(Arc::new(State {
        cfg: scfg,
        router,
        tokenizer,
        backends: RwLock::new(BTreeMap::new()),
        dns_backends: Mutex::new(BTreeSet::new()),
        client,
        sink,
        metrics: metrics::Metrics::default(),
    }))
}

/// Starts the server on the current tokio runtime (multi-threaded).
pub async fn start(cfg: ServeConfig) -> Result<Running, String> {
    let state = build_state(cfg)?;
    let listener = TcpListener::bind(&state.cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", state.cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    for (i, b) in state.cfg.backends.clone().iter().enumerate() {
        let ev = state.cfg.kv_events.get(i).cloned();
        let rp = state.cfg.replay_endpoints.get(i).cloned();
        if let Err(e) = backends::add_backend(&state, b, ev, rp) {
            backends::stop_all(&state).await;
            return Err(e);
        }
    }
    // The DNS loop ends with the accept loop.
    let dns = state.cfg.dns.clone().map(|dns| tokio::spawn(backends::dns_loop(state.clone(), dns)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(state.clone(), listener, stop_rx, dns));
    tracing::info!(%addr, "kvroute serve listening");
    Ok(Running { addr, state, stop: stop_tx, task })
}

async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    dns: Option<tokio::task::JoinHandle<()>>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let max_head = state.cfg.max_header_bytes.max(8192);
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let svc = hyper::service::service_fn(move |req| proxy::handle(st.clone(), peer, req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(max_head)
                    .serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = fut.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if let Some(h) = dns {
        h.abort();
    }
    let drain = Duration::from_secs_f64(state.cfg.drain_timeout_s.clamp(0.0, 86_400.0));
    tracing::info!(inflight = state.router.inflight_requests(), "draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout; closing remaining connections"),
    }
}

/// Runs the server until Ctrl-C or SIGTERM, then shuts down gracefully. Logs go to
/// stderr through `tracing` (the caller installs a subscriber).
pub fn run_blocking(cfg: ServeConfig) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let running = start(cfg).await?;
        eprintln!("kvroute serve: listening on {}", running.addr);
        wait_for_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
