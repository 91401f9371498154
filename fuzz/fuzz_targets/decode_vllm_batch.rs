//! Fuzzes `kvroute::events::vllm::decode` with arbitrary bytes.
//!
//! Decoding must never panic. When it succeeds, the encoding must be stable: encoding the
//! batch, decoding that and encoding again gives the same bytes (decoding normalizes, for
//! example a float32 `ts` becomes float64, so only the second generation is compared).

#![no_main]

use kvroute::events::vllm::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode(data) {
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
