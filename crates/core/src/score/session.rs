//! The session-affinity table: which worker last served a session key (client IP or session
//! id), for a time to live, in bounded memory.
//!
//! Keys are hashed to u64 with XXH3-64 ([`session_hash`]) so the table stores no strings. The
//! entries form an intrusive doubly-linked list in a slab, most recently used first, so that
//! lookup, record, refresh and eviction are O(1). When the table is full, recording a new key
//! first drops expired entries from the least recently used end, then evicts the least
//! recently used entry (counted in [`SessionTable::evictions`]).
//!
//! [`SessionTable`] is not synchronized. The router uses [`ShardedSessionTable`]: the same
//! table split by key hash into independently locked shards, so that concurrent
//! session-keyed requests rarely wait on each other.

use crate::types::WorkerId;
use crate::{Error, Result};
use hashbrown::HashMap;
use parking_lot::Mutex;

/// The default time to live of an entry: 2 hours, as the design fixes it. (Kubernetes'
/// `sessionAffinityConfig.clientIP.timeoutSeconds` defaults to 10800 s, 3 hours; pass that to
/// [`SessionTable::new`] for the same behaviour.)
pub const DEFAULT_TTL_MS: u64 = 2 * 60 * 60 * 1000;

/// The default bound on entries (about 5 MB at capacity).
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

const NIL: u32 = u32::MAX;

/// The 64-bit key of a session string (XXH3-64 of its UTF-8 bytes).
#[inline]
pub fn session_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

#[derive(Clone, Debug)]
struct Node {
    key: u64,
    worker: WorkerId,
    last_ms: u64,
    prev: u32,
    next: u32,
}

/// Session key -> worker that last served it, with a time to live refreshed on every
/// [`SessionTable::record`], and a bound on entries with least-recently-used eviction.
#[derive(Clone, Debug)]
pub struct SessionTable {
    map: HashMap<u64, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    max_entries: usize,
    ttl_ms: u64,
    evictions: u64,
    expirations: u64,
}

impl Default for SessionTable {
    /// A table with [`DEFAULT_MAX_ENTRIES`] and [`DEFAULT_TTL_MS`].
    fn default() -> Self {
        Self::with_limits(DEFAULT_MAX_ENTRIES, DEFAULT_TTL_MS)
    }
}

impl SessionTable {
    /// A table holding at most `max_entries` keys, each valid for `ttl_ms` after it was last
    /// recorded.
    ///
    /// Returns [`Error::Config`] if `max_entries` is 0 or not below `u32::MAX`, or `ttl_ms`
    /// is 0.
    pub fn new(max_entries: usize, ttl_ms: u64) -> Result<Self> {
        if max_entries == 0 || max_entries >= NIL as usize {
            return Err(Error::config(format!(
                "session table max_entries must be in 1..{NIL}, got {max_entries}"
            )));
        }
        if ttl_ms == 0 {
            return Err(Error::config("session table ttl_ms must be positive"));
        }
        Ok(Self::with_limits(max_entries, ttl_ms))
    }

    fn with_limits(max_entries: usize, ttl_ms: u64) -> Self {
        SessionTable {
            map: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            max_entries,
            ttl_ms,
            evictions: 0,
            expirations: 0,
        }
    }

    /// The worker that last served `key`, unless the entry is older than the time to live
    /// (`now_ms - last_recorded_ms >= ttl_ms`) or absent. Does not refresh the entry.
    #[inline]
    pub fn get(&self, key: &str, now_ms: u64) -> Option<WorkerId> {
        self.get_hashed(session_hash(key), now_ms)
    }

    /// [`SessionTable::get`] with a key already hashed by [`session_hash`].
    #[inline]
    pub fn get_hashed(&self, key: u64, now_ms: u64) -> Option<WorkerId> {
        let slot = *self.map.get(&key)?;
        let node = &self.nodes[slot as usize];
        if self.expired(node, now_ms) {
            None
        } else {
            Some(node.worker)
        }
    }

    /// Records that `worker` served `key` at `now_ms`: inserts or updates the entry, makes
    /// it the most recently used and restarts its time to live.
    pub fn record(&mut self, key: &str, worker: WorkerId, now_ms: u64) {
        self.record_hashed(session_hash(key), worker, now_ms)
    }

    /// [`SessionTable::record`] with a key already hashed by [`session_hash`].
    pub fn record_hashed(&mut self, key: u64, worker: WorkerId, now_ms: u64) {
        if let Some(&slot) = self.map.get(&key) {
            let node = &mut self.nodes[slot as usize];
            node.worker = worker;
            node.last_ms = node.last_ms.max(now_ms);
            self.unlink(slot);
            self.push_front(slot);
            return;
        }
        // Drop expired entries from the old end before evicting live ones.
        self.purge_expired(now_ms);
        if self.map.len() >= self.max_entries {
            let victim = self.tail;
            self.remove_slot(victim);
            self.evictions += 1;
        }
        let node = Node { key, worker, last_ms: now_ms, prev: NIL, next: NIL };
        let slot = match self.free.pop() {
            Some(s) => {
                self.nodes[s as usize] = node;
                s
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.map.insert(key, slot);
        self.push_front(slot);
    }

    /// Forgets `key`; returns the worker it was mapped to, expired or not.
    pub fn remove(&mut self, key: &str) -> Option<WorkerId> {
        let slot = *self.map.get(&session_hash(key))?;
        let w = self.nodes[slot as usize].worker;
        self.remove_slot(slot);
        Some(w)
    }

    /// Forgets every entry pointing at `worker` (the worker left or failed); returns how
    /// many were removed. O(entries).
    pub fn remove_worker(&mut self, worker: WorkerId) -> usize {
        let mut removed = 0;
        let mut cur = self.head;
        while cur != NIL {
            let next = self.nodes[cur as usize].next;
            if self.nodes[cur as usize].worker == worker {
                self.remove_slot(cur);
                removed += 1;
            }
            cur = next;
        }
        removed
    }

    /// Drops expired entries from the least recently used end; returns how many were dropped
    /// (also counted in [`SessionTable::expirations`]). Entries are ordered by their last
    /// record, so this stops at the first live entry.
    pub fn purge_expired(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while self.tail != NIL && self.expired(&self.nodes[self.tail as usize], now_ms) {
            self.remove_slot(self.tail);
            n += 1;
        }
        self.expirations += n as u64;
        n
    }

    /// Number of entries held, including expired ones not yet purged.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The time to live of an entry, in milliseconds.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// How many live entries were evicted because the table was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// How many expired entries were purged.
    pub fn expirations(&self) -> u64 {
        self.expirations
    }

    #[inline]
    fn expired(&self, node: &Node, now_ms: u64) -> bool {
        now_ms.saturating_sub(node.last_ms) >= self.ttl_ms
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let n = &self.nodes[slot as usize];
            (n.prev, n.next)
        };
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[slot as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.nodes[old as usize].prev = slot;
        } else {
            self.tail = slot;
        }
        self.head = slot;
    }

    fn remove_slot(&mut self, slot: u32) {
        self.unlink(slot);
        let key = self.nodes[slot as usize].key;
        self.map.remove(&key);
        self.free.push(slot);
    }
}

/// Read access to a session table, as scorers need it (see
/// [`ScoreContext`](super::ScoreContext)): implemented by [`SessionTable`] and by the
/// router's [`ShardedSessionTable`].
pub trait SessionLookup: Send + Sync + std::fmt::Debug {
    /// The worker that last served `key`, unless expired at `now_ms` or absent.
    fn get(&self, key: &str, now_ms: u64) -> Option<WorkerId>;
}

impl SessionLookup for SessionTable {
    #[inline]
    fn get(&self, key: &str, now_ms: u64) -> Option<WorkerId> {
        SessionTable::get(self, key, now_ms)
    }
}

/// The most shards a [`ShardedSessionTable`] uses.
pub const SESSION_SHARDS: usize = 16;

/// One shard on its own cache lines, so that two threads working on two shards do not
/// bounce one line between their cores.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<SessionTable>);

/// A [`SessionTable`] split by key hash into up to [`SESSION_SHARDS`] independently
/// locked tables, for concurrent use through `&self`: requests with different session
/// keys rarely wait on each other (the router used to take one write lock over the whole
/// table for every session-keyed request).
///
/// The bound on entries is split over the shards (their bounds add up to
/// `max_entries`), and each shard evicts its own least recently used entry when full,
/// so eviction is least recently used per shard: with hashed keys spread evenly that is
/// close to, but not exactly, the global order a single table keeps. Time to live,
/// refresh and lookups behave exactly as in [`SessionTable`].
#[derive(Debug)]
pub struct ShardedSessionTable {
    shards: Box<[Shard]>,
    /// `shards.len() - 1` (a power of two minus one).
    mask: usize,
    max_entries: usize,
    ttl_ms: u64,
}

impl ShardedSessionTable {
    /// A table holding at most `max_entries` keys in total, each valid for `ttl_ms` after
    /// it was last recorded. Same limits as [`SessionTable::new`]. Fewer entries than
    /// [`SESSION_SHARDS`] give fewer shards, so that every shard holds at least one.
    pub fn new(max_entries: usize, ttl_ms: u64) -> Result<Self> {
        SessionTable::new(max_entries, ttl_ms)?; // the same checks, one message
        let n = if max_entries >= SESSION_SHARDS {
            SESSION_SHARDS
        } else {
            // The largest power of two not above max_entries (>= 1).
            1 << (usize::BITS - 1 - max_entries.leading_zeros())
        };
        let shards = (0..n)
            .map(|i| {
                let share = max_entries / n + usize::from(i < max_entries % n);
                Shard(Mutex::new(SessionTable::with_limits(share, ttl_ms)))
            })
            .collect();
        Ok(ShardedSessionTable { shards, mask: n - 1, max_entries, ttl_ms })
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Mutex<SessionTable> {
        // High bits: each shard's map hashes the key again for its own buckets.
        &self.shards[(hash >> 56) as usize & self.mask].0
    }

    /// Records that `worker` served `key` at `now_ms` ([`SessionTable::record`]).
    pub fn record(&self, key: &str, worker: WorkerId, now_ms: u64) {
        let h = session_hash(key);
        self.shard(h).lock().record_hashed(h, worker, now_ms);
    }

    /// Forgets `key`; returns the worker it was mapped to ([`SessionTable::remove`]).
    pub fn remove(&self, key: &str) -> Option<WorkerId> {
        self.shard(session_hash(key)).lock().remove(key)
    }

    /// Forgets every entry pointing at `worker`; returns how many were removed.
    pub fn remove_worker(&self, worker: WorkerId) -> usize {
        self.shards.iter().map(|s| s.0.lock().remove_worker(worker)).sum()
    }

    /// Number of entries held (summed over the shards, each read in turn).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    /// Whether no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound on entries, over all shards.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The time to live of an entry, in milliseconds.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Live entries evicted because their shard was full.
    pub fn evictions(&self) -> u64 {
        self.shards.iter().map(|s| s.0.lock().evictions()).sum()
    }

    /// Expired entries purged.
    pub fn expirations(&self) -> u64 {
        self.shards.iter().map(|s| s.0.lock().expirations()).sum()
    }
}

impl SessionLookup for ShardedSessionTable {
    #[inline]
    fn get(&self, key: &str, now_ms: u64) -> Option<WorkerId> {
        let h = session_hash(key);
        self.shard(h).lock().get_hashed(h, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W0: WorkerId = WorkerId(0);
    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    #[test]
    fn sharded_table_behaves_like_one_table_for_ttl_refresh_and_removal() {
        let t = ShardedSessionTable::new(1000, 1000).unwrap();
        assert_eq!(t.shard_count(), SESSION_SHARDS);
        let keys: Vec<String> = (0..200).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        for (i, k) in keys.iter().enumerate() {
            t.record(k, WorkerId(i as u32 % 3), 5_000);
        }
        assert_eq!(t.len(), 200);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(SessionLookup::get(&t, k, 5_999), Some(WorkerId(i as u32 % 3)));
            assert_eq!(SessionLookup::get(&t, k, 6_000), None, "expired at exactly ttl");
        }
        t.record(&keys[0], W2, 5_900);
        assert_eq!(SessionLookup::get(&t, &keys[0], 6_500), Some(W2));
        let on_w1 = keys.iter().enumerate().filter(|(i, _)| i % 3 == 1).count();
        assert_eq!(t.remove_worker(W1), on_w1);
        assert_eq!(t.len(), 200 - on_w1);
        assert_eq!(t.remove(&keys[0]), Some(W2));
        assert_eq!(SessionLookup::get(&t, &keys[0], 5_000), None);
    }

    #[test]
    fn sharded_table_keeps_its_total_bound() {
        for max in [1usize, 2, 3, 5, 16, 17, 100] {
            let t = ShardedSessionTable::new(max, 1_000_000).unwrap();
            assert!(t.shard_count() <= max && t.shard_count().is_power_of_two());
            for i in 0..max * 10 + 50 {
                t.record(&format!("key-{i}"), W0, i as u64);
            }
            assert!(t.len() <= max, "max {max}: {} entries", t.len());
            assert_eq!(t.evictions() as usize, max * 10 + 50 - t.len());
            // The most recent key is always kept.
            assert_eq!(SessionLookup::get(&t, &format!("key-{}", max * 10 + 49), 0), Some(W0));
        }
        assert!(ShardedSessionTable::new(0, 10).is_err());
        assert!(ShardedSessionTable::new(10, 0).is_err());
    }

    #[test]
    fn sharded_table_from_two_threads_keeps_every_record() {
        let t = ShardedSessionTable::new(100_000, 1_000_000).unwrap();
        std::thread::scope(|s| {
            for th in 0..2u32 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..5_000u32 {
                        let k = format!("{th}-{i}");
                        t.record(&k, WorkerId(th), 1);
                        assert_eq!(SessionLookup::get(t, &k, 2), Some(WorkerId(th)));
                    }
                });
            }
        });
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.remove_worker(WorkerId(1)), 5_000);
    }

    #[test]
    fn default_ttl_is_two_hours() {
        let t = SessionTable::default();
        assert_eq!(t.ttl_ms(), 7_200_000);
        assert_eq!(t.max_entries(), DEFAULT_MAX_ENTRIES);
    }

    #[test]
    fn rejects_bad_limits() {
        assert!(matches!(SessionTable::new(0, 10), Err(Error::Config(_))));
        assert!(matches!(SessionTable::new(10, 0), Err(Error::Config(_))));
    }

    #[test]
    fn ttl_expiry_and_refresh() {
        let mut t = SessionTable::new(10, 1000).unwrap();
        t.record("10.0.0.1", W1, 5_000);
        assert_eq!(t.get("10.0.0.1", 5_000), Some(W1));
        assert_eq!(t.get("10.0.0.1", 5_999), Some(W1));
        // Exactly ttl after the last record: expired.
        assert_eq!(t.get("10.0.0.1", 6_000), None);
        // A get does not refresh; a record does.
        t.record("10.0.0.1", W1, 5_900);
        assert_eq!(t.get("10.0.0.1", 6_500), Some(W1));
        assert_eq!(t.get("10.0.0.1", 6_899), Some(W1));
        assert_eq!(t.get("10.0.0.1", 6_900), None);
        // Re-recording after expiry maps again, possibly to another worker.
        t.record("10.0.0.1", W2, 10_000);
        assert_eq!(t.get("10.0.0.1", 10_000), Some(W2));
        assert_eq!(t.get("unknown", 10_000), None);
    }

    #[test]
    fn lru_bound_evicts_least_recently_used_and_counts() {
        let mut t = SessionTable::new(3, 1_000_000).unwrap();
        t.record("a", W0, 1);
        t.record("b", W1, 2);
        t.record("c", W2, 3);
        // Touch "a": now "b" is the least recently used.
        t.record("a", W0, 4);
        t.record("d", W1, 5);
        assert_eq!(t.len(), 3);
        assert_eq!(t.evictions(), 1);
        assert_eq!(t.get("b", 5), None);
        assert_eq!(t.get("a", 5), Some(W0));
        assert_eq!(t.get("c", 5), Some(W2));
        assert_eq!(t.get("d", 5), Some(W1));
        t.record("e", W2, 6); // evicts "c"
        assert_eq!(t.get("c", 6), None);
        assert_eq!(t.evictions(), 2);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn expired_entries_are_purged_before_evicting_live_ones() {
        let mut t = SessionTable::new(2, 100).unwrap();
        t.record("old", W0, 0);
        t.record("live", W1, 150);
        // "old" expired at 100: inserting a third key drops it instead of evicting "live".
        t.record("new", W2, 160);
        assert_eq!(t.evictions(), 0);
        assert_eq!(t.expirations(), 1);
        assert_eq!(t.get("live", 160), Some(W1));
        assert_eq!(t.get("new", 160), Some(W2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn remove_worker_drops_its_entries_only() {
        let mut t = SessionTable::new(10, 1000).unwrap();
        t.record("a", W0, 1);
        t.record("b", W1, 2);
        t.record("c", W0, 3);
        assert_eq!(t.remove_worker(W0), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get("a", 3), None);
        assert_eq!(t.get("b", 3), Some(W1));
        // Freed slots are reused and the list stays consistent.
        t.record("d", W2, 4);
        t.record("e", W2, 5);
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove("b"), Some(W1));
        assert_eq!(t.remove("b"), None);
        assert_eq!(t.remove_worker(W2), 2);
        assert!(t.is_empty());
    }

    /// Compare against a naive model (a Vec ordered by recency) over a long random
    /// sequence of operations.
    #[test]
    fn matches_naive_model() {
        let mut rng = crate::rng::SplitMix64::new(42);
        let mut t = SessionTable::new(8, 50).unwrap();
        // (key, worker, last_ms), most recent last.
        let mut model: Vec<(u64, WorkerId, u64)> = Vec::new();
        let mut now = 0u64;
        for _ in 0..20_000 {
            now += rng.below(4);
            let key = format!("k{}", rng.below(20));
            let h = session_hash(&key);
            match rng.below(10) {
                0 => {
                    let w = WorkerId(rng.below(3) as u32);
                    t.remove_worker(w);
                    model.retain(|e| e.1 != w);
                }
                1..=4 => {
                    let w = WorkerId(rng.below(3) as u32);
                    t.record(&key, w, now);
                    if let Some(pos) = model.iter().position(|e| e.0 == h) {
                        model.remove(pos);
                    } else {
                        model.retain(|e| now - e.2 < 50);
                        if model.len() >= 8 {
                            model.remove(0);
                        }
                    }
                    model.push((h, w, now));
                }
                _ => {
                    let expect =
                        model.iter().find(|e| e.0 == h).filter(|e| now - e.2 < 50).map(|e| e.1);
                    assert_eq!(t.get(&key, now), expect);
                }
            }
            assert!(t.len() <= 8);
            assert_eq!(t.len(), model.len());
        }
    }
}
