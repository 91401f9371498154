//! Scoring cost per decision: `Profile::decide` over 64 candidates, as the router calls it
//! after matching (the match itself is benchmarked with the index).

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kvroute::rng::SplitMix64;
use kvroute::score::{
    Candidate, Load, ProfileConfig, RequestInfo, ScoreContext, ScoreScratch, SessionTable,
};
use kvroute::WorkerId;

fn candidates(n: u32) -> Vec<Candidate> {
    let mut rng = SplitMix64::new(1);
    (0..n)
        .map(|w| {
            let mut c = Candidate::new(WorkerId(w));
            c.matched_blocks = rng.below(512) as u32;
            c.matched_by_tier = [c.matched_blocks, 0, 0];
            c.load = Load {
                waiting: rng.below(16) as u32,
                running: rng.below(64) as u32,
                inflight_prefill_tokens: rng.below(20_000),
                kv_usage: rng.next_f64(),
                decode_blocks: rng.below(4096),
                pending_prefill_tokens: rng.below(20_000),
                active_requests: rng.below(80) as u32,
                prefill_tokens_per_s: 5_000.0 + rng.next_f64() * 10_000.0,
                ..Load::default()
            };
            c.last_routed_ms = Some(rng.below(10_000));
            c
        })
        .collect()
}

fn bench_decide(c: &mut Criterion) {
    let cands = candidates(64);
    let mut sessions = SessionTable::default();
    for i in 0..10_000u32 {
        sessions.record(&format!("10.0.{}.{}", i / 256, i % 256), WorkerId(i % 64), 0);
    }
    let four = r#"{"scorers": [{"name": "prefix", "weight": 3}, {"name": "queue", "weight": 2},
        {"name": "kv-utilization", "weight": 2}, {"name": "prefill", "weight": 1}]}"#;
    let profiles = [
        ("llm-d", ProfileConfig::preset("llm-d").unwrap()),
        ("four-scorers", ProfileConfig::from_json(four).unwrap()),
        ("cost", ProfileConfig::preset("cost").unwrap()),
        ("session-affinity", ProfileConfig::preset("session-affinity").unwrap()),
    ];
    let req = RequestInfo {
        prompt_tokens: 8192,
        total_blocks: 512,
        session: Some("10.0.3.7"),
        lora: None,
        now_ms: 1_000,
        shared_blocks: 0,
        shared_share: 0.0,
        tail_ttft_s: 0.0,
    };
    let mut group = c.benchmark_group("decide_64_workers");
    for (name, cfg) in profiles {
        let profile = cfg.build().unwrap();
        let mut scratch = ScoreScratch::new();
        let mut rng = SplitMix64::new(7);
        group.bench_function(name, |b| {
            b.iter(|| {
                let ctx = ScoreContext::new(&sessions);
                profile
                    .decide(black_box(&req), black_box(&cands), &ctx, &mut rng, &mut scratch)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
