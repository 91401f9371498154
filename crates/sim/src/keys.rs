//! The simulator's own block keys: a chained XXH3 hash over full blocks of token ids.
//!
//! `key_i = splitmix64(xxh3(le bytes of block i) ^ key_{i-1} * K)`, `key_{-1}` a fixed
//! root. Equal token prefixes give equal keys at any block size; the engine model and the
//! simulator's own policies use them. Router-backed policies hash the tokens themselves.

use kvroute::rng::splitmix64;
use xxhash_rust::xxh3::xxh3_64;

const ROOT: u64 = 0x6b76_7369_6d00_0001;
const PARENT_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Appends the keys of the full `block_size` blocks of `tokens` to `out` (a trailing
/// partial block gets no key, as in vLLM).
pub fn block_keys(tokens: &[u32], block_size: usize, out: &mut Vec<u64>) {
    let mut parent = ROOT;
    let mut bytes = Vec::with_capacity(block_size * 4);
    for block in tokens.chunks_exact(block_size) {
        bytes.clear();
        for t in block {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        parent = splitmix64(xxh3_64(&bytes) ^ parent.wrapping_mul(PARENT_MUL));
        out.push(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_over_the_prefix() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[5] = 999; // changes block 0 and so every later key
        let mut c = a.clone();
        c[40] = 999; // changes block 2 and later only
        let (mut ka, mut kb, mut kc) = (Vec::new(), Vec::new(), Vec::new());
        block_keys(&a[..63], 16, &mut ka);
        block_keys(&b, 16, &mut kb);
        block_keys(&c, 16, &mut kc);
        assert_eq!(ka.len(), 3);
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
        assert_eq!(&ka[..2], &kc[..2]);
        assert_ne!(ka[2], kc[2]);
        // Same content at another position in the chain is another key.
        let mut d = Vec::new();
        block_keys(&[&a[16..32], &a[16..32]].concat(), 16, &mut d);
        assert_ne!(d[0], d[1]);
    }
}
