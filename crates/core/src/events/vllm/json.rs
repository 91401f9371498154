//! A JSON view of a decoded batch, with vLLM's field names.

use crate::events::{EngineHash, KvEvent, KvEventBatch, Value};

/// A JSON view of a batch, with vLLM's field names.
///
/// `{"ts": float, "dp_rank": int or null, "skipped_fields": int, "skipped_events": int,
/// "events": [...]}`. Each event has `"type"` and every field of its kind (null when
/// `None`). Integer hashes are JSON numbers, bytes hashes lowercase hex strings. Generic
/// values: bin is a lowercase hex string, a map with only string keys is an object and any
/// other map an array of `[key, value]` pairs, a non-finite float is null.
pub fn batch_to_json(batch: &KvEventBatch) -> serde_json::Value {
    use serde_json::json;
    let events: Vec<serde_json::Value> = batch
        .events
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored(s) => json!({
                "type": "BlockStored",
                "block_hashes": s.block_hashes.iter().map(hash_json).collect::<Vec<_>>(),
                "parent_block_hash": s.parent_block_hash.as_ref().map(hash_json),
                "token_ids": s.token_ids,
                "block_size": s.block_size,
                "lora_id": s.lora_id,
                "medium": s.medium,
                "lora_name": s.lora_name,
                "extra_keys": s.extra_keys.as_ref().map(|keys| keys
                    .iter()
                    .map(|k| k.as_ref().map_or(serde_json::Value::Null, value_json))
                    .collect::<Vec<_>>()),
                "group_idx": s.group_idx,
                "kv_cache_spec_kind": s.kv_cache_spec_kind,
                "kv_cache_spec_sliding_window": s.kv_cache_spec_sliding_window,
                "locality": s.locality,
                "ownership": s.ownership,
                "session_id": s.session_id,
                "lookahead_token_ids": s.lookahead_token_ids,
            }),
            KvEvent::BlockRemoved(r) => json!({
                "type": "BlockRemoved",
                "block_hashes": r.block_hashes.iter().map(hash_json).collect::<Vec<_>>(),
                "medium": r.medium,
                "group_idx": r.group_idx,
                "locality": r.locality,
                "ownership": r.ownership,
            }),
            KvEvent::AllBlocksCleared => json!({ "type": "AllBlocksCleared" }),
        })
        .collect();
    json!({
        "ts": float_json(batch.ts),
        "dp_rank": batch.data_parallel_rank,
        "skipped_fields": batch.skipped_fields,
        "skipped_events": batch.skipped_events,
        "events": events,
    })
}

fn float_json(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn hex_lower(bytes: &[u8]) -> String {
    crate::hash::to_hex(bytes)
}

fn hash_json(h: &EngineHash) -> serde_json::Value {
    match h {
        EngineHash::Int(v) => serde_json::Value::from(*v),
        EngineHash::Bytes(b) => serde_json::Value::String(hex_lower(b)),
    }
}

fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::UInt(u) => J::from(*u),
        Value::F64(f) => float_json(*f),
        Value::Str(s) => J::String(s.clone()),
        Value::Bin(b) => J::String(hex_lower(b)),
        Value::Array(a) => J::Array(a.iter().map(value_json).collect()),
        Value::Map(pairs) => {
            if pairs.iter().all(|(k, _)| matches!(k, Value::Str(_))) {
                let mut obj = serde_json::Map::with_capacity(pairs.len());
                for (k, val) in pairs {
                    if let Value::Str(k) = k {
                        obj.insert(k.clone(), value_json(val));
                    }
                }
                J::Object(obj)
            } else {
                J::Array(
                    pairs
                        .iter()
                        .map(|(k, val)| J::Array(vec![value_json(k), value_json(val)]))
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex_lower(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
