//! A bounded LRU cache of the token ids of rendered-chat segments already seen, so that a
//! multi-turn chat, which resends its whole history, only tokenizes its new turns.
//!
//! **Why it is exact.** The HF tokenizer first splits the text at its added tokens
//! (`<|im_end|>`, `<|eot_id|>`, ...; leftmost-longest, `tokenizers::AddedVocabulary`), then
//! normalizes, pre-tokenizes and encodes each piece between them on its own. Cutting the
//! rendered text right after an added token therefore cuts between two pieces, and the
//! ids of the whole text are the ids of the segments, each encoded alone, end to end,
//! provided that nothing looks across a piece boundary. [`check_splittable`] refuses the
//! tokenizers where something does:
//! - an added token that strips whitespace beside it (`lstrip`/`rstrip`) or must be a
//!   single word (its match depends on the neighbouring characters);
//! - a Metaspace pre-tokenizer with `prepend_scheme: first` (only the piece at offset 0
//!   gets the prefix, and a segment alone starts at offset 0);
//! - BPE dropout (the ids are random), truncation or padding (they act on the whole
//!   sequence).
//!
//! The cut points are the tokenizer's own: the splits of
//! `AddedVocabulary::extract_and_normalize` (in the `tokenizers` crate), run on the text without a normalizer.
//! Without a normalizer that is exactly the tokenizer's split; with one, only the ends of
//! added tokens matched on the raw text (`normalized: false`) are used, since those are
//! split before anything is normalized. Only encodings without the post-processor's
//! special tokens (`add_special_tokens: false`, the chat default) go through the cache.
//!
//! A segment's ids depend on its text alone, so the cache is keyed by the segment text
//! itself (compared in full on lookup: no hash collision can return wrong ids).

use lru::LruCache;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokenizers::{OffsetReferential, OffsetType};

/// Bytes counted per entry on top of its text and ids (map slot, list links, headers).
const ENTRY_OVERHEAD: usize = 96;

/// Statistics of a [`SegmentCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Segments found in the cache.
    pub hits: u64,
    /// Segments tokenized (and inserted when small enough).
    pub misses: u64,
    /// Entries held.
    pub entries: usize,
    /// Bytes held (texts, ids and per-entry overhead).
    pub bytes: usize,
}

struct Inner {
    lru: LruCache<Box<str>, Arc<[u32]>>,
    bytes: usize,
}

/// The cache: segment text -> token ids, least recently used evicted first, bounded in
/// bytes.
pub struct SegmentCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for SegmentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentCache")
            .field("max_bytes", &self.max_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

fn cost(text: &str, ids: &[u32]) -> usize {
    text.len() + 4 * ids.len() + ENTRY_OVERHEAD
}

impl SegmentCache {
    /// An empty cache holding at most `max_bytes`.
    pub fn new(max_bytes: usize) -> SegmentCache {
        SegmentCache {
            inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0 }),
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Hits, misses, entries and bytes.
    pub fn stats(&self) -> CacheStats {
        let g = self.inner.lock();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: g.lru.len(),
            bytes: g.bytes,
        }
    }

    /// The ids of `text` (`add_special_tokens: false`): cut after every added token, each
    /// segment from the cache or encoded alone. `hf` must have passed
    /// [`check_splittable`].
    pub(crate) fn encode(
        &self,
        hf: &tokenizers::Tokenizer,
        text: &str,
    ) -> tokenizers::Result<Vec<u32>> {
        let cuts = cut_points(hf, text);
        let mut segs: Vec<&str> = Vec::with_capacity(cuts.len() + 1);
        let mut from = 0;
        for c in cuts.into_iter().chain(std::iter::once(text.len())) {
            if c > from {
                segs.push(&text[from..c]);
                from = c;
            }
        }
        let mut found: Vec<Option<Arc<[u32]>>> = {
            let mut g = self.inner.lock();
            segs.iter().map(|s| g.lru.get(*s).cloned()).collect()
        };
        let mut fresh: Vec<(usize, Arc<[u32]>)> = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            if found[i].is_none() {
                let ids: Arc<[u32]> = hf.encode_fast(*s, false)?.get_ids().into();
                fresh.push((i, ids.clone()));
                found[i] = Some(ids);
            }
        }
        let n = segs.len() as u64;
        self.misses.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.hits.fetch_add(n - fresh.len() as u64, Ordering::Relaxed);
        if !fresh.is_empty() {
            let mut g = self.inner.lock();
            for (i, ids) in fresh {
                let c = cost(segs[i], &ids);
                // A segment larger than an eighth of the budget would flush the others.
                if c > self.max_bytes / 8 {
                    continue;
                }
                if let Some(old) = g.lru.put(segs[i].into(), ids) {
                    g.bytes -= cost(segs[i], &old);
                }
                g.bytes += c;
                while g.bytes > self.max_bytes {
                    match g.lru.pop_lru() {
                        Some((k, v)) => g.bytes -= cost(&k, &v),
                        None => break,
                    }
                }
            }
        }
        let total = found.iter().map(|f| f.as_ref().map_or(0, |v| v.len())).sum();
        let mut out = Vec::with_capacity(total);
        for f in found.iter().flatten() {
            out.extend_from_slice(f);
        }
        Ok(out)
    }
}

/// Byte offsets right after each added token of `text` that the tokenizer splits on
/// before normalizing.
pub(crate) fn cut_points(hf: &tokenizers::Tokenizer, text: &str) -> Vec<usize> {
    let added = hf.get_added_vocabulary();
    let decoder = added.get_added_tokens_decoder();
    let raw = hf.get_normalizer().is_none();
    let pre = added.extract_and_normalize::<tokenizers::NormalizerWrapper>(None, text);
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .filter_map(|(_, (_, end), toks)| {
            let toks = toks.as_ref()?;
            let trusted =
                raw || toks.iter().all(|t| decoder.get(&t.id).is_some_and(|a| !a.normalized));
            trusted.then_some(end)
        })
        .collect()
}

/// `Ok` when encoding the segments between added tokens alone and joining them gives the
/// ids of the whole text (see the module docs); else why not.
pub fn check_splittable(hf: &tokenizers::Tokenizer) -> Result<(), String> {
    for t in hf.get_added_vocabulary().get_added_tokens_decoder().values() {
        if t.lstrip || t.rstrip || t.single_word {
            return Err(format!(
                "added token {:?} strips whitespace or must be a single word",
                t.content
            ));
        }
    }
    if let Some(pt) = hf.get_pre_tokenizer() {
        let json = serde_json::to_string(pt).map_err(|e| e.to_string())?;
        if json.contains("\"prepend_scheme\":\"first\"") {
            return Err("the Metaspace pre-tokenizer prepends to the first piece only".into());
        }
    }
    let model = serde_json::to_value(hf.get_model()).map_err(|e| e.to_string())?;
    if model.get("dropout").is_some_and(|d| !d.is_null()) {
        return Err("BPE dropout makes the ids random".into());
    }
    if hf.get_truncation().is_some() || hf.get_padding().is_some() {
        return Err("truncation or padding acts on the whole sequence".into());
    }
    Ok(())
}
