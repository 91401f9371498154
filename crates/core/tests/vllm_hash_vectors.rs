//! Every vector of vLLM's own block hashes (`testdata/vllm/block_hashes*.json`)
//! must come out byte for byte: none-hash, every pre-image, digest, event u64, and the
//! extra keys in hash and event form.

use kvroute::hash::{
    BlockHasher, ExtraKey, ExtraKeysStyle, HashAlgo, HashConfig, Lora, MmFeature, PromptEmbeds,
    RequestExtras,
};
use serde_json::Value;
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm")
}

fn load(name: &str) -> Value {
    let p = vectors_dir().join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex {s}");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Typed JSON (see the vectors' README) to an extra key.
fn to_key(v: &Value) -> ExtraKey {
    match v {
        Value::String(s) => ExtraKey::Str(s.clone()),
        Value::Number(n) => ExtraKey::Int(n.as_i64().expect("int extra key")),
        Value::Object(m) => {
            if let Some(items) = m.get("tuple") {
                ExtraKey::Tuple(items.as_array().unwrap().iter().map(to_key).collect())
            } else if let Some(h) = m.get("bytes_hex") {
                ExtraKey::Bytes(unhex(h.as_str().unwrap()))
            } else {
                panic!("unknown typed value {v}")
            }
        }
        other => panic!("unexpected extra key {other}"),
    }
}

/// The extra-keys field of a block: `null` or a tuple, as the tuple's elements.
fn to_keys(v: &Value) -> Option<Vec<ExtraKey>> {
    match v {
        Value::Null => None,
        _ => match to_key(v) {
            ExtraKey::Tuple(items) => Some(items),
            other => panic!("extra keys are not a tuple: {other:?}"),
        },
    }
}

fn tokens_of(input: &Value) -> Vec<u32> {
    input["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| u32::try_from(t.as_u64().unwrap()).unwrap())
        .collect()
}

fn extras_of(input: &Value) -> RequestExtras {
    let mut ex = RequestExtras::default();
    if let Some(l) = input.get("lora") {
        ex.lora = Some(Lora {
            name: l["lora_name"].as_str().unwrap().into(),
            path: l["lora_path"].as_str().map(String::from),
        });
    }
    if let Some(s) = input.get("cache_salt") {
        ex.cache_salt = Some(s.as_str().unwrap().into());
    }
    if let Some(mm) = input.get("mm_features") {
        ex.mm = mm
            .as_array()
            .unwrap()
            .iter()
            .map(|f| MmFeature {
                identifier: f["identifier"].as_str().unwrap().into(),
                offset: f["offset"].as_u64().unwrap() as usize,
                length: f["length"].as_u64().unwrap() as usize,
            })
            .collect();
    }
    if let Some(pe) = input.get("prompt_embeds") {
        let dim = pe["dim"].as_u64().unwrap() as usize;
        assert!(pe["dtype"].as_str().unwrap().starts_with("float32 little-endian"));
        let mut data = Vec::new();
        for row in pe["rows_hex"].as_array().unwrap() {
            let bytes = unhex(row.as_str().unwrap());
            assert_eq!(bytes.len(), dim * 4);
            data.extend(
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        ex.prompt_embeds = Some(PromptEmbeds::new(dim, data).unwrap());
    }
    ex
}

/// Checks every vector of one file; returns how many blocks were checked.
fn check_file(name: &str, style: ExtraKeysStyle) -> usize {
    let doc = load(name);
    let block_size = doc["hash_block_size"].as_u64().unwrap() as usize;
    let inputs = &doc["inputs"];
    let mut blocks_checked = 0;
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(!vectors.is_empty());
    for v in vectors {
        let algo: HashAlgo = v["algo"].as_str().unwrap().parse().unwrap();
        let case = v["case"].as_str().unwrap();
        let ctx = format!("{name} {algo} seed={} {case}", v["PYTHONHASHSEED"]);
        let cfg = HashConfig {
            algo,
            block_size: v["hash_block_size"].as_u64().unwrap() as usize,
            hash_seed: v["PYTHONHASHSEED"].as_str().map(String::from),
            native_seed: 0,
            extra_keys_style: style,
        };
        assert_eq!(cfg.block_size, block_size);
        let h = BlockHasher::new(cfg).unwrap();
        assert_eq!(hex(h.none_hash()), v["none_hash_hex"].as_str().unwrap(), "{ctx}");

        let input = &inputs[case];
        let tokens = tokens_of(input);
        let extras = extras_of(input);
        assert_eq!(tokens.len() as u64, v["num_tokens"].as_u64().unwrap(), "{ctx}");

        let expected = v["blocks"].as_array().unwrap();
        assert_eq!(expected.len() as u64, v["num_full_blocks"].as_u64().unwrap());
        let pre = h.preimages(&tokens, &extras);
        let hashes = h.block_hashes(&tokens, &extras);
        let mut keys = vec![12345];
        h.block_keys(&tokens, &extras, &mut keys);
        assert_eq!(pre.len(), expected.len(), "{ctx}");
        assert_eq!(hashes.len(), expected.len(), "{ctx}");
        assert_eq!(keys.len(), expected.len(), "{ctx}");

        for (i, b) in expected.iter().enumerate() {
            let ctx = format!("{ctx} block {i}");
            assert_eq!(b["index"].as_u64().unwrap() as usize, i);
            let start = b["token_start"].as_u64().unwrap() as usize;
            assert_eq!(start, i * block_size, "{ctx}");
            assert_eq!(
                extras.hash_extra_keys(i, block_size, style),
                to_keys(&b["extra_keys"]),
                "{ctx} extra_keys"
            );
            assert_eq!(
                extras.event_extra_keys(i, block_size),
                to_keys(&b["event_extra_keys"]),
                "{ctx} event_extra_keys"
            );
            let parent = if i == 0 { hex(h.none_hash()) } else { hex(&hashes[i - 1].digest) };
            assert_eq!(parent, b["parent_hash_hex"].as_str().unwrap(), "{ctx}");
            assert_eq!(hex(&pre[i]), b["preimage_hex"].as_str().unwrap(), "{ctx} preimage");
            assert_eq!(hex(&hashes[i].digest), b["hash_hex"].as_str().unwrap(), "{ctx}");
            // Parse as u64 from the JSON text, never through a double.
            let ev: u64 = b["event_hash_u64"].to_string().parse().unwrap();
            assert_eq!(hashes[i].event_hash, ev, "{ctx}");
            assert_eq!(keys[i], ev, "{ctx}");
            assert_eq!(format!("{ev:016x}"), b["event_hash_u64_hex"].as_str().unwrap(), "{ctx}");
            blocks_checked += 1;
        }
    }
    blocks_checked
}

#[test]
fn vllm_0_33_vectors_reproduce_exactly() {
    let n = check_file("block_hashes.json", ExtraKeysStyle::V033);
    // 48 vectors: 6 cases of 6 blocks, one of 62, one of 2, per (algo, seed).
    assert_eq!(n, 6 * (6 * 6 + 62 + 2));
}

#[test]
fn vllm_0_30_legacy_vectors_reproduce_exactly() {
    let n = check_file("block_hashes_legacy_v0.30.json", ExtraKeysStyle::V030);
    assert!(n > 0);
}

#[test]
fn equal_identifiers_in_one_block_are_written_twice() {
    // The documented pickle caveat: distinct (non-singleton) string objects are never
    // memoized, while the tag constant is. Two items with the same identifier in block 0.
    let h = BlockHasher::new(HashConfig { algo: HashAlgo::Sha256, ..Default::default() }).unwrap();
    let ex = RequestExtras {
        mm: vec![
            MmFeature { identifier: "img-same".into(), offset: 1, length: 2 },
            MmFeature { identifier: "img-same".into(), offset: 4, length: 2 },
        ],
        ..Default::default()
    };
    let tokens: Vec<u32> = (0..16).collect();
    let pre = &h.preimages(&tokens, &ex)[0];
    let needle = b"\x8c\x08img-same";
    let count = pre.windows(needle.len()).filter(|w| w == needle).count();
    assert_eq!(count, 2);
    // "mm" is written once and fetched once (BINGET).
    let mm = b"\x8c\x02mm";
    assert_eq!(pre.windows(mm.len()).filter(|w| w == mm).count(), 1);
}
