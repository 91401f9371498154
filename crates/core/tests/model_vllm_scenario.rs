//! The block-pool model against vLLM's own behaviour.
//!
//! 1. A replay of the scripted run of vLLM 0.33.0's real `BlockPool` recorded in
//!    `testdata/vllm/kv_events.json`. The block keys come from the independent
//!    `block_hashes.json` vectors (vLLM's own hash function on the same token inputs), and
//!    the pool must reproduce the recorded events (keys and parents), block ids, hit tokens
//!    and free queues.
//! 2. Property tests: random operation sequences on small pools, checked against a naive
//!    reference model (plain `VecDeque` + `Vec` scans, written from vLLM's Python) and
//!    against invariants (capacity, no eviction of referenced blocks, event balance).

use kvroute::model::{BlockPool, PoolEvent};
use kvroute::BlockKey;
use proptest::prelude::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm")
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The u64 event hashes vLLM computes for `case` (sha256, PYTHONHASHSEED unset).
fn vector_keys(hashes: &Value, case: &str) -> Vec<BlockKey> {
    let v = hashes["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["algo"] == "sha256" && v["PYTHONHASHSEED"].is_null() && v["case"] == case)
        .unwrap_or_else(|| panic!("no sha256 vector for {case}"));
    v["blocks"].as_array().unwrap().iter().map(|b| b["event_hash_u64"].as_u64().unwrap()).collect()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().expect("int hash")).collect()
}

/// The events of a recorded step, in the pool's terms (`[]` when the batch is null).
fn recorded_events(step: &Value) -> Vec<PoolEvent> {
    if step["batch"].is_null() {
        return Vec::new();
    }
    let events = step["batch"]["decoded"][1].as_array().unwrap();
    events
        .iter()
        .map(|e| match e["type"].as_str().unwrap() {
            "BlockStored" => PoolEvent::Stored {
                keys: u64s(&e["block_hashes"]),
                parent: e["parent_block_hash"].as_u64(),
            },
            "BlockRemoved" => PoolEvent::Removed { keys: u64s(&e["block_hashes"]) },
            "AllBlocksCleared" => PoolEvent::Cleared,
            other => panic!("unexpected event type {other}"),
        })
        .collect()
}

fn recorded_queue(step: &Value) -> Option<Vec<(u32, bool)>> {
    let q = step.get("free_queue")?.as_array()?;
    Some(
        q.iter()
            .map(|e| (e["block_id"].as_u64().unwrap() as u32, e["cached"].as_bool().unwrap()))
            .collect(),
    )
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn replays_vllm_block_pool_scenario() {
    let ev = load("kv_events.json");
    let hashes = load("block_hashes.json");
    assert_eq!(ev["hash_algo"], "sha256");
    let bs = ev["block_size"].as_u64().unwrap() as usize;
    let steps = ev["steps"].as_array().unwrap();
    let num_gpu_blocks = steps[0]["num_gpu_blocks"].as_u64().unwrap() as u32;
    assert_eq!((bs, num_gpu_blocks), (16, 8));

    // Inputs as kv_events.json describes them, keyed by vLLM's own hashes of those inputs.
    let plain = vector_keys(&hashes, "plain_0_99"); // tokens 0..99
    let r1 = plain[..6].to_vec(); // r1 and r3: tokens 0..99, 6 full blocks
    let r2 = vector_keys(&hashes, "plain_random_1000")[..3].to_vec(); // first 48 tokens
    let r4 = vector_keys(&hashes, "lora_and_cache_salt")[..3].to_vec(); // tokens 0..47
    let r5 = vector_keys(&hashes, "multimodal")[..3].to_vec(); // tokens 0..47
    let r6 = plain[..4].to_vec(); // tokens 0..39, then 0..63

    let mut pool = BlockPool::new(num_gpu_blocks, bs, true).unwrap();
    let mut replayed = 0;
    for step in steps {
        let name = step["step"].as_str().unwrap();
        match name {
            "init" => {}
            "r1 allocate 7 blocks, cache 6 full blocks" => {
                let a = pool.allocate(1, &r1, 100).unwrap().unwrap();
                assert_eq!((a.hit_blocks, a.new_blocks), (0, 7));
                pool.cache_blocks(1, &r1, 6).unwrap();
                assert_eq!(pool.request_blocks(1).unwrap(), ids(&step["block_ids"]).as_slice());
            }
            "free r1 (reversed)" => assert!(pool.free(1)),
            "r2 allocate 3 blocks (evicts LRU cached blocks), cache 3" => {
                pool.allocate(2, &r2, 48).unwrap().unwrap();
                pool.cache_blocks(2, &r2, 3).unwrap();
                assert_eq!(pool.request_blocks(2).unwrap(), ids(&step["block_ids"]).as_slice());
            }
            "r3 (same tokens as r1) prefix lookup + touch" => {
                // Only the lookup and touch: a token budget of 0 new tokens.
                assert_eq!(pool.computed_prefix(&r1, 100), 4);
                let a = pool.allocate_chunk(3, &r1, 100, 0).unwrap().unwrap();
                assert_eq!(a.hit_tokens as u64, step["hit_tokens"].as_u64().unwrap());
                assert_eq!(a.new_blocks, 0);
                assert_eq!(pool.request_blocks(3).unwrap(), ids(&step["hit_block_ids"]).as_slice());
            }
            "free r3 and r2" => {
                assert!(pool.free(3));
                assert!(pool.free(2));
            }
            "reset_prefix_cache" => {
                assert_eq!(pool.reset_prefix_cache(), step["result"].as_bool().unwrap());
            }
            // r4 and r5 are short requests that finish once cached: r6's evictions show
            // r4's blocks back in the free queue.
            "r4 LoRA+cache_salt, cache 3 blocks" => {
                pool.allocate(4, &r4, 48).unwrap().unwrap();
                pool.cache_blocks(4, &r4, 3).unwrap();
                assert!(pool.free(4));
            }
            "r5 multimodal, cache 3 blocks" => {
                pool.allocate(5, &r5, 48).unwrap().unwrap();
                pool.cache_blocks(5, &r5, 3).unwrap();
                assert!(pool.free(5));
            }
            "r6 40 tokens: evict + cache 2 full blocks" => {
                let a = pool.allocate(6, &r6[..2], 40).unwrap().unwrap();
                assert_eq!((a.hit_blocks, a.new_blocks), (0, 3));
                pool.cache_blocks(6, &r6, 2).unwrap();
            }
            "r6 grows to 64 tokens: cache blocks 2..3 with parent" => {
                assert!(pool.grow(6, 64).unwrap());
                pool.cache_blocks(6, &r6, 4).unwrap();
            }
            // Encoding-only steps (raw-bytes hashes, hand-built batches): not pool steps.
            n if n.starts_with("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0")
                || n.starts_with("handcrafted") =>
            {
                continue;
            }
            other => panic!("step not mapped to pool calls: {other:?}"),
        }
        replayed += 1;
        assert_eq!(pool.drain_events(), recorded_events(step), "events of step {name:?}");
        if let Some(q) = recorded_queue(step) {
            assert_eq!(pool.free_queue_snapshot(), q, "free queue after step {name:?}");
        }
    }
    assert_eq!(replayed, 11, "every pool step of the recording was replayed");
}

// ---------------------------------------------------------------------------------------
// Naive reference model, written straight from vLLM's Python (O(n) everywhere).

#[derive(Default)]
struct Naive {
    bs: usize,
    free: VecDeque<u32>,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<u64>>,
    /// key -> block ids in insertion order (vLLM's BlockHashToBlockMap).
    map: Vec<(u64, Vec<u32>)>,
    reqs: HashMap<u64, (Vec<u32>, usize)>,
    events: Vec<PoolEvent>,
}

impl Naive {
    fn new(n: u32, bs: usize) -> Self {
        Naive {
            bs,
            free: (1..n).collect(),
            ref_cnt: vec![0; n as usize],
            hash: vec![None; n as usize],
            ..Default::default()
        }
    }
    fn get(&self, k: u64) -> Option<u32> {
        self.map.iter().find(|(key, v)| *key == k && !v.is_empty()).map(|(_, v)| v[0])
    }
    fn pop_new(&mut self, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for _ in 0..n {
            let b = self.free.pop_front().unwrap();
            if let Some(k) = self.hash[b as usize].take() {
                let e = self.map.iter_mut().find(|(key, _)| *key == k).unwrap();
                e.1.retain(|&x| x != b);
                self.map.retain(|(_, v)| !v.is_empty());
                self.events.push(PoolEvent::Removed { keys: vec![k] });
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        out
    }
    fn allocate(
        &mut self,
        req: u64,
        keys: &[u64],
        n_tok: usize,
        budget: usize,
    ) -> Option<(usize, usize)> {
        let max = ((n_tok - 1) / self.bs).min(keys.len());
        let mut hits = Vec::new();
        for &k in &keys[..max] {
            match self.get(k) {
                Some(b) => hits.push(b),
                None => break,
            }
        }
        let hit_tokens = hits.len() * self.bs;
        let need = (hit_tokens + budget.min(n_tok - hit_tokens)).div_ceil(self.bs);
        let new = need - hits.len();
        let evictable = hits.iter().filter(|&&b| self.ref_cnt[b as usize] == 0).count();
        if new + evictable > self.free.len() {
            return None;
        }
        for &b in &hits {
            if self.ref_cnt[b as usize] == 0 {
                let pos = self.free.iter().position(|&x| x == b).unwrap();
                self.free.remove(pos);
            }
            self.ref_cnt[b as usize] += 1;
        }
        let mut blocks = hits.clone();
        blocks.extend(self.pop_new(new));
        self.reqs.insert(req, (blocks, hits.len()));
        Some((hits.len(), new))
    }
    fn grow(&mut self, req: u64, total: usize) -> bool {
        let have = self.reqs[&req].0.len();
        let need = total.div_ceil(self.bs).saturating_sub(have);
        if need > self.free.len() {
            return false;
        }
        let nb = self.pop_new(need);
        self.reqs.get_mut(&req).unwrap().0.extend(nb);
        true
    }
    fn cache(&mut self, req: u64, keys: &[u64], upto: usize) {
        let (blocks, nc) = self.reqs.get_mut(&req).unwrap();
        if upto <= *nc {
            return;
        }
        let from = *nc;
        *nc = upto;
        let blocks = blocks.clone();
        for i in from..upto {
            let b = blocks[i];
            self.hash[b as usize] = Some(keys[i]);
            match self.map.iter_mut().find(|(k, _)| *k == keys[i]) {
                Some(e) => e.1.push(b),
                None => self.map.push((keys[i], vec![b])),
            }
        }
        let parent = if from == 0 { None } else { Some(keys[from - 1]) };
        self.events.push(PoolEvent::Stored { keys: keys[from..upto].to_vec(), parent });
    }
    fn free(&mut self, req: u64) {
        let Some((blocks, _)) = self.reqs.remove(&req) else {
            return;
        };
        let (mut front, mut back) = (Vec::new(), Vec::new());
        for &b in blocks.iter().rev() {
            self.ref_cnt[b as usize] -= 1;
            if self.ref_cnt[b as usize] == 0 {
                if self.hash[b as usize].is_some() {
                    back.push(b)
                } else {
                    front.push(b)
                }
            }
        }
        for &b in front.iter().rev() {
            self.free.push_front(b);
        }
        self.free.extend(back);
    }
    fn reset(&mut self) -> bool {
        if self.free.len() + 1 != self.ref_cnt.len() {
            return false;
        }
        self.map.clear();
        self.hash.iter_mut().for_each(|h| *h = None);
        self.events.push(PoolEvent::Cleared);
        true
    }
    fn queue(&self) -> Vec<(u32, bool)> {
        self.free.iter().map(|&b| (b, self.hash[b as usize].is_some())).collect()
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// New request `req` on document `doc` with `tokens` prompt tokens and a token budget.
    Alloc {
        req: u64,
        doc: u64,
        tokens: usize,
        budget: usize,
    },
    Grow {
        req: u64,
        extra: usize,
    },
    Cache {
        req: u64,
        upto: usize,
    },
    Free {
        req: u64,
    },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6, 0u64..3, 1usize..40, prop_oneof![Just(usize::MAX), 0usize..20])
            .prop_map(|(req, doc, tokens, budget)| Op::Alloc { req, doc, tokens, budget }),
        2 => (0u64..6, 1usize..12).prop_map(|(req, extra)| Op::Grow { req, extra }),
        3 => (0u64..6, 0usize..12).prop_map(|(req, upto)| Op::Cache { req, upto }),
        3 => (0u64..6).prop_map(|req| Op::Free { req }),
        1 => Just(Op::Reset),
    ]
}

/// Key chain of a document: blocks of the same document share prefixes across requests.
fn doc_keys(doc: u64) -> Vec<u64> {
    (0..64).map(|i| (doc << 32) | i).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn pool_matches_naive_model_and_keeps_invariants(
        n in 2u32..14,
        bs in 1usize..5,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut pool = BlockPool::new(n, bs, true).unwrap();
        let mut naive = Naive::new(n, bs);
        // Per running request: (doc, slots in tokens).
        let mut running: HashMap<u64, (u64, usize)> = HashMap::new();
        // Stored-minus-removed count per key, from the events alone.
        let mut balance: HashMap<u64, i64> = HashMap::new();
        for op in ops {
            // Blocks (and their keys) of running requests before the op, to check that
            // nothing referenced gets evicted.
            let held_before: Vec<(u64, Vec<u32>, usize)> = running
                .keys()
                .map(|&r| (r, pool.request_blocks(r).unwrap().to_vec(), pool.request_cached_blocks(r).unwrap()))
                .collect();
            match op.clone() {
                Op::Alloc { req, doc, tokens, budget } => {
                    let keys = doc_keys(doc);
                    let full = &keys[..tokens / bs];
                    let got = pool.allocate_chunk(req, full, tokens, budget);
                    match running.entry(req) {
                        std::collections::hash_map::Entry::Occupied(_) => prop_assert!(got.is_err()),
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            let got = got.unwrap();
                            let want = naive.allocate(req, full, tokens, budget);
                            prop_assert_eq!(got.map(|a| (a.hit_blocks, a.new_blocks)), want);
                            if let Some(a) = got {
                                let len = pool.request_blocks(req).unwrap().len();
                                prop_assert_eq!(a.hit_blocks, len - a.new_blocks);
                                slot.insert((doc, len * bs));
                            }
                        }
                    }
                }
                Op::Grow { req, extra } => {
                    let got = pool.grow(req, running.get(&req).map_or(0, |r| r.1) + extra);
                    match running.get_mut(&req) {
                        None => prop_assert!(got.is_err()),
                        Some(r) => {
                            let ok = got.unwrap();
                            prop_assert_eq!(ok, naive.grow(req, r.1 + extra));
                            if ok {
                                r.1 += extra;
                            }
                        }
                    }
                }
                Op::Cache { req, upto } => {
                    let keys = doc_keys(running.get(&req).map_or(0, |r| r.0));
                    let got = pool.cache_blocks(req, &keys, upto);
                    match pool.request_blocks(req) {
                        Some(b) if upto <= b.len() => {
                            prop_assert!(got.is_ok());
                            naive.cache(req, &keys, upto);
                        }
                        _ => prop_assert!(got.is_err()),
                    }
                }
                Op::Free { req } => {
                    prop_assert_eq!(pool.free(req), running.remove(&req).is_some());
                    naive.free(req);
                }
                Op::Reset => prop_assert_eq!(pool.reset_prefix_cache(), naive.reset()),
            }

            // Same queue, same events as the naive model.
            prop_assert_eq!(pool.free_queue_snapshot(), naive.queue());
            let events = pool.drain_events();
            prop_assert_eq!(&events, &std::mem::take(&mut naive.events));

            // Capacity: held blocks and free blocks partition 1..n.
            let mut held: HashSet<u32> = HashSet::new();
            for &r in running.keys() {
                held.extend(pool.request_blocks(r).unwrap().iter().copied());
            }
            let queue = pool.free_queue_snapshot();
            prop_assert_eq!(held.len() + queue.len(), n as usize - 1);
            prop_assert_eq!(pool.num_used() + pool.num_free(), n as usize - 1);
            for (b, _) in &queue {
                prop_assert!(*b != 0 && !held.contains(b));
            }

            // Referenced blocks are never evicted: a running request keeps its blocks and
            // its cached keys stay cached.
            for (r, blocks, cached) in held_before {
                if let Some(now) = pool.request_blocks(r) {
                    prop_assert_eq!(&now[..blocks.len()], blocks.as_slice());
                    if !matches!(op, Op::Reset) {
                        let keys = doc_keys(running[&r].0);
                        for k in &keys[..cached] {
                            prop_assert!(pool.is_cached(*k));
                        }
                    }
                }
            }

            // Event balance: stored - removed per key == copies present.
            for e in &events {
                match e {
                    PoolEvent::Stored { keys, .. } => keys.iter().for_each(|k| *balance.entry(*k).or_default() += 1),
                    PoolEvent::Removed { keys } => keys.iter().for_each(|k| *balance.entry(*k).or_default() -= 1),
                    PoolEvent::Cleared => balance.clear(),
                }
            }
            prop_assert!(balance.values().all(|&c| c >= 0));
            prop_assert_eq!(balance.values().sum::<i64>() as usize, pool.num_cached_blocks());
            for (k, c) in &balance {
                prop_assert_eq!(*c > 0, pool.is_cached(*k));
            }
            let usage = pool.usage();
            prop_assert!((0.0..=1.0).contains(&usage));
        }
    }
}
