//! The chat token-id cache (`Tokenizer::enable_segment_cache`) on an 8,340-token
//! multi-turn chat (55 messages, the testdata ChatML tokenizer and template, the same
//! chat as the `serve` bench):
//!
//! - `uncached`: render and tokenize the whole chat (what every request cost before);
//! - `new_turn`: the history was seen before (the previous turn's request) and the chat
//!   adds one new user message, different on every iteration: only it is tokenized;
//! - `resend`: the same chat again (every segment cached).
//!
//! Run: `cargo bench -p kvroute-benches --bench tokenize_cache`.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvroute_tokenize::{Json, Tokenizer};
use std::path::PathBuf;

fn tokenizer(cache_bytes: usize) -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/tokenize/chatml");
    let mut t = Tokenizer::from_path(dir).unwrap();
    t.enable_segment_cache(cache_bytes).unwrap();
    t
}

/// The serve bench's chat: turns of a mixed-language paragraph until 8,192 tokens.
fn chat(tok: &Tokenizer) -> Vec<serde_json::Value> {
    let para = "Routing requests to the worker that already holds the prefix saves prefill time. \
                Le cache KV garde les clés et les valeurs des jetons déjà vus. 東京の天気は晴れです。 ";
    let mut msgs =
        vec![serde_json::json!({"role": "system", "content": "You are a helpful assistant."})];
    let mut turn = 0;
    loop {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        msgs.push(serde_json::json!({"role": role, "content": para.repeat(3)}));
        turn += 1;
        if tok.encode_chat_body(&body(&msgs)).unwrap().len() >= 8192 {
            return msgs;
        }
    }
}

fn body(msgs: &[serde_json::Value]) -> Json {
    Json::parse(&serde_json::json!({"messages": msgs}).to_string()).unwrap()
}

fn bench(c: &mut Criterion) {
    let plain = tokenizer(0);
    let cached = tokenizer(64 << 20);
    let msgs = chat(&plain);
    let whole = body(&msgs);
    let n = plain.encode_chat_body(&whole).unwrap().len();
    assert_eq!(cached.encode_chat_body(&whole).unwrap(), plain.encode_chat_body(&whole).unwrap());
    let mut g = c.benchmark_group("tokenize_chat_8k");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("uncached", |b| b.iter(|| plain.encode_chat_body(black_box(&whole)).unwrap()));
    let mut i = 0u64;
    g.bench_function("new_turn", |b| {
        b.iter_batched(
            || {
                // The previous request (the history) was seen; a new user turn follows.
                i += 1;
                let mut m = msgs.clone();
                if m.last().unwrap()["role"] == "user" {
                    m.push(serde_json::json!({"role": "assistant", "content": "Noted."}));
                }
                m.push(serde_json::json!({"role": "user", "content": format!(
                    "Question {i}: which worker holds the longest prefix of this conversation, and why?"
                )}));
                body(&m)
            },
            |b| cached.encode_chat_body(&b).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("resend", |b| b.iter(|| cached.encode_chat_body(black_box(&whole)).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
