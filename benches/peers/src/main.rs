//! W1 (`benches/W1.md`) side by side: one harness, one timing code, one index per process.
//!
//! `kvroute-peers <index>` with `<index>` one of `kvroute`, `kv-index`, `smg-radix-tree`,
//! `dynamo-kv-router` runs the whole workload against that index through its public API and
//! prints one `line<TAB>value` row per W1 line (values in ns, blocks/s, queries/s or bytes
//! per holder-block). `run.sh` runs every index three times and prints the table of medians.
//!
//! Every probe's result is checked against W1's expected result before and after it is
//! timed, for every index, so a wrong answer cannot produce a number. Only the index calls
//! are timed: converting the harness's keys into an index's own event or query types
//! happens before the clock starts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

// ----- counting allocator (heap per holder-block, the same for every index) -------------

static LIVE: AtomicUsize = AtomicUsize::new(0);

struct CountingAlloc;

// SAFETY: every call forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0) * 4096
}

// ----- W1 keys ---------------------------------------------------------------------------

fn sm(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn chain_keys_into(parts: &[(u64, usize)], out: &mut Vec<u64>) {
    out.clear();
    let mut q = 0u64;
    for &(seg, len) in parts {
        for p in 0..len as u64 {
            q = sm(q ^ sm((seg << 24) | p));
            out.push(q);
        }
    }
}

fn chain_keys(parts: &[(u64, usize)]) -> Vec<u64> {
    let mut v = Vec::new();
    chain_keys_into(parts, &mut v);
    v
}

const HOLDERS: u32 = 256;
const GROUPS: u32 = 16;
const PREFIX: usize = 128;
const OWN: usize = 384;
const CHAIN: usize = PREFIX + OWN;
const CHAINS: u32 = 130;
const POPULATION: u64 = 12_812_288;
const PROBE: u64 = 0x100_0000;
const EVENT: usize = 64;
const WARM_UP: usize = 2_000;
const TIMED: usize = 20_000;
const CYCLED: usize = 4_096;
const CYCLED_TIMED: usize = 40_960;
const CHURN_ROUNDS: u32 = 8;

fn chain_parts(h: u32, c: u32) -> [(u64, usize); 2] {
    [(1 + u64::from(h % GROUPS), PREFIX), (0x10000 + u64::from(h) * 1024 + u64::from(c), OWN)]
}

// ----- the indexes ---------------------------------------------------------------------------

/// What the harness needs from an index. `store` and `remove` add the time spent inside
/// the index's own calls to `spent`; `query` is timed by the harness around the call.
trait Peer {
    /// Per-reader scratch the query writes its answer into.
    type Scratch: Default;
    fn new() -> Self;
    fn store(&mut self, h: u32, parent: Option<u64>, keys: &[u64], spent: &mut Duration);
    fn remove(&mut self, h: u32, keys: &[u64], spent: &mut Duration);
    /// Untimed preparation of a query (for an API that takes the query by value).
    fn prepare(&self, _keys: &[u64], _s: &mut Self::Scratch) {}
    fn query(&self, keys: &[u64], s: &mut Self::Scratch);
    /// The answer of the last query as sorted (holder, depth) pairs (untimed).
    fn answer(&self, s: &Self::Scratch) -> Vec<(u32, u32)>;
    /// Queries/s of W1's two reader threads, or None when the index cannot be shared.
    fn two_readers(&self, _cycled: &[(u32, Vec<u64>)]) -> Option<f64> {
        None
    }
}

/// The two-reader-thread line for any index that can be shared between threads.
fn two_readers<P: Peer + Sync>(p: &P, cycled: &[(u32, Vec<u64>)]) -> f64 {
    let barrier = Barrier::new(2);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut sc = P::Scratch::default();
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..CYCLED_TIMED {
                        p.query(black_box(&cycled[(i * 7 + t * 13) % CYCLED].1), &mut sc);
                    }
                    let end = Instant::now();
                    let (h, _) = cycled[((CYCLED_TIMED - 1) * 7 + t * 13) % CYCLED];
                    assert_eq!(p.answer(&sc), stored_chain_expect(h), "reader {t}");
                    (start, end)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    (2 * CYCLED_TIMED) as f64 / (end - start).as_secs_f64()
}

mod kvr {
    use super::*;
    use kvroute::index::{IndexConfig, MatchOptions, Matches, PrefixIndex};
    use kvroute::{Tier, WorkerId};

    pub struct Kvroute(PrefixIndex);

    impl Peer for Kvroute {
        type Scratch = Matches;
        fn new() -> Self {
            Kvroute(PrefixIndex::new(IndexConfig::default()))
        }
        fn store(&mut self, h: u32, parent: Option<u64>, keys: &[u64], spent: &mut Duration) {
            let t = Instant::now();
            let r = self.0.store(WorkerId(h), Tier::Gpu, parent, keys);
            *spent += t.elapsed();
            assert!(!r.expect("store").orphan);
        }
        fn remove(&mut self, h: u32, keys: &[u64], spent: &mut Duration) {
            let t = Instant::now();
            let r = self.0.remove(WorkerId(h), Tier::Gpu, keys);
            *spent += t.elapsed();
            assert_eq!(r.removed as usize, keys.len());
        }
        fn query(&self, keys: &[u64], s: &mut Matches) {
            self.0.find_matches(keys, MatchOptions::default(), s);
        }
        fn answer(&self, s: &Matches) -> Vec<(u32, u32)> {
            s.overlaps().iter().map(|o| (o.worker.0, o.blocks)).collect()
        }
        fn two_readers(&self, cycled: &[(u32, Vec<u64>)]) -> Option<f64> {
            Some(two_readers(self, cycled))
        }
    }
}

mod kvi {
    use super::*;
    use kv_index::{ChainBlockMap, ChainIndex, ContentHash, SequenceHash, StoredBlock};

    /// kv-index 2.0.0's `ChainIndex`, with the per-worker block maps its API has the
    /// caller keep (they are what removals need, so they count in its memory).
    pub struct KvIndex {
        index: ChainIndex,
        maps: Vec<ChainBlockMap>,
        ids: Vec<u32>,
        by_id: Vec<u32>,
        blocks: Vec<StoredBlock>,
        hashes: Vec<SequenceHash>,
    }

    impl Peer for KvIndex {
        type Scratch = Vec<(u32, u32)>;
        fn new() -> Self {
            let index = ChainIndex::new();
            let ids: Vec<u32> = (0..HOLDERS)
                .map(|h| index.intern_worker(&format!("w{h}")).expect("256 workers"))
                .collect();
            let mut by_id = vec![u32::MAX; ids.iter().max().map_or(0, |&m| m as usize + 1)];
            for (h, &id) in ids.iter().enumerate() {
                by_id[id as usize] = h as u32;
            }
            let maps = (0..HOLDERS).map(|_| ChainBlockMap::new()).collect();
            KvIndex { index, maps, ids, by_id, blocks: Vec::new(), hashes: Vec::new() }
        }
        fn store(&mut self, h: u32, parent: Option<u64>, keys: &[u64], spent: &mut Duration) {
            self.blocks.clear();
            // The chained key is both the engine's block hash and the matching hash.
            self.blocks.extend(
                keys.iter().map(|&k| StoredBlock {
                    seq_hash: SequenceHash(k),
                    content_hash: ContentHash(k),
                }),
            );
            let map = &mut self.maps[h as usize];
            let t = Instant::now();
            let r = self.index.apply_stored(
                self.ids[h as usize],
                &self.blocks,
                parent.map(SequenceHash),
                map,
            );
            *spent += t.elapsed();
            r.expect("store");
        }
        fn remove(&mut self, h: u32, keys: &[u64], spent: &mut Duration) {
            self.hashes.clear();
            self.hashes.extend(keys.iter().map(|&k| SequenceHash(k)));
            let map = &mut self.maps[h as usize];
            let t = Instant::now();
            self.index.apply_removed(self.ids[h as usize], &self.hashes, map);
            *spent += t.elapsed();
        }
        fn query(&self, keys: &[u64], s: &mut Vec<(u32, u32)>) {
            s.clear();
            self.index.score_into(keys, |&k| k, false, |w, score| s.push((w, score)));
        }
        fn answer(&self, s: &Vec<(u32, u32)>) -> Vec<(u32, u32)> {
            let mut v: Vec<(u32, u32)> =
                s.iter().map(|&(w, d)| (self.by_id[w as usize], d)).collect();
            v.sort_unstable();
            v
        }
        fn two_readers(&self, cycled: &[(u32, Vec<u64>)]) -> Option<f64> {
            Some(two_readers(self, cycled))
        }
    }
}

mod smg {
    use super::*;
    use radix_tree::{Config, HolderId, Overlap, OverlapScratch, RadixTree};

    /// smg-radix-tree 0.1.0's chain-native `RadixTree`.
    pub struct Smg {
        tree: RadixTree,
        ids: Vec<HolderId>,
        pairs: Vec<(u64, u64)>,
    }

    #[derive(Default)]
    pub struct Scratch {
        scratch: OverlapScratch,
        out: Vec<Overlap>,
    }

    impl Peer for Smg {
        type Scratch = Scratch;
        fn new() -> Self {
            let mut tree = RadixTree::new(Config::default());
            let ids = (0..HOLDERS).map(|h| tree.create_holder(&format!("w{h}"))).collect();
            Smg { tree, ids, pairs: Vec::new() }
        }
        fn store(&mut self, h: u32, parent: Option<u64>, keys: &[u64], spent: &mut Duration) {
            self.pairs.clear();
            // (removal key, matching hash): the chained key for both.
            self.pairs.extend(keys.iter().map(|&k| (k, k)));
            let t = Instant::now();
            let r = self.tree.store(self.ids[h as usize], parent, &self.pairs);
            *spent += t.elapsed();
            r.expect("store");
        }
        fn remove(&mut self, h: u32, keys: &[u64], spent: &mut Duration) {
            let t = Instant::now();
            let n = self.tree.remove(self.ids[h as usize], keys);
            *spent += t.elapsed();
            assert_eq!(n as usize, keys.len());
        }
        fn query(&self, keys: &[u64], s: &mut Scratch) {
            self.tree.overlap(keys, &mut s.scratch, &mut s.out);
        }
        fn answer(&self, s: &Scratch) -> Vec<(u32, u32)> {
            let mut v: Vec<(u32, u32)> = s
                .out
                .iter()
                .map(|o| {
                    let h = self.ids.iter().position(|&id| id == o.holder).expect("known holder");
                    (h as u32, o.depth)
                })
                .collect();
            v.sort_unstable();
            v
        }
        fn two_readers(&self, cycled: &[(u32, Vec<u64>)]) -> Option<f64> {
            Some(two_readers(self, cycled))
        }
    }
}

mod dyn_ {
    use super::*;
    use dynamo_kv_router::protocols::{
        ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData,
        KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, OverlapScores, RouterEvent,
    };
    use dynamo_kv_router::RadixTree;
    use std::cell::Cell;

    /// dynamo-kv-router 1.6.1's `RadixTree` (single-threaded: `Rc<RefCell>` nodes).
    pub struct Dynamo {
        tree: RadixTree,
        next_id: Cell<u64>,
    }

    #[derive(Default)]
    pub struct Scratch {
        query: Vec<LocalBlockHash>,
        result: Option<OverlapScores>,
    }

    impl Dynamo {
        fn event(&self, h: u32, data: KvCacheEventData) -> RouterEvent {
            let id = self.next_id.get();
            self.next_id.set(id + 1);
            RouterEvent::new(u64::from(h), KvCacheEvent { event_id: id, data, dp_rank: 0 })
        }
    }

    impl Peer for Dynamo {
        type Scratch = Scratch;
        fn new() -> Self {
            Dynamo { tree: RadixTree::new(), next_id: Cell::new(1) }
        }
        fn store(&mut self, h: u32, parent: Option<u64>, keys: &[u64], spent: &mut Duration) {
            let blocks = keys
                .iter()
                .map(|&k| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(k),
                    tokens_hash: LocalBlockHash(k),
                    mm_extra_info: None,
                })
                .collect();
            let data = KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(ExternalSequenceBlockHash),
                start_position: None,
                blocks,
            });
            let ev = self.event(h, data);
            let t = Instant::now();
            let r = self.tree.apply_event(ev);
            *spent += t.elapsed();
            r.expect("store");
        }
        fn remove(&mut self, h: u32, keys: &[u64], spent: &mut Duration) {
            let block_hashes = keys.iter().map(|&k| ExternalSequenceBlockHash(k)).collect();
            let ev = self.event(h, KvCacheEventData::Removed(KvCacheRemoveData { block_hashes }));
            let t = Instant::now();
            let r = self.tree.apply_event(ev);
            *spent += t.elapsed();
            r.expect("remove");
        }
        fn prepare(&self, keys: &[u64], s: &mut Scratch) {
            // `find_matches` takes the query by value: built before the clock starts.
            s.query = keys.iter().map(|&k| LocalBlockHash(k)).collect();
            s.result = None;
        }
        fn query(&self, keys: &[u64], s: &mut Scratch) {
            if s.query.is_empty() {
                self.prepare(keys, s);
            }
            s.result = Some(self.tree.find_matches(std::mem::take(&mut s.query), false));
        }
        fn answer(&self, s: &Scratch) -> Vec<(u32, u32)> {
            let mut v: Vec<(u32, u32)> = s
                .result
                .as_ref()
                .map(|o| o.scores.iter().map(|(w, &d)| (w.worker_id as u32, d)).collect())
                .unwrap_or_default();
            v.sort_unstable();
            v
        }
    }
}

// ----- the workload ----------------------------------------------------------------------------

fn stored_chain_expect(h: u32) -> Vec<(u32, u32)> {
    (0..HOLDERS)
        .filter(|&x| x % GROUPS == h % GROUPS)
        .map(|x| (x, if x == h { CHAIN as u32 } else { PREFIX as u32 }))
        .collect()
}

fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Stores `keys` as events of 64 under `parent`.
fn store_chain<P: Peer>(
    p: &mut P,
    h: u32,
    parent: Option<u64>,
    keys: &[u64],
    spent: &mut Duration,
) {
    let mut parent = parent;
    for ev in keys.chunks(EVENT) {
        p.store(h, parent, ev, spent);
        parent = ev.last().copied();
    }
}

/// Removes `keys` tail first, 6 batches of 64, each in reverse order.
fn remove_chain<P: Peer>(
    p: &mut P,
    h: u32,
    keys: &[u64],
    scratch: &mut Vec<u64>,
    spent: &mut Duration,
) {
    for batch in keys.rchunks(EVENT) {
        scratch.clear();
        scratch.extend(batch.iter().rev());
        p.remove(h, scratch, spent);
    }
}

fn warm<P: Peer>(p: &P, keys: &[u64], want: &[(u32, u32)], what: &str) -> (u64, u64) {
    let mut s = P::Scratch::default();
    p.query(keys, &mut s);
    assert_eq!(p.answer(&s), want, "{what}");
    for _ in 0..WARM_UP {
        p.query(black_box(keys), &mut s);
    }
    let mut ns = Vec::with_capacity(TIMED);
    for _ in 0..TIMED {
        p.prepare(keys, &mut s);
        let t = Instant::now();
        p.query(black_box(keys), &mut s);
        ns.push(t.elapsed().as_nanos() as u64);
    }
    assert_eq!(p.answer(&s), want, "{what} (after)");
    (quantile(&mut ns, 0.5), quantile(&mut ns, 0.99))
}

fn run<P: Peer>() {
    let out = |line: &str, v: f64| println!("{line}\t{v:.3}");
    let mut keys = Vec::with_capacity(CHAIN);
    let mut scratch = Vec::with_capacity(EVENT);

    let heap0 = LIVE.load(Ordering::Relaxed);
    let rss0 = rss_bytes();
    let mut p = P::new();
    let mut fill = Duration::ZERO;
    for c in 0..CHAINS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, c), &mut keys);
            if c == 0 {
                store_chain(&mut p, h, None, &keys, &mut fill);
            } else {
                store_chain(&mut p, h, Some(keys[PREFIX - 1]), &keys[PREFIX..], &mut fill);
            }
        }
    }
    drop(keys);
    let heap1 = LIVE.load(Ordering::Relaxed);
    let rss1 = rss_bytes();
    let mut keys = Vec::with_capacity(CHAIN);
    out("heap B/hb", (heap1 - heap0) as f64 / POPULATION as f64);
    out("RSS B/hb", rss1.saturating_sub(rss0) as f64 / POPULATION as f64);
    out("fill blocks/s", POPULATION as f64 / fill.as_secs_f64());

    // Probes.
    let mut setup = Duration::ZERO;
    let mut pk = Vec::new();
    for k in [1u32, 16, 64, 256] {
        let c = chain_keys(&[(PROBE + u64::from(k), CHAIN)]);
        for h in 0..k {
            store_chain(&mut p, h, None, &c, &mut setup);
        }
        pk.push((k, c));
    }
    let s64 = chain_keys(&[(PROBE + 1000, CHAIN)]);
    for i in 0..64u32 {
        store_chain(&mut p, i, None, &s64[..8 * (i as usize + 1)], &mut setup);
    }
    for (k, c) in &pk {
        let want: Vec<(u32, u32)> = (0..*k).map(|h| (h, CHAIN as u32)).collect();
        let (p50, p99) = warm(&p, c, &want, &format!("P{k}"));
        out(&format!("P{k} p50 ns"), p50 as f64);
        out(&format!("P{k} p99 ns"), p99 as f64);
    }
    {
        let want: Vec<(u32, u32)> = (0..64).map(|i| (i, 8 * (i + 1))).collect();
        let (p50, p99) = warm(&p, &s64, &want, "S64");
        out("S64 p50 ns", p50 as f64);
        out("S64 p99 ns", p99 as f64);
    }
    {
        let miss = chain_keys(&[(PROBE + 2000, CHAIN)]);
        let (p50, _) = warm(&p, &miss, &[], "miss");
        out("miss p50 ns", p50 as f64);
        let pm = chain_keys(&[(1 + 3, PREFIX), (PROBE + 3000, OWN)]);
        let want: Vec<(u32, u32)> =
            (0..HOLDERS).filter(|&h| h % GROUPS == 3).map(|h| (h, PREFIX as u32)).collect();
        let (p50, _) = warm(&p, &pm, &want, "prefix then miss");
        out("prefix-then-miss p50 ns", p50 as f64);
    }
    let cycled: Vec<(u32, Vec<u64>)> = (0..CYCLED as u64)
        .map(|i| {
            let h = (sm(i ^ 0x55) % u64::from(HOLDERS)) as u32;
            let c = (sm(i ^ 0xAA) % u64::from(CHAINS)) as u32;
            (h, chain_keys(&chain_parts(h, c)))
        })
        .collect();
    {
        let mut s = P::Scratch::default();
        for (h, k) in &cycled {
            p.query(k, &mut s);
            assert_eq!(p.answer(&s), stored_chain_expect(*h), "cycled chain");
        }
        let mut ns = Vec::with_capacity(CYCLED_TIMED);
        for i in 0..CYCLED_TIMED {
            let k = &cycled[i % CYCLED].1;
            p.prepare(k, &mut s);
            let t = Instant::now();
            p.query(black_box(k), &mut s);
            ns.push(t.elapsed().as_nanos() as u64);
        }
        assert_eq!(p.answer(&s), stored_chain_expect(cycled[(CYCLED_TIMED - 1) % CYCLED].0));
        out("cycled p50 ns", quantile(&mut ns, 0.5) as f64);
        out("cycled p99 ns", quantile(&mut ns, 0.99) as f64);
    }
    match p.two_readers(&cycled) {
        Some(q) => out("two-thread reads q/s", q),
        None => println!("two-thread reads q/s\tnot Sync"),
    }
    drop(cycled);
    drop(pk);

    // Churn.
    let (mut st, mut rm) = (Duration::ZERO, Duration::ZERO);
    let mut n = 0u64;
    for r in 0..CHURN_ROUNDS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, CHAINS + r), &mut keys);
            store_chain(&mut p, h, Some(keys[PREFIX - 1]), &keys[PREFIX..], &mut st);
            chain_keys_into(&chain_parts(h, r), &mut keys);
            remove_chain(&mut p, h, &keys[PREFIX..], &mut scratch, &mut rm);
            n += OWN as u64;
        }
    }
    out("churn stores blocks/s", n as f64 / st.as_secs_f64());
    out("churn removes blocks/s", n as f64 / rm.as_secs_f64());
    // A stored chain still answers right after churn.
    {
        let mut s = P::Scratch::default();
        chain_keys_into(&chain_parts(5, CHAINS + 3), &mut keys);
        p.query(&keys, &mut s);
        assert_eq!(p.answer(&s), stored_chain_expect(5), "after churn");
    }
    // Drain.
    let mut dr = Duration::ZERO;
    let mut n = 0u64;
    for c in CHURN_ROUNDS..CHAINS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, c), &mut keys);
            remove_chain(&mut p, h, &keys[PREFIX..], &mut scratch, &mut dr);
            n += OWN as u64;
        }
    }
    out("drain removes blocks/s", n as f64 / dr.as_secs_f64());
    out("heap after drain MiB", (LIVE.load(Ordering::Relaxed) - heap0) as f64 / 1048576.0);
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    let t = Instant::now();
    let mut o = Duration::ZERO;
    for _ in 0..1000 {
        let s = Instant::now();
        o += black_box(s).elapsed();
    }
    println!("index\t{which}");
    println!("Instant overhead ns\t{:.1}", o.as_nanos() as f64 / 1000.0);
    match which.as_str() {
        "kvroute" => run::<kvr::Kvroute>(),
        "kv-index" => run::<kvi::KvIndex>(),
        "smg-radix-tree" => run::<smg::Smg>(),
        "dynamo-kv-router" => run::<dyn_::Dynamo>(),
        _ => {
            eprintln!("usage: kvroute-peers kvroute|kv-index|smg-radix-tree|dynamo-kv-router");
            std::process::exit(2);
        }
    }
    println!("total s\t{:.1}", t.elapsed().as_secs_f64());
}
