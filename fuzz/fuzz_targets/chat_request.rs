//! Fuzzes kvroute serve's request-parsing path: a `/v1/chat/completions` or
//! `/v1/completions` body (arbitrary bytes) through `kvroute_tokenize` with a real
//! tokenizer and chat template (testdata/tokenize/chatml, with tools and tojson).
//!
//! Nothing a client sends may panic: every input is token ids or an error. When a chat
//! body renders, its token ids must be the encoding of the rendered text. The token-id
//! byte scanner of `/v1/completions` bodies (`ids::scan`) must give serde_json's answer
//! (`ids::parse_serde`) whenever it gives one, for any bytes, on both of its paths.

#![no_main]

use kvroute_tokenize::{ids, ChatRequest, Json, Tokenizer};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/tokenize/chatml");
        Tokenizer::from_path(dir).expect("testdata tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let reference = ids::parse_serde(data);
    let fast = ids::scan(data);
    if let Some(fast) = &fast {
        assert_eq!(Some(fast), reference.as_ref(), "the scanner disagrees with serde_json");
    }
    // The AVX-512 and AVX2 block readers (where the CPU has them) and the SWAR loop
    // answer alike.
    assert_eq!(ids::scan_portable(data), fast, "the scanner's SWAR path disagrees");
    assert_eq!(ids::scan_avx2(data), fast, "the scanner's AVX2 path disagrees");
    assert_eq!(ids::parse(data), reference);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(body) = Json::parse(text) else { return };
    let tok = tokenizer();
    let _ = tok.encode_completion_body(&body);
    if let Ok(req) = ChatRequest::from_body(&body) {
        if let Ok(rendered) = tok.render_chat(&req) {
            let ids = tok.encode_chat(&req).expect("a rendered chat encodes");
            assert_eq!(ids, tok.encode(&rendered, req.add_special_tokens).unwrap());
        }
    }
});
