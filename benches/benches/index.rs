//! Criterion benchmarks of the prefix index at DESIGN.md section 7's size: about 1M blocks
//! over 64 workers.
//!
//! Population (keys follow W1's scheme, `kvroute_benches::chain_keys`):
//! - 64 workers in 8 groups (worker `w` in group `w % 8`), as 8 deployments that each
//!   serve one application with its own system prompt.
//! - Group `g`'s system prompt: segment `1 + g`, 256 blocks (4,096 tokens at 16 tokens a
//!   block), held by its 8 workers.
//! - Each worker holds 61 conversations: its group's system prompt ++ 256 blocks of its own
//!   (segment `0x10000 + w * 1024 + c`), stored as events of 64 blocks with parent links.
//! - That is 8 * 256 + 64 * 61 * 256 = 1,001,472 distinct blocks and 1,015,808
//!   holder-blocks.
//!
//! Match cases (512-block prompts = 8,192 tokens; probes are stored after the population):
//! - `single_holder_full`: a 512-block document stored from the root by worker 0 only.
//! - `holders64_full`: a 512-block document stored in full by all 64 workers.
//! - `miss`: a prompt whose first block is not in the index.
//! - `partial`: group 3's system prompt (8 holders) followed by 256 unseen blocks.
//! - `stored_conversation`: worker 5's conversation 7 again (8 holders at 256, one at 512).
//!
//! Write cases (`Throughput::Elements`, so criterion prints blocks/s): `store/event64`
//! stores fresh 64-block events (6 per conversation, each under the previous event's last
//! block, the first under the group prompt); `remove/batch64` removes such conversations
//! tail first in batches of 64 keys, each batch in reverse order, as vLLM frees blocks.
//! Only the index calls are inside the timed region; the index is brought back to the
//! population afterwards, untimed.
//!
//! Run: `cargo bench -p kvroute-benches --bench index -- --warm-up-time 1 --measurement-time 3`.

use criterion::{BenchmarkId, Criterion, Throughput};
use kvroute::index::{IndexConfig, MatchOptions, Matches, PrefixIndex};
use kvroute::{BlockKey, Tier, WorkerId};
use kvroute_benches::{chain_keys, store_events, EVENT_BLOCKS};
use std::hint::black_box;
use std::time::Instant;

const WORKERS: u32 = 64;
const GROUPS: u32 = 8;
const SYSTEM: usize = 256;
const OWN: usize = 256;
const CONVERSATIONS: u32 = 61;
const PROMPT: usize = 512;
/// Segment numbers of the probe documents and of the fresh chains of the write benches.
const PROBE: u64 = 0x100_0000;
const FRESH: u64 = 0x200_0000;
/// Own blocks of a write-bench conversation: 6 events of 64.
const WRITE_OWN: usize = 6 * EVENT_BLOCKS;

fn system(w: u32) -> (u64, usize) {
    (1 + u64::from(w % GROUPS), SYSTEM)
}

fn populate() -> PrefixIndex {
    let mut index = PrefixIndex::new(IndexConfig::default());
    for c in 0..CONVERSATIONS {
        for w in 0..WORKERS {
            let keys =
                chain_keys(&[system(w), (0x10000 + u64::from(w) * 1024 + u64::from(c), OWN)]);
            if c == 0 {
                store_events(&mut index, w, None, &keys);
            } else {
                store_events(&mut index, w, Some(keys[SYSTEM - 1]), &keys[SYSTEM..]);
            }
        }
    }
    let st = index.stats();
    assert_eq!(st.blocks, 1_001_472);
    assert_eq!(st.holder_blocks, 1_015_808);
    index
}

fn check(index: &PrefixIndex, keys: &[BlockKey], want: &[(u32, u32)], what: &str) {
    let mut out = Matches::new();
    index.find_matches(keys, MatchOptions::default(), &mut out);
    let got: Vec<(u32, u32)> = out.overlaps().iter().map(|o| (o.worker.0, o.blocks)).collect();
    assert_eq!(got, want, "{what}: wrong match result");
}

/// A fresh conversation for the write benches: (worker, parent, own keys).
struct Fresh {
    next: u64,
}

impl Fresh {
    fn conversation(&mut self) -> (u32, BlockKey, Vec<BlockKey>) {
        let n = self.next;
        self.next += 1;
        let w = (n % u64::from(WORKERS)) as u32;
        let keys = chain_keys(&[system(w), (FRESH + n, WRITE_OWN)]);
        (w, keys[SYSTEM - 1], keys[SYSTEM..].to_vec())
    }
}

/// Removes fresh conversations again (untimed), tail first.
fn remove_all(index: &mut PrefixIndex, convs: &[(u32, BlockKey, Vec<BlockKey>)]) {
    let mut scratch = Vec::new();
    for (w, _, own) in convs {
        let r = kvroute_benches::remove_tail_first(index, *w, own, &mut scratch);
        assert_eq!(r.removed as usize, own.len());
    }
}

fn bench_index(c: &mut Criterion) {
    let mut index = populate();

    let single = chain_keys(&[(PROBE + 1, PROMPT)]);
    store_events(&mut index, 0, None, &single);
    let all = chain_keys(&[(PROBE + 64, PROMPT)]);
    for w in 0..WORKERS {
        store_events(&mut index, w, None, &all);
    }
    let miss = chain_keys(&[(PROBE + 2, PROMPT)]);
    let partial = chain_keys(&[system(3), (PROBE + 3, PROMPT - SYSTEM)]);
    let conv = chain_keys(&[system(5), (0x10000 + 5 * 1024 + 7, OWN)]);

    let group_of = |g: u32, depth: u32| -> Vec<(u32, u32)> {
        (0..WORKERS).filter(|w| w % GROUPS == g).map(|w| (w, depth)).collect()
    };
    check(&index, &single, &[(0, 512)], "single");
    check(&index, &all, &(0..WORKERS).map(|w| (w, 512)).collect::<Vec<_>>(), "all");
    check(&index, &miss, &[], "miss");
    check(&index, &partial, &group_of(3, 256), "partial");
    let conv_want: Vec<(u32, u32)> =
        group_of(5, 256).into_iter().map(|(w, d)| (w, if w == 5 { 512 } else { d })).collect();
    check(&index, &conv, &conv_want, "stored conversation");

    {
        let mut g = c.benchmark_group("match_512_blocks_1M_index");
        let opts = MatchOptions::default();
        let mut out = Matches::new();
        for (name, keys) in [
            ("single_holder_full", &single),
            ("holders64_full", &all),
            ("miss", &miss),
            ("partial", &partial),
            ("stored_conversation", &conv),
        ] {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    index.find_matches(black_box(keys), opts, &mut out);
                    out.overlaps().len()
                })
            });
        }
        g.finish();
    }

    let mut fresh = Fresh { next: 0 };
    {
        let mut g = c.benchmark_group("store");
        g.throughput(Throughput::Elements(EVENT_BLOCKS as u64));
        g.bench_function("event64", |b| {
            b.iter_custom(|iters| {
                // Build the events first: iteration i stores event i % 6 of conversation i / 6.
                let n_conv = (iters as usize).div_ceil(6);
                let convs: Vec<_> = (0..n_conv).map(|_| fresh.conversation()).collect();
                let mut events: Vec<(u32, BlockKey, &[BlockKey])> =
                    Vec::with_capacity(iters as usize);
                'outer: for (w, parent, own) in &convs {
                    let mut p = *parent;
                    for ev in own.chunks(EVENT_BLOCKS) {
                        if events.len() == iters as usize {
                            break 'outer;
                        }
                        events.push((*w, p, ev));
                        p = *ev.last().unwrap();
                    }
                }
                let t = Instant::now();
                for &(w, p, ev) in &events {
                    let _ = black_box(index.store(WorkerId(w), Tier::Gpu, Some(p), ev));
                }
                let elapsed = t.elapsed();
                // Store the rest of a partly stored last conversation, then remove all.
                let done = events.len() - (n_conv - 1) * 6;
                if let Some((w, _, own)) = convs.last() {
                    let rest = &own[done * EVENT_BLOCKS..];
                    if !rest.is_empty() {
                        store_events(&mut index, *w, Some(own[done * EVENT_BLOCKS - 1]), rest);
                    }
                }
                remove_all(&mut index, &convs);
                elapsed
            })
        });
        g.finish();
    }
    {
        let mut g = c.benchmark_group("remove");
        g.throughput(Throughput::Elements(EVENT_BLOCKS as u64));
        g.bench_function("batch64_tail_first", |b| {
            b.iter_custom(|iters| {
                let n_conv = (iters as usize).div_ceil(6);
                let convs: Vec<_> = (0..n_conv).map(|_| fresh.conversation()).collect();
                for (w, parent, own) in &convs {
                    store_events(&mut index, *w, Some(*parent), own);
                }
                // Reversed batches, tail first, conversation by conversation.
                let batches: Vec<(u32, Vec<BlockKey>)> = convs
                    .iter()
                    .flat_map(|(w, _, own)| {
                        kvroute_benches::tail_first_batches(own)
                            .map(move |b| (*w, b.iter().rev().copied().collect()))
                    })
                    .collect();
                let (timed, rest) = batches.split_at(iters as usize);
                let t = Instant::now();
                for (w, keys) in timed {
                    black_box(index.remove(WorkerId(*w), Tier::Gpu, keys));
                }
                let elapsed = t.elapsed();
                for (w, keys) in rest {
                    index.remove(WorkerId(*w), Tier::Gpu, keys);
                }
                elapsed
            })
        });
        g.finish();
    }
    let st = index.stats();
    assert_eq!(
        st.holder_blocks,
        1_015_808 + PROMPT as u64 * (1 + u64::from(WORKERS)),
        "write benches left the index at its population"
    );
}

fn main() {
    // What `criterion_main!` expands to, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    bench_index(&mut c);
    c.final_summary();
}
