//! Tokenization exactly as vLLM 0.33's OpenAI server does it, so that a router's block
//! keys equal the engine's.
//!
//! - **Completions** (`/v1/completions`): the prompt text is encoded with the HF
//!   tokenizer, with special tokens (the post-processor's BOS/EOS) added unless the
//!   request says `"add_special_tokens": false`. Prompts given as token ids are used as
//!   they are.
//! - **Chat** (`/v1/chat/completions`): the messages become vLLM's conversation (text
//!   parts joined with `"\n"` or kept as a list, by the template's content format; tool
//!   call arguments parsed into objects; developer messages turned into system messages
//!   for templates without that role), the model's chat template renders it with
//!   transformers' Jinja environment and variables (`messages`, `tools`, `documents`,
//!   `add_generation_prompt`, the special tokens, accepted `chat_template_kwargs`), and
//!   the text is encoded **without** special tokens unless the request sets
//!   `"add_special_tokens": true`.
//!
//! ```no_run
//! use kvroute_tokenize::{Json, Tokenizer};
//! let tok = Tokenizer::from_path("/models/llama")?;
//! let body = Json::parse(r#"{"messages": [{"role": "user", "content": "Hi"}]}"#).unwrap();
//! let ids = tok.encode_chat_body(&body)?;
//! # Ok::<(), kvroute_tokenize::Error>(())
//! ```

pub mod cache;
pub mod chat;
pub mod ids;
pub mod json;
pub mod template;

pub use cache::{CacheStats, SegmentCache};
pub use chat::ChatRequest;
pub use json::Json;
pub use template::{ChatTemplate, ContentFormat};

use minijinja::value::Value;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tokenizer files could not be read or parsed.
    #[error("{0}")]
    Load(String),
    /// The request is malformed (an HTTP server answers 400).
    #[error("{0}")]
    BadRequest(String),
    /// The request is valid but needs something this tokenizer cannot do (images, audio,
    /// prompt embeddings).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The chat template failed to compile or to render (`raise_exception` gives the
    /// template's own message).
    #[error("{0}")]
    Template(String),
    /// The tokenizer has no chat template and the request gave none.
    #[error("the tokenizer has no chat template and the request gave none (chat_template)")]
    NoTemplate,
    /// The HF tokenizer failed to encode.
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// The parameters of transformers' `apply_chat_template` that vLLM accepts as
/// `chat_template_kwargs` whether or not the template reads them; transformers consumes
/// them, so they never reach the template as variables.
const HF_BASE_PARAMS: &[&str] = &[
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
];

/// Largest number of request-supplied chat templates kept compiled.
const TEMPLATE_CACHE: usize = 32;

/// A model's tokenizer and chat templates.
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    /// The default template, and named ones (`tool_use`, ...).
    default_template: Option<Arc<ChatTemplate>>,
    named_templates: HashMap<String, Arc<ChatTemplate>>,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special_tokens: Vec<(String, Json)>,
    /// Request-supplied templates, compiled.
    request_templates: Mutex<HashMap<String, Arc<ChatTemplate>>>,
    /// Forces the content format (vLLM's `--chat-template-content-format`).
    content_format_override: Option<ContentFormat>,
    /// Drop the tools when `tool_choice` is `"none"` (vLLM's
    /// `--exclude-tools-when-tool-choice-none`).
    pub exclude_tools_when_tool_choice_none: bool,
    /// Default `chat_template_kwargs` (vLLM's `--default-chat-template-kwargs`), under the
    /// request's.
    pub default_chat_template_kwargs: Vec<(String, Json)>,
    /// Token ids of chat segments already seen ([`Tokenizer::enable_segment_cache`]).
    segment_cache: Option<SegmentCache>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.default_template.is_some())
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Json::parse(&text)
            .map(Some)
            .map_err(|e| Error::Load(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Load(format!("{}: {e}", path.display()))),
    }
}

/// The string of a special token entry: `"<s>"` or `{"content": "<s>", ...}`.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(_) => v.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads a model directory (`tokenizer.json`, optional `tokenizer_config.json`,
    /// `special_tokens_map.json`, `chat_template.jinja` / `chat_template.json`) or a
    /// `tokenizer.json` file (then files beside it are read the same way).
    pub fn from_path(path: impl AsRef<Path>) -> Result<Tokenizer, Error> {
        let path = path.as_ref();
        let (dir, tok_file) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        };
        let bytes = std::fs::read(&tok_file)
            .map_err(|e| Error::Load(format!("cannot read {}: {e}", tok_file.display())))?;
        let hf = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Load(format!("{}: {e}", tok_file.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Object(vec![]));
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let mut tok = Tokenizer {
            hf,
            default_template: None,
            named_templates: HashMap::new(),
            special_tokens: Vec::new(),
            request_templates: Mutex::new(HashMap::new()),
            content_format_override: None,
            exclude_tools_when_tool_choice_none: false,
            default_chat_template_kwargs: Vec::new(),
            segment_cache: None,
        };
        for name in [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ] {
            let v = config
                .get(name)
                .and_then(token_string)
                .or_else(|| special_map.as_ref().and_then(|m| m.get(name)).and_then(token_string));
            if let Some(s) = v {
                tok.special_tokens.push((name.to_string(), Json::String(s)));
            }
        }
        let extra = config
            .get("additional_special_tokens")
            .or_else(|| special_map.as_ref().and_then(|m| m.get("additional_special_tokens")));
        if let Some(Json::Array(a)) = extra {
            let list = a.iter().filter_map(token_string).map(Json::String).collect();
            tok.special_tokens.push(("additional_special_tokens".into(), Json::Array(list)));
        }
        // Templates: chat_template.jinja wins over tokenizer_config.json (transformers
        // saves them there since 4.50), then chat_template.json (processors).
        let jinja = dir.join("chat_template.jinja");
        let from_config = config.get("chat_template").cloned();
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja)
                .map_err(|e| Error::Load(format!("{}: {e}", jinja.display())))?;
            tok.default_template = Some(Arc::new(ChatTemplate::new(&src)?));
        } else if let Some(t) = from_config {
            tok.set_templates(&t)?;
        } else if let Some(t) = read_json(&dir.join("chat_template.json"))? {
            if let Some(t) = t.get("chat_template") {
                tok.set_templates(t)?;
            }
        }
        let tdir = dir.join("additional_chat_templates");
        if let Ok(rd) = std::fs::read_dir(&tdir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "jinja") {
                    let name = p.file_stem().unwrap_or_default().to_string_lossy().to_string();
                    let src = std::fs::read_to_string(&p)
                        .map_err(|e| Error::Load(format!("{}: {e}", p.display())))?;
                    tok.named_templates.insert(name, Arc::new(ChatTemplate::new(&src)?));
                }
            }
        }
        Ok(tok)
    }

    fn set_templates(&mut self, t: &Json) -> Result<(), Error> {
        match t {
            Json::String(src) => self.default_template = Some(Arc::new(ChatTemplate::new(src)?)),
            Json::Array(list) => {
                for item in list {
                    let (Some(name), Some(src)) = (
                        item.get("name").and_then(Json::as_str),
                        item.get("template").and_then(Json::as_str),
                    ) else {
                        return Err(Error::Load(
                            "chat_template entries need `name` and `template`".into(),
                        ));
                    };
                    let t = Arc::new(ChatTemplate::new(src)?);
                    if name == "default" {
                        self.default_template = Some(t.clone());
                    }
                    self.named_templates.insert(name.to_string(), t);
                }
            }
            Json::Null => {}
            _ => return Err(Error::Load("chat_template must be a string or a list".into())),
        }
        Ok(())
    }

    /// Replaces the chat template (vLLM's `--chat-template`).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), Error> {
        self.default_template = Some(Arc::new(ChatTemplate::new(source)?));
        Ok(())
    }

    /// Forces the content format instead of detecting it from the template.
    pub fn set_content_format(&mut self, format: Option<ContentFormat>) {
        self.content_format_override = format;
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.hf.get_vocab_size(true)
    }

    /// True when a default chat template is loaded.
    pub fn has_chat_template(&self) -> bool {
        self.default_template.is_some()
    }

    /// Encodes text, adding the post-processor's special tokens if asked.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Error> {
        let enc = self
            .hf
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token ids of a `/v1/completions` prompt (`prompt` and `add_special_tokens` of
    /// the body): a string is encoded (special tokens added by default), token ids are
    /// used as they are. A batch (a list of prompts) gives its first prompt.
    pub fn encode_completion_body(&self, body: &Json) -> Result<Vec<u32>, Error> {
        let add = match body.get("add_special_tokens") {
            None | Some(Json::Null) => true,
            Some(Json::Bool(b)) => *b,
            Some(_) => {
                return Err(Error::BadRequest("`add_special_tokens` must be a boolean".into()))
            }
        };
        if body.get("prompt_embeds").is_some_and(|p| !p.is_null()) {
            return Err(Error::Unsupported("prompt_embeds".into()));
        }
        let prompt =
            body.get("prompt").ok_or_else(|| Error::BadRequest("`prompt` is required".into()))?;
        match prompt_ids(prompt)? {
            PromptForm::Ids(ids) => Ok(ids),
            PromptForm::Text(t) => self.encode(&t, add),
        }
    }

    /// The token ids of a `/v1/completions` body whose prompt is given as token ids
    /// (`Ok(None)` when it is text); needs no tokenizer.
    pub fn prompt_token_ids(body: &Json) -> Result<Option<Vec<u32>>, Error> {
        let prompt =
            body.get("prompt").ok_or_else(|| Error::BadRequest("`prompt` is required".into()))?;
        match prompt_ids(prompt)? {
            PromptForm::Ids(ids) => Ok(Some(ids)),
            PromptForm::Text(_) => Ok(None),
        }
    }

    /// The template for a request: the request's own (a named template of the tokenizer
    /// or a template source), else `tool_use` when tools are given and there is one, else
    /// the default.
    fn template_for(&self, req: &ChatRequest, has_tools: bool) -> Result<Arc<ChatTemplate>, Error> {
        if let Some(src) = &req.chat_template {
            if let Some(t) = self.named_templates.get(src) {
                return Ok(t.clone());
            }
            let mut cache = self.request_templates.lock();
            if let Some(t) = cache.get(src) {
                return Ok(t.clone());
            }
            let t = Arc::new(ChatTemplate::new(src)?);
            if cache.len() >= TEMPLATE_CACHE {
                cache.clear();
            }
            cache.insert(src.clone(), t.clone());
            return Ok(t);
        }
        if has_tools {
            if let Some(t) = self.named_templates.get("tool_use") {
                return Ok(t.clone());
            }
        }
        self.default_template.clone().ok_or(Error::NoTemplate)
    }

    /// Renders a chat request to the prompt text, as vLLM does before tokenizing.
    pub fn render_chat(&self, req: &ChatRequest) -> Result<String, Error> {
        let drop_tools = self.exclude_tools_when_tool_choice_none
            && req.tool_choice.as_ref().and_then(Json::as_str) == Some("none");
        let tools = match &req.tools {
            Some(t) if !drop_tools => Some(chat::tool_dicts(t)?),
            _ => None,
        };
        let template = self.template_for(req, tools.is_some())?;
        let format = self.content_format_override.unwrap_or(template.content_format);
        let mut conv = chat::conversation(&req.messages, format)?;
        if !template.supports_developer
            && conv.iter().any(|m| m.get("role").and_then(Json::as_str) == Some("developer"))
        {
            conv = chat::developer_to_system(conv);
        }
        // kwargs: server defaults < request's chat_template_kwargs < the request's fields
        // (None values do not override), as vLLM merges them.
        let mut kwargs = Json::Object(self.default_chat_template_kwargs.clone());
        for (k, v) in &req.chat_template_kwargs {
            if !v.is_null() && v.as_str() != Some("auto") {
                kwargs.insert(k, v.clone());
            }
        }
        if req.chat_template_kwargs.iter().any(|(k, v)| k == "chat_template" && !v.is_null()) {
            return Err(Error::BadRequest(
                "chat_template is not allowed in chat_template_kwargs; use the `chat_template` field".into(),
            ));
        }
        if let Some(effort) = &req.reasoning_effort {
            kwargs.insert("reasoning_effort", effort.clone());
            if !req.chat_template_kwargs.iter().any(|(k, _)| k == "enable_thinking") {
                kwargs.insert("enable_thinking", Json::Bool(effort.as_str() != Some("none")));
            }
        }
        let Json::Object(kwargs) = kwargs else { unreachable!() };
        let documents = req.documents.clone().unwrap_or(Json::Null);
        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (k, v) in &self.special_tokens {
            ctx.push((k.clone(), Value::from(v)));
        }
        for (k, v) in &kwargs {
            if template.variables.contains(k) && !HF_BASE_PARAMS.contains(&k.as_str()) {
                ctx.retain(|(n, _)| n != k);
                ctx.push((k.clone(), Value::from(v)));
            }
        }
        let conv_json = Json::Array(conv);
        ctx.push(("messages".into(), Value::from(&conv_json)));
        ctx.push((
            "tools".into(),
            tools.map(|t| Value::from(&Json::Array(t))).unwrap_or(Value::from(())),
        ));
        ctx.push(("documents".into(), Value::from(&documents)));
        ctx.push(("add_generation_prompt".into(), Value::from(req.add_generation_prompt)));
        let ctx: Value = Value::from_iter(ctx);
        let mut text = template.render(ctx)?;
        if req.continue_final_message {
            text = continue_final(&text, &conv_json)?;
        }
        Ok(text)
    }

    /// The token ids of a chat request.
    pub fn encode_chat(&self, req: &ChatRequest) -> Result<Vec<u32>, Error> {
        let text = self.render_chat(req)?;
        match &self.segment_cache {
            Some(c) if !req.add_special_tokens => {
                c.encode(&self.hf, &text).map_err(|e| Error::Encode(e.to_string()))
            }
            _ => self.encode(&text, req.add_special_tokens),
        }
    }

    /// Caches the token ids of rendered-chat segments (the text up to and including each
    /// added token, such as a turn's end marker) in a least-recently-used cache of at
    /// most `max_bytes`, so that a multi-turn chat resending its history only tokenizes
    /// its new turns. The result always equals an uncached encoding; tokenizers for
    /// which that cannot be guaranteed are refused with the reason (see [`cache`]).
    /// `max_bytes == 0` turns the cache off.
    pub fn enable_segment_cache(&mut self, max_bytes: usize) -> Result<(), String> {
        if max_bytes == 0 {
            self.segment_cache = None;
            return Ok(());
        }
        cache::check_splittable(&self.hf)?;
        self.segment_cache = Some(SegmentCache::new(max_bytes));
        Ok(())
    }

    /// The segment cache's statistics, if it is on.
    pub fn segment_cache_stats(&self) -> Option<CacheStats> {
        self.segment_cache.as_ref().map(SegmentCache::stats)
    }

    /// The token ids of a `/v1/chat/completions` body.
    pub fn encode_chat_body(&self, body: &Json) -> Result<Vec<u32>, Error> {
        self.encode_chat(&ChatRequest::from_body(body)?)
    }
}

/// transformers' `continue_final_message`: the rendered chat is cut right after the final
/// message's content, so that the model continues it.
fn continue_final(rendered: &str, conv: &Json) -> Result<String, Error> {
    let last = conv.as_array().and_then(|c| c.last()).and_then(|m| m.get("content"));
    let final_msg = match last {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Json::as_str))
            .map(str::to_string)
            .ok_or_else(|| Error::BadRequest(
                "continue_final_message is set but we could not find any text to continue in the final message!".into(),
            ))?,
        _ => String::new(),
    };
    let stripped = py_strip(&final_msg);
    let Some(loc) = rendered.rfind(stripped) else {
        return Err(Error::BadRequest(
            "continue_final_message is set but the final message does not appear in the chat after applying the chat template!".into(),
        ));
    };
    let lstripped = py_lstrip(&final_msg);
    let end = if rendered.get(loc..loc + lstripped.len()) == Some(final_msg.as_str()) {
        loc + lstripped.len()
    } else {
        loc + stripped.len()
    };
    Ok(rendered[..end.min(rendered.len())].to_string())
}

fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}
fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}
fn py_lstrip(s: &str) -> &str {
    s.trim_start_matches(is_py_space)
}

enum PromptForm {
    Text(String),
    Ids(Vec<u32>),
}

fn ids_of(a: &[Json]) -> Result<Vec<u32>, Error> {
    a.iter()
        .map(|v| match v {
            Json::Number(n) => n
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::BadRequest(format!("token id {n} is not a u32"))),
            _ => Err(Error::BadRequest("a token-id prompt must hold integers only".into())),
        })
        .collect()
}

fn prompt_ids(p: &Json) -> Result<PromptForm, Error> {
    match p {
        Json::String(s) => Ok(PromptForm::Text(s.clone())),
        Json::Array(a) if a.is_empty() => {
            Err(Error::BadRequest("`prompt` must not be empty".into()))
        }
        Json::Array(a) => match &a[0] {
            Json::String(s) => {
                if a.iter().all(|x| matches!(x, Json::String(_))) {
                    Ok(PromptForm::Text(s.clone()))
                } else {
                    Err(Error::BadRequest(
                        "a list prompt must be all strings or all token ids".into(),
                    ))
                }
            }
            Json::Number(_) => ids_of(a).map(PromptForm::Ids),
            Json::Array(first) => {
                if !a.iter().all(|x| matches!(x, Json::Array(_))) {
                    return Err(Error::BadRequest(
                        "a batch of token-id prompts must be lists".into(),
                    ));
                }
                if first.is_empty() {
                    return Err(Error::BadRequest("a token-id prompt must not be empty".into()));
                }
                ids_of(first).map(PromptForm::Ids)
            }
            _ => Err(Error::BadRequest("`prompt` must be a string, strings or token ids".into())),
        },
        _ => Err(Error::BadRequest("`prompt` must be a string, strings or token ids".into())),
    }
}
