//! The native `xxh3` chain against pinned reference keys (`testdata/native/xxh3_keys.json`,
//! computed by an independent Python implementation of the documented formula). Keys
//! persist in snapshots: a change here silently invalidates them.

use kvroute::hash::{BlockHasher, ExtraKey, ExtraKeysStyle, HashAlgo, HashConfig, RequestExtras};
use serde_json::Value as J;
use std::path::PathBuf;

fn vectors() -> J {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/native/xxh3_keys.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u64_hex(v: &J) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn extra_key(v: &J) -> ExtraKey {
    match v {
        J::String(s) => ExtraKey::Str(s.clone()),
        J::Number(n) => ExtraKey::Int(n.as_i64().unwrap()),
        J::Array(a) => ExtraKey::Tuple(a.iter().map(extra_key).collect()),
        J::Object(o) => {
            let h = o["bytes_hex"].as_str().unwrap();
            ExtraKey::Bytes(
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect(),
            )
        }
        other => panic!("bad extra key {other}"),
    }
}

fn hasher(seed: u64, block_size: usize) -> BlockHasher {
    BlockHasher::new(HashConfig {
        algo: HashAlgo::Xxh3,
        block_size,
        hash_seed: None,
        native_seed: seed,
        extra_keys_style: ExtraKeysStyle::V033,
    })
    .unwrap()
}

#[test]
fn roots_match_the_pinned_keys() {
    let v = vectors();
    let roots = v["roots"].as_object().unwrap();
    assert!(roots.len() >= 4);
    for (seed, key) in roots {
        assert_eq!(hasher(seed.parse().unwrap(), 16).native_root(), u64_hex(key), "seed {seed}");
    }
}

#[test]
fn keys_match_the_pinned_vectors() {
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let bs = c["block_size"].as_u64().unwrap() as usize;
        let h = hasher(c["native_seed"].as_u64().unwrap(), bs);
        let tokens: Vec<u32> =
            c["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let parent = (!c["parent"].is_null()).then(|| u64_hex(&c["parent"]));
        let extra: Vec<Option<Vec<ExtraKey>>> = c["extra_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_array().map(|a| a.iter().map(extra_key).collect()))
            .collect();
        let want: Vec<u64> = c["keys"].as_array().unwrap().iter().map(u64_hex).collect();
        assert_eq!(want.len(), tokens.len() / bs, "{name}: the file itself");

        let mut got = Vec::new();
        h.native_keys_from(parent, &tokens, &extra, &mut got);
        assert_eq!(got, want, "{name}: native_keys_from");

        // One block at a time, each from the previous key.
        let mut prev = parent;
        for (i, block) in tokens.chunks_exact(bs).enumerate() {
            let k = h.native_block_key(prev, block, extra.get(i).and_then(Option::as_deref));
            assert_eq!(k, Some(want[i]), "{name}: native_block_key of block {i}");
            prev = k;
        }

        // A request's own keys: from the root, with its extras.
        if parent.is_none() {
            let extras: RequestExtras = match c.get("request_extras") {
                Some(e) => serde_json::from_value(e.clone()).unwrap(),
                None if extra.is_empty() => RequestExtras::default(),
                None => continue, // event-form extra keys only
            };
            for (i, e) in extra.iter().enumerate() {
                assert_eq!(
                    &extras.event_extra_keys(i, bs),
                    e,
                    "{name}: event extra keys of block {i}"
                );
            }
            h.block_keys(&tokens, &extras, &mut got);
            assert_eq!(got, want, "{name}: block_keys");
        }
    }
}
