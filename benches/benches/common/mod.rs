//! Shared set-up of the router benchmarks (`route`, `route_ingest`, `events`): a router
//! holding about 1M blocks over 64 workers, populated through the real ingest path
//! (`Router::apply_events` with `BlockStored` events built in code).
//!
//! Population (the shape of `benches/index.rs`, with real tokens so the router can key
//! them):
//! - 64 workers `w00`..`w63` in 8 groups (worker `w` in group `w % 8`).
//! - Group `g`'s system prompt: segment `1 + g`, 256 blocks, held by its 8 workers.
//! - Each worker holds 61 conversations: its group's system prompt ++ 256 blocks of its
//!   own (segment `0x10000 + w * 1024 + c`). The first conversation is sent as events from
//!   the root; later ones only announce the 256 new blocks, under the system prompt's last
//!   block (as vLLM does when the prefix is already cached).
//! - 8 * 256 + 64 * 61 * 256 = 1,001,472 distinct blocks, 1,015,808 holder-blocks.
//!
//! Token `p` (0-based within a segment) of segment `s` is `sm((s << 32) | p) % 128_000`
//! (a Llama-3-sized vocabulary, so most ids take 3 or 5 bytes of msgpack). The engine
//! hashes in the events are W1 chain keys of the same `(segment, blocks)` parts
//! ([`kvroute_benches::chain_keys`]): unique per prefix, shared by workers that hold the
//! same prefix, exactly like a real engine's prefix hashes. They stand in for vLLM's
//! `sha256_cbor` integer hashes: with `hash_algo: "xxh3"` the router re-keys every block
//! from its tokens and only uses the engine hashes to map parents and removals; with a
//! vLLM scheme and `verify_engine_hashes: false` it keys blocks by them directly.
#![allow(dead_code)] // each bench binary uses a different subset

use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch};
use kvroute::router::{LoadReport, Request, Router};
use kvroute_benches::{chain_keys, sm, EVENT_BLOCKS};

/// Workers in the router.
pub const WORKERS: u32 = 64;
/// Worker groups (one system prompt each).
pub const GROUPS: u32 = 8;
/// Blocks of a group's system prompt.
pub const SYSTEM: usize = 256;
/// Own blocks of each conversation.
pub const OWN: usize = 256;
/// Conversations per worker.
pub const CONVERSATIONS: u32 = 61;
/// Tokens per block.
pub const BLOCK: usize = 16;
/// Blocks of a route prompt (8,192 tokens).
pub const PROMPT_BLOCKS: usize = 512;
/// Segment numbers of probe documents.
pub const PROBE: u64 = 0x100_0000;
/// Segment numbers of chains made up for ingest and event benches (never routed).
pub const FRESH: u64 = 0x200_0000;
/// Vocabulary size the token generator draws from.
pub const VOCAB: u64 = 128_000;

/// The router configuration for `hash_algo` (`"xxh3"` or a vLLM scheme, with engine-hash
/// verification off) and `profile` (a JSON value: a preset name string or an object).
pub fn config_json(hash_algo: &str, profile: &str) -> String {
    let workers: Vec<String> =
        (0..WORKERS).map(|w| format!(r#"{{"name": "{}"}}"#, worker_name(w))).collect();
    format!(
        r#"{{"hash_algo": "{hash_algo}", "verify_engine_hashes": false, "block_size": {BLOCK},
            "profile": {profile}, "workers": [{}]}}"#,
        workers.join(", ")
    )
}

/// The name of worker `w`.
pub fn worker_name(w: u32) -> String {
    format!("w{w:02}")
}

/// Group `g`'s system prompt as a `(segment, blocks)` part.
pub fn system(w: u32) -> (u64, usize) {
    (1 + u64::from(w % GROUPS), SYSTEM)
}

/// Conversation `c` of worker `w` (own part).
pub fn own(w: u32, c: u32) -> (u64, usize) {
    (0x10000 + u64::from(w) * 1024 + u64::from(c), OWN)
}

/// The tokens of a chain made of `(segment, blocks)` parts.
pub fn tokens(parts: &[(u64, usize)]) -> Vec<u32> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.1).sum::<usize>() * BLOCK);
    for &(seg, blocks) in parts {
        for p in 0..(blocks * BLOCK) as u64 {
            v.push((sm((seg << 32) | p) % VOCAB) as u32);
        }
    }
    v
}

/// The `BlockStored` events (64 blocks each, chained by parent) announcing blocks
/// `from..` of the chain `parts`: engine hashes are the chain's W1 keys, the first event's
/// parent is the engine hash of block `from - 1` (none when `from` is 0).
pub fn store_events(parts: &[(u64, usize)], from: usize) -> Vec<KvEvent> {
    let engine = chain_keys(parts);
    let toks = tokens(parts);
    let mut out = Vec::new();
    let mut parent = from.checked_sub(1).map(|i| engine[i]);
    let mut i = from;
    while i < engine.len() {
        let j = (i + EVENT_BLOCKS).min(engine.len());
        out.push(KvEvent::BlockStored(BlockStored {
            block_hashes: engine[i..j].iter().map(|&h| EngineHash::Int(h)).collect(),
            parent_block_hash: parent.map(EngineHash::Int),
            token_ids: toks[i * BLOCK..j * BLOCK].to_vec(),
            block_size: BLOCK as u32,
            ..BlockStored::default()
        }));
        parent = Some(engine[j - 1]);
        i = j;
    }
    out
}

/// The `BlockRemoved` events freeing blocks `from..` of the chain `parts` the way vLLM
/// frees a request: tail first, 64 hashes an event, each event in reverse chain order.
pub fn remove_events(parts: &[(u64, usize)], from: usize) -> Vec<KvEvent> {
    let engine = chain_keys(parts);
    engine[from..]
        .rchunks(EVENT_BLOCKS)
        .map(|c| {
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: c.iter().rev().map(|&h| EngineHash::Int(h)).collect(),
                ..BlockRemoved::default()
            })
        })
        .collect()
}

/// A batch of `events` at rank 0.
pub fn batch(events: Vec<KvEvent>) -> KvEventBatch {
    let mut b = KvEventBatch::new(1.7e9, events);
    b.data_parallel_rank = Some(0);
    b
}

/// Applies `events` for worker `w`, one batch of `per_batch` events at a time.
pub fn apply(router: &Router, w: u32, events: Vec<KvEvent>, per_batch: usize) {
    let name = worker_name(w);
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let chunk: Vec<KvEvent> = events.by_ref().take(per_batch).collect();
        router.apply_events(&name, &batch(chunk)).expect("population batch applies");
    }
}

/// Populates the router (see the module documentation) and gives every worker a distinct
/// load report (waiting 0..4, running 0..16, KV usage 0.05..0.95) so that the load scorers
/// have something to rank.
pub fn populate(router: &Router) {
    for c in 0..CONVERSATIONS {
        for w in 0..WORKERS {
            let parts = [system(w), own(w, c)];
            let from = if c == 0 { 0 } else { SYSTEM };
            apply(router, w, store_events(&parts, from), 4);
        }
    }
    for w in 0..WORKERS {
        let r = LoadReport {
            waiting: Some(w % 5),
            running: Some(w % 17),
            kv_usage: Some(0.05 + f64::from(w % 10) * 0.1),
            loras: None,
        };
        router.report_load(&worker_name(w), 0, &r).expect("load report");
    }
}

/// A route probe: a name, the prompt tokens, and what the router must find.
pub struct Probe {
    /// The case name.
    pub name: &'static str,
    /// The 8,192 prompt tokens.
    pub tokens: Vec<u32>,
    /// Blocks the best holder should match.
    pub expect_blocks: u32,
    /// Holders of the matched prefix.
    pub expect_holders: usize,
}

/// Stores the probe documents and returns the probes:
/// - `hit_one_full`: a 512-block document stored from the root by worker 0 only.
/// - `shared_prefix_64`: a 256-block prefix stored by all 64 workers, then 256 unseen
///   blocks.
/// - `group_prefix_8`: group 3's system prompt (8 holders) then 256 unseen blocks.
/// - `cold_miss`: 512 unseen blocks.
pub fn probes(router: &Router) -> Vec<Probe> {
    let full = [(PROBE, PROMPT_BLOCKS)];
    apply(router, 0, store_events(&full, 0), 4);
    let shared = [(PROBE + 1, PROMPT_BLOCKS / 2)];
    for w in 0..WORKERS {
        apply(router, w, store_events(&shared, 0), 4);
    }
    vec![
        Probe {
            name: "hit_one_full",
            tokens: tokens(&full),
            expect_blocks: PROMPT_BLOCKS as u32,
            expect_holders: 1,
        },
        Probe {
            name: "shared_prefix_64",
            tokens: tokens(&[(PROBE + 1, PROMPT_BLOCKS / 2), (PROBE + 2, PROMPT_BLOCKS / 2)]),
            expect_blocks: (PROMPT_BLOCKS / 2) as u32,
            expect_holders: WORKERS as usize,
        },
        Probe {
            name: "group_prefix_8",
            tokens: tokens(&[system(3), (PROBE + 3, PROMPT_BLOCKS - SYSTEM)]),
            expect_blocks: SYSTEM as u32,
            expect_holders: (WORKERS / GROUPS) as usize,
        },
        Probe {
            name: "cold_miss",
            tokens: tokens(&[(PROBE + 4, PROMPT_BLOCKS)]),
            expect_blocks: 0,
            expect_holders: 0,
        },
    ]
}

/// Checks (untimed) that routing `p` sees the expected match: the decision's best
/// candidate count and matched blocks. Panics with the case name otherwise. (Skipped,
/// apart from the prompt size, by a router that leaves `Decision::candidates` empty.)
pub fn check_probe(router: &Router, p: &Probe) {
    let d = router.route(&Request::new(&p.tokens)).expect("route");
    assert_eq!(d.total_blocks as usize, PROMPT_BLOCKS, "{}: prompt blocks", p.name);
    if d.candidates.is_empty() {
        return;
    }
    let best = d.candidates.iter().map(|c| c.matched_blocks).max().unwrap_or(0);
    let holders = d.candidates.iter().filter(|c| c.matched_blocks == best && best > 0).count();
    assert_eq!(best, p.expect_blocks, "{}: matched blocks", p.name);
    assert_eq!(holders, p.expect_holders, "{}: holders", p.name);
}

/// Puts the `kvroute` preset's per-route state in a serving router's shape: 256 earlier
/// requests (distinct 8,192-token prompts, none a prefix of a probe) routed and sent,
/// so the predicted-residency overlay holds 131,072 predictions, the popularity sketch
/// has counts, and every worker has a learned prefill rate; and a load scrape of every
/// worker. Routes then read the overlay (its lock and one lookup per candidate that
/// matches) and the never-stale load; nothing is confirmed or expired during the bench
/// (the TTL outlives the fixed `now_ms`).
pub fn prime_predictions(router: &Router) {
    let report =
        LoadReport { waiting: Some(1), running: Some(4), kv_usage: Some(0.3), loras: None };
    for w in 0..WORKERS {
        router.report_load(&worker_name(w), 0, &report).expect("load report");
    }
    for i in 0..256u64 {
        let t = tokens(&[(0x7000_0000 + i, PROMPT_BLOCKS)]);
        let d = router.route(&Request { now_ms: Some(900), ..Request::new(&t) }).expect("route");
        router.on_routed(&d).expect("on_routed");
        if i % 2 == 0 {
            router.on_first_token_at(d.request_id, 950).expect("first token");
        }
    }
}

/// How [`retokened`] draws token ids.
#[derive(Clone, Copy, Debug)]
pub enum TokenDist {
    /// Zipf-like ids below 150,000 (a 1/x law: 41% below 128, 93% below 65,536), as the
    /// ids of real text in a Qwen/Llama-3-sized vocabulary are: most take 1 or 3 bytes of
    /// msgpack.
    Zipf,
    /// Every id's msgpack width drawn uniformly from 1, 2, 3 and 5 bytes: the worst case
    /// for finding where a token-id array ends.
    Widths,
}

impl TokenDist {
    /// The name used in benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            TokenDist::Zipf => "zipf",
            TokenDist::Widths => "widths",
        }
    }

    /// Token id number `i` of stream `seed`.
    pub fn token(self, seed: u64, i: u64) -> u32 {
        let x = sm((seed << 32) ^ i ^ 0x5eed_0000_0000_0000);
        match self {
            TokenDist::Zipf => {
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                (150_000f64.powf(u) as u32).saturating_sub(1)
            }
            TokenDist::Widths => {
                let y = (x >> 8) as u32;
                match x % 4 {
                    0 => y % 0x80,
                    1 => 0x80 + y % 0x80,
                    2 => 0x100 + y % 0xff00,
                    _ => 0x1_0000 + y % 0xffff_0000,
                }
            }
        }
    }
}

/// `batch` with every `BlockStored`'s token ids redrawn from `dist` (same counts, same
/// hashes: a router keyed by the engine's hashes treats it exactly like `batch`).
pub fn retokened(batch: &KvEventBatch, dist: TokenDist, seed: u64) -> KvEventBatch {
    let mut b = batch.clone();
    let mut i = 0u64;
    for ev in &mut b.events {
        if let KvEvent::BlockStored(s) = ev {
            for t in &mut s.token_ids {
                *t = dist.token(seed, i);
                i += 1;
            }
        }
    }
    b
}
