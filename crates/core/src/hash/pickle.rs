//! A minimal pickle protocol-5 writer, byte-exact with CPython's C pickler (`_pickle`) for
//! the values vLLM hashes: `(parent: bytes, tokens: tuple[int, ...], extra_keys)`.
//!
//! No crate reproduces CPython's framing and memo behaviour, so this is written by hand.
//! It mirrors `_pickle.c`:
//!
//! - `dump`: `PROTO 5`, then framing is switched on; every write opens a frame when none is
//!   open (9 reserved header bytes); `STOP` is written inside the frame and the frame is
//!   committed at the end. A frame shorter than 4 bytes loses its header.
//! - after each saved object (`save`), a frame of 64 KiB or more is committed, so long
//!   token tuples are split into several frames as CPython splits them.
//! - `bytes`/`str` payloads of 64 KiB or more are written outside any frame (the frame
//!   before them is committed first), as `_Pickler_write_bytes` does.
//! - ints: `BININT1` / `BININT2` / `BININT` inside the signed 32-bit range, `LONG1`
//!   (minimal two's complement, little-endian) outside; ints are never memoized.
//! - `bytes`, `str` and non-empty tuples are memoized (`MEMOIZE`); the empty tuple is
//!   `EMPTY_TUPLE` and is not.
//! - the memo is keyed by *object identity*. The writer models identity for the cases
//!   that occur in vLLM's extra keys: the tag constants (`"mm"`, `"lora"`, ...; first
//!   element of an inner tuple of the 0.33 form) are one object each, and CPython's
//!   singletons (the empty string, one-character latin-1 strings, the empty and one-byte
//!   `bytes`) are one object per value. Every other string or bytes value is treated as a
//!   distinct object, so two equal identifiers in one block are written twice.

use super::extras::ExtraKey;

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const EMPTY_TUPLE: u8 = b')';
const NONE: u8 = b'N';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';
const BINBYTES8: u8 = 0x8e;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const BINUNICODE8: u8 = 0x8d;
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';

const FRAME_HEADER_SIZE: usize = 9;
const FRAME_SIZE_MIN: usize = 4;
const FRAME_SIZE_TARGET: usize = 64 * 1024;

/// Which memo "object" a string or bytes value is, when it is one shared object.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Shared {
    /// A vLLM tag constant (`"mm"`, `"lora"`, ...).
    Tag,
    /// A CPython singleton `str`.
    Str,
    /// A CPython singleton `bytes`.
    Bytes,
}

/// A pickler writing into a caller-owned buffer.
struct Pickler<'o, 'k> {
    out: &'o mut Vec<u8>,
    frame_start: Option<usize>,
    memo_len: u32,
    shared: Vec<(Shared, &'k [u8], u32)>,
}

impl<'o, 'k> Pickler<'o, 'k> {
    fn write(&mut self, data: &[u8]) {
        if self.frame_start.is_none() {
            self.frame_start = Some(self.out.len());
            self.out.extend_from_slice(&[0u8; FRAME_HEADER_SIZE]);
        }
        self.out.extend_from_slice(data);
    }

    fn commit_frame(&mut self) {
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let frame_len = self.out.len() - start - FRAME_HEADER_SIZE;
        if frame_len >= FRAME_SIZE_MIN {
            self.out[start] = FRAME;
            self.out[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(frame_len as u64).to_le_bytes());
        } else {
            self.out.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// `_Pickler_OpcodeBoundary`: called after each saved object.
    #[inline]
    fn boundary(&mut self) {
        if let Some(start) = self.frame_start {
            if self.out.len() - start - FRAME_HEADER_SIZE >= FRAME_SIZE_TARGET {
                self.commit_frame();
            }
        }
    }

    /// `_Pickler_write_bytes`: large payloads bypass the frame.
    fn write_payload(&mut self, header: &[u8], data: &[u8]) {
        if data.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            self.out.extend_from_slice(header);
            self.out.extend_from_slice(data);
        } else {
            self.write(header);
            self.write(data);
        }
    }

    fn memoize(&mut self) -> u32 {
        self.write(&[MEMOIZE]);
        let idx = self.memo_len;
        self.memo_len += 1;
        idx
    }

    fn get(&mut self, idx: u32) {
        if idx < 256 {
            self.write(&[BINGET, idx as u8]);
        } else {
            let b = idx.to_le_bytes();
            self.write(&[LONG_BINGET, b[0], b[1], b[2], b[3]]);
        }
    }

    fn int(&mut self, v: i64) {
        if let Ok(v32) = i32::try_from(v) {
            let b = v32.to_le_bytes();
            if b[3] != 0 || b[2] != 0 {
                self.write(&[BININT, b[0], b[1], b[2], b[3]]);
            } else if b[1] != 0 {
                self.write(&[BININT2, b[0], b[1]]);
            } else {
                self.write(&[BININT1, b[0]]);
            }
        } else {
            // LONG1: nbytes = nbits(|v|) / 8 + 1, two's complement little-endian, one
            // redundant sign byte dropped for negatives (`save_long`).
            let nbits = 64 - v.unsigned_abs().leading_zeros() as usize;
            let mut nbytes = nbits / 8 + 1;
            let bytes = (v as i128).to_le_bytes();
            if v < 0 && nbytes > 1 && bytes[nbytes - 1] == 0xff && bytes[nbytes - 2] & 0x80 != 0 {
                nbytes -= 1;
            }
            let mut buf = [0u8; 11];
            buf[0] = LONG1;
            buf[1] = nbytes as u8;
            buf[2..2 + nbytes].copy_from_slice(&bytes[..nbytes]);
            self.write(&buf[..2 + nbytes]);
        }
        self.boundary();
    }

    /// The token ints: one tight loop when no frame boundary can fall among them (the
    /// common case), `int` per token otherwise. Same bytes either way.
    fn token_ints(&mut self, tokens: &[u32]) {
        const MAX_INT: usize = 7; // LONG1, length, five bytes
        let room = match self.frame_start {
            Some(s) => self.out.len() - s - FRAME_HEADER_SIZE + tokens.len() * MAX_INT,
            None => usize::MAX,
        };
        if room >= FRAME_SIZE_TARGET {
            for &t in tokens {
                self.int(i64::from(t));
            }
            return;
        }
        // Branch-free for ids below 2**31 (one 8-byte store: opcode, then the id
        // little-endian; the cursor moves by the opcode's length), LONG1 above.
        const OPS: [u8; 3] = [BININT1, BININT2, BININT];
        const LEN: [usize; 3] = [2, 3, 5];
        let start = self.out.len();
        self.out.resize(start + tokens.len() * MAX_INT + 8, 0);
        let buf = &mut self.out[start..];
        let mut n = 0;
        for &t in tokens {
            if t < 0x8000_0000 {
                let k = usize::from(t > 0xff) + usize::from(t > 0xffff);
                let word = u64::from(OPS[k]) | (u64::from(t) << 8);
                buf[n..n + 8].copy_from_slice(&word.to_le_bytes());
                n += LEN[k];
            } else {
                let b = t.to_le_bytes();
                buf[n..n + 7].copy_from_slice(&[LONG1, 5, b[0], b[1], b[2], b[3], 0]);
                n += 7;
            }
        }
        self.out.truncate(start + n);
    }

    fn lookup(&self, kind: Shared, key: &[u8]) -> Option<u32> {
        self.shared.iter().find(|(k, v, _)| *k == kind && *v == key).map(|&(_, _, i)| i)
    }

    fn bytes(&mut self, data: &'k [u8]) {
        let shared = (data.len() <= 1).then_some(Shared::Bytes);
        if let Some(kind) = shared {
            if let Some(i) = self.lookup(kind, data) {
                self.get(i);
                self.boundary();
                return;
            }
        }
        self.sized(SHORT_BINBYTES, BINBYTES, BINBYTES8, data);
        let idx = self.memoize();
        if let Some(kind) = shared {
            self.shared.push((kind, data, idx));
        }
        self.boundary();
    }

    /// Writes `data` after the smallest of the three length-prefixed opcodes that fits
    /// (1-byte, 4-byte or 8-byte little-endian length), as CPython chooses them.
    fn sized(&mut self, short: u8, long: u8, huge: u8, data: &[u8]) {
        let n = data.len();
        if n <= 0xff {
            self.write_payload(&[short, n as u8], data);
        } else if n as u64 <= 0xffff_ffff {
            let l = (n as u32).to_le_bytes();
            self.write_payload(&[long, l[0], l[1], l[2], l[3]], data);
        } else {
            let mut h = [huge; 9];
            h[1..].copy_from_slice(&(n as u64).to_le_bytes());
            self.write_payload(&h, data);
        }
    }

    /// Pickles bytes that are not shared with anything else (the parent hash).
    fn unshared_bytes(&mut self, data: &[u8]) {
        self.sized(SHORT_BINBYTES, BINBYTES, BINBYTES8, data);
        self.memoize();
        self.boundary();
    }

    fn str(&mut self, s: &'k str, tag: bool) {
        let mut chars = s.chars();
        let singleton = match (chars.next(), chars.next()) {
            (None, _) => true,
            (Some(c), None) => (c as u32) < 256,
            _ => false,
        };
        let shared = if singleton {
            Some(Shared::Str)
        } else if tag {
            Some(Shared::Tag)
        } else {
            None
        };
        if let Some(kind) = shared {
            if let Some(i) = self.lookup(kind, s.as_bytes()) {
                self.get(i);
                self.boundary();
                return;
            }
        }
        let data = s.as_bytes();
        self.sized(SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, data);
        let idx = self.memoize();
        if let Some(kind) = shared {
            self.shared.push((kind, data, idx));
        }
        self.boundary();
    }

    /// Opens a tuple of `n` elements (MARK for more than three).
    fn tuple_open(&mut self, n: usize) {
        if n > 3 {
            self.write(&[MARK]);
        }
    }

    /// Closes a tuple of `n` elements (the caller has saved them after `tuple_open`).
    fn tuple_close(&mut self, n: usize) {
        let op = match n {
            0 => {
                self.write(&[EMPTY_TUPLE]);
                self.boundary();
                return;
            }
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => TUPLE,
        };
        self.write(&[op]);
        self.memoize();
        self.boundary();
    }

    fn extra_key(&mut self, k: &'k ExtraKey, tag: bool) {
        match k {
            ExtraKey::Str(s) => self.str(s, tag),
            ExtraKey::Int(i) => self.int(*i),
            ExtraKey::Bytes(b) => self.bytes(b),
            ExtraKey::Tuple(items) => self.tuple(items, false),
        }
    }

    /// A tuple of extra keys; `tagged_items` marks the items as 0.33-style tagged tuples
    /// whose first element is a vLLM tag constant.
    fn tuple(&mut self, items: &'k [ExtraKey], tagged_items: bool) {
        self.tuple_open(items.len());
        for item in items {
            match item {
                ExtraKey::Tuple(inner) if tagged_items => {
                    self.tuple_open(inner.len());
                    for (j, x) in inner.iter().enumerate() {
                        self.extra_key(x, j == 0);
                    }
                    self.tuple_close(inner.len());
                }
                other => self.extra_key(other, false),
            }
        }
        self.tuple_close(items.len());
    }
}

/// Appends `pickle.dumps((parent, tuple(tokens), extra_keys), protocol=5)` to `out`.
///
/// `extra_keys` are the elements of the extra-keys tuple (`None` pickles as `None`);
/// `tagged` says they are in vLLM 0.33's tagged form, whose tags are shared constants.
pub(crate) fn dump_block(
    out: &mut Vec<u8>,
    parent: &[u8],
    tokens: &[u32],
    extra_keys: Option<&[ExtraKey]>,
    tagged: bool,
) {
    out.reserve(16 + parent.len() + tokens.len() * 5);
    out.extend_from_slice(&[PROTO, 5]);
    let mut p = Pickler { out, frame_start: None, memo_len: 0, shared: Vec::new() };
    p.tuple_open(3);
    p.unshared_bytes(parent);
    p.tuple_open(tokens.len());
    p.token_ints(tokens);
    p.tuple_close(tokens.len());
    match extra_keys {
        None => {
            p.write(&[NONE]);
            p.boundary();
        }
        Some(keys) => p.tuple(keys, tagged),
    }
    p.tuple_close(3);
    p.write(&[STOP]);
    p.commit_frame();
}

/// Appends `pickle.dumps(s, protocol=5)` for a string to `out` (vLLM's none-hash input).
pub(crate) fn dump_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&[PROTO, 5]);
    let mut p = Pickler { out, frame_start: None, memo_len: 0, shared: Vec::new() };
    p.str(s, false);
    p.write(&[STOP]);
    p.commit_frame();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(v: i64) -> Vec<u8> {
        let mut out = vec![0u8; FRAME_HEADER_SIZE];
        let mut p =
            Pickler { out: &mut out, frame_start: Some(0), memo_len: 0, shared: Vec::new() };
        p.int(v);
        out.split_off(FRAME_HEADER_SIZE)
    }

    #[test]
    fn int_opcodes_follow_save_long() {
        // The opcodes CPython 3.11's `pickle.dumps(v, protocol=5)` writes for each value.
        assert_eq!(ints(0), [BININT1, 0]);
        assert_eq!(ints(255), [BININT1, 0xff]);
        assert_eq!(ints(256), [BININT2, 0, 1]);
        assert_eq!(ints(65535), [BININT2, 0xff, 0xff]);
        assert_eq!(ints(65536), [BININT, 0, 0, 1, 0]);
        assert_eq!(ints(-1), [BININT, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(ints(i32::MAX as i64), [BININT, 0xff, 0xff, 0xff, 0x7f]);
        // 2**31 needs a fifth byte for the sign: 8a 05 00 00 00 80 00.
        assert_eq!(ints(1 << 31), [LONG1, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(ints(u32::MAX as i64), [LONG1, 5, 0xff, 0xff, 0xff, 0xff, 0]);
        // -2**31 - 1 = 0xff_7fff_ffff: 8a 05 ff ff ff 7f ff.
        assert_eq!(ints(-(1 << 31) - 1), [LONG1, 5, 0xff, 0xff, 0xff, 0x7f, 0xff]);
        // -2**39 = 0x80_0000_0000 (5 bytes, the sixth would be redundant).
        assert_eq!(ints(-(1 << 39)), [LONG1, 5, 0, 0, 0, 0, 0x80]);
    }

    #[test]
    fn token_loop_matches_int() {
        let mut toks: Vec<u32> =
            vec![0, 0xff, 0x100, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, u32::MAX];
        let mut r = crate::rng::SplitMix64::new(3);
        toks.extend((0..3000).map(|i| (r.next_u64() >> (i % 33)) as u32));
        let run = |fast: bool| {
            let mut out = vec![0u8; FRAME_HEADER_SIZE];
            let mut p =
                Pickler { out: &mut out, frame_start: Some(0), memo_len: 0, shared: Vec::new() };
            if fast {
                p.token_ints(&toks);
            } else {
                for &t in &toks {
                    p.int(i64::from(t));
                }
            }
            out
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn tiny_pickles_drop_the_frame_header() {
        let mut out = Vec::new();
        dump_str(&mut out, "");
        // PROTO 5, SHORT_BINUNICODE len 0, MEMOIZE, STOP: 4 bytes framed.
        assert_eq!(
            out,
            [PROTO, 5, FRAME, 4, 0, 0, 0, 0, 0, 0, 0, SHORT_BINUNICODE, 0, MEMOIZE, STOP]
        );
    }
}
