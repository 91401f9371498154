//! Chained block hashing: byte-exact with vLLM's prefix-cache hashes, plus a fast native
//! chain for router-only keys.
//!
//! Only full blocks of `block_size` tokens are hashed (a trailing partial block never is,
//! as in vLLM). Each block's hash covers its parent's hash, so a key names a block *and
//! its whole prefix*.
//!
//! # What mirrors what in vLLM (0.33.0, `vllm/v1/core/kv_cache_utils.py`, `vllm/utils/hashing.py`)
//!
//! | kvroute | vLLM |
//! | --- | --- |
//! | [`BlockHasher::block_hashes`] | `get_request_block_hasher` + `hash_block_tokens`: `hash_fn((parent, tuple(tokens), extra_keys))` per full block |
//! | [`BlockHasher::none_hash`] | `init_none_hash`: `hash_fn(PYTHONHASHSEED)` when set, else `hash_fn("vllm-none-hash")` for the sha256 family; the xxhash family draws a random seed per process when unset, so kvroute requires [`HashConfig::hash_seed`] and otherwise fails with [`Error::MissingSeed`] |
//! | [`HashAlgo::Sha256`] | `sha256`: SHA-256 of `pickle.dumps(x, protocol=5)` |
//! | [`HashAlgo::Sha256Cbor`] | `sha256_cbor`: SHA-256 of `cbor2.dumps(x, canonical=True)` |
//! | [`HashAlgo::Xxhash`] | `xxhash`: XXH3-128 (big-endian digest) of the pickle |
//! | [`HashAlgo::XxhashCbor`] | `xxhash_cbor`: XXH3-128 of the canonical CBOR |
//! | [`RequestExtras::hash_extra_keys`] | `generate_block_hash_extra_keys` (LoRA on every block, cache salt on block 0, multimodal items with their offset in the block, negative when the item began in an earlier block, prompt-embeds digests); [`ExtraKeysStyle::V030`] is the untagged form of vLLM 0.30 |
//! | [`RequestExtras::event_extra_keys`] | `to_event_extra_keys`: what `BlockStored.extra_keys` carries |
//! | [`event_hash_u64`] | `maybe_convert_block_hash` with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`: the last 8 bytes of the digest, big-endian |
//!
//! # The pickle caveat
//!
//! The pickle schemes (`sha256`, `xxhash`) are exact only as far as pickle's memo, which is
//! keyed by *object identity*, can be predicted. The writer (hand-written: no crate
//! reproduces CPython's protocol-5 framing and memo) treats vLLM's tag strings (`"mm"`,
//! `"lora"`, ...) as the shared code constants they are, so a second `("mm", ...)` in one
//! block becomes a `BINGET`, and CPython's singletons (empty and one-character latin-1
//! strings, empty and one-byte `bytes`) as one object per value. Any other equal values,
//! for example two multimodal items in one block with the *same* identifier string, are
//! written out twice; vLLM writes them once if they happen to be the same Python object.
//! The CBOR schemes have no such caveat: prefer `sha256_cbor` across languages.
//!
//! # The native scheme
//!
//! [`HashAlgo::Xxh3`] is kvroute's own chain (see `native.rs`): XXH3-64 over each block's
//! little-endian token bytes seeded with [`HashConfig::native_seed`], the block's
//! event-form extra keys folded in through their canonical CBOR, and a SplitMix64 combine
//! with the parent key. [`BlockHasher::native_keys_from`] continues such a chain from any
//! known key, which is how the router hashes the `token_ids` of a `BlockStored` event when
//! it cannot reproduce the engine's own hash; the result equals hashing the whole request.

mod cbor;
mod extras;
mod native;
mod pickle;

pub use extras::{ExtraKey, ExtraKeysStyle, Lora, MmFeature, PromptEmbeds, RequestExtras};

use crate::{Error, Result};
use extras::ExtraKeysCursor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use xxhash_rust::xxh3::xxh3_128;

/// The none-hash seed vLLM uses for the sha256 family when `PYTHONHASHSEED` is unset.
pub const VLLM_NONE_HASH_SEED: &str = "vllm-none-hash";

/// The largest accepted block size.
pub const MAX_BLOCK_SIZE: usize = 65536;

/// A block hashing scheme.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlgo {
    /// vLLM `sha256`: SHA-256 of the protocol-5 pickle (vLLM's default).
    #[serde(rename = "sha256")]
    Sha256,
    /// vLLM `sha256_cbor`: SHA-256 of canonical CBOR.
    #[serde(rename = "sha256_cbor")]
    Sha256Cbor,
    /// vLLM `xxhash`: XXH3-128 of the pickle.
    #[serde(rename = "xxhash")]
    Xxhash,
    /// vLLM `xxhash_cbor`: XXH3-128 of canonical CBOR.
    #[serde(rename = "xxhash_cbor")]
    XxhashCbor,
    /// kvroute's native chained XXH3-64 (never matches an engine's hash).
    #[default]
    #[serde(rename = "xxh3")]
    Xxh3,
}

impl HashAlgo {
    /// All schemes.
    pub const ALL: [HashAlgo; 5] = [
        HashAlgo::Sha256,
        HashAlgo::Sha256Cbor,
        HashAlgo::Xxhash,
        HashAlgo::XxhashCbor,
        HashAlgo::Xxh3,
    ];

    /// True for the schemes that reproduce vLLM's hashes.
    pub fn is_vllm(self) -> bool {
        self != HashAlgo::Xxh3
    }

    /// The name used by vLLM's `--prefix-caching-hash-algo` (and `xxh3` for the native one).
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha256Cbor => "sha256_cbor",
            HashAlgo::Xxhash => "xxhash",
            HashAlgo::XxhashCbor => "xxhash_cbor",
            HashAlgo::Xxh3 => "xxh3",
        }
    }

    fn is_cbor(self) -> bool {
        matches!(self, HashAlgo::Sha256Cbor | HashAlgo::XxhashCbor)
    }

    fn is_xxhash(self) -> bool {
        matches!(self, HashAlgo::Xxhash | HashAlgo::XxhashCbor)
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        HashAlgo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown hash algorithm {s:?} (expected sha256, sha256_cbor, xxhash, xxhash_cbor or xxh3)"
                ))
            })
    }
}

/// How blocks are hashed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HashConfig {
    /// The scheme.
    pub algo: HashAlgo,
    /// Tokens per block (1 to 65536; vLLM's default is 16).
    pub block_size: usize,
    /// The engine's `PYTHONHASHSEED`, if it is set (vLLM schemes only).
    pub hash_seed: Option<String>,
    /// The seed of the native `xxh3` chain.
    pub native_seed: u64,
    /// Which vLLM release's extra-key form to hash (vLLM schemes only).
    pub extra_keys_style: ExtraKeysStyle,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            algo: HashAlgo::Xxh3,
            block_size: 16,
            hash_seed: None,
            native_seed: 0,
            extra_keys_style: ExtraKeysStyle::V033,
        }
    }
}

/// One block's hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash {
    /// The full digest: 32 bytes for the sha256 family, 16 for the xxhash family, and for
    /// `xxh3` the 8 big-endian bytes of the key.
    pub digest: Vec<u8>,
    /// The u64 KV events carry ([`event_hash_u64`] of the digest); the key itself for `xxh3`.
    pub event_hash: u64,
}

/// Lowercase hex of `bytes` (digests in JSON output, the CLI and Python): the one
/// encoder every front end uses.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The u64 vLLM puts in KV events for a block digest: its last 8 bytes, big-endian
/// (fewer bytes are zero-extended on the left).
pub fn event_hash_u64(digest: &[u8]) -> u64 {
    let tail = &digest[digest.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Computes block keys and hashes under one [`HashConfig`]. Immutable, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    cfg: HashConfig,
    none_hash: Vec<u8>,
    native_root: u64,
}

/// A digest on the stack: 32 bytes, of which `len` are used.
#[derive(Copy, Clone)]
struct Dig {
    bytes: [u8; 32],
    len: usize,
}

impl Dig {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl BlockHasher {
    /// A hasher for `cfg`. Fails with [`Error::Config`] for a block size outside
    /// 1..=65536 and with [`Error::MissingSeed`] for the xxhash family without a seed.
    pub fn new(cfg: HashConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.block_size > MAX_BLOCK_SIZE {
            return Err(Error::config(format!(
                "block size {} is out of range (1 to {MAX_BLOCK_SIZE})",
                cfg.block_size
            )));
        }
        let native_root = native::root(cfg.native_seed);
        let none_hash = if cfg.algo.is_vllm() {
            let seed = match (&cfg.hash_seed, cfg.algo.is_xxhash()) {
                (Some(s), _) => s.as_str(),
                (None, false) => VLLM_NONE_HASH_SEED,
                (None, true) => {
                    return Err(Error::MissingSeed(format!(
                        "the {} scheme needs the engine's PYTHONHASHSEED: without it vLLM seeds \
                         its none-hash randomly per process and its hashes cannot be reproduced; \
                         set hash_seed (--hash-seed) to the value the engine runs with",
                        cfg.algo
                    )))
                }
            };
            let mut buf = Vec::new();
            if cfg.algo.is_cbor() {
                cbor::dump_str(&mut buf, seed);
            } else {
                pickle::dump_str(&mut buf, seed);
            }
            digest(cfg.algo, &buf).as_slice().to_vec()
        } else {
            native_root.to_le_bytes().to_vec()
        };
        Ok(BlockHasher { cfg, none_hash, native_root })
    }

    /// The configuration.
    pub fn config(&self) -> &HashConfig {
        &self.cfg
    }

    /// The parent of block 0. For vLLM schemes vLLM's `NONE_HASH`; for `xxh3` the 8
    /// little-endian bytes of the native root key (the parent that `native_keys_from`
    /// uses for `None`).
    pub fn none_hash(&self) -> &[u8] {
        &self.none_hash
    }

    /// The root parent key of the native chain.
    pub fn native_root(&self) -> u64 {
        self.native_root
    }

    /// Keys of every full block: the event u64 projection for vLLM schemes, the native key
    /// for `xxh3`. Clears `out`, then appends one key per full block.
    pub fn block_keys(&self, tokens: &[u32], extras: &RequestExtras, out: &mut Vec<u64>) {
        out.clear();
        if self.cfg.algo.is_vllm() {
            out.reserve(tokens.len() / self.cfg.block_size);
            self.vllm_chain(tokens, extras, |_, _, d| out.push(event_hash_u64(d)));
        } else {
            self.native_request(tokens, extras, out);
        }
    }

    /// Full digests with their event u64, one per full block.
    pub fn block_hashes(&self, tokens: &[u32], extras: &RequestExtras) -> Vec<BlockHash> {
        if self.cfg.algo.is_vllm() {
            let mut v = Vec::with_capacity(tokens.len() / self.cfg.block_size);
            self.vllm_chain(tokens, extras, |_, _, d| {
                v.push(BlockHash { digest: d.to_vec(), event_hash: event_hash_u64(d) })
            });
            v
        } else {
            let mut keys = Vec::new();
            self.native_request(tokens, extras, &mut keys);
            keys.into_iter()
                .map(|k| BlockHash { digest: k.to_be_bytes().to_vec(), event_hash: k })
                .collect()
        }
    }

    /// The bytes hashed for each full block (vLLM schemes). Empty for `xxh3`, whose keys
    /// mix two hashes rather than hashing one pre-image.
    pub fn preimages(&self, tokens: &[u32], extras: &RequestExtras) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        if self.cfg.algo.is_vllm() {
            self.vllm_chain(tokens, extras, |_, p, _| v.push(p.to_vec()));
        }
        v
    }

    /// Native keys continuing the chain from `parent` (`None` = the root) over the full
    /// blocks of `tokens`, with each block's event-form extra keys (`BlockStored.extra_keys`;
    /// the slice may be shorter than the number of blocks, missing entries are `None`).
    /// Uses the native chain whatever [`HashConfig::algo`] is. Clears `out` first.
    ///
    /// For a request hashed with `xxh3`, continuing from the key of block `k - 1` over the
    /// tokens of blocks `k..` gives the same keys as [`BlockHasher::block_keys`] does.
    pub fn native_keys_from(
        &self,
        parent: Option<u64>,
        tokens: &[u32],
        event_extra_keys: &[Option<Vec<ExtraKey>>],
        out: &mut Vec<u64>,
    ) {
        out.clear();
        native::chain(
            self.cfg.native_seed,
            self.cfg.block_size,
            parent.unwrap_or(self.native_root),
            tokens,
            |i| event_extra_keys.get(i).and_then(Option::as_deref).map(Cow::Borrowed),
            out,
        );
    }

    /// The native key of one block from its parent key (`None` = the root), its tokens
    /// (exactly one block's worth is expected; extra tokens are ignored, a short block gives
    /// `None`) and its event-form extra keys.
    pub fn native_block_key(
        &self,
        parent: Option<u64>,
        block_tokens: &[u32],
        event_extra_keys: Option<&[ExtraKey]>,
    ) -> Option<u64> {
        let mut out = Vec::with_capacity(1);
        native::chain(
            self.cfg.native_seed,
            self.cfg.block_size,
            parent.unwrap_or(self.native_root),
            block_tokens.get(..self.cfg.block_size)?,
            |_| event_extra_keys.map(Cow::Borrowed),
            &mut out,
        );
        out.first().copied()
    }

    fn native_request(&self, tokens: &[u32], extras: &RequestExtras, out: &mut Vec<u64>) {
        let bs = self.cfg.block_size;
        let seed = self.cfg.native_seed;
        if extras.is_empty() {
            native::chain_plain(seed, bs, self.native_root, tokens, out);
        } else {
            let mut cur = ExtraKeysCursor::default();
            native::chain(
                seed,
                bs,
                self.native_root,
                tokens,
                |i| {
                    cur.next_block(extras, i * bs, i * bs + bs, ExtraKeysStyle::V030)
                        .map(Cow::Owned)
                },
                out,
            );
        }
    }

    /// Runs vLLM's chain; calls `f(block, preimage, digest)` for each full block.
    fn vllm_chain(
        &self,
        tokens: &[u32],
        extras: &RequestExtras,
        mut f: impl FnMut(usize, &[u8], &[u8]),
    ) {
        let bs = self.cfg.block_size;
        let algo = self.cfg.algo;
        let style = self.cfg.extra_keys_style;
        let mut parent = Dig { bytes: [0; 32], len: self.none_hash.len() };
        parent.bytes[..parent.len].copy_from_slice(&self.none_hash);
        let mut buf = Vec::with_capacity(64 + bs * 5);
        let mut cur = ExtraKeysCursor::default();
        let has_extras = !extras.is_empty();
        for (i, block) in tokens.chunks_exact(bs).enumerate() {
            let ek =
                if has_extras { cur.next_block(extras, i * bs, i * bs + bs, style) } else { None };
            buf.clear();
            if algo.is_cbor() {
                cbor::dump_block(&mut buf, parent.as_slice(), block, ek.as_deref());
            } else {
                pickle::dump_block(
                    &mut buf,
                    parent.as_slice(),
                    block,
                    ek.as_deref(),
                    style == ExtraKeysStyle::V033,
                );
            }
            let d = digest(algo, &buf);
            f(i, &buf, d.as_slice());
            parent = d;
        }
    }
}

/// The digest of a pre-image under a vLLM scheme.
fn digest(algo: HashAlgo, data: &[u8]) -> Dig {
    let mut bytes = [0u8; 32];
    if algo.is_xxhash() {
        bytes[..16].copy_from_slice(&xxh3_128(data).to_be_bytes());
        Dig { bytes, len: 16 }
    } else {
        bytes.copy_from_slice(&Sha256::digest(data));
        Dig { bytes, len: 32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(algo: HashAlgo, seed: u64) -> BlockHasher {
        BlockHasher::new(HashConfig { algo, native_seed: seed, ..Default::default() }).unwrap()
    }

    fn toks(n: u32) -> Vec<u32> {
        let mut r = crate::rng::SplitMix64::new(99);
        (0..n).map(|_| r.below(200_000) as u32).collect()
    }

    #[test]
    fn algo_names_round_trip() {
        for a in HashAlgo::ALL {
            assert_eq!(a.to_string().parse::<HashAlgo>().unwrap(), a);
            let j = serde_json::to_string(&a).unwrap();
            assert_eq!(j, format!("\"{a}\""));
            assert_eq!(serde_json::from_str::<HashAlgo>(&j).unwrap(), a);
        }
        assert!(matches!("md5".parse::<HashAlgo>(), Err(Error::Config(_))));
        assert!(!HashAlgo::Xxh3.is_vllm());
        assert!(HashAlgo::XxhashCbor.is_vllm());
    }

    #[test]
    fn xxhash_family_needs_a_seed() {
        for algo in [HashAlgo::Xxhash, HashAlgo::XxhashCbor] {
            let err = BlockHasher::new(HashConfig { algo, ..Default::default() }).unwrap_err();
            assert!(matches!(err, Error::MissingSeed(_)), "{err}");
            assert!(err.to_string().contains("PYTHONHASHSEED"));
            let ok = BlockHasher::new(HashConfig {
                algo,
                hash_seed: Some("0".into()),
                ..Default::default()
            });
            assert!(ok.is_ok());
        }
        // The sha256 family falls back to vLLM's fixed seed.
        assert!(
            BlockHasher::new(HashConfig { algo: HashAlgo::Sha256, ..Default::default() }).is_ok()
        );
    }

    #[test]
    fn block_size_is_validated() {
        for bs in [0, MAX_BLOCK_SIZE + 1] {
            let r = BlockHasher::new(HashConfig { block_size: bs, ..Default::default() });
            assert!(matches!(r, Err(Error::Config(_))));
        }
        assert!(BlockHasher::new(HashConfig { block_size: MAX_BLOCK_SIZE, ..Default::default() })
            .is_ok());
    }

    #[test]
    fn event_projection_is_last_eight_bytes_big_endian() {
        let d: Vec<u8> = (1..=16).collect();
        assert_eq!(event_hash_u64(&d), 0x090a_0b0c_0d0e_0f10);
        assert_eq!(event_hash_u64(&[1, 2]), 0x0102);
    }

    #[test]
    fn native_partial_block_is_ignored() {
        let h = hasher(HashAlgo::Xxh3, 0);
        let t = toks(100);
        let mut a = Vec::new();
        let mut b = Vec::new();
        h.block_keys(&t, &RequestExtras::default(), &mut a);
        h.block_keys(&t[..96], &RequestExtras::default(), &mut b);
        assert_eq!(a.len(), 6);
        assert_eq!(a, b);
        h.block_keys(&t[..95], &RequestExtras::default(), &mut b);
        assert_eq!(b, a[..5]);
    }

    #[test]
    fn native_keys_are_chained_and_seeded() {
        let t = toks(64);
        let mut a = Vec::new();
        let mut b = Vec::new();
        hasher(HashAlgo::Xxh3, 0).block_keys(&t, &RequestExtras::default(), &mut a);
        hasher(HashAlgo::Xxh3, 1).block_keys(&t, &RequestExtras::default(), &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        // Changing block 0 changes every later key (chaining); block 3 alone only the last.
        let mut t2 = t.clone();
        t2[0] ^= 1;
        hasher(HashAlgo::Xxh3, 0).block_keys(&t2, &RequestExtras::default(), &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        let mut t3 = t.clone();
        t3[63] ^= 1;
        hasher(HashAlgo::Xxh3, 0).block_keys(&t3, &RequestExtras::default(), &mut b);
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        // Same content in a different position gets a different key.
        let rep: Vec<u32> = t[..16].iter().chain(&t[..16]).copied().collect();
        hasher(HashAlgo::Xxh3, 0).block_keys(&rep, &RequestExtras::default(), &mut b);
        assert_ne!(b[0], b[1]);
        // Swapping two blocks changes the key of the pair (the combine is not linear).
        let ab: Vec<u32> = t[..32].to_vec();
        let ba: Vec<u32> = t[16..32].iter().chain(&t[..16]).copied().collect();
        let mut kab = Vec::new();
        let mut kba = Vec::new();
        hasher(HashAlgo::Xxh3, 0).block_keys(&ab, &RequestExtras::default(), &mut kab);
        hasher(HashAlgo::Xxh3, 0).block_keys(&ba, &RequestExtras::default(), &mut kba);
        assert_ne!(kab[1], kba[1]);
    }

    fn rich_extras() -> RequestExtras {
        RequestExtras {
            lora: Some(Lora { name: "sql".into(), path: Some("/a/sql".into()) }),
            cache_salt: Some("tenant".into()),
            mm: vec![MmFeature { identifier: "img".into(), offset: 20, length: 30 }],
            prompt_embeds: None,
        }
    }

    #[test]
    fn native_extras_change_keys() {
        let h = hasher(HashAlgo::Xxh3, 5);
        let t = toks(96);
        let mut plain = Vec::new();
        let mut rich = Vec::new();
        h.block_keys(&t, &RequestExtras::default(), &mut plain);
        h.block_keys(&t, &rich_extras(), &mut rich);
        assert!(plain.iter().zip(&rich).all(|(x, y)| x != y));
        let salt_only = RequestExtras { cache_salt: Some("tenant".into()), ..Default::default() };
        let mut salted = Vec::new();
        h.block_keys(&t, &salt_only, &mut salted);
        // The salt is on block 0 only, but the chain carries it to every block.
        assert!(plain.iter().zip(&salted).all(|(x, y)| x != y));
        let other_salt = RequestExtras { cache_salt: Some("tenant2".into()), ..Default::default() };
        let mut salted2 = Vec::new();
        h.block_keys(&t, &other_salt, &mut salted2);
        assert_ne!(salted[0], salted2[0]);
    }

    #[test]
    fn native_continuation_equals_whole_request() {
        let h = hasher(HashAlgo::Xxh3, 42);
        let t = toks(16 * 7 + 5);
        for extras in [RequestExtras::default(), rich_extras()] {
            let mut whole = Vec::new();
            h.block_keys(&t, &extras, &mut whole);
            assert_eq!(whole.len(), 7);
            let n = whole.len();
            let ev: Vec<Option<Vec<ExtraKey>>> =
                (0..n).map(|b| extras.event_extra_keys(b, 16)).collect();
            let mut out = Vec::new();
            h.native_keys_from(None, &t, &ev, &mut out);
            assert_eq!(out, whole);
            for k in 1..n {
                h.native_keys_from(Some(whole[k - 1]), &t[k * 16..], &ev[k..], &mut out);
                assert_eq!(out, whole[k..], "continuing at block {k}");
                let one = h.native_block_key(
                    Some(whole[k - 1]),
                    &t[k * 16..k * 16 + 16],
                    ev[k].as_deref(),
                );
                assert_eq!(one, Some(whole[k]));
            }
        }
        // Missing extra-key entries mean "none".
        let mut a = Vec::new();
        let mut b = Vec::new();
        h.native_keys_from(None, &t, &[], &mut a);
        h.block_keys(&t, &RequestExtras::default(), &mut b);
        assert_eq!(a, b);
        assert_eq!(h.none_hash(), h.native_root().to_le_bytes());
        assert_eq!(h.native_block_key(None, &t[..15], None), None);
    }

    #[test]
    fn native_chain_works_under_vllm_config_too() {
        // The router hashes event tokens natively whatever scheme it matches requests with.
        let v = BlockHasher::new(HashConfig {
            algo: HashAlgo::Sha256,
            native_seed: 3,
            ..Default::default()
        })
        .unwrap();
        let n = hasher(HashAlgo::Xxh3, 3);
        let t = toks(48);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        v.native_keys_from(None, &t, &[], &mut a);
        n.block_keys(&t, &RequestExtras::default(), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn large_block_sizes_use_the_heap_scratch() {
        let t = toks(300);
        let h = BlockHasher::new(HashConfig { block_size: 100, ..Default::default() }).unwrap();
        let mut a = Vec::new();
        h.block_keys(&t, &RequestExtras::default(), &mut a);
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        h.native_keys_from(Some(a[0]), &t[100..], &[], &mut b);
        assert_eq!(b, a[1..]);
    }

    #[test]
    fn hasher_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<BlockHasher>();
        check::<HashConfig>();
        check::<RequestExtras>();
    }
}
