//! The router end to end: vLLM's recorded events, routing, modes, lifecycle, snapshots,
//! errors and concurrency.

use kvroute::events::vllm;
use kvroute::router::{LoadReport, Request, Router};
use kvroute::Error;
use serde_json::Value as J;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(path)
}

fn kv_events() -> J {
    let text = std::fs::read_to_string(testdata("vllm/kv_events.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The recorded vLLM steps (payload bytes and decoded form), in order, 0.33 engine only
/// (the hand-built batches at the end use made-up hashes).
fn recorded_batches() -> Vec<(String, Vec<u8>, J)> {
    let v = kv_events();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["batch"].is_null())
        .filter(|s| !s["step"].as_str().unwrap().starts_with("handcrafted"))
        .map(|s| {
            let b = &s["batch"];
            let bytes = hex(b["payload_hex"].as_str().unwrap());
            (s["step"].as_str().unwrap().to_string(), bytes, b["decoded"].clone())
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn router(json: &str) -> Router {
    Router::from_json(json).unwrap()
}

fn tokens(n: u32) -> Vec<u32> {
    (0..n).collect()
}

/// A reference model of one worker's held GPU blocks, built from the decoded JSON.
fn apply_model(model: &mut HashMap<String, i64>, decoded: &J) {
    for ev in decoded[1].as_array().unwrap() {
        let hashes = |ev: &J| -> Vec<String> {
            ev["block_hashes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| match h.get("bytes_hex").and_then(J::as_str) {
                    // vLLM's bytes mode: the key is the digest's last 8 bytes, big-endian.
                    Some(hx) => u64::from_str_radix(&hx[hx.len() - 16..], 16).unwrap().to_string(),
                    None => h.to_string(),
                })
                .collect()
        };
        match ev["type"].as_str().unwrap() {
            "BlockStored" => {
                for h in hashes(ev) {
                    *model.entry(h).or_default() += 1;
                }
            }
            "BlockRemoved" => {
                for h in hashes(ev) {
                    if let Some(c) = model.get_mut(&h) {
                        *c -= 1;
                        if *c == 0 {
                            model.remove(&h);
                        }
                    }
                }
            }
            "AllBlocksCleared" => model.clear(),
            other => panic!("unexpected event {other}"),
        }
    }
}

#[test]
fn precise_sha256_follows_vllm_events() {
    let r = router(
        r#"{"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}"#,
    );
    let mut model = HashMap::new();
    for (step, payload, decoded) in recorded_batches() {
        r.apply_vllm_batch("pod-a", &payload).unwrap_or_else(|e| panic!("{step}: {e}"));
        apply_model(&mut model, &decoded);
        assert_eq!(r.index_stats().holder_blocks, model.len() as u64, "after step {step}");
        if step.starts_with("r1 ") {
            // The router's own sha256 hash of tokens 0..99 meets the engine's blocks.
            let d = r.route(&Request::new(&tokens(100))).unwrap();
            assert_eq!(d.worker.name, "pod-a");
            assert_eq!(d.matched_blocks, 6);
            assert_eq!(d.total_blocks, 6);
            let b = d.explain().into_iter().find(|c| c.worker.name == "pod-b").unwrap();
            assert_eq!(b.matched_blocks, 0);
        }
    }
    let m = r.metrics();
    let a = m.workers.iter().find(|w| w.worker.name == "pod-a").unwrap();
    assert!(a.has_events && a.events.batches > 5);
    let b = m.workers.iter().find(|w| w.worker.name == "pod-b").unwrap();
    assert!(!b.has_events, "pod-b sent nothing and says so");
}

#[test]
fn native_keys_rekey_event_tokens() {
    // xxh3: the router cannot reproduce vLLM's hashes, so it hashes the events' tokens.
    let r = router(
        r#"{"hash_algo": "xxh3", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}"#,
    );
    let batches = recorded_batches();
    let (_, r1, _) = &batches[0];
    r.apply_vllm_batch("pod-a", r1).unwrap();
    let d = r.route(&Request::new(&tokens(100))).unwrap();
    assert_eq!((d.worker.name.as_str(), d.matched_blocks), ("pod-a", 6));
    // Every later step (removals by engine hash, parents by engine hash) applies cleanly
    // and the engine-hash map tracks what is held.
    let mut model = HashMap::new();
    apply_model(&mut model, &batches[0].2);
    for (step, payload, decoded) in &batches[1..] {
        let rep = r.apply_vllm_batch("pod-a", payload).unwrap();
        apply_model(&mut model, decoded);
        assert_eq!(r.index_stats().holder_blocks, model.len() as u64, "{step}: {rep:?}");
    }
}

#[test]
fn hash_mismatch_is_loud_and_changes_nothing() {
    // The engine ran without PYTHONHASHSEED; this router believes it was 0.
    let r = router(r#"{"hash_algo": "sha256", "hash_seed": "0", "workers": [{"name": "pod-a"}]}"#);
    let batches = recorded_batches();
    let err = r.apply_vllm_batch("pod-a", &batches[0].1).unwrap_err();
    assert!(matches!(err, Error::HashMismatch(_)), "{err}");
    assert!(err.to_string().contains("PYTHONHASHSEED"));
    assert_eq!(r.index_stats().holder_blocks, 0);
    assert!(r.metrics().hash_mismatches > 0);
    // In counting mode the batch applies and the mismatch is counted.
    let r = router(
        r#"{"hash_algo": "sha256", "hash_seed": "0", "on_hash_mismatch": "count", "workers": [{"name": "pod-a"}]}"#,
    );
    let rep = r.apply_vllm_batch("pod-a", &batches[0].1).unwrap();
    assert_eq!(rep.hash_mismatches, 6);
    assert_eq!(rep.hashes_verified, 6);
}

#[test]
fn bad_batches_are_rejected_without_change() {
    let batches = recorded_batches();
    let r = router(r#"{"block_size": 32, "workers": [{"name": "pod-a"}]}"#);
    let err = r.apply_vllm_batch("pod-a", &batches[0].1).unwrap_err();
    assert_eq!(err, Error::BlockSizeMismatch { router: 32, event: 16 });
    assert_eq!(r.metrics().workers[0].events.errors, 1);

    let r = router(r#"{"workers": [{"name": "pod-a"}]}"#);
    assert!(matches!(r.apply_vllm_batch("pod-z", &batches[0].1), Err(Error::UnknownWorker(_))));
    assert!(matches!(r.apply_vllm_batch("pod-a", b"\x93\xff"), Err(Error::Decode(_))));
    let mut truncated = batches[0].1.clone();
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(r.apply_vllm_batch("pod-a", &truncated), Err(Error::Decode(_))));
    assert_eq!(r.index_stats().holder_blocks, 0);
    // Still usable.
    r.apply_vllm_batch("pod-a", &batches[0].1).unwrap();
    assert_eq!(r.index_stats().holder_blocks, 6);
    assert_eq!(r.clear_worker("pod-a").unwrap(), 6);
    assert_eq!(r.index_stats().holder_blocks, 0);
    assert!(matches!(r.clear_worker("nope"), Err(Error::UnknownWorker(_))));
    // Auto-add creates the worker on its first batch.
    let r = router(r#"{"auto_add_workers": true}"#);
    r.apply_vllm_batch("10.0.0.9:8000", &batches[0].1).unwrap();
    assert_eq!(r.workers()[0].name, "10.0.0.9:8000");
    // ... but not for ranks a payload could make up without bound.
    let mut batch = vllm::decode(&batches[0].1).unwrap();
    batch.data_parallel_rank = Some(60_000);
    assert!(matches!(r.apply_events("10.0.0.9:8000", &batch), Err(Error::InvalidInput(_))));
    assert_eq!(r.workers().len(), 1);
    // A removed worker's id, reused by the next worker, carries none of its blocks.
    r.remove_worker("10.0.0.9:8000", 0).unwrap();
    let id = r.add_worker("fresh", 0).unwrap();
    assert_eq!(id.0, 0);
    assert_eq!(r.index_stats().holder_blocks, 0);
    assert_eq!(r.metrics().workers[0].index_blocks, 0);
}

#[test]
fn config_errors_name_the_problem() {
    let e = Router::from_json(r#"{"profil": "llm-d"}"#).unwrap_err();
    assert!(matches!(e, Error::Config(_)) && e.to_string().contains("profil"), "{e}");
    let e = Router::from_json(r#"{"profile": "fastest"}"#).unwrap_err();
    assert!(e.to_string().contains("fastest"), "{e}");
    let e = Router::from_json(r#"{"hash_algo": "xxhash"}"#).unwrap_err();
    assert!(matches!(e, Error::MissingSeed(_)), "{e}");
    let e = Router::from_json(r#"{"workers": [{"name": "a"}, {"name": "a"}]}"#).unwrap_err();
    assert!(matches!(e, Error::WorkerExists(_)), "{e}");
    let e = Router::from_json("not json").unwrap_err();
    assert!(matches!(e, Error::Config(_)));
    let r = router(r#"{"vocab_size": 1000, "workers": [{"name": "a"}]}"#);
    assert!(matches!(r.route(&Request::new(&[1, 2, 1000])), Err(Error::InvalidInput(_))));
    let empty = router("{}");
    assert!(matches!(empty.route(&Request::new(&[1, 2])), Err(Error::NoWorkers(_))));
}

#[test]
fn session_affinity_sticks_until_the_ttl() {
    let r = router(
        r#"{"profile": "session-affinity", "session_ttl_s": 60, "workers": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}]}"#,
    );
    let t = tokens(64);
    let first = r
        .route(&Request {
            tokens: &t,
            session: Some("10.1.2.3"),
            now_ms: Some(0),
            ..Request::default()
        })
        .unwrap();
    for i in 1..50 {
        let d = r
            .route(&Request {
                tokens: &t,
                session: Some("10.1.2.3"),
                now_ms: Some(i * 1000),
                ..Request::default()
            })
            .unwrap();
        assert_eq!(d.worker, first.worker);
    }
    // New clients spread over the workers (Kubernetes picks a random endpoint).
    let mut seen = std::collections::HashSet::new();
    for i in 0..64 {
        let ip = format!("10.9.0.{i}");
        let d = r
            .route(&Request {
                tokens: &t,
                session: Some(&ip),
                now_ms: Some(0),
                ..Request::default()
            })
            .unwrap();
        seen.insert(d.worker.name.clone());
    }
    assert_eq!(seen.len(), 4);
    // After the TTL without use, the key may move (seeded: over many keys, some do).
    let mut moved = 0;
    for i in 0..64 {
        let ip = format!("10.9.0.{i}");
        let before = r
            .route(&Request {
                tokens: &t,
                session: Some(&ip),
                now_ms: Some(1_000),
                ..Request::default()
            })
            .unwrap();
        let after = r
            .route(&Request {
                tokens: &t,
                session: Some(&ip),
                now_ms: Some(1_000 + 61_000),
                ..Request::default()
            })
            .unwrap();
        moved += usize::from(before.worker != after.worker);
    }
    assert!(moved > 20, "{moved}");
}

#[test]
fn approximate_mode_predicts_from_routing_history() {
    let r = router(
        r#"{"mode": "approximate", "profile": "prefix", "capacity": {"num_gpu_blocks": 1000}, "workers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}"#,
    );
    let t = tokens(320);
    let d1 = r.route(&Request::new(&t)).unwrap();
    assert_eq!(d1.matched_blocks, 0);
    r.on_routed(&d1).unwrap();
    let d2 = r.route(&Request::new(&t)).unwrap();
    assert_eq!(d2.worker, d1.worker);
    // The last token is always recomputed, so a 320-token prompt hits 19 of 20 blocks in
    // vLLM; the router's prediction reports what the index holds: all 20.
    assert_eq!(d2.matched_blocks, 20);
    r.on_first_token(d1.request_id).unwrap();
    r.on_finished(d1.request_id).unwrap();
    // Freed blocks stay cached (vLLM keeps them in the free queue until evicted).
    let d3 = r.route(&Request::new(&t)).unwrap();
    assert_eq!((d3.worker.clone(), d3.matched_blocks), (d1.worker.clone(), 20));
    // Approximate mode takes no events.
    assert!(matches!(r.apply_vllm_batch("a", &recorded_batches()[0].1), Err(Error::Config(_))));
}

#[test]
fn approximate_mode_evicts_like_vllm() {
    // 11 blocks (one null): two 5-block prompts fit, a third evicts the oldest freed one.
    let r = router(
        r#"{"mode": "approximate", "profile": "prefix", "capacity": {"num_gpu_blocks": 11}, "workers": [{"name": "a"}]}"#,
    );
    let prompts: Vec<Vec<u32>> = (0..3).map(|p| (p * 1000..p * 1000 + 80).collect()).collect();
    for p in &prompts {
        let d = r.route(&Request::new(p)).unwrap();
        r.on_routed(&d).unwrap();
        r.on_finished(d.request_id).unwrap();
    }
    let hit = |p: &Vec<u32>| r.route(&Request::new(p)).unwrap().matched_blocks;
    assert_eq!(hit(&prompts[2]), 5);
    assert_eq!(hit(&prompts[1]), 5);
    assert_eq!(hit(&prompts[0]), 0, "evicted");
    assert_eq!(r.index_stats().holder_blocks, 10);
}

#[test]
fn hybrid_mode_switches_to_events() {
    let r = router(
        r#"{"mode": "hybrid", "hash_algo": "sha256", "profile": "prefix", "capacity": {"num_gpu_blocks": 1000}, "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}"#,
    );
    let t: Vec<u32> = (5000..5320).collect();
    let d = r.route(&Request::new(&t)).unwrap();
    r.on_routed(&d).unwrap();
    assert_eq!(r.route(&Request::new(&t)).unwrap().matched_blocks, 20);
    // Its events arrive: predictions for that worker are dropped, events win.
    let batches = recorded_batches();
    r.apply_vllm_batch(&d.worker.name, &batches[0].1).unwrap();
    let again = r.route(&Request::new(&t)).unwrap();
    assert!(again.explain().iter().all(|c| c.worker != d.worker || c.matched_blocks == 0));
    let hundred = r.route(&Request::new(&tokens(100))).unwrap();
    assert_eq!((hundred.worker.clone(), hundred.matched_blocks), (d.worker.clone(), 6));
}

#[test]
fn lifecycle_tracks_load_and_rejects_misuse() {
    let r = router(r#"{"profile": "llm-d", "workers": [{"name": "a"}, {"name": "b"}]}"#);
    let t = tokens(1000);
    let d = r.route(&Request::new(&t)).unwrap();
    r.on_routed(&d).unwrap();
    assert!(matches!(r.on_routed(&d), Err(Error::InvalidInput(_))));
    let w = |r: &Router| r.metrics().workers.into_iter().find(|w| w.worker == d.worker).unwrap();
    assert_eq!(w(&r).running, 1);
    assert_eq!(w(&r).inflight_prefill_tokens, 1000);
    r.on_first_token(d.request_id).unwrap();
    assert_eq!(w(&r).inflight_prefill_tokens, 0);
    r.on_finished(d.request_id).unwrap();
    assert_eq!(w(&r).running, 0);
    assert!(matches!(r.on_finished(d.request_id), Err(Error::InvalidInput(_))));
    assert!(matches!(r.on_first_token(999_999), Err(Error::InvalidInput(_))));
    // Load reports steer the llm-d profile: a long queue on `a` sends work to `b`.
    r.report_load(
        "a",
        0,
        &LoadReport { waiting: Some(50), kv_usage: Some(0.95), ..LoadReport::default() },
    )
    .unwrap();
    r.report_load(
        "b",
        0,
        &LoadReport { waiting: Some(0), kv_usage: Some(0.1), ..LoadReport::default() },
    )
    .unwrap();
    for _ in 0..10 {
        assert_eq!(r.route(&Request::new(&t)).unwrap().worker.name, "b");
    }
    // The explanation: named scores per candidate whose weighted sum is the total.
    let d = r.route(&Request::new(&t)).unwrap();
    assert_eq!(d.score_names(), ["prefix", "queue", "kv-utilization"]);
    let ex = d.explain();
    assert_eq!(ex.len(), 2);
    for (i, c) in ex.iter().enumerate() {
        let s = d.candidate_scores(i);
        assert!((3.0 * s[0] + 2.0 * s[1] + 2.0 * s[2] - c.total).abs() < 1e-9, "{c:?}");
        assert_eq!(d.candidate_worker(i), Some(&c.worker));
    }
    let b = ex.iter().find(|c| c.worker.name == "b").unwrap();
    assert_eq!(b.scores[1], ("queue".to_string(), 1.0));
    assert!(d.candidate_scores(5).is_empty() && d.candidate_worker(5).is_none());
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["candidates"].as_array().unwrap().len(), 2);
    assert!(matches!(
        r.report_load("a", 0, &LoadReport { kv_usage: Some(1.5), ..LoadReport::default() }),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(r.report_load("zz", 0, &LoadReport::default()), Err(Error::UnknownWorker(_))));
    // Unhealthy and draining workers get nothing.
    r.set_healthy("b", 0, false).unwrap();
    for _ in 0..10 {
        assert_eq!(r.route(&Request::new(&t)).unwrap().worker.name, "a");
    }
    r.drain_worker("a", 0, true).unwrap();
    assert!(matches!(r.route(&Request::new(&t)), Err(Error::NoWorkers(_))));
}

#[test]
fn snapshot_restores_warm_in_another_router() {
    let cfg = r#"{"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}"#;
    let a = router(cfg);
    a.apply_vllm_batch("pod-b", &recorded_batches()[0].1).unwrap();
    a.set_stream_position("tcp://pod-b:5557", 41);
    let snap = a.snapshot();
    // A late replica knows the workers in another order: ids are renumbered.
    let b = router(
        r#"{"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-b"}, {"name": "pod-c"}]}"#,
    );
    let streams = b.restore(&snap).unwrap();
    assert_eq!(streams.get("tcp://pod-b:5557"), Some(&41));
    a.set_stream_position("pod-b", 7);
    let m = a.metrics();
    assert_eq!(m.workers.iter().find(|w| w.worker.name == "pod-b").unwrap().last_seq, Some(7));
    assert_eq!(m.workers.iter().find(|w| w.worker.name == "pod-a").unwrap().last_seq, None);
    let d = b.route(&Request::new(&tokens(100))).unwrap();
    assert_eq!((d.worker.name.as_str(), d.matched_blocks), ("pod-b", 6));
    assert_eq!(b.workers().len(), 3, "pod-a added from the snapshot");
    // Removals by engine hash after restore still find the blocks.
    for (_, payload, _) in &recorded_batches()[1..] {
        b.apply_vllm_batch("pod-b", payload).unwrap();
    }
    // Incompatible or corrupt snapshots are refused and change nothing.
    let c = router(r#"{"hash_algo": "sha256_cbor", "workers": [{"name": "pod-a"}]}"#);
    assert!(matches!(c.restore(&snap), Err(Error::Snapshot(_))));
    assert!(matches!(b.restore(&snap[..snap.len() - 3]), Err(Error::Snapshot(_))));
    assert!(matches!(b.restore(b"nope"), Err(Error::Snapshot(_))));
}

#[test]
fn prometheus_text_has_every_family() {
    let r = router(r#"{"workers": [{"name": "a"}, {"name": "b\"q"}]}"#);
    r.route(&Request::new(&tokens(64))).unwrap();
    let text = r.prometheus();
    for family in [
        "kvroute_routes_total 1",
        "# TYPE kvroute_index_heap_bytes gauge",
        "kvroute_worker_decisions_total{worker=\"a\",dp_rank=\"0\"}",
        "worker=\"b\\\"q\"",
    ] {
        assert!(text.contains(family), "missing {family} in\n{text}");
    }
}

#[test]
fn routes_concurrently_while_events_apply_and_workers_churn() {
    let r = Arc::new(router(
        r#"{"hash_algo": "sha256", "profile": "llm-d", "workers": [{"name": "pod-a"}, {"name": "pod-b"}, {"name": "pod-c"}]}"#,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let batches = recorded_batches();
    let mut handles = Vec::new();
    for t in 0..4u32 {
        let r = r.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let prompt: Vec<u32> = (0..100 + t * 16).collect();
            while !stop.load(Ordering::Relaxed) || n < 200 {
                let d = match r.route(&Request::new(&prompt)) {
                    Ok(d) => d,
                    Err(Error::NoWorkers(_)) => continue,
                    Err(e) => panic!("{e}"),
                };
                assert!(
                    ["pod-a", "pod-b", "pod-c", "pod-x"].contains(&d.worker.name.as_str()),
                    "{d:?}"
                );
                match r.on_routed(&d) {
                    Ok(()) => {
                        r.on_first_token(d.request_id).unwrap();
                        r.on_finished(d.request_id).unwrap();
                    }
                    // The worker was removed between route and on_routed.
                    Err(Error::UnknownWorker(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                n += 1;
            }
            n
        }));
    }
    let writer = {
        let r = r.clone();
        std::thread::spawn(move || {
            for round in 0..200 {
                for (_, payload, _) in &batches {
                    r.apply_vllm_batch("pod-a", payload).unwrap();
                }
                if round % 10 == 0 {
                    r.add_worker("pod-x", 0).unwrap();
                    r.apply_vllm_batch("pod-x", &batches[0].1).unwrap();
                    r.remove_worker("pod-x", 0).unwrap();
                }
            }
        })
    };
    writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total >= 800);
    assert_eq!(r.inflight_requests(), 0);
    for w in r.metrics().workers {
        assert_eq!((w.running, w.inflight_prefill_tokens), (0, 0), "{:?}", w.worker);
    }
}

#[test]
fn long_events_apply_in_chunks_without_orphans() {
    use kvroute::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch};
    let tokens: Vec<u32> = (0..100 * 16).map(|i| (i * 7 + 3) % 50_000).collect();
    for algo in ["sha256_cbor", "xxh3"] {
        let r = router(&format!(
            r#"{{"hash_algo": "{algo}", "profile": "prefix", "workers": [{{"name": "a"}}, {{"name": "b"}}]}}"#
        ));
        // Engine hashes: the router's own for the vLLM scheme, arbitrary ones for xxh3.
        let engine: Vec<u64> = if algo == "xxh3" {
            (0..100).map(|i| 0xE000 + i).collect()
        } else {
            r.block_keys(&tokens, None).unwrap()
        };
        let stored = KvEvent::BlockStored(BlockStored {
            block_hashes: engine.iter().map(|&h| EngineHash::Int(h)).collect(),
            token_ids: tokens.clone(),
            block_size: 16,
            ..BlockStored::default()
        });
        let rep = r.apply_events("b", &KvEventBatch::new(1.0, vec![stored])).unwrap();
        assert_eq!((rep.blocks_stored, rep.orphans), (100, 0), "{algo}");
        let d = r.route(&Request::new(&tokens)).unwrap();
        assert_eq!((d.worker.name.as_str(), d.matched_blocks), ("b", 100), "{algo}");
        // Remove the last 70 (more than two chunks), tail first.
        let removed = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: engine[30..].iter().rev().map(|&h| EngineHash::Int(h)).collect(),
            ..BlockRemoved::default()
        });
        let rep = r.apply_events("b", &KvEventBatch::new(2.0, vec![removed])).unwrap();
        assert_eq!((rep.blocks_removed, rep.unknown_removals), (70, 0), "{algo}");
        assert_eq!(r.route(&Request::new(&tokens)).unwrap().matched_blocks, 30, "{algo}");
        assert_eq!(r.index_stats().holder_blocks, 30);
    }
}

#[test]
fn lazily_decoded_tokens_give_the_same_reports_and_index() {
    // apply_vllm_batch skips the token ids a vLLM-keyed router does not use; what it
    // applies must equal applying the fully decoded batch, with and without verification.
    for cfg in [
        r#"{"hash_algo": "sha256", "workers": [{"name": "w"}]}"#,
        r#"{"hash_algo": "sha256", "verify_engine_hashes": false, "workers": [{"name": "w"}]}"#,
        r#"{"hash_algo": "sha256", "vocab_size": 1000, "workers": [{"name": "w"}]}"#,
        r#"{"hash_algo": "xxh3", "workers": [{"name": "w"}]}"#,
    ] {
        let (lazy, full) = (router(cfg), router(cfg));
        let mut verified = 0;
        for (step, payload, _) in recorded_batches() {
            let a = lazy.apply_vllm_batch("w", &payload).map_err(|e| e.to_string());
            let batch = vllm::decode(&payload).unwrap();
            let b = full.apply_events("w", &batch).map_err(|e| e.to_string());
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{cfg} {step}");
            verified += a.map(|r| r.hashes_verified).unwrap_or(0);
        }
        assert_eq!(lazy.index_stats(), full.index_stats(), "{cfg}");
        if cfg.contains("sha256") && !cfg.contains("verify") {
            assert!(verified > 0, "{cfg}: root events were verified from their tokens");
        }
    }
}

#[test]
fn a_batch_without_its_tokens_is_rejected_where_they_are_needed() {
    use kvroute::events::vllm::{decode_with, DecodeOptions, TokenIds};
    let payload = &recorded_batches()[0].1;
    let skipped = decode_with(payload, DecodeOptions { token_ids: TokenIds::Skip }).unwrap();
    for cfg in [
        r#"{"hash_algo": "xxh3", "workers": [{"name": "w"}]}"#,
        r#"{"hash_algo": "sha256", "workers": [{"name": "w"}]}"#,
        r#"{"hash_algo": "sha256", "vocab_size": 1000, "workers": [{"name": "w"}]}"#,
    ] {
        let r = router(cfg);
        let err = r.apply_events("w", &skipped).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{cfg}: {err}");
        assert!(err.to_string().contains("skipped"), "{err}");
        assert_eq!(r.index_stats().holder_blocks, 0, "{cfg}: nothing applied");
    }
    // Keyed by the engine's hashes without verification, the tokens are not needed.
    let r = router(
        r#"{"hash_algo": "sha256", "verify_engine_hashes": false, "workers": [{"name": "w"}]}"#,
    );
    assert_eq!(r.apply_events("w", &skipped).unwrap().blocks_stored, 6);
}

#[test]
fn preview_changes_no_state_and_predicts_the_next_route() {
    let r = router(
        r#"{"profile": "session-affinity", "workers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}"#,
    );
    let t = tokens(64);
    let req =
        Request { tokens: &t, session: Some("s1"), now_ms: Some(1_000), ..Request::default() };
    let before = r.prometheus();
    let p1 = r.preview(&req).unwrap();
    let p2 = r.preview(&req).unwrap();
    assert_eq!(p1.request_id, p2.request_id, "a preview takes no request id");
    assert_eq!(r.prometheus(), before, "a preview moves no counter");
    // No session was recorded: a route with another session may go elsewhere, and the
    // real route of the same request picks what the preview said.
    let real = r.route(&req).unwrap();
    assert_eq!(real.request_id, p1.request_id);
    assert_eq!(real.worker, p1.worker);
    assert_ne!(r.prometheus(), before, "a real route counts");
}

/// A dropped decision leaves its buffers to the thread's next routes: they decide and
/// explain exactly what they would have without them, whatever the dropped decision held
/// (more or fewer keys, candidates and scores, a longer or shorter worker name, another
/// router's), and decisions dropped on other threads or kept alive change nothing either.
#[test]
fn dropped_decisions_change_no_later_decision() {
    let a = router(
        r#"{"block_size": 4, "workers": [{"name": "a-worker-with-a-rather-long-name"}, {"name": "b"}]}"#,
    );
    let b =
        router(r#"{"block_size": 4, "workers": [{"name": "x"}, {"name": "y"}, {"name": "z"}]}"#);
    let (long, short) = (tokens(400), tokens(9));
    // Some load and history on `b`, so that its candidates differ.
    let d = b.route(&Request { now_ms: Some(500), ..Request::new(&long) }).unwrap();
    b.on_routed(&d).unwrap();
    // Dropped on another thread: its buffers stay there.
    std::thread::spawn(move || drop(d)).join().unwrap();
    for t in [&short, &long, &tokens(3)] {
        let req = Request { now_ms: Some(1_000), ..Request::new(t) };
        let fresh = b.preview(&req).unwrap();
        for other in [&long, &short] {
            let o = a.route(&Request { now_ms: Some(1_000), ..Request::new(other) }).unwrap();
            drop(o);
            let again = b.preview(&req).unwrap();
            assert_eq!(again, fresh, "{} tokens after dropping {}", t.len(), other.len());
            assert_eq!(again.keys, b.block_keys(t, None).unwrap());
            for i in 0..fresh.candidates.len() {
                assert_eq!(again.candidate_scores(i), fresh.candidate_scores(i));
                assert_eq!(again.candidate_worker(i), fresh.candidate_worker(i));
            }
            // Its own decisions dropped, twice in a row, a clone kept alive, a route after.
            let kept = again.clone();
            drop(again);
            drop(b.preview(&req).unwrap());
            assert_eq!(b.preview(&req).unwrap(), fresh);
            assert_eq!(kept, fresh);
        }
    }
}
