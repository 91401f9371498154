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

/// One kind of [`Error`]: the table that the C ABI's result codes and the Python exception
/// classes are derived from (and checked against), so the three never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorKind {
    /// The stable numeric code ([`Error::code`]); `0` is reserved for success.
    pub code: u32,
    /// The short, stable name ([`Error::kind_name`]): `"config"`, `"decode"`, ...
    pub name: &'static str,
    /// A few words, as the error's message starts (`"invalid configuration"`).
    pub title: &'static str,
    /// One sentence saying when the error happens.
    pub description: &'static str,
}

/// Every error kind, in code order (`ERROR_KINDS[i].code == i + 1`).
pub const ERROR_KINDS: [ErrorKind; 13] = [
    ErrorKind {
        code: 1,
        name: "config",
        title: "invalid configuration",
        description: "A configuration is invalid (unknown scorer, zero block size, bad JSON, ...).",
    },
    ErrorKind {
        code: 2,
        name: "invalid_input",
        title: "invalid input",
        description: "An argument is out of range or malformed (negative token id, id >= 2**32, empty worker name, ...).",
    },
    ErrorKind {
        code: 3,
        name: "unknown_worker",
        title: "unknown worker",
        description: "The named worker is not known to the router.",
    },
    ErrorKind {
        code: 4,
        name: "worker_exists",
        title: "worker already exists",
        description: "A worker with this name and rank is already registered.",
    },
    ErrorKind {
        code: 5,
        name: "block_size_mismatch",
        title: "block size mismatch",
        description: "An event announced blocks of another size than the router's block size.",
    },
    ErrorKind {
        code: 6,
        name: "decode",
        title: "decode error",
        description: "A payload could not be decoded (malformed msgpack, truncated input, wrong types).",
    },
    ErrorKind {
        code: 7,
        name: "missing_seed",
        title: "missing hash seed",
        description: "An xxhash scheme was selected without an explicit hash seed (PYTHONHASHSEED).",
    },
    ErrorKind {
        code: 8,
        name: "snapshot",
        title: "snapshot error",
        description: "A snapshot is malformed, truncated, or of an unsupported version.",
    },
    ErrorKind {
        code: 9,
        name: "sequence_gap",
        title: "sequence gap",
        description: "Sequence numbers of an event stream skipped ahead.",
    },
    ErrorKind {
        code: 10,
        name: "hash_mismatch",
        title: "hash mismatch",
        description: "The engine's block hashes disagree with the router's own (check hash algorithm, PYTHONHASHSEED, block size).",
    },
    ErrorKind {
        code: 11,
        name: "no_workers",
        title: "no worker available",
        description: "No worker is available to take the request (none registered, or all filtered out).",
    },
    ErrorKind {
        code: 12,
        name: "io",
        title: "i/o error",
        description: "An I/O or transport error.",
    },
    ErrorKind {
        code: 13,
        name: "internal",
        title: "internal error",
        description: "A bug inside kvroute.",
    },
];

impl Error {
    /// The kind of this error: its entry of [`ERROR_KINDS`].
    pub fn kind(&self) -> &'static ErrorKind {
        let index = match self {
            Error::Config(_) => 0,
            Error::InvalidInput(_) => 1,
            Error::UnknownWorker(_) => 2,
            Error::WorkerExists(_) => 3,
            Error::BlockSizeMismatch { .. } => 4,
            Error::Decode(_) => 5,
            Error::MissingSeed(_) => 6,
            Error::Snapshot(_) => 7,
            Error::SequenceGap { .. } => 8,
            Error::HashMismatch(_) => 9,
            Error::NoWorkers(_) => 10,
            Error::Io(_) => 11,
            Error::Internal(_) => 12,
        };
        &ERROR_KINDS[index]
    }

    /// The stable numeric code of this error, as returned through the C ABI.
    ///
    /// `0` is reserved for success. These numbers never change meaning.
    pub fn code(&self) -> u32 {
        self.kind().code
    }

    /// A short, stable name of the error kind (`"config"`, `"decode"`, ...).
    pub fn kind_name(&self) -> &'static str {
        self.kind().name
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
        let s = String::new;
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
        // The table covers every variant, in code order, and each title starts its message.
        assert_eq!(ERROR_KINDS.len(), all.len());
        for (i, k) in ERROR_KINDS.iter().enumerate() {
            assert_eq!(k.code as usize, i + 1);
        }
        for e in &all {
            assert!(e.to_string().starts_with(e.kind().title), "{e}");
        }
        // Codes never change meaning (pinned, not derived).
        assert_eq!(Error::Config(s()).code(), 1);
        assert_eq!(Error::HashMismatch(s()).code(), 10);
        assert_eq!(Error::Internal(s()).code(), 13);
        assert_eq!(
            Error::BlockSizeMismatch { router: 16, event: 32 }.to_string(),
            "block size mismatch: router uses 16 tokens per block, event has 32"
        );
    }
}
