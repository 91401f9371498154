//! The vLLM KV event decoder and encoder against vLLM's own payloads
//! (`testdata/vllm/kv_events*.json`), plus malformed and unusual inputs.

use kvroute::events::vllm::{
    batch_to_json, decode, decode_with, encode, DecodeOptions, TokenIds, MAX_DEPTH,
};
use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch, Value};
use kvroute::{Error, Tier};
use serde_json::Value as J;
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm")
}

fn load(name: &str) -> J {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("vector file is JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// `(step name, payload bytes, decoded typed JSON)` for every step that has a batch.
fn batches(file: &str) -> Vec<(String, Vec<u8>, J)> {
    let doc = load(file);
    let steps = doc["steps"].as_array().expect("steps");
    let out: Vec<_> = steps
        .iter()
        .filter(|s| !s["batch"].is_null())
        .map(|s| {
            let b = &s["batch"];
            (
                s["step"].as_str().unwrap().to_owned(),
                unhex(b["payload_hex"].as_str().unwrap()),
                b["decoded"].clone(),
            )
        })
        .collect();
    assert!(out.len() >= 8, "{file}: expected the scripted batches, found {}", out.len());
    out
}

// ----- typed JSON -> expected model, written independently of the decoder -----

fn j_hash(v: &J) -> EngineHash {
    if let Some(u) = v.as_u64() {
        return EngineHash::Int(u);
    }
    EngineHash::Bytes(unhex(v["bytes_hex"].as_str().expect("hash is int or bytes_hex")))
}

fn j_opt_hash(v: &J) -> Option<EngineHash> {
    (!v.is_null()).then(|| j_hash(v))
}

fn j_u32s(v: &J) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| u32::try_from(t.as_u64().unwrap()).unwrap()).collect()
}

fn j_opt_i64(v: &J) -> Option<i64> {
    (!v.is_null()).then(|| v.as_i64().expect("int field"))
}

fn j_opt_str(v: &J) -> Option<String> {
    (!v.is_null()).then(|| v.as_str().expect("str field").to_owned())
}

fn j_value(v: &J) -> Value {
    match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Value::UInt(u),
            (None, Some(i)) => Value::Int(i),
            _ => Value::F64(n.as_f64().unwrap()),
        },
        J::String(s) => Value::Str(s.clone()),
        J::Array(a) => Value::Array(a.iter().map(j_value).collect()),
        J::Object(o) => match (o.get("bytes_hex"), o.get("tuple")) {
            (Some(h), _) => Value::Bin(unhex(h.as_str().unwrap())),
            (_, Some(t)) => j_value(t),
            _ => panic!("unexpected object in decoded value: {v}"),
        },
    }
}

fn j_extra_keys(v: &J) -> Option<Vec<Option<Value>>> {
    (!v.is_null())
        .then(|| v.as_array().unwrap().iter().map(|k| (!k.is_null()).then(|| j_value(k))).collect())
}

fn j_lookahead(v: &J) -> Option<Vec<Vec<u32>>> {
    (!v.is_null()).then(|| v.as_array().unwrap().iter().map(j_u32s).collect())
}

/// Builds a BlockStored from `(field name, JSON value)` pairs; panics on an unknown name so
/// that a field the model lacks cannot go unnoticed.
fn j_stored<'a>(fields: impl Iterator<Item = (&'a str, &'a J)>) -> BlockStored {
    let mut s = BlockStored::default();
    for (k, v) in fields {
        match k {
            "block_hashes" => s.block_hashes = v.as_array().unwrap().iter().map(j_hash).collect(),
            "parent_block_hash" => s.parent_block_hash = j_opt_hash(v),
            "token_ids" => s.token_ids = j_u32s(v),
            "block_size" => s.block_size = u32::try_from(v.as_u64().unwrap()).unwrap(),
            "lora_id" => s.lora_id = j_opt_i64(v),
            "medium" => s.medium = j_opt_str(v),
            "lora_name" => s.lora_name = j_opt_str(v),
            "extra_keys" => s.extra_keys = j_extra_keys(v),
            "group_idx" => s.group_idx = j_opt_i64(v),
            "kv_cache_spec_kind" => s.kv_cache_spec_kind = j_opt_str(v),
            "kv_cache_spec_sliding_window" => s.kv_cache_spec_sliding_window = j_opt_i64(v),
            "locality" => s.locality = j_opt_str(v),
            "ownership" => s.ownership = j_opt_str(v),
            "session_id" => s.session_id = j_opt_str(v),
            "lookahead_token_ids" => s.lookahead_token_ids = j_lookahead(v),
            other => panic!("BlockStored field {other} is not in the model"),
        }
    }
    s
}

fn j_removed<'a>(fields: impl Iterator<Item = (&'a str, &'a J)>) -> BlockRemoved {
    let mut r = BlockRemoved::default();
    for (k, v) in fields {
        match k {
            "block_hashes" => r.block_hashes = v.as_array().unwrap().iter().map(j_hash).collect(),
            "medium" => r.medium = j_opt_str(v),
            "group_idx" => r.group_idx = j_opt_i64(v),
            "locality" => r.locality = j_opt_str(v),
            "ownership" => r.ownership = j_opt_str(v),
            other => panic!("BlockRemoved field {other} is not in the model"),
        }
    }
    r
}

const LEGACY_STORED: [&str; 11] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];

fn j_event(e: &J) -> KvEvent {
    match e {
        J::Object(o) => {
            let fields = o.iter().filter(|(k, _)| *k != "type").map(|(k, v)| (k.as_str(), v));
            match o["type"].as_str().unwrap() {
                "BlockStored" => KvEvent::BlockStored(j_stored(fields)),
                "BlockRemoved" => KvEvent::BlockRemoved(j_removed(fields)),
                "AllBlocksCleared" => {
                    assert_eq!(o.len(), 1);
                    KvEvent::AllBlocksCleared
                }
                t => panic!("unknown type {t}"),
            }
        }
        J::Array(a) => {
            let rest = &a[1..];
            match a[0].as_str().unwrap() {
                "BlockStored" => {
                    assert_eq!(rest.len(), LEGACY_STORED.len());
                    KvEvent::BlockStored(j_stored(LEGACY_STORED.iter().copied().zip(rest)))
                }
                "BlockRemoved" => {
                    let names = ["block_hashes", "medium", "group_idx"];
                    assert_eq!(rest.len(), names.len());
                    KvEvent::BlockRemoved(j_removed(names.iter().copied().zip(rest)))
                }
                "AllBlocksCleared" => {
                    assert!(rest.is_empty());
                    KvEvent::AllBlocksCleared
                }
                t => panic!("unknown type {t}"),
            }
        }
        _ => panic!("event is neither map nor array: {e}"),
    }
}

fn j_batch(d: &J) -> KvEventBatch {
    let a = d.as_array().unwrap();
    assert_eq!(a.len(), 3);
    KvEventBatch {
        ts: a[0].as_f64().unwrap(),
        events: a[1].as_array().unwrap().iter().map(j_event).collect(),
        data_parallel_rank: j_opt_i64(&a[2]),
        skipped_fields: 0,
        skipped_events: 0,
    }
}

// ----- the vectors -----

#[test]
fn every_v033_payload_decodes_to_its_decoded_form() {
    for (step, payload, decoded) in batches("kv_events.json") {
        let got = decode(&payload).unwrap_or_else(|e| panic!("{step}: {e}"));
        assert_eq!(got, j_batch(&decoded), "{step}");
    }
}

#[test]
fn every_legacy_v022_payload_decodes_to_its_decoded_form() {
    for (step, payload, decoded) in batches("kv_events_legacy_v0.22.json") {
        let got = decode(&payload).unwrap_or_else(|e| panic!("{step}: {e}"));
        assert_eq!(got, j_batch(&decoded), "{step}");
    }
}

#[test]
fn legacy_and_current_encodings_agree_on_shared_fields() {
    let current = batches("kv_events.json");
    let mut compared = 0;
    for (step, legacy, _) in batches("kv_events_legacy_v0.22.json") {
        let Some((_, p, _)) = current.iter().find(|(s, _, _)| *s == step) else {
            continue;
        };
        let (old, new) = (decode(&legacy).unwrap(), decode(p).unwrap());
        assert_eq!(old.events.len(), new.events.len(), "{step}");
        for (o, n) in old.events.iter().zip(&new.events) {
            match (o, n) {
                (KvEvent::BlockStored(o), KvEvent::BlockStored(n)) => {
                    // 0.22 had no session_id; everything else is the same logical event.
                    let n = BlockStored { session_id: None, ..n.clone() };
                    assert_eq!(o, &n, "{step}");
                }
                _ => assert_eq!(o, n, "{step}"),
            }
        }
        compared += 1;
    }
    assert!(compared >= 7, "only {compared} steps in common");
}

#[test]
fn v033_payloads_reencode_byte_for_byte() {
    for (step, payload, _) in batches("kv_events.json") {
        let batch = decode(&payload).unwrap();
        assert_eq!(encode(&batch), payload, "{step}");
    }
}

#[test]
fn legacy_payloads_reencode_to_the_v033_bytes() {
    // The same logical events, encoded by kvroute, must give vLLM 0.33's bytes (except
    // where 0.33 added a field: r4's session_id, and the handcrafted batches differ).
    let current = batches("kv_events.json");
    let mut same = 0;
    for (step, legacy, _) in batches("kv_events_legacy_v0.22.json") {
        let Some((_, p, _)) = current.iter().find(|(s, _, _)| *s == step) else {
            continue;
        };
        if step.starts_with("r4") || step.starts_with("handcrafted") {
            continue;
        }
        assert_eq!(&encode(&decode(&legacy).unwrap()), p, "{step}");
        same += 1;
    }
    assert!(same >= 6);
}

#[test]
fn tiers_hashes_and_placeholders_from_vectors() {
    let all = batches("kv_events.json");
    let find = |prefix: &str| {
        decode(&all.iter().find(|(s, _, _)| s.starts_with(prefix)).unwrap().1).unwrap()
    };
    let full = find("handcrafted: every");
    match (&full.events[0], &full.events[1]) {
        (KvEvent::BlockStored(s), KvEvent::BlockRemoved(r)) => {
            assert_eq!(s.tier(), Some(Tier::Cpu));
            assert_eq!(r.tier(), Some(Tier::Cpu));
            assert_eq!(s.parent_block_hash.as_ref().unwrap().to_u64(), u64::MAX);
        }
        other => panic!("unexpected events {other:?}"),
    }
    let minimal = find("handcrafted: minimal");
    assert_eq!(minimal.data_parallel_rank, None);
    let KvEvent::BlockStored(s) = &minimal.events[0] else { panic!() };
    assert_eq!(s.medium, None);
    assert_eq!(s.tier(), Some(Tier::Gpu));

    // Raw 32-byte hashes project to the int hashes the int-hash step sent for the same
    // blocks (r6's first two blocks, tokens 0..31).
    let bytes = find("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0");
    let ints = find("r6 40 tokens");
    let (KvEvent::BlockStored(b), KvEvent::BlockStored(i)) = (&bytes.events[0], &ints.events[2])
    else {
        panic!("unexpected events");
    };
    assert!(b.block_hashes.iter().all(|h| matches!(h, EngineHash::Bytes(v) if v.len() == 32)));
    let projected: Vec<u64> = b.block_hashes.iter().map(EngineHash::to_u64).collect();
    let sent: Vec<u64> = i.block_hashes.iter().map(EngineHash::to_u64).collect();
    assert_eq!(projected, sent);
    assert!(!i.is_placeholder());
}

/// Converts typed JSON to the JSON view's conventions: bytes become lowercase hex strings.
fn plain(v: &J) -> J {
    match v {
        J::Object(o) if o.contains_key("bytes_hex") => o["bytes_hex"].clone(),
        J::Array(a) => J::Array(a.iter().map(plain).collect()),
        J::Object(o) => J::Object(o.iter().map(|(k, v)| (k.clone(), plain(v))).collect()),
        other => other.clone(),
    }
}

#[test]
fn json_view_matches_the_decoded_vectors() {
    for (step, payload, decoded) in batches("kv_events.json") {
        let out = batch_to_json(&decode(&payload).unwrap());
        assert_eq!(out["ts"], decoded[0], "{step}");
        assert_eq!(out["dp_rank"], decoded[2], "{step}");
        let events = out["events"].as_array().unwrap();
        let expected = decoded[1].as_array().unwrap();
        assert_eq!(events.len(), expected.len(), "{step}");
        for (got, want) in events.iter().zip(expected) {
            let (got, want) = (got.as_object().unwrap(), want.as_object().unwrap());
            for (k, v) in want {
                assert_eq!(got.get(k), Some(&plain(v)), "{step}: field {k}");
            }
            // Fields the engine left out are present as null.
            for (k, v) in got {
                if !want.contains_key(k) {
                    assert!(v.is_null(), "{step}: field {k} should be null, is {v}");
                }
            }
        }
    }
}

/// `full` with each `BlockStored`'s token ids moved to `tokens_skipped` where `skip` says.
fn with_tokens_skipped(full: &KvEventBatch, skip: impl Fn(&BlockStored) -> bool) -> KvEventBatch {
    let mut b = full.clone();
    for e in &mut b.events {
        if let KvEvent::BlockStored(s) = e {
            if skip(s) {
                s.tokens_skipped = s.token_ids.len();
                s.token_ids = Vec::new();
            }
        }
    }
    b
}

#[test]
fn skipping_token_ids_keeps_everything_else_and_counts_them() {
    let mut roots = 0;
    for file in ["kv_events.json", "kv_events_legacy_v0.22.json"] {
        for (step, payload, _) in batches(file) {
            let full = decode(&payload).unwrap();
            let keep = decode_with(&payload, DecodeOptions { token_ids: TokenIds::Keep }).unwrap();
            assert_eq!(keep, full, "{file} {step}");
            let skip = decode_with(&payload, DecodeOptions { token_ids: TokenIds::Skip }).unwrap();
            assert_eq!(skip, with_tokens_skipped(&full, |_| true), "{file} {step}");
            let opts = DecodeOptions { token_ids: TokenIds::KeepForRoots };
            let for_roots = decode_with(&payload, opts).unwrap();
            let want = with_tokens_skipped(&full, |s| s.parent_block_hash.is_some());
            assert_eq!(for_roots, want, "{file} {step}");
            for (a, b) in skip.events.iter().zip(&full.events) {
                if let (KvEvent::BlockStored(a), KvEvent::BlockStored(b)) = (a, b) {
                    assert_eq!(a.token_count(), b.token_ids.len());
                    assert_eq!(a.is_placeholder(), b.is_placeholder(), "{file} {step}");
                    roots += usize::from(b.parent_block_hash.is_none() && !b.token_ids.is_empty());
                }
            }
        }
    }
    assert!(roots > 0, "the vectors have root events with tokens");
}

#[test]
fn tokens_before_the_parent_are_kept_for_roots() {
    // A map whose token_ids come before parent_block_hash: when the tokens are read it is
    // not known yet whether the event starts a sequence, so they are kept.
    let tokens_first = |parent: Option<u64>| {
        let m = batch_head(1).stored_head(1).s("parent_block_hash");
        match parent {
            Some(p) => m.u(p).nil().0,
            None => m.nil().nil().0,
        }
    };
    let opts = DecodeOptions { token_ids: TokenIds::KeepForRoots };
    for parent in [None, Some(9)] {
        let p = tokens_first(parent);
        assert_eq!(decode_with(&p, opts).unwrap(), decode(&p).unwrap());
    }
}

// ----- malformed input -----

fn all_payloads() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = batches("kv_events.json").into_iter().map(|b| b.1).collect();
    v.extend(batches("kv_events_legacy_v0.22.json").into_iter().map(|b| b.1));
    v
}

const TOKEN_MODES: [TokenIds; 3] = [TokenIds::Keep, TokenIds::KeepForRoots, TokenIds::Skip];

fn expect_decode_err(payload: &[u8], needle: &str) {
    let full = decode(payload);
    match &full {
        Err(Error::Decode(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
            assert!(msg.contains("at byte "), "message {msg:?} has no offset");
        }
        other => panic!("expected a decode error containing {needle:?}, got {other:?}"),
    }
    // Skipping token ids checks them all the same: the same error, word for word.
    for token_ids in TOKEN_MODES {
        let lazy = decode_with(payload, DecodeOptions { token_ids });
        assert_eq!(format!("{lazy:?}"), format!("{full:?}"), "{token_ids:?}");
    }
}

#[test]
fn every_truncation_of_every_payload_is_an_error() {
    // msgpack is prefix-free: no strict prefix of a value is a complete value.
    for p in all_payloads() {
        for len in 0..p.len() {
            match decode(&p[..len]) {
                Err(Error::Decode(_)) => {}
                other => panic!("prefix of {len}/{} bytes gave {other:?}", p.len()),
            }
            let skip = decode_with(&p[..len], DecodeOptions { token_ids: TokenIds::Skip });
            assert_eq!(format!("{skip:?}"), format!("{:?}", decode(&p[..len])));
        }
        let mut longer = p.clone();
        longer.push(0xc0);
        expect_decode_err(&longer, "trailing");
    }
}

/// A tiny msgpack builder for hand-made payloads.
#[derive(Default)]
struct Mp(Vec<u8>);

impl Mp {
    fn arr(mut self, n: u32) -> Self {
        rmp::encode::write_array_len(&mut self.0, n).unwrap();
        self
    }
    fn map(mut self, n: u32) -> Self {
        rmp::encode::write_map_len(&mut self.0, n).unwrap();
        self
    }
    fn s(mut self, s: &str) -> Self {
        rmp::encode::write_str(&mut self.0, s).unwrap();
        self
    }
    fn u(mut self, v: u64) -> Self {
        rmp::encode::write_uint(&mut self.0, v).unwrap();
        self
    }
    fn i(mut self, v: i64) -> Self {
        rmp::encode::write_sint(&mut self.0, v).unwrap();
        self
    }
    fn f(mut self, v: f64) -> Self {
        rmp::encode::write_f64(&mut self.0, v).unwrap();
        self
    }
    fn nil(mut self) -> Self {
        self.0.push(0xc0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A map-form BlockStored with `n_extra` more entries to follow the 4 given here.
    fn stored_head(self, n_extra: u32) -> Self {
        self.map(4 + n_extra)
            .s("type")
            .s("BlockStored")
            .s("block_hashes")
            .arr(1)
            .u(7)
            .s("token_ids")
            .arr(2)
            .u(1)
            .u(2)
            .s("block_size")
            .u(2)
    }
}

/// A 3-element batch header with `n` events.
fn batch_head(n: u32) -> Mp {
    Mp::default().arr(3).f(1.5).arr(n)
}

fn stored(hashes: &[u64], tokens: &[u32], block_size: u32) -> BlockStored {
    BlockStored {
        block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
        token_ids: tokens.to_vec(),
        block_size,
        ..Default::default()
    }
}

#[test]
fn wrong_types_are_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Mp::default().map(0).0, "expected an array"),
        (Mp::default().arr(1).f(1.0).0, "expected 2 or 3"),
        (Mp::default().arr(3).s("x").arr(0).nil().0, "ts: expected float or int"),
        (Mp::default().arr(3).f(1.0).map(0).nil().0, "events: expected array"),
        (batch_head(1).u(3).nil().0, "events[0].event: expected map or array"),
        (batch_head(1).map(1).s("type").u(1).nil().0, "events[0].type: expected str"),
        (batch_head(1).map(1).s("lora_id").u(1).nil().0, "no \"type\" key"),
        (batch_head(1).arr(0).nil().0, "empty array"),
        (batch_head(1).stored_head(0).nil().u(1).0, "1 trailing bytes"),
        (batch_head(1).stored_head(1).s("block_size").s("16").nil().0, "block_size: expected int"),
        (batch_head(1).stored_head(1).s("token_ids").arr(1).i(-1).nil().0, "out of range"),
        (batch_head(1).stored_head(1).s("token_ids").arr(1).u(1 << 32).nil().0, "out of range"),
        (batch_head(1).stored_head(1).s("block_hashes").arr(1).i(-5).nil().0, "hash -5"),
        (batch_head(1).stored_head(1).s("block_hashes").arr(1).s("ab").nil().0, "int or bin"),
        (batch_head(1).stored_head(1).s("medium").u(1).nil().0, "medium: expected str"),
        (batch_head(1).stored_head(1).s("medium").raw(&[0xa2, 0xff, 0xfe]).nil().0, "UTF-8"),
        (batch_head(1).stored_head(1).s("lora_id").u(u64::MAX).nil().0, "i64 range"),
        (batch_head(1).stored_head(1).s("extra_keys").arr(1).raw(&[0xd4, 1, 0]).nil().0, "ext"),
        (batch_head(1).stored_head(1).s("extra_keys").arr(1).raw(&[0xc1]).nil().0, "0xc1"),
        (batch_head(0).s("rank").0, "data_parallel_rank: expected int"),
        (
            batch_head(1).map(2).s("type").s("BlockStored").s("block_hashes").arr(0).nil().0,
            "required field token_ids",
        ),
        (batch_head(1).map(1).s("type").s("BlockRemoved").nil().0, "required field block_hashes"),
        (batch_head(1).arr(4).s("BlockStored").arr(0).nil().arr(0).nil().0, "block_size"),
    ];
    for (payload, needle) in cases {
        expect_decode_err(&payload, needle);
    }
}

#[test]
fn absurd_declared_lengths_fail_fast() {
    // A 2^32-1 element array in 5 bytes.
    expect_decode_err(&[0xdd, 0xff, 0xff, 0xff, 0xff], "declared 4294967295 elements");
    // The same for the events, token ids, a string, a bin hash, a map and a skipped field.
    let long = [0xff, 0xff, 0xff, 0xff];
    let cases: Vec<Vec<u8>> = vec![
        Mp::default().arr(3).f(1.0).raw(&[0xdd]).raw(&long).0,
        batch_head(1).stored_head(1).s("token_ids").raw(&[0xdd]).raw(&long).0,
        batch_head(1).stored_head(1).s("medium").raw(&[0xdb]).raw(&long).0,
        batch_head(1).stored_head(1).s("block_hashes").arr(1).raw(&[0xc6]).raw(&long).0,
        batch_head(1).raw(&[0xdf]).raw(&long).0,
        batch_head(1).stored_head(1).s("future").raw(&[0xdf]).raw(&long).0,
        batch_head(1).stored_head(1).s("future").raw(&[0xc9]).raw(&long).0,
        batch_head(1).stored_head(1).s("extra_keys").arr(1).raw(&[0xdf]).raw(&long).0,
    ];
    for p in cases {
        match decode(&p) {
            Err(Error::Decode(_)) => {}
            other => panic!("{p:02x?} gave {other:?}"),
        }
    }
}

fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut v = vec![0x91; depth - 1];
    v.push(0x90);
    v
}

#[test]
fn nesting_depth_is_limited_in_values_and_free_in_skipped_fields() {
    // extra_keys entry nested MAX_DEPTH - 1 deep is fine, MAX_DEPTH deep is not.
    let ok = batch_head(1)
        .stored_head(1)
        .s("extra_keys")
        .arr(1)
        .raw(&nested_arrays(MAX_DEPTH - 1))
        .nil()
        .0;
    let batch = decode(&ok).unwrap();
    let KvEvent::BlockStored(s) = &batch.events[0] else { panic!() };
    let mut v = s.extra_keys.as_ref().unwrap()[0].as_ref().unwrap();
    let mut depth = 1;
    while let Value::Array(a) = v {
        match a.first() {
            Some(inner) => {
                v = inner;
                depth += 1;
            }
            None => break,
        }
    }
    assert_eq!(depth, MAX_DEPTH - 1);

    let deep =
        batch_head(1).stored_head(1).s("extra_keys").arr(1).raw(&nested_arrays(MAX_DEPTH)).nil().0;
    expect_decode_err(&deep, "nested deeper");
    let very_deep =
        batch_head(1).stored_head(1).s("extra_keys").arr(1).raw(&nested_arrays(100_000)).nil().0;
    expect_decode_err(&very_deep, "nested deeper");

    // An unknown field is skipped without recursion, however deep.
    let skipped = batch_head(1).stored_head(1).s("future").raw(&nested_arrays(100_000)).nil().0;
    let batch = decode(&skipped).unwrap();
    assert_eq!(batch.skipped_fields, 1);
    assert_eq!(batch.events, vec![KvEvent::BlockStored(stored(&[7], &[1, 2], 2))]);
}

// ----- unknown fields and events, alternative encodings -----

#[test]
fn unknown_fields_and_event_types_are_skipped_and_counted() {
    let payload = Mp::default()
        .arr(4) // a 4th batch element: skipped field #1
        .f(2.0)
        .arr(7)
        // 1. an unknown map event with nested content: skipped event #1
        .map(2)
        .s("type")
        .s("BlockFrobbed")
        .s("x")
        .arr(2)
        .u(1)
        .map(1)
        .s("a")
        .arr(1)
        .raw(&[0xd6, 0x01, 0, 0, 0, 0]) // an ext value inside, skipped whole
        // 2. BlockStored with a nested unknown field (#2), an int key (#3), "type" not first
        .map(7)
        .s("block_hashes")
        .arr(1)
        .u(7)
        .s("future_field")
        .map(1)
        .s("nested")
        .arr(3)
        .u(1)
        .s("two")
        .arr(1)
        .f(3.0)
        .s("type")
        .s("BlockStored")
        .u(9)
        .s("int key")
        .s("token_ids")
        .arr(2)
        .u(1)
        .u(2)
        .s("block_size")
        .u(2)
        .s("medium")
        .s("cpu")
        // 3. BlockRemoved carrying a BlockStored-only field (#4)
        .map(3)
        .s("type")
        .s("BlockRemoved")
        .s("block_hashes")
        .arr(1)
        .u(7)
        .s("token_ids")
        .arr(1)
        .u(1)
        // 4. an unknown array event: skipped event #2
        .arr(3)
        .s("Frob")
        .u(1)
        .arr(1)
        .nil()
        // 5. a legacy BlockStored with two positions beyond the known ones (#5, #6)
        .arr(14)
        .s("BlockStored")
        .arr(1)
        .u(8)
        .u(7)
        .arr(2)
        .u(3)
        .u(4)
        .u(2)
        .nil()
        .s("GPU")
        .nil()
        .nil()
        .u(0)
        .nil()
        .nil()
        .s("extra")
        .u(5)
        // 6. a legacy BlockRemoved with an extra position (#7)
        .arr(5)
        .s("BlockRemoved")
        .arr(1)
        .u(8)
        .s("GPU")
        .u(0)
        .u(1)
        // 7. AllBlocksCleared with an unknown field (#8)
        .map(2)
        .s("type")
        .s("AllBlocksCleared")
        .s("reason")
        .s("reset")
        .u(3) // rank
        .arr(0) // the 4th batch element
        .0;
    let batch = decode(&payload).unwrap();
    assert_eq!(batch.skipped_events, 2);
    assert_eq!(batch.skipped_fields, 8);
    assert_eq!(batch.ts, 2.0);
    assert_eq!(batch.data_parallel_rank, Some(3));
    let mut legacy = stored(&[8], &[3, 4], 2);
    legacy.parent_block_hash = Some(EngineHash::Int(7));
    legacy.medium = Some("GPU".into());
    legacy.group_idx = Some(0);
    let expected = vec![
        KvEvent::BlockStored(BlockStored {
            medium: Some("cpu".into()),
            ..stored(&[7], &[1, 2], 2)
        }),
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash::Int(7)],
            ..Default::default()
        }),
        KvEvent::BlockStored(legacy),
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash::Int(8)],
            medium: Some("GPU".into()),
            group_idx: Some(0),
            ..Default::default()
        }),
        KvEvent::AllBlocksCleared,
    ];
    assert_eq!(batch.events, expected);
    assert_eq!(batch.events[0], expected[0]);
    let KvEvent::BlockStored(s) = &batch.events[0] else { panic!() };
    assert_eq!(s.tier(), Some(Tier::Cpu));
}

#[test]
fn alternative_number_encodings_and_short_batches() {
    // A 2-element batch, int ts, hashes in non-minimal and signed int forms, a bin hash.
    let payload = Mp::default()
        .arr(2)
        .u(1_767_225_601)
        .arr(1)
        .map(5)
        .s("type")
        .s("BlockStored")
        .s("block_hashes")
        .arr(4)
        .raw(&[0xd3, 0, 0, 0, 0, 0, 0, 0, 5]) // int64 5
        .raw(&[0xcc, 6]) // uint8 6
        .raw(&[0xd0, 0x7f]) // int8 127
        .raw(&[0xc4, 3, 1, 2, 3]) // bin of 3 bytes
        .s("parent_block_hash")
        .raw(&[0xd2, 0, 0, 0, 9]) // int32 9
        .s("token_ids")
        .arr(0)
        .s("block_size")
        .u(0)
        .0;
    let batch = decode(&payload).unwrap();
    assert_eq!(batch.ts, 1_767_225_601.0);
    assert_eq!(batch.data_parallel_rank, None);
    let KvEvent::BlockStored(s) = &batch.events[0] else { panic!() };
    assert_eq!(
        s.block_hashes,
        vec![
            EngineHash::Int(5),
            EngineHash::Int(6),
            EngineHash::Int(127),
            EngineHash::Bytes(vec![1, 2, 3])
        ]
    );
    assert_eq!(s.block_hashes[3].to_u64(), 0x010203);
    assert_eq!(s.parent_block_hash, Some(EngineHash::Int(9)));
    // A placeholder: no tokens, block size 0.
    assert!(s.is_placeholder());

    // float32 ts.
    let f32_ts = Mp::default().arr(3).raw(&[0xca]).raw(&2.5f32.to_be_bytes()).arr(0).nil().0;
    assert_eq!(decode(&f32_ts).unwrap().ts, 2.5);
}

#[test]
fn encoder_output_decodes_back_for_built_batches() {
    let mut s = stored(&[1, u64::MAX], &[5; 32], 16);
    s.parent_block_hash = Some(EngineHash::Bytes(vec![9; 32]));
    s.lora_id = Some(-3);
    s.extra_keys = Some(vec![
        None,
        Some(Value::Array(vec![
            Value::Str("a".into()),
            Value::Int(-70_000),
            Value::UInt(1 << 40),
            Value::F64(0.25),
            Value::Bool(true),
            Value::Bin(vec![1, 2]),
            Value::Nil,
            Value::Map(vec![(Value::Str("k".into()), Value::UInt(1))]),
        ])),
    ]);
    s.kv_cache_spec_sliding_window = Some(-1);
    s.lookahead_token_ids = Some(vec![vec![], vec![u32::MAX]]);
    let batch = KvEventBatch {
        ts: -0.5,
        events: vec![
            KvEvent::BlockStored(s),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash::Bytes(vec![])],
                ownership: Some("o".into()),
                ..Default::default()
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(-2),
        skipped_fields: 0,
        skipped_events: 0,
    };
    let bytes = encode(&batch);
    assert_eq!(decode(&bytes).unwrap(), batch);
}

/// A deterministic, in-tree cousin of the `decode_vllm_batch` fuzz target: random byte
/// edits of vLLM's payloads never panic, and whatever decodes re-encodes stably.
#[test]
fn mutated_vector_payloads_never_panic_and_reencode_stably() {
    let mut rng = kvroute::rng::SplitMix64::new(0x6b76_6576);
    let (mut ok, mut err) = (0u32, 0u32);
    for p in all_payloads() {
        for _ in 0..500 {
            let mut m = p.clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(m.len() as u64) as usize;
                match rng.below(3) {
                    0 => m[at] = rng.next_u64() as u8,
                    1 => m.insert(at, rng.next_u64() as u8),
                    _ => {
                        m.remove(at);
                    }
                }
            }
            match decode(&m) {
                Ok(batch) => {
                    ok += 1;
                    let once = encode(&batch);
                    let again = decode(&once).expect("our own encoding decodes");
                    assert_eq!(encode(&again), once, "unstable for {m:02x?}");
                }
                Err(Error::Decode(_)) => err += 1,
                Err(e) => panic!("unexpected error kind {e:?}"),
            }
        }
    }
    // Both paths were exercised.
    assert!(ok > 100 && err > 100, "ok {ok}, err {err}");
}

#[test]
fn skipped_token_ids_of_every_encoding_agree_with_decoding_them() {
    // Token arrays mixing every integer encoding in runs of varying length (the skipper
    // steps over runs of one encoding at a stride), plus encodings only the slow path
    // takes (u64, signed) and invalid ones; every truncation too.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let encodings: [&dyn Fn(u64) -> Vec<u8>; 8] = [
        &|r| vec![(r % 128) as u8],                                 // fixint
        &|r| vec![0xcc, (r % 256) as u8],                           // u8
        &|r| vec![0xcd, (r >> 8) as u8, r as u8],                   // u16
        &|r| [&[0xce][..], &(r as u32).to_be_bytes()[..]].concat(), // u32
        &|r| [&[0xcf][..], &(r % 1000).to_be_bytes()[..]].concat(), // u64, small value
        &|r| vec![0xd0, (r % 100) as u8],                           // i8, non-negative
        &|r| vec![0xe0 | (r % 32) as u8],                           // negative fixint: error
        &|_| vec![0xc1],                                            // reserved: error
    ];
    for case in 0..300 {
        let n = (next() % 40) as u32;
        let mut body = Vec::new();
        let mut i = 0;
        while i < n {
            let pick = next();
            // Mostly valid encodings; an invalid one in about one case of ten.
            let e = if case % 10 == 0 { pick % 8 } else { pick % 6 } as usize;
            let run = 1 + next() % 6;
            for _ in 0..run.min(u64::from(n - i)) {
                body.extend(encodings[e](next()));
                i += 1;
            }
        }
        let p = batch_head(1)
            .map(4)
            .s("type")
            .s("BlockStored")
            .s("block_hashes")
            .arr(0)
            .s("block_size")
            .u(1)
            .s("token_ids")
            .arr(n)
            .raw(&body)
            .nil()
            .0;
        for len in [p.len()].into_iter().chain(0..p.len()) {
            let full = decode(&p[..len]);
            let skip = decode_with(&p[..len], DecodeOptions { token_ids: TokenIds::Skip });
            match (&full, &skip) {
                (Ok(f), Ok(s)) => {
                    let (KvEvent::BlockStored(f), KvEvent::BlockStored(s)) =
                        (&f.events[0], &s.events[0])
                    else {
                        panic!("not a BlockStored")
                    };
                    assert_eq!((f.token_ids.len(), s.tokens_skipped), (n as usize, n as usize));
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "case {case}"),
                _ => panic!("case {case}, {len} bytes: {full:?} vs {skip:?}"),
            }
        }
    }
}
