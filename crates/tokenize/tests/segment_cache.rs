//! The segment cache ([`Tokenizer::enable_segment_cache`]) never changes a token id: the
//! 210 requests transformers tokenized (testdata/tokenize/vectors.json) give transformers'
//! ids through a cold and a warm cache, and random multi-turn conversations (history
//! resent every turn, contents with whitespace runs, non-ASCII, digits and the models'
//! own special-token strings) give the same ids as the uncached tokenizer, with a large
//! cache and with one small enough to evict all the time.

use kvroute_tokenize::{Json, Tokenizer};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

const MODELS: [&str; 3] = ["chatml", "llama3", "gemma"];

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tokenize")
}

fn load(model: &str, cache_bytes: usize) -> Tokenizer {
    let mut t = Tokenizer::from_path(testdata().join(model)).unwrap();
    t.enable_segment_cache(cache_bytes).unwrap();
    t
}

/// Per model: uncached, cached (64 MB), cached (4 KB: evicts constantly).
fn tokenizers() -> &'static BTreeMap<&'static str, [Tokenizer; 3]> {
    static T: OnceLock<BTreeMap<&'static str, [Tokenizer; 3]>> = OnceLock::new();
    T.get_or_init(|| {
        MODELS.iter().map(|&m| (m, [load(m, 0), load(m, 64 << 20), load(m, 4096)])).collect()
    })
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x {
            Json::Number(n) => n.as_u64().unwrap() as u32,
            _ => panic!("id"),
        })
        .collect()
}

#[test]
fn cached_chats_equal_transformers_for_every_recorded_request() {
    let text = std::fs::read_to_string(testdata().join("vectors.json")).unwrap();
    let doc = Json::parse(&text).unwrap();
    let reqs = doc.get("requests").and_then(Json::as_array).unwrap();
    let mut chats = 0;
    // Twice: the second pass finds every segment in the cache.
    for pass in 0..2 {
        for (i, r) in reqs.iter().enumerate() {
            if r.get("kind").and_then(Json::as_str) != Some("chat") {
                continue;
            }
            let model = r.get("model").and_then(Json::as_str).unwrap();
            let want = ids(r.get("ids").unwrap());
            for (k, tok) in tokenizers()[model].iter().enumerate() {
                let got = tok.encode_chat_body(r.get("body").unwrap()).unwrap();
                assert_eq!(got, want, "request {i} ({model}), tokenizer {k}, pass {pass}");
            }
            chats += 1;
        }
    }
    assert_eq!(chats, 270);
    let s = tokenizers()["chatml"][1].segment_cache_stats().unwrap();
    assert!(s.hits > 0 && s.misses > 0, "{s:?}");
}

/// Pieces that content is made of: whitespace the byte-level pre-tokenizer splits
/// around, text that merges across spaces, non-ASCII, and every model's special-token
/// strings (which the tokenizer extracts from content too).
const PIECES: &[&str] = &[
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \n ",
    "hello",
    " world",
    "Hello",
    "don't",
    "123",
    "4567",
    "é",
    "naïve",
    "東京",
    "✅",
    "🙂",
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "<bos>",
    "<|im_",
    "|>",
    "<",
    "assistant",
    "user",
    "\"q\"",
    "\\",
    "{{",
    "}}",
    "<think>",
    "</think>",
    "<tool_call>",
];

fn content() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..12).prop_map(|v| v.concat())
}

fn conversation() -> impl Strategy<Value = (Option<String>, Vec<String>, bool)> {
    (prop::option::of(content()), prop::collection::vec(content(), 1..8), any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// A conversation grows turn by turn, resending its history each time: every turn's
    /// ids are the uncached tokenizer's, through a large and a tiny cache.
    #[test]
    fn multi_turn_conversations_tokenize_the_same_cached(
        (system, turns, gen) in conversation(),
        model in prop::sample::select(&MODELS[..]),
    ) {
        let toks = &tokenizers()[model];
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(serde_json::json!({"role": role, "content": t}));
            let body = serde_json::json!({
                "messages": messages,
                "add_generation_prompt": role == "user" && gen,
                "chat_template_kwargs": {"date_string": "26 Jul 2024"},
            });
            let body = Json::parse(&body.to_string()).unwrap();
            let want = toks[0].encode_chat_body(&body);
            for tok in &toks[1..] {
                let got = tok.encode_chat_body(&body);
                match (&want, &got) {
                    (Ok(w), Ok(g)) => prop_assert_eq!(w, g, "{} turn {}: {:?}", model, i, body),
                    (Err(w), Err(g)) => prop_assert_eq!(w.to_string(), g.to_string()),
                    _ => prop_assert!(false, "{want:?} vs {got:?}"),
                }
            }
        }
    }
}

#[test]
fn the_tiny_cache_stays_within_its_budget() {
    for m in MODELS {
        let tok = &tokenizers()[m][2];
        let body = Json::parse(
            r#"{"messages": [{"role": "user", "content": "a fairly long message that is cached"}]}"#,
        )
        .unwrap();
        tok.encode_chat_body(&body).unwrap();
        let s = tok.segment_cache_stats().unwrap();
        assert!(s.bytes <= 4096, "{m}: {s:?}");
    }
}

/// A tokenizer where cutting after an added token would change the ids is refused.
#[test]
fn tokenizers_that_look_across_added_tokens_are_refused() {
    let dir = std::env::temp_dir().join(format!("kvroute-segcache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::fs::read_to_string(testdata().join("chatml/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&src).unwrap();
    v["added_tokens"][2]["rstrip"] = serde_json::Value::Bool(true);
    std::fs::write(dir.join("tokenizer.json"), v.to_string()).unwrap();
    let mut t = Tokenizer::from_path(&dir).unwrap();
    let e = t.enable_segment_cache(1 << 20).unwrap_err();
    assert!(e.contains("strips whitespace"), "{e}");
    // And the refusal matters: with rstrip, the whitespace after the token belongs to it,
    // so the text after it does not tokenize alone as it does in place.
    let whole = t.encode("<|im_end|>\n\n  x", false).unwrap();
    let mut parts = t.encode("<|im_end|>", false).unwrap();
    parts.extend(t.encode("\n\n  x", false).unwrap());
    assert_ne!(whole, parts);
    let _ = std::fs::remove_dir_all(&dir);
}
