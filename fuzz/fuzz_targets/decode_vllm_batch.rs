//! Fuzzes `kvroute::events::vllm::decode` with arbitrary bytes.
//!
//! Decoding must never panic. When it succeeds, the encoding must be stable: encoding the
//! batch, decoding that and encoding again gives the same bytes (decoding normalizes, for
//! example a float32 `ts` becomes float64, so only the second generation is compared).
//! Decoding with token ids skipped (what a router keyed by the engine's hashes does) must
//! accept and reject exactly the same inputs, with the same error, and count the tokens.
//! Every implementation of the token-id skip this CPU runs (the element-by-element walk,
//! AVX2) must stop at the same place on the input, from a start and a count taken from
//! its first bytes.

#![no_main]

use kvroute::events::vllm::{
    decode, decode_with, encode, skip_uints_with, DecodeOptions, TokenIds, SKIP_PATHS,
};
use kvroute::events::KvEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let [a, b, ..] = data {
        let (start, n) = (usize::from(*a) % 8, usize::from(*b) * 4);
        let want = skip_uints_with("scalar", data, start, n);
        for p in SKIP_PATHS {
            if let Some(got) = skip_uints_with(p, data, start, n) {
                assert_eq!(Some(got), want, "token skip {p} differs from the scalar walk");
            }
        }
    }
    let full = decode(data);
    let skip = decode_with(data, DecodeOptions { token_ids: TokenIds::Skip });
    match (&full, &skip) {
        (Ok(f), Ok(s)) => {
            assert_eq!(f.events.len(), s.events.len());
            for (a, b) in f.events.iter().zip(&s.events) {
                if let (KvEvent::BlockStored(a), KvEvent::BlockStored(b)) = (a, b) {
                    assert_eq!(a.token_ids.len(), b.token_count(), "skipped tokens miscounted");
                }
            }
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "different errors"),
        _ => panic!("skipping token ids changed the outcome: {full:?} vs {skip:?}"),
    }
    if let Ok(batch) = full {
        let once = encode(&batch);
        let again = match decode(&once) {
            Ok(b) => b,
            Err(e) => panic!("re-decoding our own encoding failed: {e}"),
        };
        assert_eq!(again.events.len(), batch.events.len());
        assert_eq!(again.data_parallel_rank, batch.data_parallel_rank);
        assert_eq!(encode(&again), once, "encode -> decode -> encode is not stable");
    }
});
