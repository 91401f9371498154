//! KV event ingest throughput (DESIGN.md section 7: apply >= 10M blocks/s), on a router
//! that already holds about 1M blocks over 64 workers (`common/mod.rs`).
//!
//! Batches: a *store batch* is one vLLM `KVEventBatch` of 4 `BlockStored` events of 64
//! blocks (1,024 token ids each, integer engine hashes), a fresh 256-block conversation
//! under the worker's group system prompt; the matching *remove batch* is 4
//! `BlockRemoved` events of 64 hashes, tail first. 1,024 such conversations cycle over the
//! 64 workers, encoded once with `kvroute::events::vllm::encode` (map form, as vLLM 0.33
//! sends them). Throughput is in blocks (256 a batch).
//!
//! Groups (every timed region covers exactly one batch; the opposite operation that keeps
//! the index at its size runs untimed between timed calls, via `iter_custom`):
//! - `decode/{store,remove}`: `vllm::decode` alone; `decode/store_tokens_for_roots`:
//!   `vllm::decode_with` keeping only root events' token ids, as a vLLM-keyed router does.
//! - `<mode>/decode_apply/{store,remove}`: `Router::apply_vllm_batch(worker, &payload)`.
//! - `<mode>/apply/{store,remove}`: `Router::apply_events` on the pre-decoded batch.
//! - `decode/store_{zipf,widths}_tokens_for_roots`, `vllm/decode_apply/store_{zipf,widths}`:
//!   the same store batches with other token ids (`common::TokenDist`): the generator's
//!   uniform ids below 128,000 take 3 or 5 bytes each; Zipf-like ids (realistic text) mostly
//!   1 or 3; uniform widths (1, 2, 3 or 5 bytes at random) are the worst case for finding
//!   where a token-id array ends.
//!
//! Modes: `vllm` (`hash_algo: "sha256_cbor"`, `verify_engine_hashes: false`: the engine
//! hashes are the index keys) and `xxh3` (every stored block re-keyed from its tokens, the
//! engine hashes mapped to the router's keys per worker).
//!
//! Run: `cargo bench -p kvroute-benches --bench events -- --warm-up-time 1 --measurement-time 3`.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

mod common;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute::events::{vllm, KvEventBatch};
use kvroute::router::Router;
use std::hint::black_box;
use std::time::{Duration, Instant};

const CONVS: usize = 1024;

struct Conv {
    worker: String,
    store: KvEventBatch,
    remove: KvEventBatch,
    store_msg: Vec<u8>,
    remove_msg: Vec<u8>,
    /// `store` with its token ids drawn from `TokenDist::Zipf` and `TokenDist::Widths`.
    store_msg_dist: [Vec<u8>; 2],
}

const DISTS: [TokenDist; 2] = [TokenDist::Zipf, TokenDist::Widths];

fn convs() -> Vec<Conv> {
    (0..CONVS)
        .map(|k| {
            let w = (k % WORKERS as usize) as u32;
            let parts = [system(w), (FRESH + k as u64, OWN)];
            let store = batch(store_events(&parts, SYSTEM));
            let remove = batch(remove_events(&parts, SYSTEM));
            Conv {
                worker: worker_name(w),
                store_msg: vllm::encode(&store),
                store_msg_dist: DISTS.map(|d| vllm::encode(&retokened(&store, d, k as u64))),
                remove_msg: vllm::encode(&remove),
                store,
                remove,
            }
        })
        .collect()
}

/// Times `timed` on conversation `i % CONVS` for each iteration, running `untimed` after
/// it (store benches) or before it (remove benches).
fn custom(
    iters: u64,
    convs: &[Conv],
    untimed_first: bool,
    mut timed: impl FnMut(&Conv),
    mut untimed: impl FnMut(&Conv),
) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let c = &convs[i as usize % CONVS];
        if untimed_first {
            untimed(c);
        }
        let t = Instant::now();
        timed(c);
        total += t.elapsed();
        if !untimed_first {
            untimed(c);
        }
    }
    total
}

fn bench_events(c: &mut Criterion) {
    let convs = convs();
    let blocks = (OWN) as u64;
    eprintln!(
        "store batch: {} bytes msgpack for {blocks} blocks; remove batch: {} bytes",
        convs[0].store_msg.len(),
        convs[0].remove_msg.len()
    );

    for c in &convs[..8] {
        assert_eq!(vllm::decode(&c.store_msg).unwrap(), c.store, "store batch round trip");
        assert_eq!(vllm::decode(&c.remove_msg).unwrap(), c.remove, "remove batch round trip");
    }

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("store", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            vllm::decode(black_box(&convs[i % CONVS].store_msg)).unwrap()
        })
    });
    g.bench_function("remove", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            vllm::decode(black_box(&convs[i % CONVS].remove_msg)).unwrap()
        })
    });
    // What a router keyed by the engine's hashes decodes (`Router::apply_vllm_batch`):
    // token ids checked and counted, stored only for events that start a sequence.
    g.bench_function("store_tokens_for_roots", |b| {
        let opts = vllm::DecodeOptions { token_ids: vllm::TokenIds::KeepForRoots };
        let mut i = 0;
        b.iter(|| {
            i += 1;
            vllm::decode_with(black_box(&convs[i % CONVS].store_msg), opts).unwrap()
        })
    });
    // The same batches with realistic (Zipf-like) and worst-case (uniform widths) ids.
    for (j, d) in DISTS.iter().enumerate() {
        g.bench_function(format!("store_{}_tokens_for_roots", d.name()), |b| {
            let opts = vllm::DecodeOptions { token_ids: vllm::TokenIds::KeepForRoots };
            let mut i = 0;
            b.iter(|| {
                i += 1;
                vllm::decode_with(black_box(&convs[i % CONVS].store_msg_dist[j]), opts).unwrap()
            })
        });
    }
    g.finish();

    for (mode, algo) in [("vllm", "sha256_cbor"), ("xxh3", "xxh3")] {
        let t = Instant::now();
        let router = Router::from_json(&config_json(algo, r#""llm-d""#)).expect("router config");
        populate(&router);
        let s = router.index_stats();
        eprintln!(
            "{mode}: populated in {:.1} s: {} blocks, {} holder-blocks",
            t.elapsed().as_secs_f64(),
            s.blocks,
            s.holder_blocks
        );
        // Sanity (untimed): a store and a remove batch do what they say.
        let r = router.apply_vllm_batch(&convs[0].worker, &convs[0].store_msg).unwrap();
        assert_eq!((r.blocks_stored, r.orphans), (blocks as u32, 0), "{mode}: store batch");
        let r = router.apply_vllm_batch(&convs[0].worker, &convs[0].remove_msg).unwrap();
        assert_eq!((r.blocks_removed, r.unknown_removals), (blocks as u32, 0), "{mode}: remove");

        let store_msg = |c: &Conv| {
            black_box(router.apply_vllm_batch(&c.worker, black_box(&c.store_msg)).unwrap());
        };
        let remove_msg = |c: &Conv| {
            black_box(router.apply_vllm_batch(&c.worker, black_box(&c.remove_msg)).unwrap());
        };
        let store_ev = |c: &Conv| {
            black_box(router.apply_events(&c.worker, black_box(&c.store)).unwrap());
        };
        let remove_ev = |c: &Conv| {
            black_box(router.apply_events(&c.worker, black_box(&c.remove)).unwrap());
        };
        let mut g = c.benchmark_group(mode);
        g.throughput(Throughput::Elements(blocks));
        g.bench_function("decode_apply/store", |b| {
            b.iter_custom(|n| custom(n, &convs, false, store_msg, remove_ev))
        });
        if mode == "vllm" {
            for (j, d) in DISTS.iter().enumerate() {
                let store_dist = |c: &Conv| {
                    black_box(
                        router
                            .apply_vllm_batch(&c.worker, black_box(&c.store_msg_dist[j]))
                            .unwrap(),
                    );
                };
                g.bench_function(format!("decode_apply/store_{}", d.name()), |b| {
                    b.iter_custom(|n| custom(n, &convs, false, store_dist, remove_ev))
                });
            }
        }
        g.bench_function("decode_apply/remove", |b| {
            b.iter_custom(|n| custom(n, &convs, true, remove_msg, store_ev))
        });
        g.bench_function("apply/store", |b| {
            b.iter_custom(|n| custom(n, &convs, false, store_ev, remove_ev))
        });
        g.bench_function("apply/remove", |b| {
            b.iter_custom(|n| custom(n, &convs, true, remove_ev, store_ev))
        });
        g.finish();
        let s = router.index_stats();
        assert_eq!(s.unknown_removals, 0, "{mode}: every removal found its blocks");
    }
}

criterion_group!(benches, bench_events);
criterion_main!(benches);
