//! Fuzzes `kvroute::router::Router::restore` with arbitrary bytes.
//!
//! Each input is tried twice: as it is (almost always refused by the checksum), and with
//! its last 8 bytes replaced by the right checksum, so the header and index checks behind
//! it see the mutated bytes. Restoring must never panic; a refused snapshot must leave the
//! router as it was; an accepted one must give a snapshot that restores into a fresh
//! router to the same state.

#![no_main]

use kvroute::router::Router;
use libfuzzer_sys::fuzz_target;

/// The configuration the seed corpus was made with (`fuzz/corpus/restore_router`).
const CONFIG: &str = r#"{"hash_algo": "sha256", "session_capacity": 16}"#;

fn resealed(data: &[u8]) -> Vec<u8> {
    let body = &data[..data.len().saturating_sub(8)];
    let mut out = body.to_vec();
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(body).to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    for input in [data.to_vec(), resealed(data)] {
        let r = Router::from_json(CONFIG).expect("config");
        r.add_worker("pod-z", 0).expect("worker");
        let before = (r.snapshot(), r.workers());
        match r.restore(&input) {
            Err(_) => assert_eq!(
                (r.snapshot(), r.workers()),
                before,
                "a refused restore changed the router"
            ),
            Ok(streams) => {
                let recorded = r.stream_positions();
                for (publisher, seq) in &streams {
                    assert_eq!(recorded.get(publisher), Some(seq), "stream position not recorded");
                }
                let once = r.snapshot();
                let fresh = Router::from_json(CONFIG).expect("config");
                if let Err(e) = fresh.restore(&once) {
                    panic!("restoring our own snapshot failed: {e}");
                }
                assert_eq!(fresh.snapshot().len(), once.len());
                // Heap bytes follow allocation history (see restore_index); the rest is equal.
                let (mut a, mut b) = (fresh.index_stats(), r.index_stats());
                (a.heap_bytes, b.heap_bytes) = (0, 0);
                assert_eq!(a, b);
            }
        }
    }
});
