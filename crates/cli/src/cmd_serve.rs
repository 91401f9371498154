//! `kvroute serve`: the OpenAI-compatible router in front of vLLM (crate kvroute-server).

use crate::CliError;
use kvroute::router::{Mode, ProfileSpec};
use kvroute_server::ServeConfig;
use std::path::PathBuf;

/// Arguments of `kvroute serve`. Flags override the configuration file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// A vLLM replica's base URL (`http://host:port`); repeat for each. Its worker name
    /// is its `host:port`.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// The model directory (tokenizer.json, tokenizer_config.json) or a tokenizer.json.
    /// Required in precise mode.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// The scoring profile (a preset name).
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Where the router's cache picture comes from.
    #[arg(long, value_name = "precise|approximate|hybrid")]
    mode: Option<String>,
    /// Each backend's KV-event PUB endpoint (`tcp://host:port`), in --backend order.
    #[arg(long = "kv-events", value_name = "ENDPOINT", num_args = 1..)]
    kv_events: Vec<String>,
    /// Each backend's replay endpoint, in --backend order.
    #[arg(long = "replay-endpoint", value_name = "ENDPOINT", num_args = 1..)]
    replay_endpoints: Vec<String>,
    /// A configuration file (JSON, or TOML if it ends in .toml): `router` (RouterConfig)
    /// and `server` sections.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The ZeroMQ topic of the KV events, a prefix ("", the default, receives every topic).
    #[arg(long)]
    topic: Option<String>,
    /// Hash scheme, as in `kvroute listen` (xxh3, sha256, sha256_cbor, xxhash, xxhash_cbor).
    #[arg(long)]
    hash_algo: Option<kvroute::hash::HashAlgo>,
    /// The engines' PYTHONHASHSEED (vLLM hash schemes).
    #[arg(long, value_name = "S")]
    hash_seed: Option<String>,
    /// Tokens per block (vLLM's --block-size).
    #[arg(long, value_name = "N")]
    block_size: Option<usize>,
    /// Log filter (tracing's EnvFilter syntax; RUST_LOG also works).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
}

fn build(args: &Args) -> Result<ServeConfig, CliError> {
    let mut cfg = match &args.config {
        Some(p) => ServeConfig::from_file(p).map_err(CliError)?,
        None => ServeConfig::default(),
    };
    if let Some(l) = &args.listen {
        cfg.server.listen = l.clone();
    }
    if !args.backends.is_empty() {
        cfg.server.backends = args.backends.clone();
    }
    if !args.kv_events.is_empty() {
        cfg.server.kv_events = args.kv_events.clone();
    }
    if !args.replay_endpoints.is_empty() {
        cfg.server.replay_endpoints = args.replay_endpoints.clone();
    }
    if let Some(t) = &args.tokenizer {
        cfg.server.tokenizer = Some(t.clone());
    }
    if let Some(t) = &args.topic {
        cfg.server.topic = Some(t.clone());
    }
    if let Some(p) = &args.profile {
        cfg.router.profile = ProfileSpec::Preset(p.clone());
    }
    if let Some(m) = &args.mode {
        cfg.router.mode = match m.as_str() {
            "precise" => Mode::Precise,
            "approximate" => Mode::Approximate,
            "hybrid" => Mode::Hybrid,
            o => return Err(CliError(format!("--mode {o:?}: use precise, approximate or hybrid"))),
        };
    }
    if let Some(h) = args.hash_algo {
        cfg.router.hash_algo = h;
    }
    if let Some(s) = &args.hash_seed {
        cfg.router.hash_seed = Some(s.clone());
    }
    if let Some(b) = args.block_size {
        cfg.router.block_size = b;
    }
    Ok(cfg)
}

/// Runs `kvroute serve` until Ctrl-C or SIGTERM.
pub fn run(args: Args) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .map_err(|e| CliError(format!("--log {:?}: {e}", args.log)))?;
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let cfg = build(&args)?;
    kvroute_server::run_blocking(cfg).map_err(CliError)
}
