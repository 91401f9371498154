//! The native module `kvroute._kvroute` behind the `kvroute` Python package.
//!
//! Thin glue only: every decision, hash and decode is the core crate's. One file per part
//! of the Python API, in the style of huggingface/tokenizers' bindings:
//!
//! - `router`: `Router`, `Decision`, `Candidate`
//! - `hashing`: `hash_blocks`
//! - `events`: `decode_vllm_batch`
//! - `sim`: `simulate` (the simulator behind `kvroute simulate`)
//! - `zmq`: `ZmqSubscriber` (the `kvroute-zmq` subscriber feeding a `Router`)
//! - `errors`: `KvrouteError` and one subclass per core error kind
//! - `convert`: token ids, byte payloads and JSON values between Python and Rust

mod convert;
mod errors;
mod events;
mod hashing;
mod router;
mod sim;
mod zmq;

use pyo3::prelude::*;

/// kvroute's native module. Import `kvroute` instead.
#[pymodule]
fn _kvroute(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<router::PyRouter>()?;
    m.add_class::<router::PyDecision>()?;
    m.add_class::<router::PyCandidate>()?;
    m.add_class::<zmq::PyZmqSubscriber>()?;
    m.add_function(wrap_pyfunction!(hashing::hash_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(events::decode_vllm_batch, m)?)?;
    m.add_function(wrap_pyfunction!(sim::simulate, m)?)?;
    Ok(())
}
