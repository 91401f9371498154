//! The msgpack encoder: writes a batch as vLLM 0.33's msgspec does.

use crate::events::{BlockRemoved, BlockStored, EngineHash, KvEvent, KvEventBatch, Value};
use rmp::encode::{ByteBuf, ValueWriteError};
use std::convert::Infallible;

/// Encodes a batch as vLLM 0.33 does (msgspec, map-form events).
///
/// The batch is always a 3-element array (a missing rank is nil), `ts` a float64, integers
/// in their shortest form. Each event is a map whose first key is `"type"`, then the fields
/// in vLLM's order; optional fields that are `None` are left out, except `BlockStored`'s
/// `parent_block_hash`, `lora_id`, `medium` and `lora_name` and `BlockRemoved`'s `medium`,
/// which vLLM always sends (nil when `None`). A `BlockStored` map always has a map16 header,
/// as msgspec writes it for a struct of more than 15 fields. Token ids skipped at decoding
/// ([`BlockStored::tokens_skipped`]) are not there to write: such an event encodes with the
/// `token_ids` it holds (none).
pub fn encode(batch: &KvEventBatch) -> Vec<u8> {
    let mut w = Writer(ByteBuf::with_capacity(64 + 128 * batch.events.len()));
    w.array_len(3);
    Writer::ok(rmp::encode::write_f64(&mut w.0, batch.ts));
    w.array_len(batch.events.len());
    for e in &batch.events {
        w.event(e);
    }
    match batch.data_parallel_rank {
        Some(r) => w.int(r),
        None => w.nil(),
    }
    w.0.into_vec()
}

/// A msgpack writer over rmp's `ByteBuf`, whose writes cannot fail.
struct Writer(ByteBuf);

impl Writer {
    /// Discards the result of a write to `ByteBuf`; its error type is uninhabited.
    fn ok<T>(r: Result<T, ValueWriteError<Infallible>>) {
        if let Err(ValueWriteError::InvalidMarkerWrite(e) | ValueWriteError::InvalidDataWrite(e)) =
            r
        {
            match e {}
        }
    }

    fn nil(&mut self) {
        self.0.as_mut_vec().push(0xc0);
    }

    fn array_len(&mut self, n: usize) {
        let r = rmp::encode::write_array_len(&mut self.0, n as u32);
        Self::ok(r);
    }

    fn uint(&mut self, v: u64) {
        let r = rmp::encode::write_uint(&mut self.0, v);
        Self::ok(r);
    }

    fn int(&mut self, v: i64) {
        let r = rmp::encode::write_sint(&mut self.0, v);
        Self::ok(r);
    }

    fn str(&mut self, s: &str) {
        let r = rmp::encode::write_str(&mut self.0, s);
        Self::ok(r);
    }

    fn bin(&mut self, b: &[u8]) {
        let r = rmp::encode::write_bin(&mut self.0, b);
        Self::ok(r);
    }

    fn hash(&mut self, h: &EngineHash) {
        match h {
            EngineHash::Int(v) => self.uint(*v),
            EngineHash::Bytes(b) => self.bin(b),
        }
    }

    fn hashes(&mut self, hs: &[EngineHash]) {
        self.array_len(hs.len());
        for h in hs {
            self.hash(h);
        }
    }

    fn u32s(&mut self, v: &[u32]) {
        self.array_len(v.len());
        for &t in v {
            self.uint(u64::from(t));
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.nil(),
        }
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.int(v),
            None => self.nil(),
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Nil => self.nil(),
            Value::Bool(b) => self.0.as_mut_vec().push(if *b { 0xc3 } else { 0xc2 }),
            Value::Int(i) => self.int(*i),
            Value::UInt(u) => self.uint(*u),
            Value::F64(f) => {
                let r = rmp::encode::write_f64(&mut self.0, *f);
                Self::ok(r);
            }
            Value::Str(s) => self.str(s),
            Value::Bin(b) => self.bin(b),
            Value::Array(items) => {
                self.array_len(items.len());
                for it in items {
                    self.value(it);
                }
            }
            Value::Map(pairs) => {
                let r = rmp::encode::write_map_len(&mut self.0, pairs.len() as u32);
                Self::ok(r);
                for (k, val) in pairs {
                    self.value(k);
                    self.value(val);
                }
            }
        }
    }

    fn event(&mut self, e: &KvEvent) {
        match e {
            KvEvent::BlockStored(s) => self.stored(s),
            KvEvent::BlockRemoved(r) => self.removed(r),
            KvEvent::AllBlocksCleared => {
                self.0.as_mut_vec().push(0x81);
                self.str("type");
                self.str("AllBlocksCleared");
            }
        }
    }

    fn stored(&mut self, s: &BlockStored) {
        let optional = [
            s.extra_keys.is_some(),
            s.group_idx.is_some(),
            s.kv_cache_spec_kind.is_some(),
            s.kv_cache_spec_sliding_window.is_some(),
            s.locality.is_some(),
            s.ownership.is_some(),
            s.session_id.is_some(),
            s.lookahead_token_ids.is_some(),
        ];
        // "type" and the 7 always-present fields, then the optional ones that are set.
        let n = 8 + optional.iter().filter(|&&x| x).count() as u16;
        // msgspec sizes a struct's map header by its field count (16 with the tag): map16.
        let [hi, lo] = n.to_be_bytes();
        self.0.as_mut_vec().extend_from_slice(&[0xde, hi, lo]);
        self.str("type");
        self.str("BlockStored");
        self.str("block_hashes");
        self.hashes(&s.block_hashes);
        self.str("parent_block_hash");
        match &s.parent_block_hash {
            Some(h) => self.hash(h),
            None => self.nil(),
        }
        self.str("token_ids");
        self.u32s(&s.token_ids);
        self.str("block_size");
        self.uint(u64::from(s.block_size));
        self.str("lora_id");
        self.opt_int(s.lora_id);
        self.str("medium");
        self.opt_str(s.medium.as_deref());
        self.str("lora_name");
        self.opt_str(s.lora_name.as_deref());
        if let Some(keys) = &s.extra_keys {
            self.str("extra_keys");
            self.array_len(keys.len());
            for k in keys {
                match k {
                    Some(v) => self.value(v),
                    None => self.nil(),
                }
            }
        }
        if let Some(g) = s.group_idx {
            self.str("group_idx");
            self.int(g);
        }
        if let Some(k) = &s.kv_cache_spec_kind {
            self.str("kv_cache_spec_kind");
            self.str(k);
        }
        if let Some(w) = s.kv_cache_spec_sliding_window {
            self.str("kv_cache_spec_sliding_window");
            self.int(w);
        }
        for (name, v) in
            [("locality", &s.locality), ("ownership", &s.ownership), ("session_id", &s.session_id)]
        {
            if let Some(v) = v {
                self.str(name);
                self.str(v);
            }
        }
        if let Some(rows) = &s.lookahead_token_ids {
            self.str("lookahead_token_ids");
            self.array_len(rows.len());
            for row in rows {
                self.u32s(row);
            }
        }
    }

    fn removed(&mut self, r: &BlockRemoved) {
        let n = 3
            + u8::from(r.group_idx.is_some())
            + u8::from(r.locality.is_some())
            + u8::from(r.ownership.is_some());
        self.0.as_mut_vec().push(0x80 | n);
        self.str("type");
        self.str("BlockRemoved");
        self.str("block_hashes");
        self.hashes(&r.block_hashes);
        self.str("medium");
        self.opt_str(r.medium.as_deref());
        if let Some(g) = r.group_idx {
            self.str("group_idx");
            self.int(g);
        }
        for (name, v) in [("locality", &r.locality), ("ownership", &r.ownership)] {
            if let Some(v) = v {
                self.str(name);
                self.str(v);
            }
        }
    }
}
