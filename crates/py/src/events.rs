//! `kvroute.decode_vllm_batch`: vLLM's msgpack `KVEventBatch` as a dict.

use crate::convert::{extract_bytes, json_to_py};
use crate::errors::OrRaise;
use pyo3::prelude::*;

/// Decodes a vLLM `KVEventBatch` msgpack payload (the third ZeroMQ frame) into the same
/// JSON form as `kvroute events decode`: `{"ts", "dp_rank", "skipped_fields",
/// "skipped_events", "events": [...]}`, each event with `"type"` and all of its fields
/// (None when unset). Integer hashes are ints, bytes hashes and other binary values
/// lowercase hex strings. Malformed payloads raise `DecodeError`.
#[pyfunction]
pub(crate) fn decode_vllm_batch(py: Python<'_>, payload: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let bytes = extract_bytes(payload)?;
    let json = if bytes.len() >= 1 << 16 {
        let owned = bytes.into_owned();
        py.detach(|| {
            kvroute::events::vllm::decode(&owned).map(|b| kvroute::events::vllm::batch_to_json(&b))
        })
    } else {
        kvroute::events::vllm::decode(&bytes).map(|b| kvroute::events::vllm::batch_to_json(&b))
    }
    .or_raise(py)?;
    json_to_py(py, &json)
}
