//! Shared helpers for the kvroute benchmarks: the W1 key scheme (`benches/W1.md`),
//! event-shaped store and removal helpers, a counting global allocator, process RSS and
//! percentiles.
//!
//! The allocator is only a type here; a binary that wants counted allocations declares
//! `#[global_allocator] static A: CountingAlloc = CountingAlloc;` itself, so benches that
//! do not need it pay nothing.

use kvroute::index::{PrefixIndex, RemoveReport};
use kvroute::{BlockKey, Tier, WorkerId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use kvroute::rng::splitmix64 as sm;

/// Blocks per stored event (vLLM batches a request's new blocks into one event).
pub const EVENT_BLOCKS: usize = 64;

// ----- keys ------------------------------------------------------------------------

/// W1 block content: block `p` of segment `s` is `sm((s << 24) | p)`.
#[inline]
pub fn content(segment: u64, pos: u64) -> u64 {
    sm((segment << 24) | pos)
}

/// The chained keys of a chain made of `(segment, length)` parts, appended to `out`
/// (cleared first): `q_i = sm(q_{i-1} ^ c_i)`, `q_{-1} = 0`.
pub fn chain_keys_into(parts: &[(u64, usize)], out: &mut Vec<BlockKey>) {
    out.clear();
    let mut q = 0u64;
    for &(seg, len) in parts {
        for p in 0..len as u64 {
            q = sm(q ^ content(seg, p));
            out.push(q);
        }
    }
}

/// The chained keys of a chain made of `(segment, length)` parts.
pub fn chain_keys(parts: &[(u64, usize)]) -> Vec<BlockKey> {
    let mut v = Vec::new();
    chain_keys_into(parts, &mut v);
    v
}

// ----- events ------------------------------------------------------------------------

/// Stores `keys` for `worker` (GPU tier) as events of [`EVENT_BLOCKS`] keys, the first
/// under `parent` and each later one under the previous event's last key.
pub fn store_events(
    index: &mut PrefixIndex,
    worker: u32,
    parent: Option<BlockKey>,
    keys: &[BlockKey],
) {
    let mut parent = parent;
    for ev in keys.chunks(EVENT_BLOCKS) {
        index.store(WorkerId(worker), Tier::Gpu, parent, ev).expect("store of a valid event");
        parent = ev.last().copied();
    }
}

/// Removes `keys` for `worker` (GPU tier) the way vLLM frees a request: tail first, in
/// batches of [`EVENT_BLOCKS`] keys, each batch in reverse order. `scratch` is reused for
/// the reversed batch. Returns the summed report.
pub fn remove_tail_first(
    index: &mut PrefixIndex,
    worker: u32,
    keys: &[BlockKey],
    scratch: &mut Vec<BlockKey>,
) -> RemoveReport {
    let mut total = RemoveReport::default();
    for batch in tail_first_batches(keys) {
        scratch.clear();
        scratch.extend(batch.iter().rev());
        let r = index.remove(WorkerId(worker), Tier::Gpu, scratch);
        total.removed += r.removed;
        total.unknown += r.unknown;
    }
    total
}

/// The batches of a tail-first removal of `keys`: the last [`EVENT_BLOCKS`] keys first,
/// then the previous ones (each batch in chain order; callers reverse it).
pub fn tail_first_batches(keys: &[BlockKey]) -> impl Iterator<Item = &[BlockKey]> {
    keys.rchunks(EVENT_BLOCKS)
}

// ----- counting allocator --------------------------------------------------------------

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// A global allocator wrapping [`System`] that counts live heap bytes (requested sizes).
pub struct CountingAlloc;

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the
// counters are plain atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
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
            add(new_size);
        }
        p
    }
}

#[inline]
fn add(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Live heap bytes counted by [`CountingAlloc`] (0 if it is not the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Peak live heap bytes counted by [`CountingAlloc`] since start.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Resident set size of this process in bytes, from `/proc/self/statm` (0 elsewhere).
pub fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s.split_whitespace().nth(1).and_then(|f| f.parse().ok()).unwrap_or(0);
    pages * 4096
}

// ----- statistics ----------------------------------------------------------------------

/// The `q`-quantile (0..=1) of `v` by nearest rank; sorts `v`. `v` must not be empty.
pub fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Formats nanoseconds as `390 ns` / `3.10 us` / `1.20 ms`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// Formats a rate as `1.50M` / `158k`.
pub fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M", per_s / 1e6)
    } else {
        format!("{:.0}k", per_s / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_keys_follow_w1_definition() {
        // Independent restatement of W1's formulas with explicit wrapping arithmetic.
        fn sm_ref(x: u64) -> u64 {
            let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^ (z >> 31)
        }
        let keys = chain_keys(&[(4, 2), (0x10000, 1)]);
        let c = [sm_ref(4 << 24), sm_ref((4 << 24) | 1), sm_ref(0x10000 << 24)];
        let q0 = sm_ref(c[0]);
        let q1 = sm_ref(q0 ^ c[1]);
        let q2 = sm_ref(q1 ^ c[2]);
        assert_eq!(keys, vec![q0, q1, q2]);
    }

    #[test]
    fn tail_first_batches_cover_keys_from_the_end() {
        let keys: Vec<u64> = (0..130).collect();
        let b: Vec<&[u64]> = tail_first_batches(&keys).collect();
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], &keys[66..130]);
        assert_eq!(b[1], &keys[2..66]);
        assert_eq!(b[2], &keys[0..2]);
    }

    #[test]
    fn quantile_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), 50);
        assert_eq!(quantile(&mut v, 0.99), 99);
        assert_eq!(quantile(&mut v, 1.0), 100);
    }
}
