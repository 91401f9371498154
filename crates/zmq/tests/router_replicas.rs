//! The subscriber feeding real routers: a pyzmq peer (tests/peer/vllm_publisher.py)
//! publishes vLLM's recorded KV event payloads (kv_events.json); routers keyed by the
//! engine's own sha256 hashes follow them. Results are checked against vLLM's recorded
//! facts and against a reference router fed the same payloads directly, without ZeroMQ.

mod common;

use common::{expected_payload, vllm_payloads, Peer, WAIT};
use kvroute::router::{Request, Router};
use kvroute_zmq::{
    resume_from, subscribe, subscribe_with_sink, EventSink, PublisherConfig, PublisherInfo,
    ResetReason, RouterSink, Subscriber, SubscriberConfig,
};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A router keyed by the engines' sha256 hashes, with `workers` registered.
fn router(workers: &[&str]) -> Arc<Router> {
    let list: Vec<String> = workers.iter().map(|w| format!(r#"{{"name": "{w}"}}"#)).collect();
    let json = format!(
        r#"{{"hash_algo": "sha256", "profile": "prefix", "workers": [{}]}}"#,
        list.join(",")
    );
    Arc::new(Router::from_json(&json).expect("router config"))
}

/// A router of the same configuration fed `feeds` directly: for each worker, the payload
/// the peer sends for each seq (errors ignored: a rejected batch changes nothing, in the
/// reference as through the subscriber).
fn reference(workers: &[&str], feeds: &[(&str, u32, Vec<u64>)]) -> Arc<Router> {
    let r = router(workers);
    let payloads = vllm_payloads();
    for (worker, epoch, seqs) in feeds {
        for &seq in seqs {
            let _ = r.apply_vllm_batch(worker, &expected_payload(&payloads, seq, *epoch));
        }
    }
    r
}

fn publisher(peer: &Peer, worker: &str) -> PublisherConfig {
    PublisherConfig::new(peer.pub_ep.clone())
        .with_replay(peer.replay_ep.clone())
        .with_worker(worker)
}

fn config(publishers: Vec<PublisherConfig>) -> SubscriberConfig {
    SubscriberConfig { publishers, replay_timeout: Duration::from_secs(3), ..Default::default() }
}

/// Waits until the router's stream positions are exactly `want`.
fn wait_positions(r: &Router, want: &[(&str, u64)]) {
    let want: BTreeMap<String, u64> = want.iter().map(|(w, s)| (w.to_string(), *s)).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = r.stream_positions();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "stream positions {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The route result for `tokens`: the chosen worker and every candidate's matched blocks.
fn route(r: &Router, tokens: &[u32]) -> (String, u32, Vec<(String, u32)>) {
    let d = r.route(&Request { now_ms: Some(1), ..Request::new(tokens) }).expect("route");
    let mut cands: Vec<(String, u32)> =
        d.explain().into_iter().map(|c| (c.worker.name, c.matched_blocks)).collect();
    cands.sort();
    (d.worker.name.clone(), d.matched_blocks, cands)
}

fn prompts() -> Vec<Vec<u32>> {
    // The prompts of kv_events.json's requests (r1/r3, r6, rb) and a miss.
    vec![(0..100).collect(), (0..64).collect(), (0..32).collect(), (500..600).collect()]
}

/// The two routers hold the same picture: index statistics, per-worker blocks and route
/// results for every prompt (compared on the candidates' matched blocks).
fn assert_same_picture(a: &Router, b: &Router, what: &str) {
    // Heap bytes depend on the allocation history (which publisher's batch came first),
    // not on the content.
    let stats = |r: &Router| kvroute::index::IndexStats { heap_bytes: 0, ..r.index_stats() };
    assert_eq!(stats(a), stats(b), "{what}: index stats");
    let blocks = |r: &Router| -> Vec<(String, u64)> {
        r.metrics().workers.iter().map(|w| (w.worker.name.clone(), w.index_blocks)).collect()
    };
    assert_eq!(blocks(a), blocks(b), "{what}: per-worker blocks");
    for p in prompts() {
        assert_eq!(route(a, &p).2, route(b, &p).2, "{what}: candidates for {} tokens", p.len());
    }
}

fn holder_blocks(r: &Router) -> u64 {
    r.index_stats().holder_blocks
}

#[test]
fn events_flow_into_the_router_and_routing_follows_them() {
    let mut peer = Peer::spawn(&[]);
    let r = router(&["w0", "idle"]);
    let (sub, sink) =
        subscribe_with_sink(r.clone(), config(vec![publisher(&peer, "w0")])).expect("subscribe");
    peer.cmd("waitsub");
    // Before any event nobody holds anything.
    assert_eq!(route(&r, &prompts()[0]).1, 0);

    peer.cmd("pub 1"); // vLLM step "r1": 6 full blocks of tokens 0..99 cached
    wait_positions(&r, &[("w0", 0)]);
    assert_eq!(holder_blocks(&r), 6);
    let (worker, matched, cands) = route(&r, &prompts()[0]);
    assert_eq!((worker.as_str(), matched), ("w0", 6));
    assert_eq!(cands, vec![("idle".into(), 0), ("w0".into(), 6)]);

    // The rest of the recorded steps, and once more around the cycle.
    let n = vllm_payloads().len() as u64;
    peer.cmd(&format!("pub {}", 2 * n - 1));
    wait_positions(&r, &[("w0", 2 * n - 1)]);
    let want = reference(&["w0", "idle"], &[("w0", 0, (0..2 * n).collect())]);
    assert_same_picture(&r, &want, "after two cycles");
    assert_eq!(r.metrics().workers[0].events, want.metrics().workers[0].events);

    // What the router rejected is counted, with its text, by the sink and the subscriber.
    let mut rejected = Vec::new();
    let probe = router(&["w0"]);
    let payloads = vllm_payloads();
    for seq in 0..2 * n {
        if let Err(e) = probe.apply_vllm_batch("w0", &expected_payload(&payloads, seq, 0)) {
            rejected.push(format!("seq {seq}: {e}"));
        }
    }
    assert!(!rejected.is_empty(), "the handcrafted payloads have made-up hashes");
    let st = &sink.stats()["w0"];
    assert_eq!(st.errors, rejected.len() as u64);
    assert_eq!(st.batches + st.errors, 2 * n);
    assert_eq!(st.last_error.as_ref(), rejected.last());
    let sst = sub.stats().remove(0);
    assert_eq!(sst.sink_errors, rejected.len() as u64);
    assert_eq!(sst.last_error.as_ref(), rejected.last());
    assert!(sst.last_error.as_ref().is_some_and(|e| e.contains("hash")), "{sst:?}");
    sub.shutdown();
}

#[test]
fn replicas_subscribed_to_every_publisher_converge() {
    let mut a = Peer::spawn(&[]);
    let mut b = Peer::spawn(&["--epoch", "3"]);
    let workers = ["a", "b"];
    let replicas = [router(&workers), router(&workers)];
    let mut subs = Vec::new();
    for r in &replicas {
        let cfg = config(vec![publisher(&a, "a"), publisher(&b, "b")]);
        subs.push(subscribe(r.clone(), cfg).expect("subscribe"));
        a.cmd("waitsub");
        b.cmd("waitsub");
    }
    a.cmd("pub 1"); // a: r1, 6 blocks of 0..99
    b.cmd("pub 3"); // b: r1, r2, reset_prefix_cache: nothing left
    for r in &replicas {
        wait_positions(r, &[("a", 0), ("b", 2)]);
        let (worker, matched, cands) = route(r, &prompts()[0]);
        assert_eq!((worker.as_str(), matched), ("a", 6));
        assert_eq!(cands, vec![("a".into(), 6), ("b".into(), 0)]);
    }
    a.cmd("drop 2"); // lost on the wire, filled by replay on both replicas
    a.cmd("pub 3");
    b.cmd("pub 4");
    for r in &replicas {
        wait_positions(r, &[("a", 5), ("b", 6)]);
    }
    let want = reference(&workers, &[("a", 0, (0..6).collect()), ("b", 3, (0..7).collect())]);
    assert_same_picture(&replicas[0], &replicas[1], "replica 0 vs replica 1");
    assert_same_picture(&replicas[0], &want, "replica 0 vs reference");
    assert!(holder_blocks(&want) > 0);
    // Same index, same workers, same stream positions: byte-identical snapshots.
    assert_eq!(replicas[0].snapshot(), replicas[1].snapshot());
    for sub in subs {
        let st = sub.stats();
        assert_eq!((st[0].gaps, st[0].replays_ok, st[0].resets), (1, 1, 0));
        assert_eq!((st[1].gaps, st[1].resets), (0, 0));
        sub.shutdown();
    }
}

#[test]
fn late_replica_restores_a_snapshot_and_replays_from_its_positions() {
    let mut a = Peer::spawn(&[]);
    let mut b = Peer::spawn(&["--epoch", "2"]);
    let workers = ["a", "b"];
    let running = router(&workers);
    let sub1 =
        subscribe(running.clone(), config(vec![publisher(&a, "a"), publisher(&b, "b")])).unwrap();
    a.cmd("waitsub");
    b.cmd("waitsub");
    a.cmd("pub 1");
    b.cmd("pub 2");
    wait_positions(&running, &[("a", 0), ("b", 1)]);
    let snap = running.snapshot();
    // The running replica goes on; the late one will have to replay these.
    a.cmd("pub 3");
    b.cmd("pub 2");
    wait_positions(&running, &[("a", 3), ("b", 3)]);

    let late = router(&workers);
    let positions = late.restore(&snap).expect("restore");
    assert_eq!(positions, BTreeMap::from([("a".into(), 0), ("b".into(), 1)]));
    let mut cfg = config(vec![publisher(&a, "a"), publisher(&b, "b")]);
    assert_eq!(resume_from(&mut cfg, &positions), 2);
    assert_eq!(
        cfg.publishers.iter().map(|p| p.start_seq).collect::<Vec<_>>(),
        vec![Some(1), Some(2)]
    );
    // Warm from the first request: the snapshot says a holds 0..99.
    let (worker, matched, _) = route(&late, &prompts()[0]);
    assert_eq!((worker.as_str(), matched), ("a", 6));

    let sub2 = subscribe(late.clone(), cfg).expect("subscribe");
    a.cmd("waitsub");
    b.cmd("waitsub");
    a.cmd("pub 2");
    b.cmd("pub 1");
    for r in [&running, &late] {
        wait_positions(r, &[("a", 5), ("b", 4)]);
    }
    let want = reference(&workers, &[("a", 0, (0..6).collect()), ("b", 2, (0..5).collect())]);
    assert_same_picture(&late, &running, "late vs running");
    assert_same_picture(&late, &want, "late vs reference");
    for st in sub2.stats() {
        // One gap each (start_seq behind the first live seq), filled by replay.
        assert_eq!((st.gaps, st.replays_ok, st.resets), (1, 1, 0), "{st:?}");
    }
    sub1.shutdown();
    sub2.shutdown();
}

/// A [`RouterSink`] that also records the router's holder blocks right after each reset.
struct Observed {
    inner: RouterSink,
    after_reset: Mutex<Vec<u64>>,
}

impl EventSink for Observed {
    fn on_batch(&self, p: &PublisherInfo, seq: u64, payload: &[u8]) -> kvroute::Result<()> {
        self.inner.on_batch(p, seq, payload)
    }
    fn on_reset(&self, p: &PublisherInfo, reason: ResetReason) {
        self.inner.on_reset(p, reason);
        self.after_reset.lock().push(holder_blocks(self.inner.router()));
    }
}

#[test]
fn unfillable_gap_and_restart_drop_the_worker_and_new_events_rebuild_it() {
    let mut peer = Peer::spawn(&[]);
    let r = router(&["w0"]);
    let sink =
        Arc::new(Observed { inner: RouterSink::new(r.clone()), after_reset: Mutex::default() });
    let sub = Subscriber::start(config(vec![publisher(&peer, "w0")]), sink.clone()).unwrap();
    peer.cmd("waitsub");
    peer.cmd("pub 2"); // r1, r2
    wait_positions(&r, &[("w0", 1)]);
    let before_gap = holder_blocks(&r);
    assert_eq!(before_gap, holder_blocks(&reference(&["w0"], &[("w0", 0, vec![0, 1])])));
    assert!(before_gap > 0);

    // Seqs 2 and 3 are neither sent nor kept for replay: the worker's picture is lost.
    peer.cmd("lose 2");
    peer.cmd("pub 1"); // seq 4
    wait_positions(&r, &[("w0", 4)]);
    assert_eq!(*sink.after_reset.lock(), vec![0], "the reset dropped every entry");
    let want = reference(&["w0"], &[("w0", 0, vec![4])]);
    assert!(holder_blocks(&want) > 0);
    assert_same_picture(&r, &want, "rebuilt after the gap");
    let st = &sink.inner.stats()["w0"];
    assert_eq!((st.resets, st.blocks_dropped), (1, before_gap));
    assert!(st.last_reset.as_ref().is_some_and(|t| t.contains("unfillable gap")), "{st:?}");

    // The engine restarts: seq back to 0, a new epoch.
    let before_restart = holder_blocks(&r);
    peer.cmd("restart");
    peer.cmd("pub 1");
    wait_positions(&r, &[("w0", 0)]);
    assert_eq!(*sink.after_reset.lock(), vec![0, 0]);
    let want = reference(&["w0"], &[("w0", 1, vec![0])]);
    assert_same_picture(&r, &want, "rebuilt after the restart");
    assert_eq!(holder_blocks(&r), 6);
    let st = &sink.inner.stats()["w0"];
    assert_eq!((st.resets, st.blocks_dropped), (2, before_gap + before_restart));
    assert!(st.last_reset.as_ref().is_some_and(|t| t.contains("restarted")), "{st:?}");
    let sst = sub.stats().remove(0);
    assert_eq!((sst.resets, sst.restarts), (2, 1));
    sub.shutdown();
}

#[test]
fn shutdown_releases_the_router_and_stops_applying() {
    let mut peer = Peer::spawn(&[]);
    let r = router(&["w0"]);
    let sub = subscribe(r.clone(), config(vec![publisher(&peer, "w0")])).unwrap();
    peer.cmd("waitsub");
    peer.cmd("pub 1");
    wait_positions(&r, &[("w0", 0)]);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        sub.shutdown();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("shutdown did not return within 5 s");
    assert_eq!(Arc::strong_count(&r), 1, "the subscriber's threads let go of the router");
    let before = r.snapshot();

    // A control replica subscribed now sees the next batches; the stopped one must not.
    let control = router(&["w0"]);
    let sub2 = subscribe(control.clone(), config(vec![publisher(&peer, "w0")])).unwrap();
    peer.cmd("waitsub");
    peer.cmd("pub 2");
    wait_positions(&control, &[("w0", 2)]);
    assert_eq!(r.snapshot(), before);
    assert_eq!(r.stream_positions(), BTreeMap::from([("w0".into(), 0)]));
    sub2.shutdown();
}

#[test]
fn subscribe_rejects_a_bad_configuration() {
    let r = router(&["w0"]);
    let err = subscribe(r.clone(), config(Vec::new())).unwrap_err();
    assert!(matches!(err, kvroute::Error::Config(_)), "{err:?}");
    let bad = config(vec![PublisherConfig::new("http://x:1")]);
    assert!(matches!(subscribe(r.clone(), bad), Err(kvroute::Error::Config(_))));
    assert_eq!(Arc::strong_count(&r), 1);
}
