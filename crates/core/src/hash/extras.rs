//! Extra keys: the per-block values besides the tokens that make two blocks different
//! (LoRA adapter, cache salt, multimodal items, prompt embeddings).
//!
//! Mirrors `vllm/v1/core/kv_cache_utils.py`: `generate_block_hash_extra_keys` and its
//! helpers `_gen_lora_extra_hash_keys`, `_gen_mm_extra_hash_keys` (including its cursor
//! over the sorted multimodal items) and `_gen_prompt_embeds_extra_hash_keys`, in vLLM 0.33
//! (tagged) and 0.30 (untagged) form, and `to_event_extra_keys` (the form in
//! `BlockStored.extra_keys`, which is the untagged 0.30 form).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How extra keys are built for hashing.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtraKeysStyle {
    /// vLLM 0.33 and later: tagged tuples `("lora", name, path)`, `("mm", id, offset)`,
    /// `("cache_salt", salt)`, `("prompt_embeds", digest)`.
    #[default]
    V033,
    /// vLLM up to 0.30: the bare LoRA name, `(id, offset)` pairs, the bare salt and the bare
    /// embeddings digest.
    V030,
}

/// A Python value inside extra keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExtraKey {
    /// A Python `str`.
    Str(String),
    /// A Python `int`.
    Int(i64),
    /// A Python `bytes`.
    Bytes(Vec<u8>),
    /// A Python `tuple`.
    Tuple(Vec<ExtraKey>),
}

/// The LoRA adapter of a request (vLLM's `LoRARequest`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lora {
    /// `lora_name`.
    pub name: String,
    /// `lora_path`; `None` hashes as `""`, the default of `LoRARequest.lora_path`.
    #[serde(default)]
    pub path: Option<String>,
}

/// One multimodal item: its content identifier and its placeholder range in the tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MmFeature {
    /// `mm_feature.identifier` (the content hash vLLM computed for the item).
    pub identifier: String,
    /// `mm_position.offset`: the index of the item's first placeholder token.
    pub offset: usize,
    /// `mm_position.length`: the number of placeholder tokens.
    pub length: usize,
}

/// Prompt embeddings: row-major `f32` rows, one per token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptEmbeds {
    /// Values per row (the hidden size).
    pub dim: usize,
    /// `num_tokens * dim` values, row-major.
    pub data: Vec<f32>,
}

impl PromptEmbeds {
    /// Embeddings of `data.len() / dim` rows; `dim` must be positive and divide the length.
    pub fn new(dim: usize, data: Vec<f32>) -> crate::Result<Self> {
        if dim == 0 || data.len() % dim != 0 {
            return Err(crate::Error::invalid(format!(
                "prompt embeddings of {} values do not form rows of {dim}",
                data.len()
            )));
        }
        Ok(PromptEmbeds { dim, data })
    }

    /// `sha256(tensor_data(prompt_embeds[start:end]))`: the digest of the raw
    /// little-endian bytes of rows `start..end` (clamped to the rows there are).
    pub fn rows_digest(&self, start: usize, end: usize) -> [u8; 32] {
        let len = self.data.len();
        let a = start.saturating_mul(self.dim).min(len);
        let b = end.saturating_mul(self.dim).min(len).max(a);
        let mut h = Sha256::new();
        for v in &self.data[a..b] {
            h.update(v.to_le_bytes());
        }
        h.finalize().into()
    }
}

/// Everything besides token ids that vLLM folds into block hashes. `Default` is none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestExtras {
    /// The LoRA adapter, on every block.
    #[serde(default)]
    pub lora: Option<Lora>,
    /// The cache salt, on block 0 only (an empty salt counts as none, as in vLLM).
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// Multimodal items, sorted by offset.
    #[serde(default)]
    pub mm: Vec<MmFeature>,
    /// Prompt embeddings, when the prompt came as embeddings.
    #[serde(default)]
    pub prompt_embeds: Option<PromptEmbeds>,
}

/// The tag constants of vLLM 0.33's extra keys.
pub(crate) const TAG_LORA: &str = "lora";
pub(crate) const TAG_MM: &str = "mm";
pub(crate) const TAG_SALT: &str = "cache_salt";
pub(crate) const TAG_EMBEDS: &str = "prompt_embeds";

/// The sequential state of `generate_block_hash_extra_keys` over a request's blocks: the
/// multimodal cursor (`start_mm_idx`). Blocks must be fed in order from block 0.
#[derive(Default)]
pub(crate) struct ExtraKeysCursor {
    mm_idx: usize,
}

impl ExtraKeysCursor {
    /// The extra keys of the block `[start, end)` (elements of the extra-keys tuple), or
    /// `None` when there are none.
    pub(crate) fn next_block(
        &mut self,
        ex: &RequestExtras,
        start: usize,
        end: usize,
        style: ExtraKeysStyle,
    ) -> Option<Vec<ExtraKey>> {
        let tagged = style == ExtraKeysStyle::V033;
        let mut keys = Vec::new();
        if let Some(l) = &ex.lora {
            let name = ExtraKey::Str(l.name.clone());
            keys.push(if tagged {
                ExtraKey::Tuple(vec![
                    ExtraKey::Str(TAG_LORA.into()),
                    name,
                    ExtraKey::Str(l.path.clone().unwrap_or_default()),
                ])
            } else {
                name
            });
        }
        self.mm_keys(ex, start, end, tagged, &mut keys);
        if let Some(salt) = ex.cache_salt.as_deref().filter(|s| !s.is_empty()) {
            if start == 0 {
                let s = ExtraKey::Str(salt.to_owned());
                keys.push(if tagged {
                    ExtraKey::Tuple(vec![ExtraKey::Str(TAG_SALT.into()), s])
                } else {
                    s
                });
            }
        }
        if let Some(pe) = &ex.prompt_embeds {
            let d = ExtraKey::Bytes(pe.rows_digest(start, end).to_vec());
            keys.push(if tagged {
                ExtraKey::Tuple(vec![ExtraKey::Str(TAG_EMBEDS.into()), d])
            } else {
                d
            });
        }
        (!keys.is_empty()).then_some(keys)
    }

    /// `_gen_mm_extra_hash_keys`, step for step.
    fn mm_keys(
        &mut self,
        ex: &RequestExtras,
        start: usize,
        end: usize,
        tagged: bool,
        keys: &mut Vec<ExtraKey>,
    ) {
        let Some(last) = ex.mm.last() else {
            return;
        };
        if last.offset.saturating_add(last.length) < start {
            return;
        }
        while let Some(f) = ex.mm.get(self.mm_idx) {
            let item_end = f.offset.saturating_add(f.length);
            if end <= f.offset {
                // This block has not reached the current item.
                break;
            }
            if start > item_end {
                // This block has passed the current item.
                self.mm_idx += 1;
                continue;
            }
            let off = f.offset as i64 - start as i64;
            let id = ExtraKey::Str(f.identifier.clone());
            keys.push(if tagged {
                ExtraKey::Tuple(vec![ExtraKey::Str(TAG_MM.into()), id, ExtraKey::Int(off)])
            } else {
                ExtraKey::Tuple(vec![id, ExtraKey::Int(off)])
            });
            if end >= item_end {
                // The block holds the end of this item and may hold the next one.
                self.mm_idx += 1;
            } else {
                break;
            }
        }
    }
}

impl RequestExtras {
    /// The extras of a request with LoRA adapter `name` (and its `path`, which vLLM 0.33
    /// folds into the hash; `None` hashes as `""`) and nothing else.
    pub fn with_lora(name: &str, path: Option<&str>) -> Self {
        RequestExtras {
            lora: Some(Lora { name: name.to_string(), path: path.map(str::to_string) }),
            ..RequestExtras::default()
        }
    }

    /// The extras of a request given the way the C ABI, the Python module and the CLI
    /// take them: an optional LoRA adapter name, its optional path and an optional cache
    /// salt. `None` when none is set (the request has no extras). A path without a name
    /// is an [`Error::InvalidInput`](crate::Error::InvalidInput).
    pub fn from_lora_and_salt(
        lora_name: Option<&str>,
        lora_path: Option<&str>,
        cache_salt: Option<&str>,
    ) -> crate::Result<Option<Self>> {
        let mut ex = match (lora_name, lora_path) {
            (Some(name), path) => RequestExtras::with_lora(name, path),
            (None, Some(_)) => {
                return Err(crate::Error::invalid("a LoRA path was given without a LoRA name"))
            }
            (None, None) if cache_salt.is_none() => return Ok(None),
            (None, None) => RequestExtras::default(),
        };
        ex.cache_salt = cache_salt.map(str::to_string);
        Ok(Some(ex))
    }

    /// True when no block of the request gets extra keys.
    pub fn is_empty(&self) -> bool {
        self.lora.is_none()
            && self.cache_salt.as_deref().is_none_or(str::is_empty)
            && self.mm.is_empty()
            && self.prompt_embeds.is_none()
    }

    /// The extra keys vLLM hashes for block `block` (the elements of the third member of
    /// the hashed triple), in the given style, or `None`.
    ///
    /// This replays vLLM's multimodal cursor from block 0, so it costs O(block); the
    /// hasher itself walks the blocks once.
    pub fn hash_extra_keys(
        &self,
        block: usize,
        block_size: usize,
        style: ExtraKeysStyle,
    ) -> Option<Vec<ExtraKey>> {
        let mut cur = ExtraKeysCursor::default();
        let mut out = None;
        for b in 0..=block {
            let start = b.saturating_mul(block_size);
            out = cur.next_block(self, start, start.saturating_add(block_size), style);
        }
        out
    }

    /// The extra keys vLLM publishes for block `block` in `BlockStored.extra_keys`
    /// (`to_event_extra_keys`: untagged, the LoRA name without its path).
    pub fn event_extra_keys(&self, block: usize, block_size: usize) -> Option<Vec<ExtraKey>> {
        self.hash_extra_keys(block, block_size, ExtraKeysStyle::V030)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_and_salt_make_the_same_extras_as_written_out() {
        assert_eq!(RequestExtras::from_lora_and_salt(None, None, None).unwrap(), None);
        let full = RequestExtras::from_lora_and_salt(Some("sql"), Some("/a/sql"), Some("t1"));
        assert_eq!(
            full.unwrap(),
            Some(RequestExtras {
                lora: Some(Lora { name: "sql".into(), path: Some("/a/sql".into()) }),
                cache_salt: Some("t1".into()),
                ..RequestExtras::default()
            })
        );
        let salt_only = RequestExtras::from_lora_and_salt(None, None, Some("t1")).unwrap();
        assert_eq!(salt_only.unwrap().cache_salt.as_deref(), Some("t1"));
        let lora_only = RequestExtras::from_lora_and_salt(Some("sql"), None, None).unwrap();
        assert_eq!(lora_only, Some(RequestExtras::with_lora("sql", None)));
        let err = RequestExtras::from_lora_and_salt(None, Some("/a/sql"), None).unwrap_err();
        assert!(matches!(err, crate::Error::InvalidInput(_)), "{err:?}");
    }

    fn mm(id: &str, offset: usize, length: usize) -> MmFeature {
        MmFeature { identifier: id.into(), offset, length }
    }

    /// A naive model: an item is in a block when their token ranges overlap.
    fn naive(ex: &RequestExtras, block: usize, bs: usize) -> Vec<(String, i64)> {
        let (s, e) = (block * bs, block * bs + bs);
        ex.mm
            .iter()
            .filter(|f| f.offset < e && f.offset + f.length > s)
            .map(|f| (f.identifier.clone(), f.offset as i64 - s as i64))
            .collect()
    }

    #[test]
    fn mm_cursor_matches_overlap_model() {
        let ex = RequestExtras {
            mm: vec![mm("a", 3, 40), mm("b", 43, 2), mm("c", 45, 3), mm("d", 70, 1)],
            ..Default::default()
        };
        for b in 0..6 {
            let got: Vec<(String, i64)> = ex
                .event_extra_keys(b, 16)
                .unwrap_or_default()
                .into_iter()
                .map(|k| match k {
                    ExtraKey::Tuple(v) => match (&v[0], &v[1]) {
                        (ExtraKey::Str(s), ExtraKey::Int(o)) => (s.clone(), *o),
                        _ => panic!("bad shape"),
                    },
                    _ => panic!("bad shape"),
                })
                .collect();
            assert_eq!(got, naive(&ex, b, 16), "block {b}");
        }
    }

    #[test]
    fn empty_salt_is_no_salt() {
        let ex = RequestExtras { cache_salt: Some(String::new()), ..Default::default() };
        assert!(ex.is_empty());
        assert_eq!(ex.hash_extra_keys(0, 16, ExtraKeysStyle::V033), None);
    }

    #[test]
    fn prompt_embeds_rejects_ragged_rows() {
        assert!(PromptEmbeds::new(0, vec![]).is_err());
        assert!(PromptEmbeds::new(3, vec![0.0; 4]).is_err());
        assert!(PromptEmbeds::new(2, vec![0.0; 4]).is_ok());
    }
}
