//! Chat templates rendered the way transformers renders them: a sandboxed Jinja
//! environment with `trim_blocks` and `lstrip_blocks`, loop controls, Python's string and
//! dict methods, transformers' `tojson` (Python's `json.dumps`, no HTML escaping),
//! `raise_exception` and `strftime_now`, and values printed as Python prints them.

use crate::json::{py_json_dumps, py_str, DumpOptions};
use crate::Error;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use std::collections::HashSet;
use std::sync::OnceLock;

/// One compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The variables the template reads that it does not set itself.
    pub(crate) variables: HashSet<String>,
    /// How message content reaches the template (vLLM's content-format detection).
    pub content_format: ContentFormat,
    /// The template source as given.
    pub source: String,
    /// True when the source mentions the `developer` role.
    pub(crate) supports_developer: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("content_format", &self.content_format)
            .field("variables", &self.variables)
            .finish_non_exhaustive()
    }
}

/// How vLLM hands message content to a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// Text parts joined with `"\n"` into one string.
    String,
    /// A list of `{"type": "text", "text": ...}` parts.
    OpenAi,
}

fn regex(pattern: &'static str, cell: &'static OnceLock<regex::Regex>) -> &'static regex::Regex {
    cell.get_or_init(|| regex::Regex::new(pattern).expect("valid regex"))
}

/// vLLM's detection of the content format, by the template's loops: a template that
/// iterates over a message's `content` gets the OpenAI list form, any other the joined
/// string. vLLM walks the Jinja AST; this follows the same loop variables through the
/// template's text (`for m in messages`, `for c in m['content']` / `m.content`).
pub fn detect_content_format(source: &str) -> ContentFormat {
    static FOR: OnceLock<regex::Regex> = OnceLock::new();
    let for_re = regex(r"\{%-?\s*for\s+(\w+)(?:\s*,\s*\w+)?\s+in\s+([^%]+?)\s*-?%\}", &FOR);
    static SET: OnceLock<regex::Regex> = OnceLock::new();
    let set_re = regex(r"\{%-?\s*set\s+([\w.]+)\s*=\s*([^%]+?)\s*-?%\}", &SET);
    // Names bound to the messages (aliases and slices of `messages`).
    let mut msg_lists: Vec<String> = vec!["messages".into()];
    let refers = |expr: &str, name: &str| {
        let e = expr.trim();
        e == name
            || e.starts_with(&format!("{name}["))
            || e.starts_with(&format!("{name}|"))
            || e.starts_with(&format!("{name} |"))
    };
    for _ in 0..3 {
        for c in set_re.captures_iter(source) {
            let (lhs, rhs) = (c[1].to_string(), c[2].to_string());
            if msg_lists.iter().any(|m| refers(&rhs, m)) && !msg_lists.contains(&lhs) {
                msg_lists.push(lhs);
            }
        }
    }
    let mut msg_vars: Vec<String> = Vec::new();
    for c in for_re.captures_iter(source) {
        if msg_lists.iter().any(|m| refers(&c[2], m)) {
            msg_vars.push(c[1].to_string());
        }
    }
    // Names bound to a message's content.
    let mut contents: Vec<String> = Vec::new();
    for v in &msg_vars {
        contents.push(format!("{v}['content']"));
        contents.push(format!("{v}[\"content\"]"));
        contents.push(format!("{v}.content"));
    }
    for c in set_re.captures_iter(source) {
        let rhs = c[2].trim();
        if contents.iter().any(|m| rhs == m || rhs.starts_with(&format!("{m}|"))) {
            contents.push(c[1].to_string());
        }
    }
    for c in for_re.captures_iter(source) {
        if contents.iter().any(|m| refers(&c[2], m)) {
            return ContentFormat::OpenAi;
        }
    }
    ContentFormat::String
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let mut o = DumpOptions::default();
    if let Some(b) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        o.ensure_ascii = b;
    }
    if let Some(ind) = kwargs.get::<Option<Value>>("indent")? {
        o.indent = match ind.kind() {
            ValueKind::Number => Some(" ".repeat(usize::try_from(ind).unwrap_or(0))),
            ValueKind::String => Some(ind.as_str().unwrap_or_default().to_string()),
            _ => None,
        };
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        if seps.len() == 2 {
            o.separators = Some((seps[0].clone(), seps[1].clone()));
        }
    }
    if let Some(b) = kwargs.get::<Option<bool>>("sort_keys")? {
        o.sort_keys = b;
    }
    kwargs.assert_all_used()?;
    Ok(Value::from_safe_string(py_json_dumps(&v, &o)?))
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> Result<Value, minijinja::Error> {
    use std::fmt::Write;
    let now = chrono::Local::now();
    let mut out = String::new();
    write!(out, "{}", now.format(&fmt)).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("bad strftime format {fmt:?}"))
    })?;
    Ok(Value::from(out))
}

/// Drops transformers' `{% generation %}` / `{% endgeneration %}` markers, which only mark
/// assistant spans for training masks and render their body unchanged.
fn strip_generation_tags(source: &str) -> String {
    static GEN: OnceLock<regex::Regex> = OnceLock::new();
    regex(r"\{%-?\s*(?:end)?generation\s*-?%\}", &GEN).replace_all(source, "").into_owned()
}

impl ChatTemplate {
    /// Compiles `source`. Errors name the line of the syntax error.
    pub fn new(source: &str) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let mut s = String::new();
            py_str(&mut s, value);
            out.write_str(&s).map_err(minijinja::Error::from)
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let body = strip_generation_tags(source);
        env.add_template_owned("chat", body)
            .map_err(|e| Error::Template(format!("chat template does not compile: {e:#}")))?;
        let variables = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?
            .undeclared_variables(false);
        Ok(ChatTemplate {
            env,
            variables,
            content_format: detect_content_format(source),
            source: source.to_string(),
            supports_developer: source.contains("\"developer\"") || source.contains("'developer'"),
        })
    }

    /// Renders the template with `ctx` (a map of variables).
    pub fn render(&self, ctx: Value) -> Result<String, Error> {
        let t = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        t.render(ctx).map_err(|e| {
            // raise_exception's message is the template's own reason: give it alone.
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(d) = e.detail() {
                    return Error::Template(d.to_string());
                }
            }
            Error::Template(format!("chat template failed: {e:#}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: Value) -> String {
        ChatTemplate::new(src).unwrap().render(ctx).unwrap()
    }

    #[test]
    fn python_semantics() {
        let ctx = minijinja::context! { x => true, n => Value::from(()), s => " Hi ", d => Value::from_serialize(serde_json::json!({"a": 1})) };
        assert_eq!(
            render("{{ x }} {{ n }} {{ s.strip() }} {{ d }}", ctx.clone()),
            "True None Hi {'a': 1}"
        );
        assert_eq!(
            render("{{ d | tojson }}|{{ '<&>' | tojson }}", ctx.clone()),
            "{\"a\": 1}|\"<&>\""
        );
        assert_eq!(
            render("{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}", ctx.clone()),
            "a=1"
        );
        assert_eq!(
            render(
                "{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
                ctx.clone()
            ),
            "1"
        );
        assert_eq!(render("{{ missing }}|{{ missing is defined }}", ctx.clone()), "|False");
        // trim_blocks / lstrip_blocks and no trailing newline, as transformers sets them.
        assert_eq!(render("  {% if x %}\nA\n  {% endif %}\nB\n", ctx.clone()), "A\nB");
        assert_eq!(render("{% generation %}G{% endgeneration %}", ctx.clone()), "G");
        let err = ChatTemplate::new("{{ raise_exception('no system role') }}")
            .unwrap()
            .render(ctx)
            .unwrap_err();
        assert_eq!(err.to_string(), "no system role");
    }

    #[test]
    fn content_format_detection() {
        assert_eq!(
            detect_content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format("{% for message in messages %}{% for part in message['content'] %}{{ part.text }}{% endfor %}{% endfor %}"),
            ContentFormat::OpenAi
        );
        assert_eq!(
            detect_content_format("{%- set loop_messages = messages[1:] %}{% for m in loop_messages %}{% set c = m.content %}{%- for p in c -%}{{ p }}{% endfor %}{% endfor %}"),
            ContentFormat::OpenAi
        );
    }
}
