//! A faithful model of one vLLM v1 worker's GPU KV block pool.
//!
//! Used by the router's approximate mode (routing history run through a per-worker model)
//! and by the simulator. It reproduces, for one full-attention KV cache group, what vLLM's
//! `BlockPool`, `FreeKVCacheBlockQueue`, `KVCacheBlock` and the allocating / caching /
//! freeing parts of `KVCacheManager` and `SingleTypeKVCacheManager` do, including the KV
//! events they publish. It is checked step by step against a recorded run of vLLM 0.33.0's
//! own `BlockPool` (`tests/model_vllm_scenario.rs`, data in
//! `testdata/vllm/kv_events.json`).
//!
//! # Capacity ([`CapacitySpec`])
//!
//! vLLM profiles the GPU, then gives the KV cache what is left of
//! `total_memory * gpu_memory_utilization` after weights and peak activations, and divides
//! it by the bytes of one block. Per GPU (all ranks of a tensor-parallel group get the same
//! block count):
//!
//! ```text
//! block_bytes    = layers * (kv_heads / tp, at least 1) * head_dim * 2 (K and V) * dtype_bytes * block_size
//! num_gpu_blocks = floor((gpu_memory * utilization - params * 2 B / tp - overhead) / block_bytes)
//! ```
//!
//! `num_gpu_blocks` includes block 0, which vLLM takes at start-up as the *null block*, so
//! `num_gpu_blocks - 1` blocks hold KV. The utilization is 0.90 by default (our reference
//! deployment); vLLM's current default, 0.92, is one setting away. A capacity can also be
//! given directly as `{"num_gpu_blocks": N}`.
//!
//! **Worked example.** Llama-3-8B on one 80 GB H100, block size 16:
//! one block is 32 layers x 8 KV heads x 128 head dim x 2 (K and V) x 2 bytes x 16 tokens
//! = 2,097,152 B = 2 MiB. The H100 reports 79.18 GiB; x 0.90 = 71.26 GiB. Weights are
//! 8.03e9 x 2 B = 16.06 GB = 14.96 GiB; the activation allowance is 1.75 GiB. That leaves
//! 54.55 GiB, i.e. **27,932 blocks** (446,912 tokens), a little under 30k. At 0.92 it is
//! 28,742. (Unit-tested in `capacity::tests::worked_example_llama3_8b_on_h100`.)
//!
//! **Where the preset numbers come from.**
//!
//! | model preset | `config.json` of | layers | KV heads | head dim | params |
//! |---|---|---|---|---|---|
//! | `llama-3-8b` (alias `llama-3.1-8b`) | meta-llama/Meta-Llama-3-8B | 32 | 8 | 128 (4096 / 32) | 8.03 B |
//! | `llama-3-70b` (alias `llama-3.1-70b`, `llama-3.3-70b`) | meta-llama/Meta-Llama-3-70B | 80 | 8 | 128 (8192 / 64) | 70.55 B |
//! | `qwen3-8b` | Qwen/Qwen3-8B | 36 | 8 | 128 (`head_dim`) | 8.19 B |
//! | `qwen3-32b` | Qwen/Qwen3-32B | 64 | 8 | 128 (`head_dim`) | 32.76 B |
//!
//! Weights are `params x 2` bytes (bf16), split evenly over `tp` GPUs. KV cache in bf16
//! (2 bytes). The per-GPU `overhead_gib` allowance (1.75 GiB for the 8B models, 2.0 GiB
//! for 32B at TP 2 and 70B at TP 4/8) stands for what vLLM's profiling adds besides the
//! weights: the peak activations of its dummy forward pass over `max_num_batched_tokens`
//! (hidden and MLP intermediate tensors, sampler logits), non-torch memory (CUDA context,
//! NCCL buffers) and CUDA graphs. It is an estimate from those sizes, not a measurement;
//! override it with `overhead_gib` when a real vLLM log ("Available KV cache memory")
//! is at hand.
//!
//! | GPU preset | memory (GiB) | source |
//! |---|---|---|
//! | `a100-40gb` | 39.59 | total capacity PyTorch reports on A100-SXM4-40GB |
//! | `a100-80gb` | 79.15 | same, A100 80GB |
//! | `h100-80gb` | 79.18 | same, H100 80GB HBM3 |
//! | `h200-141gb` | 139.80 | same, H200 |
//!
//! Resulting `num_gpu_blocks` at utilization 0.90, block size 16:
//!
//! | model | tp | block | weights/GPU | A100 40GB | A100 80GB | H100 80GB | H200 141GB |
//! |---|---|---|---|---|---|---|---|
//! | llama-3-8b | 1 | 2 MiB | 16.06 GB | 9,689 | 27,918 | 27,932 | 55,865 |
//! | qwen3-8b | 1 | 2.25 MiB | 16.38 GB | 8,476 | 24,680 | 24,692 | 49,522 |
//! | qwen3-32b | 2 | 2 MiB | 32.76 GB | 1,597 | 19,827 | 19,840 | 47,774 |
//! | llama-3-70b | 4 | 1.25 MiB | 35.27 GB | 637 | 29,804 | 29,826 | 74,520 |
//! | llama-3-70b | 8 | 0.625 MiB | 17.64 GB | 28,188 | 86,521 | 86,566 | 175,953 |
//!
//! # The pool ([`BlockPool`])
//!
//! Blocks are keyed by caller-supplied u64 [`BlockKey`](crate::BlockKey)s (the caller hashes
//! tokens, for example with [`crate::hash`]); the pool never hashes. Behaviour, as in vLLM:
//!
//! - **Free queue**: a doubly linked list (indices in a `Vec`, fake head and tail) in
//!   eviction order. Initially blocks `1..num_gpu_blocks` in id order.
//! - **Lookup** ([`BlockPool::computed_prefix`], `get_computed_blocks`): leading keys that
//!   are cached, stopping at the first miss, at most `(num_tokens - 1) / block_size` blocks:
//!   the last prompt token is always recomputed, so a prompt never hits on its final block
//!   when that block is full.
//! - **Allocation** ([`BlockPool::allocate`], [`BlockPool::allocate_chunk`],
//!   `allocate_slots`): fails with no change if new blocks plus hit blocks sitting in the
//!   free queue exceed the free count; otherwise hit blocks are *touched* (reference count
//!   up, taken out of the free queue), then new blocks are popped from the **front**. A
//!   popped block that still holds a key is evicted: its key leaves the map and a
//!   [`PoolEvent::Removed`] is recorded, in pop order. [`BlockPool::grow`] adds blocks for
//!   decode steps or later prefill chunks.
//! - **Caching** ([`BlockPool::cache_blocks`], `cache_full_blocks`): the request's next full
//!   blocks get their keys, and one [`PoolEvent::Stored`] lists them with the key of the
//!   block before as parent. vLLM caches in `allocate_slots`, as soon as blocks are
//!   scheduled; call `cache_blocks` right after allocating to mirror that.
//! - **Duplicates**: vLLM does not de-duplicate. When a request recomputes a block that is
//!   already cached (its last prompt block, or two requests scheduled together), the second
//!   block is registered under the same key too, a second `Stored` is sent for the key, and
//!   lookups return the first registered block. Each copy is evicted on its own, each with
//!   its own `Removed`: per key, stored minus removed is the number of copies present.
//! - **Free** ([`BlockPool::free`], `free_blocks`): a request's blocks are released in
//!   **reverse** order, so its tail block is evicted first. Blocks whose count reaches zero
//!   go to the **tail** if cached (LRU) and to the **front** if uncached (they can never
//!   hit; vLLM `prepend_n`s them), each group keeping that reverse order. The recorded
//!   free queues of vLLM 0.33.0 agree.
//! - **Reset** ([`BlockPool::reset_prefix_cache`]): only when no request holds blocks; all
//!   keys are forgotten, the queue order stays, and a [`PoolEvent::Cleared`] is recorded.
//! - **Usage** ([`BlockPool::usage`]): `1 - free / (num_gpu_blocks - 1)`, as vLLM reports.
//!
//! Events are recorded only if asked for at construction; [`BlockPool::drain_events`]
//! takes them. Not modelled: sliding-window and hybrid (Mamba) groups, KV offloading,
//! speculative-decoding lookahead slots, `max_model_len` clamping, and the scheduler
//! (preemption is the caller's [`BlockPool::free`] when `grow` returns false).
//!
//! ```
//! use kvroute::model::{BlockPool, PoolEvent};
//! let mut pool = BlockPool::new(8, 16, true)?;          // 7 usable blocks
//! let keys = [11, 12, 13];                              // 3 full blocks of a 50-token prompt
//! let a = pool.allocate(1, &keys, 50)?.expect("fits");  // 4 blocks for 50 tokens
//! assert_eq!((a.hit_blocks, a.new_blocks), (0, 4));
//! pool.cache_blocks(1, &keys, 3)?;
//! pool.free(1);
//! assert_eq!(pool.computed_prefix(&keys, 50), 3);
//! assert_eq!(pool.drain_events(), vec![PoolEvent::Stored { keys: keys.to_vec(), parent: None }]);
//! # Ok::<(), kvroute::Error>(())
//! ```

mod capacity;
mod pool;

pub use capacity::{
    gpu_preset, gpu_presets, model_preset, model_presets, CapacitySpec, GpuSpec, ModelShape,
    DEFAULT_GPU_MEMORY_UTILIZATION, GIB,
};
pub use pool::{Allocation, BlockPool, PoolEvent};
