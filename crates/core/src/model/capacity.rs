//! How many KV blocks a vLLM worker gets: model shapes, GPUs and the capacity formula.
//!
//! See the [module documentation](super) for the formula, the worked example and the
//! sources of every preset number.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Bytes in one GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// vLLM's `--gpu-memory-utilization` in our reference deployment (vLLM's own default is
/// now 0.92; set it in [`CapacitySpec::gpu_memory_utilization`]).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.90;

/// The shape of a decoder-only model, as far as its KV cache and weights are concerned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Preset name (`llama-3-8b`, ...).
    pub name: String,
    /// `num_hidden_layers` in the model's `config.json`.
    pub layers: u32,
    /// `num_key_value_heads` in `config.json` (grouped-query attention).
    pub kv_heads: u32,
    /// `head_dim` in `config.json`, or `hidden_size / num_attention_heads`.
    pub head_dim: u32,
    /// Bytes per KV element (2 for bf16/fp16, 1 for fp8 KV cache).
    pub dtype_bytes: u32,
    /// Parameter count in billions; weights take `params_billion * 1e9 * 2` bytes in bf16.
    pub params_billion: f64,
    /// Per-GPU allowance in GiB for what vLLM's memory profiling finds besides weights:
    /// peak activations of the dummy forward pass, non-torch memory (CUDA context, NCCL),
    /// CUDA graphs. An estimate, not a measurement; see the module docs.
    #[serde(default = "default_overhead")]
    pub overhead_gib: f64,
}

fn default_overhead() -> f64 {
    1.75
}

impl ModelShape {
    /// KV heads held by one GPU at tensor-parallel size `tp`: `kv_heads / tp`, at least 1
    /// (vLLM replicates KV heads when `tp > kv_heads`).
    pub fn kv_heads_per_gpu(&self, tp: u32) -> u32 {
        (self.kv_heads / tp.max(1)).max(1)
    }

    /// Bytes of one block of `block_size` tokens on one GPU: layers x KV heads per GPU x
    /// head dim x 2 (K and V) x dtype bytes x block size.
    pub fn block_bytes(&self, block_size: usize, tp: u32) -> u64 {
        self.layers as u64
            * self.kv_heads_per_gpu(tp) as u64
            * self.head_dim as u64
            * 2
            * self.dtype_bytes as u64
            * block_size as u64
    }

    /// Bytes of bf16 weights on one GPU: `params * 2 / tp`.
    pub fn weight_bytes_per_gpu(&self, tp: u32) -> f64 {
        self.params_billion * 1e9 * 2.0 / tp.max(1) as f64
    }
}

/// A GPU model and the memory CUDA reports for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Preset name (`h100-80gb`, ...).
    pub name: String,
    /// Total device memory in GiB as CUDA reports it (`torch.cuda.mem_get_info()[1]`,
    /// which vLLM multiplies by the utilization).
    pub memory_gib: f64,
}

fn model(
    name: &str,
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    params_billion: f64,
    overhead_gib: f64,
) -> ModelShape {
    ModelShape {
        name: name.to_string(),
        layers,
        kv_heads,
        head_dim,
        dtype_bytes: 2,
        params_billion,
        overhead_gib,
    }
}

/// All model presets (bf16 weights and KV cache). Numbers from each model's `config.json`
/// on Hugging Face; see the module docs.
pub fn model_presets() -> Vec<ModelShape> {
    vec![
        // meta-llama/Meta-Llama-3-8B: 32 layers, 32 heads, 8 KV heads, hidden 4096.
        model("llama-3-8b", 32, 8, 128, 8.03, 1.75),
        // meta-llama/Meta-Llama-3-70B: 80 layers, 64 heads, 8 KV heads, hidden 8192.
        model("llama-3-70b", 80, 8, 128, 70.55, 2.0),
        // Qwen/Qwen3-8B: 36 layers, 32 heads, 8 KV heads, head_dim 128.
        model("qwen3-8b", 36, 8, 128, 8.19, 1.75),
        // Qwen/Qwen3-32B: 64 layers, 64 heads, 8 KV heads, head_dim 128.
        model("qwen3-32b", 64, 8, 128, 32.76, 2.0),
    ]
}

/// All GPU presets: total memory as CUDA reports it (the "total capacity" PyTorch prints).
pub fn gpu_presets() -> Vec<GpuSpec> {
    let g = |name: &str, memory_gib: f64| GpuSpec { name: name.to_string(), memory_gib };
    vec![
        g("a100-40gb", 39.59),
        g("a100-80gb", 79.15),
        g("h100-80gb", 79.18),
        g("h200-141gb", 139.80),
    ]
}

/// Normalizes a preset name: lowercase, `_` and spaces as `-`, and the Llama 3.1 / 3.3
/// names as aliases of the Llama 3 shapes (same `config.json` numbers).
fn normalize(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase().replace(['_', ' '], "-");
    match n.as_str() {
        "llama-3.1-8b" | "meta-llama-3-8b" | "meta-llama-3.1-8b" => "llama-3-8b".into(),
        "llama-3.1-70b" | "llama-3.3-70b" | "meta-llama-3-70b" | "meta-llama-3.1-70b" => {
            "llama-3-70b".into()
        }
        "h100" => "h100-80gb".into(),
        "h200" | "h200-141gb" => "h200-141gb".into(),
        _ => n,
    }
}

/// The model preset called `name` (case-insensitive; `llama-3.1-8b` is an alias).
pub fn model_preset(name: &str) -> Option<ModelShape> {
    let n = normalize(name);
    model_presets().into_iter().find(|m| m.name == n)
}

/// The GPU preset called `name` (case-insensitive; `h100` means `h100-80gb`).
pub fn gpu_preset(name: &str) -> Option<GpuSpec> {
    let n = normalize(name);
    gpu_presets().into_iter().find(|g| g.name == n)
}

fn default_tp() -> u32 {
    1
}

fn default_util() -> f64 {
    DEFAULT_GPU_MEMORY_UTILIZATION
}

/// A worker's KV capacity: either given directly (`{"num_gpu_blocks": 8}`) or derived from
/// a model and a GPU (`{"model": "llama-3-8b", "gpu": "h100-80gb", "tp": 1,
/// "gpu_memory_utilization": 0.9}`). `shape` may replace `model` and `gpu_memory_gib` may
/// replace `gpu`; `overhead_gib` overrides the model's allowance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySpec {
    /// vLLM's `num_gpu_blocks` (including the null block), if given directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpu_blocks: Option<u32>,
    /// A model preset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A custom model shape instead of a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ModelShape>,
    /// A GPU preset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// GPU memory in GiB instead of a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_gib: Option<f64>,
    /// Tensor-parallel size (GPUs per replica); 1 by default.
    #[serde(default = "default_tp")]
    pub tp: u32,
    /// Fraction of GPU memory vLLM may use; 0.90 by default.
    #[serde(default = "default_util")]
    pub gpu_memory_utilization: f64,
    /// Per-GPU non-KV, non-weight memory in GiB, overriding the model's allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead_gib: Option<f64>,
}

impl CapacitySpec {
    /// A capacity of exactly `num_gpu_blocks` blocks (including the null block).
    pub fn blocks(num_gpu_blocks: u32) -> Self {
        CapacitySpec {
            num_gpu_blocks: Some(num_gpu_blocks),
            model: None,
            shape: None,
            gpu: None,
            gpu_memory_gib: None,
            tp: 1,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            overhead_gib: None,
        }
    }

    /// A capacity derived from model and GPU presets at utilization 0.90.
    pub fn preset(model: &str, gpu: &str, tp: u32) -> Self {
        CapacitySpec {
            num_gpu_blocks: None,
            model: Some(model.to_string()),
            gpu: Some(gpu.to_string()),
            tp,
            ..CapacitySpec::blocks(0)
        }
    }

    /// Parses a spec from JSON.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::config(format!("capacity spec: {e}")))
    }

    /// vLLM's `num_gpu_blocks` for blocks of `block_size` tokens:
    /// `floor((gpu_memory * utilization - weights / tp - overhead) / block_bytes)`, all per
    /// GPU. Errors with [`Error::Config`] on unknown presets, contradictory or out-of-range
    /// settings, or when the model leaves no room for two blocks.
    pub fn num_gpu_blocks(&self, block_size: usize) -> Result<u32> {
        if block_size == 0 {
            return Err(Error::config("block_size must be positive"));
        }
        let derived = self.model.is_some()
            || self.shape.is_some()
            || self.gpu.is_some()
            || self.gpu_memory_gib.is_some();
        if let Some(n) = self.num_gpu_blocks {
            if derived {
                return Err(Error::config(
                    "capacity: give either num_gpu_blocks or a model and a GPU, not both",
                ));
            }
            if n == 0 {
                return Err(Error::config("capacity: num_gpu_blocks must be positive"));
            }
            return Ok(n);
        }
        let shape = match (&self.shape, &self.model) {
            (Some(_), Some(_)) => {
                return Err(Error::config("capacity: give either model or shape, not both"))
            }
            (Some(s), None) => s.clone(),
            (None, Some(m)) => model_preset(m)
                .ok_or_else(|| Error::config(format!("capacity: unknown model preset {m:?}")))?,
            (None, None) => {
                return Err(Error::config(
                    "capacity: give num_gpu_blocks, or a model (or shape) and a GPU",
                ))
            }
        };
        let mem_gib = match (self.gpu_memory_gib, &self.gpu) {
            (Some(_), Some(_)) => {
                return Err(Error::config("capacity: give either gpu or gpu_memory_gib, not both"))
            }
            (Some(g), None) => g,
            (None, Some(name)) => {
                gpu_preset(name)
                    .ok_or_else(|| Error::config(format!("capacity: unknown GPU preset {name:?}")))?
                    .memory_gib
            }
            (None, None) => return Err(Error::config("capacity: no GPU given")),
        };
        let util = self.gpu_memory_utilization;
        if !(util > 0.0 && util <= 1.0) {
            return Err(Error::config(format!(
                "capacity: gpu_memory_utilization must be in (0, 1], got {util}"
            )));
        }
        if self.tp == 0 {
            return Err(Error::config("capacity: tp must be positive"));
        }
        if shape.layers == 0 || shape.kv_heads == 0 || shape.head_dim == 0 || shape.dtype_bytes == 0
        {
            return Err(Error::config("capacity: model shape has a zero dimension"));
        }
        if shape.kv_heads >= self.tp && shape.kv_heads % self.tp != 0 {
            return Err(Error::config(format!(
                "capacity: {} KV heads cannot be split over tp={}",
                shape.kv_heads, self.tp
            )));
        }
        let overhead = self.overhead_gib.unwrap_or(shape.overhead_gib);
        let values_ok = mem_gib.is_finite()
            && mem_gib > 0.0
            && overhead.is_finite()
            && overhead >= 0.0
            && shape.params_billion.is_finite()
            && shape.params_billion >= 0.0;
        if !values_ok {
            return Err(Error::config(
                "capacity: memory, overhead and params must be finite and non-negative",
            ));
        }
        let available = mem_gib * GIB * util - shape.weight_bytes_per_gpu(self.tp) - overhead * GIB;
        let per_block = shape.block_bytes(block_size, self.tp) as f64;
        let blocks = (available / per_block).floor();
        if blocks < 2.0 {
            return Err(Error::config(format!(
                "capacity: {} on {mem_gib} GiB x {util} at tp={} leaves {:.2} GiB for the KV cache, \
                 less than two blocks",
                shape.name,
                self.tp,
                available / GIB
            )));
        }
        Ok(blocks.min((u32::MAX - 3) as f64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_llama3_8b_on_h100() {
        let m = model_preset("Llama-3.1-8B").unwrap();
        // 32 layers x 8 KV heads x 128 head dim x 2 (K, V) x 2 bytes x 16 tokens = 2 MiB.
        assert_eq!(m.block_bytes(16, 1), 32 * 8 * 128 * 2 * 2 * 16);
        assert_eq!(m.block_bytes(16, 1), 2 * 1024 * 1024);
        let n = CapacitySpec::preset("llama-3-8b", "h100-80gb", 1).num_gpu_blocks(16).unwrap();
        // By hand: 79.18 GiB x 0.9 = 71.262 GiB; weights 8.03e9 x 2 B = 14.957 GiB;
        // allowance 1.75 GiB; (71.262 - 14.957 - 1.75) GiB / 2 MiB = 27,932.
        let by_hand = ((79.18 * 0.9 * GIB - 16.06e9 - 1.75 * GIB) / (2.0 * 1024.0 * 1024.0)) as u32;
        assert_eq!(n, by_hand);
        assert!((27_000..30_000).contains(&n), "{n}");
        // vLLM's own default 0.92 is one setting away and gives more blocks.
        let mut s = CapacitySpec::preset("llama-3-8b", "h100-80gb", 1);
        s.gpu_memory_utilization = 0.92;
        let n92 = s.num_gpu_blocks(16).unwrap();
        let extra = 79.18 * 0.02 * GIB / (2.0 * 1024.0 * 1024.0);
        assert!(((n92 - n) as f64 - extra).abs() <= 1.0, "{n92} vs {n}");
    }

    #[test]
    fn tensor_parallel_splits_heads_and_weights() {
        let m = model_preset("llama-3-70b").unwrap();
        assert_eq!(m.kv_heads_per_gpu(4), 2);
        assert_eq!(m.kv_heads_per_gpu(8), 1);
        assert_eq!(m.kv_heads_per_gpu(16), 1, "replicated when tp > kv heads");
        assert_eq!(m.block_bytes(16, 8) * 2, m.block_bytes(16, 4));
        let tp4 = CapacitySpec::preset("llama-3-70b", "h100-80gb", 4).num_gpu_blocks(16).unwrap();
        let tp8 = CapacitySpec::preset("llama-3-70b", "h100-80gb", 8).num_gpu_blocks(16).unwrap();
        assert!(tp8 > 2 * tp4, "tp8 halves the block and the weights per GPU");
        // 70B in bf16 does not fit on one 80 GB GPU.
        assert!(CapacitySpec::preset("llama-3-70b", "h100-80gb", 1).num_gpu_blocks(16).is_err());
    }

    #[test]
    fn specs_parse_from_json_and_reject_bad_input() {
        let s = CapacitySpec::from_json(r#"{"num_gpu_blocks": 8}"#).unwrap();
        assert_eq!(s.num_gpu_blocks(16).unwrap(), 8);
        let s = CapacitySpec::from_json(
            r#"{"model": "llama-3-8b", "gpu": "h100-80gb", "tp": 1, "gpu_memory_utilization": 0.9}"#,
        )
        .unwrap();
        assert_eq!(
            s.num_gpu_blocks(16).unwrap(),
            CapacitySpec::preset("llama-3-8b", "h100-80gb", 1).num_gpu_blocks(16).unwrap()
        );
        for bad in [
            r#"{"num_gpu_blocks": 0}"#,
            r#"{"num_gpu_blocks": 8, "model": "llama-3-8b"}"#,
            r#"{"model": "gpt-9", "gpu": "h100-80gb"}"#,
            r#"{"model": "llama-3-8b", "gpu": "tpu"}"#,
            r#"{"model": "llama-3-8b"}"#,
            r#"{"model": "llama-3-8b", "gpu": "h100", "gpu_memory_utilization": 1.5}"#,
            r#"{"model": "llama-3-8b", "gpu": "h100", "tp": 0}"#,
            r#"{"model": "llama-3-8b", "gpu": "h100", "tp": 3}"#,
            r#"{"model": "qwen3-32b", "gpu": "a100-40gb"}"#,
        ] {
            let r = CapacitySpec::from_json(bad).and_then(|s| s.num_gpu_blocks(16));
            assert!(matches!(r, Err(Error::Config(_))), "{bad}: {r:?}");
        }
        assert!(CapacitySpec::from_json(r#"{"blocks": 8}"#).is_err());
        assert!(CapacitySpec::blocks(8).num_gpu_blocks(0).is_err());
    }
}
