//! Heap bytes per (block, holder) pair of the prefix index at 10M holder-blocks
//! (DESIGN.md section 7 target: <= 24 bytes), for a realistic population, measured three
//! ways: a counting global allocator (live bytes growth), the index's own
//! `stats().heap_bytes`, and the process RSS growth.
//!
//! Population (deterministic, `SplitMix64` seed 7):
//! - 64 workers in 8 groups (worker `w` in group `w % 8`); group `g` has a system prompt
//!   of 256 blocks held by its 8 workers.
//! - 512 shared documents of 128 blocks from the root, each held by 4 random workers.
//! - Conversations, round robin over workers: each has 32..=1024 own blocks (uniform),
//!   stored as events of 64; 70% start after the worker's system prompt, 30% branch off a
//!   random block of one of the worker's earlier conversations (an edit or a retry).
//! - Stops at the first conversation that reaches 10,000,000 holder-blocks.
//!
//! Run: `cargo run --release -p kvroute-benches --bin heap`.

use kvroute::index::{IndexConfig, PrefixIndex};
use kvroute::rng::SplitMix64;
use kvroute::BlockKey;
use kvroute_benches::{
    chain_keys_into, content, live_bytes, rss_bytes, sm, store_events, CountingAlloc,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const WORKERS: u32 = 64;
const GROUPS: u32 = 8;
const SYSTEM: usize = 256;
const DOCS: u64 = 512;
const DOC_LEN: usize = 128;
const DOC_HOLDERS: usize = 4;
const TARGET: u64 = 10_000_000;

/// A conversation, remembered compactly so the bench's own memory does not grow while the
/// index is measured: its parent key, its segment and its length.
#[derive(Clone, Copy)]
struct Conv {
    parent: BlockKey,
    segment: u64,
    len: usize,
}

/// Keys of `len` blocks of `segment` chained after `parent`.
fn keys_after(parent: BlockKey, segment: u64, len: usize, out: &mut Vec<BlockKey>) {
    out.clear();
    let mut q = parent;
    for p in 0..len as u64 {
        q = sm(q ^ content(segment, p));
        out.push(q);
    }
}

fn main() {
    let mut rng = SplitMix64::new(7);
    // Everything the driver needs is allocated before the measurement starts.
    let mut convs: Vec<Vec<Conv>> = (0..WORKERS).map(|_| Vec::with_capacity(4096)).collect();
    let mut keys: Vec<BlockKey> = Vec::with_capacity(2048);
    let mut system_last = Vec::with_capacity(GROUPS as usize);
    for g in 0..GROUPS {
        chain_keys_into(&[(1 + u64::from(g), SYSTEM)], &mut keys);
        system_last.push(*keys.last().unwrap());
    }
    let mut holders: Vec<u32> = Vec::with_capacity(DOC_HOLDERS);

    let heap0 = live_bytes();
    let rss0 = rss_bytes();
    let mut index = PrefixIndex::new(IndexConfig::default());
    let stats0 = index.stats().heap_bytes;

    for w in 0..WORKERS {
        chain_keys_into(&[(1 + u64::from(w % GROUPS), SYSTEM)], &mut keys);
        store_events(&mut index, w, None, &keys);
    }
    for d in 0..DOCS {
        chain_keys_into(&[(0x100 + d, DOC_LEN)], &mut keys);
        holders.clear();
        while holders.len() < DOC_HOLDERS {
            let w = rng.below(u64::from(WORKERS)) as u32;
            if !holders.contains(&w) {
                holders.push(w);
            }
        }
        for &w in &holders {
            store_events(&mut index, w, None, &keys);
        }
    }
    let mut segment = 0x10_0000u64;
    let mut n = 0u64;
    while holder_blocks(&index) < TARGET {
        let w = (n % u64::from(WORKERS)) as u32;
        n += 1;
        let own = 32 + rng.below(1024 - 32 + 1) as usize;
        let mine = &convs[w as usize];
        let parent = if mine.is_empty() || rng.next_f64() < 0.7 {
            system_last[(w % GROUPS) as usize]
        } else {
            // Branch off a random block of an earlier conversation.
            let c = mine[rng.below(mine.len() as u64) as usize];
            let at = rng.below(c.len as u64) as usize;
            keys_after(c.parent, c.segment, at + 1, &mut keys);
            keys[at]
        };
        segment += 1;
        keys_after(parent, segment, own, &mut keys);
        store_events(&mut index, w, Some(parent), &keys);
        convs[w as usize].push(Conv { parent, segment, len: own });
    }
    assert!(
        convs.iter().all(|c| c.capacity() == 4096),
        "driver memory grew during the measurement"
    );
    let heap1 = live_bytes();
    let rss1 = rss_bytes();
    let st = index.stats();
    let hb = st.holder_blocks as f64;
    let alloc = (heap1 - heap0) as f64;
    let stats = (st.heap_bytes - stats0) as f64;
    let rss = rss1.saturating_sub(rss0) as f64;
    println!(
        "population: {} holder-blocks, {} distinct blocks, {} nodes, {} conversations",
        st.holder_blocks, st.blocks, st.nodes, n
    );
    println!(
        "allocator live bytes / holder-block: {:.2}  ({:.1} MiB; {:.2} per distinct block)",
        alloc / hb,
        alloc / 1048576.0,
        alloc / st.blocks as f64
    );
    println!(
        "stats().heap_bytes / holder-block:   {:.2}  ({:.1} MiB)",
        stats / hb,
        stats / 1048576.0
    );
    println!("RSS growth / holder-block:           {:.2}  ({:.1} MiB)", rss / hb, rss / 1048576.0);
    println!("DESIGN.md target: <= 24 bytes per holder-block");
}

/// Holder-blocks summed over workers, without `stats()` (which walks every node).
fn holder_blocks(index: &PrefixIndex) -> u64 {
    (0..WORKERS).map(|w| index.worker_blocks(kvroute::WorkerId(w))).sum()
}
