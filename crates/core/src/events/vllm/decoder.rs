//! The msgpack decoder of vLLM's `KVEventBatch` (see the [parent module](super) for what
//! it accepts).

use super::skip::U32_LEN;
use super::MAX_DEPTH;
use crate::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch, Value};
use crate::{Error, Result};
use rmp::Marker;
use std::fmt;
use std::ops::Range;

/// The `BlockStored` fields in the order of vLLM's class (the legacy array positions after
/// the tag, and the key order of the map form).
const STORED_FIELDS: [&str; 15] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
];

/// How many `BlockStored` fields the array form of vLLM 0.23 and earlier carries.
const LEGACY_STORED_LEN: usize = 11;

/// The `BlockRemoved` fields of the array form of vLLM 0.23 and earlier, in order.
const LEGACY_REMOVED: [&str; 3] = ["block_hashes", "medium", "group_idx"];

/// What the decoder does with the `token_ids` of a `BlockStored`.
///
/// Whatever the choice, every token id is checked exactly as when it is kept (a payload is
/// rejected or accepted alike, with the same error), and counted: a skipped array leaves
/// [`BlockStored::token_ids`] empty and its length in [`BlockStored::tokens_skipped`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenIds {
    /// Decode every event's token ids.
    #[default]
    Keep,
    /// Decode the token ids of events that start a sequence (no `parent_block_hash`, or
    /// `parent_block_hash` after `token_ids` in the map), skip the others: what a router
    /// keyed by the engine's hashes needs to verify them.
    KeepForRoots,
    /// Skip every event's token ids.
    Skip,
}

/// Options of [`decode_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// What to do with `BlockStored.token_ids`.
    pub token_ids: TokenIds,
}

/// Decodes one vLLM `KVEventBatch` payload (the msgpack frame).
///
/// See the [module documentation](super) for what is accepted and skipped.
pub fn decode(payload: &[u8]) -> Result<KvEventBatch> {
    decode_with(payload, DecodeOptions::default())
}

/// [`decode`] with options: the same checks and errors; only what is stored differs.
pub fn decode_with(payload: &[u8], opts: DecodeOptions) -> Result<KvEventBatch> {
    decode_inner(payload, opts, None)
}

/// The engine hashes of a batch decoded by [`decode_flat`]: every event's hashes projected
/// to u64 ([`EngineHash::to_u64`]) in one vector, and each kept event's range of it.
#[derive(Debug, Default)]
pub(crate) struct FlatHashes {
    /// The hashes of all events, in order.
    pub(crate) hashes: Vec<u64>,
    /// `ranges[i]`: the hashes of `events[i]` (empty for `AllBlocksCleared`).
    pub(crate) ranges: Vec<Range<usize>>,
}

/// [`decode_with`] for the router's own apply: the same checks and errors, but the block
/// hashes of `BlockStored` and `BlockRemoved` go to the returned [`FlatHashes`] (their
/// `block_hashes` stay empty), which saves a vector per event and a copy per hash.
pub(crate) fn decode_flat(
    payload: &[u8],
    opts: DecodeOptions,
) -> Result<(KvEventBatch, FlatHashes)> {
    // Sized once for the payload (a block takes at least 9 bytes as a uint64 hash, a
    // stored one 16 more for its token ids), so that a batch's hashes rarely regrow it.
    let mut flat = FlatHashes {
        hashes: Vec::with_capacity(payload.len() / 32),
        ranges: Vec::with_capacity(8),
    };
    let batch = decode_inner(payload, opts, Some(&mut flat))?;
    Ok((batch, flat))
}

fn decode_inner(
    payload: &[u8],
    opts: DecodeOptions,
    flat: Option<&mut FlatHashes>,
) -> Result<KvEventBatch> {
    let mut r =
        Reader { buf: payload, pos: 0, event: None, tokens: opts.token_ids, flat, ev_from: 0 };
    let mut skips = Skips::default();
    let (m, at) = r.marker("batch")?;
    let n = match m {
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => r.len_body(m, "batch")?,
        _ => {
            return Err(r.fail(
                at,
                "batch",
                format_args!(
                    "expected an array [ts, events, data_parallel_rank], found {}",
                    marker_name(m)
                ),
            ))
        }
    };
    r.check_fits(n, at, "batch")?;
    if n < 2 {
        return Err(r.fail(at, "batch", format_args!("array of {n} elements, expected 2 or 3")));
    }
    let ts = r.read_ts("ts")?;
    let (k, at) = r.read_array_len("events")?;
    let _ = at;
    // Every event that is kept takes well over 16 bytes; grow beyond that as needed.
    let mut events = Vec::with_capacity(k.min(r.remaining() / 16));
    for i in 0..k {
        r.event = Some(i);
        r.read_event(&mut events, &mut skips)?;
    }
    r.event = None;
    let data_parallel_rank =
        if n >= 3 && !r.take_nil() { Some(r.read_i64("data_parallel_rank")?) } else { None };
    for _ in 3..n {
        r.skip_value("batch element")?;
        skips.fields = skips.fields.saturating_add(1);
    }
    if r.remaining() > 0 {
        return Err(r.fail(
            r.pos,
            "batch",
            format_args!("{} trailing bytes after the batch", r.remaining()),
        ));
    }
    Ok(KvEventBatch {
        ts,
        events,
        data_parallel_rank,
        skipped_fields: skips.fields,
        skipped_events: skips.events,
    })
}

#[derive(Default)]
struct Skips {
    fields: u32,
    events: u32,
}

impl Skips {
    fn field(&mut self) {
        self.fields = self.fields.saturating_add(1);
    }
}

/// The kinds of event this decoder knows.
#[derive(Clone, Copy)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

impl Kind {
    fn from_tag(tag: &str) -> Option<Kind> {
        match tag {
            "BlockStored" => Some(Kind::Stored),
            "BlockRemoved" => Some(Kind::Removed),
            "AllBlocksCleared" => Some(Kind::Cleared),
            _ => None,
        }
    }
}

/// An event being assembled, with which required fields were seen.
enum Building {
    Stored(Box<BlockStored>, u8),
    Removed(BlockRemoved, bool),
    Cleared,
}

const SEEN_HASHES: u8 = 1;
const SEEN_TOKENS: u8 = 2;
const SEEN_SIZE: u8 = 4;
const SEEN_PARENT: u8 = 8;

fn marker_name(m: Marker) -> &'static str {
    match m {
        Marker::FixPos(_) | Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => "int",
        Marker::FixNeg(_) | Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => "int",
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => "map",
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "array",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "str",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "bin",
        Marker::Null => "nil",
        Marker::True | Marker::False => "bool",
        Marker::F32 | Marker::F64 => "float",
        Marker::FixExt1
        | Marker::FixExt2
        | Marker::FixExt4
        | Marker::FixExt8
        | Marker::FixExt16
        | Marker::Ext8
        | Marker::Ext16
        | Marker::Ext32 => "ext",
        Marker::Reserved => "the reserved byte 0xc1",
    }
}

/// Right shift of the 4 bytes after the marker that gives the value (u8, u16, u32).
const U32_SHIFT: [u8; 256] = {
    let mut t = [0u8; 256];
    t[0xcc] = 24;
    t[0xcd] = 16;
    t
};

/// A cursor over the payload. `event` is the index of the event being read, for messages.
struct Reader<'a, 'f> {
    buf: &'a [u8],
    pos: usize,
    event: Option<usize>,
    tokens: TokenIds,
    /// Where block hashes go in [`decode_flat`] (else into each event).
    flat: Option<&'f mut FlatHashes>,
    /// Where the hashes of the event being read start in `flat`.
    ev_from: usize,
}

impl<'a> Reader<'a, '_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn fail(&self, at: usize, field: &str, msg: impl fmt::Display) -> Error {
        match self.event {
            Some(i) => Error::decode(format_args!("events[{i}].{field}: {msg} at byte {at}")),
            None => Error::decode(format_args!("{field}: {msg} at byte {at}")),
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.fail(
                self.pos,
                field,
                format_args!("truncated: {n} bytes needed, {} left", self.remaining()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize, field: &str) -> Result<u64> {
        Ok(self.take(n, field)?.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn marker(&mut self, field: &str) -> Result<(Marker, usize)> {
        let at = self.pos;
        match self.buf.get(at) {
            Some(&b) => {
                self.pos += 1;
                Ok((Marker::from_u8(b), at))
            }
            None => Err(self.fail(at, field, "truncated: expected a value")),
        }
    }

    /// Consumes a nil if one is next.
    fn take_nil(&mut self) -> bool {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn next_is_str(&self) -> bool {
        matches!(self.buf.get(self.pos), Some(0xa0..=0xbf | 0xd9..=0xdb))
    }

    /// Checks that `n` more values (at least one byte each) can fit in what is left.
    fn check_fits(&self, n: usize, at: usize, field: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.fail(
                at,
                field,
                format_args!("declared {n} elements but only {} bytes are left", self.remaining()),
            ));
        }
        Ok(())
    }

    /// The length that follows a str, bin, array or map marker.
    fn len_body(&mut self, m: Marker, field: &str) -> Result<usize> {
        let n = match m {
            Marker::FixStr(n) | Marker::FixArray(n) | Marker::FixMap(n) => u64::from(n),
            Marker::Str8 | Marker::Bin8 => self.be(1, field)?,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => self.be(2, field)?,
            Marker::Str32 | Marker::Bin32 | Marker::Array32 | Marker::Map32 => self.be(4, field)?,
            _ => 0,
        };
        // At most u32::MAX, which fits in usize on every supported target.
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// The integer that follows an int marker, or `None` if `m` is not an int marker.
    fn int_body(&mut self, m: Marker, field: &str) -> Result<Option<i128>> {
        Ok(Some(match m {
            Marker::FixPos(v) => i128::from(v),
            Marker::FixNeg(v) => i128::from(v),
            Marker::U8 => i128::from(self.be(1, field)?),
            Marker::U16 => i128::from(self.be(2, field)?),
            Marker::U32 => i128::from(self.be(4, field)?),
            Marker::U64 => i128::from(self.be(8, field)?),
            Marker::I8 => i128::from(self.be(1, field)? as u8 as i8),
            Marker::I16 => i128::from(self.be(2, field)? as u16 as i16),
            Marker::I32 => i128::from(self.be(4, field)? as u32 as i32),
            Marker::I64 => i128::from(self.be(8, field)? as i64),
            _ => return Ok(None),
        }))
    }

    fn read_int(&mut self, field: &str) -> Result<(i128, usize)> {
        let (m, at) = self.marker(field)?;
        match self.int_body(m, field)? {
            Some(v) => Ok((v, at)),
            None => {
                Err(self.fail(at, field, format_args!("expected int, found {}", marker_name(m))))
            }
        }
    }

    fn read_u32(&mut self, field: &str) -> Result<u32> {
        let (v, at) = self.read_int(field)?;
        u32::try_from(v)
            .map_err(|_| self.fail(at, field, format_args!("{v} is out of range 0..2^32")))
    }

    fn read_i64(&mut self, field: &str) -> Result<i64> {
        let (v, at) = self.read_int(field)?;
        i64::try_from(v)
            .map_err(|_| self.fail(at, field, format_args!("{v} is out of the i64 range")))
    }

    fn read_opt_i64(&mut self, field: &str) -> Result<Option<i64>> {
        if self.take_nil() {
            Ok(None)
        } else {
            self.read_i64(field).map(Some)
        }
    }

    fn read_ts(&mut self, field: &str) -> Result<f64> {
        let (m, at) = self.marker(field)?;
        match m {
            Marker::F64 => Ok(f64::from_bits(self.be(8, field)?)),
            Marker::F32 => Ok(f64::from(f32::from_bits(self.be(4, field)? as u32))),
            _ => match self.int_body(m, field)? {
                Some(v) => Ok(v as f64),
                None => Err(self.fail(
                    at,
                    field,
                    format_args!("expected float or int, found {}", marker_name(m)),
                )),
            },
        }
    }

    /// Reads an array header; the length is checked against the bytes left.
    fn read_array_len(&mut self, field: &str) -> Result<(usize, usize)> {
        let (m, at) = self.marker(field)?;
        match m {
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_body(m, field)?;
                self.check_fits(n, at, field)?;
                Ok((n, at))
            }
            _ => {
                Err(self.fail(at, field, format_args!("expected array, found {}", marker_name(m))))
            }
        }
    }

    fn read_str(&mut self, field: &str) -> Result<&'a str> {
        let (m, at) = self.marker(field)?;
        match m {
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.len_body(m, field)?;
                let bytes = self.take(n, field)?;
                std::str::from_utf8(bytes).map_err(|_| self.fail(at, field, "invalid UTF-8 in str"))
            }
            _ => Err(self.fail(at, field, format_args!("expected str, found {}", marker_name(m)))),
        }
    }

    fn read_opt_str(&mut self, field: &str) -> Result<Option<String>> {
        if self.take_nil() {
            Ok(None)
        } else {
            self.read_str(field).map(|s| Some(s.to_owned()))
        }
    }

    fn read_hash(&mut self, field: &str) -> Result<EngineHash> {
        let (m, at) = self.marker(field)?;
        match m {
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len_body(m, field)?;
                Ok(EngineHash::Bytes(self.take(n, field)?.to_vec()))
            }
            _ => match self.int_body(m, field)? {
                Some(v) => u64::try_from(v).map(EngineHash::Int).map_err(|_| {
                    self.fail(at, field, format_args!("hash {v} is out of range 0..2^64"))
                }),
                None => Err(self.fail(
                    at,
                    field,
                    format_args!("expected int or bin hash, found {}", marker_name(m)),
                )),
            },
        }
    }

    fn read_hashes(&mut self, field: &str) -> Result<Vec<EngineHash>> {
        let (n, _) = self.read_array_len(field)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            // msgspec writes a 64-bit hash as uint64 (0xcf, 8 bytes big-endian): taken
            // directly; every other encoding (and the errors) goes through `read_hash`.
            if let Some(&[0xcf, b0, b1, b2, b3, b4, b5, b6, b7]) =
                self.buf.get(self.pos..self.pos + 9)
            {
                v.push(EngineHash::Int(u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7])));
                self.pos += 9;
                continue;
            }
            v.push(self.read_hash(field)?);
        }
        Ok(v)
    }

    /// The block hashes of the event being read: into the event (`Vec<EngineHash>`), or,
    /// in [`decode_flat`], projected to u64 at the end of the flat vector from `from` on
    /// (what an earlier `block_hashes` key of the same event left there is dropped, as
    /// the event form keeps the last one). Same checks and errors either way.
    fn read_block_hashes(&mut self, field: &str) -> Result<Vec<EngineHash>> {
        let from = self.ev_from;
        let Some(flat) = self.flat.take() else {
            return self.read_hashes(field);
        };
        let r = self.read_hashes_into(field, &mut flat.hashes, from);
        self.flat = Some(flat);
        r.map(|()| Vec::new())
    }

    fn read_hashes_into(&mut self, field: &str, out: &mut Vec<u64>, from: usize) -> Result<()> {
        out.truncate(from);
        let (n, _) = self.read_array_len(field)?;
        out.reserve(n);
        // msgspec writes 64-bit hashes as uint64 (0xcf + 8 bytes): the leading run of
        // those is read from one bounds-checked slice; whatever follows it (another
        // encoding, the end of the payload) goes element by element below.
        let body = self.buf.get(self.pos..).unwrap_or(&[]);
        let body = &body[..body.len().min(n.saturating_mul(9))];
        let before = out.len();
        for c in body.chunks_exact(9) {
            let &[0xcf, b0, b1, b2, b3, b4, b5, b6, b7] = c else { break };
            out.push(u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
        }
        let fast = out.len() - before;
        self.pos += 9 * fast;
        for _ in fast..n {
            if let Some(&[0xcf, b0, b1, b2, b3, b4, b5, b6, b7]) =
                self.buf.get(self.pos..self.pos + 9)
            {
                out.push(u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
                self.pos += 9;
                continue;
            }
            out.push(self.read_hash(field)?.to_u64());
        }
        Ok(())
    }

    /// Records the range of the event just pushed (in [`decode_flat`]).
    fn flat_push(&mut self) {
        let from = self.ev_from;
        if let Some(f) = self.flat.as_mut() {
            f.ranges.push(from..f.hashes.len());
        }
    }

    /// Checks an array of u32 like [`read_u32_array`](Self::read_u32_array) (same errors)
    /// without storing it; returns its length.
    ///
    /// The encodings msgspec writes (fixint, u8, u16, u32) are stepped over by
    /// [`skip_uints`](super::skip::skip_uints) (SIMD where the CPU has it); anything else
    /// goes through `read_u32`, which checks the element and builds the errors.
    fn skip_u32_array(&mut self, field: &str) -> Result<usize> {
        let (n, _) = self.read_array_len(field)?;
        let mut left = n;
        loop {
            let (pos, done) = super::skip::skip_uints(self.buf, self.pos, left);
            self.pos = pos;
            left -= done;
            if left == 0 {
                return Ok(n);
            }
            self.read_u32(field)?;
            left -= 1;
        }
    }

    fn read_u32_array(&mut self, field: &str) -> Result<Vec<u32>> {
        let (n, _) = self.read_array_len(field)?;
        let mut v = Vec::with_capacity(n);
        // Fast path for the encodings msgspec writes for token ids (fixint, u8, u16,
        // u32), decoded without data-dependent branches: token ids of a real vocabulary mix
        // u16 and u32 encodings at random, which a `match` on the marker mispredicts about
        // every other token. Anything else (signed or u64 markers, the last few bytes,
        // truncation, wrong types) goes through `read_u32`, which also builds the errors.
        let buf = self.buf;
        let mut pos = self.pos;
        for _ in 0..n {
            if let Some(&[b, b1, b2, b3, b4]) = buf.get(pos..pos + 5) {
                let len = U32_LEN[usize::from(b)];
                if len != 0 {
                    let w = u32::from_be_bytes([b1, b2, b3, b4]);
                    let wide = w >> U32_SHIFT[usize::from(b)];
                    v.push(if b < 0x80 { u32::from(b) } else { wide });
                    pos += usize::from(len);
                    continue;
                }
            }
            self.pos = pos;
            v.push(self.read_u32(field)?);
            pos = self.pos;
        }
        self.pos = pos;
        Ok(v)
    }

    /// Reads a generic value; `depth` is the nesting level of this value (1 at the top).
    fn read_value(&mut self, depth: usize, field: &str) -> Result<Value> {
        let (m, at) = self.marker(field)?;
        if let Some(v) = self.int_body(m, field)? {
            return Ok(match u64::try_from(v) {
                Ok(u) => Value::UInt(u),
                // Negative: int markers give at least i64::MIN.
                Err(_) => Value::Int(i64::try_from(v).unwrap_or(i64::MIN)),
            });
        }
        Ok(match m {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::F64 => Value::F64(f64::from_bits(self.be(8, field)?)),
            Marker::F32 => Value::F64(f64::from(f32::from_bits(self.be(4, field)? as u32))),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                self.pos = at;
                Value::Str(self.read_str(field)?.to_owned())
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len_body(m, field)?;
                Value::Bin(self.take(n, field)?.to_vec())
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_body(m, field)?;
                self.check_fits(n, at, field)?;
                self.check_depth(depth, at, field)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.read_value(depth + 1, field)?);
                }
                Value::Array(items)
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.len_body(m, field)?;
                self.check_fits(n.saturating_mul(2), at, field)?;
                self.check_depth(depth, at, field)?;
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.read_value(depth + 1, field)?;
                    let v = self.read_value(depth + 1, field)?;
                    pairs.push((k, v));
                }
                Value::Map(pairs)
            }
            _ => {
                return Err(self.fail(
                    at,
                    field,
                    format_args!("unsupported value: {}", marker_name(m)),
                ))
            }
        })
    }

    fn check_depth(&self, depth: usize, at: usize, field: &str) -> Result<()> {
        if depth >= MAX_DEPTH {
            return Err(self.fail(
                at,
                field,
                format_args!("values nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    /// Skips one value of any type, containers included, without recursion.
    fn skip_value(&mut self, field: &str) -> Result<()> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let (m, at) = self.marker(field)?;
            let skip = match m {
                Marker::Null
                | Marker::True
                | Marker::False
                | Marker::FixPos(_)
                | Marker::FixNeg(_) => 0,
                Marker::U8 | Marker::I8 => 1,
                Marker::U16 | Marker::I16 => 2,
                Marker::U32 | Marker::I32 | Marker::F32 => 4,
                Marker::U64 | Marker::I64 | Marker::F64 => 8,
                Marker::FixExt1 => 2,
                Marker::FixExt2 => 3,
                Marker::FixExt4 => 5,
                Marker::FixExt8 => 9,
                Marker::FixExt16 => 17,
                Marker::Ext8 => 1 + self.be(1, field)? as usize,
                Marker::Ext16 => 1 + self.be(2, field)? as usize,
                Marker::Ext32 => 1 + self.be(4, field)? as usize,
                Marker::FixStr(_)
                | Marker::Str8
                | Marker::Str16
                | Marker::Str32
                | Marker::Bin8
                | Marker::Bin16
                | Marker::Bin32 => self.len_body(m, field)?,
                Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                    pending = pending.saturating_add(self.len_body(m, field)?);
                    self.check_fits(pending, at, field)?;
                    0
                }
                Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                    pending = pending.saturating_add(self.len_body(m, field)?.saturating_mul(2));
                    self.check_fits(pending, at, field)?;
                    0
                }
                Marker::Reserved => {
                    return Err(self.fail(at, field, "the reserved byte 0xc1 is not msgpack"))
                }
            };
            self.take(skip, field)?;
        }
        Ok(())
    }

    /// Reads one event (map or array form); known events are pushed to `out`.
    fn read_event(&mut self, out: &mut Vec<KvEvent>, skips: &mut Skips) -> Result<()> {
        let start = self.pos;
        self.ev_from = self.flat.as_ref().map_or(0, |f| f.hashes.len());
        let (m, at) = self.marker("event")?;
        match m {
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.len_body(m, "event")?;
                self.check_fits(n.saturating_mul(2), at, "event")?;
                self.read_map_event(start, n, out, skips)
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_body(m, "event")?;
                self.check_fits(n, at, "event")?;
                self.read_array_event(at, n, out, skips)
            }
            _ => Err(self.fail(
                at,
                "event",
                format_args!("expected map or array, found {}", marker_name(m)),
            )),
        }
    }

    /// Finds the `"type"` of a map event of `n` entries whose body starts at the cursor, and
    /// rewinds to the body. vLLM puts the type first, so this reads one entry.
    fn find_map_type(&mut self, start: usize, n: usize) -> Result<&'a str> {
        let body = self.pos;
        for _ in 0..n {
            if self.next_is_str() {
                if self.read_str("field name")? == "type" {
                    let tag = self.read_str("type")?;
                    self.pos = body;
                    return Ok(tag);
                }
            } else {
                self.skip_value("field name")?;
            }
            self.skip_value("field")?;
        }
        Err(self.fail(start, "event", "map has no \"type\" key"))
    }

    fn read_map_event(
        &mut self,
        start: usize,
        n: usize,
        out: &mut Vec<KvEvent>,
        skips: &mut Skips,
    ) -> Result<()> {
        let tag = self.find_map_type(start, n)?;
        let Some(kind) = Kind::from_tag(tag) else {
            self.pos = start;
            self.skip_value("event")?;
            skips.events = skips.events.saturating_add(1);
            return Ok(());
        };
        let mut b = Building::new(kind);
        for _ in 0..n {
            if !self.next_is_str() {
                self.skip_value("field name")?;
                self.skip_value("field")?;
                skips.field();
                continue;
            }
            let key = self.read_str("field name")?;
            if key == "type" {
                self.skip_value("type")?;
            } else if !self.read_field(&mut b, key)? {
                self.skip_value(key)?;
                skips.field();
            }
        }
        out.push(self.finish(b, start)?);
        self.flat_push();
        Ok(())
    }

    fn read_array_event(
        &mut self,
        at: usize,
        n: usize,
        out: &mut Vec<KvEvent>,
        skips: &mut Skips,
    ) -> Result<()> {
        if n == 0 {
            return Err(self.fail(at, "event", "empty array, expected a type tag first"));
        }
        let tag = self.read_str("type")?;
        let Some(kind) = Kind::from_tag(tag) else {
            for _ in 1..n {
                self.skip_value("event")?;
            }
            skips.events = skips.events.saturating_add(1);
            return Ok(());
        };
        let names: &[&str] = match kind {
            Kind::Stored => &STORED_FIELDS[..LEGACY_STORED_LEN],
            Kind::Removed => &LEGACY_REMOVED,
            Kind::Cleared => &[],
        };
        let mut b = Building::new(kind);
        for i in 1..n {
            match names.get(i - 1) {
                Some(name) => {
                    self.read_field(&mut b, name)?;
                }
                None => {
                    self.skip_value("extra element")?;
                    skips.field();
                }
            }
        }
        out.push(self.finish(b, at)?);
        self.flat_push();
        Ok(())
    }

    /// Reads the value of field `key` into `b`; `false` if `b` has no such field (the value
    /// is then still unread).
    fn read_field(&mut self, b: &mut Building, key: &str) -> Result<bool> {
        match b {
            Building::Stored(s, seen) => self.read_stored_field(s, seen, key),
            Building::Removed(r, seen) => self.read_removed_field(r, seen, key),
            Building::Cleared => Ok(false),
        }
    }

    fn read_stored_field(&mut self, s: &mut BlockStored, seen: &mut u8, key: &str) -> Result<bool> {
        match key {
            "block_hashes" => {
                s.block_hashes = self.read_block_hashes(key)?;
                *seen |= SEEN_HASHES;
            }
            "parent_block_hash" => {
                s.parent_block_hash =
                    if self.take_nil() { None } else { Some(self.read_hash(key)?) };
                *seen |= SEEN_PARENT;
            }
            "token_ids" => {
                let keep = match self.tokens {
                    TokenIds::Keep => true,
                    TokenIds::KeepForRoots => {
                        *seen & SEEN_PARENT == 0 || s.parent_block_hash.is_none()
                    }
                    TokenIds::Skip => false,
                };
                if keep {
                    s.token_ids = self.read_u32_array(key)?;
                    s.tokens_skipped = 0;
                } else {
                    s.tokens_skipped = self.skip_u32_array(key)?;
                    s.token_ids = Vec::new();
                }
                *seen |= SEEN_TOKENS;
            }
            "block_size" => {
                s.block_size = self.read_u32(key)?;
                *seen |= SEEN_SIZE;
            }
            "lora_id" => s.lora_id = self.read_opt_i64(key)?,
            "medium" => s.medium = self.read_opt_str(key)?,
            "lora_name" => s.lora_name = self.read_opt_str(key)?,
            "extra_keys" => {
                s.extra_keys = if self.take_nil() {
                    None
                } else {
                    let (n, _) = self.read_array_len(key)?;
                    let mut keys = Vec::with_capacity(n);
                    for _ in 0..n {
                        keys.push(if self.take_nil() {
                            None
                        } else {
                            Some(self.read_value(1, key)?)
                        });
                    }
                    Some(keys)
                };
            }
            "group_idx" => s.group_idx = self.read_opt_i64(key)?,
            "kv_cache_spec_kind" => s.kv_cache_spec_kind = self.read_opt_str(key)?,
            "kv_cache_spec_sliding_window" => {
                s.kv_cache_spec_sliding_window = self.read_opt_i64(key)?
            }
            "locality" => s.locality = self.read_opt_str(key)?,
            "ownership" => s.ownership = self.read_opt_str(key)?,
            "session_id" => s.session_id = self.read_opt_str(key)?,
            "lookahead_token_ids" => {
                s.lookahead_token_ids = if self.take_nil() {
                    None
                } else {
                    let (n, _) = self.read_array_len(key)?;
                    let mut rows = Vec::with_capacity(n);
                    for _ in 0..n {
                        rows.push(self.read_u32_array(key)?);
                    }
                    Some(rows)
                };
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn read_removed_field(
        &mut self,
        r: &mut BlockRemoved,
        seen: &mut bool,
        key: &str,
    ) -> Result<bool> {
        match key {
            "block_hashes" => {
                r.block_hashes = self.read_block_hashes(key)?;
                *seen = true;
            }
            "medium" => r.medium = self.read_opt_str(key)?,
            "group_idx" => r.group_idx = self.read_opt_i64(key)?,
            "locality" => r.locality = self.read_opt_str(key)?,
            "ownership" => r.ownership = self.read_opt_str(key)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks the required fields and builds the event.
    fn finish(&self, b: Building, at: usize) -> Result<KvEvent> {
        match b {
            Building::Stored(s, seen) => {
                for (bit, name) in [
                    (SEEN_HASHES, "block_hashes"),
                    (SEEN_TOKENS, "token_ids"),
                    (SEEN_SIZE, "block_size"),
                ] {
                    if seen & bit == 0 {
                        return Err(self.fail(
                            at,
                            "event",
                            format_args!("BlockStored without the required field {name}"),
                        ));
                    }
                }
                Ok(KvEvent::BlockStored(*s))
            }
            Building::Removed(r, seen) => {
                if !seen {
                    return Err(self.fail(
                        at,
                        "event",
                        "BlockRemoved without the required field block_hashes",
                    ));
                }
                Ok(KvEvent::BlockRemoved(r))
            }
            Building::Cleared => Ok(KvEvent::AllBlocksCleared),
        }
    }
}

impl Building {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Stored => Building::Stored(Box::default(), 0),
            Kind::Removed => Building::Removed(BlockRemoved::default(), false),
            Kind::Cleared => Building::Cleared,
        }
    }
}
