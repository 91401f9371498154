//! The short version of the end-to-end experiment that CI runs (seconds, with a time scale):
//! real processes, real sockets.

use kvroute_e2e::{kvroute_bin, run, ClusterSpec, Fault};
use kvroute_sim::SimulateSpec;

const TIME_SCALE: f64 = 0.01;

/// The runs start many processes on a small machine: one at a time keeps their timing
/// (and so the hit rates) close to the model's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(workload: &str, requests: usize) -> (SimulateSpec, kvroute_sim::Workload, ClusterSpec) {
    let s = SimulateSpec {
        workloads: vec![workload.into()],
        requests: Some(requests),
        ..SimulateSpec::default()
    };
    let w = s.workload(workload).unwrap();
    let c = s.cluster(workload).unwrap();
    let cs = ClusterSpec {
        bin: kvroute_bin().unwrap(),
        replicas: c.workers,
        time_scale: TIME_SCALE,
        capacity_blocks: None,
        engine_model: if workload == "shared-prefix" { "qwen3-32b" } else { "llama-3-8b" }.into(),
        hash_seed: None,
        model: "llama-3-8b".into(),
        tokenizer: None,
        router_tokenizer: Some(kvroute_e2e::test_tokenizer().0),
        vocab: Some(kvroute_e2e::test_tokenizer().1),
        serve: None,
        log_dir: None,
    };
    (s, w, cs)
}

fn sim(s: &SimulateSpec, policy: &str) -> kvroute_sim::RunResult {
    let r =
        kvroute_sim::simulate(&SimulateSpec { policies: Some(vec![policy.into()]), ..s.clone() })
            .unwrap();
    r[0].results[0].clone()
}

/// Round robin needs no router: the replicas' own counters over the wire must give the
/// simulator's hit rate for the same workload and assignment (same engine model, same
/// block pool, vLLM's counting).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_wire_hit_rate_equals_the_simulator_for_round_robin() {
    let _serial = SERIAL.lock().await;
    let (s, w, cs) = spec("seed", 150);
    let (got, _) = run(cs, &w, "round robin", None).await.unwrap();
    println!("{got}");
    assert_eq!(got.failed, 0, "{got}");
    let want = sim(&s, "round-robin");
    assert_eq!(
        got.replicas.iter().map(|r| r.requests as usize).collect::<Vec<_>>(),
        want.per_worker
    );
    assert!(
        (got.hit_rate - want.hit_rate).abs() < 0.01,
        "wire {:.4} vs simulator {:.4}",
        got.hit_rate,
        want.hit_rate
    );
}

/// A restarted replica (cache cleared, sequence back to 0) serves again after its
/// downtime; only requests sent to it meanwhile fail, since nothing routes around it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_replica_serves_again() {
    let _serial = SERIAL.lock().await;
    let (_, w, cs) = spec("seed", 100);
    let (got, _) = run(cs, &w, "round robin, restart", Some((Fault::Restart { down_ms: 100 }, 0)))
        .await
        .unwrap();
    println!("{got}");
    assert!(got.failed <= 5, "{got}");
    assert!(got.completed >= 95);
}

fn with_router(mut cs: ClusterSpec, profile: Option<&str>) -> ClusterSpec {
    cs.serve = Some(profile.map_or(vec![], |p| vec!["--profile".into(), p.into()]));
    cs
}

fn index_blocks(metrics: &Option<String>) -> f64 {
    metrics
        .as_deref()
        .and_then(|m| kvroute_e2e::sample(m, "kvroute_index_blocks", ""))
        .unwrap_or(-1.0)
}

/// The reference experiment, short: with session affinity most requests land on one
/// replica; kvroute's default preset spreads them and reaches the hit-rate ceiling, which
/// is what the simulator predicts for the same workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_affinity_versus_the_default_preset_through_kvroute_serve() {
    let _serial = SERIAL.lock().await;
    let (s, w, cs) = spec("seed", 150);
    let (aff, _) =
        run(with_router(cs.clone(), Some("session-affinity")), &w, "session-affinity", None)
            .await
            .unwrap();
    println!("{aff}");
    // The default preset with its times scaled like the emulated engines: unscaled, every
    // candidate is a near-tie at this time scale (`scaled_default_preset`), and the hit
    // rate was 70-81% from run to run against 84-86% scaled.
    let mut scaled = cs;
    scaled.serve = Some(kvroute_e2e::scaled_default_preset(TIME_SCALE).unwrap());
    let (def, m) = run(scaled, &w, "default", None).await.unwrap();
    println!("{def}");
    assert_eq!((aff.failed, def.failed), (0, 0), "{aff}{def}");
    assert!(aff.top_share >= 0.6, "affinity should pile requests on one replica: {aff}");
    assert!(def.top_share < aff.top_share, "{def}");
    assert!(def.hit_rate > aff.hit_rate, "{aff}{def}");
    // The ceiling: every prompt misses once (20 distinct prompts, full-block hits only).
    let ceiling = sim(&s, "prefix-precise").hit_rate;
    assert!(def.hit_rate >= ceiling - 0.05, "wire {:.3} vs simulated {ceiling:.3}", def.hit_rate);
    assert!(index_blocks(&m) > 0.0, "the router's index never filled: {m:?}");
    // Each replica publishes on its own topic (kv@host:port@model) and the router
    // subscribes to "": it hears every replica that computed something.
    for (i, r) in def.replicas.iter().enumerate() {
        if r.requests > 0.0 {
            assert!(def.router_event_batches[i] > 0.0, "no KV events from replica {i}: {def}");
        }
    }
}

/// Faults halfway through, through the router: a replica that restarts, one that is
/// killed, and dropped event batches. The router keeps serving: nothing fails except
/// streams that were already running on the replica that went away (those cannot be
/// retried), and its index converges (it holds blocks at the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_keeps_serving_through_restart_kill_and_dropped_batches() {
    let _serial = SERIAL.lock().await;
    let (_, w, cs) = spec("seed", 120);
    for fault in
        [Fault::Restart { down_ms: 200 }, Fault::Kill, Fault::DropBatches(3), Fault::Error500]
    {
        let (got, m) =
            run(with_router(cs.clone(), None), &w, &format!("{fault:?}"), Some((fault, 0)))
                .await
                .unwrap();
        println!("{got}");
        // Requests in flight on replica 0 when it dies break mid-stream and cannot be
        // retried; a request that fails before its first byte could have been retried.
        let before_first_byte: Vec<&String> =
            got.errors.iter().filter(|e| !e.starts_with("stream broken")).collect();
        match fault {
            Fault::Kill | Fault::Restart { .. } => {
                assert!(got.failed <= 4, "{got}");
                // Everything that failed before its first byte is retried on the next
                // worker (refused, reset pooled connection, closed before the head or
                // before the first body byte): none of those may reach the client.
                assert!(
                    before_first_byte.is_empty(),
                    "retryable requests were lost: {before_first_byte:?}\n{got}"
                );
            }
            _ => assert_eq!(got.failed, 0, "{got}"),
        }
        assert!(index_blocks(&m) > 0.0, "{fault:?}: index empty at the end: {m:?}");
    }
}
