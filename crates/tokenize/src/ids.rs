//! Token-id prompts of `/v1/completions` bodies, read fast.
//!
//! A completions body whose `prompt` is a list of token ids (`[1, 2]`, or a batch
//! `[[1, 2], ...]` of which the first prompt counts) needs no JSON tree and no tokenizer:
//! a router only wants the ids, `stream` and `model`. [`parse_serde`] reads them in one
//! serde pass; [`scan`] is a byte scanner over the same body that reads the id array
//! with SWAR digit parsing (8 bytes at a time) and gives up ([`None`]) on anything it does
//! not expect; [`parse`] is the scanner with serde as the fallback. Whenever [`scan`]
//! answers, its answer equals [`parse_serde`]'s (property-tested against serde_json and
//! fuzzed), so the two paths accept and reject exactly the same bodies.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

mod simd;

/// What the router needs from a completions body with a token-id prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdPrompt {
    /// The prompt's token ids (the first prompt of a batch); never empty.
    pub tokens: Vec<u32>,
    /// `stream` (absent or `null` is `false`).
    pub stream: bool,
    /// `model`, if given and not `null`.
    pub model: Option<String>,
}

/// Reads a token-id prompt body: the byte scanner, else the serde pass. `None` when the
/// body is not a JSON object whose `prompt` is a non-empty list of u32 token ids (or a
/// batch of such lists), or when it has `messages` or `prompt_embeds` (not `null`): such
/// bodies take the general path.
pub fn parse(body: &[u8]) -> Option<IdPrompt> {
    match scan(body) {
        Some(p) => Some(p),
        None => parse_serde(body),
    }
}

/// The fields of a token-id completions body, in one serde pass without a JSON tree.
#[derive(Deserialize)]
struct FastBody<'a> {
    #[serde(default)]
    prompt: Option<PromptIds>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt_embeds: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    model: Option<String>,
}

/// The reference reader: serde_json's single pass (the ids go straight into a
/// `Vec<u32>`). Same contract as [`parse`].
pub fn parse_serde(body: &[u8]) -> Option<IdPrompt> {
    // serde's derived struct would also take a JSON array as the fields in order; a
    // request body must be an object.
    if body.get(skip_ws(body, 0)) != Some(&b'{') {
        return None;
    }
    let fb: FastBody = serde_json::from_slice(body).ok()?;
    if fb.messages.is_some() || fb.prompt_embeds.is_some_and(|p| p.get() != "null") {
        return None;
    }
    let tokens = fb.prompt?.0;
    if tokens.is_empty() {
        return None;
    }
    Some(IdPrompt { tokens, stream: fb.stream.unwrap_or(false), model: fb.model })
}

/// A token-id prompt, `[1, 2]` or `[[1, 2], ...]` (the first of a batch), read straight
/// into a `Vec<u32>`. Anything else (text, an empty list, ids that are not u32s) is a
/// deserialization error.
struct PromptIds(Vec<u32>);

impl<'de> Deserialize<'de> for PromptIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Outer;
        impl<'de> serde::de::Visitor<'de> for Outer {
            type Value = PromptIds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of token ids or a list of such lists")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PromptIds, A::Error> {
                match seq.next_element::<First>()? {
                    None => Err(serde::de::Error::custom("empty prompt")),
                    Some(First::Id(x)) => {
                        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(8192));
                        out.push(x);
                        while let Some(x) = seq.next_element::<u32>()? {
                            out.push(x);
                        }
                        Ok(PromptIds(out))
                    }
                    Some(First::List(v)) => {
                        // The rest of the batch must be lists of ids too.
                        while seq.next_element::<Vec<u32>>()?.is_some() {}
                        Ok(PromptIds(v))
                    }
                }
            }
        }
        d.deserialize_seq(Outer)
    }
}

/// The first element of a token-id prompt: an id, or the first prompt of a batch.
enum First {
    Id(u32),
    List(Vec<u32>),
}

impl<'de> Deserialize<'de> for First {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = First;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id or a list of token ids")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<First, E> {
                u32::try_from(v).map(First::Id).map_err(|_| E::custom("token id out of range"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<First, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(8192));
                while let Some(x) = seq.next_element::<u32>()? {
                    out.push(x);
                }
                Ok(First::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// JSON whitespace, as serde_json skips it.
#[inline]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\t' | b'\r')
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

/// Nested `[` and `{` allowed in a value the scanner skips: serde_json's recursion limit
/// is 128 from the top, and the body's own object is one level, so a skipped value that
/// could be near that depth is left to serde.
const MAX_OPENERS: usize = 64;

/// The byte scanner. `Some` only for bodies it fully understands, and then with exactly
/// [`parse_serde`]'s answer; `None` means "ask serde" (for a body that is not a
/// token-id prompt, or one written in a form the scanner leaves to serde: escaped keys,
/// negative or fractional numbers, deep values, duplicate fields, ...).
pub fn scan(b: &[u8]) -> Option<IdPrompt> {
    scan_with(b, Simd::detect())
}

/// [`scan`] without the vector block readers, on any CPU: the SWAR digit parsing alone
/// (what [`scan`] does on CPUs without AVX2). For tests and benchmarks that check every
/// path on one machine.
#[doc(hidden)]
pub fn scan_portable(b: &[u8]) -> Option<IdPrompt> {
    scan_with(b, None)
}

/// [`scan`] with the AVX2 block reader (what [`scan`] does on CPUs with AVX2 but without
/// AVX-512 VBMI2), on CPUs that have AVX2 (and BMI1/2, POPCNT, LZCNT); elsewhere it is
/// [`scan_portable`] ([`scan_has_avx2`] tells which). For tests and benchmarks.
#[doc(hidden)]
pub fn scan_avx2(b: &[u8]) -> Option<IdPrompt> {
    scan_with(b, simd::Avx2::detect().map(Simd::Avx2))
}

/// Whether [`scan`] uses the AVX-512 block reader on this CPU.
#[doc(hidden)]
pub fn scan_uses_avx512() -> bool {
    Avx512::detect().is_some()
}

/// Whether this CPU runs the AVX2 block reader ([`scan_avx2`]; [`scan`] uses it when
/// [`scan_uses_avx512`] is false).
#[doc(hidden)]
pub fn scan_has_avx2() -> bool {
    simd::Avx2::detect().is_some()
}

fn scan_with(b: &[u8], simd: Option<Simd>) -> Option<IdPrompt> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut prompt: Option<Vec<u32>> = None;
    let mut stream: Option<Option<bool>> = None;
    let mut model: Option<Option<String>> = None;
    let (mut seen_messages, mut seen_embeds) = (false, false);
    loop {
        // A key: a plain string (no escapes, no control characters), valid UTF-8.
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let k0 = i + 1;
        let mut k1 = k0;
        loop {
            match *b.get(k1)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => k1 += 1,
            }
        }
        let key = &b[k0..k1];
        i = skip_ws(b, k1 + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        match key {
            b"prompt" => {
                if prompt.is_some() {
                    return None;
                }
                let (ids, j) = prompt_ids(b, i, simd)?;
                prompt = Some(ids);
                i = j;
            }
            b"stream" => {
                if stream.is_some() {
                    return None;
                }
                let rest = &b[i..];
                let (v, n) = if rest.starts_with(b"true") {
                    (Some(true), 4)
                } else if rest.starts_with(b"false") {
                    (Some(false), 5)
                } else if rest.starts_with(b"null") {
                    (None, 4)
                } else {
                    return None;
                };
                stream = Some(v);
                i += n;
            }
            b"model" => {
                if model.is_some() {
                    return None;
                }
                let (v, j) = serde_value::<Option<String>>(b, i)?;
                model = Some(v);
                i = j;
            }
            b"messages" | b"prompt_embeds" => {
                let seen = if key == b"messages" { &mut seen_messages } else { &mut seen_embeds };
                if *seen {
                    return None;
                }
                *seen = true;
                let (v, j) = serde_value::<&RawValue>(b, i)?;
                if v.get() != "null" {
                    return None;
                }
                i = j;
            }
            _ => {
                // serde checks field names are UTF-8 and skips unknown values.
                std::str::from_utf8(key).ok()?;
                let (_, j) = serde_value::<IgnoredAny>(b, i)?;
                if b[i..j].iter().filter(|&&c| c == b'[' || c == b'{').count() > MAX_OPENERS {
                    return None;
                }
                i = j;
            }
        }
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if skip_ws(b, i + 1) != b.len() {
        return None;
    }
    let tokens = prompt?;
    if tokens.is_empty() {
        return None;
    }
    Some(IdPrompt { tokens, stream: stream.flatten().unwrap_or(false), model: model.flatten() })
}

/// One JSON value at `b[i..]` through serde_json, and the index just past it.
fn serde_value<'de, T: Deserialize<'de>>(b: &'de [u8], i: usize) -> Option<(T, usize)> {
    let mut it = serde_json::Deserializer::from_slice(&b[i..]).into_iter::<T>();
    let v = it.next()?.ok()?;
    Some((v, i + it.byte_offset()))
}

/// The prompt at `b[i..]`: `[ids]` or `[[ids], [ids], ...]` (the first list counts, the
/// others are checked), and the index just past it.
fn prompt_ids(b: &[u8], i: usize, simd: Option<Simd>) -> Option<(Vec<u32>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let j = skip_ws(b, i + 1);
    if b.get(j) != Some(&b'[') {
        return list(b, i, simd);
    }
    let (first, mut i) = list(b, j, simd)?;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b']') => return Some((first, i + 1)),
            Some(b',') => i = skip_ws(b, i + 1),
            _ => return None,
        }
        let (_, j) = list(b, i, simd)?;
        i = j;
    }
}

/// A list of ids at `b[i..]`: the block scanner for the compact forms, else the
/// byte-by-byte reader.
#[inline]
fn list(b: &[u8], i: usize, simd: Option<Simd>) -> Option<(Vec<u32>, usize)> {
    id_list_blocks(b, i, simd).or_else(|| id_list(b, i))
}

/// Per-byte classes of a 64-byte block, one bit per byte (bit k = byte k): ASCII digits,
/// `,`, ` `, `]` and `0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Classes {
    digits: u64,
    commas: u64,
    spaces: u64,
    closes: u64,
    zeros: u64,
}

/// [`Classes`] one byte at a time (the reference, and other architectures).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
pub(crate) fn classify_bytes(block: &[u8; 64]) -> Classes {
    let mut c = Classes { digits: 0, commas: 0, spaces: 0, closes: 0, zeros: 0 };
    for (k, &x) in block.iter().enumerate() {
        c.digits |= u64::from(x.is_ascii_digit()) << k;
        c.commas |= u64::from(x == b',') << k;
        c.spaces |= u64::from(x == b' ') << k;
        c.closes |= u64::from(x == b']') << k;
        c.zeros |= u64::from(x == b'0') << k;
    }
    c
}

use simd::{classify, Avx512, Simd};

/// A list of ids at `b[i..]` (`b[i]` is `[`) in the forms clients write, `[1,2]` and
/// `[1, 2]` (ids separated by a comma and at most one space, none inside the brackets),
/// and the index just past its `]`. The bytes are classified 64 at a time and checked
/// with bit masks, so each id's start is known without reading the id before it and
/// the ids parse independently of each other. `None` for anything else, including every
/// form [`id_list`] reads and this does not.
fn id_list_blocks(b: &[u8], i: usize, simd: Option<Simd>) -> Option<(Vec<u32>, usize)> {
    match simd {
        // The same loop, compiled with the AVX-512 or AVX2 (and BMI, POPCNT) features
        // enabled.
        Some(simd) => simd.id_list_blocks(b, i),
        None => id_list_blocks_with(b, i, None),
    }
}

/// [`id_list_blocks`]' loop, with a vector block reader when `simd` is given (and then
/// inlined into a function compiled for it, `simd::Avx512::id_list_blocks` or
/// `simd::Avx2::id_list_blocks`).
#[inline(always)]
fn id_list_blocks_with(b: &[u8], i: usize, simd: Option<Simd>) -> Option<(Vec<u32>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut pos = i + 1;
    if !b.get(pos)?.is_ascii_digit() {
        return None;
    }
    // About 4 bytes an id (ids below 1,000 and a comma); a denser list grows once. (One
    // for the densest, "1,", would be 10 times the ids' size for 150k-vocabulary ids.)
    let mut out = Vec::with_capacity((b.len() - pos) / 4 + 16);
    // Bit 0 of each: the class of the byte before the block. Before the first id: as if
    // after a comma.
    let (mut pd, mut pc, mut ps) = (0u64, 1u64, 0u64);
    let mut pad = [0u8; 64];
    loop {
        let block: &[u8; 64] = match b.get(pos..pos + 64) {
            Some(s) => s.try_into().expect("64 bytes"),
            None => {
                // The body's last bytes, padded with NULs (which no list may contain).
                let n = b.len() - pos;
                pad[..n].copy_from_slice(&b[pos..]);
                pad[n..].fill(0);
                &pad
            }
        };
        let Classes { digits: d, commas: c, spaces: s, closes, zeros } = match simd {
            Some(simd) => simd.classify(block),
            None => classify(block),
        };
        let close = closes & closes.wrapping_neg();
        // The bytes of the list in this block (before its `]`), and with the `]`.
        let inside = close.wrapping_sub(1);
        let upto = inside | close;
        // Bit k: byte k - 1 is a digit / comma / space.
        let (dp, cp, sp) = ((d << 1) | pd, (c << 1) | pc, (s << 1) | ps);
        let bad = (!(d | c | s) & inside) // only digits, commas and spaces inside
            | (c & !dp & inside) // a comma follows a digit
            | (s & !cp & inside) // a space follows a comma
            | (sp & !d & upto) // a digit follows a space
            | (cp & !(d | s) & upto) // a digit or a space follows a comma
            | (dp & !(d | c) & inside) // a comma follows an id
            | (close & !dp); // `]` follows an id
        if bad != 0 {
            return None;
        }
        let mut starts = d & !dp & inside;
        // A leading zero (an id of two digits or more that starts with 0), for the ids
        // whose next byte is in this block; the one at byte 63 goes through `number`.
        if starts & zeros & (d >> 1) != 0 {
            return None;
        }
        if let Some(simd) = simd {
            // The ids wholly inside the block: those whose last digit is followed by a
            // non-digit in the block, less the tail of an id begun in the block before
            // (read there).
            let mut ends = d & !(d >> 1) & inside & !(1 << 63);
            if pd & d & 1 != 0 {
                ends &= ends - 1;
            }
            // A run of 8 digits or more anywhere in the block leaves it to the loop below.
            let mut long = d;
            for _ in 0..7 {
                long &= long << 1;
            }
            if ends != 0 && long == 0 {
                // Every id of the block is 1 to 7 digits, digits from its start to its
                // end, the k-th end after the k-th start and before the (k+1)-th (the
                // masks above checked the list's form); at most 32 ("1," is 2 bytes).
                simd.block_ids(block, starts, ends, &mut out);
                // What is left: the id that runs into the next block, if any.
                let last = 63 - ends.leading_zeros();
                starts &= !((2u64 << last) - 1);
            }
        }
        while starts != 0 {
            let k = starts.trailing_zeros() as usize;
            starts &= starts - 1;
            // The id's length from the digit mask; one that may run into the next block,
            // of 8 digits or more, or too near the end of the body for an 8-byte load
            // takes `number`.
            let len = (!(d >> k)).trailing_zeros() as usize;
            match b.get(pos + k..pos + k + 8) {
                Some(w) if len < 8 && k + len < 64 => {
                    let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                    out.push(swar_digits(w, len));
                }
                _ => out.push(number(b, pos + k)?.0),
            }
        }
        if close != 0 {
            return Some((out, pos + close.trailing_zeros() as usize + 1));
        }
        (pd, pc, ps) = (d >> 63, c >> 63, s >> 63);
        pos += 64;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// A list of u32 ids at `b[i..]` (`b[i]` is `[`), and the index just past its `]`.
fn id_list(b: &[u8], i: usize) -> Option<(Vec<u32>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some((Vec::new(), i + 1));
    }
    // "1," is the shortest an id can be written.
    let mut out = Vec::with_capacity((b.len() - i) / 2 + 1);
    loop {
        let (v, j) = number(b, i)?;
        out.push(v);
        i = j;
        // The common separators first: "," and ", ".
        match b.get(i) {
            Some(b',') => {
                i += 1;
                if b.get(i) == Some(&b' ') {
                    i += 1;
                }
                i = skip_ws(b, i);
            }
            Some(b']') => return Some((out, i + 1)),
            Some(&c) if is_ws(c) => {
                i = skip_ws(b, i);
                match b.get(i) {
                    Some(b',') => i = skip_ws(b, i + 1),
                    Some(b']') => return Some((out, i + 1)),
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
}

/// A u32 written as JSON writes non-negative integers (no sign, no leading zero, no
/// fraction or exponent) at `b[i..]`, and the index just past its digits. `None` for
/// anything else, including a value over `u32::MAX`.
#[inline(always)]
fn number(b: &[u8], i: usize) -> Option<(u32, usize)> {
    if let Some(w) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        // Per byte, nonzero where the byte is not an ASCII digit. A carry or borrow out
        // of a non-digit byte only reaches the bytes after it, which are not used.
        let hi = 0xF0 * ONES;
        let nondigit =
            ((w & hi) ^ (0x30 * ONES)) | ((w.wrapping_add(0x06 * ONES) & hi) ^ (0x30 * ONES));
        let len = (nondigit.trailing_zeros() / 8) as usize;
        if (1..8).contains(&len) {
            // One branch, rarely taken (`&&` would branch on the length of every id).
            if (len > 1) & (b[i] == b'0') {
                return None;
            }
            return Some((swar_digits(w, len), i + len));
        }
    }
    number_bytewise(b, i)
}

/// The value of the `len` (1 to 7) ASCII digits in the low bytes of `w` (the first digit
/// in the lowest byte, as loaded little-endian); the bytes after them may be anything.
#[inline(always)]
fn swar_digits(w: u64, len: usize) -> u32 {
    // The digits moved to the top of the word so the empty places read as leading
    // zeros; a borrow out of a non-digit byte only reaches the bytes after it, which
    // the shift drops.
    let d = w.wrapping_sub(0x30 * ONES) << (8 * (8 - len));
    let d = (d.wrapping_mul(10) + (d >> 8)) & 0x00FF_00FF_00FF_00FF;
    let d = (d.wrapping_mul(100) + (d >> 16)) & 0x0000_FFFF_0000_FFFF;
    let d = (d.wrapping_mul(10000) + (d >> 32)) & 0xFFFF_FFFF;
    d as u32
}

/// [`number`] one digit at a time: near the end of the body, or 8 digits or more.
#[cold]
#[inline(never)]
fn number_bytewise(b: &[u8], i: usize) -> Option<(u32, usize)> {
    let first = b.get(i)?.wrapping_sub(b'0');
    if first > 9 {
        return None;
    }
    let mut v = u64::from(first);
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        if first == 0 || j - i >= 10 {
            return None;
        }
        v = v * 10 + u64::from(d);
        j += 1;
    }
    Some((u32::try_from(v).ok()?, j))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block reader's paths this CPU runs: the SWAR loop, and AVX2 and AVX-512 if
    /// present.
    fn paths() -> Vec<Option<Simd>> {
        let mut p = vec![None];
        p.extend(simd::Avx2::detect().map(|s| Some(Simd::Avx2(s))));
        p.extend(Avx512::detect().map(|s| Some(Simd::Avx512(s))));
        p
    }

    #[test]
    fn the_vector_readers_read_every_id_length_at_every_place() {
        if paths().len() == 1 {
            eprintln!("no AVX2 or AVX-512 VBMI2 on this CPU: only the SWAR path is tested");
        }
        // Ids of 1 to 10 digits, every length at every offset of a block, with both
        // separators and a `]` at every place: the AVX2 and AVX-512 readers and the SWAR
        // loop against the values written.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..3000 {
            let mut ids = Vec::new();
            let mut text = String::from("[");
            let n = 1 + round % 40;
            for k in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly the lengths the vector path takes, some it leaves to the loop.
                let digits = if x & 7 == 0 { 8 + (x >> 3) % 3 } else { 1 + (x >> 3) % 7 } as u32;
                let lo = if digits == 1 { 0 } else { 10u64.pow(digits - 1) };
                let hi = (10u64.pow(digits) - 1).min(u64::from(u32::MAX));
                let v = (lo + (x >> 8) % (hi - lo + 1)) as u32;
                if k > 0 {
                    text.push_str(if (x >> 40) & 1 == 0 { "," } else { ", " });
                }
                text.push_str(&v.to_string());
                ids.push(v);
            }
            text.push(']');
            let lead = " ".repeat(round % 64);
            let b = format!("{lead}{text}, 7]");
            let want = Some((ids, lead.len() + text.len()));
            for simd in paths() {
                assert_eq!(id_list_blocks(b.as_bytes(), lead.len(), simd), want, "{simd:?} {b}");
            }
        }
    }

    #[test]
    fn numbers_read_as_serde_does() {
        for s in [
            "0",
            "7",
            "10",
            "99",
            "123",
            "4096",
            "65535",
            "100000",
            "1234567",
            "12345678",
            "123456789",
            "4294967295",
        ] {
            for tail in ["]", ",", " ", "]          "] {
                let b = format!("{s}{tail}");
                assert_eq!(number(b.as_bytes(), 0), Some((s.parse().unwrap(), s.len())), "{b:?}");
            }
        }
        for s in ["4294967296", "99999999999", "01", "00", "-1", "x", "", "012345678"] {
            for tail in ["]", "]          "] {
                let b = format!("{s}{tail}");
                assert_eq!(number(b.as_bytes(), 0), None, "{b:?}");
            }
        }
    }

    #[test]
    fn vector_classes_equal_the_bytewise_ones() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2000 {
            let mut block = [0u8; 64];
            for (k, byte) in block.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = if round % 2 == 0 { x as u8 } else { b"0189/:, ]["[x as usize % 10] };
                if round == 0 {
                    *byte = k as u8 * 4;
                }
            }
            assert_eq!(classify(&block), classify_bytes(&block), "{block:?}");
            for simd in paths().into_iter().flatten() {
                assert_eq!(simd.classify(&block), classify_bytes(&block), "{simd:?} {block:?}");
            }
        }
    }

    #[test]
    fn the_block_reader_takes_compact_lists_across_blocks() {
        for n in [1usize, 2, 15, 16, 17, 63, 64, 65, 200] {
            let ids: Vec<u32> =
                (0..n as u32).map(|k| k.wrapping_mul(2_654_435_761) >> (k % 32)).collect();
            for sep in [",", ", "] {
                let s: Vec<String> = ids.iter().map(u32::to_string).collect();
                for lead in 0..3 {
                    let b = format!("{}[{}]x", " ".repeat(lead), s.join(sep));
                    for simd in paths() {
                        assert_eq!(
                            id_list_blocks(b.as_bytes(), lead, simd),
                            Some((ids.clone(), b.len() - 1)),
                            "{b}"
                        );
                    }
                }
                let spaced = format!("[{} ]", s.join(sep));
                for simd in paths() {
                    assert_eq!(id_list_blocks(spaced.as_bytes(), 0, simd), None);
                }
                assert_eq!(id_list(spaced.as_bytes(), 0), Some((ids.clone(), spaced.len())));
            }
        }
        for bad in [
            "[1,,2]", "[1 ,2]", "[1,  2]", "[1, ]", "[1,]", "[1 2]", "[1,2", "[1,-2]", "[1,2.5]",
            "[01]", "[1,\n2]",
        ] {
            for simd in paths() {
                assert_eq!(id_list_blocks(bad.as_bytes(), 0, simd), None, "{bad}");
            }
        }
    }

    #[test]
    fn the_scanner_reads_the_forms_clients_send() {
        let p = scan(br#"{"model": "m", "prompt": [1, 2, 3], "stream": true}"#).unwrap();
        assert_eq!(p, IdPrompt { tokens: vec![1, 2, 3], stream: true, model: Some("m".into()) });
        let p = scan(b"{\"prompt\":[[5,6],[],[7]],\"max_tokens\":{\"a\":[1.5]}}").unwrap();
        assert_eq!(p, IdPrompt { tokens: vec![5, 6], stream: false, model: None });
        let p = scan(b" {\n \"prompt\" :\t[ 1 ,\r\n2 ] , \"messages\": null } ").unwrap();
        assert_eq!(p.tokens, vec![1, 2]);
    }

    #[test]
    fn the_scanner_leaves_the_unusual_to_serde() {
        for b in [
            &br#"{"prompt": [1, -2]}"#[..],
            br#"{"prompt": [1, 2e3]}"#,
            br#"{"prompt": [1.0]}"#,
            br#"{"pr\u006fmpt": [1]}"#,
            br#"{"prompt": [1], "prompt": [2]}"#,
            br#"{"prompt": "text"}"#,
            br#"{"prompt": []}"#,
            br#"{"prompt": [[]]}"#,
            br#"{"prompt": [1], "messages": []}"#,
            br#"[[1, 2]]"#,
            br#"{"prompt": [1]} x"#,
            // Found by the fuzzer: a later prompt of a batch that does not open with `[`.
            br#"{"prompt":[[5,6,70000],[],_7]]}"#,
            br#"{"prompt":[[5],x7]}"#,
        ] {
            assert_eq!(scan(b), None, "{}", String::from_utf8_lossy(b));
        }
        // Only some of those are token-id prompts at all (serde decides).
        assert_eq!(parse(br#"{"pr\u006fmpt": [1]}"#).unwrap().tokens, vec![1]);
        assert_eq!(parse(br#"{"prompt": [1, -2]}"#), None);
        assert_eq!(parse(br#"[[1, 2]]"#), None);
    }
}
