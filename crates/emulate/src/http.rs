//! The HTTP side: vLLM's OpenAI server endpoints, `/metrics`, and the fault switches under
//! `/admin/`.
//!
//! Outputs are deterministic: output token `j` of a prompt is
//! `splitmix64(hash(prompt) ^ j) % vocab`, so equal prompts get equal answers (temperature
//! 0) and a chat's next turn can resend them. Without a tokenizer a token's text is
//! `<ID>`; prompts must then be token ids (`/v1/completions` with `"prompt": [ids]`).

// The request helpers return the finished error response; it is built once per bad request.
#![allow(clippy::result_large_err)]

use crate::engine::{Emit, Engine, Submission};
use crate::metrics::Metrics;
use crate::tokenizer::TextTokenizer;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvroute::hash::{BlockHasher, RequestExtras};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex as AsyncMutex};

/// Settings of the HTTP side.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// The served model name (`/v1/models`, the `model` field, the `model_name` label).
    pub model: String,
    /// Longest prompt + output accepted (vLLM `--max-model-len`).
    pub max_model_len: usize,
    /// Output tokens when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
}

/// The fault switches.
#[derive(Debug)]
pub struct Faults {
    hang: watch::Sender<bool>,
    error500: AtomicBool,
    down_until: parking_lot::Mutex<Option<Instant>>,
}

/// Shared state of the handlers.
pub struct AppState {
    pub(crate) engine: Engine,
    pub(crate) hasher: BlockHasher,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tokenizer: Option<Arc<dyn TextTokenizer>>,
    pub(crate) api: ApiSettings,
    pub(crate) faults: Faults,
    pub(crate) created: u64,
    pub(crate) counter: AtomicU64,
    pub(crate) restart_lock: AsyncMutex<()>,
}

impl AppState {
    /// State for the handlers.
    pub fn new(
        engine: Engine,
        hasher: BlockHasher,
        metrics: Arc<Metrics>,
        tokenizer: Option<Arc<dyn TextTokenizer>>,
        api: ApiSettings,
    ) -> Self {
        AppState {
            engine,
            hasher,
            metrics,
            tokenizer,
            api,
            faults: Faults {
                hang: watch::channel(false).0,
                error500: AtomicBool::new(false),
                down_until: parking_lot::Mutex::new(None),
            },
            created: unix_secs(),
            counter: AtomicU64::new(0),
            restart_lock: AsyncMutex::new(()),
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

type St = State<Arc<AppState>>;

/// The router of every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), faults_layer));
    let admin = Router::new()
        .route("/admin/restart", post(admin_restart))
        .route("/admin/drop-batch", post(admin_drop_batch))
        .route("/admin/hang", post(admin_hang))
        .route("/admin/error500", post(admin_error500))
        .route("/admin/recover", post(admin_recover))
        .route("/admin/state", get(admin_state));
    api.merge(admin).layer(axum::extract::DefaultBodyLimit::max(64 << 20)).with_state(state)
}

fn error(status: StatusCode, kind: &str, msg: impl Into<String>) -> Response {
    let body = json!({"error": {"message": msg.into(), "type": kind, "param": null, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn bad(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "BadRequestError", msg)
}

async fn faults_layer(State(s): St, req: Request, next: Next) -> Response {
    let mut hang = s.faults.hang.subscribe();
    while *hang.borrow_and_update() {
        if hang.changed().await.is_err() {
            break;
        }
    }
    if s.faults.error500.load(Ordering::SeqCst) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "injected fault");
    }
    let down = *s.faults.down_until.lock();
    if down.is_some_and(|t| Instant::now() < t) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "engine restarting");
    }
    next.run(req).await
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(s): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
        .into_response()
}

async fn models(State(s): St) -> Json<Value> {
    let id = &s.api.model;
    Json(json!({"object": "list", "data": [{
        "id": id, "object": "model", "created": s.created, "owned_by": "vllm", "root": id,
        "parent": null, "max_model_len": s.api.max_model_len,
        "permission": [{"id": format!("modelperm-{id}"), "object": "model_permission",
            "created": s.created, "allow_create_engine": false, "allow_sampling": true,
            "allow_logprobs": true, "allow_search_indices": false, "allow_view": true,
            "allow_fine_tuning": false, "organization": "*", "group": null, "is_blocking": false}]
    }]}))
}

fn check_model(s: &AppState, body: &Value) -> Result<(), Response> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if *m == s.api.model => Ok(()),
        Some(m) => Err(error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{}` does not exist.", m.as_str().unwrap_or("?")),
        )),
    }
}

fn token_ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
}

/// The prompt of a completion request as token ids.
fn completion_prompt(s: &AppState, body: &Body2) -> Result<Vec<u32>, Response> {
    let p = body.v.get("prompt").ok_or_else(|| bad("`prompt` is required"))?;
    let one = match p {
        Value::Array(a) if a.len() == 1 && (a[0].is_array() || a[0].is_string()) => &a[0],
        Value::Array(a) if a.iter().any(|x| x.is_array() || x.is_string()) => {
            return Err(bad("the emulator takes one prompt per request"))
        }
        other => other,
    };
    match one {
        Value::String(_) => {
            let tok = s.tokenizer.as_ref().ok_or_else(|| {
                bad("a text prompt needs a tokenizer: start kvroute emulate with --tokenizer DIR, or send token ids")
            })?;
            tok.encode_completion(&body.raw).map_err(bad)
        }
        Value::Array(_) => {
            token_ids(one).ok_or_else(|| bad("`prompt` token ids must be integers in 0..2^32"))
        }
        _ => Err(bad("`prompt` must be a string or a list of token ids")),
    }
}

fn chat_prompt(s: &AppState, body: &Body2) -> Result<Vec<u32>, Response> {
    if body.v.get("messages").is_none() {
        return Err(bad("`messages` is required"));
    }
    let tok = s.tokenizer.as_ref().ok_or_else(|| {
        bad("chat requests need a tokenizer: start kvroute emulate with --tokenizer DIR")
    })?;
    tok.encode_chat(&body.raw).map_err(bad)
}

fn max_tokens(s: &AppState, body: &Value, prompt_len: usize) -> Result<usize, Response> {
    let v = body
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("max_tokens"));
    let n = match v {
        None | Some(Value::Null) => s.api.default_max_tokens,
        Some(v) => {
            v.as_u64()
                .filter(|&n| n >= 1)
                .ok_or_else(|| bad("`max_tokens` must be a positive integer"))? as usize
        }
    };
    if prompt_len + n > s.api.max_model_len {
        return Err(bad(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            s.api.max_model_len,
            prompt_len + n,
            prompt_len,
            n
        )));
    }
    Ok(n)
}

/// The deterministic answer to `prompt`.
pub fn output_tokens(prompt: &[u32], n: usize, vocab: u32) -> Vec<u32> {
    use kvroute::rng::splitmix64;
    let seed = prompt.iter().fold(0x6f75_7470_7574u64, |h, &t| splitmix64(h ^ u64::from(t)));
    (0..n as u64).map(|j| (splitmix64(seed ^ j) % u64::from(vocab.max(1))) as u32).collect()
}

fn text_of(s: &AppState, ids: &[u32]) -> String {
    match &s.tokenizer {
        Some(t) => t.decode(ids),
        None => ids.iter().map(|i| format!("<{i}>")).collect(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A request body: parsed, and as received (for the tokenizer, which keeps key order).
struct Body2 {
    v: Value,
    raw: String,
}

fn parse_body(raw: Bytes) -> Result<Body2, Response> {
    let raw = String::from_utf8(raw.to_vec()).map_err(|_| bad("the body is not UTF-8"))?;
    let v: Value =
        serde_json::from_str(&raw).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(Body2 { v, raw })
}

async fn completions(State(s): St, raw: Bytes) -> Response {
    let body = match parse_body(raw) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_model(&s, &body.v) {
        return r;
    }
    match completion_prompt(&s, &body) {
        Ok(p) => generate(s, body.v, p, Kind::Completion).await,
        Err(r) => r,
    }
}

async fn chat_completions(State(s): St, raw: Bytes) -> Response {
    let body = match parse_body(raw) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = check_model(&s, &body.v) {
        return r;
    }
    match chat_prompt(&s, &body) {
        Ok(p) => generate(s, body.v, p, Kind::Chat).await,
        Err(r) => r,
    }
}

async fn generate(s: Arc<AppState>, body: Value, prompt: Vec<u32>, kind: Kind) -> Response {
    let n = match max_tokens(&s, &body, prompt.len()) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let vocab =
        s.tokenizer.as_ref().map_or(kvroute_sim::workload::VOCAB as u32, |t| t.vocab_size());
    let output = output_tokens(&prompt, n, vocab);
    let mut all = prompt.clone();
    all.extend_from_slice(&output);
    let mut keys = Vec::new();
    s.hasher.block_keys(&all, &RequestExtras::default(), &mut keys);
    let prompt_len = prompt.len();
    let rx = match s.engine.submit(Submission { prompt, output, keys }) {
        Ok(rx) => rx,
        Err(e) => return bad(e),
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let usage_in_stream =
        body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let k = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{k:032x}"),
        Kind::Chat => format!("chatcmpl-{k:032x}"),
    };
    if stream {
        stream_response(s, rx, id, kind, prompt_len, usage_in_stream)
    } else {
        whole_response(s, rx, id, kind, prompt_len).await
    }
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "total_tokens": prompt + completion,
        "completion_tokens": completion, "prompt_tokens_details": {"cached_tokens": cached}})
}

async fn whole_response(
    s: Arc<AppState>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Emit>,
    id: String,
    kind: Kind,
    prompt_len: usize,
) -> Response {
    let mut ids = Vec::new();
    let cached = loop {
        match rx.recv().await {
            Some(Emit::Token { id, .. }) => ids.push(id),
            Some(Emit::Done { cached_tokens }) => break cached_tokens,
            Some(Emit::Aborted(why)) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", why)
            }
            None => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "engine stopped",
                )
            }
        }
    };
    let text = text_of(&s, &ids);
    let created = unix_secs();
    let u = usage(prompt_len, ids.len(), cached);
    let body = match kind {
        Kind::Completion => json!({"id": id, "object": "text_completion", "created": created,
            "model": s.api.model, "choices": [{"index": 0, "text": text, "logprobs": null,
            "finish_reason": "length", "stop_reason": null, "prompt_logprobs": null}],
            "usage": u}),
        Kind::Chat => json!({"id": id, "object": "chat.completion", "created": created,
            "model": s.api.model, "choices": [{"index": 0, "message": {"role": "assistant",
            "content": text, "tool_calls": []}, "logprobs": null, "finish_reason": "length",
            "stop_reason": null}], "usage": u}),
    };
    Json(body).into_response()
}

fn stream_response(
    s: Arc<AppState>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Emit>,
    id: String,
    kind: Kind,
    prompt_len: usize,
    include_usage: bool,
) -> Response {
    struct Ctx {
        s: Arc<AppState>,
        rx: tokio::sync::mpsc::UnboundedReceiver<Emit>,
        id: String,
        kind: Kind,
        prompt_len: usize,
        include_usage: bool,
        created: u64,
        n: usize,
        started: bool,
        finished: bool,
    }
    let ctx = Ctx {
        s,
        rx,
        id,
        kind,
        prompt_len,
        include_usage,
        created: unix_secs(),
        n: 0,
        started: false,
        finished: false,
    };
    let chunk = |c: &Ctx, choice: Value| -> Value {
        let object = if c.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": c.id, "object": object, "created": c.created, "model": c.s.api.model,
            "choices": [choice]})
    };
    let stream = futures_util::stream::unfold(ctx, move |mut c| async move {
        if c.finished {
            return None;
        }
        let mut out = String::new();
        if c.kind == Kind::Chat && !c.started {
            c.started = true;
            let first = chunk(
                &c,
                json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}),
            );
            out.push_str(&format!("data: {first}\n\n"));
        }
        match c.rx.recv().await {
            Some(Emit::Token { id, .. }) => {
                c.n += 1;
                let text = text_of(&c.s, &[id]);
                let choice = match c.kind {
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                        "finish_reason": null, "stop_reason": null}),
                    Kind::Chat => json!({"index": 0, "delta": {"content": text},
                        "logprobs": null, "finish_reason": null}),
                };
                out.push_str(&format!("data: {}\n\n", chunk(&c, choice)));
            }
            Some(Emit::Done { cached_tokens }) => {
                c.finished = true;
                let choice = match c.kind {
                    Kind::Completion => json!({"index": 0, "text": "", "logprobs": null,
                        "finish_reason": "length", "stop_reason": null}),
                    Kind::Chat => json!({"index": 0, "delta": {}, "logprobs": null,
                        "finish_reason": "length", "stop_reason": null}),
                };
                out.push_str(&format!("data: {}\n\n", chunk(&c, choice)));
                if c.include_usage {
                    let mut u = chunk(&c, Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(c.prompt_len, c.n, cached_tokens);
                    out.push_str(&format!("data: {u}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
            }
            // The engine dropped the request: end the response abruptly, as a dying
            // process does (the client sees a broken chunked body).
            Some(Emit::Aborted(_)) | None => {
                c.finished = true;
                return Some((Err(std::io::Error::other("engine restarted")), c));
            }
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(out)), c))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "response")
        })
}

async fn tokenize(State(s): St, raw: Bytes) -> Response {
    let body = match parse_body(raw) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ids = if body.v.get("messages").is_some() {
        chat_prompt(&s, &body)
    } else {
        match body.v.get("prompt") {
            Some(Value::String(_)) => completion_prompt(&s, &body),
            _ => Err(bad("`prompt` (a string) or `messages` is required")),
        }
    };
    match ids {
        Ok(ids) => Json(json!({"count": ids.len(), "max_model_len": s.api.max_model_len,
            "tokens": ids, "token_strs": null}))
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct RestartQuery {
    /// Milliseconds the engine stays down (answers 503) after the restart.
    #[serde(default)]
    down_ms: u64,
}

async fn admin_restart(State(s): St, Query(q): Query<RestartQuery>) -> Json<Value> {
    let _g = s.restart_lock.lock().await;
    *s.faults.down_until.lock() = Some(Instant::now() + Duration::from_millis(q.down_ms));
    s.engine.restart();
    Json(json!({"restarted": true, "down_ms": q.down_ms}))
}

#[derive(Deserialize)]
struct DropQuery {
    #[serde(default = "one")]
    n: u64,
}

fn one() -> u64 {
    1
}

async fn admin_drop_batch(State(s): St, Query(q): Query<DropQuery>) -> Json<Value> {
    s.engine.publisher().drop_next(q.n);
    Json(json!({"dropping": q.n}))
}

async fn admin_hang(State(s): St) -> Json<Value> {
    s.faults.hang.send_replace(true);
    Json(json!({"hang": true}))
}

async fn admin_error500(State(s): St) -> Json<Value> {
    s.faults.error500.store(true, Ordering::SeqCst);
    Json(json!({"error500": true}))
}

async fn admin_recover(State(s): St) -> Json<Value> {
    s.faults.hang.send_replace(false);
    s.faults.error500.store(false, Ordering::SeqCst);
    *s.faults.down_until.lock() = None;
    Json(json!({"recovered": true}))
}

async fn admin_state(State(s): St) -> Json<Value> {
    let (running, waiting, cached) = s.engine.snapshot();
    let (next_seq, sent, dropped) = s.engine.publisher().counts();
    let (queries, hits) = s.metrics.prefix_counts();
    Json(json!({"running": running, "waiting": waiting, "cached_blocks": cached,
        "next_seq": next_seq, "batches_sent": sent, "batches_dropped": dropped,
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "hang": *s.faults.hang.borrow(), "error500": s.faults.error500.load(Ordering::SeqCst)}))
}
