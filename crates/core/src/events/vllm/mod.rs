//! vLLM's msgpack `KVEventBatch`: decoder, encoder and a JSON view.
//!
//! vLLM publishes each batch as the msgpack encoding (msgspec) of
//! `[ts, [event, ...], data_parallel_rank]`, the third frame of a ZeroMQ message.
//!
//! # What [`decode`] accepts
//!
//! - The batch: an array of 3 elements, or of 2 (no rank). `ts` may be a float (64 or 32
//!   bit) or an integer. The rank is nil or an integer. Elements after the third are skipped
//!   and counted in [`KvEventBatch::skipped_fields`](super::KvEventBatch::skipped_fields).
//! - Events in the **map** form of vLLM 0.24 and later: a map with a `"type"` key
//!   (`"BlockStored"`, `"BlockRemoved"`, `"AllBlocksCleared"`) anywhere in it (vLLM puts
//!   it first), other keys named as vLLM's fields. Missing optional fields are `None`.
//! - Events in the **array** form of vLLM 0.23 and earlier:
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//!   medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
//!   kv_cache_spec_sliding_window]`, `["BlockRemoved", block_hashes, medium, group_idx]`
//!   and `["AllBlocksCleared"]`. Shorter arrays (older releases) leave the missing trailing
//!   fields `None`.
//! - Block hashes as msgpack integers (any int encoding with a non-negative value that fits
//!   in u64) or as raw bytes (`bin`), see [`EngineHash`](super::EngineHash).
//! - `BlockStored` requires `block_hashes`, `token_ids` and `block_size`; `BlockRemoved`
//!   requires `block_hashes`. A present field must have the right type (nil is accepted for
//!   every optional field).
//!
//! Unknown fields (map keys, extra array positions) are skipped whole, nested containers
//! included, and counted in [`KvEventBatch::skipped_fields`](super::KvEventBatch::skipped_fields); so are fields of the other
//! event kind (a `token_ids` in a `BlockRemoved`). Events of unknown type are skipped whole
//! and counted in [`KvEventBatch::skipped_events`](super::KvEventBatch::skipped_events). Neither is an error.
//!
//! Placeholder events (`BlockStored` with empty `token_ids` and/or `block_size` 0, see
//! [`BlockStored::is_placeholder`](super::BlockStored::is_placeholder)) decode like any other event. The router does not key
//! them by token content (there is none) and counts them; it still uses their hashes.
//!
//! `medium` is kept as the string the engine sent; match it case-insensitively with
//! [`crate::Tier::from_medium`] (or [`BlockStored::tier`](super::BlockStored::tier)).
//!
//! # Malformed input
//!
//! Truncated input, wrong types, invalid UTF-8, integers out of range, trailing bytes,
//! msgpack ext values or the reserved byte 0xc1 inside a known field, and generic values
//! (`extra_keys`) nested deeper than [`MAX_DEPTH`] give [`Error::Decode`](crate::Error::Decode) with the field
//! and the byte offset. Decoding never panics. Every declared length is checked against the
//! bytes left before anything is reserved (an element takes at least one byte), so memory
//! stays within a constant factor of the payload size (at most a few dozen bytes of
//! decoded structure per payload byte). Unknown fields are skipped without recursion, so
//! their nesting depth is not limited.
//!
//! # Encoding
//!
//! [`encode`] writes the map form exactly as vLLM 0.33's msgspec encoder does, so that
//! `encode(&decode(p)?) == p` for vLLM 0.33 payloads.
//!
//! # Modules
//!
//! The decoder, the msgspec encoder and the JSON view live in one module each
//! (`decoder.rs`, `encoder.rs`, `json.rs`), and `skip.rs` finds the end of a token-id
//! array without decoding it (SIMD where the CPU has AVX2); this module re-exports the
//! entry points.

mod decoder;
mod encoder;
mod json;
mod skip;

pub use decoder::{decode, decode_with, DecodeOptions, TokenIds};
pub(crate) use decoder::{decode_flat, FlatHashes};
pub use encoder::encode;
pub use json::batch_to_json;
/// For the fuzz target and the benchmarks: each token-skip implementation by name.
#[doc(hidden)]
pub use skip::{skip_uints_with, SKIP_PATHS};

/// The deepest nesting of generic values (inside `extra_keys`) that [`decode`] accepts.
pub const MAX_DEPTH: usize = 32;
