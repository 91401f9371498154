//! The native `xxh3` chain: fast router keys that never need to match an engine's hash.
//!
//! For block `i` with tokens `t_i` and event-form extra keys `e_i`:
//!
//! ```text
//! h_i   = XXH3-64(little-endian bytes of t_i, seed = native_seed)
//! h_i   = XXH3-64(CBOR(e_i), seed = h_i)            only when the block has extra keys
//! m     = (h_i ^ key_{i-1}) * K                      (64x64 -> 128 bits)
//! key_i = low64(m) ^ high64(m)                       key_{-1} = root
//! root  = splitmix64(native_seed ^ "kvroute")
//! ```
//!
//! The content hashes `h_i` do not depend on the chain, so the CPU computes them for many
//! blocks at once; only the folded multiply is serial. (A SplitMix64 combine, about 17
//! cycles of latency, held the chain to a third of this speed.) Order matters: the
//! multiply is not linear over xor, so swapping two blocks changes the keys.

use super::cbor;
use super::extras::ExtraKey;
use crate::rng::splitmix64;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const ROOT_DOMAIN: u64 = 0x006b_7672_6f75_7465; // "kvroute"
const COMBINE_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The root parent of a native chain for `seed`.
#[inline]
pub(crate) fn root(seed: u64) -> u64 {
    splitmix64(seed ^ ROOT_DOMAIN)
}

/// The key of a block from its parent key and its content hash: one folded 64x64->128
/// multiply (the wyhash/rapidhash mixer). This is the only serial step of the chain, so
/// its latency (about 5 cycles) bounds the throughput.
#[inline(always)]
fn combine(parent: u64, content: u64) -> u64 {
    let m = u128::from(content ^ parent) * u128::from(COMBINE_MUL);
    (m as u64) ^ ((m >> 64) as u64)
}

/// The little-endian bytes of `tokens`: the tokens' own memory on little-endian targets
/// (no copy, and no 4-byte stores read back as 8-byte loads), a copy into `scratch`
/// elsewhere.
#[inline(always)]
fn token_bytes<'a>(tokens: &'a [u32], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    #[cfg(target_endian = "little")]
    {
        let _ = scratch;
        // SAFETY: `u32` has no padding and every byte pattern is a valid `u8`; the byte
        // slice covers exactly the memory of `tokens` (alignment 1 <= 4) and borrows it
        // immutably for the same lifetime.
        unsafe { std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), tokens.len() * 4) }
    }
    #[cfg(not(target_endian = "little"))]
    {
        scratch.clear();
        scratch.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        scratch
    }
}

/// The content hash of one block.
#[inline(always)]
fn content_hash(
    seed: u64,
    tokens: &[u32],
    scratch: &mut Vec<u8>,
    extra: Option<&[ExtraKey]>,
    ebuf: &mut Vec<u8>,
) -> u64 {
    let h = xxh3_64_with_seed(token_bytes(tokens, scratch), seed);
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
    // Written into place rather than pushed: a push reloads the vector's length and
    // capacity from memory for every block (`out` may alias nothing the compiler can
    // see through), which showed in the loop's profile.
    let start = out.len();
    out.resize(start + n, 0);
    let mut scratch = Vec::new();
    let mut ebuf = Vec::new();
    let mut key = parent;
    for (i, (block, slot)) in tokens.chunks_exact(block_size).zip(&mut out[start..]).enumerate() {
        let e = extra(i);
        let h = content_hash(seed, block, &mut scratch, e.as_deref(), &mut ebuf);
        key = combine(key, h);
        *slot = key;
    }
}

/// [`chain`] without extra keys (the request path's common case). For 16-token blocks
/// (the default block size) the block length is a compile-time constant, so the
/// inlined XXH3 takes its 64-byte path with no length branches and no bounds checks.
pub(crate) fn chain_plain(
    seed: u64,
    block_size: usize,
    parent: u64,
    tokens: &[u32],
    out: &mut Vec<u64>,
) {
    if block_size != PLAIN_BS || cfg!(not(target_endian = "little")) {
        return chain(seed, block_size, parent, tokens, |_| None, out);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("bmi2") {
        // SAFETY: the CPU has BMI2 (checked just above).
        return unsafe { chain_plain_bmi2(seed, parent, tokens, out) };
    }
    chain_plain_16(seed, parent, tokens, out)
}

const PLAIN_BS: usize = 16;

/// [`chain_plain_16`] compiled with BMI2: the five 64x64->128 multiplies of a block
/// (XXH3's four and the chain's) become `mulx`, which takes any registers, where `mul`
/// ties its operands and results to `rax`/`rdx` and costs a register move or a spill
/// around each. Same instructions otherwise, same keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2")]
unsafe fn chain_plain_bmi2(seed: u64, parent: u64, tokens: &[u32], out: &mut Vec<u64>) {
    chain_plain_16(seed, parent, tokens, out)
}

/// The chain over 16-token blocks, without extra keys.
#[inline(always)]
fn chain_plain_16(seed: u64, parent: u64, tokens: &[u32], out: &mut Vec<u64>) {
    const BS: usize = PLAIN_BS;
    let mut scratch = Vec::new();
    let mut key = parent;
    let n = tokens.len() / BS;
    // Written in place into the spare capacity (no zero fill first, no capacity check
    // per key), by a loop of this function's own: `Vec::extend` kept the loop in a
    // function of its own, compiled without the caller's target features.
    out.reserve(n);
    let start = out.len();
    for (block, slot) in tokens.chunks_exact(BS).zip(&mut out.spare_capacity_mut()[..n]) {
        let bytes: &[u8; BS * 4] =
            token_bytes(block, &mut scratch).try_into().expect("a block is 64 bytes");
        key = combine(key, xxh3_64_with_seed(bytes, seed));
        slot.write(key);
    }
    // SAFETY: `n` slots after `start` are within the capacity reserved above, and the
    // loop wrote each of them (`chunks_exact(BS)` yields exactly `n` blocks).
    unsafe { out.set_len(start + n) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The constant-block-size path computes exactly the general chain's keys (which the
    /// reference vectors in testdata/native pin), appending after what `out` holds.
    #[test]
    fn plain_chain_equals_the_general_chain() {
        let mut rng = SplitMix64::new(11);
        for case in 0..200u64 {
            let bs = [16, 16, 16, 4, 8, 32][case as usize % 6];
            let len = rng.below(40 * bs as u64 + 7) as usize;
            let tokens: Vec<u32> = (0..len).map(|_| rng.next_u64() as u32).collect();
            let (seed, parent) = (rng.next_u64(), rng.next_u64());
            let head: Vec<u64> = (0..case % 3).collect();
            let (mut a, mut b) = (head.clone(), head);
            chain(seed, bs, parent, &tokens, |_| None, &mut a);
            chain_plain(seed, bs, parent, &tokens, &mut b);
            assert_eq!(a, b, "block size {bs}, {len} tokens");
            assert_eq!(a.len() as u64, case % 3 + (len / bs) as u64);
        }
    }
}
