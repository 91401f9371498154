//! A chat request turned into the conversation vLLM 0.33 hands to the chat template
//! (`parse_chat_messages` and `_postprocess_messages` in vllm/renderers/chat_utils, the
//! tool dicts of `ChatCompletionToolsParam.model_dump()`), and the template's keyword
//! arguments (`ChatCompletionRequest.build_chat_params`, `resolve_chat_template_kwargs`).

use crate::json::Json;
use crate::template::ContentFormat;
use crate::Error;

/// The fields of a `/v1/chat/completions` body that decide the prompt's tokens.
#[derive(Clone, Debug, Default)]
pub struct ChatRequest {
    /// `messages`.
    pub messages: Vec<Json>,
    /// `tools`.
    pub tools: Option<Vec<Json>>,
    /// `tool_choice` (`"none"` drops the tools only when the server is configured so).
    pub tool_choice: Option<Json>,
    /// `add_generation_prompt` (default true).
    pub add_generation_prompt: bool,
    /// `continue_final_message` (default false).
    pub continue_final_message: bool,
    /// `add_special_tokens` (default false for chat).
    pub add_special_tokens: bool,
    /// `documents`.
    pub documents: Option<Json>,
    /// `reasoning_effort`.
    pub reasoning_effort: Option<Json>,
    /// `chat_template` (a request-supplied template).
    pub chat_template: Option<String>,
    /// `chat_template_kwargs`, in request order.
    pub chat_template_kwargs: Vec<(String, Json)>,
}

impl ChatRequest {
    /// Reads the relevant fields of a chat completions body (other fields are ignored,
    /// as the backend will read them). Errors are OpenAI-style 400 reasons.
    pub fn from_body(body: &Json) -> Result<ChatRequest, Error> {
        let Json::Object(_) = body else {
            return Err(Error::BadRequest("the body must be a JSON object".into()));
        };
        let messages = match body.get("messages") {
            Some(Json::Array(m)) => m.clone(),
            Some(_) => return Err(Error::BadRequest("`messages` must be an array".into())),
            None => return Err(Error::BadRequest("`messages` is required".into())),
        };
        let flag = |name: &str, default: bool| -> Result<bool, Error> {
            match body.get(name) {
                None | Some(Json::Null) => Ok(default),
                Some(Json::Bool(b)) => Ok(*b),
                Some(_) => Err(Error::BadRequest(format!("`{name}` must be a boolean"))),
            }
        };
        let tools = match body.get("tools") {
            None | Some(Json::Null) => None,
            Some(Json::Array(t)) => Some(t.clone()),
            Some(_) => return Err(Error::BadRequest("`tools` must be an array".into())),
        };
        let chat_template = match body.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(_) => return Err(Error::BadRequest("`chat_template` must be a string".into())),
        };
        let chat_template_kwargs = match body.get("chat_template_kwargs") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Object(kv)) => kv.clone(),
            Some(_) => {
                return Err(Error::BadRequest("`chat_template_kwargs` must be an object".into()))
            }
        };
        let req = ChatRequest {
            messages,
            tools,
            tool_choice: body.get("tool_choice").cloned(),
            add_generation_prompt: flag("add_generation_prompt", true)?,
            continue_final_message: flag("continue_final_message", false)?,
            add_special_tokens: flag("add_special_tokens", false)?,
            documents: body.get("documents").filter(|d| !d.is_null()).cloned(),
            reasoning_effort: body.get("reasoning_effort").filter(|d| !d.is_null()).cloned(),
            chat_template,
            chat_template_kwargs,
        };
        if req.continue_final_message && req.add_generation_prompt {
            return Err(Error::BadRequest(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                    .into(),
            ));
        }
        Ok(req)
    }
}

fn obj(pairs: Vec<(&str, Json)>) -> Json {
    Json::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

const BILLING_HEADER: &str = "x-anthropic-billing-header";

/// The text of one content part, `None` for a part that is not text. Non-text parts
/// (images, audio, embeddings) are refused: their placeholders and hashes are beyond a
/// text tokenizer.
fn part_text(part: &Json) -> Result<Option<String>, Error> {
    match part {
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(_) => {
            let ty = part.get("type").and_then(Json::as_str).unwrap_or("");
            match ty {
                "text" | "input_text" | "output_text" => match part.get("text") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    _ => Err(Error::BadRequest("a text content part needs a string `text`".into())),
                },
                "refusal" => Ok(part.get("refusal").and_then(Json::as_str).map(str::to_string)),
                "thinking" => Ok(None),
                other => Err(Error::Unsupported(format!(
                    "content parts of type {other:?} (only text is tokenized by kvroute)"
                ))),
            }
        }
        _ => Err(Error::BadRequest("a content part must be an object or a string".into())),
    }
}

/// vLLM's conversation for `messages` under `format`.
pub fn conversation(messages: &[Json], format: ContentFormat) -> Result<Vec<Json>, Error> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Json::Object(_) = m else {
            return Err(Error::BadRequest(format!("messages[{i}] must be an object")));
        };
        let role = match m.get("role") {
            Some(Json::String(r)) => r.clone(),
            _ => return Err(Error::BadRequest(format!("messages[{i}] needs a string `role`"))),
        };
        let parts: Vec<Json> = match m.get("content") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => vec![obj(vec![
                ("type", Json::String("text".into())),
                ("text", Json::String(s.clone())),
            ])],
            Some(Json::Array(a)) => a.clone(),
            Some(_) => {
                return Err(Error::BadRequest(format!(
                    "messages[{i}].content must be a string, an array or null"
                )))
            }
        };
        let mut texts = Vec::with_capacity(parts.len());
        for p in &parts {
            if let Some(t) = part_text(p)? {
                texts.push(t);
            }
        }
        if role == "system" {
            // _strip_claude_code_billing_header: the header line changes every request.
            texts = texts
                .into_iter()
                .filter_map(|t| {
                    if let Some(stripped) = t.strip_prefix(BILLING_HEADER) {
                        let rest = stripped.split_once('\n').map(|x| x.1).unwrap_or("");
                        let _ = stripped;
                        (!rest.is_empty()).then(|| rest.to_string())
                    } else {
                        Some(t)
                    }
                })
                .collect();
        }
        let content = match format {
            ContentFormat::String => Json::String(texts.join("\n")),
            ContentFormat::OpenAi => {
                if role == "tool" {
                    // Tool results in list form become one string.
                    Json::String(texts.join("\n"))
                } else {
                    Json::Array(
                        texts
                            .into_iter()
                            .map(|t| {
                                obj(vec![
                                    ("type", Json::String("text".into())),
                                    ("text", Json::String(t)),
                                ])
                            })
                            .collect(),
                    )
                }
            }
        };
        let mut msg = obj(vec![("role", Json::String(role.clone())), ("content", content)]);
        if role == "assistant" {
            if let Some(tc) = m.get("tool_calls").filter(|t| !t.is_null()) {
                msg.insert("tool_calls", postprocess_tool_calls(tc)?);
            }
            if let Some(r) = m.get("reasoning").filter(|t| !t.is_null()) {
                msg.insert("reasoning", r.clone());
                msg.insert("reasoning_content", r.clone());
            }
        } else if role == "tool" {
            if let Some(id) = m.get("tool_call_id") {
                msg.insert("tool_call_id", id.clone());
            }
        }
        if let Some(Json::String(n)) = m.get("name") {
            msg.insert("name", Json::String(n.clone()));
        }
        if let Some(Json::String(t)) = m.get("task") {
            msg.insert("task", Json::String(t.clone()));
        }
        if role == "developer" {
            msg.insert("tools", m.get("tools").cloned().unwrap_or(Json::Null));
        }
        // An empty tool_calls list is dropped.
        if let Some(Json::Array(a)) = msg.get("tool_calls") {
            if a.is_empty() {
                if let Json::Object(kv) = &mut msg {
                    kv.retain(|(k, _)| k != "tool_calls");
                }
            }
        }
        out.push(msg);
    }
    Ok(out)
}

/// Tool-call arguments become objects (a JSON string is parsed; anything that is not an
/// object becomes `{}`), as vLLM's `_postprocess_messages` does.
fn postprocess_tool_calls(tc: &Json) -> Result<Json, Error> {
    let Json::Array(calls) = tc else {
        return Ok(tc.clone());
    };
    let mut out = Vec::with_capacity(calls.len());
    for item in calls {
        let Json::Object(_) = item else {
            return Err(Error::BadRequest("assistant tool_calls entries must be objects.".into()));
        };
        let ty = item.get("type").and_then(Json::as_str).unwrap_or("function");
        let Some(function @ Json::Object(_)) = item.get("function") else {
            return Err(Error::BadRequest(
                "chat completions only support assistant tool_calls of type 'function'.".into(),
            ));
        };
        if ty != "function" {
            return Err(Error::BadRequest(
                "chat completions only support assistant tool_calls of type 'function'.".into(),
            ));
        }
        let args = match function.get("arguments") {
            Some(a @ Json::Object(kv)) if !kv.is_empty() => a.clone(),
            Some(Json::String(s)) if !s.is_empty() => match Json::parse(s) {
                Ok(p @ Json::Object(_)) => p,
                _ => Json::Object(Vec::new()),
            },
            Some(a) if truthy(a) => match a {
                Json::Object(_) => a.clone(),
                _ => Json::Object(Vec::new()),
            },
            _ => Json::Object(Vec::new()),
        };
        let mut f = function.clone();
        f.insert("arguments", args);
        let mut it = item.clone();
        it.insert("function", f);
        out.push(it);
    }
    Ok(Json::Array(out))
}

/// Python truthiness of a JSON value.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// `ChatCompletionToolsParam.model_dump()`: `{"type": "function", "function": {"name",
/// "description", "parameters"[, "strict"][, "defer_loading"]}}` with absent fields as
/// `null` and unknown fields dropped.
pub fn tool_dicts(tools: &[Json]) -> Result<Vec<Json>, Error> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = match t.get("function") {
                Some(f @ Json::Object(_)) => f,
                _ => {
                    return Err(Error::BadRequest(format!("tools[{i}] needs a `function` object")))
                }
            };
            let name = match f.get("name") {
                Some(Json::String(n)) => n.clone(),
                _ => {
                    return Err(Error::BadRequest(format!(
                        "tools[{i}].function needs a string `name`"
                    )))
                }
            };
            let desc = match f.get("description") {
                None | Some(Json::Null) => Json::Null,
                Some(d @ Json::String(_)) => d.clone(),
                Some(_) => {
                    return Err(Error::BadRequest(format!(
                        "tools[{i}].function.description must be a string"
                    )))
                }
            };
            let params = match f.get("parameters") {
                None | Some(Json::Null) => Json::Null,
                Some(p @ Json::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(Error::BadRequest(format!(
                        "tools[{i}].function.parameters must be an object"
                    )))
                }
            };
            let mut fd = obj(vec![
                ("name", Json::String(name)),
                ("description", desc),
                ("parameters", params),
            ]);
            if let Some(s @ Json::Bool(_)) = f.get("strict") {
                fd.insert("strict", s.clone());
            }
            let defer = f.get("defer_loading").or_else(|| t.get("defer_loading"));
            if let Some(d @ Json::Bool(_)) = defer {
                fd.insert("defer_loading", d.clone());
            }
            let mut td = obj(vec![("type", Json::String("function".into())), ("function", fd)]);
            if let Some(d @ Json::Bool(_)) = t.get("defer_loading") {
                td.insert("defer_loading", d.clone());
            }
            Ok(td)
        })
        .collect()
}

/// vLLM's `_convert_developer_to_system` and `_consolidate_system_messages`, for templates
/// that do not know the developer role.
pub fn developer_to_system(conv: Vec<Json>) -> Vec<Json> {
    let conv: Vec<Json> = conv
        .into_iter()
        .map(|mut m| {
            if m.get("role").and_then(Json::as_str) == Some("developer") {
                m.insert("role", Json::String("system".into()));
                if let Json::Object(kv) = &mut m {
                    kv.retain(|(k, _)| k != "tools");
                }
            }
            m
        })
        .collect();
    let mut system = Vec::new();
    let mut rest = Vec::new();
    let mut consolidate = false;
    for (i, m) in conv.iter().enumerate() {
        if m.get("role").and_then(Json::as_str) == Some("system") {
            if i > 0 || !system.is_empty() {
                consolidate = true;
            }
            let content = match m.get("content") {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| match p {
                        Json::String(s) => Some(s.clone()),
                        Json::Object(_) => p.get("text").and_then(Json::as_str).map(str::to_string),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            };
            if !content.is_empty() {
                system.push(content);
            }
        } else {
            rest.push(m.clone());
        }
    }
    if !consolidate {
        return conv;
    }
    let mut out = vec![obj(vec![
        ("role", Json::String("system".into())),
        ("content", Json::String(system.join("\n\n"))),
    ])];
    out.extend(rest);
    out
}
