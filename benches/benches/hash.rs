//! Block hashing over an 8,192-token prompt (512 blocks of 16):
//!
//! - `xxh3_native`: the native chain (target >= 8 GB/s of token bytes);
//! - `sha256_cbor`: vLLM's `sha256_cbor`, encoding included;
//! - `sha256_raw_per_block`: plain SHA-256 of the same 512 pre-images, one digest each (the
//!   hashing `sha256_cbor` cannot avoid), the baseline for the <= 1.2x target;
//! - `sha256_raw_concat`: plain SHA-256 over the concatenated pre-image bytes in one pass;
//! - `sha256_pickle`, `xxhash_cbor`: the other vLLM schemes, for reference.
//!
//! Throughput is in token bytes (4 per token) for the native chain and in pre-image bytes
//! for the SHA-256 lines, so the SHA-256 lines compare directly.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvroute::hash::{BlockHasher, HashAlgo, HashConfig, RequestExtras};
use kvroute::rng::SplitMix64;
use sha2::{Digest, Sha256};

const TOKENS: usize = 8192;

fn tokens() -> Vec<u32> {
    // Token ids drawn from a Llama-3-sized vocabulary.
    let mut r = SplitMix64::new(7);
    (0..TOKENS).map(|_| r.below(128_256) as u32).collect()
}

fn hasher(algo: HashAlgo) -> BlockHasher {
    BlockHasher::new(HashConfig { algo, hash_seed: Some("0".into()), ..Default::default() })
        .expect("valid config")
}

fn bench_hash(c: &mut Criterion) {
    let toks = tokens();
    let none = RequestExtras::default();
    let mut g = c.benchmark_group("hash_8192_tokens");

    let native = hasher(HashAlgo::Xxh3);
    let mut out = Vec::with_capacity(TOKENS / 16);
    g.throughput(Throughput::Bytes((TOKENS * 4) as u64));
    g.bench_function("xxh3_native", |b| {
        b.iter(|| {
            native.block_keys(black_box(&toks), &none, &mut out);
            black_box(out.last().copied())
        })
    });

    let cbor = hasher(HashAlgo::Sha256Cbor);
    let pre = cbor.preimages(&toks, &none);
    let pre_bytes: usize = pre.iter().map(Vec::len).sum();
    let concat: Vec<u8> = pre.concat();
    g.throughput(Throughput::Bytes(pre_bytes as u64));
    g.bench_function("sha256_cbor", |b| {
        b.iter(|| {
            cbor.block_keys(black_box(&toks), &none, &mut out);
            black_box(out.last().copied())
        })
    });
    g.bench_function("sha256_raw_per_block", |b| {
        b.iter(|| {
            let mut last = [0u8; 32];
            for p in &pre {
                last = Sha256::digest(black_box(p)).into();
            }
            black_box(last)
        })
    });
    g.bench_function("sha256_raw_concat", |b| {
        b.iter(|| black_box(Sha256::digest(black_box(&concat))))
    });

    for algo in [HashAlgo::Sha256, HashAlgo::XxhashCbor] {
        let h = hasher(algo);
        let bytes: usize = h.preimages(&toks, &none).iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("vllm", algo), &toks, |b, t| {
            b.iter(|| {
                h.block_keys(black_box(t), &none, &mut out);
                black_box(out.last().copied())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_hash);
criterion_main!(benches);
