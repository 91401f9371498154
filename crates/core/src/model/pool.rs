//! The block pool: vLLM v1's `BlockPool` + `FreeKVCacheBlockQueue` + the full-attention
//! parts of `KVCacheManager` / `SingleTypeKVCacheManager`, on dense indices.
//!
//! See the [module documentation](super) for the behaviour and how it maps to vLLM.

use crate::{BlockKey, Error, Result};
use hashbrown::HashMap;

/// Sentinel for "no neighbour" in the intrusive free list (never a real block id).
const NIL: u32 = u32::MAX;

/// One event the pool records, in the order vLLM's `BlockPool` would queue it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// Full blocks became cached (vLLM `BlockStored`): `keys` in chain order, `parent` the key
    /// of the block before the first one (`None` when the first one is the request's block 0).
    Stored {
        /// The newly cached block keys, in prefix order.
        keys: Vec<BlockKey>,
        /// The key of the block preceding `keys[0]` in the request, if any.
        parent: Option<BlockKey>,
    },
    /// A cached block was evicted (vLLM `BlockRemoved`; vLLM sends one key per event).
    Removed {
        /// The evicted key (always exactly one, as vLLM emits it).
        keys: Vec<BlockKey>,
    },
    /// The whole prefix cache was reset (vLLM `AllBlocksCleared`).
    Cleared,
}

/// What [`BlockPool::allocate`] did for a new request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Prefix blocks found in the cache and shared (vLLM's computed blocks).
    pub hit_blocks: usize,
    /// `hit_blocks * block_size`: prompt tokens that skip prefill (vLLM's cached tokens).
    pub hit_tokens: usize,
    /// Blocks taken from the front of the free queue.
    pub new_blocks: usize,
}

/// A physical block: intrusive free-list links, a reference count and its cache key.
#[derive(Clone, Copy, Debug)]
struct Block {
    prev: u32,
    next: u32,
    ref_cnt: u32,
    /// Whether `key` is valid, i.e. the block is registered in the hash map.
    hashed: bool,
    key: BlockKey,
}

/// The block ids cached under one key. vLLM does not de-duplicate: two requests computing
/// the same block both register it; lookups return the first registered.
#[derive(Clone, Debug)]
enum Slot {
    One(u32),
    Many(Vec<u32>),
}

/// Per-request state, as `SingleTypeKVCacheManager.req_to_blocks` / `num_cached_block`.
#[derive(Clone, Debug, Default)]
struct Req {
    blocks: Vec<u32>,
    num_cached: usize,
}

/// A model of one vLLM v1 worker's GPU KV block pool (full attention, one KV cache group).
///
/// Block ids are `0..num_gpu_blocks`; block 0 is the null block and is never handed out.
#[derive(Clone, Debug)]
pub struct BlockPool {
    num_gpu_blocks: u32,
    block_size: usize,
    /// `num_gpu_blocks` real blocks, then the fake head and the fake tail of the free list.
    blocks: Vec<Block>,
    num_free: usize,
    cached: HashMap<BlockKey, Slot>,
    num_cached: usize,
    reqs: HashMap<u64, Req>,
    spare: Vec<Vec<u32>>,
    scratch: Vec<u32>,
    record_events: bool,
    events: Vec<PoolEvent>,
}

impl BlockPool {
    /// A pool of `num_gpu_blocks` blocks (block 0 becomes the null block, so
    /// `num_gpu_blocks - 1` are usable) holding `block_size` tokens each. With
    /// `record_events` false no events are kept (faster for simulation).
    ///
    /// Errors with [`Error::Config`] if `num_gpu_blocks` is 0 or `u32::MAX`, or
    /// `block_size` is 0.
    pub fn new(num_gpu_blocks: u32, block_size: usize, record_events: bool) -> Result<Self> {
        if num_gpu_blocks == 0 || num_gpu_blocks >= NIL - 2 {
            return Err(Error::config(format!(
                "num_gpu_blocks must be in 1..{}, got {num_gpu_blocks}",
                NIL - 2
            )));
        }
        if block_size == 0 {
            return Err(Error::config("block_size must be positive"));
        }
        let n = num_gpu_blocks as usize;
        let head = n as u32;
        let tail = n as u32 + 1;
        let mut blocks = Vec::with_capacity(n + 2);
        // Free list initially 1, 2, ..., n-1: vLLM builds 0..n-1 and pops block 0 as the null.
        for i in 0..n as u32 {
            let (prev, next) = if i == 0 {
                (NIL, NIL)
            } else {
                (if i == 1 { head } else { i - 1 }, if i + 1 == n as u32 { tail } else { i + 1 })
            };
            blocks.push(Block { prev, next, ref_cnt: 0, hashed: false, key: 0 });
        }
        let (first, last) = if n > 1 { (1, n as u32 - 1) } else { (tail, head) };
        blocks.push(Block { prev: NIL, next: first, ref_cnt: 0, hashed: false, key: 0 });
        blocks.push(Block { prev: last, next: NIL, ref_cnt: 0, hashed: false, key: 0 });
        Ok(BlockPool {
            num_gpu_blocks,
            block_size,
            blocks,
            num_free: n - 1,
            cached: HashMap::new(),
            num_cached: 0,
            reqs: HashMap::new(),
            spare: Vec::new(),
            scratch: Vec::new(),
            record_events,
            events: Vec::new(),
        })
    }

    #[inline]
    fn head(&self) -> u32 {
        self.num_gpu_blocks
    }

    #[inline]
    fn tail(&self) -> u32 {
        self.num_gpu_blocks + 1
    }

    /// The pool size including the null block (vLLM's `num_gpu_blocks`).
    pub fn num_gpu_blocks(&self) -> u32 {
        self.num_gpu_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the free queue (free or evictable cached), vLLM's `get_num_free_blocks`.
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks held by running requests (excluding the null block).
    pub fn num_used(&self) -> usize {
        self.num_gpu_blocks as usize - 1 - self.num_free
    }

    /// KV cache usage in `[0, 1]` as vLLM reports it: `1 - free / (num_gpu_blocks - 1)`.
    pub fn usage(&self) -> f64 {
        let total = self.num_gpu_blocks as usize - 1;
        if total == 0 {
            return 0.0;
        }
        1.0 - self.num_free as f64 / total as f64
    }

    /// Cached blocks present (running or evictable), counting duplicates of one key
    /// separately, so it equals stored minus removed keys since the last clear.
    pub fn num_cached_blocks(&self) -> usize {
        self.num_cached
    }

    /// Whether some block is cached under `key`.
    pub fn is_cached(&self, key: BlockKey) -> bool {
        self.cached.contains_key(&key)
    }

    /// Requests currently holding blocks.
    pub fn num_running(&self) -> usize {
        self.reqs.len()
    }

    /// The block ids of a running request, in block-table order.
    pub fn request_blocks(&self, req: u64) -> Option<&[u32]> {
        self.reqs.get(&req).map(|r| r.blocks.as_slice())
    }

    /// How many of a running request's blocks are cached (vLLM's `num_cached_block`).
    pub fn request_cached_blocks(&self, req: u64) -> Option<usize> {
        self.reqs.get(&req).map(|r| r.num_cached)
    }

    /// The first block cached under `key` (vLLM's `get_one_block`).
    #[inline]
    fn lookup(&self, key: BlockKey) -> Option<u32> {
        match self.cached.get(&key)? {
            Slot::One(b) => Some(*b),
            Slot::Many(v) => v.first().copied(),
        }
    }

    /// Most blocks a prompt of `num_tokens` tokens may hit: vLLM always recomputes the last
    /// prompt token, so it looks up at most `(num_tokens - 1) / block_size` blocks.
    #[inline]
    fn max_hit_blocks(&self, keys: &[BlockKey], num_tokens: usize) -> usize {
        (num_tokens.saturating_sub(1) / self.block_size).min(keys.len())
    }

    /// Number of leading blocks of `keys` a prompt of `num_tokens` tokens would hit now
    /// (read-only; vLLM's `get_computed_blocks`: stops at the first miss).
    pub fn computed_prefix(&self, keys: &[BlockKey], num_tokens: usize) -> usize {
        let max = self.max_hit_blocks(keys, num_tokens);
        keys[..max].iter().take_while(|k| self.cached.contains_key(*k)).count()
    }

    /// Admits a new request with the whole prompt: cached prefix blocks are shared, the rest
    /// of `num_tokens` gets new blocks. Same as [`allocate_chunk`](Self::allocate_chunk) with
    /// an unlimited token budget.
    pub fn allocate(
        &mut self,
        req: u64,
        keys: &[BlockKey],
        num_tokens: usize,
    ) -> Result<Option<Allocation>> {
        self.allocate_chunk(req, keys, num_tokens, usize::MAX)
    }

    /// Admits a new request whose prompt has `num_prompt_tokens` tokens and full-block keys
    /// `keys`, scheduling at most `max_new_tokens` uncached tokens now (chunked prefill;
    /// `0` just takes the cache hits, like vLLM's `touch`).
    ///
    /// Mirrors `get_computed_blocks` + `allocate_slots`: hits are looked up (at most
    /// `(num_prompt_tokens - 1) / block_size` blocks, stop at the first miss), the check
    /// counts new blocks plus hit blocks that sit in the free queue, hits are touched
    /// (taken out of the free queue), then new blocks are popped from the front of the
    /// queue, evicting any cached block popped (one [`PoolEvent::Removed`] each).
    ///
    /// Returns `Ok(None)`, with nothing changed, if there are not enough free blocks. Does
    /// not cache anything: call [`cache_blocks`](Self::cache_blocks) for that (vLLM caches
    /// the scheduled full blocks right in `allocate_slots`).
    ///
    /// Errors with [`Error::InvalidInput`] if `req` is already running or the prompt is empty.
    pub fn allocate_chunk(
        &mut self,
        req: u64,
        keys: &[BlockKey],
        num_prompt_tokens: usize,
        max_new_tokens: usize,
    ) -> Result<Option<Allocation>> {
        if self.reqs.contains_key(&req) {
            return Err(Error::invalid(format!("request {req} is already running")));
        }
        if num_prompt_tokens == 0 {
            return Err(Error::invalid(format!("request {req} has an empty prompt")));
        }
        let mut hits = std::mem::take(&mut self.scratch);
        hits.clear();
        let max = self.max_hit_blocks(keys, num_prompt_tokens);
        for &k in &keys[..max] {
            match self.lookup(k) {
                Some(b) => hits.push(b),
                None => break,
            }
        }
        let bs = self.block_size;
        let hit_tokens = hits.len() * bs;
        let new_tokens = max_new_tokens.min(num_prompt_tokens - hit_tokens);
        let required = (hit_tokens + new_tokens).div_ceil(bs);
        let new_blocks = required - hits.len();
        let evictable_hits = hits.iter().filter(|&&b| self.blocks[b as usize].ref_cnt == 0).count();
        if new_blocks + evictable_hits > self.num_free {
            self.scratch = hits;
            return Ok(None);
        }
        let mut blocks = self.spare.pop().unwrap_or_default();
        blocks.clear();
        blocks.reserve(required);
        // touch()
        for &b in &hits {
            if self.blocks[b as usize].ref_cnt == 0 {
                self.unlink(b);
            }
            self.blocks[b as usize].ref_cnt += 1;
            blocks.push(b);
        }
        self.get_new_blocks(new_blocks, &mut blocks);
        let hit_blocks = hits.len();
        self.scratch = hits;
        self.reqs.insert(req, Req { blocks, num_cached: hit_blocks });
        Ok(Some(Allocation { hit_blocks, hit_tokens, new_blocks }))
    }

    /// Makes sure running request `req` has slots for `num_tokens_total` tokens (its
    /// computed tokens plus the ones scheduled now: decode steps, later prefill chunks).
    /// Returns `Ok(false)`, with nothing changed, if there are not enough free blocks
    /// (vLLM would then preempt someone). Errors if `req` is not running.
    pub fn grow(&mut self, req: u64, num_tokens_total: usize) -> Result<bool> {
        let Some(r) = self.reqs.get_mut(&req) else {
            return Err(Error::invalid(format!("request {req} is not running")));
        };
        let required = num_tokens_total.div_ceil(self.block_size);
        let have = r.blocks.len();
        if required <= have {
            return Ok(true);
        }
        let need = required - have;
        if need > self.num_free {
            return Ok(false);
        }
        let mut blocks = std::mem::take(&mut r.blocks);
        self.get_new_blocks(need, &mut blocks);
        self.reqs.get_mut(&req).expect("checked above").blocks = blocks;
        Ok(true)
    }

    /// Registers the running request's blocks `num_cached..upto_blocks` as cached under
    /// `keys[i]` (vLLM's `cache_full_blocks`), recording one [`PoolEvent::Stored`] whose
    /// parent is `keys[num_cached - 1]` (or `None` from block 0). A no-op if those blocks
    /// are already cached. A key that is already cached elsewhere is registered again
    /// (vLLM keeps duplicates and reports them stored again).
    ///
    /// The caller vouches that `keys` is the request's key chain (the pool does not hash).
    /// Errors if `req` is not running, or `upto_blocks` exceeds its blocks or `keys`.
    pub fn cache_blocks(&mut self, req: u64, keys: &[BlockKey], upto_blocks: usize) -> Result<()> {
        let Some(r) = self.reqs.get_mut(&req) else {
            return Err(Error::invalid(format!("request {req} is not running")));
        };
        if upto_blocks > r.blocks.len() || upto_blocks > keys.len() {
            return Err(Error::invalid(format!(
                "cannot cache {upto_blocks} blocks of request {req}: it has {} blocks and {} keys",
                r.blocks.len(),
                keys.len()
            )));
        }
        let from = r.num_cached;
        if upto_blocks <= from {
            return Ok(());
        }
        r.num_cached = upto_blocks;
        for (&b, &key) in r.blocks[from..upto_blocks].iter().zip(&keys[from..upto_blocks]) {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(!blk.hashed, "a block past num_cached is never hashed");
            blk.hashed = true;
            blk.key = key;
            match self.cached.entry(key) {
                hashbrown::hash_map::Entry::Vacant(v) => {
                    v.insert(Slot::One(b));
                }
                hashbrown::hash_map::Entry::Occupied(mut o) => match o.get_mut() {
                    Slot::One(first) => {
                        let first = *first;
                        *o.get_mut() = Slot::Many(vec![first, b]);
                    }
                    Slot::Many(v) => v.push(b),
                },
            }
        }
        self.num_cached += upto_blocks - from;
        if self.record_events {
            self.events.push(PoolEvent::Stored {
                keys: keys[from..upto_blocks].to_vec(),
                parent: if from == 0 { None } else { Some(keys[from - 1]) },
            });
        }
        Ok(())
    }

    /// Finishes (or preempts) request `req`: its blocks are released in reverse order (the
    /// tail block is evicted first); blocks whose count drops to zero go, still in that
    /// order, to the front of the free queue if uncached and to the tail if cached (vLLM's
    /// `free_blocks`: `prepend_n` / `append_n`). Returns false if `req` was not running.
    pub fn free(&mut self, req: u64) -> bool {
        let Some(mut r) = self.reqs.remove(&req) else {
            return false;
        };
        let mut front = std::mem::take(&mut self.scratch);
        front.clear();
        for &b in r.blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            blk.ref_cnt -= 1;
            if blk.ref_cnt == 0 {
                if blk.hashed {
                    self.push_back(b);
                } else {
                    front.push(b);
                }
            }
        }
        // prepend_n keeps the given order at the front.
        for &b in front.iter().rev() {
            self.push_front(b);
        }
        self.scratch = front;
        r.blocks.clear();
        self.spare.push(r.blocks);
        true
    }

    /// vLLM's `reset_prefix_cache`: if no request holds blocks, forgets every cached key
    /// (free-queue order unchanged), records [`PoolEvent::Cleared`] and returns true;
    /// otherwise changes nothing and returns false.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.num_gpu_blocks as usize - 1 {
            return false;
        }
        self.cached.clear();
        self.num_cached = 0;
        let n = self.num_gpu_blocks as usize;
        for b in &mut self.blocks[..n] {
            b.hashed = false;
        }
        if self.record_events {
            self.events.push(PoolEvent::Cleared);
        }
        true
    }

    /// Takes the recorded events, oldest first (vLLM's `take_events`).
    pub fn drain_events(&mut self) -> Vec<PoolEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are being recorded.
    pub fn records_events(&self) -> bool {
        self.record_events
    }

    /// The free queue in eviction order (front first): `(block_id, cached)` pairs.
    pub fn free_queue_snapshot(&self) -> Vec<(u32, bool)> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut b = self.blocks[self.head() as usize].next;
        while b != self.tail() {
            let blk = &self.blocks[b as usize];
            out.push((b, blk.hashed));
            b = blk.next;
        }
        out
    }

    /// Pops `n` blocks from the front (caller checked `n <= num_free`), evicting cached
    /// ones, and appends them to `out` with a reference count of 1.
    fn get_new_blocks(&mut self, n: usize, out: &mut Vec<u32>) {
        for _ in 0..n {
            let b = self.blocks[self.head() as usize].next;
            debug_assert!(b != self.tail());
            self.unlink(b);
            if self.blocks[b as usize].hashed {
                self.evict(b);
            }
            self.blocks[b as usize].ref_cnt = 1;
            out.push(b);
        }
    }

    /// Drops block `b` from the hash map (vLLM's `_maybe_evict_cached_block`).
    fn evict(&mut self, b: u32) {
        let blk = &mut self.blocks[b as usize];
        blk.hashed = false;
        let key = blk.key;
        let remove_key = match self.cached.get_mut(&key) {
            Some(Slot::One(x)) => *x == b,
            Some(Slot::Many(v)) => {
                if let Some(pos) = v.iter().position(|&x| x == b) {
                    v.remove(pos);
                }
                v.is_empty()
            }
            None => false,
        };
        if remove_key {
            self.cached.remove(&key);
        }
        self.num_cached -= 1;
        if self.record_events {
            self.events.push(PoolEvent::Removed { keys: vec![key] });
        }
    }

    #[inline]
    fn unlink(&mut self, b: u32) {
        let Block { prev, next, .. } = self.blocks[b as usize];
        self.blocks[prev as usize].next = next;
        self.blocks[next as usize].prev = prev;
        let blk = &mut self.blocks[b as usize];
        blk.prev = NIL;
        blk.next = NIL;
        self.num_free -= 1;
    }

    #[inline]
    fn push_back(&mut self, b: u32) {
        let tail = self.tail();
        let last = self.blocks[tail as usize].prev;
        self.blocks[last as usize].next = b;
        self.blocks[b as usize].prev = last;
        self.blocks[b as usize].next = tail;
        self.blocks[tail as usize].prev = b;
        self.num_free += 1;
    }

    #[inline]
    fn push_front(&mut self, b: u32) {
        let head = self.head();
        let first = self.blocks[head as usize].next;
        self.blocks[first as usize].prev = b;
        self.blocks[b as usize].next = first;
        self.blocks[b as usize].prev = head;
        self.blocks[head as usize].next = b;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_block_is_taken_at_init() {
        let p = BlockPool::new(8, 16, true).unwrap();
        assert_eq!(p.num_free(), 7);
        let q: Vec<u32> = p.free_queue_snapshot().iter().map(|e| e.0).collect();
        assert_eq!(q, vec![1, 2, 3, 4, 5, 6, 7]);
        let one = BlockPool::new(1, 16, true).unwrap();
        assert_eq!(one.num_free(), 0);
        assert_eq!(one.usage(), 0.0);
        assert!(BlockPool::new(0, 16, true).is_err());
        assert!(BlockPool::new(8, 0, true).is_err());
    }

    #[test]
    fn last_prompt_token_is_always_recomputed() {
        let mut p = BlockPool::new(16, 4, false).unwrap();
        let keys = [10, 11, 12];
        p.allocate(1, &keys, 12).unwrap().unwrap();
        p.cache_blocks(1, &keys, 3).unwrap();
        p.free(1);
        // 12 tokens = exactly 3 full blocks, but only (12 - 1) / 4 = 2 may hit.
        assert_eq!(p.computed_prefix(&keys, 12), 2);
        assert_eq!(p.computed_prefix(&keys, 13), 3);
        let a = p.allocate(2, &keys, 12).unwrap().unwrap();
        assert_eq!((a.hit_blocks, a.hit_tokens, a.new_blocks), (2, 8, 1));
    }

    #[test]
    fn duplicates_are_kept_and_reported_like_vllm() {
        let mut p = BlockPool::new(16, 4, true).unwrap();
        let keys = [1, 2];
        p.allocate(1, &keys, 8).unwrap().unwrap();
        p.cache_blocks(1, &keys, 2).unwrap();
        // Same prompt while r1 runs: hits block 0 only, recomputes block 1 into a new block.
        let a = p.allocate(2, &keys, 8).unwrap().unwrap();
        assert_eq!(a.hit_blocks, 1);
        p.cache_blocks(2, &keys, 2).unwrap();
        assert_eq!(p.num_cached_blocks(), 3);
        let ev = p.drain_events();
        assert_eq!(
            ev,
            vec![
                PoolEvent::Stored { keys: vec![1, 2], parent: None },
                PoolEvent::Stored { keys: vec![2], parent: Some(1) },
            ]
        );
        // A lookup returns the first registered copy.
        let first = p.request_blocks(1).unwrap()[1];
        assert_eq!(p.lookup(2), Some(first));
        p.allocate(3, &keys, 8).unwrap().unwrap();
        assert_eq!(p.request_blocks(3).unwrap()[0], p.request_blocks(1).unwrap()[0]);
    }

    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let mut p = BlockPool::new(4, 4, true).unwrap();
        p.allocate(1, &[], 4).unwrap().unwrap();
        assert!(p.allocate(1, &[], 4).is_err());
        assert!(p.allocate(2, &[], 0).is_err());
        assert!(p.grow(9, 10).is_err());
        assert!(p.cache_blocks(9, &[1], 1).is_err());
        assert!(p.cache_blocks(1, &[1], 2).is_err());
        assert!(p.cache_blocks(1, &[], 1).is_err());
        // Not enough blocks: 3 usable, 1 used, asking for 3 more.
        let before = p.free_queue_snapshot();
        assert_eq!(p.allocate(2, &[], 12).unwrap(), None);
        assert_eq!(p.free_queue_snapshot(), before);
        assert!(!p.grow(1, 20).unwrap());
        assert_eq!(p.request_blocks(1).unwrap().len(), 1);
        assert!(!p.free(2));
        assert!(!p.reset_prefix_cache());
    }
}
