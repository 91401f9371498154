//! Workload W1 (`benches/W1.md`): a 12,812,288 holder-block index over 256
//! holders, warm probes, a cycled set, two reader threads, churn and drain.
//!
//! A `harness = false` bench with its own `main`: W1 asks for p50/p99 of individual calls
//! and for throughputs that count only the time inside index calls, so every index call is
//! timed with `std::time::Instant` and the figures are printed as a table next to the
//! peer's. Every probe's result is checked against W1's expected result with `assert!`
//! before (and after) it is timed, so a wrong index cannot produce numbers.
//!
//! Run: `cargo bench -p kvroute-benches --bench w1`.

use kvroute::index::{IndexConfig, MatchOptions, Matches, PrefixIndex};
use kvroute::{BlockKey, Tier, WorkerId};
use kvroute_benches::{
    chain_keys, chain_keys_into, fmt_ns, fmt_rate, live_bytes, quantile, rss_bytes, sm,
    tail_first_batches, CountingAlloc, EVENT_BLOCKS,
};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const HOLDERS: u32 = 256;
const GROUPS: u32 = 16;
const PREFIX: usize = 128;
const OWN: usize = 384;
const CHAIN: usize = PREFIX + OWN;
const CHAINS: u32 = 130;
const POPULATION: u64 = 12_812_288;
const PROBE: u64 = 0x100_0000;

const WARM_UP: usize = 2_000;
const TIMED: usize = 20_000;
const CYCLED: usize = 4_096;
const CYCLED_TIMED: usize = 40_960;
const CHURN_ROUNDS: u32 = 8;

fn group(h: u32) -> u32 {
    h % GROUPS
}

/// The parts of holder `h`'s chain `c`: the group prefix, then its own segment.
fn chain_parts(h: u32, c: u32) -> [(u64, usize); 2] {
    [(1 + u64::from(group(h)), PREFIX), (0x10000 + u64::from(h) * 1024 + u64::from(c), OWN)]
}

/// The key buffers and timing accumulators of the event-shaped writers.
#[derive(Default)]
struct Writer {
    scratch: Vec<BlockKey>,
    store_time: Duration,
    stored: u64,
    remove_time: Duration,
    removed: u64,
}

impl Writer {
    /// Stores `keys` as events of 64 under `parent`, timing only the store calls.
    fn store(&mut self, index: &mut PrefixIndex, h: u32, parent: Option<BlockKey>, keys: &[u64]) {
        let mut parent = parent;
        for ev in keys.chunks(EVENT_BLOCKS) {
            let t = Instant::now();
            let r = index.store(WorkerId(h), Tier::Gpu, parent, ev);
            self.store_time += t.elapsed();
            let r = r.expect("store of a valid event");
            assert!(!r.orphan, "W1 events always have a known parent");
            parent = ev.last().copied();
        }
        self.stored += keys.len() as u64;
    }

    /// Removes `keys` tail first in reversed batches of 64, timing only the remove calls.
    fn remove(&mut self, index: &mut PrefixIndex, h: u32, keys: &[u64]) {
        for batch in tail_first_batches(keys) {
            self.scratch.clear();
            self.scratch.extend(batch.iter().rev());
            let t = Instant::now();
            let r = index.remove(WorkerId(h), Tier::Gpu, &self.scratch);
            self.remove_time += t.elapsed();
            assert_eq!(
                (r.removed as usize, r.unknown),
                (batch.len(), 0),
                "every removed key was held"
            );
        }
        self.removed += keys.len() as u64;
    }

    fn store_rate(&self) -> f64 {
        self.stored as f64 / self.store_time.as_secs_f64()
    }

    fn remove_rate(&self) -> f64 {
        self.removed as f64 / self.remove_time.as_secs_f64()
    }
}

/// One printed line of the result table.
struct Line {
    what: String,
    ours: String,
    peer: String,
    /// How many times better than the peer (higher is better).
    ratio: Option<f64>,
}

fn time_line(what: &str, ns: f64, peer_ns: Option<f64>) -> Line {
    Line {
        what: what.to_string(),
        ours: fmt_ns(ns),
        peer: peer_ns.map(fmt_ns).unwrap_or_else(|| "-".into()),
        ratio: peer_ns.map(|p| p / ns),
    }
}

fn rate_line(what: &str, per_s: f64, peer: Option<f64>, unit: &str) -> Line {
    Line {
        what: what.to_string(),
        ours: format!("{}{unit}", fmt_rate(per_s)),
        peer: peer.map(|p| format!("{}{unit}", fmt_rate(p))).unwrap_or_else(|| "-".into()),
        ratio: peer.map(|p| per_s / p),
    }
}

/// Times `TIMED` calls of one query after `WARM_UP` untimed ones; checks the result before
/// and after. Returns (p50, p99) in ns.
fn warm_probe(index: &PrefixIndex, keys: &[u64], check: impl Fn(&Matches)) -> (u64, u64) {
    let opts = MatchOptions::default();
    let mut out = Matches::new();
    index.find_matches(keys, opts, &mut out);
    check(&out);
    for _ in 0..WARM_UP {
        index.find_matches(black_box(keys), opts, &mut out);
    }
    let mut ns = Vec::with_capacity(TIMED);
    for _ in 0..TIMED {
        let t = Instant::now();
        index.find_matches(black_box(keys), opts, &mut out);
        ns.push(t.elapsed().as_nanos() as u64);
    }
    check(&out);
    (quantile(&mut ns, 0.50), quantile(&mut ns, 0.99))
}

/// Checks that `out` holds exactly `want` (worker, blocks) pairs.
fn expect(out: &Matches, want: &[(u32, u32)], what: &str) {
    let got: Vec<(u32, u32)> = out.overlaps().iter().map(|o| (o.worker.0, o.blocks)).collect();
    assert_eq!(got, want, "{what}: wrong match result");
    assert!(!out.truncated(), "{what}: truncated without early exit");
}

/// Expected result of a stored chain of holder `h`: its group's 16 holders at 128, `h`
/// at 512.
fn stored_chain_expect(h: u32) -> Vec<(u32, u32)> {
    (0..HOLDERS)
        .filter(|&x| group(x) == group(h))
        .map(|x| (x, if x == h { CHAIN as u32 } else { PREFIX as u32 }))
        .collect()
}

/// Median ns of an empty `Instant` pair, the per-call timing overhead included in p50/p99.
fn instant_overhead() -> u64 {
    let mut ns: Vec<u64> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            black_box(());
            t.elapsed().as_nanos() as u64
        })
        .collect();
    quantile(&mut ns, 0.5)
}

fn mb(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; W1 takes no options.
    let t_all = Instant::now();
    let mut lines: Vec<Line> = Vec::new();
    let mut index = PrefixIndex::new(IndexConfig::default());
    let mut w = Writer::default();
    let mut keys = Vec::with_capacity(CHAIN);
    w.scratch.reserve(EVENT_BLOCKS);

    // ----- population -------------------------------------------------------------------
    let heap0 = live_bytes();
    let rss0 = rss_bytes();
    let stats_heap0 = index.stats().heap_bytes;
    for c in 0..CHAINS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, c), &mut keys);
            if c == 0 {
                w.store(&mut index, h, None, &keys);
            } else {
                w.store(&mut index, h, Some(keys[PREFIX - 1]), &keys[PREFIX..]);
            }
        }
    }
    let heap1 = live_bytes();
    let rss1 = rss_bytes();
    let st = index.stats();
    assert_eq!(st.holder_blocks, POPULATION, "population holder-blocks");
    assert_eq!(
        st.blocks,
        u64::from(GROUPS) * PREFIX as u64 + u64::from(HOLDERS * CHAINS) * OWN as u64,
        "population distinct blocks"
    );
    assert_eq!(w.stored, POPULATION);
    let fill_rate = w.store_rate();
    let fill_secs = w.store_time.as_secs_f64();
    let alloc_per = (heap1 - heap0) as f64 / POPULATION as f64;
    let stats_per = (st.heap_bytes - stats_heap0) as f64 / POPULATION as f64;
    let rss_per = rss1.saturating_sub(rss0) as f64 / POPULATION as f64;
    println!(
        "population: {} holder-blocks, {} distinct blocks, {} nodes, stores {:.2} s inside index calls",
        st.holder_blocks, st.blocks, st.nodes, fill_secs
    );
    println!(
        "memory growth: allocator {:.1} MiB ({alloc_per:.2} B/hb), stats().heap_bytes {:.1} MiB ({stats_per:.2} B/hb), RSS {:.1} MiB ({rss_per:.2} B/hb)",
        mb((heap1 - heap0) as f64),
        mb((st.heap_bytes - stats_heap0) as f64),
        mb(rss1.saturating_sub(rss0) as f64)
    );
    lines.push(Line {
        what: "heap bytes / holder-block (allocator)".into(),
        ours: format!("{alloc_per:.2} B"),
        peer: "164 B".into(),
        ratio: Some(164.0 / alloc_per),
    });
    lines.push(Line {
        what: "heap bytes / holder-block (stats)".into(),
        ours: format!("{stats_per:.2} B"),
        peer: "164 B".into(),
        ratio: Some(164.0 / stats_per),
    });
    lines.push(Line {
        what: "RSS growth / holder-block".into(),
        ours: format!("{rss_per:.2} B"),
        peer: "-".into(),
        ratio: None,
    });

    // ----- probes -------------------------------------------------------------------------
    let mut pk_keys = Vec::new();
    let mut probe_hb = 0u64;
    for k in [1u32, 16, 64, 256] {
        let pk = chain_keys(&[(PROBE + u64::from(k), CHAIN)]);
        for h in 0..k {
            kvroute_benches::store_events(&mut index, h, None, &pk);
        }
        probe_hb += u64::from(k) * CHAIN as u64;
        pk_keys.push((k, pk));
    }
    let s64 = chain_keys(&[(PROBE + 1000, CHAIN)]);
    for i in 0..64u32 {
        let n = 8 * (i as usize + 1);
        kvroute_benches::store_events(&mut index, i, None, &s64[..n]);
        probe_hb += n as u64;
    }
    assert_eq!(index.stats().holder_blocks, POPULATION + probe_hb);

    let overhead = instant_overhead();
    println!("Instant::now + elapsed overhead (included in every per-call figure): {overhead} ns");

    let peer_p50 = [(1u32, 390.0), (16, f64::NAN), (64, 3_100.0), (256, 11_800.0)];
    for (k, pk) in &pk_keys {
        let want: Vec<(u32, u32)> = (0..*k).map(|h| (h, CHAIN as u32)).collect();
        let (p50, p99) = warm_probe(&index, pk, |m| expect(m, &want, &format!("P{k}")));
        let peer = peer_p50.iter().find(|(pk, _)| pk == k).map(|&(_, p)| p).filter(|p| !p.is_nan());
        lines.push(time_line(&format!("P{k} p50"), p50 as f64, peer));
        lines.push(time_line(&format!("P{k} p99"), p99 as f64, None));
    }
    {
        let want: Vec<(u32, u32)> = (0..64).map(|i| (i, 8 * (i + 1))).collect();
        let (p50, p99) = warm_probe(&index, &s64, |m| expect(m, &want, "S64"));
        lines.push(time_line("S64 p50", p50 as f64, Some(17_000.0)));
        lines.push(time_line("S64 p99", p99 as f64, Some(27_500.0)));
    }
    {
        let miss = chain_keys(&[(PROBE + 2000, CHAIN)]);
        let (p50, p99) = warm_probe(&index, &miss, |m| expect(m, &[], "miss"));
        lines.push(time_line("miss p50", p50 as f64, None));
        lines.push(time_line("miss p99", p99 as f64, None));
    }
    {
        let pm = chain_keys(&[(1 + 3, PREFIX), (PROBE + 3000, OWN)]);
        let want: Vec<(u32, u32)> =
            (0..HOLDERS).filter(|&h| group(h) == 3).map(|h| (h, PREFIX as u32)).collect();
        let (p50, p99) = warm_probe(&index, &pm, |m| expect(m, &want, "prefix then miss"));
        lines.push(time_line("prefix-then-miss p50", p50 as f64, None));
        lines.push(time_line("prefix-then-miss p99", p99 as f64, None));
    }

    // ----- cycled set -----------------------------------------------------------------------
    let cycled: Vec<(u32, Vec<u64>)> = (0..CYCLED as u64)
        .map(|i| {
            let h = (sm(i ^ 0x55) % u64::from(HOLDERS)) as u32;
            let c = (sm(i ^ 0xAA) % u64::from(CHAINS)) as u32;
            (h, chain_keys(&chain_parts(h, c)))
        })
        .collect();
    {
        let opts = MatchOptions::default();
        let mut out = Matches::new();
        for (h, k) in &cycled {
            index.find_matches(k, opts, &mut out);
            expect(&out, &stored_chain_expect(*h), "cycled chain");
        }
        for (_, k) in &cycled {
            index.find_matches(black_box(k), opts, &mut out);
        }
        let mut ns = Vec::with_capacity(CYCLED_TIMED);
        for i in 0..CYCLED_TIMED {
            let k = &cycled[i % CYCLED].1;
            let t = Instant::now();
            index.find_matches(black_box(k), opts, &mut out);
            ns.push(t.elapsed().as_nanos() as u64);
        }
        let (h, _) = &cycled[(CYCLED_TIMED - 1) % CYCLED];
        expect(&out, &stored_chain_expect(*h), "cycled chain (last)");
        let p50 = quantile(&mut ns, 0.5);
        let p99 = quantile(&mut ns, 0.99);
        lines.push(time_line("cycled set p50", p50 as f64, Some(5_600.0)));
        lines.push(time_line("cycled set p99", p99 as f64, None));
    }

    // ----- two reader threads ------------------------------------------------------------------
    {
        let barrier = Barrier::new(2);
        let shared = &index;
        let cycled = &cycled;
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2usize)
                .map(|t| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let opts = MatchOptions::default();
                        let mut out = Matches::new();
                        let mut sum = 0u64;
                        barrier.wait();
                        let start = Instant::now();
                        for i in 0..CYCLED_TIMED {
                            let k = &cycled[(i * 7 + t * 13) % CYCLED].1;
                            shared.find_matches(black_box(k), opts, &mut out);
                            sum += u64::from(out.max_blocks());
                        }
                        let end = Instant::now();
                        assert_eq!(sum, (CYCLED_TIMED * CHAIN) as u64, "reader {t} results");
                        (start, end)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let start = spans.iter().map(|s| s.0).min().unwrap();
        let end = spans.iter().map(|s| s.1).max().unwrap();
        let qps = (2 * CYCLED_TIMED) as f64 / (end - start).as_secs_f64();
        lines.push(rate_line("two-thread reads", qps, Some(158_000.0), " queries/s"));
    }

    // The bench's own query data goes before churn and drain, so that the allocator's live
    // bytes after the drain are the index's.
    drop(cycled);
    drop(pk_keys);

    // ----- churn ----------------------------------------------------------------------------------
    let mut churn = Writer::default();
    churn.scratch.reserve(EVENT_BLOCKS);
    for r in 0..CHURN_ROUNDS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, CHAINS + r), &mut keys);
            churn.store(&mut index, h, Some(keys[PREFIX - 1]), &keys[PREFIX..]);
            chain_keys_into(&chain_parts(h, r), &mut keys);
            churn.remove(&mut index, h, &keys[PREFIX..]);
        }
    }
    assert_eq!(index.stats().holder_blocks, POPULATION + probe_hb);
    lines.push(rate_line("stores (churn)", churn.store_rate(), Some(1.5e6), " blocks/s"));
    lines.push(rate_line("stores (fill)", fill_rate, Some(0.88e6), " blocks/s"));
    lines.push(rate_line("removes (churn)", churn.remove_rate(), Some(0.96e6), " blocks/s"));

    // ----- drain ----------------------------------------------------------------------------------
    let mut drain = Writer::default();
    drain.scratch.reserve(EVENT_BLOCKS);
    for c in CHURN_ROUNDS..CHAINS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, c), &mut keys);
            drain.remove(&mut index, h, &keys[PREFIX..]);
        }
    }
    let left = u64::from(HOLDERS) * PREFIX as u64
        + u64::from(HOLDERS * CHURN_ROUNDS) * OWN as u64
        + probe_hb;
    let st = index.stats();
    assert_eq!(st.holder_blocks, left, "holder-blocks after drain");
    lines.push(rate_line("removes (drain)", drain.remove_rate(), Some(0.96e6), " blocks/s"));
    println!(
        "after drain: {} holder-blocks left, {} nodes; allocator growth since start {:.1} MiB, stats().heap_bytes {:.1} MiB, RSS growth {:.1} MiB",
        st.holder_blocks,
        st.nodes,
        mb(live_bytes() as f64 - heap0 as f64),
        mb(st.heap_bytes as f64),
        mb(rss_bytes() as f64 - rss0 as f64)
    );
    index.shrink_to_fit();
    println!(
        "after drain + shrink_to_fit: allocator growth since start {:.1} MiB, stats().heap_bytes {:.1} MiB",
        mb(live_bytes() as f64 - heap0 as f64),
        mb(index.stats().heap_bytes as f64)
    );

    // ----- table -------------------------------------------------------------------------------
    println!();
    println!("{:<40} {:>22} {:>22} {:>8}  2x?", "W1 line", "kvroute", "peer", "x peer");
    for l in &lines {
        let (ratio, ok) = match l.ratio {
            Some(r) => (format!("{r:.2}"), if r >= 2.0 { "yes" } else { "NO" }),
            None => ("-".into(), ""),
        };
        println!("{:<40} {:>22} {:>22} {:>8}  {ok}", l.what, l.ours, l.peer, ratio);
    }
    println!(
        "\n(x peer: peer/ours for times and bytes, ours/peer for rates; total run {:.1} s)",
        t_all.elapsed().as_secs_f64()
    );
}
