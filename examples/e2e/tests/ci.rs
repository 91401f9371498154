//! The short version of the end-to-end experiment that CI runs (seconds, with a time scale):
//! real processes, real sockets.

use kvroute_e2e::{kvroute_bin, run, ClusterSpec, Fault, Summary};
use kvroute_sim::SimulateSpec;

const TIME_SCALE: f64 = 0.01;

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

fn no_lost(s: &Summary) {
    assert!(s.failed == 0, "{s}");
}

/// A restarted replica (cache cleared, sequence back to 0) serves again after its
/// downtime; only requests sent to it meanwhile fail, since nothing routes around it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_replica_serves_again() {
    let (_, w, cs) = spec("seed", 100);
    let (got, _) = run(cs, &w, "round robin, restart", Some((Fault::Restart { down_ms: 100 }, 0)))
        .await
        .unwrap();
    println!("{got}");
    assert!(got.failed <= 5, "{got}");
    assert!(got.completed >= 95);
    let _ = no_lost;
}
