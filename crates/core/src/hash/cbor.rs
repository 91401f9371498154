//! Canonical CBOR as `cbor2.dumps(value, canonical=True)` writes the values vLLM hashes:
//! tuples as definite-length arrays, ints in their shortest form, `str` as text strings,
//! `bytes` as byte strings, `None` as `null`. Written with `minicbor` straight into a
//! caller-owned buffer.

use super::extras::ExtraKey;
use minicbor::Encoder;

type Enc<'a> = Encoder<&'a mut Vec<u8>>;

// Writing into a `Vec<u8>` cannot fail (its error type is `Infallible`).
fn ok<T, E: std::fmt::Debug>(r: Result<T, minicbor::encode::Error<E>>) {
    let _ = r;
}

fn key(e: &mut Enc<'_>, k: &ExtraKey) {
    match k {
        ExtraKey::Str(s) => ok(e.str(s)),
        ExtraKey::Int(i) => ok(e.i64(*i)),
        ExtraKey::Bytes(b) => ok(e.bytes(b)),
        ExtraKey::Tuple(items) => {
            ok(e.array(items.len() as u64));
            for x in items {
                key(e, x);
            }
        }
    }
}

/// Appends each token as a CBOR unsigned int in its shortest form (major type 0), what
/// `Encoder::u32` writes, in one tight loop: the token array is the only per-token work of
/// the CBOR schemes, and going through the encoder call per token cost more than the
/// SHA-256 of the whole pre-image.
fn uints(out: &mut Vec<u8>, tokens: &[u32]) {
    // Branch-free: token sizes are random in real prompts, so a branch per size class
    // mispredicts about once per token. Each token is one 8-byte store (header, then the
    // big-endian payload) and the cursor moves by the encoded length.
    const PAYLOAD: [u32; 4] = [0, 1, 2, 4];
    let start = out.len();
    out.resize(start + tokens.len() * 5 + 8, 0);
    let buf = &mut out[start..];
    let mut n = 0;
    for &t in tokens {
        let k = u32::from(t > 0x17) + u32::from(t > 0xff) + u32::from(t > 0xffff);
        let p = PAYLOAD[k as usize];
        let hdr = if k == 0 { t } else { 0x17 + k };
        let payload = ((u64::from(t) << (32 - 8 * p)) as u32).swap_bytes();
        let word = u64::from(hdr) | (u64::from(payload) << 8);
        buf[n..n + 8].copy_from_slice(&word.to_le_bytes());
        n += 1 + p as usize;
    }
    out.truncate(start + n);
}

/// Appends `cbor2.dumps((parent, tuple(tokens), extra_keys), canonical=True)` to `out`.
pub(crate) fn dump_block(
    out: &mut Vec<u8>,
    parent: &[u8],
    tokens: &[u32],
    extra_keys: Option<&[ExtraKey]>,
) {
    out.reserve(8 + parent.len() + tokens.len() * 5);
    let mut e = Encoder::new(out);
    ok(e.array(3));
    ok(e.bytes(parent));
    ok(e.array(tokens.len() as u64));
    uints(e.writer_mut(), tokens);
    match extra_keys {
        None => ok(e.null()),
        Some(keys) => {
            ok(e.array(keys.len() as u64));
            for k in keys {
                key(&mut e, k);
            }
        }
    }
}

/// Appends the CBOR of the extra-keys tuple (its elements) to `out`.
pub(crate) fn dump_keys(out: &mut Vec<u8>, keys: &[ExtraKey]) {
    let mut e = Encoder::new(out);
    ok(e.array(keys.len() as u64));
    for k in keys {
        key(&mut e, k);
    }
}

/// Appends `cbor2.dumps(s)` for a string to `out` (vLLM's none-hash input).
pub(crate) fn dump_str(out: &mut Vec<u8>, s: &str) {
    ok(Encoder::new(out).str(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_loop_matches_minicbor() {
        let mut vals: Vec<u32> = vec![0, 1, 0x17, 0x18, 0xff, 0x100, 0xffff, 0x1_0000, u32::MAX];
        let mut r = crate::rng::SplitMix64::new(1);
        vals.extend((0..2000).map(|i| (r.next_u64() >> (i % 33)) as u32));
        let mut fast = vec![0xaa];
        uints(&mut fast, &vals);
        let mut reference = vec![0xaa];
        let mut e = Encoder::new(&mut reference);
        for &v in &vals {
            ok(e.u32(v));
        }
        assert_eq!(fast, reference);
    }
}
