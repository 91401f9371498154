//! Per-call **CPU time** (the calling thread's clock, `CLOCK_THREAD_CPUTIME_ID`) of the
//! route and event-apply hot paths, on the same routers as the `route` and `events`
//! criterion benches (`benches/common`). Criterion measures wall time, which on a shared,
//! oversubscribed machine mostly measures the other processes; the thread's CPU clock
//! does not advance while it is descheduled, so before/after binaries can be compared
//! under load (caches are still shared, so figures are upper bounds of the idle ones).
//!
//! Prints, per case, the minimum and the median over `ROUNDS` rounds of the mean CPU
//! time per call in a round.
//!
//! Run: `cargo run --profile bench -p kvroute-benches --bin cputime [route|events]`;
//! `CPUTIME_ONLY=route_kvroute/shared_prefix_64` runs the route cases whose name contains
//! it (and their router) only; for `events`, the cases whose name contains it (the
//! router is populated regardless). `CPUTIME_ROUNDS` sets the rounds of the route and
//! apply cases (more samples for a profile).

#[allow(missing_docs)]
#[path = "../../benches/common/mod.rs"]
mod common;

use common::*;
use kvroute::events::{vllm, KvEventBatch};
use kvroute::router::{Request, Router};
use std::hint::black_box;

const ROUNDS: usize = 40;

fn cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn report(name: &str, mut per_call_ns: Vec<f64>) {
    per_call_ns.sort_by(f64::total_cmp);
    println!(
        "{name:40} min {:8.3} us  median {:8.3} us",
        per_call_ns[0] / 1e3,
        per_call_ns[per_call_ns.len() / 2] / 1e3
    );
}

/// `rounds` rounds of `n` calls of `f`: the mean CPU time per call (ns) of each round.
fn measure(rounds: usize, n: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let t = cpu_ns();
            for _ in 0..n {
                f();
            }
            (cpu_ns() - t) as f64 / n as f64
        })
        .collect()
}

/// Whether a case runs: all of them, or those whose name contains `CPUTIME_ONLY` (to
/// profile one case alone with `perf record`).
fn selected(name: &str) -> bool {
    std::env::var("CPUTIME_ONLY").map_or(true, |f| name.contains(&f))
}

/// Rounds per route case: `ROUNDS`, or `CPUTIME_ROUNDS` (more samples for a profile).
fn rounds() -> usize {
    std::env::var("CPUTIME_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS)
}

fn routes() {
    for (group, profile, prime) in
        [("route_llm_d", r#""llm-d""#, false), ("route_kvroute", r#""kvroute""#, true)]
    {
        if !selected(group) && !std::env::var("CPUTIME_ONLY").is_ok_and(|f| f.contains(group)) {
            continue;
        }
        let router = Router::from_json(&config_json("xxh3", profile)).expect("config");
        populate(&router);
        let probes = probes(&router);
        if prime {
            prime_predictions(&router);
        }
        for p in &probes {
            check_probe(&router, p);
            if !selected(&format!("{group}/{}", p.name)) {
                continue;
            }
            let req = Request { now_ms: Some(1_000), ..Request::new(&p.tokens) };
            const N: usize = 400;
            let plain = measure(rounds(), N, || {
                black_box(router.route(black_box(&req)).unwrap());
            });
            report(&format!("{group}/{}", p.name), plain);
        }
    }
    if !selected("baseline/hash_8192") {
        return;
    }
    let router = Router::from_json(&config_json("xxh3", r#""llm-d""#)).expect("config");
    let t = tokens(&[(PROBE, PROMPT_BLOCKS)]);
    let extras = kvroute::hash::RequestExtras::default();
    let mut keys = Vec::new();
    let rounds = measure(ROUNDS, 1000, || {
        router.hasher().block_keys(black_box(&t), &extras, &mut keys);
    });
    report("baseline/hash_8192", rounds);
}

struct Conv {
    worker: String,
    store: KvEventBatch,
    remove: KvEventBatch,
    store_msg: Vec<u8>,
}

fn events() {
    let convs: Vec<Conv> = (0..1024usize)
        .map(|k| {
            let w = (k % WORKERS as usize) as u32;
            let parts = [system(w), (FRESH + k as u64, OWN)];
            let store = batch(store_events(&parts, SYSTEM));
            let remove = batch(remove_events(&parts, SYSTEM));
            Conv { worker: worker_name(w), store_msg: vllm::encode(&store), store, remove }
        })
        .collect();
    // The same batches with other token-id distributions (`common::TokenDist`).
    let dists = [TokenDist::Zipf, TokenDist::Widths];
    let other: Vec<Vec<Vec<u8>>> = dists
        .iter()
        .map(|&d| {
            convs
                .iter()
                .enumerate()
                .map(|(k, c)| vllm::encode(&retokened(&c.store, d, k as u64)))
                .collect()
        })
        .collect();
    let msgs: Vec<(String, Vec<&[u8]>)> =
        std::iter::once((String::new(), convs.iter().map(|c| c.store_msg.as_slice()).collect()))
            .chain(
                dists.iter().zip(&other).map(|(d, m)| {
                    (format!("_{}", d.name()), m.iter().map(Vec::as_slice).collect())
                }),
            )
            .collect();
    let opts = vllm::DecodeOptions { token_ids: vllm::TokenIds::KeepForRoots };
    for (suffix, msg) in &msgs {
        if !selected(&format!("decode/store{suffix}_tokens_for_roots")) {
            continue;
        }
        let rounds = (0..ROUNDS)
            .map(|r| {
                let s = cpu_ns();
                for m in &msg[(r * 64) % 1024..][..64] {
                    black_box(vllm::decode_with(black_box(m), opts).unwrap());
                }
                (cpu_ns() - s) as f64 / 64.0
            })
            .collect();
        report(&format!("decode/store{suffix}_tokens_for_roots"), rounds);
        // The same payload again and again: in cache, as one just received is.
        let rounds = (0..ROUNDS)
            .map(|r| {
                let m = msg[r % 1024];
                let s = cpu_ns();
                for _ in 0..64 {
                    black_box(vllm::decode_with(black_box(m), opts).unwrap());
                }
                (cpu_ns() - s) as f64 / 64.0
            })
            .collect();
        report(&format!("decode/store{suffix}_tokens_for_roots_hot"), rounds);
    }
    let router = Router::from_json(&config_json("sha256_cbor", r#""llm-d""#)).expect("config");
    populate(&router);
    let mut cases: Vec<(String, Option<&[&[u8]]>)> = msgs
        .iter()
        .map(|(suffix, m)| (format!("vllm/decode_apply/store{suffix}"), Some(m.as_slice())))
        .collect();
    cases.insert(1, ("vllm/apply/store".to_string(), None));
    for (name, msg) in cases {
        if !selected(&name) {
            continue;
        }
        let rounds = (0..rounds())
            .map(|r| {
                let mut cpu = 0;
                for (k, c) in convs.iter().enumerate().skip((r * 64) % 1024).take(64) {
                    let s = cpu_ns();
                    match msg {
                        Some(m) => {
                            black_box(router.apply_vllm_batch(&c.worker, m[k]).unwrap());
                        }
                        None => {
                            black_box(router.apply_events(&c.worker, &c.store).unwrap());
                        }
                    }
                    cpu += cpu_ns() - s;
                    router.apply_events(&c.worker, &c.remove).unwrap();
                }
                cpu as f64 / 64.0
            })
            .collect();
        report(&name, rounds);
    }
}

/// The token-id skip alone, each implementation, on 4,096 token ids (one store batch's)
/// of each distribution, in cache.
fn skips() {
    for (name, dist) in
        [("bench", None), ("zipf", Some(TokenDist::Zipf)), ("widths", Some(TokenDist::Widths))]
    {
        let ids: Vec<u32> = (0..4096u64)
            .map(|i| match dist {
                None => (kvroute_benches::sm(i) % VOCAB) as u32,
                Some(d) => d.token(1, i),
            })
            .collect();
        let ev = KvEventBatch {
            ts: 0.0,
            events: vec![kvroute::events::KvEvent::BlockStored(kvroute::events::BlockStored {
                token_ids: ids,
                ..Default::default()
            })],
            data_parallel_rank: None,
            skipped_fields: 0,
            skipped_events: 0,
        };
        let msg = vllm::encode(&ev);
        // The token-id array: after its 3-byte header (array16 of 4,096).
        let at = msg.windows(3).position(|w| w == [0xdc, 0x10, 0x00]).expect("array16 header") + 3;
        let end = vllm::skip_uints_with("scalar", &msg, at, 4096).unwrap();
        assert_eq!(end.1, 4096);
        for p in vllm::SKIP_PATHS {
            let Some(got) = vllm::skip_uints_with(p, &msg, at, 4096) else { continue };
            assert_eq!(got, end, "{p}");
            let rounds = (0..ROUNDS)
                .map(|_| {
                    let s = cpu_ns();
                    for _ in 0..64 {
                        black_box(vllm::skip_uints_with(p, black_box(&msg), at, 4096));
                    }
                    (cpu_ns() - s) as f64 / 64.0
                })
                .collect();
            report(&format!("skip/{name}/{p}"), rounds);
        }
        println!("  ({} bytes of token ids)", end.0 - at);
    }
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    if what == "skip" {
        skips();
        return;
    }
    if what != "events" {
        routes();
    }
    if what != "route" {
        events();
    }
}
