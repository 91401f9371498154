//! kvroute: KV-cache-aware request routing for LLM serving.
//!
//! The crate is pure Rust with no I/O and no threads of its own. Its parts:
//!
//! - [`hash`]: chained block hashing, byte-exact with vLLM's `sha256`, `sha256_cbor`,
//!   `xxhash` and `xxhash_cbor` schemes, plus a fast native XXH3-64 chain.
//! - [`index`]: the prefix index, a path-compressed radix tree over block keys that knows
//!   which workers hold each prefix, and in which tier.
//! - [`events`]: the KV event model and the decoder of vLLM's msgpack `KVEventBatch`.
//! - [`model`]: a model of one vLLM worker's GPU block pool (approximate mode, simulator).
//! - [`score`]: filters, scorers and pickers that turn matches and load into a decision.
//! - [`router`]: the facade that owns all of the above.
//!
//! See `docs/architecture.md` in the repository for how the parts fit together.

pub mod error;
pub mod events;
pub mod hash;
pub mod index;
pub mod model;
pub mod rng;
pub mod router;
pub mod score;
pub mod types;

pub use error::{Error, ErrorKind, Result, ERROR_KINDS};
pub use types::{BlockKey, Tier, WorkerId, WorkerKey};
