//! The path-compressed radix tree behind [`PrefixIndex`].

use super::table::KeyTable;
use super::{IndexConfig, IndexStats, MatchOptions, Matches, Overlap, RemoveReport, StoreReport};
use crate::error::{Error, Result};
use crate::types::{BlockKey, Tier, WorkerId};
use hashbrown::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The root node: the empty prefix. It has no keys and no holders.
pub(super) const ROOT: u32 = 0;
const NIL: u32 = u32::MAX;
/// A location hint that matches no node.
const NO_LOC: Loc = Loc { node: NIL, off: 0 };
/// The largest worker id the index accepts (ids are dense; this bounds per-worker arrays).
pub const MAX_WORKER: u32 = 1 << 20;
/// How far ahead of a loop over keys their table groups are prefetched.
const AHEAD: usize = 16;
/// Keys written to a node at a time by a store (see `PrefixIndex::attach_new`).
const WARM: usize = 64;
/// Children lists longer than this become hash maps.
const SMALL_CHILDREN: usize = 8;

/// Mixes a block key into a table hash. Keys are usually hashes already, but tests and
/// other engines may use small integers, so fold a 128-bit product to spread every bit.
#[inline]
pub(super) fn mix(key: u64) -> u64 {
    let p = (key as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A `Hasher` for u64 keys that applies [`mix`].
#[derive(Default, Clone, Copy)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix(n);
    }
}

pub(super) type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// One holder of a run: a worker and its reference count per tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Holder {
    pub(super) worker: u32,
    pub(super) refs: [u16; 3],
}

impl Holder {
    #[inline]
    fn best_tier(&self) -> usize {
        if self.refs[0] > 0 {
            0
        } else if self.refs[1] > 0 {
            1
        } else {
            2
        }
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.refs == [0, 0, 0]
    }
}

/// The children of a node, keyed by their first key.
#[derive(Debug)]
pub(super) enum Children {
    Small(Vec<(u64, u32)>),
    Map(KeyMap<u32>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Small(Vec::new())
    }
}

impl Children {
    #[inline]
    fn get(&self, key: u64) -> Option<u32> {
        match self {
            Children::Small(v) => v.iter().find(|(k, _)| *k == key).map(|&(_, n)| n),
            Children::Map(m) => m.get(&key).copied(),
        }
    }
    fn insert(&mut self, key: u64, node: u32) {
        match self {
            Children::Small(v) => {
                if let Some(slot) = v.iter_mut().find(|(k, _)| *k == key) {
                    slot.1 = node;
                } else if v.len() < SMALL_CHILDREN {
                    v.push((key, node));
                } else {
                    let mut m: KeyMap<u32> =
                        KeyMap::with_capacity_and_hasher(SMALL_CHILDREN * 2, Default::default());
                    m.extend(v.drain(..));
                    m.insert(key, node);
                    *self = Children::Map(m);
                }
            }
            Children::Map(m) => {
                m.insert(key, node);
            }
        }
    }
    fn remove(&mut self, key: u64) {
        match self {
            Children::Small(v) => {
                if let Some(i) = v.iter().position(|(k, _)| *k == key) {
                    v.swap_remove(i);
                }
            }
            Children::Map(m) => {
                m.remove(&key);
                if m.len() <= SMALL_CHILDREN / 2 {
                    let v: Vec<(u64, u32)> = m.drain().collect();
                    *self = Children::Small(v);
                }
            }
        }
    }
    pub(super) fn len(&self) -> usize {
        match self {
            Children::Small(v) => v.len(),
            Children::Map(m) => m.len(),
        }
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn single(&self) -> Option<u32> {
        match self {
            Children::Small(v) if v.len() == 1 => Some(v[0].1),
            Children::Map(m) if m.len() == 1 => m.values().next().copied(),
            _ => None,
        }
    }
    pub(super) fn nodes(&self) -> Vec<u32> {
        match self {
            Children::Small(v) => v.iter().map(|&(_, n)| n).collect(),
            Children::Map(m) => m.values().copied().collect(),
        }
    }
    fn heap_bytes(&self) -> usize {
        match self {
            Children::Small(v) => v.capacity() * std::mem::size_of::<(u64, u32)>(),
            Children::Map(m) => m.allocation_size(),
        }
    }
}

/// The holders of a node as a bitset over worker ids, for matching: word `i` of `words`
/// covers workers `64 * (base + i)` to `64 * (base + i) + 63`. A node whose holder ids
/// are too sparse for a bitset (more words than holders, and more than 4) has no words;
/// matches through it intersect the sorted holder list instead.
#[derive(Clone, Debug, Default)]
pub(super) struct Bits {
    base: u32,
    words: Box<[u64]>,
}

impl Bits {
    /// Rebuilds the bitset of `holders` (sorted by worker), reusing the allocation when
    /// the span of words is unchanged.
    fn rebuild(&mut self, holders: &[Holder]) {
        let (Some(f), Some(l)) = (holders.first(), holders.last()) else {
            *self = Bits::default();
            return;
        };
        let (lo, hi) = (f.worker / 64, l.worker / 64);
        let span = (hi - lo + 1) as usize;
        if span > holders.len().max(4) {
            *self = Bits::default();
            return;
        }
        if self.words.len() == span {
            self.words.fill(0);
        } else {
            self.words = vec![0u64; span].into_boxed_slice();
        }
        self.base = lo;
        for h in holders {
            let b = h.worker - lo * 64;
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// The word of global index `g` (0 outside the span).
    #[inline]
    fn word(&self, g: u32) -> u64 {
        match g.checked_sub(self.base) {
            Some(i) if (i as usize) < self.words.len() => self.words[i as usize],
            _ => 0,
        }
    }
}

/// A run of keys with one holder set.
#[derive(Debug, Default)]
pub(super) struct Node {
    pub(super) keys: Vec<u64>,
    pub(super) holders: Vec<Holder>,
    /// `holders` as a bitset (derived; see [`PrefixIndex::refresh`]).
    bits: Bits,
    /// True when some holder has no GPU copy (derived): only then does a match look at
    /// the holders' tiers.
    mixed: bool,
    pub(super) children: Children,
    pub(super) parent: u32,
    /// The LRU clock at the last store or match that touched this node. A `u64` bumped
    /// once per store cannot wrap (a `u32` did after 2^32 stores, and eviction then took
    /// the newest leaves first).
    touched: AtomicU64,
    pub(super) live: bool,
}

/// Where a key lives: node and offset. The key itself is read from the node. Offsets are
/// below 2^31 (a node of 2^31 keys would hold 16 GiB of them): the key table keeps seven
/// bits of the key's hash in the top of offsets below 2^24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Loc {
    pub(super) node: u32,
    pub(super) off: u32,
}

/// The prefix index. See the [module documentation](super) for its semantics.
///
/// Not internally synchronized: wrap it in a lock to share it (the router does). Matching
/// takes `&self`; every mutation takes `&mut self`.
#[derive(Debug)]
pub struct PrefixIndex {
    pub(super) config: IndexConfig,
    pub(super) nodes: Vec<Node>,
    free: Vec<u32>,
    pub(super) table: KeyTable,
    /// Per worker: engine hash -> router key.
    pub(super) engine_maps: Vec<KeyMap<u64>>,
    /// Orphan root first key -> declared parent.
    pub(super) orphan_parent: KeyMap<u64>,
    /// Declared parent -> orphan root first keys.
    orphans_by_parent: KeyMap<Vec<u64>>,
    pub(super) holder_blocks: u64,
    pub(super) worker_blocks: Vec<u64>,
    tick: AtomicU64,
    pub(super) orphan_stores: u64,
    /// Holder-blocks whose reference count could not be incremented past `u16::MAX`.
    pub(super) ref_overflows: u64,
    pub(super) unknown_removals: u64,
    pub(super) evictions: u64,
    /// The last key written by the last store, and where it was then: the next event of
    /// the same sequence names it as its parent, and finds it here without a table
    /// probe. Only a hint, checked before use ([`PrefixIndex::locate`]).
    tail: (u64, Loc),
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new(IndexConfig::default())
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new(config: IndexConfig) -> Self {
        let root = Node { parent: NIL, live: true, ..Node::default() };
        PrefixIndex {
            config,
            nodes: vec![root],
            free: Vec::new(),
            table: KeyTable::default(),
            engine_maps: Vec::new(),
            orphan_parent: KeyMap::default(),
            orphans_by_parent: KeyMap::default(),
            holder_blocks: 0,
            worker_blocks: Vec::new(),
            tick: AtomicU64::new(1),
            orphan_stores: 0,
            ref_overflows: 0,
            unknown_removals: 0,
            evictions: 0,
            tail: (0, Loc { node: NIL, off: 0 }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    // ----- key table ---------------------------------------------------------------

    #[inline]
    pub(super) fn lookup(&self, key: u64) -> Option<Loc> {
        let nodes = &self.nodes;
        self.table.find(key, |l| nodes[l.node as usize].keys[l.off as usize])
    }

    /// The location of `key`, trying `hint` first: a live node holding `key` at the
    /// hinted offset is its location (a key is in at most one place of the tree), so a
    /// right hint costs one read of a node's key instead of a table probe (a chain of
    /// misses: control word, location, then the node's key); a stale one falls back to
    /// the table.
    #[inline]
    fn locate(&self, key: u64, hint: Loc) -> Option<Loc> {
        if let Some(n) = self.nodes.get(hint.node as usize) {
            if n.live && n.keys.get(hint.off as usize) == Some(&key) {
                return Some(hint);
            }
        }
        self.lookup(key)
    }

    /// Points `key` at `loc`. The key must still be readable at its old location.
    fn relocate(&mut self, key: u64, loc: Loc) {
        let nodes = &self.nodes;
        let found = self.table.set(key, loc, |l| nodes[l.node as usize].keys[l.off as usize]);
        debug_assert!(found, "relocate of a missing key");
    }

    /// Adds `key`, which must already be written at `loc` and not be in the table. Callers
    /// that write several keys into nodes before adding them call
    /// [`reserve_keys`](Self::reserve_keys) first, before writing them.
    pub(super) fn insert_key(&mut self, key: u64, loc: Loc) {
        if self.table.room() == 0 {
            // Not reserved: rebuild from the table's own entries (a node may hold keys
            // written but not added yet, so the tree cannot be walked here).
            let nodes = &self.nodes;
            let old = std::mem::take(&mut self.table);
            let mut t = KeyTable::with_room(old.len() * 2 + 1);
            for l in old.entries() {
                t.insert_new(nodes[l.node as usize].keys[l.off as usize], l);
            }
            self.table = t;
        }
        self.table.insert_new(key, loc);
    }

    /// Makes room in the key table for `n` more keys. The table is rebuilt (larger) by
    /// walking the nodes, whose keys are read in order, rather than by rehashing its
    /// entries, which needs one random read of a node's key per entry. Every key written
    /// in a node must be in the table when this is called. Returns whether the table was
    /// rebuilt (lines prefetched before then were the old table's).
    pub(super) fn reserve_keys(&mut self, n: usize) -> bool {
        let rebuild = self.table.room() < n;
        if rebuild {
            self.rebuild_table(self.table.len() + n);
        }
        rebuild
    }

    /// Rebuilds the key table with room for `n` keys from the nodes.
    #[inline(never)]
    fn rebuild_table(&mut self, n: usize) {
        self.table = KeyTable::default();
        let mut t = KeyTable::with_room(n);
        for (id, node) in self.nodes.iter().enumerate() {
            if !node.live {
                continue;
            }
            let keys = &node.keys;
            for &k in keys.iter().take(AHEAD) {
                t.prefetch_insert(k);
            }
            for (off, &k) in keys.iter().enumerate() {
                if let Some(&a) = keys.get(off + AHEAD) {
                    t.prefetch_insert(a);
                }
                t.insert_new(k, Loc { node: id as u32, off: off as u32 });
            }
        }
        self.table = t;
    }

    /// Drops keys `[a, b)` of node `n` from the table (the keys stay in the node),
    /// prefetching ahead.
    fn forget_range(&mut self, n: u32, a: usize, b: usize) {
        let nodes = &self.nodes;
        let keys = &nodes[n as usize].keys[a..b];
        for &k in keys.iter().take(AHEAD) {
            self.table.prefetch(k);
        }
        for (i, &k) in keys.iter().enumerate() {
            if let Some(&ahead) = keys.get(i + AHEAD) {
                self.table.prefetch(ahead);
            }
            self.table.remove(k, |l| nodes[l.node as usize].keys[l.off as usize]);
        }
    }

    // ----- nodes -------------------------------------------------------------------

    pub(super) fn alloc_node(&mut self, parent: u32) -> u32 {
        let tick = self.tick.load(Ordering::Relaxed);
        if let Some(id) = self.free.pop() {
            let n = &mut self.nodes[id as usize];
            n.parent = parent;
            n.live = true;
            *n.touched.get_mut() = tick;
            id
        } else {
            let id = self.nodes.len() as u32;
            self.nodes.push(Node {
                parent,
                live: true,
                touched: AtomicU64::new(tick),
                ..Node::default()
            });
            id
        }
    }

    fn free_node(&mut self, id: u32) {
        let n = &mut self.nodes[id as usize];
        n.keys = Vec::new();
        n.holders = Vec::new();
        n.bits = Bits::default();
        n.mixed = false;
        n.children = Children::default();
        n.parent = NIL;
        n.live = false;
        self.free.push(id);
    }

    /// Recomputes what is derived from node `n`'s holders (bitset, tier flag). Called
    /// after every change of a holder list.
    pub(super) fn refresh(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        node.mixed = node.holders.iter().any(|h| h.refs[0] == 0);
        node.bits.rebuild(&node.holders);
    }

    #[inline]
    fn touch(&self, id: u32) {
        let t = self.tick.load(Ordering::Relaxed);
        let touched = &self.nodes[id as usize].touched;
        if touched.load(Ordering::Relaxed) != t {
            touched.store(t, Ordering::Relaxed);
        }
    }

    fn bump_tick(&self) {
        self.tick.fetch_add(1, Ordering::Relaxed);
    }

    /// Splits node `n` so that it keeps keys `[0, p)`; a new child takes `[p, len)`, the
    /// holders and the children. Returns the new node.
    fn split(&mut self, n: u32, p: usize) -> u32 {
        debug_assert!(p > 0 && p < self.nodes[n as usize].keys.len());
        let m = self.alloc_node(n);
        let tail: Vec<u64> = self.nodes[n as usize].keys[p..].to_vec();
        let holders = self.nodes[n as usize].holders.clone();
        let bits = self.nodes[n as usize].bits.clone();
        let mixed = self.nodes[n as usize].mixed;
        let children = std::mem::take(&mut self.nodes[n as usize].children);
        let touched = self.nodes[n as usize].touched.load(Ordering::Relaxed);
        {
            let mn = &mut self.nodes[m as usize];
            mn.keys = tail;
            mn.holders = holders;
            mn.bits = bits;
            mn.mixed = mixed;
            mn.children = children;
            *mn.touched.get_mut() = touched;
        }
        for i in 0..self.nodes[m as usize].keys.len() {
            let k = self.nodes[m as usize].keys[i];
            self.relocate(k, Loc { node: m, off: i as u32 });
        }
        for c in self.nodes[m as usize].children.nodes() {
            self.nodes[c as usize].parent = m;
        }
        let first = self.nodes[m as usize].keys[0];
        let nn = &mut self.nodes[n as usize];
        nn.keys.truncate(p);
        if nn.keys.capacity() > 2 * nn.keys.len() + 8 {
            nn.keys.shrink_to_fit();
        }
        nn.children = Children::Small(vec![(first, m)]);
        m
    }

    /// Merges `c`, the only child of `n`, into `n`.
    fn merge_child(&mut self, n: u32, c: u32) {
        let off = self.nodes[n as usize].keys.len();
        let ckeys = std::mem::take(&mut self.nodes[c as usize].keys);
        self.nodes[n as usize].keys.extend_from_slice(&ckeys);
        self.nodes[c as usize].keys = ckeys;
        for i in 0..self.nodes[c as usize].keys.len() {
            let k = self.nodes[c as usize].keys[i];
            self.relocate(k, Loc { node: n, off: (off + i) as u32 });
        }
        let children = std::mem::take(&mut self.nodes[c as usize].children);
        for g in children.nodes() {
            self.nodes[g as usize].parent = n;
        }
        let ct = self.nodes[c as usize].touched.load(Ordering::Relaxed);
        let nn = &mut self.nodes[n as usize];
        nn.children = children;
        let nt = nn.touched.get_mut();
        *nt = (*nt).max(ct);
        self.free_node(c);
    }

    /// Restores path compression around `n` after its holders changed. Returns the node
    /// that now holds `n`'s keys.
    fn compact(&mut self, mut n: u32) -> u32 {
        if n == ROOT || !self.nodes[n as usize].live {
            return n;
        }
        // Merge into the parent when n is its only child and holders agree.
        let p = self.nodes[n as usize].parent;
        if p != ROOT
            && self.nodes[p as usize].children.len() == 1
            && self.nodes[p as usize].holders == self.nodes[n as usize].holders
        {
            self.merge_child(p, n);
            n = p;
        }
        // Absorb a single child with the same holders.
        if let Some(c) = self.nodes[n as usize].children.single() {
            if c != n && self.nodes[c as usize].holders == self.nodes[n as usize].holders {
                self.merge_child(n, c);
            }
        }
        n
    }

    /// Deletes `n` if it is an empty leaf, then walks up deleting or compacting.
    fn prune(&mut self, mut n: u32) {
        while n != ROOT && self.nodes[n as usize].live {
            let node = &self.nodes[n as usize];
            if !node.holders.is_empty() || !node.children.is_empty() {
                // Compaction may merge an empty single child into n, leaving an empty leaf.
                let m = self.compact(n);
                let mn = &self.nodes[m as usize];
                if m != ROOT && mn.live && mn.holders.is_empty() && mn.children.is_empty() {
                    n = m;
                    continue;
                }
                return;
            }
            let p = node.parent;
            let first = self.nodes[n as usize].keys[0];
            self.forget_range(n, 0, self.nodes[n as usize].keys.len());
            self.nodes[p as usize].children.remove(first);
            if p == ROOT {
                self.forget_orphan(first);
            }
            self.free_node(n);
            n = p;
        }
    }

    fn forget_orphan(&mut self, first: u64) {
        if let Some(parent) = self.orphan_parent.remove(&first) {
            if let Some(list) = self.orphans_by_parent.get_mut(&parent) {
                list.retain(|&k| k != first);
                if list.is_empty() {
                    self.orphans_by_parent.remove(&parent);
                }
            }
        }
    }

    fn ensure_worker(&mut self, w: u32) {
        let need = w as usize + 1;
        if self.worker_blocks.len() < need {
            self.worker_blocks.resize(need, 0);
        }
    }

    /// Isolates keys `[a, b)` of node `n` into a node of their own and returns it.
    fn isolate(&mut self, n: u32, a: usize, b: usize) -> u32 {
        let n = if a > 0 { self.split(n, a) } else { n };
        if b - a < self.nodes[n as usize].keys.len() {
            self.split(n, b - a);
        }
        n
    }

    /// Length of the run of `keys` that continues at `loc` inside one node (ascending).
    fn run_forward(&self, loc: Loc, keys: &[u64]) -> usize {
        let nk = &self.nodes[loc.node as usize].keys[loc.off as usize..];
        nk.iter().zip(keys).take_while(|(a, b)| a == b).count()
    }

    // ----- store -------------------------------------------------------------------

    /// Stores `keys` (a chain, in order) for `worker` in `tier`, the first key's parent
    /// being `parent` (`None` for a chain that starts at the root).
    pub fn store(
        &mut self,
        worker: WorkerId,
        tier: Tier,
        parent: Option<BlockKey>,
        keys: &[BlockKey],
    ) -> Result<StoreReport> {
        self.store_ahead(worker, tier, parent, keys, &[])
    }

    /// [`store`](Self::store), where `next` are keys the caller stores right after
    /// (the next event of a batch): as this store's last keys are written, the table
    /// groups of `next`'s first keys are prefetched, so that their misses overlap the end
    /// of this store instead of starting cold with the next one. Only a hint: the result
    /// is the same for any `next`.
    pub(crate) fn store_ahead(
        &mut self,
        worker: WorkerId,
        tier: Tier,
        parent: Option<BlockKey>,
        keys: &[BlockKey],
        next: &[BlockKey],
    ) -> Result<StoreReport> {
        let w = worker.0;
        if w > MAX_WORKER {
            return Err(Error::invalid(format!(
                "worker id {w} out of range (ids are dense, at most {MAX_WORKER})"
            )));
        }
        let t = tier.index();
        self.ensure_worker(w);
        self.bump_tick();
        let mut report = StoreReport { blocks: keys.len() as u32, ..StoreReport::default() };
        if keys.is_empty() {
            return Ok(report);
        }
        // The parent's and the first key's lookups below are independent misses (the
        // parent is usually the tail of the previous store, found without a probe).
        let hint = if parent == Some(self.tail.0) { self.tail.1 } else { NO_LOC };
        if let Some(p) = parent.filter(|_| hint == NO_LOC) {
            self.table.prefetch(p);
        }
        // The groups of the first keys too, not only the first's: in the common case
        // (new keys) they are what `attach_new` touches next, and their misses then
        // overlap the wait for the first key's lookup instead of following it.
        for &k in keys.iter().take(AHEAD) {
            self.table.prefetch_absent(k);
        }
        // The cursor is the key after which the next key attaches (None = root), with a
        // hint of its location.
        let mut cursor: Option<(u64, Loc)> = match parent {
            None => None,
            Some(p) => match self.locate(p, hint) {
                Some(loc) => Some((p, loc)),
                None => {
                    report.orphan = true;
                    self.orphan_stores += 1;
                    // Remember it only when the run starts a new root.
                    if self.lookup(keys[0]).is_none() {
                        self.orphan_parent.insert(keys[0], p);
                        self.orphans_by_parent.entry(p).or_default().push(keys[0]);
                    }
                    None
                }
            },
        };
        let mut created_first = Vec::new();
        let check_orphans = !self.orphans_by_parent.is_empty();
        let mut i = 0;
        while i < keys.len() {
            if let Some(loc) = self.lookup(keys[i]) {
                let run = self.run_forward(loc, &keys[i..]);
                let a = loc.off as usize;
                let n = self.isolate(loc.node, a, a + run);
                self.add_holder(n, w, t, run);
                let n = self.compact(n);
                self.touch(n);
                i += run;
                // (the node may have moved; the location is looked up when needed)
                cursor = Some((keys[i - 1], NO_LOC));
            } else {
                // Attach the keys from here up to the first one already in the index:
                // `attach_new` stops there, so each new key costs one table operation.
                let start = i;
                // (The first `AHEAD` keys' groups were prefetched above.)
                let prefetched = AHEAD.saturating_sub(start);
                let (run_len, last) =
                    self.attach_new(cursor, &keys[start..], prefetched, next, w, t);
                let run = &keys[start..start + run_len];
                i = start + run_len;
                report.new_blocks += run_len as u32;
                if check_orphans {
                    created_first.extend(
                        run.iter().copied().filter(|k| self.orphans_by_parent.contains_key(k)),
                    );
                }
                cursor = Some((keys[i - 1], last));
            }
        }
        if let Some(c) = cursor {
            self.tail = c;
        }
        for k in created_first {
            self.relink_orphans(k);
        }
        if let Some(cap) = self.config.max_holder_blocks {
            if self.holder_blocks > cap {
                report.evicted = self.evict_to(cap - cap / 20);
            }
        }
        Ok(report)
    }

    /// Adds one reference of (`w`, tier `t`) to every key of node `n` (`len` keys).
    fn add_holder(&mut self, n: u32, w: u32, t: usize, len: usize) {
        let holders = &mut self.nodes[n as usize].holders;
        match holders.binary_search_by_key(&w, |h| h.worker) {
            Ok(i) => {
                let r = &mut holders[i].refs[t];
                match r.checked_add(1) {
                    Some(v) => *r = v,
                    // The count stays at its maximum: a later removal may then drop the
                    // block before the engine does, so every lost reference is counted.
                    None => self.ref_overflows += len as u64,
                }
                if t == 0 && self.nodes[n as usize].mixed {
                    self.refresh(n);
                }
            }
            Err(i) => {
                let mut refs = [0u16; 3];
                refs[t] = 1;
                holders.insert(i, Holder { worker: w, refs });
                self.holder_blocks += len as u64;
                self.worker_blocks[w as usize] += len as u64;
                self.refresh(n);
            }
        }
    }

    /// Creates the keys of `run` after `cursor`, up to the first key that is already in
    /// the index (the first key must not be). Returns how many were attached: fewer than
    /// `run.len()` when a key exists already or `run` repeats a key (inconsistent input;
    /// the repeat would close a cycle), and the location of the last key attached.
    /// `cursor` is the key to attach after and a hint of its location; `prefetched`, how many
    /// leading keys of `run` the caller has already prefetched (with
    /// [`KeyTable::prefetch_absent`]); `next`, the keys the caller stores after `run`,
    /// whose groups are prefetched as `run` ends.
    fn attach_new(
        &mut self,
        cursor: Option<(u64, Loc)>,
        run: &[u64],
        prefetched: usize,
        next: &[u64],
        w: u32,
        t: usize,
    ) -> (usize, Loc) {
        let mut refs = [0u16; 3];
        refs[t] = 1;
        let me = Holder { worker: w, refs };
        let (c, off) = match cursor.and_then(|(k, hint)| self.locate(k, hint)) {
            Some(loc) => (loc.node, loc.off as usize),
            None => (ROOT, 0),
        };
        if c != ROOT && off + 1 < self.nodes[c as usize].keys.len() {
            self.split(c, off + 1);
        }
        let cn = &self.nodes[c as usize];
        let extend =
            c != ROOT && cn.children.is_empty() && cn.holders.len() == 1 && cn.holders[0] == me;
        let (target, base) = if extend {
            (c, cn.keys.len())
        } else {
            let m = self.alloc_node(c);
            self.nodes[m as usize].holders = vec![me];
            self.refresh(m);
            (m, 0)
        };
        // Keys are written to the node a chunk at a time (a key must be readable at its
        // location before the table holds it), so a run that stops early copies at most
        // one chunk too many.
        let mut got = 0;
        let mut written = 0;
        // Room for the whole run before any key is written (a rebuild reads the nodes; the
        // lines the caller prefetched were then the old table's).
        let prefetched = if self.reserve_keys(run.len()) { 0 } else { prefetched };
        for &k in run.iter().take(AHEAD).skip(prefetched) {
            self.table.prefetch_absent(k);
        }
        'chunks: for chunk in run.chunks(WARM) {
            let keys = &mut self.nodes[target as usize].keys;
            keys.reserve_exact(chunk.len());
            keys.extend_from_slice(chunk);
            written += chunk.len();
            for &k in chunk {
                // `k` is `run[got]`.
                // Past the run's end, the keys that follow it (`next`, a hint).
                let at = got + AHEAD;
                if let Some(&ahead) = run.get(at).or_else(|| next.get(at - run.len())) {
                    self.table.prefetch_absent(ahead);
                }
                let nodes = &self.nodes;
                // A key already present ends the run (it is a repeat within `run` when
                // it is one of the keys just written).
                let loc = Loc { node: target, off: (base + got) as u32 };
                if !self
                    .table
                    .insert_absent(k, loc, |l| nodes[l.node as usize].keys[l.off as usize])
                {
                    break 'chunks;
                }
                got += 1;
            }
        }
        let tk = &mut self.nodes[target as usize].keys;
        tk.truncate(base + got);
        if got < written && tk.capacity() > tk.len() + 8 {
            tk.shrink_to_fit();
        }
        self.holder_blocks += got as u64;
        self.worker_blocks[w as usize] += got as u64;
        if extend {
            self.touch(c);
        } else {
            self.nodes[c as usize].children.insert(run[0], target);
        }
        // (got >= 1: the first key is absent, and `run` is not empty)
        (got, Loc { node: target, off: (base + got).saturating_sub(1) as u32 })
    }

    /// Links the orphan roots waiting for `parent` (just created) under it.
    fn relink_orphans(&mut self, parent: u64) {
        let Some(firsts) = self.orphans_by_parent.remove(&parent) else {
            return;
        };
        for first in firsts {
            self.orphan_parent.remove(&first);
            let Some(loc) = self.lookup(first) else {
                continue;
            };
            let r = loc.node;
            if loc.off != 0 || self.nodes[r as usize].parent != ROOT {
                continue;
            }
            let Some(ploc) = self.lookup(parent) else {
                continue;
            };
            let pn = ploc.node;
            // Inconsistent parents (two events each naming the other's block as parent)
            // would close a cycle: leave the orphan a root if the parent is inside it.
            if self.is_ancestor_or_self(r, pn) {
                continue;
            }
            let poff = ploc.off as usize;
            if poff + 1 < self.nodes[pn as usize].keys.len() {
                self.split(pn, poff + 1); // pn keeps the head, which ends with `parent`
            }
            if self.nodes[pn as usize].children.get(first).is_some() {
                continue;
            }
            self.nodes[ROOT as usize].children.remove(first);
            self.nodes[r as usize].parent = pn;
            self.nodes[pn as usize].children.insert(first, r);
            self.compact(pn);
        }
    }

    /// True when `a` is `n` or one of its ancestors.
    fn is_ancestor_or_self(&self, a: u32, mut n: u32) -> bool {
        while n != NIL {
            if n == a {
                return true;
            }
            n = if n == ROOT { NIL } else { self.nodes[n as usize].parent };
        }
        false
    }

    // ----- remove ------------------------------------------------------------------

    /// Removes one reference of `worker` in `tier` from each of `keys` (any order).
    pub fn remove(&mut self, worker: WorkerId, tier: Tier, keys: &[BlockKey]) -> RemoveReport {
        let w = worker.0;
        let t = tier.index();
        let mut report = RemoveReport::default();
        let mut i = 0;
        while i < keys.len() {
            let Some(loc) = self.lookup(keys[i]) else {
                report.unknown += 1;
                i += 1;
                continue;
            };
            // Group a run of keys that sit next to each other in the same node, either
            // ascending or descending (vLLM frees a request's blocks tail first).
            let nk = &self.nodes[loc.node as usize].keys;
            let off = loc.off as usize;
            let mut len = 1;
            let mut desc = false;
            if i + 1 < keys.len() {
                if off + 1 < nk.len() && nk[off + 1] == keys[i + 1] {
                    while i + len < keys.len()
                        && off + len < nk.len()
                        && nk[off + len] == keys[i + len]
                    {
                        len += 1;
                    }
                } else if off > 0 && nk[off - 1] == keys[i + 1] {
                    desc = true;
                    while i + len < keys.len() && off >= len && nk[off - len] == keys[i + len] {
                        len += 1;
                    }
                }
            }
            let (a, b) = if desc { (off + 1 - len, off + 1) } else { (off, off + len) };
            i += len;
            let holders = &self.nodes[loc.node as usize].holders;
            let held = holders
                .binary_search_by_key(&w, |h| h.worker)
                .ok()
                .filter(|&hi| holders[hi].refs[t] > 0);
            let Some(hi) = held else {
                report.unknown += len as u32;
                continue;
            };
            let node = &self.nodes[loc.node as usize];
            let mut last = [0u16; 3];
            last[t] = 1;
            if a > 0
                && b == node.keys.len()
                && node.children.is_empty()
                && node.holders.len() == 1
                && node.holders[hi].refs == last
            {
                // The tail of a leaf that only this reference holds: cut it off in place
                // (one table operation per key, where a split would relocate the tail
                // first and then forget it).
                self.forget_range(loc.node, a, b);
                self.nodes[loc.node as usize].keys.truncate(a);
                report.removed += len as u32;
                self.holder_blocks -= len as u64;
                self.worker_blocks[w as usize] -= len as u64;
                continue;
            }
            let n = self.isolate(loc.node, a, b);
            report.removed += len as u32;
            let holders = &mut self.nodes[n as usize].holders;
            let hi = holders.binary_search_by_key(&w, |h| h.worker).expect("holder checked above");
            holders[hi].refs[t] -= 1;
            if holders[hi].is_empty() {
                holders.remove(hi);
                self.holder_blocks -= len as u64;
                self.worker_blocks[w as usize] -= len as u64;
            }
            self.refresh(n);
            self.prune(n);
        }
        self.unknown_removals += u64::from(report.unknown);
        report
    }

    /// Removes every block of `worker` in every tier. Returns the (block, worker) pairs
    /// dropped. Engine mappings of the worker are dropped too.
    pub fn clear_worker(&mut self, worker: WorkerId) -> u64 {
        let w = worker.0;
        let mut touched = Vec::new();
        let mut dropped = 0u64;
        for (id, node) in self.nodes.iter_mut().enumerate() {
            if !node.live {
                continue;
            }
            if let Ok(i) = node.holders.binary_search_by_key(&w, |h| h.worker) {
                node.holders.remove(i);
                dropped += node.keys.len() as u64;
                touched.push(id as u32);
            }
        }
        for &n in &touched {
            self.refresh(n);
        }
        self.holder_blocks -= dropped;
        if let Some(c) = self.worker_blocks.get_mut(w as usize) {
            *c = 0;
        }
        for n in touched {
            if self.nodes[n as usize].live {
                self.prune(n);
            }
        }
        if let Some(m) = self.engine_maps.get_mut(w as usize) {
            *m = KeyMap::default();
        }
        dropped
    }

    /// Forgets `worker` entirely (same as [`clear_worker`](Self::clear_worker)).
    pub fn remove_worker(&mut self, worker: WorkerId) -> u64 {
        self.clear_worker(worker)
    }

    // ----- engine-hash mapping -------------------------------------------------------

    /// Stores router `keys` for blocks the engine announced as `engine` hashes (same
    /// length), recording engine -> key for `worker`. The parent is given as an engine
    /// hash and resolved through the worker's map.
    pub fn store_mapped(
        &mut self,
        worker: WorkerId,
        tier: Tier,
        parent_engine: Option<u64>,
        engine: &[u64],
        keys: &[BlockKey],
    ) -> Result<StoreReport> {
        if engine.len() != keys.len() {
            return Err(Error::invalid(format!(
                "{} engine hashes but {} keys",
                engine.len(),
                keys.len()
            )));
        }
        if worker.0 > MAX_WORKER {
            return Err(Error::invalid(format!("worker id {} out of range", worker.0)));
        }
        let n = engine.len();
        let w = worker.index();
        if self.engine_maps.len() <= w {
            self.engine_maps.resize_with(w + 1, KeyMap::default);
        }
        let parent = match parent_engine {
            None => None,
            // An unknown parent hash is passed through as is so that the store counts it
            // as an orphan; it cannot collide with a router key in practice.
            Some(p) => Some(self.engine_maps[w].get(&p).copied().unwrap_or(p)),
        };
        for j in 0..n {
            self.engine_maps[w].insert(engine[j], keys[j]);
        }
        self.store(worker, tier, parent, &keys[..n])
    }

    /// Removes blocks that the engine names by `engine` hashes for `worker`.
    pub fn remove_mapped(&mut self, worker: WorkerId, tier: Tier, engine: &[u64]) -> RemoveReport {
        let w = worker.index();
        // (engine hash, router key) for the hashes this worker has a mapping for.
        let mut pairs = Vec::with_capacity(engine.len());
        if let Some(map) = self.engine_maps.get(w) {
            pairs.extend(engine.iter().filter_map(|e| map.get(e).map(|&k| (*e, k))));
        }
        let unknown = (engine.len() - pairs.len()) as u32;
        let keys: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        let mut report = self.remove(worker, tier, &keys);
        report.unknown += unknown;
        self.unknown_removals += u64::from(unknown);
        // Drop mappings of blocks the worker no longer holds anywhere.
        for (e, k) in pairs {
            if self.holds(worker, k).is_none() {
                if let Some(m) = self.engine_maps.get_mut(w) {
                    m.remove(&e);
                }
            }
        }
        report
    }

    /// The router key that `worker` recorded for engine hash `engine`, if any.
    pub fn engine_key(&self, worker: WorkerId, engine: u64) -> Option<BlockKey> {
        self.engine_maps.get(worker.index())?.get(&engine).copied()
    }

    // ----- queries -------------------------------------------------------------------

    /// The per-tier reference counts of `worker` on `key`, or `None` if it does not hold it.
    pub fn holds(&self, worker: WorkerId, key: BlockKey) -> Option<[u16; 3]> {
        let loc = self.lookup(key)?;
        let h = &self.nodes[loc.node as usize].holders;
        h.binary_search_by_key(&worker.0, |h| h.worker).ok().map(|i| h[i].refs)
    }

    /// True when `key` is in the index for any worker.
    pub fn contains(&self, key: BlockKey) -> bool {
        self.lookup(key).is_some()
    }

    /// Number of (block, worker) pairs held by `worker`.
    pub fn worker_blocks(&self, worker: WorkerId) -> u64 {
        self.worker_blocks.get(worker.index()).copied().unwrap_or(0)
    }

    /// Matches a request's chain of `keys` against the index, filling `out` (see
    /// [`Matches`]).
    ///
    /// The cost is one pass over the path plus one write per candidate worker: workers
    /// are carried down the path as a bitset ("still matching"), intersected with each
    /// node's holder bitset a word (64 workers) at a time, and a depth is recorded only
    /// for the workers that drop out. Tiers are looked at only on nodes where some holder
    /// has no GPU copy.
    pub fn find_matches(&self, keys: &[BlockKey], opts: MatchOptions, out: &mut Matches) {
        out.clear();
        let Some(&k0) = keys.first() else {
            return;
        };
        let Some(c0) = self.nodes[ROOT as usize].children.get(k0) else {
            return;
        };
        let n0 = &self.nodes[c0 as usize];
        if !n0.holders.is_empty() && !n0.bits.words.is_empty() {
            self.find_matches_bits(c0, keys, opts, out);
        } else {
            self.find_matches_list(keys, opts, out);
        }
    }

    /// [`find_matches`](Self::find_matches) when the first node's holders have a bitset.
    fn find_matches_bits(&self, c0: u32, keys: &[u64], opts: MatchOptions, out: &mut Matches) {
        let n0 = &self.nodes[c0 as usize];
        let base = n0.bits.base;
        let w0 = &n0.bits.words[..];
        let nw = w0.len();
        let Matches { entries, live, rank, depth: dropped, fix, tmp, truncated, .. } = out;
        live.extend_from_slice(w0);
        let mut r = 0u32;
        rank.extend(w0.iter().map(|w| {
            let at = r;
            r += w.count_ones();
            at
        }));
        // Depth at which each candidate (by rank in n0's holders) dropped out, 0 = never;
        // sized at the first drop (a walk where nobody drops out never touches it).
        let rank_of = |i: usize, b: u32| rank[i] + (w0[i] & ((1u64 << b) - 1)).count_ones();
        let mut alive = n0.holders.len() as u32;
        let mut node = c0;
        let mut pos = 0usize;
        let mut at = 0u32;
        loop {
            let cn = &self.nodes[node as usize];
            let n = common_prefix(&cn.keys, &keys[pos..]);
            self.touch(node);
            if node != c0 {
                let words: &[u64] = if cn.bits.words.is_empty() && !cn.holders.is_empty() {
                    // Sparse holder ids: the node's holders inside the candidates' span.
                    tmp.clear();
                    tmp.resize(nw, 0);
                    for h in &cn.holders {
                        let g = (h.worker / 64).wrapping_sub(base) as usize;
                        if g < nw {
                            tmp[g] |= 1 << (h.worker % 64);
                        }
                    }
                    tmp
                } else {
                    &[]
                };
                let mut left = 0u32;
                for i in 0..nw {
                    let have =
                        if words.is_empty() { cn.bits.word(base + i as u32) } else { words[i] };
                    let l = live[i];
                    let mut gone = l & !have;
                    if gone != 0 && dropped.is_empty() {
                        dropped.resize(n0.holders.len(), 0);
                    }
                    while gone != 0 {
                        let b = gone.trailing_zeros();
                        dropped[rank_of(i, b) as usize] = at;
                        gone &= gone - 1;
                    }
                    live[i] = l & have;
                    left += live[i].count_ones();
                }
                alive = left;
                if alive == 0 {
                    break;
                }
            }
            if cn.mixed {
                for h in cn.holders.iter().filter(|h| h.refs[0] == 0) {
                    let g = (h.worker / 64).wrapping_sub(base) as usize;
                    let b = h.worker % 64;
                    if g < nw && live[g] >> b & 1 == 1 {
                        fix.push((rank_of(g, b), h.best_tier() as u32, n as u32));
                    }
                }
            }
            at += n as u32;
            pos += n;
            if pos == keys.len() || n < cn.keys.len() {
                break;
            }
            if opts.early_exit && alive <= 1 {
                *truncated = true;
                break;
            }
            let Some(c) = cn.children.get(keys[pos]) else {
                break;
            };
            node = c;
        }
        entries.reserve(n0.holders.len());
        if dropped.is_empty() {
            entries.extend(n0.holders.iter().map(|h| Overlap {
                worker: WorkerId(h.worker),
                blocks: at,
                by_tier: [at, 0, 0],
            }));
        } else {
            entries.extend(n0.holders.iter().zip(dropped.iter()).map(|(h, &d)| {
                let blocks = if d == 0 { at } else { d };
                Overlap { worker: WorkerId(h.worker), blocks, by_tier: [blocks, 0, 0] }
            }));
        }
        for &(r, t, n) in fix.iter() {
            let e = &mut entries[r as usize];
            e.by_tier[0] -= n;
            e.by_tier[t as usize] += n;
        }
    }

    /// [`find_matches`](Self::find_matches) by intersecting sorted holder lists (holder
    /// ids too sparse for a bitset).
    fn find_matches_list(&self, keys: &[u64], opts: MatchOptions, out: &mut Matches) {
        // (no tick bump: reads share the tick of the last mutation)
        let mut node = ROOT;
        let mut pos = 0usize;
        let mut first = true;
        while pos < keys.len() {
            let Some(c) = self.nodes[node as usize].children.get(keys[pos]) else {
                break;
            };
            let cn = &self.nodes[c as usize];
            let n = common_prefix(&cn.keys, &keys[pos..]);
            self.touch(c);
            let n32 = n as u32;
            if first {
                first = false;
                out.entries.reserve(cn.holders.len());
                for (i, h) in cn.holders.iter().enumerate() {
                    let mut by_tier = [0u32; 3];
                    by_tier[h.best_tier()] = n32;
                    out.entries.push(Overlap { worker: WorkerId(h.worker), blocks: n32, by_tier });
                    out.alive.push(i as u32);
                }
            } else {
                // Keep the workers that also hold this run (both lists sorted by worker).
                // A plain two-pointer loop over locals: `retain` with a closure that
                // captures `j` and `entries` keeps them in memory on every step.
                let hs = &cn.holders[..];
                let entries = &mut out.entries[..];
                let alive = &mut out.alive;
                let (mut j, mut k) = (0usize, 0usize);
                for r in 0..alive.len() {
                    let ei = alive[r];
                    let e = &mut entries[ei as usize];
                    let w = e.worker.0;
                    while j < hs.len() && hs[j].worker < w {
                        j += 1;
                    }
                    if j < hs.len() && hs[j].worker == w {
                        e.blocks += n32;
                        e.by_tier[hs[j].best_tier()] += n32;
                        alive[k] = ei;
                        k += 1;
                    }
                }
                alive.truncate(k);
            }
            pos += n;
            if out.alive.is_empty() || n < cn.keys.len() {
                break;
            }
            if opts.early_exit && out.alive.len() <= 1 {
                out.truncated = pos < keys.len();
                break;
            }
            node = c;
        }
    }

    /// Statistics, with heap bytes summed from real allocation sizes.
    pub fn stats(&self) -> IndexStats {
        let mut heap = self.table.allocation_size()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free.capacity() * 4
            + self.worker_blocks.capacity() * 8
            + self.orphan_parent.allocation_size()
            + self.orphans_by_parent.allocation_size()
            + self.engine_maps.capacity() * std::mem::size_of::<KeyMap<u64>>();
        let mut nodes = 0u64;
        for n in &self.nodes {
            heap += n.keys.capacity() * 8
                + n.holders.capacity() * std::mem::size_of::<Holder>()
                + n.bits.words.len() * 8
                + n.children.heap_bytes();
            if n.live {
                nodes += 1;
            }
        }
        for m in &self.engine_maps {
            heap += m.allocation_size();
        }
        for v in self.orphans_by_parent.values() {
            heap += v.capacity() * 8;
        }
        IndexStats {
            blocks: self.table.len() as u64,
            holder_blocks: self.holder_blocks,
            nodes: nodes.saturating_sub(1),
            heap_bytes: heap as u64,
            engine_mappings: self.engine_maps.iter().map(|m| m.len() as u64).sum(),
            orphans_pending: self.orphan_parent.len() as u64,
            orphan_stores: self.orphan_stores,
            unknown_removals: self.unknown_removals,
            evictions: self.evictions,
            ref_overflows: self.ref_overflows,
        }
    }

    /// Renames worker ids: holder `w` becomes `map[w]`. Used when a snapshot taken by one
    /// router is restored into another whose registry numbered the workers differently.
    /// Every id held must be mapped, and no two ids may map to the same one.
    pub fn remap_workers(&mut self, map: &HashMap<u32, u32>) -> Result<()> {
        let mut seen = hashbrown::HashSet::new();
        for (&from, &to) in map {
            if to > MAX_WORKER || !seen.insert(to) {
                return Err(Error::invalid(format!("bad worker remap {from} -> {to}")));
            }
        }
        for n in self.nodes.iter().filter(|n| n.live) {
            if let Some(h) = n.holders.iter().find(|h| !map.contains_key(&h.worker)) {
                return Err(Error::invalid(format!("worker id {} is not mapped", h.worker)));
            }
        }
        let mut blocks = vec![0u64; map.values().max().map_or(0, |&m| m as usize + 1)];
        for n in self.nodes.iter_mut().filter(|n| n.live) {
            for h in &mut n.holders {
                h.worker = map[&h.worker];
                blocks[h.worker as usize] += n.keys.len() as u64;
            }
            n.holders.sort_unstable_by_key(|h| h.worker);
        }
        for n in 1..self.nodes.len() as u32 {
            if self.nodes[n as usize].live {
                self.refresh(n);
            }
        }
        self.worker_blocks = blocks;
        let old = std::mem::take(&mut self.engine_maps);
        for (w, m) in old.into_iter().enumerate() {
            if m.is_empty() {
                continue;
            }
            let Some(&to) = map.get(&(w as u32)) else {
                continue;
            };
            if self.engine_maps.len() <= to as usize {
                self.engine_maps.resize_with(to as usize + 1, KeyMap::default);
            }
            self.engine_maps[to as usize] = m;
        }
        Ok(())
    }

    /// Releases spare capacity of the key table (for example after a large drain).
    pub fn shrink_to_fit(&mut self) {
        self.rebuild_table(self.table.len());
        // Trailing free nodes can be dropped; interior ones stay for reuse.
        while self.nodes.len() > 1 && !self.nodes.last().is_some_and(|n| n.live) {
            let id = (self.nodes.len() - 1) as u32;
            self.nodes.pop();
            self.free.retain(|&f| f != id);
        }
        self.nodes.shrink_to_fit();
        self.free.shrink_to_fit();
        for m in &mut self.engine_maps {
            m.shrink_to_fit();
        }
    }

    // ----- eviction ----------------------------------------------------------------

    /// Evicts least recently used leaf runs until at most `target` holder-blocks remain.
    fn evict_to(&mut self, target: u64) -> u64 {
        let mut evicted = 0u64;
        // Keys evicted per worker with engine mappings, dropped from the maps in one pass
        // per worker at the end (not one scan of the map per evicted run).
        let mut evicted_keys: KeyMap<hashbrown::HashSet<u64, BuildHasherDefault<KeyHasher>>> =
            KeyMap::default();
        while self.holder_blocks > target {
            let mut leaves: Vec<(u64, u32)> = self
                .nodes
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, n)| n.live && n.children.is_empty())
                .map(|(i, n)| (n.touched.load(Ordering::Relaxed), i as u32))
                .collect();
            if leaves.is_empty() {
                break;
            }
            leaves.sort_unstable();
            for (_, id) in leaves {
                if self.holder_blocks <= target {
                    break;
                }
                let node = &mut self.nodes[id as usize];
                if !node.live || !node.children.is_empty() {
                    continue;
                }
                let len = node.keys.len() as u64;
                let holders = std::mem::take(&mut node.holders);
                self.refresh(id);
                for h in &holders {
                    self.worker_blocks[h.worker as usize] -= len;
                    if self.engine_maps.get(h.worker as usize).is_some_and(|m| !m.is_empty()) {
                        let gone = evicted_keys.entry(u64::from(h.worker)).or_default();
                        gone.extend(self.nodes[id as usize].keys.iter().copied());
                    }
                }
                let n = len * holders.len() as u64;
                self.holder_blocks -= n;
                evicted += n;
                self.prune(id);
            }
        }
        for (w, gone) in evicted_keys {
            if let Some(m) = self.engine_maps.get_mut(w as usize) {
                m.retain(|_, k| !gone.contains(k));
            }
        }
        self.evictions += evicted;
        evicted
    }
}

/// Length of the common prefix of two key slices.
#[inline]
fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    // Compare in chunks of 8 with an OR of XORs: branch-free inside a chunk and inlined
    // as vector code (a slice `!=` becomes a libc memcmp call per 64 bytes).
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let mut acc = 0u64;
        for j in 0..8 {
            acc |= ca[j] ^ cb[j];
        }
        if acc != 0 {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Access for the snapshot module.
impl PrefixIndex {
    pub(super) fn orphan_entries(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.orphan_parent.iter().map(|(&a, &b)| (a, b)).collect();
        v.sort_unstable();
        v
    }

    pub(super) fn add_orphan(&mut self, first: u64, parent: u64) {
        self.orphan_parent.insert(first, parent);
        self.orphans_by_parent.entry(parent).or_default().push(first);
    }

    /// Links `child` (whose keys and holders are set) under `parent`.
    pub(super) fn attach_child(&mut self, parent: u32, first: u64, child: u32) {
        self.refresh(child);
        self.nodes[parent as usize].children.insert(first, child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Tier, WorkerId};

    fn chain(c: u64) -> Vec<u64> {
        (0..100).map(|p| crate::rng::splitmix64((c << 32) | p)).collect()
    }

    /// `store_ahead`'s `next` is only a prefetch hint: with any hint (the keys stored
    /// next, other keys, keys already present, none), every store, removal and snapshot
    /// is the same as with `store`, including across table rebuilds, splits, chains that
    /// extend a node and runs that meet existing keys.
    #[test]
    fn store_ahead_hints_change_nothing() {
        let mut plain = PrefixIndex::default();
        let mut hinted = PrefixIndex::default();
        let mut r = 0x5eed_u64;
        let mut rand = move |n: u64| {
            r = crate::rng::splitmix64(r);
            r % n
        };
        let chains: Vec<Vec<u64>> = (0..24).map(chain).collect();
        for step in 0..3000 {
            let c = &chains[rand(24) as usize];
            let a = rand(100) as usize;
            let b = (a + 1 + rand(40) as usize).min(100);
            let w = WorkerId(rand(5) as u32);
            let tier = if rand(4) == 0 { Tier::Cpu } else { Tier::Gpu };
            let parent = if a == 0 { None } else { Some(c[a - 1]) };
            if rand(5) == 0 {
                assert_eq!(
                    plain.remove(w, tier, &c[a..b]),
                    hinted.remove(w, tier, &c[a..b]),
                    "step {step}"
                );
                continue;
            }
            let other = &chains[rand(24) as usize];
            let next: &[u64] = match rand(4) {
                0 => &c[b..],
                1 => &other[rand(100) as usize..],
                2 => &c[a..b],
                _ => &[],
            };
            assert_eq!(
                plain.store(w, tier, parent, &c[a..b]).unwrap(),
                hinted.store_ahead(w, tier, parent, &c[a..b], next).unwrap(),
                "step {step}"
            );
            if step % 500 == 0 {
                assert_eq!(plain.snapshot(), hinted.snapshot(), "step {step}");
            }
        }
        assert_eq!(plain.snapshot(), hinted.snapshot());
        assert_eq!(plain.stats(), hinted.stats());
    }

    /// The LRU clock must order stores correctly across 2^32 stores: eviction takes the
    /// oldest leaves first even when the clock passes `u32::MAX` between two stores.
    #[test]
    fn eviction_order_survives_the_clock_passing_u32_max() {
        let mut idx = PrefixIndex::new(IndexConfig { max_holder_blocks: Some(1000) });
        // As if 2^32 - 5 stores had already happened.
        idx.tick.store((u32::MAX - 5) as _, Ordering::Relaxed);
        for c in 0..10u64 {
            idx.store(WorkerId(c as u32), Tier::Gpu, None, &chain(c)).unwrap();
        }
        assert_eq!(idx.stats().evictions, 0);
        // The 11th chain takes the index over the cap: the oldest chains must go.
        idx.store(WorkerId(10), Tier::Gpu, None, &chain(10)).unwrap();
        let mut m = Matches::new();
        for c in 0..=10u64 {
            idx.find_matches(&chain(c), MatchOptions::default(), &mut m);
            let want = if c < 2 { 0 } else { 100 };
            assert_eq!(m.max_blocks(), want, "chain {c} (stored {c}th)");
        }
    }
}
