//! Snapshot integrity and restore atomicity: corrupted index and router snapshots are
//! rejected before anything is applied, a failing restore changes nothing, and a restore
//! racing with worker removal never leaves a freed id's entries for the next worker.

use kvroute::index::{IndexConfig, PrefixIndex};
use kvroute::router::Router;
use kvroute::types::{Tier, WorkerId};
use kvroute::Error;
use serde_json::Value as J;
use std::path::PathBuf;

fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(path)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The recorded vLLM 0.33 batches' payloads, in order.
fn recorded_payloads() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(testdata("vllm/kv_events.json")).unwrap();
    let v: J = serde_json::from_str(&text).unwrap();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["batch"].is_null())
        .filter(|s| !s["step"].as_str().unwrap().starts_with("handcrafted"))
        .map(|s| hex(s["batch"]["payload_hex"].as_str().unwrap()))
        .collect()
}

const CFG: &str = r#"{"hash_algo": "sha256", "profile": "prefix",
    "workers": [{"name": "a"}, {"name": "pod-b"}]}"#;

/// A router holding the first recorded batch for both workers, with a stream position.
fn warm_router() -> Router {
    let r = Router::from_json(CFG).unwrap();
    let first = &recorded_payloads()[0];
    r.apply_vllm_batch("a", first).unwrap();
    r.apply_vllm_batch("pod-b", first).unwrap();
    r.set_stream_position("tcp://a:5557", 41);
    r
}

/// A small deterministic generator (SplitMix64) for the random corruptions.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The router's observable state: its own snapshot (index, workers, streams) and workers.
fn state(r: &Router) -> (Vec<u8>, Vec<kvroute::types::WorkerKey>) {
    (r.snapshot(), r.workers())
}

#[test]
fn every_single_bit_flip_of_a_router_snapshot_is_rejected_and_changes_nothing() {
    let snap = warm_router().snapshot();
    let target = Router::from_json(r#"{"hash_algo": "sha256", "profile": "prefix"}"#).unwrap();
    let before = state(&target);
    let mut accepted = Vec::new();
    for bit in 0..snap.len() * 8 {
        let mut bad = snap.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        match target.restore(&bad) {
            Err(Error::Snapshot(_)) => {}
            Err(e) => panic!("bit {bit}: not a snapshot error: {e}"),
            Ok(_) => accepted.push(bit),
        }
    }
    assert!(
        accepted.is_empty(),
        "{} of {} flips accepted: {accepted:?}",
        accepted.len(),
        snap.len() * 8
    );
    assert_eq!(state(&target), before, "a rejected snapshot changed the router");
    // The untouched snapshot still restores.
    target.restore(&snap).unwrap();
    assert_eq!(target.workers().len(), 2);
}

#[test]
fn renaming_a_worker_by_one_bit_is_rejected() {
    // The reported case: one flip turned worker `a` into `A`.
    let snap = warm_router().snapshot();
    let at = snap.windows(5).position(|w| w == b"\"a\",\"").expect("worker a in the header") + 1;
    let mut bad = snap.clone();
    bad[at] ^= 0x20;
    assert_eq!(bad[at], b'A');
    let target = Router::from_json(r#"{"hash_algo": "sha256", "profile": "prefix"}"#).unwrap();
    let err = target.restore(&bad).unwrap_err();
    assert!(err.to_string().contains("corrupted"), "{err}");
    assert!(target.workers().is_empty());
}

#[test]
fn random_multi_bit_corruptions_truncations_and_appends_are_rejected() {
    let snap = warm_router().snapshot();
    let target = Router::from_json(r#"{"hash_algo": "sha256", "profile": "prefix"}"#).unwrap();
    let mut rng = Rng(13);
    for _ in 0..2000 {
        let mut bad = snap.clone();
        for _ in 0..1 + rng.below(16) {
            let bit = rng.below(bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
        }
        if bad == snap {
            continue;
        }
        assert!(matches!(target.restore(&bad), Err(Error::Snapshot(_))));
    }
    for cut in [0, 1, 7, 8, 11, 12, 20, snap.len() / 2, snap.len() - 8, snap.len() - 1] {
        assert!(matches!(target.restore(&snap[..cut]), Err(Error::Snapshot(_))), "cut {cut}");
    }
    let mut longer = snap.clone();
    longer.push(0);
    assert!(matches!(target.restore(&longer), Err(Error::Snapshot(_))));
    assert!(target.workers().is_empty());
}

/// An index with branches, several holders and tiers, engine mappings and orphans.
fn busy_index() -> PrefixIndex {
    let mut idx = PrefixIndex::new(IndexConfig::default());
    let (w0, w1, w2) = (WorkerId(0), WorkerId(1), WorkerId(7));
    idx.store(w0, Tier::Gpu, None, &[1, 2, 3, 4, 5]).unwrap();
    idx.store(w1, Tier::Gpu, None, &[1, 2, 3, 40, 50]).unwrap();
    idx.store(w2, Tier::Cpu, Some(3), &[60, 61]).unwrap();
    idx.store(w0, Tier::Gpu, Some(999), &[70, 71]).unwrap(); // an orphan
    idx.store_mapped(w1, Tier::Gpu, None, &[0xaa, 0xbb], &[80, 81]).unwrap();
    idx.remove(w0, Tier::Gpu, &[12345]); // an unknown removal, counted
    idx
}

#[test]
fn every_single_bit_flip_of_an_index_snapshot_is_rejected() {
    let idx = busy_index();
    let snap = idx.snapshot();
    let restored = PrefixIndex::restore(&snap, IndexConfig::default()).unwrap();
    assert_eq!(restored.snapshot(), snap);
    let mut accepted = 0;
    for bit in 0..snap.len() * 8 {
        let mut bad = snap.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        match PrefixIndex::restore(&bad, IndexConfig::default()) {
            Err(Error::Snapshot(_)) => {}
            Err(e) => panic!("bit {bit}: not a snapshot error: {e}"),
            Ok(_) => accepted += 1,
        }
    }
    assert_eq!(accepted, 0, "{accepted} of {} flips accepted", snap.len() * 8);
}

#[test]
fn version_1_snapshots_are_refused_with_a_clear_error() {
    // Version 1 was the same layout without the checksum trailer.
    let mut v1 = busy_index().snapshot();
    v1.truncate(v1.len() - 8);
    v1[7] = 1;
    let err = PrefixIndex::restore(&v1, IndexConfig::default()).unwrap_err();
    assert!(err.to_string().contains("version 1"), "{err}");

    let snap = warm_router().snapshot();
    let mut v1 = snap[..snap.len() - 8].to_vec();
    v1[7] = 1;
    let target = Router::from_json(r#"{"hash_algo": "sha256"}"#).unwrap();
    let err = target.restore(&v1).unwrap_err();
    assert!(err.to_string().contains("version 1"), "{err}");
}

/// Rewrites the JSON header of a router snapshot and, if the snapshot ends with a valid
/// XXH3-64 checksum of what precedes it, recomputes that checksum (so the edit is not
/// caught as corruption and reaches the later checks).
fn edit_header(snap: &[u8], edit: impl FnOnce(&mut J)) -> Vec<u8> {
    let n = snap.len();
    let sealed =
        n >= 8 && xxhash_rust::xxh3::xxh3_64(&snap[..n - 8]).to_le_bytes() == snap[n - 8..];
    let body = if sealed { &snap[..n - 8] } else { snap };
    let len = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    let mut header: J = serde_json::from_slice(&body[12..12 + len]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = body[..8].to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&body[12 + len..]);
    if sealed {
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
    }
    out
}

#[test]
fn a_failing_restore_adds_no_workers() {
    let snap = warm_router().snapshot();
    // A consistent checksum, but two workers claim the same id: the restore must fail, and
    // before anything else, not after adding `a`, `pod-b` and `x`.
    let bad = edit_header(&snap, |h| {
        let ws = h["workers"].as_array_mut().unwrap();
        let mut dup = ws[0].clone();
        dup["name"] = "x".into();
        ws.push(dup);
    });
    let target =
        Router::from_json(r#"{"hash_algo": "sha256", "workers": [{"name": "z"}]}"#).unwrap();
    let before = state(&target);
    assert!(matches!(target.restore(&bad), Err(Error::Snapshot(_))));
    assert_eq!(state(&target), before, "the failed restore changed the router");

    // The index holds blocks of an id the header does not name: rejected, nothing added.
    let bad = edit_header(&snap, |h| {
        h["workers"].as_array_mut().unwrap().retain(|w| w["name"] == "a");
    });
    assert!(matches!(target.restore(&bad), Err(Error::Snapshot(_))));
    assert_eq!(state(&target), before, "the failed restore changed the router");

    // The same worker twice.
    let bad = edit_header(&snap, |h| {
        let ws = h["workers"].as_array_mut().unwrap();
        let mut dup = ws[0].clone();
        dup["id"] = 9.into();
        ws.push(dup);
    });
    assert!(matches!(target.restore(&bad), Err(Error::Snapshot(_))));
    assert_eq!(state(&target), before, "the failed restore changed the router");

    // The unedited snapshot restores, adding its two workers.
    target.restore(&snap).unwrap();
    assert_eq!(target.workers().len(), 3);
}

#[test]
fn restore_racing_with_worker_removal_never_leaves_entries_for_a_reused_id() {
    use kvroute::events::{BlockStored, EngineHash, KvEvent, KvEventBatch};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // Thousands of separate runs, so that renumbering a restored index takes a while.
    let big = Router::from_json(CFG).unwrap();
    for (w, name) in ["a", "pod-b"].into_iter().enumerate() {
        let events = (0..4000u64)
            .map(|i| {
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![EngineHash::Int((i << 8) | (w as u64 + 1))],
                    block_size: 16,
                    ..Default::default()
                })
            })
            .collect();
        big.apply_events(name, &KvEventBatch::new(0.0, events)).unwrap();
    }
    let snap = big.snapshot();
    let r = Arc::new(Router::from_json(CFG).unwrap());
    r.restore(&snap).unwrap();
    assert_eq!(r.metrics().index.holder_blocks, 8000);
    let done = Arc::new(AtomicBool::new(false));
    let restorer = {
        let (r, done, snap) = (r.clone(), done.clone(), snap.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) || n < 50 {
                r.restore(&snap).unwrap();
                n += 1;
            }
            n
        })
    };
    // `c` is never in a snapshot and gets no events: it must never hold a block, even
    // when it takes the id that `pod-b` just freed.
    let c_blocks = |r: &Router| {
        r.metrics().workers.iter().find(|w| w.worker.name == "c").map(|w| w.index_blocks)
    };
    let mut inherited = Vec::new();
    for i in 0..300 {
        match r.remove_worker("pod-b", 0) {
            Ok(()) | Err(Error::UnknownWorker(_)) => {}
            Err(e) => panic!("{e}"),
        }
        r.add_worker("c", 0).unwrap();
        // Look a few times: an unsafe restore may swap its index in a moment later.
        for _ in 0..5 {
            if let Some(b) = c_blocks(&r).filter(|&b| b > 0) {
                inherited.push((i, b));
                break;
            }
            std::thread::yield_now();
        }
        r.remove_worker("c", 0).unwrap();
        match r.add_worker("pod-b", 0) {
            Ok(_) | Err(Error::WorkerExists(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    done.store(true, Ordering::Relaxed);
    let restores = restorer.join().unwrap();
    assert!(
        inherited.is_empty(),
        "worker c inherited blocks (iteration, blocks): {inherited:?} ({restores} restores)"
    );
    // Quiescent: every block the index holds belongs to a registered worker.
    let m = r.metrics();
    let per_worker: u64 = m.workers.iter().map(|w| w.index_blocks).sum();
    assert_eq!(per_worker, m.index.holder_blocks, "blocks held by unregistered ids");
}

/// The index snapshot inside a router snapshot (after the header, before the checksum).
fn inner_index(snap: &[u8]) -> Vec<u8> {
    let len = u32::from_le_bytes(snap[8..12].try_into().unwrap()) as usize;
    snap[12 + len..snap.len() - 8].to_vec()
}

/// The fuzz targets' seed corpus (`fuzz/seeds/restore_index/seed-*`,
/// `fuzz/seeds/restore_router/seed-*`): real snapshots that must keep restoring, so the
/// fuzzers start from valid inputs. With `KVROUTE_WRITE_FUZZ_CORPUS=1` the test writes
/// them anew first (after a format change).
#[test]
fn fuzz_seed_corpus_restores() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    // The router fuzz target's configuration (fuzz/fuzz_targets/restore_router.rs).
    const FUZZ_CONFIG: &str = r#"{"hash_algo": "sha256", "session_capacity": 16}"#;
    if std::env::var_os("KVROUTE_WRITE_FUZZ_CORPUS").is_some() {
        let empty = Router::from_json(FUZZ_CONFIG).unwrap();
        let warm = warm_router();
        let full = warm_router();
        for p in &recorded_payloads()[1..] {
            full.apply_vllm_batch("pod-b", p).unwrap();
        }
        full.set_stream_position("tcp://pod-b:5557", 7);
        full.add_worker("pod-c", 3).unwrap();
        let routers =
            [("empty", empty.snapshot()), ("warm", warm.snapshot()), ("full", full.snapshot())];
        let indexes = [
            ("empty", PrefixIndex::new(IndexConfig::default()).snapshot()),
            ("busy", busy_index().snapshot()),
            ("recorded", inner_index(&full.snapshot())),
        ];
        for (target, seeds) in [("restore_router", routers), ("restore_index", indexes)] {
            std::fs::create_dir_all(dir.join(target)).unwrap();
            for (name, bytes) in seeds {
                std::fs::write(dir.join(target).join(format!("seed-{name}")), bytes).unwrap();
            }
        }
    }
    let seeds = |target: &str| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join(target))
            .unwrap_or_else(|e| panic!("fuzz/seeds/{target}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seed-"))
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let index_seeds = seeds("restore_index");
    assert!(index_seeds.len() >= 3, "{index_seeds:?}");
    for (path, bytes) in &index_seeds {
        let idx = PrefixIndex::restore(bytes, IndexConfig::default()).unwrap_or_else(|e| {
            panic!("{path}: {e} (regenerate with KVROUTE_WRITE_FUZZ_CORPUS=1)")
        });
        assert_eq!(&idx.snapshot(), bytes, "{path}");
    }
    let router_seeds = seeds("restore_router");
    assert!(router_seeds.len() >= 3);
    for (path, bytes) in &router_seeds {
        let r = Router::from_json(FUZZ_CONFIG).unwrap();
        r.restore(bytes).unwrap_or_else(|e| {
            panic!("{path}: {e} (regenerate with KVROUTE_WRITE_FUZZ_CORPUS=1)")
        });
    }
}
