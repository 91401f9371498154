//! `Router::apply_vllm_batch` decodes the engine hashes straight into its plan (no
//! `Vec<EngineHash>` per event). The public decoder followed by `Router::apply_events` is
//! the reference: for vLLM's recorded payloads and for random (often broken) ones, both
//! paths must give the same result (report or error message), the same metrics and the
//! same index (snapshot bytes), and a rejected batch must leave the router unchanged.

use kvroute::events::vllm::{decode_with, encode, DecodeOptions, TokenIds};
use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch, Value};
use kvroute::router::Router;
use proptest::prelude::*;
use serde_json::Value as J;
use std::path::PathBuf;

/// Router configurations covering each way the apply uses the hashes: engine hashes as
/// keys without and with verification (errors and counted mismatches), native re-keying,
/// and a vocabulary check.
const CONFIGS: [&str; 5] = [
    r#"{"hash_algo": "sha256", "verify_engine_hashes": false, "auto_add_workers": true, "workers": [{"name": "pod-a"}]}"#,
    r#"{"hash_algo": "sha256", "auto_add_workers": true, "workers": [{"name": "pod-a"}]}"#,
    r#"{"hash_algo": "sha256", "hash_seed": "0", "on_hash_mismatch": "count", "workers": [{"name": "pod-a"}]}"#,
    r#"{"hash_algo": "xxh3", "auto_add_workers": true, "workers": [{"name": "pod-a"}]}"#,
    r#"{"hash_algo": "sha256", "vocab_size": 1000, "workers": [{"name": "pod-a"}]}"#,
];

/// What `apply_vllm_batch` documents that it decodes for each configuration.
fn options(cfg: &J) -> DecodeOptions {
    let vllm = cfg["hash_algo"].as_str() == Some("sha256");
    let verify = cfg["verify_engine_hashes"].as_bool().unwrap_or(true);
    let token_ids = if !vllm || !cfg["vocab_size"].is_null() {
        TokenIds::Keep
    } else if verify {
        TokenIds::KeepForRoots
    } else {
        TokenIds::Skip
    };
    DecodeOptions { token_ids }
}

/// Everything observable that an apply changes, minus wall-clock fields.
fn state(r: &Router) -> (Vec<u8>, J) {
    let mut m = serde_json::to_value(r.metrics()).unwrap();
    scrub(&mut m);
    (r.snapshot(), m)
}

/// Drops time-dependent fields (ages, uptimes, timestamps) from a metrics document.
fn scrub(v: &mut J) {
    match v {
        J::Object(map) => {
            map.retain(|k, _| !(k.contains("age") || k.contains("uptime") || k.ends_with("_ms")));
            map.values_mut().for_each(scrub);
        }
        J::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// Applies `payloads` in order on two routers of configuration `cfg`, one through each
/// path, and checks that they agree after every payload.
fn check_same(cfg: &str, payloads: &[Vec<u8>]) {
    let fast = Router::from_json(cfg).unwrap();
    let reference = Router::from_json(cfg).unwrap();
    let opts = options(&serde_json::from_str(cfg).unwrap());
    for (i, p) in payloads.iter().enumerate() {
        let before = (fast.index_stats().holder_blocks, fast.metrics().event_batches);
        let got = fast.apply_vllm_batch("pod-a", p).map_err(|e| e.to_string());
        let want = decode_with(p, opts)
            .and_then(|b| reference.apply_events("pod-a", &b))
            .map_err(|e| e.to_string());
        assert_eq!(got, want, "{cfg}: payload {i}");
        if got.is_err() {
            // (`auto_add_workers` may have added the batch's worker: today's behaviour,
            // compared with the reference below.)
            let after = (fast.index_stats().holder_blocks, fast.metrics().event_batches);
            assert_eq!(before, after, "{cfg}: payload {i}: a rejected batch changed the index");
        }
        assert_eq!(state(&fast), state(&reference), "{cfg}: payload {i}: state differs");
    }
}

fn recorded_payloads() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for file in ["kv_events.json", "kv_events_legacy_v0.22.json"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm").join(file);
        let doc: J = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for s in doc["steps"].as_array().unwrap() {
            if let Some(h) = s["batch"]["payload_hex"].as_str() {
                out.push(
                    (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                        .collect(),
                );
            }
        }
    }
    assert!(out.len() >= 16, "expected the recorded batches, found {}", out.len());
    out
}

#[test]
fn recorded_vllm_batches_give_the_same_state_on_both_paths() {
    let payloads = recorded_payloads();
    for cfg in CONFIGS {
        check_same(cfg, &payloads);
    }
    // Broken variants of each: truncated, and with one byte changed.
    let mut broken = Vec::new();
    for p in &payloads {
        broken.push(p[..p.len() / 2].to_vec());
        for at in [p.len() / 3, p.len() / 2, p.len() - 1] {
            let mut q = p.clone();
            q[at] ^= 0x5a;
            broken.push(q);
        }
        broken.push(p.clone());
    }
    for cfg in CONFIGS {
        check_same(cfg, &broken);
    }
}

fn hash(h: u64, bytes: bool) -> EngineHash {
    if bytes {
        EngineHash::Bytes(h.to_be_bytes()[(h % 4) as usize..].to_vec())
    } else {
        EngineHash::Int(h)
    }
}

/// A random event over a small hash space (so removals hit stored blocks and parents
/// are often known), with the fields the apply looks at drawn from valid and invalid
/// values.
fn event() -> impl Strategy<Value = KvEvent> {
    let stored = (
        prop::collection::vec(0u64..40, 0..6),
        prop::option::of(0u64..40),
        any::<bool>(),
        prop::sample::select(vec![16u32, 16, 16, 0, 8]),
        prop::sample::select(vec![None, Some("GPU"), Some("cpu"), Some("disk"), Some("tape")]),
        prop::option::of(0i64..2),
        0u8..4,
        any::<bool>(),
    )
        .prop_map(|(hs, parent, bytes, bs, medium, group, tok, extra)| {
            let n = hs.len();
            // Token count: right, none (placeholder), one short, or out of a 1,000 vocabulary.
            let token_ids: Vec<u32> = match tok {
                0 | 3 => (0..n * 16).map(|t| (t as u32 * 37) % 900).collect(),
                1 => Vec::new(),
                _ => (0..(n * 16).saturating_sub(1)).map(|t| t as u32 + 5000).collect(),
            };
            KvEvent::BlockStored(BlockStored {
                block_hashes: hs.iter().map(|&h| hash(h, bytes)).collect(),
                parent_block_hash: parent.map(|p| hash(p, bytes)),
                token_ids,
                block_size: bs,
                medium: medium.map(str::to_owned),
                group_idx: group,
                extra_keys: extra.then(|| {
                    (0..n).map(|b| (b % 2 == 0).then(|| Value::Str(format!("img{b}")))).collect()
                }),
                ..Default::default()
            })
        });
    let removed = (prop::collection::vec(0u64..40, 0..6), any::<bool>(), prop::option::of(0i64..2))
        .prop_map(|(hs, bytes, group)| {
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: hs.iter().map(|&h| hash(h, bytes)).collect(),
                group_idx: group,
                ..Default::default()
            })
        });
    prop_oneof![4 => stored, 2 => removed, 1 => Just(KvEvent::AllBlocksCleared)]
}

/// A batch's payload, sometimes broken (truncated or one byte changed).
fn payload() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(event(), 0..5),
        prop::option::of(0i64..3),
        0u8..6,
        any::<prop::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|(events, rank, how, at, byte)| {
            let mut b = KvEventBatch::new(1.5, events);
            b.data_parallel_rank = rank;
            let mut p = encode(&b);
            let i = at.index(p.len());
            match how {
                0 => p.truncate(i),
                1 => p[i] = byte,
                _ => {}
            }
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_batches_give_the_same_state_on_both_paths(
        payloads in prop::collection::vec(payload(), 1..8),
    ) {
        for cfg in CONFIGS {
            check_same(cfg, &payloads);
        }
    }
}

#[test]
fn a_repeated_block_hashes_key_keeps_the_last_on_both_paths() {
    // A map event naming block_hashes twice: the decoder keeps the last array.
    let mut p = vec![0x93, 0xcb];
    p.extend(1.0f64.to_be_bytes());
    p.push(0x91);
    p.push(0x85);
    for (k, v) in [
        ("type", &b"\xabBlockStored"[..]),
        ("block_hashes", &[0x92, 0x01, 0x02][..]),
        ("token_ids", &[0x90][..]),
        ("block_size", &[0x10][..]),
        ("block_hashes", &[0x93, 0x07, 0x08, 0x09][..]),
    ] {
        p.push(0xa0 | k.len() as u8);
        p.extend(k.as_bytes());
        p.extend(v);
    }
    p.push(0xc0);
    let b = decode_with(&p, DecodeOptions::default()).unwrap();
    let KvEvent::BlockStored(s) = &b.events[0] else { panic!("{b:?}") };
    assert_eq!(s.block_hashes, vec![EngineHash::Int(7), EngineHash::Int(8), EngineHash::Int(9)]);
    for cfg in CONFIGS {
        check_same(cfg, std::slice::from_ref(&p));
    }
    let r = Router::from_json(CONFIGS[0]).unwrap();
    let rep = r.apply_vllm_batch("pod-a", &p).unwrap();
    assert_eq!((rep.events, rep.blocks_stored), (1, 3));
}
