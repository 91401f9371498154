//! The simulator's own block keys: a chained XXH3 hash over full blocks of token ids.
//!
//! `key_i = splitmix64(c_i ^ key_{i-1} * K)`, `key_{-1}` a fixed root, where the content
//! hash `c_i` is XXH3 of the block's token bytes. Equal token prefixes give equal keys; the
//! engine model uses them, and router-backed policies receive them as the engine hashes of
//! KV events (the router re-keys the events from their tokens, and hashes prompts itself).
//!
//! [`segment_keys`] computes the same kind of chain for synthetic requests without
//! generating their tokens: a block lying inside one [`Segment`] has the content hash
//! `splitmix64(seed-derived ^ offset ^ block size)` (its tokens are a function of exactly
//! that), a block spanning segments hashes its generated tokens. So equal segment lists
//! give equal keys, and (up to hash collisions) different contents different keys.

use crate::workload::Segment;
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

/// Appends the keys of the full `block_size` blocks of the concatenated `segments`.
pub fn segment_keys<'a>(
    segments: impl IntoIterator<Item = &'a Segment>,
    block_size: usize,
    out: &mut Vec<u64>,
) {
    let segs: Vec<&Segment> = segments.into_iter().collect();
    let total: usize = segs.iter().map(|s| s.len as usize).sum();
    let mut parent = ROOT;
    let mut si = 0usize; // segment holding the block's first token
    let mut seg_start = 0usize; // absolute position of segs[si]
    let mut tokens = Vec::with_capacity(block_size);
    let mut bytes = Vec::with_capacity(block_size * 4);
    for b in 0..total / block_size {
        let start = b * block_size;
        while start >= seg_start + segs[si].len as usize {
            seg_start += segs[si].len as usize;
            si += 1;
        }
        let off = start - seg_start;
        let content = if off + block_size <= segs[si].len as usize {
            let s = segs[si];
            splitmix64(
                splitmix64(s.seed ^ 0x5345_474d_424c_4b00)
                    ^ (off as u64)
                    ^ ((block_size as u64) << 40),
            )
        } else {
            tokens.clear();
            let (mut pos, mut j, mut o) = (start, si, off);
            while pos < start + block_size {
                let s = segs[j];
                let take = (s.len as usize - o).min(start + block_size - pos);
                s.write_range(o, o + take, &mut tokens);
                pos += take;
                j += 1;
                o = 0;
            }
            bytes.clear();
            for t in &tokens {
                bytes.extend_from_slice(&t.to_le_bytes());
            }
            xxh3_64(&bytes)
        };
        parent = splitmix64(content ^ parent.wrapping_mul(PARENT_MUL));
        out.push(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_keys_depend_only_on_content() {
        let a = Segment { seed: 1, len: 40 };
        let b = Segment { seed: 2, len: 30 };
        let c = Segment { seed: 3, len: 64 };
        let mut k1 = Vec::new();
        segment_keys([&a, &b, &c], 16, &mut k1);
        assert_eq!(k1.len(), 134 / 16);
        // The same prefix gives the same keys, whatever follows.
        let mut k2 = Vec::new();
        segment_keys([&a, &b], 16, &mut k2);
        assert_eq!(&k1[..k2.len()], &k2[..]);
        // Splitting a segment where the tokens are equal (a partial segment is a prefix of
        // the full one) keeps keys of in-segment blocks; a different block size differs.
        let mut k3 = Vec::new();
        segment_keys([&Segment { seed: 1, len: 32 }], 16, &mut k3);
        assert_eq!(&k1[..2], &k3[..]);
        let mut k4 = Vec::new();
        segment_keys([&a, &b, &c], 8, &mut k4);
        assert_ne!(k4[0], k1[0]);
        // Any change of content changes that block and everything after it.
        let mut k5 = Vec::new();
        segment_keys([&a, &Segment { seed: 9, len: 30 }, &c], 16, &mut k5);
        assert_eq!(&k1[..2], &k5[..2]);
        assert!(k1[2..].iter().zip(&k5[2..]).all(|(x, y)| x != y));
    }

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
