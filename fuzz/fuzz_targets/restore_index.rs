//! Fuzzes `kvroute::index::PrefixIndex::restore` with arbitrary bytes.
//!
//! Each input is tried twice: as it is (almost always refused by the checksum, which must
//! not panic either), and with its last 8 bytes replaced by the right checksum, so the
//! parser and validator behind the checksum see the mutated bytes. Restoring must never
//! panic or allocate without bound. When it succeeds, snapshot -> restore -> snapshot must
//! be stable (restoring normalizes order, so only the second generation is compared).

#![no_main]

use kvroute::index::{IndexConfig, PrefixIndex};
use libfuzzer_sys::fuzz_target;

fn resealed(data: &[u8]) -> Vec<u8> {
    let body = &data[..data.len().saturating_sub(8)];
    let mut out = body.to_vec();
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(body).to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    for input in [data.to_vec(), resealed(data)] {
        if let Ok(idx) = PrefixIndex::restore(&input, IndexConfig::default()) {
            let once = idx.snapshot();
            let again = match PrefixIndex::restore(&once, IndexConfig::default()) {
                Ok(i) => i,
                Err(e) => panic!("restoring our own snapshot failed: {e}"),
            };
            assert_eq!(again.snapshot(), once, "snapshot -> restore -> snapshot is not stable");
            // Heap bytes count allocated capacities, which follow the input's history (a
            // crafted snapshot can make restore reserve differently from our own); every
            // other figure must be equal.
            let (mut a, mut b) = (again.stats(), idx.stats());
            (a.heap_bytes, b.heap_bytes) = (0, 0);
            assert_eq!(a, b);
        }
    }
});
