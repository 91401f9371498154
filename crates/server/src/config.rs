//! The server's configuration: the `server` section of the configuration file, next to
//! the router's (`router`), in JSON or TOML.

use kvroute::router::RouterConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Backends found through DNS: every A/AAAA record of `name` is a backend on `port` (a
/// Kubernetes headless Service has one record per ready pod).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsBackends {
    /// The DNS name to resolve.
    pub name: String,
    /// The backends' HTTP port.
    pub port: u16,
    /// The ZeroMQ PUB port of each backend's KV events (`tcp://IP:PORT`), if any.
    #[serde(default)]
    pub kv_events_port: Option<u16>,
    /// The ZeroMQ replay port of each backend, if any.
    #[serde(default)]
    pub replay_port: Option<u16>,
    /// Seconds between resolutions.
    #[serde(default = "default_dns_interval")]
    pub interval_s: f64,
}

fn default_dns_interval() -> f64 {
    5.0
}

/// The `server` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// Backend base URLs (`http://host:port`); the worker name of each is `host:port`.
    pub backends: Vec<String>,
    /// Backends resolved from DNS (in addition to `backends`).
    pub dns: Option<DnsBackends>,
    /// A model directory or `tokenizer.json` (required in precise mode).
    pub tokenizer: Option<PathBuf>,
    /// A chat template file that replaces the tokenizer's (vLLM's `--chat-template`).
    pub chat_template: Option<PathBuf>,
    /// `"string"` or `"openai"` to force the content format (vLLM's
    /// `--chat-template-content-format`); detected from the template by default.
    pub chat_template_content_format: Option<String>,
    /// vLLM's `--default-chat-template-kwargs`.
    pub default_chat_template_kwargs: Option<serde_json::Value>,
    /// vLLM's `--exclude-tools-when-tool-choice-none`.
    pub exclude_tools_when_tool_choice_none: bool,
    /// KV-event PUB endpoints, in `backends` order (none, or one per backend).
    pub kv_events: Vec<String>,
    /// Replay endpoints, in `backends` order (none, or one per backend).
    pub replay_endpoints: Vec<String>,
    /// The ZeroMQ topic (`None`: kvroute-zmq's default, as in `kvroute listen`).
    pub topic: Option<String>,
    /// The header that carries the session key.
    pub session_header: String,
    /// Take the client address from the first `X-Forwarded-For` entry (only behind a
    /// proxy you trust).
    pub trust_forwarded_for: bool,
    /// LoRA adapters: the `model` name a request uses -> the adapter's path (as given to
    /// vLLM's `--lora-modules`), hashed into block keys as vLLM does.
    pub lora_adapters: BTreeMap<String, String>,
    /// Milliseconds between `/metrics` scrapes of each backend.
    pub scrape_interval_ms: u64,
    /// Milliseconds between `/health` probes of each backend.
    pub health_interval_ms: u64,
    /// Upstream connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Upstream timeout until the first body byte, milliseconds (a stream's first chunk;
    /// non-streaming requests get their answer only when generation ends: keep it long).
    pub first_byte_timeout_ms: u64,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Seconds to wait for in-flight requests at shutdown.
    pub drain_timeout_s: f64,
    /// Bytes of the cache of chat segments' token ids (multi-turn chats resend their
    /// history; the cached ids always equal a fresh tokenization). 0 turns it off.
    pub token_cache_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8000".into(),
            backends: Vec::new(),
            dns: None,
            tokenizer: None,
            chat_template: None,
            chat_template_content_format: None,
            default_chat_template_kwargs: None,
            exclude_tools_when_tool_choice_none: false,
            kv_events: Vec::new(),
            replay_endpoints: Vec::new(),
            topic: None,
            session_header: "x-session-id".into(),
            trust_forwarded_for: false,
            lora_adapters: BTreeMap::new(),
            scrape_interval_ms: 50,
            health_interval_ms: 1000,
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 600_000,
            max_body_bytes: 32 << 20,
            max_header_bytes: 64 << 10,
            drain_timeout_s: 30.0,
            token_cache_bytes: 64 << 20,
        }
    }
}

/// The whole configuration: the router and the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The router's configuration (see kvroute's `RouterConfig`).
    #[serde(default)]
    pub router: RouterConfig,
    /// The server's.
    #[serde(default)]
    pub server: ServerConfig,
}

impl Default for ServeConfig {
    // RouterConfig is built by default() and field assignment, never a struct literal
    // (it is #[non_exhaustive] outside kvroute).
    #[allow(clippy::field_reassign_with_default)]
    fn default() -> Self {
        let mut router = RouterConfig::default();
        // vLLM engines with data parallelism publish per-rank events: accept the ranks.
        router.auto_add_workers = true;
        ServeConfig { router, server: ServerConfig::default() }
    }
}

impl ServeConfig {
    /// Reads a configuration file: TOML when the name ends in `.toml`, JSON otherwise.
    pub fn from_file(path: &Path) -> Result<ServeConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        Self::parse(&text, is_toml).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a configuration text.
    pub fn parse(text: &str, toml: bool) -> Result<ServeConfig, String> {
        if toml {
            toml::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
    }
}

/// The worker name of a backend URL: its `host:port` (port 80/443 by scheme if absent).
pub fn worker_name(url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("backend {url:?}: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" {
        return Err(format!("backend {url:?}: only http:// backends are supported"));
    }
    let host = uri.host().ok_or_else(|| format!("backend {url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_files_parse_and_unknown_fields_are_named() {
        let j = r#"{"router": {"block_size": 32, "profile": "prefix"}, "server": {"backends": ["http://a:8000"], "lora_adapters": {"sql": "/adapters/sql"}}}"#;
        let c = ServeConfig::parse(j, false).unwrap();
        assert_eq!(c.router.block_size, 32);
        assert_eq!(c.server.backends, vec!["http://a:8000"]);
        assert_eq!(c.server.scrape_interval_ms, 50);
        let t = "[router]\nblock_size = 64\n[server]\nlisten = \"127.0.0.1:9\"\nsession_header = \"x-user\"\n";
        let c = ServeConfig::parse(t, true).unwrap();
        assert_eq!((c.router.block_size, c.server.listen.as_str()), (64, "127.0.0.1:9"));
        assert_eq!(c.server.session_header, "x-user");
        let e = ServeConfig::parse(r#"{"server": {"listne": "x"}}"#, false).unwrap_err();
        assert!(e.contains("listne"), "{e}");
    }

    #[test]
    fn worker_names_are_host_port() {
        assert_eq!(worker_name("http://10.0.0.7:8000").unwrap(), "10.0.0.7:8000");
        assert_eq!(worker_name("http://vllm-0/").unwrap(), "vllm-0:80");
        assert!(worker_name("https://x:1").is_err());
        assert!(worker_name("not a url").is_err());
    }
}
