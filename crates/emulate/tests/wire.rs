//! The emulator's KV event payloads against vLLM 0.33's own bytes (testdata/vllm).
//!
//! `kv_events.json` is a scripted run of vLLM's real `BlockPool` (8 blocks, block size 16,
//! sha256, PYTHONHASHSEED unset). Driving kvroute's pool through the same steps, keying it
//! with the hasher the emulator uses and turning the events into a batch with the
//! emulator's [`to_batch`] must give vLLM's payload byte for byte.

use kvroute::events::vllm::encode;
use kvroute::hash::{BlockHasher, HashAlgo, HashConfig, RequestExtras};
use kvroute::model::BlockPool;
use kvroute_emulate::engine::to_batch;
use serde_json::Value;
use std::sync::Arc;

fn load(name: &str) -> Value {
    let path = format!("{}/../../testdata/vllm/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vector")).expect("json")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn step<'a>(ev: &'a Value, prefix: &str) -> &'a Value {
    ev["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no step {prefix}"))
}

#[test]
fn payloads_equal_vllm_033_bytes() {
    let ev = load("kv_events.json");
    let hashes = load("block_hashes.json");
    let hasher = BlockHasher::new(HashConfig {
        algo: HashAlgo::Sha256,
        block_size: 16,
        hash_seed: None,
        ..HashConfig::default()
    })
    .unwrap();
    let mut pool = BlockPool::new(8, 16, true).unwrap();

    // r1: tokens 0..99, 7 blocks allocated, 6 full blocks cached.
    let r1: Arc<[u32]> = (0..100).collect::<Vec<u32>>().into();
    let mut k1 = Vec::new();
    hasher.block_keys(&r1, &RequestExtras::default(), &mut k1);
    pool.allocate(1, &k1, 100).unwrap().expect("fits");
    pool.cache_blocks(1, &k1, 6).unwrap();
    let events = pool.drain_events().into_iter().map(|e| (e, Some((r1.clone(), 0)))).collect();
    let s = step(&ev, "r1 ");
    let batch = to_batch(events, 16, s["batch"]["ts"].as_f64().unwrap());
    assert_eq!(hex(&encode(&batch)), s["batch"]["payload_hex"].as_str().unwrap());

    // free r1, then r2 (48 tokens of plain_random_1000) evicts two cached blocks.
    pool.free(1);
    assert!(pool.drain_events().is_empty());
    let r2: Arc<[u32]> = hashes["inputs"]["plain_random_1000"]["token_ids"].as_array().unwrap()
        [..48]
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect::<Vec<u32>>()
        .into();
    let mut k2 = Vec::new();
    hasher.block_keys(&r2, &RequestExtras::default(), &mut k2);
    pool.allocate(2, &k2, 48).unwrap().expect("fits");
    pool.cache_blocks(2, &k2, 3).unwrap();
    let events = pool
        .drain_events()
        .into_iter()
        .map(|e| {
            let src =
                matches!(e, kvroute::model::PoolEvent::Stored { .. }).then(|| (r2.clone(), 0));
            (e, src)
        })
        .collect();
    let s = step(&ev, "r2 ");
    let batch = to_batch(events, 16, s["batch"]["ts"].as_f64().unwrap());
    assert_eq!(hex(&encode(&batch)), s["batch"]["payload_hex"].as_str().unwrap());

    // reset_prefix_cache once nothing runs: AllBlocksCleared.
    pool.free(2);
    assert!(pool.reset_prefix_cache());
    let events = pool.drain_events().into_iter().map(|e| (e, None)).collect();
    let s = step(&ev, "reset_prefix_cache");
    let batch = to_batch(events, 16, s["batch"]["ts"].as_f64().unwrap());
    assert_eq!(hex(&encode(&batch)), s["batch"]["payload_hex"].as_str().unwrap());
}

#[test]
fn a_stored_run_from_a_later_block_carries_its_own_tokens_and_parent() {
    // "r6 grows to 64 tokens: cache blocks 2..3 with parent" in vLLM's run.
    let ev = load("kv_events.json");
    let s = step(&ev, "r6 grows");
    let decoded = &s["batch"]["decoded"][1];
    let stored = decoded.as_array().unwrap().iter().find(|e| e["type"] == "BlockStored").unwrap();
    let hasher =
        BlockHasher::new(HashConfig { algo: HashAlgo::Sha256, ..HashConfig::default() }).unwrap();
    let toks: Arc<[u32]> = (0..64).collect::<Vec<u32>>().into();
    let mut keys = Vec::new();
    hasher.block_keys(&toks, &RequestExtras::default(), &mut keys);
    let mut pool = BlockPool::new(8, 16, true).unwrap();
    pool.allocate(6, &keys, 40).unwrap().expect("fits");
    pool.cache_blocks(6, &keys, 2).unwrap();
    pool.drain_events();
    assert!(pool.grow(6, 64).unwrap());
    pool.cache_blocks(6, &keys, 4).unwrap();
    let events = pool.drain_events().into_iter().map(|e| (e, Some((toks.clone(), 2)))).collect();
    let batch = to_batch(events, 16, 0.0);
    let json = kvroute::events::vllm::batch_to_json(&batch);
    let got = &json["events"][0];
    assert_eq!(got["token_ids"], stored["token_ids"]);
    assert_eq!(
        got["parent_block_hash"].as_u64(),
        stored["parent_block_hash"].as_u64(),
        "{got} vs {stored}"
    );
}
