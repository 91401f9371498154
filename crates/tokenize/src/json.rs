//! JSON as Python sees it: an object type that keeps its keys in the order they were
//! written (Python dicts do, and chat templates print tools with `tojson`), Python's
//! `json.dumps` (what transformers' `tojson` filter calls) and Python's `repr`/`str` of
//! values (what Jinja prints for `{{ value }}`).

use minijinja::value::{Value, ValueKind};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use std::fmt::Write;

/// A JSON value whose objects keep their key order (as Python's `json.loads` does).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number(serde_json::Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, in source order. A repeated key keeps its last value at its first
    /// position, as Python's `dict` does.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The value of `key` if this is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Sets `key` (replacing its value in place if present).
    pub fn insert(&mut self, key: &str, value: Json) {
        if let Json::Object(kv) = self {
            if let Some(slot) = kv.iter_mut().find(|(k, _)| k == key) {
                slot.1 = value;
            } else {
                kv.push((key.to_string(), value));
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                Json::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(v)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(Json::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut out = Json::Object(Vec::new());
                while let Some((k, v)) = a.next_entry::<String, Json>()? {
                    out.insert(&k, v);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Json::Object(kv) => {
                let mut map = s.serialize_map(Some(kv.len()))?;
                for (k, v) in kv {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl From<&Json> for Value {
    fn from(j: &Json) -> Value {
        Value::from_serialize(j)
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation for
/// exponents -4..16, else `1e-05` / `1e+16` style.
pub fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Options of Python's `json.dumps` as transformers' `tojson` filter passes them.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    /// `ensure_ascii` (transformers: false).
    pub ensure_ascii: bool,
    /// `indent` as a string prefix per level (`None`: one line).
    pub indent: Option<String>,
    /// `separators` (item, key); `None` picks Python's defaults.
    pub separators: Option<(String, String)>,
    /// `sort_keys`.
    pub sort_keys: bool,
}

/// Python's `json.dumps(value, ...)` of a template value.
pub fn py_json_dumps(v: &Value, o: &DumpOptions) -> Result<String, minijinja::Error> {
    let (item_sep, key_sep) = match &o.separators {
        Some((a, b)) => (a.clone(), b.clone()),
        None if o.indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    dump(&mut out, v, o, &item_sep, &key_sep, 0)?;
    Ok(out)
}

fn newline(out: &mut String, o: &DumpOptions, level: usize) {
    if let Some(ind) = &o.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn key_string(k: &Value) -> Result<String, minijinja::Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None | ValueKind::Undefined => "null".into(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(k.clone()) {
                i.to_string()
            } else {
                py_float(f64::try_from(k.clone()).unwrap_or(f64::NAN))
            }
        }
        _ => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "keys must be str, int, float, bool or None",
            ))
        }
    })
}

fn dump(
    out: &mut String,
    v: &Value,
    o: &DumpOptions,
    item_sep: &str,
    key_sep: &str,
    level: usize,
) -> Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN)));
            }
        }
        ValueKind::String => json_str(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Bytes => json_str(
            out,
            &String::from_utf8_lossy(v.as_bytes().unwrap_or_default()),
            o.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, o, level + 1);
                dump(out, item, o, item_sep, key_sep, level + 1)?;
            }
            newline(out, o, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for k in v.try_iter()? {
                let val = v.get_item(&k)?;
                entries.push((key_string(&k)?, val));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, o, level + 1);
                json_str(out, k, o.ensure_ascii);
                out.push_str(key_sep);
                dump(out, val, o, item_sep, key_sep, level + 1)?;
            }
            newline(out, o, level);
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("Object of type {} is not JSON serializable", v.kind()),
            ))
        }
    }
    Ok(())
}

fn py_str_repr(out: &mut String, s: &str) {
    // Python's repr(str): single quotes unless the string has ' and no ".
    let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(q);
}

/// Python's `repr` of a value (lists and dicts print their items this way).
pub fn py_repr(out: &mut String, v: &Value) {
    match v.kind() {
        ValueKind::String => py_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(it) = v.try_iter() {
                for (i, item) in it.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &item);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(it) = v.try_iter() {
                for (i, k) in it.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &k);
                    out.push_str(": ");
                    py_repr(out, &v.get_item(&k).unwrap_or_default());
                }
            }
            out.push('}');
        }
        _ => py_str(out, v),
    }
}

/// Python's `str` of a value: what Jinja prints for `{{ value }}`.
pub fn py_str(out: &mut String, v: &Value) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if !v.is_integer() => {
            out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN)))
        }
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => py_repr(out, v),
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn objects_keep_key_order_and_dump_like_python() {
        let j = Json::parse(r#"{"z": 1, "a": [true, null, 2.5, "é\n\"x\""], "m": {}}"#).unwrap();
        let v = Value::from(&j);
        let s = py_json_dumps(&v, &DumpOptions::default()).unwrap();
        assert_eq!(s, r#"{"z": 1, "a": [true, null, 2.5, "é\n\"x\""], "m": {}}"#);
        let o = DumpOptions { indent: Some("  ".into()), sort_keys: true, ..Default::default() };
        let s = py_json_dumps(&v, &o).unwrap();
        assert_eq!(
            s,
            "{\n  \"a\": [\n    true,\n    null,\n    2.5,\n    \"é\\n\\\"x\\\"\"\n  ],\n  \"m\": {},\n  \"z\": 1\n}"
        );
        let o = DumpOptions { ensure_ascii: true, ..Default::default() };
        assert_eq!(py_json_dumps(&Value::from("é😀"), &o).unwrap(), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn repeated_keys_keep_the_first_position_and_last_value() {
        let j = Json::parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        let v = Value::from(&j);
        assert_eq!(py_json_dumps(&v, &DumpOptions::default()).unwrap(), r#"{"a": 3, "b": 2}"#);
    }

    #[test]
    fn str_and_repr_follow_python() {
        let j = Json::parse(r#"{"a": ["x", 1, null, true, "it's"]}"#).unwrap();
        let mut s = String::new();
        py_str(&mut s, &Value::from(&j));
        assert_eq!(s, r#"{'a': ['x', 1, None, True, "it's"]}"#);
    }
}
