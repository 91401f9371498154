//! The prefix index: which workers hold which chained blocks, in which tier.
//!
//! # Structure
//!
//! Block keys are chained (a key names a block *and its whole prefix*), so the set of all
//! stored keys forms a tree rooted at the empty prefix. [`PrefixIndex`] stores that tree
//! path-compressed: a node is a maximal run of keys that form one unbranched chain *and*
//! have exactly the same holders (worker, per-tier reference counts). A holder set is kept
//! once per run, not once per block, so a 384-block chain held by one worker costs one
//! 8-byte key per block plus a small constant.
//!
//! Next to the tree sits one global hash table from key to location `(node, offset)`,
//! needed to store under a parent and to remove by key (the key table, `table.rs`). Its
//! entries are 8 bytes: the key itself is not stored again but read from the node when
//! probing, which keeps the index near 9 bytes of table (at 85% load at most) plus 8
//! bytes of key per distinct block. Matching never touches it: a match walks the tree.
//!
//! # Semantics
//!
//! - **Reference counts.** vLLM announces a block twice when two requests compute it at
//!   once, and removes it twice later. Each holder keeps a count per tier; a block leaves
//!   a worker's set only when all counts reach zero.
//! - **Unknown removals** (a key the worker does not hold in that tier) are counted no-ops.
//! - **Unknown parents.** A stored run whose parent key is not in the index is kept as a
//!   new root (an *orphan*), remembered with its declared parent and counted in
//!   [`IndexStats::orphan_stores`]. It cannot be matched from a request's first block
//!   until its parent is stored, at which point it is linked under the parent and
//!   becomes matchable. This covers events that arrive out of order (for example after a
//!   replay) without dropping information.
//! - **Match** ([`PrefixIndex::find_matches`]) returns, for every worker that holds the
//!   request's first block, the length of the longest prefix of the request it holds in
//!   full (any tier), with a breakdown by the best tier of each matched block.
//! - **Bounded memory.** With [`IndexConfig::max_holder_blocks`] set, a store that takes
//!   the index over the cap evicts whole leaf runs (the deepest blocks, which vLLM would
//!   also evict first), least recently stored or matched first, down to 95% of the cap.
//!   Each evicted (block, worker) pair is counted.
//!
//! # Engine-hash mapping
//!
//! When the router cannot reproduce the engine's hashes it keys blocks by its own hash of
//! the event's tokens, and keeps, per worker, a map from engine hash to router key
//! ([`PrefixIndex::store_mapped`], [`PrefixIndex::remove_mapped`]), so removals and parent
//! links, which only carry engine hashes, still find their blocks.

pub(crate) mod snapshot;
mod table;
mod tree;

pub use tree::{PrefixIndex, MAX_WORKER};

use crate::types::WorkerId;
use serde::{Deserialize, Serialize};

/// Configuration of a [`PrefixIndex`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// An optional cap on (block, worker) pairs; see the module docs for the eviction rule.
    #[serde(default)]
    pub max_holder_blocks: Option<u64>,
}

/// What one store call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreReport {
    /// Keys given.
    pub blocks: u32,
    /// Keys that were not in the index before (for anyone).
    pub new_blocks: u32,
    /// True when the parent was given but unknown, so the run became an orphan root.
    pub orphan: bool,
    /// (block, worker) pairs evicted to respect the cap.
    pub evicted: u64,
}

/// What one remove call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoveReport {
    /// Keys whose reference count for this worker and tier was decremented.
    pub removed: u32,
    /// Keys the worker did not hold in that tier (counted no-ops).
    pub unknown: u32,
}

/// One worker's match against a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// The worker.
    pub worker: WorkerId,
    /// Length in blocks of the longest prefix of the request this worker holds in full.
    pub blocks: u32,
    /// Of those blocks, how many have their best copy on GPU, CPU and disk.
    pub by_tier: [u32; 3],
}

/// Options of [`PrefixIndex::find_matches`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchOptions {
    /// Stop walking once at most one worker can still extend its match. The remaining
    /// worker's `blocks` is then a lower bound and [`Matches::truncated`] is set.
    pub early_exit: bool,
}

/// Reusable result of [`PrefixIndex::find_matches`]: one [`Overlap`] per worker that holds
/// at least the request's first block, sorted by worker id.
///
/// Reuse one value across calls: after the first few calls a match allocates nothing,
/// and the overlaps come out sorted without a sort.
#[derive(Clone, Debug, Default)]
pub struct Matches {
    pub(crate) entries: Vec<Overlap>,
    pub(crate) truncated: bool,
    /// Scratch of the walk (kept for reuse): still-matching workers by list position...
    pub(crate) alive: Vec<u32>,
    /// ... or as a bitset over words of worker ids,
    pub(crate) live: Vec<u64>,
    /// the rank of each bitset word's first worker among the candidates,
    pub(crate) rank: Vec<u32>,
    /// the depth at which each candidate dropped out (0 = still matching),
    pub(crate) depth: Vec<u32>,
    /// tier corrections (candidate rank, tier, blocks) for holders without a GPU copy,
    pub(crate) fix: Vec<(u32, u32, u32)>,
    /// and one node's sparse holders as a bitset.
    pub(crate) tmp: Vec<u64>,
}

impl Matches {
    /// An empty result with no allocation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The overlaps, sorted by worker id.
    pub fn overlaps(&self) -> &[Overlap] {
        &self.entries
    }

    /// The overlap of `worker`, if it holds the first block.
    pub fn get(&self, worker: WorkerId) -> Option<&Overlap> {
        self.entries.binary_search_by_key(&worker, |o| o.worker).ok().map(|i| &self.entries[i])
    }

    /// The longest match of any worker, in blocks.
    pub fn max_blocks(&self) -> u32 {
        self.entries.iter().map(|o| o.blocks).max().unwrap_or(0)
    }

    /// True when the walk stopped early ([`MatchOptions::early_exit`]).
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.alive.clear();
        self.live.clear();
        self.rank.clear();
        self.depth.clear();
        self.fix.clear();
        self.truncated = false;
    }
}

/// Statistics of a [`PrefixIndex`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexStats {
    /// Distinct block keys in the index.
    pub blocks: u64,
    /// (block, worker) pairs: a block held by three workers counts three.
    pub holder_blocks: u64,
    /// Tree nodes (runs), not counting the root.
    pub nodes: u64,
    /// Heap bytes held by the index, summed from the real allocation sizes of its tables
    /// and vectors (capacities, not lengths).
    pub heap_bytes: u64,
    /// Engine-hash mappings held (precise mode with router-side keys).
    pub engine_mappings: u64,
    /// Orphan roots currently waiting for their parent.
    pub orphans_pending: u64,
    /// Store calls whose parent was unknown (cumulative).
    pub orphan_stores: u64,
    /// Removals of keys a worker did not hold (cumulative).
    pub unknown_removals: u64,
    /// (block, worker) pairs evicted by the cap (cumulative).
    pub evictions: u64,
    /// (block, worker) pairs whose per-tier reference count was already at its maximum
    /// (65,535) when another store arrived (cumulative). The count stays at the maximum,
    /// so that many removals may drop a block before the engine frees it.
    #[serde(default)]
    pub ref_overflows: u64,
}
