//! The router's serde configuration (JSON), shared by the Rust, C and Python front ends.

use super::PredictionConfig;
use crate::error::{Error, Result};
use crate::hash::{ExtraKeysStyle, HashAlgo, HashConfig};
use crate::index::IndexConfig;
use crate::model::CapacitySpec;
use crate::score::ProfileConfig;
use serde::{Deserialize, Serialize};

/// Where the router's picture of each worker's cache comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The index follows the engines' KV events only.
    #[default]
    Precise,
    /// No events: each routed request is run through a model of the chosen worker's block
    /// pool, and the model's stores and evictions feed the index.
    Approximate,
    /// Predictions for a worker until its first events arrive, then its events win.
    Hybrid,
}

/// What to do when the engine's hashes disagree with the router's own computation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnHashMismatch {
    /// Reject the batch with [`Error::HashMismatch`] (state unchanged). The default: a
    /// silent mismatch means zero hits forever.
    #[default]
    Error,
    /// Apply the batch, count the mismatch in the metrics.
    Count,
}

/// One worker in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The worker's name (for vLLM, the pod's `ip:port`).
    pub name: String,
    /// The data-parallel rank.
    #[serde(default)]
    pub dp_rank: u32,
    /// The worker's KV capacity, for approximate and hybrid modes (defaults to the
    /// router's `capacity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacitySpec>,
}

/// The profile: a preset name or a full profile configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProfileSpec {
    /// A preset (`"kvroute"`, the default; `"llm-d"`, `"prefix"`, `"cost"`,
    /// `"session-affinity"`, `"random"`, `"round-robin"`).
    Preset(String),
    /// A full configuration.
    Config(ProfileConfig),
}

impl Default for ProfileSpec {
    fn default() -> Self {
        ProfileSpec::Preset("kvroute".into())
    }
}

impl ProfileSpec {
    /// The profile configuration this names.
    pub fn resolve(&self) -> Result<ProfileConfig> {
        match self {
            ProfileSpec::Preset(name) => ProfileConfig::preset(name),
            ProfileSpec::Config(c) => Ok(c.clone()),
        }
    }
}

/// The router's configuration. Every field has a default; `{}` is a valid configuration
/// (precise mode, native hashing, the `kvroute` profile, no workers yet).
///
/// Build one from JSON ([`RouterConfig::from_json`]) or field by field with
/// [`RouterConfig::builder`]; both validate, with errors that name the field
/// ([`RouterConfig::validate`]). The struct is `#[non_exhaustive]`: new fields can be
/// added without breaking callers, so it cannot be written as a struct literal outside
/// this crate.
///
/// ```
/// use kvroute::router::{Mode, RouterConfig};
/// let cfg = RouterConfig::builder()
///     .mode(Mode::Hybrid)
///     .session_ttl_s(600)
///     .worker("pod-a:8000")
///     .build()
///     .unwrap();
/// assert_eq!(cfg.session_ttl_s, 600);
/// let err = RouterConfig::builder().session_ttl_s(1 << 63).build().unwrap_err();
/// assert!(err.to_string().contains("session_ttl_s"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Tokens per block (vLLM's `--block-size`, 16 by default).
    pub block_size: usize,
    /// The hash scheme: `xxh3` (kvroute's own, fast; events are re-keyed from their
    /// tokens) or a vLLM scheme (`sha256`, `sha256_cbor`, `xxhash`, `xxhash_cbor`) to key
    /// blocks by the engine's own hashes.
    pub hash_algo: HashAlgo,
    /// The engines' `PYTHONHASHSEED`, for vLLM schemes.
    pub hash_seed: Option<String>,
    /// Which vLLM release's extra-key form to hash (vLLM schemes).
    pub extra_keys_style: ExtraKeysStyle,
    /// Seed of the native hash chain.
    pub native_seed: u64,
    /// Precise, approximate or hybrid.
    pub mode: Mode,
    /// The scoring profile.
    pub profile: ProfileSpec,
    /// The workers known at start.
    pub workers: Vec<WorkerConfig>,
    /// Default capacity of workers for the cache model (approximate and hybrid modes).
    pub capacity: CapacitySpec,
    /// Index options (holder-block cap).
    pub index: IndexConfig,
    /// Session-affinity time to live, in seconds (Kubernetes' ClientIP default: 10,800 s;
    /// kvroute's default 2 hours).
    pub session_ttl_s: u64,
    /// Maximum number of session keys remembered.
    pub session_capacity: usize,
    /// Seed of the router's random choices (tie-breaks, softmax, random scorer).
    pub seed: u64,
    /// Largest valid token id plus one (the vocabulary size), if known: larger ids are
    /// rejected with [`Error::InvalidInput`].
    pub vocab_size: Option<u32>,
    /// Check, for events whose blocks start a sequence, that the engine's hashes equal the
    /// router's (vLLM schemes only).
    pub verify_engine_hashes: bool,
    /// What a failed check does.
    pub on_hash_mismatch: OnHashMismatch,
    /// Add a worker automatically when events arrive for an unknown one (otherwise such a
    /// batch is rejected with [`Error::UnknownWorker`]).
    pub auto_add_workers: bool,
    /// Predicted residency between routing and events (precise mode).
    pub predictions: PredictionConfig,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            block_size: 16,
            hash_algo: HashAlgo::Xxh3,
            hash_seed: None,
            extra_keys_style: ExtraKeysStyle::V033,
            native_seed: 0,
            mode: Mode::Precise,
            profile: ProfileSpec::default(),
            workers: Vec::new(),
            capacity: CapacitySpec::preset("llama-3-8b", "h100-80gb", 1),
            index: IndexConfig::default(),
            session_ttl_s: 2 * 3600,
            session_capacity: 1 << 20,
            seed: 0,
            vocab_size: None,
            verify_engine_hashes: true,
            on_hash_mismatch: OnHashMismatch::Error,
            auto_add_workers: false,
            predictions: PredictionConfig::default(),
        }
    }
}

impl RouterConfig {
    /// Parses a configuration from JSON and [validates](Self::validate) it; unknown fields
    /// and out-of-range values are errors that name the field.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: RouterConfig =
            serde_json::from_str(json).map_err(|e| Error::config(format!("router config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("router config serializes")
    }

    /// The hash configuration derived from this one.
    pub fn hash_config(&self) -> HashConfig {
        HashConfig {
            algo: self.hash_algo,
            block_size: self.block_size,
            hash_seed: self.hash_seed.clone(),
            native_seed: self.native_seed,
            extra_keys_style: self.extra_keys_style,
        }
    }
}

/// The longest session TTL in seconds: its milliseconds must fit a `u64`.
pub const MAX_SESSION_TTL_S: u64 = u64::MAX / 1000;

impl RouterConfig {
    /// A builder starting from the defaults; [`RouterConfigBuilder::build`] validates.
    pub fn builder() -> RouterConfigBuilder {
        RouterConfigBuilder { cfg: RouterConfig::default() }
    }

    /// Checks every value's range and the parts that must resolve (profile, capacities),
    /// with an [`Error::Config`] that names the field (for example
    /// `session_ttl_s = 9223372036854775808 is out of range`). [`Router::new`](crate::router::Router::new)
    /// (crate::router::Router::new) calls it too, so a configuration changed after it was
    /// built is still checked.
    pub fn validate(&self) -> Result<()> {
        fn range<T: std::fmt::Display + PartialOrd>(field: &str, v: T, lo: T, hi: T) -> Result<()> {
            if v < lo || v > hi {
                return Err(Error::config(format!(
                    "router config: {field} = {v} is out of range ({lo} to {hi})"
                )));
            }
            Ok(())
        }
        range("block_size", self.block_size, 1, crate::hash::MAX_BLOCK_SIZE)?;
        range("session_ttl_s", self.session_ttl_s, 1, MAX_SESSION_TTL_S)?;
        range("session_capacity", self.session_capacity, 1, u32::MAX as usize - 1)?;
        if let Some(v) = self.vocab_size {
            range("vocab_size", v, 1, u32::MAX)?;
        }
        if let Some(v) = self.index.max_holder_blocks {
            range("index.max_holder_blocks", v, 1, u64::MAX)?;
        }
        let named = |field: String| {
            move |e: Error| match e {
                Error::Config(m) => Error::config(format!("router config: {field}: {m}")),
                other => other,
            }
        };
        self.profile
            .resolve()
            .and_then(|p| p.build().map(drop))
            .map_err(named("profile".into()))?;
        for (i, w) in self.workers.iter().enumerate() {
            if w.name.is_empty() {
                return Err(Error::config(format!(
                    "router config: workers[{i}].name must not be empty"
                )));
            }
        }
        if self.mode != Mode::Precise {
            self.capacity.num_gpu_blocks(self.block_size).map_err(named("capacity".into()))?;
            for (i, w) in self.workers.iter().enumerate() {
                if let Some(c) = &w.capacity {
                    c.num_gpu_blocks(self.block_size)
                        .map_err(named(format!("workers[{i}].capacity")))?;
                }
            }
        }
        Ok(())
    }
}

/// Builds a [`RouterConfig`] field by field (`RouterConfig::builder().mode(..).build()`),
/// starting from the defaults; [`build`](Self::build) validates.
#[derive(Clone, Debug)]
pub struct RouterConfigBuilder {
    cfg: RouterConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, value: $ty) -> Self {
                self.cfg.$field = value;
                self
            }
        )*
    };
}

impl RouterConfigBuilder {
    setters! {
        /// Sets [`RouterConfig::block_size`].
        block_size: usize;
        /// Sets [`RouterConfig::hash_algo`].
        hash_algo: HashAlgo;
        /// Sets [`RouterConfig::hash_seed`].
        hash_seed: Option<String>;
        /// Sets [`RouterConfig::extra_keys_style`].
        extra_keys_style: ExtraKeysStyle;
        /// Sets [`RouterConfig::native_seed`].
        native_seed: u64;
        /// Sets [`RouterConfig::mode`].
        mode: Mode;
        /// Sets [`RouterConfig::profile`].
        profile: ProfileSpec;
        /// Sets [`RouterConfig::workers`] (replacing any added so far).
        workers: Vec<WorkerConfig>;
        /// Sets [`RouterConfig::capacity`].
        capacity: CapacitySpec;
        /// Sets [`RouterConfig::index`].
        index: IndexConfig;
        /// Sets [`RouterConfig::session_ttl_s`].
        session_ttl_s: u64;
        /// Sets [`RouterConfig::session_capacity`].
        session_capacity: usize;
        /// Sets [`RouterConfig::seed`].
        seed: u64;
        /// Sets [`RouterConfig::vocab_size`].
        vocab_size: Option<u32>;
        /// Sets [`RouterConfig::verify_engine_hashes`].
        verify_engine_hashes: bool;
        /// Sets [`RouterConfig::on_hash_mismatch`].
        on_hash_mismatch: OnHashMismatch;
        /// Sets [`RouterConfig::auto_add_workers`].
        auto_add_workers: bool;
    }

    /// Sets the profile to a preset by name (`"llm-d"`, `"prefix"`, ...).
    pub fn preset(self, name: &str) -> Self {
        self.profile(ProfileSpec::Preset(name.to_string()))
    }

    /// Adds a worker at data-parallel rank 0 with the default capacity.
    pub fn worker(mut self, name: &str) -> Self {
        self.cfg.workers.push(WorkerConfig { name: name.to_string(), dp_rank: 0, capacity: None });
        self
    }

    /// The configuration, once [validated](RouterConfig::validate).
    pub fn build(self) -> Result<RouterConfig> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }
}
