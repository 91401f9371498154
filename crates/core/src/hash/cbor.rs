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
    for &t in tokens {
        ok(e.u32(t));
    }
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
