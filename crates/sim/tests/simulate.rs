//! The simulator against independent facts: the Mooncake trace ceiling, determinism,
//! and the qualitative behaviour each policy is known for.

use kvroute_sim::report::compare;
use kvroute_sim::trace::read_mooncake;
use kvroute_sim::workload::{self, SeedParams, SharedPrefixParams, TraceOptions};
use kvroute_sim::{EngineConfig, Prepared, RouterPolicy, SimConfig};
use std::path::PathBuf;

fn trace_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/mooncake/conversation_trace.jsonl")
}

fn llama(block_size: usize) -> EngineConfig {
    EngineConfig::preset("llama-3-8b", "h100-80gb", block_size).unwrap()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn one_unbounded_worker_reproduces_the_trace_ceiling() {
    let trace = read_mooncake(trace_path()).unwrap();
    let w = workload::from_mooncake(
        "trace",
        &trace,
        &TraceOptions { pad_partial_blocks: true, seed: 0 },
    );
    let p = Prepared::new(w, 512).unwrap();
    let mut engine = llama(512);
    engine.instant = true;
    // Unbounded: more blocks than the whole trace needs.
    engine.num_gpu_blocks = 2_000_000;
    let cfg = SimConfig {
        workers: 1,
        engine,
        event_delay_s: 0.0,
        seed: 1,
        router_replicas: 1,
        tail_quantile: None,
    };
    let rep = compare(&p, &cfg, &names(&["random", "oracle"]), &|_| {}).unwrap();
    for r in &rep.results {
        // README: 288,500 blocks, 182,790 distinct: every block but each id's first
        // sighting hits, 36.6%.
        assert_eq!(r.completed, 12_031, "{}", r.policy);
        assert_eq!(r.evictions, 0);
        assert!(
            (r.block_hit_rate - (288_500.0 - 182_790.0) / 288_500.0).abs() < 1e-12,
            "{}: {}",
            r.policy,
            r.block_hit_rate
        );
        assert_eq!(format!("{:.1}", r.block_hit_rate * 100.0), "36.6");
        // vLLM's count can only be lower: the last prompt token is always recomputed.
        assert!(r.hit_rate < r.block_hit_rate);
    }
}

fn seed_run(policies: &[&str], seed: u64) -> kvroute_sim::report::Report {
    let w = workload::seed_experiment(&SeedParams { seed, ..SeedParams::default() });
    let p = Prepared::new(w, 16).unwrap();
    let cfg = SimConfig {
        workers: 5,
        engine: llama(16),
        event_delay_s: 0.05,
        seed,
        router_replicas: 1,
        tail_quantile: None,
    };
    compare(&p, &cfg, &names(policies), &|_| {}).unwrap()
}

#[test]
fn same_seed_gives_identical_json() {
    let all = [
        "random",
        "round-robin",
        "session-affinity",
        "prefix-approx",
        "prefix-precise",
        "llm-d",
        "cost",
        "hybrid",
        "oracle",
    ];
    let a = serde_json::to_string(&seed_run(&all, 3)).unwrap();
    let b = serde_json::to_string(&seed_run(&all, 3)).unwrap();
    assert_eq!(a, b);
    let c = serde_json::to_string(&seed_run(&all, 4)).unwrap();
    assert_ne!(a, c);
}

#[test]
fn seed_experiment_affinity_concentrates_and_random_spreads() {
    let rep = seed_run(&["session-affinity", "random", "oracle"], 0);
    let (aff, rnd, oracle) = (&rep.results[0], &rep.results[1], &rep.results[2]);
    // The main address sticks to one pod: its 80% plus the strays that land there too.
    assert!(aff.top_worker_share >= 0.75, "{aff:?}");
    assert!(aff.load_imbalance >= 3.5, "{aff:?}");
    assert!(rnd.per_worker.iter().all(|&c| c > 0));
    assert!(rnd.top_worker_share < 0.35, "{rnd:?}");
    // Repeats hit where they land: affinity re-finds its prompts on its pod, random only
    // once a prompt has reached every pod. The seed experiment reported 80-86%.
    assert!(aff.hit_rate > rnd.hit_rate + 0.08, "{} vs {}", aff.hit_rate, rnd.hit_rate);
    assert!((0.75..0.9).contains(&aff.hit_rate), "{}", aff.hit_rate);
    assert!(aff.hit_rate <= oracle.hit_rate + 1e-12);
}

#[test]
fn precise_prefix_beats_random_on_shared_prefix() {
    let w = workload::shared_prefix(&SharedPrefixParams {
        groups: 30,
        users_per_group: 5,
        questions_per_user: 2,
        rate: 4.0,
        ..SharedPrefixParams::default()
    });
    let p = Prepared::new(w, 16).unwrap();
    let cfg = SimConfig {
        workers: 4,
        engine: EngineConfig::preset("qwen3-32b", "h100-80gb", 16).unwrap(),
        event_delay_s: 0.05,
        seed: 0,
        router_replicas: 1,
        tail_quantile: None,
    };
    let rep = compare(&p, &cfg, &names(&["random", "prefix-precise", "oracle"]), &|_| {}).unwrap();
    let (rnd, pre, orc) = (&rep.results[0], &rep.results[1], &rep.results[2]);
    assert!(pre.hit_rate > rnd.hit_rate + 0.1, "{} vs {}", pre.hit_rate, rnd.hit_rate);
    assert!(pre.hit_rate <= orc.hit_rate + 1e-12);
    assert!(pre.ttft_p90_s.unwrap() < rnd.ttft_p90_s.unwrap());
}

#[test]
fn router_prefix_precise_reaches_the_oracle_and_follows_every_event() {
    // Few groups, slow arrivals, ample capacity: once a group's first request has been
    // prefilled and its events delivered, every later request of the group can hit its
    // system prompt. A router that keys the events' tokens like the prompts' finds them
    // all; the oracle (one unbounded cache) is the ceiling it must reach.
    let w = workload::shared_prefix(&SharedPrefixParams {
        groups: 6,
        users_per_group: 3,
        questions_per_user: 2,
        system_tokens: 2_000,
        question_tokens: 300,
        output_tokens: 50,
        rate: 0.2,
        seed: 5,
    });
    let p = Prepared::new(w, 16).unwrap();
    let cfg = SimConfig {
        workers: 4,
        engine: llama(16),
        event_delay_s: 0.05,
        seed: 5,
        router_replicas: 1,
        tail_quantile: None,
    };
    let oracle = kvroute_sim::run_oracle(&p, &cfg).unwrap();
    let mut pol =
        RouterPolicy::named("prefix-precise", cfg.workers, &cfg.engine, cfg.seed).unwrap();
    let pre = kvroute_sim::run(&p, &cfg, &mut pol).unwrap();
    let mut rnd = RouterPolicy::named("random", cfg.workers, &cfg.engine, cfg.seed).unwrap();
    let rnd = kvroute_sim::run(&p, &cfg, &mut rnd).unwrap();
    assert_eq!(pre.completed, 36);
    assert!(oracle.hit_rate > 0.6, "{}", oracle.hit_rate);
    assert!(
        (oracle.hit_rate - pre.hit_rate).abs() < 0.005,
        "{} vs {}",
        pre.hit_rate,
        oracle.hit_rate
    );
    assert!(rnd.hit_rate < oracle.hit_rate - 0.1, "{}", rnd.hit_rate);
    // The router's own view agrees with the engines: every stored run had a known parent,
    // every removal named a block it held, nothing is left in flight.
    let m = pol.router().metrics();
    assert_eq!(m.event_errors, 0);
    assert_eq!(m.inflight_requests, 0);
    assert_eq!(m.routes, 36);
    let stored: u64 = m.workers.iter().map(|w| w.events.blocks_stored).sum();
    assert!(stored > 0);
    for wm in &m.workers {
        assert_eq!((wm.events.orphans, wm.events.unknown_removals), (0, 0), "{wm:?}");
    }
    // What the router predicted at each route is exactly what the engines then served:
    // no eviction here, each group's prefix was announced before the next request came,
    // and 2,300-token prompts have no full last block for vLLM's last-token rule to drop.
    let prompt_tokens = 36.0 * 2_300.0;
    assert_eq!(m.predicted_hit_tokens as f64, (pre.hit_rate * prompt_tokens).round());
}

/// A short chat workload (60 conversations of 3 turns) and a 4-worker cluster behind
/// `replicas` routers, seed 3.
fn small_chat(replicas: usize) -> (Prepared, SimConfig) {
    let w = workload::chat(&workload::ChatParams {
        conversations: 60,
        turns: 3,
        ..workload::ChatParams::default()
    });
    let cfg = SimConfig {
        workers: 4,
        engine: llama(16),
        event_delay_s: 0.05,
        seed: 3,
        router_replicas: replicas,
        tail_quantile: None,
    };
    (Prepared::new(w, 16).unwrap(), cfg)
}

#[test]
fn router_replicas_are_deterministic_and_one_replica_is_the_single_router() {
    let p = small_chat(1).0;
    let with = |replicas: usize| small_chat(replicas).1;
    let run = |replicas: usize| {
        compare(&p, &with(replicas), &names(&["kvroute", "llm-d"]), &|_| {}).unwrap().results
    };
    // One replica through the report is exactly one router driven directly.
    let one = run(1);
    let mut single = RouterPolicy::named("kvroute", 4, &llama(16), 3).unwrap();
    assert_eq!(kvroute_sim::sim::run(&p, &with(1), &mut single).unwrap(), one[0]);
    assert_eq!(single.routers().len(), 1);
    // Several replicas: deterministic, and really independent routers (each sees only
    // its own routings, so the placement differs from one router's).
    let four = run(4);
    assert_eq!(four, run(4));
    assert_ne!(four[0].per_worker, one[0].per_worker);
    for r in &four {
        assert_eq!(r.completed + r.rejected, r.requests);
    }
    let mut replicated =
        RouterPolicy::named("kvroute", 4, &llama(16), 3).unwrap().with_replicas(4).unwrap();
    assert_eq!(kvroute_sim::sim::run(&p, &with(4), &mut replicated).unwrap(), four[0]);
    // Every replica routed a quarter of the requests and saw every worker's events.
    let routed: Vec<u64> = replicated.routers().iter().map(|r| r.metrics().routes).collect();
    assert_eq!(routed.iter().sum::<u64>(), p.workload.requests.len() as u64);
    assert!(routed.iter().all(|&n| n.abs_diff(routed[0]) <= 1), "{routed:?}");
    let batches: Vec<u64> =
        replicated.routers().iter().map(|r| r.metrics().event_batches).collect();
    assert!(batches.iter().all(|&b| b == batches[0] && b > 0), "{batches:?}");
    assert!(RouterPolicy::named("kvroute", 4, &llama(16), 3).unwrap().with_replicas(0).is_err());
}

#[test]
fn the_tail_quantile_reaches_every_kvroute_replica_and_only_kvroute() {
    let (p, cfg) = small_chat(2);
    // Each replica's exported tail is its configured percentile of what it observed: the
    // median (0.5) lies below the maximum (1.0) of the same replica's times.
    let tails = |q: Option<f64>| {
        let mut pol = RouterPolicy::named("kvroute", 4, &llama(16), 3)
            .unwrap()
            .with_tail_quantile(q)
            .unwrap()
            .with_replicas(2)
            .unwrap();
        kvroute_sim::sim::run(&p, &cfg, &mut pol).unwrap();
        pol.routers().iter().map(|r| r.metrics().tail_ttft_s).collect::<Vec<_>>()
    };
    let (median, max) = (tails(Some(0.5)), tails(Some(1.0)));
    for (m, x) in median.iter().zip(&max) {
        assert!(*m > 0.0 && m < x, "median {median:?}, max {max:?}");
    }
    // Out of range is refused; a policy without the tail ignores it.
    assert!(RouterPolicy::named("kvroute", 4, &llama(16), 3)
        .unwrap()
        .with_tail_quantile(Some(1.5))
        .is_err());
    assert!(RouterPolicy::named("llm-d", 4, &llama(16), 3)
        .unwrap()
        .with_tail_quantile(Some(1.5))
        .is_ok());
}

/// vLLM without chunked prefill requires `max_num_batched_tokens >= max_model_len`, and its
/// scheduler skips a waiting prompt only when it exceeds the token budget left after the
/// running requests' decode tokens: a prompt longer than the engine's 8,192-token step
/// limit still starts in the next step next to the decodes, instead of waiting for every
/// running request to finish.
#[test]
fn a_long_prompt_starts_next_to_running_decodes() {
    use kvroute_sim::workload::{Segment, SimRequest, Workload};
    use std::sync::Arc;
    let req = |id: u64, arrival_s: f64, prompt: u32, output: u32| SimRequest {
        id,
        arrival_s,
        prompt: Arc::from(vec![Segment { seed: 100 + id, len: prompt }]),
        output: Segment { seed: 200 + id, len: output },
        session: None,
    };
    // r0 decodes 2,000 tokens from t = 0 (about 15 s at ~7 ms a step); r1, a 20,000-token
    // prompt (above the 8,192 step limit), arrives at t = 1 s.
    let w = Workload {
        name: "long-prompt".into(),
        params: serde_json::Value::Null,
        requests: vec![req(0, 0.0, 100, 2_000), req(1, 1.0, 20_000, 1)],
    };
    let p = Prepared::new(w, 16).unwrap();
    let engine = llama(16);
    let prefill = 20_000.0 / engine.prefill_tokens_per_s;
    let step =
        engine.step_overhead_s + engine.decode_s_per_seq + 2_200.0 * engine.decode_s_per_ctx_token;
    let cfg = SimConfig {
        workers: 1,
        engine,
        event_delay_s: 0.0,
        seed: 1,
        router_replicas: 1,
        tail_quantile: None,
    };
    let rep = compare(&p, &cfg, &names(&["round-robin"]), &|_| {}).unwrap();
    let r = &rep.results[0];
    assert_eq!(r.completed, 2);
    // The larger TTFT is r1's: the rest of one decode step, then one step that prefills it
    // next to r0's decode.
    let ttft = r.ttft_p99_s.unwrap();
    assert!(ttft >= prefill && ttft <= prefill + 2.0 * step + 1e-9, "{ttft} vs {prefill} + {step}");
}

#[test]
fn a_shared_lru_as_large_as_the_cluster_bounds_the_hit_rate_by_capacity() {
    let w = workload::shared_prefix(&SharedPrefixParams {
        groups: 8,
        users_per_group: 3,
        questions_per_user: 2,
        system_tokens: 2_000,
        question_tokens: 300,
        output_tokens: 50,
        rate: 0.5,
        seed: 9,
    });
    let p = Prepared::new(w, 16).unwrap();
    let cfg = SimConfig {
        workers: 4,
        engine: llama(16),
        event_delay_s: 0.05,
        seed: 9,
        router_replicas: 1,
        tail_quantile: None,
    };
    // Ample capacity: nothing is evicted, so the shared cache is the oracle.
    let oracle = kvroute_sim::run_oracle(&p, &cfg).unwrap();
    let ample = kvroute_sim::run_shared_lru(&p, &cfg).unwrap();
    assert_eq!(ample.evictions, 0);
    assert_eq!(ample.hit_rate, oracle.hit_rate);
    assert_eq!(ample.policy, "shared-lru");
    // Four workers of 60 blocks (one of them vLLM's null block each): one cache of
    // 4 x 59 + 1 = 237 blocks, less than two groups' 125-block system prompts and their
    // questions, so the eight groups evict each other.
    let mut tight = cfg.clone();
    tight.engine.num_gpu_blocks = 60;
    let shared = kvroute_sim::run_shared_lru(&p, &tight).unwrap();
    assert!(shared.evictions > 0);
    assert!(shared.hit_rate < oracle.hit_rate - 0.1, "{} vs {}", shared.hit_rate, oracle.hit_rate);
    // The same cache stated as one worker of 237 blocks.
    let mut one = tight.clone();
    one.workers = 1;
    one.engine.num_gpu_blocks = 237;
    let same = kvroute_sim::run_shared_lru(&p, &one).unwrap();
    assert_eq!((same.hit_rate, same.evictions), (shared.hit_rate, shared.evictions));
}
