//! kvroute's tokenization against Python transformers: testdata/tokenize holds three
//! model directories (a BPE trained with the Python `tokenizers` package, chat templates
//! in the styles of ChatML/Qwen, Llama 3 and Gemma) and 210 requests with the token ids
//! transformers computed for them (`AutoTokenizer`, `apply_chat_template`, with the
//! conversation prepared as vLLM 0.33 prepares it). Regenerate with
//! `python crates/py/tests/tokenize_fixtures.py testdata/tokenize`.

use kvroute_tokenize::{Json, Tokenizer};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tokenize")
}

#[test]
fn token_ids_equal_transformers_for_every_recorded_request() {
    let text = std::fs::read_to_string(testdata().join("vectors.json")).unwrap();
    let doc = Json::parse(&text).unwrap();
    let reqs = doc.get("requests").and_then(Json::as_array).unwrap();
    assert!(reqs.len() >= 200, "{} requests", reqs.len());
    let mut toks: BTreeMap<String, Tokenizer> = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for (i, r) in reqs.iter().enumerate() {
        let model = r.get("model").and_then(Json::as_str).unwrap().to_string();
        let tok = toks
            .entry(model.clone())
            .or_insert_with(|| Tokenizer::from_path(testdata().join(&model)).unwrap());
        let kind = r.get("kind").and_then(Json::as_str).unwrap();
        let body = r.get("body").unwrap();
        let want: Vec<u32> = r
            .get("ids")
            .and_then(Json::as_array)
            .unwrap()
            .iter()
            .map(|v| match v {
                Json::Number(n) => n.as_u64().unwrap() as u32,
                _ => panic!("id"),
            })
            .collect();
        let got = match kind {
            "completion" => tok.encode_completion_body(body),
            _ => tok.encode_chat_body(body),
        }
        .unwrap_or_else(|e| panic!("request {i} ({model} {kind}): {e}"));
        if got != want {
            let rendered = kvroute_tokenize::ChatRequest::from_body(body)
                .ok()
                .and_then(|c| tok.render_chat(&c).ok());
            panic!(
                "request {i} ({model} {kind}) differs\nbody: {}\nrendered: {rendered:?}\nwant {want:?}\ngot  {got:?}",
                serde_json::to_string(body).unwrap()
            );
        }
        *kinds.entry((model, kind.to_string())).or_insert(0) += 1;
    }
    // Every model has both kinds.
    assert_eq!(kinds.len(), 6, "{kinds:?}");
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let tok = Tokenizer::from_path(testdata().join("gemma")).unwrap();
    let cases = [
        r#"{"messages": "hi"}"#,
        r#"{"messages": [{"content": "no role"}]}"#,
        r#"{"messages": [{"role": "user", "content": 5}]}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#,
        r#"{"messages": [{"role": "assistant", "content": "model first"}]}"#,
        r#"{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true, "continue_final_message": true}"#,
    ];
    for c in cases {
        let body = Json::parse(c).unwrap();
        assert!(tok.encode_chat_body(&body).is_err(), "{c}");
    }
    // The template's own reason comes back as the message.
    let body = Json::parse(r#"{"messages": [{"role": "assistant", "content": "x"}]}"#).unwrap();
    let e = tok.encode_chat_body(&body).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must alternate"), "{e}");
    for c in [
        r#"{"prompt": []}"#,
        r#"{"prompt": [1, "a"]}"#,
        r#"{"prompt": [-1]}"#,
        r#"{}"#,
        r#"{"prompt": [[]]}"#,
    ] {
        let body = Json::parse(c).unwrap();
        assert!(tok.encode_completion_body(&body).is_err(), "{c}");
    }
    // Token ids are used as they are, batches give their first prompt.
    let body = Json::parse(r#"{"prompt": [[5, 6, 7], [8]]}"#).unwrap();
    assert_eq!(tok.encode_completion_body(&body).unwrap(), vec![5, 6, 7]);
}
