//! `kvroute.hash_blocks`: vLLM-exact block hashes of a token sequence.

use crate::convert::extract_tokens;
use crate::errors::{invalid, OrRaise};
use kvroute::hash::{
    BlockHasher, ExtraKeysStyle, HashAlgo, HashConfig, MmFeature, PromptEmbeds, RequestExtras,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

/// Inputs at least this long are hashed with the GIL released.
pub(crate) const DETACH_TOKENS: usize = 2048;

/// The request extras from the keyword arguments shared by `hash_blocks` and the router.
pub(crate) fn extras(
    py: Python<'_>,
    lora_name: Option<String>,
    lora_path: Option<String>,
    cache_salt: Option<String>,
) -> PyResult<RequestExtras> {
    RequestExtras::from_lora_and_salt(
        lora_name.as_deref(),
        lora_path.as_deref(),
        cache_salt.as_deref(),
    )
    .map(Option::unwrap_or_default)
    .or_raise(py)
}

fn mm_feature(item: &Bound<'_, PyAny>) -> PyResult<MmFeature> {
    let (identifier, offset, length) = if let Ok(d) = item.cast::<PyDict>() {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            d.get_item(k)?
                .ok_or_else(|| PyTypeError::new_err(format!("multimodal feature dict lacks {k:?}")))
        };
        (get("identifier")?.extract()?, get("offset")?.extract()?, get("length")?.extract()?)
    } else {
        item.extract::<(String, usize, usize)>().map_err(|_| {
            PyTypeError::new_err(
                "a multimodal feature is a dict {identifier, offset, length} or a tuple (identifier, offset, length)",
            )
        })?
    };
    Ok(MmFeature { identifier, offset, length })
}

fn parse_prompt_embeds(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<PromptEmbeds> {
    let (dim, data) = if obj.hasattr("__array_interface__")? {
        let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
        let [rows, dim] = shape[..] else {
            return Err(invalid(py, "prompt_embeds must be 2-dimensional [num_tokens, dim]"));
        };
        let bytes = obj.call_method1("astype", ("<f4",))?.call_method0("tobytes")?;
        let bytes = bytes.cast::<PyBytes>()?.as_bytes();
        let data: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if data.len() != rows * dim {
            return Err(invalid(py, "prompt_embeds has an inconsistent shape"));
        }
        (dim, data)
    } else {
        let rows: Vec<Vec<f32>> = obj.extract().map_err(|_| {
            PyTypeError::new_err("prompt_embeds must be a 2-d float array or a list of rows")
        })?;
        let dim = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != dim) {
            return Err(invalid(py, "prompt_embeds rows differ in length"));
        }
        (dim, rows.concat())
    };
    PromptEmbeds::new(dim, data).or_raise(py)
}

/// Computes vLLM's block hashes of `tokens` (full blocks only).
///
/// Returns one dict per full block: `hash` (the digest as lowercase hex) and `event_hash`
/// (the int vLLM's KV events carry for the block). `algo` is vLLM's
/// `--prefix-caching-hash-algo` (`sha256`, `sha256_cbor`, `xxhash`, `xxhash_cbor`) or
/// kvroute's native `xxh3`; `hash_seed` is the engine's `PYTHONHASHSEED` (required for the
/// xxhash family). `mm_features` is a list of `{identifier, offset, length}` dicts or
/// tuples, `prompt_embeds` a 2-d float array `[num_tokens, dim]`. `extra_keys_style` is
/// `"v033"` (vLLM 0.33 and later) or `"v030"`.
#[pyfunction]
#[pyo3(signature = (
    tokens, algo = "sha256", block_size = 16, hash_seed = None, lora_name = None,
    lora_path = None, cache_salt = None, *, mm_features = None, prompt_embeds = None,
    extra_keys_style = "v033"
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn hash_blocks(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    algo: &str,
    block_size: usize,
    hash_seed: Option<String>,
    lora_name: Option<String>,
    lora_path: Option<String>,
    cache_salt: Option<String>,
    mm_features: Option<&Bound<'_, PyAny>>,
    prompt_embeds: Option<&Bound<'_, PyAny>>,
    extra_keys_style: &str,
) -> PyResult<Py<PyList>> {
    let tokens = extract_tokens(tokens)?;
    let algo: HashAlgo = algo.parse().or_raise(py)?;
    let style = match extra_keys_style {
        "v033" => ExtraKeysStyle::V033,
        "v030" => ExtraKeysStyle::V030,
        other => {
            return Err(crate::errors::to_py(
                py,
                kvroute::Error::config(format!(
                    "unknown extra_keys_style {other:?} (expected v033 or v030)"
                )),
            ))
        }
    };
    let cfg = HashConfig {
        algo,
        block_size,
        hash_seed,
        extra_keys_style: style,
        ..HashConfig::default()
    };
    let hasher = BlockHasher::new(cfg).or_raise(py)?;
    let mut ex = extras(py, lora_name, lora_path, cache_salt)?;
    if let Some(items) = mm_features {
        ex.mm = items.try_iter()?.map(|x| mm_feature(&x?)).collect::<PyResult<_>>()?;
    }
    if let Some(obj) = prompt_embeds {
        ex.prompt_embeds = Some(parse_prompt_embeds(py, obj)?);
    }
    let hashes = if tokens.len() >= DETACH_TOKENS {
        py.detach(|| hasher.block_hashes(&tokens, &ex))
    } else {
        hasher.block_hashes(&tokens, &ex)
    };
    let out = PyList::empty(py);
    for h in hashes {
        let d = PyDict::new(py);
        d.set_item("hash", kvroute::hash::to_hex(&h.digest))?;
        d.set_item("event_hash", h.event_hash)?;
        out.append(d)?;
    }
    Ok(out.unbind())
}
