//! kvroute-emulate: one process = one emulated vLLM replica, faithful enough on the wire
//! that a router cannot tell it from vLLM 0.33, for end-to-end tests without a GPU.
//!
//! - [`http`]: vLLM's OpenAI endpoints (`/v1/completions`, `/v1/chat/completions`,
//!   streaming and not, `/v1/models`, `/health`, `/tokenize`), `/metrics`, and fault
//!   switches under `/admin/`.
//! - [`engine`]: continuous batching over a vLLM block pool, timed by the simulator's engine
//!   model ([`kvroute_sim::EngineConfig`]) scaled by `--time-scale`.
//! - [`publisher`]: KV events as vLLM's `ZmqEventPublisher` sends them (PUB + replay ROUTER).
//! - [`metrics`]: vLLM's Prometheus metric names, types, labels and buckets.
//!
//! It holds no routing logic: it is the thing a router routes to.

pub mod engine;
pub mod http;
pub mod metrics;
pub mod publisher;
pub mod tokenizer;

use kvroute::hash::{BlockHasher, HashAlgo, HashConfig};
use kvroute_sim::EngineConfig;
use std::net::SocketAddr;
use std::sync::Arc;

/// `kvroute emulate`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// HTTP address of the OpenAI API and /metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// ZeroMQ PUB endpoint of the KV events (bound; vLLM's kv-events-config `endpoint`).
    #[arg(long = "kv-events", value_name = "tcp://HOST:PORT")]
    pub kv_events: String,
    /// ZeroMQ ROUTER endpoint answering replay requests (vLLM's `replay_endpoint`).
    #[arg(long = "replay-endpoint", value_name = "tcp://HOST:PORT")]
    pub replay_endpoint: String,
    /// Tokenizer for text prompts and chat: a tokenizer.json or a model directory.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<String>,
    /// Served model name.
    #[arg(long, default_value = "kvroute-emulated")]
    pub model: String,
    /// KV blocks of the engine including vLLM's null block (vLLM num_gpu_blocks); default:
    /// the estimate for --engine-model on --engine-gpu.
    #[arg(long = "capacity-blocks", value_name = "N")]
    pub capacity_blocks: Option<u32>,
    /// Wall-clock seconds per model second: 0.01 runs the engine model 100 times faster.
    /// Reported durations (the TTFT histogram) are in model seconds.
    #[arg(long = "time-scale", default_value_t = 1.0, value_name = "X")]
    pub time_scale: f64,
    /// vLLM's --prefix-caching-hash-algo: sha256, sha256_cbor, xxhash or xxhash_cbor.
    #[arg(long = "hash-algo", default_value = "sha256", value_name = "A")]
    pub hash_algo: String,
    /// The engine's PYTHONHASHSEED (unset: vLLM's default none-hash; required for xxhash*).
    #[arg(long = "hash-seed", value_name = "S")]
    pub hash_seed: Option<String>,
    /// KV event topic (vLLM's kv-events-config `topic`; its default is ""). Per-pod
    /// topics such as llm-d's `kv@<pod-ip>:<port>@<model>` work as well: a router
    /// subscribed to "" receives every one.
    #[arg(long, default_value = "", value_name = "T")]
    pub topic: String,
    /// Tokens per KV block (vLLM --block-size).
    #[arg(long = "block-size", default_value_t = 16)]
    pub block_size: usize,
    /// Model preset of the time and capacity model (see `kvroute simulate`).
    #[arg(long = "engine-model", default_value = "llama-3-8b")]
    pub engine_model: String,
    /// GPU preset of the time and capacity model.
    #[arg(long = "engine-gpu", default_value = "h100-80gb")]
    pub engine_gpu: String,
    /// Longest prompt + output (vLLM --max-model-len).
    #[arg(long = "max-model-len", default_value_t = 32_768)]
    pub max_model_len: usize,
    /// Output tokens of a request that does not give max_tokens.
    #[arg(long = "default-max-tokens", default_value_t = 16)]
    pub default_max_tokens: usize,
}

/// A running emulator.
pub struct Emulator {
    addr: SocketAddr,
    engine: engine::Engine,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").field("addr", &self.addr).finish()
    }
}

/// The engine figures `args` select.
pub fn engine_config(args: &Args) -> Result<EngineConfig, String> {
    let mut cfg = EngineConfig::preset(&args.engine_model, &args.engine_gpu, args.block_size)
        .map_err(|e| e.to_string())?;
    if let Some(n) = args.capacity_blocks {
        cfg.num_gpu_blocks = n;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

impl Emulator {
    /// Binds every socket and starts serving in the background.
    pub fn start(args: Args) -> Result<Self, String> {
        let algo: HashAlgo = args.hash_algo.parse().map_err(|e: kvroute::Error| e.to_string())?;
        if !algo.is_vllm() {
            return Err(format!("--hash-algo {algo}: vLLM has no such scheme"));
        }
        let hasher = BlockHasher::new(HashConfig {
            algo,
            block_size: args.block_size,
            hash_seed: args.hash_seed.clone(),
            ..HashConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let tokenizer = args.tokenizer.as_deref().map(tokenizer::load).transpose()?;
        let engine_cfg = engine_config(&args)?;
        let metrics = Arc::new(metrics::Metrics::new(&args.model));
        let publisher =
            publisher::Publisher::bind(&args.kv_events, &args.replay_endpoint, &args.topic)?;
        let engine = engine::Engine::start(
            engine::EngineSettings { engine: engine_cfg, time_scale: args.time_scale },
            publisher,
            Arc::clone(&metrics),
        )?;
        let api = http::ApiSettings {
            model: args.model.clone(),
            max_model_len: args.max_model_len,
            default_max_tokens: args.default_max_tokens.max(1),
        };
        let state = Arc::new(http::AppState::new(engine.clone(), hasher, metrics, tokenizer, api));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        // Bound here with std so that start() works inside or outside a tokio runtime.
        let std_listener = std::net::TcpListener::bind(&args.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        std_listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(state);
        let thread = std::thread::Builder::new()
            .name("emulate-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.await;
                        })
                        .await;
                });
                rt.shutdown_timeout(std::time::Duration::from_millis(200));
            })
            .map_err(|e| format!("spawning the HTTP thread: {e}"))?;
        Ok(Emulator { addr, engine, shutdown: Some(tx), thread: Some(thread) })
    }

    /// The bound HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine (for tests).
    pub fn engine(&self) -> &engine::Engine {
        &self.engine
    }

    /// Stops serving and the engine.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.engine.shutdown();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// `kvroute emulate`: serves until SIGINT/SIGTERM.
pub fn run(args: Args) -> Result<(), String> {
    let listen = args.listen.clone();
    let (kv, replay) = (args.kv_events.clone(), args.replay_endpoint.clone());
    let emu = Emulator::start(args)?;
    eprintln!(
        "kvroute emulate: serving on http://{} (requested {listen}), KV events on {kv}, replay on {replay}",
        emu.addr()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("signal handler: {e}"))?;
    let _ = rx.recv();
    emu.stop();
    Ok(())
}
