//! The KV event model: what an engine tells the router about its prefix cache.
//!
//! An engine publishes [`KvEventBatch`]es; each holds [`KvEvent`]s:
//!
//! - [`KvEvent::BlockStored`]: a run of full blocks entered the cache, each named by an
//!   [`EngineHash`] that covers the block *and its whole prefix*. `parent_block_hash` names
//!   the block before the first one (`None` for a run that starts at the beginning of a
//!   sequence). `token_ids` holds the tokens of all the blocks, in order.
//! - [`KvEvent::BlockRemoved`]: blocks left the cache (evicted or dropped).
//! - [`KvEvent::AllBlocksCleared`]: the whole cache of that worker was reset.
//!
//! The shape follows vLLM's `vllm.distributed.kv_events` classes (release 0.33) field for
//! field, so that nothing an engine sends is lost; [`vllm`] decodes and encodes vLLM's
//! msgpack wire form.
//!
//! # Placeholder events
//!
//! Some producers announce stored blocks without their tokens: `token_ids` is empty and/or
//! `block_size` is 0 (see [`BlockStored::is_placeholder`]). Such events decode like any
//! other; they still name blocks by engine hash (so removals and parent links work), but
//! they cannot be keyed by token content. Consumers that key blocks by their own hash of the
//! tokens skip them for that purpose and count them.

pub mod vllm;

use crate::types::Tier;

/// A block hash as an engine sends it in its events.
///
/// vLLM sends a 64-bit unsigned integer by default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`,
/// the last 8 bytes of the digest read big-endian) and the raw digest bytes otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EngineHash {
    /// An integer hash (msgpack int).
    Int(u64),
    /// A raw digest (msgpack bin), for example 32 bytes of SHA-256.
    Bytes(Vec<u8>),
}

impl EngineHash {
    /// Projects the hash to the u64 that integer-hash events would carry for the same block.
    ///
    /// `Int` is returned as is. `Bytes` gives its last 8 bytes read big-endian; a shorter
    /// digest is left-padded with zeros (so an empty digest gives 0).
    pub fn to_u64(&self) -> u64 {
        match self {
            EngineHash::Int(v) => *v,
            EngineHash::Bytes(b) => {
                let tail = &b[b.len().saturating_sub(8)..];
                tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
            }
        }
    }
}

impl From<u64> for EngineHash {
    fn from(v: u64) -> Self {
        EngineHash::Int(v)
    }
}

/// A generic msgpack value, for the free-form parts of events such as `extra_keys`.
///
/// The vLLM decoder produces [`Value::UInt`] for every non-negative integer and
/// [`Value::Int`] only for negative ones; 32-bit floats are widened to [`Value::F64`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// msgpack nil (Python `None`).
    Nil,
    /// A boolean.
    Bool(bool),
    /// A signed integer (negative, when produced by the decoder).
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A floating point number.
    F64(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes (msgpack bin).
    Bin(Vec<u8>),
    /// An array (Python list or tuple).
    Array(Vec<Value>),
    /// A map, as key/value pairs in wire order.
    Map(Vec<(Value, Value)>),
}

/// Blocks entered an engine's prefix cache (vLLM `BlockStored`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockStored {
    /// The hashes of the stored blocks, in sequence order.
    pub block_hashes: Vec<EngineHash>,
    /// The hash of the block just before the first stored one; `None` at a sequence start.
    pub parent_block_hash: Option<EngineHash>,
    /// The tokens of all stored blocks, concatenated (`block_size` per block).
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// The LoRA adapter's integer id, if any.
    pub lora_id: Option<i64>,
    /// Where the blocks are stored (`"GPU"`, `"CPU"`, ...); `None` means GPU.
    pub medium: Option<String>,
    /// The LoRA adapter's name, if any.
    pub lora_name: Option<String>,
    /// Per-block extra keys as the engine reports them (LoRA name, cache salt, multimodal
    /// identifiers and offsets, ...), one entry per block.
    pub extra_keys: Option<Vec<Option<Value>>>,
    /// The KV cache group the blocks belong to (hybrid models have several).
    pub group_idx: Option<i64>,
    /// The kind of attention of the group (`"full_attention"`, `"sliding_window"`, ...).
    pub kv_cache_spec_kind: Option<String>,
    /// The sliding window of the group, in tokens, for sliding-window attention.
    pub kv_cache_spec_sliding_window: Option<i64>,
    /// Where the blocks live relative to the publisher (for example `"LOCAL"`, `"REMOTE"`).
    pub locality: Option<String>,
    /// Which party owns the blocks (free-form).
    pub ownership: Option<String>,
    /// The session the blocks were computed for, if the engine knows it.
    pub session_id: Option<String>,
    /// Speculative lookahead tokens per block, if any.
    pub lookahead_token_ids: Option<Vec<Vec<u32>>>,
    /// Token ids the decoder checked and counted but did not store because the caller does
    /// not need them ([`vllm::TokenIds`]); `token_ids` is then empty. 0 when the tokens
    /// were decoded (the default) or the event was built by hand.
    pub tokens_skipped: usize,
}

impl BlockStored {
    /// The storage tier named by `medium` (`None` medium means GPU); `None` if the medium is
    /// not recognized.
    pub fn tier(&self) -> Option<Tier> {
        Tier::from_medium(self.medium.as_deref())
    }

    /// Whether this is a placeholder event: no tokens (`token_ids` empty and none skipped)
    /// or `block_size` 0. Placeholders name blocks but cannot be keyed by token content.
    pub fn is_placeholder(&self) -> bool {
        self.token_count() == 0 || self.block_size == 0
    }

    /// How many token ids the event carried: `token_ids.len()` plus
    /// [`tokens_skipped`](Self::tokens_skipped).
    pub fn token_count(&self) -> usize {
        self.token_ids.len() + self.tokens_skipped
    }
}

/// Blocks left an engine's prefix cache (vLLM `BlockRemoved`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockRemoved {
    /// The hashes of the removed blocks.
    pub block_hashes: Vec<EngineHash>,
    /// Where the blocks were stored; `None` means GPU.
    pub medium: Option<String>,
    /// The KV cache group the blocks belonged to.
    pub group_idx: Option<i64>,
    /// Where the blocks lived relative to the publisher.
    pub locality: Option<String>,
    /// Which party owned the blocks.
    pub ownership: Option<String>,
}

impl BlockRemoved {
    /// The storage tier named by `medium` (`None` medium means GPU); `None` if the medium is
    /// not recognized.
    pub fn tier(&self) -> Option<Tier> {
        Tier::from_medium(self.medium.as_deref())
    }
}

/// One KV cache event.
// BlockStored is by far the most common event and is stored inline: boxing it would cost
// one more allocation per event on the ingest path.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum KvEvent {
    /// Blocks were stored.
    BlockStored(BlockStored),
    /// Blocks were removed.
    BlockRemoved(BlockRemoved),
    /// The whole cache was cleared.
    AllBlocksCleared,
}

/// A batch of events as one engine publishes it in one message.
#[derive(Clone, Debug, PartialEq)]
pub struct KvEventBatch {
    /// The publisher's timestamp, in seconds since the Unix epoch.
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank of the publishing engine, if it sent one.
    pub data_parallel_rank: Option<i64>,
    /// How many unknown fields the decoder skipped (0 for batches built in code).
    pub skipped_fields: u32,
    /// How many events of unknown type the decoder skipped (0 for batches built in code).
    pub skipped_events: u32,
}

impl KvEventBatch {
    /// A batch of `events` at time `ts` with no rank and nothing skipped.
    pub fn new(ts: f64, events: Vec<KvEvent>) -> Self {
        KvEventBatch { ts, events, data_parallel_rank: None, skipped_fields: 0, skipped_events: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_hash_projection() {
        assert_eq!(EngineHash::Int(42).to_u64(), 42);
        assert_eq!(EngineHash::Bytes(vec![]).to_u64(), 0);
        assert_eq!(EngineHash::Bytes(vec![1, 2]).to_u64(), 0x0102);
        let mut b = vec![0xaa; 24];
        b.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(EngineHash::Bytes(b).to_u64(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn tiers_and_placeholders() {
        let mut s = BlockStored { block_size: 16, token_ids: vec![1; 16], ..Default::default() };
        assert_eq!(s.tier(), Some(Tier::Gpu));
        assert!(!s.is_placeholder());
        s.medium = Some("cpu".into());
        assert_eq!(s.tier(), Some(Tier::Cpu));
        s.block_size = 0;
        assert!(s.is_placeholder());
        let r = BlockRemoved { medium: Some("Tape".into()), ..Default::default() };
        assert_eq!(r.tier(), None);
    }
}
