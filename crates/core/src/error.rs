//! The one error type of the crate.
//!
//! Every variant has a stable numeric [`Error::code`] that the C ABI returns and the Python
//! package maps to one exception class. Codes never change meaning; new variants get new
//! codes.

use std::fmt;

/// The result type used throughout kvroute.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kvroute. Bad input gets one of these and leaves state
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration is invalid (unknown scorer, zero block size, bad JSON, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An argument is out of range or malformed (token id too large, empty worker name, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The named worker is not known to the router.
    #[error("unknown worker: {0}")]
    UnknownWorker(String),
    /// A worker with this name and rank is already registered.
    #[error("worker already exists: {0}")]
    WorkerExists(String),
    /// An event announced blocks of a size that differs from the router's block size.
    #[error("block size mismatch: router uses {router} tokens per block, event has {event}")]
    BlockSizeMismatch {
        /// The router's block size.
        router: usize,
        /// The block size the event carried.
        event: usize,
    },
    /// A payload could not be decoded (malformed msgpack, truncated input, wrong types).
    #[error("decode error: {0}")]
    Decode(String),
    /// The xxhash family was selected without an explicit hash seed.
    #[error("missing hash seed: {0}")]
    MissingSeed(String),
    /// A snapshot is malformed, truncated, or of an unsupported version.
    #[error("snapshot error: {0}")]
    Snapshot(String),
    /// Sequence numbers of an event stream skipped ahead.
    #[error("sequence gap: expected {expected}, got {got}")]
    SequenceGap {
        /// The next sequence number that was expected.
        expected: u64,
        /// The sequence number that arrived.
        got: u64,
    },
    /// The engine's block hashes disagree with the router's own computation: routing would
    /// never find a hit. Check the hash algorithm, `PYTHONHASHSEED` and block size.
    #[error("hash mismatch: {0}")]
    HashMismatch(String),
    /// No worker is available to take the request (none registered, or all filtered out).
    #[error("no worker available: {0}")]
    NoWorkers(String),
    /// An I/O or transport error (used by the binding crates, never by the core itself).
    #[error("i/o error: {0}")]
    Io(String),
    /// A bug inside kvroute (for example a panic caught at an FFI boundary).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable numeric code of this error, as returned through the C ABI.
    ///
    /// `0` is reserved for success. These numbers never change meaning.
    pub fn code(&self) -> u32 {
        match self {
            Error::Config(_) => 1,
            Error::InvalidInput(_) => 2,
            Error::UnknownWorker(_) => 3,
            Error::WorkerExists(_) => 4,
            Error::BlockSizeMismatch { .. } => 5,
            Error::Decode(_) => 6,
            Error::MissingSeed(_) => 7,
            Error::Snapshot(_) => 8,
            Error::SequenceGap { .. } => 9,
            Error::HashMismatch(_) => 10,
            Error::NoWorkers(_) => 11,
            Error::Io(_) => 12,
            Error::Internal(_) => 13,
        }
    }

    /// A short, stable name of the error kind (`"config"`, `"decode"`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::InvalidInput(_) => "invalid_input",
            Error::UnknownWorker(_) => "unknown_worker",
            Error::WorkerExists(_) => "worker_exists",
            Error::BlockSizeMismatch { .. } => "block_size_mismatch",
            Error::Decode(_) => "decode",
            Error::MissingSeed(_) => "missing_seed",
            Error::Snapshot(_) => "snapshot",
            Error::SequenceGap { .. } => "sequence_gap",
            Error::HashMismatch(_) => "hash_mismatch",
            Error::NoWorkers(_) => "no_workers",
            Error::Io(_) => "io",
            Error::Internal(_) => "internal",
        }
    }

    /// Builds a [`Error::Decode`] from anything printable.
    pub fn decode(msg: impl fmt::Display) -> Self {
        Error::Decode(msg.to_string())
    }

    /// Builds a [`Error::Config`] from anything printable.
    pub fn config(msg: impl fmt::Display) -> Self {
        Error::Config(msg.to_string())
    }

    /// Builds a [`Error::InvalidInput`] from anything printable.
    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::InvalidInput(msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_nonzero() {
        let all = [
            Error::Config(String::new()),
            Error::InvalidInput(String::new()),
            Error::UnknownWorker(String::new()),
            Error::WorkerExists(String::new()),
            Error::BlockSizeMismatch { router: 16, event: 32 },
            Error::Decode(String::new()),
            Error::MissingSeed(String::new()),
            Error::Snapshot(String::new()),
            Error::SequenceGap { expected: 1, got: 3 },
            Error::HashMismatch(String::new()),
            Error::NoWorkers(String::new()),
            Error::Io(String::new()),
            Error::Internal(String::new()),
        ];
        let mut codes: Vec<u32> = all.iter().map(Error::code).collect();
        assert!(codes.iter().all(|&c| c > 0));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(
            Error::BlockSizeMismatch { router: 16, event: 32 }.to_string(),
            "block size mismatch: router uses 16 tokens per block, event has 32"
        );
    }
}
