//! The request path: parse, tokenize, route, forward, stream back, report lifecycle.
// Early exits carry the finished error response; they are the cold path.
#![allow(clippy::result_large_err)]

use crate::backends::set_health;
use crate::State;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use kvroute::hash::{Lora, RequestExtras};
use kvroute::router::Decision;
use kvroute_tokenize::Json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type.
pub type Body = BoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n: Infallible| match n {}).boxed()
}

/// An OpenAI-style error response.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let ty = match status.as_u16() {
        400 | 413 | 431 => "BadRequestError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        503 => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": ty, "param": null, "code": status.as_u16()}
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, t: String, ctype: &'static str) -> Response<Body> {
    let mut r = Response::new(full(t));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Entry point of every request.
pub async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let path = req.uri().path().to_string();
    let (endpoint, resp): (&'static str, Response<Body>) = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/completions") => {
            ("completions", proxy(&state, peer, req, Kind::Completion, start).await)
        }
        (&Method::POST, "/v1/chat/completions") => {
            ("chat", proxy(&state, peer, req, Kind::Chat, start).await)
        }
        (&Method::POST, "/kvroute/route") => ("route", dry_run(&state, peer, req).await),
        (&Method::GET, "/v1/models") => ("models", models(&state).await),
        (&Method::GET, "/health") => ("health", text(StatusCode::OK, "ok\n".into(), "text/plain")),
        (&Method::GET, "/ready") => ("ready", ready(&state)),
        (&Method::GET, "/metrics") => ("metrics", metrics(&state)),
        (
            _,
            "/v1/completions"
            | "/v1/chat/completions"
            | "/kvroute/route"
            | "/v1/models"
            | "/health"
            | "/ready"
            | "/metrics",
        ) => ("other", error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")),
        _ => ("other", error(StatusCode::NOT_FOUND, &format!("no route for {path}"))),
    };
    state.metrics.count(endpoint, resp.status().as_u16());
    state.metrics.latency(endpoint, start.elapsed());
    Ok(resp)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// The parsed request, ready to route.
struct Prepared {
    body: Bytes,
    tokens: Vec<u32>,
    session: Option<String>,
    lora: Option<(String, RequestExtras)>,
    stream: bool,
    tokenize_time: Duration,
    /// Time spent waiting for the whole body.
    body_read_time: Duration,
}

async fn read_body(
    state: &State,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    let limit = state.cfg.max_body_bytes;
    if let Some(len) =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is larger than {limit} bytes"),
            ));
        }
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {limit} bytes"),
        )),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, &format!("cannot read the body: {e}"))),
    }
}

/// The session key: the configured header, else the client address.
fn session_key(state: &State, headers: &HeaderMap, peer: SocketAddr) -> String {
    if let Some(v) = headers.get(state.cfg.session_header.as_str()).and_then(|v| v.to_str().ok()) {
        if !v.is_empty() {
            return v.to_string();
        }
    }
    if state.cfg.trust_forwarded_for {
        if let Some(first) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            return first.to_string();
        }
    }
    peer.ip().to_string()
}

/// What the request-parsing path extracts from a body.
pub(crate) struct Parsed {
    pub(crate) tokens: Vec<u32>,
    pub(crate) lora: Option<(String, RequestExtras)>,
    pub(crate) stream: bool,
    pub(crate) tokenize_time: Duration,
}

fn lora_of(state: &State, model: Option<&str>) -> Option<(String, RequestExtras)> {
    let m = model?;
    let path = state.cfg.lora_adapters.get(m)?;
    let extras = RequestExtras {
        lora: Some(Lora { name: m.to_string(), path: Some(path.clone()) }),
        ..RequestExtras::default()
    };
    Some((m.to_string(), extras))
}

/// Token-id completions prompts (`[1, 2]` or `[[1, 2], ...]`) without the JSON tree
/// (a byte scanner, serde_json for anything it leaves); `None` sends the body down the
/// general path (which also produces every error).
fn fast_token_ids(state: &State, body: &[u8], kind: Option<Kind>) -> Option<Parsed> {
    if kind == Some(Kind::Chat) {
        return None;
    }
    let p = if crate::bench::SERDE_ONLY.load(Ordering::Relaxed) {
        kvroute_tokenize::ids::parse_serde(body)?
    } else if crate::bench::PORTABLE_IDS.load(Ordering::Relaxed) {
        kvroute_tokenize::ids::scan_portable(body)
            .or_else(|| kvroute_tokenize::ids::parse_serde(body))?
    } else if crate::bench::AVX2_IDS.load(Ordering::Relaxed) {
        kvroute_tokenize::ids::scan_avx2(body)
            .or_else(|| kvroute_tokenize::ids::parse_serde(body))?
    } else {
        kvroute_tokenize::ids::parse(body)?
    };
    Some(Parsed {
        tokens: p.tokens,
        lora: lora_of(state, p.model.as_deref()),
        stream: p.stream,
        tokenize_time: Duration::ZERO,
    })
}

pub(crate) fn prepare_body(
    state: &State,
    body: &[u8],
    kind: Option<Kind>,
) -> Result<Parsed, (StatusCode, String)> {
    if let Some(p) = fast_token_ids(state, body, kind) {
        return Ok(p);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| (StatusCode::BAD_REQUEST, "the body is not UTF-8".to_string()))?;
    let json: Json = Json::parse(text)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")))?;
    if !matches!(json, Json::Object(_)) {
        return Err((StatusCode::BAD_REQUEST, "the body must be a JSON object".into()));
    }
    let kind = match kind {
        Some(k) => k,
        None if json.get("messages").is_some() => Kind::Chat,
        None if json.get("prompt").is_some() => Kind::Completion,
        None => return Err((StatusCode::BAD_REQUEST, "give `prompt` or `messages`".into())),
    };
    let stream = json.get("stream").and_then(Json::as_bool).unwrap_or(false);
    let lora = lora_of(state, json.get("model").and_then(Json::as_str));
    let t0 = Instant::now();
    let tokens = match (&state.tokenizer, kind) {
        (Some(tok), Kind::Completion) => tok.encode_completion_body(&json),
        (Some(tok), Kind::Chat) => tok.encode_chat_body(&json),
        (None, Kind::Completion) => match json.get("prompt") {
            // Token ids need no tokenizer.
            Some(Json::Array(a))
                if matches!(a.first(), Some(Json::Number(_)) | Some(Json::Array(_))) =>
            {
                let t = kvroute_tokenize::Tokenizer::prompt_token_ids(&json);
                t.map(|t| t.unwrap_or_default())
            }
            Some(_) => {
                Err(kvroute_tokenize::Error::Unsupported("text prompts without --tokenizer".into()))
            }
            None => Err(kvroute_tokenize::Error::BadRequest("`prompt` is required".into())),
        },
        (None, Kind::Chat) => match json.get("messages") {
            Some(Json::Array(_)) => {
                Err(kvroute_tokenize::Error::Unsupported("chat without --tokenizer".into()))
            }
            _ => Err(kvroute_tokenize::Error::BadRequest("`messages` must be an array".into())),
        },
    };
    let tokenize_time = t0.elapsed();
    let tokens = match tokens {
        Ok(t) => t,
        Err(kvroute_tokenize::Error::Unsupported(what)) => {
            tracing::debug!(%what, "routing without token ids");
            state.metrics.untokenized.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        }
        Err(e) => return Err((StatusCode::BAD_REQUEST, e.to_string())),
    };
    Ok(Parsed { tokens, lora, stream, tokenize_time })
}

async fn prepare(
    state: &State,
    peer: SocketAddr,
    req: Request<Incoming>,
    kind: Option<Kind>,
) -> Result<(hyper::http::request::Parts, Prepared), Response<Body>> {
    let t0 = Instant::now();
    let (parts, body) = read_body(state, req).await?;
    let body_read_time = t0.elapsed();
    let Parsed { tokens, lora, stream, tokenize_time } =
        prepare_body(state, &body, kind).map_err(|(s, m)| error(s, &m))?;
    state.metrics.tokenize.observe(tokenize_time);
    let session = Some(session_key(state, &parts.headers, peer));
    Ok((parts, Prepared { body, tokens, session, lora, stream, tokenize_time, body_read_time }))
}

fn route(state: &State, p: &Prepared, preview: bool) -> Result<Decision, Response<Body>> {
    let req = kvroute::router::Request {
        tokens: &p.tokens,
        session: p.session.as_deref(),
        lora: p.lora.as_ref().map(|(n, _)| n.as_str()),
        extras: p.lora.as_ref().map(|(_, e)| e),
        now_ms: None,
    };
    let r = if preview { state.router.preview(&req) } else { state.router.route(&req) };
    r.map_err(|e| match e {
        kvroute::Error::NoWorkers(m) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &format!("no healthy backend: {m}"))
        }
        kvroute::Error::InvalidInput(m) => error(StatusCode::BAD_REQUEST, &m),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    })
}

async fn dry_run(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let (_, p) = match prepare(state, peer, req, None).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let d = match route(state, &p, true) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let explain = serde_json::to_value(&d).unwrap_or(serde_json::Value::Null);
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "worker": d.worker.name,
            "prompt_token_ids": p.tokens,
            "matched_blocks": d.matched_blocks,
            "total_blocks": d.total_blocks,
            "explain": explain,
        }),
    )
}

/// Reports `on_finished` once, whatever ends the request (end of body, upstream error,
/// client gone, handler dropped).
struct Lifecycle {
    state: Arc<State>,
    id: u64,
    first_token: bool,
    finished: bool,
}

impl Lifecycle {
    fn first_token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            let _ = self.state.router.on_first_token(self.id);
        }
    }
    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.state.router.on_finished(self.id);
        }
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        if !self.finished {
            self.state.metrics.client_disconnects.fetch_add(1, Ordering::Relaxed);
            self.finish();
        }
    }
}

/// The upstream body, passed through frame by frame, with lifecycle reporting.
struct Tracked {
    inner: Primed,
    life: Lifecycle,
    backend: String,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if f.data_ref().is_some_and(|d| !d.is_empty()) {
                    this.life.first_token();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.life.state.metrics.upstream_error(&this.backend, "body");
                this.life.finish();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.life.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if HOP_BY_HOP.contains(&k.as_str()) || k == header::HOST || k == header::CONTENT_LENGTH {
            continue;
        }
        to.append(k.clone(), v.clone());
    }
}

enum Attempt {
    /// The head and the first data frame (or the end of the body) arrived.
    Ok(Response<Primed>),
    /// Refused, reset or closed before the first byte, or 5xx: retry elsewhere.
    Retry(String, Option<Response<Incoming>>),
    Fail(Response<Body>),
}

/// An upstream body whose first frames were read before the response head went to the
/// client: until then, a failure can still be retried on another worker.
struct Primed {
    head: std::collections::VecDeque<Frame<Bytes>>,
    rest: Incoming,
}

impl HttpBody for Primed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }
}

/// Reads frames until the first non-empty data frame, trailers, or the end of the body.
/// `Err` means the upstream failed before sending a byte of the body.
async fn prime(mut body: Incoming) -> Result<Primed, hyper::Error> {
    let mut head = std::collections::VecDeque::new();
    while !body.is_end_stream() {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(f)) => {
                let done = f.data_ref().is_none_or(|d| !d.is_empty());
                head.push_back(f);
                if done {
                    break;
                }
            }
        }
    }
    Ok(Primed { head, rest: body })
}

/// The upstream request for `backend`: the client's method, path, query and headers, the
/// original body bytes (never re-serialized).
fn upstream_request(
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    backend: &crate::backends::Backend,
) -> Result<Request<Full<Bytes>>, Response<Body>> {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri = format!("{}{pq}", backend.base);
    let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(h) = builder.headers_mut() {
        copy_headers(&parts.headers, h);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Ok(v) = HeaderValue::from_str(backend.name.as_str()) {
            h.insert(header::HOST, v);
        }
    }
    builder
        .body(Full::new(body.clone()))
        .map_err(|e| error(StatusCode::BAD_REQUEST, &e.to_string()))
}

async fn send(
    state: &State,
    req: Result<Request<Full<Bytes>>, Response<Body>>,
    backend: &crate::backends::Backend,
) -> Attempt {
    let req = match req {
        Ok(r) => r,
        Err(r) => return Attempt::Fail(r),
    };
    let timeout = Duration::from_millis(state.cfg.first_byte_timeout_ms.max(1));
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        state.metrics.upstream_error(&backend.name, "timeout");
        Attempt::Fail(error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("backend {} did not answer in time", backend.name),
        ))
    };
    let resp = match tokio::time::timeout_at(deadline, state.client.request(req)).await {
        Err(_) => return timed_out(),
        // Nothing reached the client yet, whatever went wrong: refused, a pooled
        // keep-alive connection reset under the request, or closed before the head.
        Ok(Err(e)) => {
            let kind = if e.is_connect() { "connect" } else { "request" };
            state.metrics.upstream_error(&backend.name, kind);
            let why = match std::error::Error::source(&e) {
                Some(src) => format!("backend {}: {kind}: {e}: {src}", backend.name),
                None => format!("backend {}: {kind}: {e}", backend.name),
            };
            return Attempt::Retry(why, None);
        }
        Ok(Ok(resp)) if resp.status().is_server_error() => {
            state.metrics.upstream_error(&backend.name, "status_5xx");
            return Attempt::Retry(
                format!("backend {} answered {}", backend.name, resp.status()),
                Some(resp),
            );
        }
        Ok(Ok(resp)) => resp,
    };
    // The head alone is not the first byte the client sees: an upstream that dies after
    // its head and before any body would break the client's connection, so wait for the
    // first body frame too (a stream's first chunk, a complete answer's body).
    let (rparts, rbody) = resp.into_parts();
    match tokio::time::timeout_at(deadline, prime(rbody)).await {
        Err(_) => timed_out(),
        Ok(Err(e)) => {
            state.metrics.upstream_error(&backend.name, "body_before_first_byte");
            Attempt::Retry(
                format!("backend {} failed before its first body byte: {e}", backend.name),
                None,
            )
        }
        Ok(Ok(primed)) => Attempt::Ok(Response::from_parts(rparts, primed)),
    }
}

async fn proxy(
    state: &Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
    kind: Kind,
    start: Instant,
) -> Response<Body> {
    let (parts, p) = match prepare(state, peer, req, Some(kind)).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    for attempt in 0..2 {
        let d = match route(state, &p, false) {
            Ok(d) => d,
            Err(r) => return r,
        };
        let backend = state.backends.read().get(&d.worker.name).cloned();
        let Some(backend) = backend else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("worker {} has no backend", d.worker.name),
            );
        };
        if let Err(e) = state.router.on_routed(&d) {
            // The worker left between the decision and now (a DNS refresh removed it):
            // the request still goes out; the router has nothing to account it to.
            tracing::warn!(worker = %d.worker.name, error = %e, "on_routed failed");
        }
        let mut life = Lifecycle {
            state: state.clone(),
            id: d.request_id,
            first_token: false,
            finished: false,
        };
        let req = upstream_request(&parts, &p.body, &backend);
        if attempt == 0 {
            // Up to the upstream request built and handed to the HTTP client.
            state
                .metrics
                .overhead(start.elapsed().saturating_sub(p.tokenize_time), p.body_read_time);
        }
        match send(state, req, &backend).await {
            Attempt::Ok(resp) => {
                if !p.stream || resp.body().head.iter().any(|f| f.is_data()) {
                    // A non-streaming answer's head comes when generation is done; a
                    // stream's first chunk has arrived.
                    life.first_token();
                }
                let (rparts, rbody) = resp.into_parts();
                let mut out = Response::new(
                    Tracked { inner: rbody, life, backend: backend.name.clone() }.boxed(),
                );
                *out.status_mut() = rparts.status;
                copy_headers(&rparts.headers, out.headers_mut());
                if let Some(cl) = rparts.headers.get(header::CONTENT_LENGTH) {
                    out.headers_mut().insert(header::CONTENT_LENGTH, cl.clone());
                }
                if let Ok(v) = HeaderValue::from_str(&backend.name) {
                    out.headers_mut().insert(HeaderName::from_static("x-kvroute-worker"), v);
                }
                return out;
            }
            Attempt::Retry(why, resp) => {
                tracing::warn!(backend = %backend.name, reason = %why, attempt, "upstream failed before the first byte; marking unhealthy");
                set_health(state, &backend, false);
                life.finish();
                if attempt == 1 {
                    return match resp {
                        Some(r) => {
                            let (rparts, rbody) = r.into_parts();
                            let mut out =
                                Response::new(rbody.map_err(|e| Box::new(e) as BoxError).boxed());
                            *out.status_mut() = rparts.status;
                            copy_headers(&rparts.headers, out.headers_mut());
                            out
                        }
                        None => error(StatusCode::BAD_GATEWAY, &why),
                    };
                }
                state.metrics.retries.fetch_add(1, Ordering::Relaxed);
            }
            Attempt::Fail(r) => {
                life.finish();
                return r;
            }
        }
    }
    error(StatusCode::BAD_GATEWAY, "no backend answered")
}

async fn models(state: &State) -> Response<Body> {
    let backends: Vec<_> = state.backends.read().values().cloned().collect();
    let mut ordered: Vec<_> =
        backends.iter().filter(|b| b.healthy.load(Ordering::Relaxed)).collect();
    ordered.extend(backends.iter().filter(|b| !b.healthy.load(Ordering::Relaxed)));
    for b in ordered {
        let req = match Request::get(format!("{}/v1/models", b.base)).body(Full::new(Bytes::new()))
        {
            Ok(r) => r,
            Err(_) => continue,
        };
        let timeout = Duration::from_millis(state.cfg.connect_timeout_ms + 5000);
        if let Ok(Ok(resp)) = tokio::time::timeout(timeout, state.client.request(req)).await {
            if resp.status().is_success() {
                let (parts, body) = resp.into_parts();
                let mut out = Response::new(body.map_err(|e| Box::new(e) as BoxError).boxed());
                *out.status_mut() = parts.status;
                copy_headers(&parts.headers, out.headers_mut());
                return out;
            }
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, "no backend answered /v1/models")
}

fn ready(state: &State) -> Response<Body> {
    let backends = state.backends.read();
    let waiting: Vec<&str> = backends
        .values()
        .filter(|b| !b.probed.load(Ordering::Relaxed))
        .map(|b| b.name.as_str())
        .collect();
    if backends.is_empty() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no backends yet\n".into(), "text/plain");
    }
    if waiting.is_empty() {
        text(StatusCode::OK, "ready\n".into(), "text/plain")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not probed yet: {}\n", waiting.join(", ")),
            "text/plain",
        )
    }
}

fn metrics(state: &State) -> Response<Body> {
    use std::fmt::Write;
    let mut out = state.router.prometheus();
    state.metrics.render(&mut out);
    let _ = writeln!(out, "# HELP kvroute_serve_inflight Requests sent upstream and not finished.");
    let _ = writeln!(out, "# TYPE kvroute_serve_inflight gauge");
    let _ = writeln!(out, "kvroute_serve_inflight {}", state.router.inflight_requests());
    if let Some(c) = state.tokenizer.as_ref().and_then(|t| t.segment_cache_stats()) {
        for (name, kind, help, v) in [
            (
                "token_cache_hits_total",
                "counter",
                "Chat segments whose token ids came from the cache.",
                c.hits,
            ),
            ("token_cache_misses_total", "counter", "Chat segments tokenized.", c.misses),
            (
                "token_cache_bytes",
                "gauge",
                "Bytes held by the chat token-id cache.",
                c.bytes as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP kvroute_serve_{name} {help}");
            let _ = writeln!(out, "# TYPE kvroute_serve_{name} {kind}");
            let _ = writeln!(out, "kvroute_serve_{name} {v}");
        }
    }
    let backends = state.backends.read();
    for (name, help) in [
        ("backend_healthy", "1 when the backend answers /health and has not failed since."),
        ("backend_load_stale", "1 when the last /metrics scrape of the backend failed."),
        ("backend_scrape_failures_total", "Failed /metrics scrapes."),
        ("backend_event_batches_total", "KV event batches received from the backend."),
    ] {
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP kvroute_serve_{name} {help}");
        let _ = writeln!(out, "# TYPE kvroute_serve_{name} {kind}");
        for b in backends.values() {
            let v = match name {
                "backend_healthy" => u64::from(b.healthy.load(Ordering::Relaxed)),
                "backend_load_stale" => u64::from(b.load_stale.load(Ordering::Relaxed)),
                "backend_scrape_failures_total" => b.scrape_failures.load(Ordering::Relaxed),
                _ => match b.event_stats() {
                    Some(s) => s.batches,
                    None => continue,
                },
            };
            let _ = writeln!(out, "kvroute_serve_{name}{{backend=\"{}\"}} {v}", b.name);
        }
    }
    text(StatusCode::OK, out, "text/plain; version=0.0.4")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state() -> Arc<State> {
        static S: std::sync::OnceLock<Arc<State>> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            let mut cfg = crate::ServeConfig::default();
            cfg.server.backends = vec!["http://127.0.0.1:9".into()];
            cfg.server.tokenizer = Some(
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../testdata/tokenize/chatml"),
            );
            cfg.server.lora_adapters.insert("sql".into(), "/a/sql".into());
            crate::build_state(cfg).unwrap()
        })
        .clone()
    }

    fn check(body: &[u8]) {
        let st = state();
        // The fast path for token ids agrees with the general path.
        if let Some(fast) = fast_token_ids(&st, body, None) {
            let text = std::str::from_utf8(body).unwrap();
            let j = Json::parse(text).unwrap();
            let general = kvroute_tokenize::Tokenizer::prompt_token_ids(&j).unwrap().unwrap();
            assert_eq!(fast.tokens, general);
        }
        for kind in [None, Some(Kind::Completion), Some(Kind::Chat)] {
            match prepare_body(&st, body, kind) {
                Ok(p) => {
                    // Rendered chats are the tokenizer's own ids.
                    if kind == Some(Kind::Chat) {
                        let vocab = st.tokenizer.as_ref().unwrap().vocab_size();
                        assert!(p.tokens.iter().all(|&t| (t as usize) < vocab));
                    }
                }
                Err((status, msg)) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST);
                    assert!(!msg.is_empty());
                }
            }
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            "[a-z<|> éü\n{}%]{0,12}".prop_map(serde_json::Value::from),
            prop_oneof![
                Just("user"),
                Just("assistant"),
                Just("system"),
                Just("tool"),
                Just("developer"),
                Just("text")
            ]
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("role"),
                            Just("content"),
                            Just("messages"),
                            Just("prompt"),
                            Just("tools"),
                            Just("tool_calls"),
                            Just("function"),
                            Just("arguments"),
                            Just("name"),
                            Just("type"),
                            Just("text"),
                            Just("stream"),
                            Just("model"),
                            Just("add_generation_prompt"),
                            Just("continue_final_message"),
                            Just("chat_template_kwargs"),
                            Just("chat_template"),
                            Just("add_special_tokens"),
                            Just("x")
                        ],
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| serde_json::Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes never crash the parsing path: a result or a 400.
        #[test]
        fn arbitrary_bytes_are_a_result_or_a_400(body in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&body);
        }

        /// Token-id prompts take the fast path and agree with the general one.
        #[test]
        fn token_id_prompts_parse_the_same_on_both_paths(ids in prop::collection::vec(any::<u32>(), 1..64), nested in any::<bool>(), stream in any::<bool>()) {
            let prompt = if nested { serde_json::json!([ids.clone(), [1]]) } else { serde_json::json!(ids.clone()) };
            let body = serde_json::json!({"model": "sql", "prompt": prompt, "stream": stream}).to_string();
            let p = prepare_body(&state(), body.as_bytes(), Some(Kind::Completion)).ok().unwrap();
            prop_assert_eq!(&p.tokens, &ids);
            prop_assert_eq!(p.stream, stream);
            prop_assert!(p.lora.is_some());
            check(body.as_bytes());
        }

        /// Arbitrary JSON shaped like requests (messages, tools, templates, kwargs).
        #[test]
        fn arbitrary_request_shapes_are_a_result_or_a_400(v in json_value()) {
            check(v.to_string().as_bytes());
            let wrapped = serde_json::json!({"messages": [v.clone()], "tools": [v.clone()], "prompt": v});
            check(wrapped.to_string().as_bytes());
        }
    }

    #[test]
    fn session_keys_come_from_the_header_else_the_client_and_xff_only_when_trusted() {
        let peer: SocketAddr = "10.9.8.7:5555".parse().unwrap();
        let st = state();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4, 10.0.0.1"));
        assert_eq!(session_key(&st, &h, peer), "10.9.8.7", "XFF is ignored unless trusted");
        h.insert("x-session-id", HeaderValue::from_static("alice"));
        assert_eq!(session_key(&st, &h, peer), "alice");
        let mut cfg = crate::ServeConfig::default();
        cfg.router.mode = kvroute::router::Mode::Approximate;
        cfg.server.backends = vec!["http://127.0.0.1:9".into()];
        cfg.server.trust_forwarded_for = true;
        cfg.server.session_header = "x-user".into();
        let trusted = crate::build_state(cfg).unwrap();
        assert_eq!(session_key(&trusted, &h, peer), "1.2.3.4");
        h.insert("x-user", HeaderValue::from_static("bob"));
        assert_eq!(session_key(&trusted, &h, peer), "bob");
    }

    #[test]
    fn lora_models_carry_their_adapter() {
        let p =
            prepare_body(&state(), br#"{"model": "sql", "prompt": [1, 2, 3]}"#, None).ok().unwrap();
        let (name, extras) = p.lora.unwrap();
        assert_eq!(name, "sql");
        assert_eq!(extras.lora.unwrap().path.as_deref(), Some("/a/sql"));
        assert_eq!(p.tokens, vec![1, 2, 3]);
    }
}
