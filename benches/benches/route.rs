//! `Router::route` end to end (native xxh3 hash + match + scorers + pick + the decision
//! with its per-candidate explanation) for 8,192-token prompts over 64 workers, the router
//! holding about 1M blocks populated through `Router::apply_events` (see
//! `common/mod.rs`: `hash_algo: "xxh3"`, so every stored block was re-keyed from its
//! tokens, exactly as a route re-keys the prompt).
//!
//! Groups:
//! - `route_four_scorers/<case>`: prefix 3, queue 2, kv-utilization 2, running 1, max
//!   picker (DESIGN.md section 7's "4 scorers").
//! - `route_llm_d/<case>`: the `llm-d` preset (prefix 3, queue 2, kv-utilization 2).
//! - `route_kvroute/<case>`: the `kvroute` preset (the default: precise mode, predicted
//!   residency, popularity sketch, never-stale load, the `ttft` picker), measured after
//!   256 earlier requests were routed and sent (see `common::prime_predictions`).
//! - `baseline/hash_8192`: `BlockHasher::block_keys` alone on one prompt.
//! - `baseline/match/<case>`: `PrefixIndex::find_matches` alone, on a standalone index
//!   holding the same keys (built with `PrefixIndex::store` from the router's own keys).
//! - `baseline/decide_four/<case>`: `Profile::decide` alone over the 64 candidates the
//!   router builds for that case (matches from the standalone index, the same loads).
//!
//! Route overhead beyond the parts = route - hash - match - decide: candidate building
//! (registry read lock, atomics) and the `Decision` (64 `CandidateScore`s with cloned
//! worker keys and per-scorer `(String, f64)` rows).
//!
//! Cases: `hit_one_full` (512 blocks on worker 0 only), `shared_prefix_64` (256-block
//! prefix on all 64 workers + 256 unseen), `group_prefix_8` (a group system prompt on 8
//! workers + 256 unseen), `cold_miss`.
//!
//! Run: `cargo bench -p kvroute-benches --bench route -- --warm-up-time 1 --measurement-time 3`.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

mod common;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use kvroute::hash::RequestExtras;
use kvroute::index::{IndexConfig, MatchOptions, Matches, PrefixIndex};
use kvroute::rng::SplitMix64;
use kvroute::router::{Request, Router};
use kvroute::score::{
    Candidate, Load, ProfileConfig, RequestInfo, ScoreContext, ScoreScratch, SessionTable,
};
use kvroute::WorkerId;
use std::hint::black_box;
use std::time::Instant;

const FOUR: &str = r#"{"scorers": [{"name": "prefix", "weight": 3}, {"name": "queue", "weight": 2},
    {"name": "kv-utilization", "weight": 2}, {"name": "running", "weight": 1}]}"#;

fn build(profile: &str) -> (Router, Vec<Probe>) {
    let t = Instant::now();
    let router = Router::from_json(&config_json("xxh3", profile)).expect("router config");
    populate(&router);
    let probes = probes(&router);
    for p in &probes {
        check_probe(&router, p);
    }
    let s = router.index_stats();
    eprintln!(
        "populated in {:.1} s: {} blocks, {} holder-blocks, {} nodes, {} engine mappings",
        t.elapsed().as_secs_f64(),
        s.blocks,
        s.holder_blocks,
        s.nodes,
        s.engine_mappings
    );
    (router, probes)
}

/// A standalone index with the router's keys for the same population and probes.
fn mirror(router: &Router) -> PrefixIndex {
    let mut index = PrefixIndex::new(IndexConfig::default());
    let keys = |parts: &[(u64, usize)]| router.block_keys(&tokens(parts), None).expect("keys");
    for c in 0..CONVERSATIONS {
        for w in 0..WORKERS {
            let k = keys(&[system(w), own(w, c)]);
            let from = if c == 0 { 0 } else { SYSTEM };
            let parent = from.checked_sub(1).map(|i| k[i]);
            kvroute_benches::store_events(&mut index, w, parent, &k[from..]);
        }
    }
    kvroute_benches::store_events(&mut index, 0, None, &keys(&[(PROBE, PROMPT_BLOCKS)]));
    let shared = keys(&[(PROBE + 1, PROMPT_BLOCKS / 2)]);
    for w in 0..WORKERS {
        kvroute_benches::store_events(&mut index, w, None, &shared);
    }
    index
}

fn load(w: u32) -> Load {
    Load {
        waiting: w % 5,
        running: w % 17,
        inflight_prefill_tokens: 0,
        kv_usage: 0.05 + f64::from(w % 10) * 0.1,
        decode_blocks: 0,
        ..Load::default()
    }
}

fn bench_route(c: &mut Criterion) {
    // --- four scorers, plus the baselines on the same router --------------------------
    let (router, probes) = build(FOUR);
    let index = mirror(&router);
    let extras = RequestExtras::default();
    let mut keys = Vec::new();
    let mut matches = Matches::new();

    let mut g = c.benchmark_group("route_four_scorers");
    for p in &probes {
        let req = Request::new(&p.tokens);
        g.bench_function(p.name, |b| b.iter(|| router.route(black_box(&req)).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group("baseline");
    let tokens0 = &probes[0].tokens;
    g.bench_function("hash_8192", |b| {
        b.iter(|| {
            router.hasher().block_keys(black_box(tokens0), &extras, &mut keys);
            keys.len()
        })
    });
    let profile = ProfileConfig::from_json(FOUR).unwrap().build().unwrap();
    let sessions = SessionTable::default();
    let mut scratch = ScoreScratch::new();
    let mut rng = SplitMix64::new(7);
    for p in &probes {
        router.hasher().block_keys(&p.tokens, &extras, &mut keys);
        index.find_matches(&keys, MatchOptions::default(), &mut matches);
        let best = matches.max_blocks();
        assert_eq!(best, p.expect_blocks, "{}: mirror index disagrees with the router", p.name);
        g.bench_function(format!("match/{}", p.name), |b| {
            b.iter(|| {
                index.find_matches(black_box(&keys), MatchOptions::default(), &mut matches);
                matches.max_blocks()
            })
        });
        let cands: Vec<Candidate> = (0..WORKERS)
            .map(|w| {
                let mut c = Candidate::new(WorkerId(w));
                if let Some(o) = matches.get(WorkerId(w)) {
                    c.matched_blocks = o.blocks;
                    c.matched_by_tier = o.by_tier;
                }
                c.load = load(w);
                c
            })
            .collect();
        let info = RequestInfo {
            prompt_tokens: p.tokens.len() as u32,
            total_blocks: PROMPT_BLOCKS as u32,
            session: None,
            lora: None,
            now_ms: 1_000,
            shared_blocks: 0,
            shared_share: 0.0,
            tail_ttft_s: 0.0,
        };
        g.bench_function(format!("decide_four/{}", p.name), |b| {
            b.iter(|| {
                let ctx = ScoreContext::new(&sessions);
                profile.decide(black_box(&info), black_box(&cands), &ctx, &mut rng, &mut scratch)
            })
        });
    }
    g.finish();
    drop(index);
    drop(router);

    // --- the llm-d preset ---------------------------------------------------------------
    let (router, probes) = build(r#""llm-d""#);
    let mut g = c.benchmark_group("route_llm_d");
    for p in &probes {
        let req = Request::new(&p.tokens);
        g.bench_function(p.name, |b| b.iter(|| router.route(black_box(&req)).unwrap()));
    }
    g.finish();
    drop(router);

    // --- the kvroute preset (the default), in the same process --------------------------
    let (router, probes) = build(r#""kvroute""#);
    prime_predictions(&router);
    for p in &probes {
        check_probe(&router, p);
    }
    let mut g = c.benchmark_group("route_kvroute");
    for p in &probes {
        let req = Request { now_ms: Some(1_000), ..Request::new(&p.tokens) };
        g.bench_function(p.name, |b| b.iter(|| router.route(black_box(&req)).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
