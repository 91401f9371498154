//! The native `xxh3` chain: fast router keys that never need to match an engine's hash.
//!
//! For block `i` with tokens `t_i` and event-form extra keys `e_i`:
//!
//! ```text
//! h_i   = XXH3-64(little-endian bytes of t_i, seed = native_seed)
//! h_i   = XXH3-64(CBOR(e_i), seed = h_i)            only when the block has extra keys
//! key_i = splitmix64(h_i ^ (key_{i-1} * K))         key_{-1} = root
//! root  = splitmix64(native_seed ^ "kvroute")
//! ```
//!
//! The content hashes `h_i` do not depend on the chain, so the CPU computes them for many
//! blocks at once; only the cheap combine step is serial. For a fixed content hash the
//! combine is a bijection of the parent key (and vice versa), so distinct parents never
//! merge into one child key.

use super::cbor;
use super::extras::ExtraKey;
use crate::rng::splitmix64;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const ROOT_DOMAIN: u64 = 0x006b_7672_6f75_7465; // "kvroute"
const PARENT_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The root parent of a native chain for `seed`.
#[inline]
pub(crate) fn root(seed: u64) -> u64 {
    splitmix64(seed ^ ROOT_DOMAIN)
}

/// The key of a block from its parent key and its content hash.
#[inline(always)]
fn combine(parent: u64, content: u64) -> u64 {
    splitmix64(content ^ parent.wrapping_mul(PARENT_MUL))
}

/// The content hash of one block.
#[inline(always)]
fn content_hash(
    seed: u64,
    tokens: &[u32],
    scratch: &mut [u8],
    extra: Option<&[ExtraKey]>,
    ebuf: &mut Vec<u8>,
) -> u64 {
    let bytes = &mut scratch[..tokens.len() * 4];
    for (dst, t) in bytes.chunks_exact_mut(4).zip(tokens) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
    let h = xxh3_64_with_seed(bytes, seed);
    match extra {
        Some(keys) => {
            ebuf.clear();
            cbor::dump_keys(ebuf, keys);
            xxh3_64_with_seed(ebuf, h)
        }
        None => h,
    }
}

/// Appends the native keys of the full blocks of `tokens`, continuing from `parent`, to
/// `out`. `extra(i)` gives block `i`'s event-form extra keys.
pub(crate) fn chain<'a, F>(
    seed: u64,
    block_size: usize,
    parent: u64,
    tokens: &[u32],
    mut extra: F,
    out: &mut Vec<u64>,
) where
    F: FnMut(usize) -> Option<std::borrow::Cow<'a, [ExtraKey]>>,
{
    let n = tokens.len() / block_size;
    out.reserve(n);
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let scratch: &mut [u8] = if block_size * 4 <= stack.len() {
        &mut stack
    } else {
        heap.resize(block_size * 4, 0);
        &mut heap
    };
    let mut ebuf = Vec::new();
    let mut key = parent;
    for (i, block) in tokens.chunks_exact(block_size).enumerate() {
        let e = extra(i);
        let h = content_hash(seed, block, scratch, e.as_deref(), &mut ebuf);
        key = combine(key, h);
        out.push(key);
    }
}
