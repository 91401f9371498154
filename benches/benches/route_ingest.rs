//! Route latency while another thread ingests KV events (DESIGN.md section 7: route p99
//! <= 20 us while ingesting 1M blocks/s).
//!
//! The router (`hash_algo: "xxh3"`, four scorers: prefix 3, queue 2, kv-utilization 2,
//! running 1) is populated with about 1M blocks over 64 workers (`common/mod.rs`). The
//! main thread routes the four 8,192-token probes of the `route` bench in turn for
//! `--seconds` (default 3) and records each call's latency with `Instant`, first alone,
//! then while an ingest thread applies event batches through `Router::apply_events`:
//! per step, for one worker (round robin), a fresh 256-block conversation under the
//! worker's group system prompt is stored as one batch of 4 `BlockStored` events of 64
//! blocks (1,024 tokens each, re-keyed by the router), and the conversation stored 8 steps
//! earlier on that slot is removed as one batch of 4 `BlockRemoved` events of 64 hashes,
//! tail first. So the index stays at its size and the ingest thread does 512 block
//! operations a step. It paces itself to `--rate` blocks/s (default 1,000,000; `0` = as
//! fast as it can) and reports the achieved rate. When ahead of schedule it sleeps in
//! 100 us steps, like a transport thread blocked on its socket, whose wake-ups can preempt
//! the routing thread on a busy machine; `--spin` makes it busy-wait instead, so that only
//! lock and cache interference remain.
//!
//! Run: `cargo bench -p kvroute-benches --bench route_ingest -- [--seconds S] [--rate R]
//! [--spin]`.

mod common;

use common::*;
use kvroute::events::KvEvent;
use kvroute::router::{Request, Router};
use kvroute_benches::{fmt_ns, fmt_rate, quantile};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FOUR: &str = r#"{"scorers": [{"name": "prefix", "weight": 3}, {"name": "queue", "weight": 2},
    {"name": "kv-utilization", "weight": 2}, {"name": "running", "weight": 1}]}"#;

/// Conversations kept live per worker slot by the ingest loop before removal.
const WINDOW: usize = 8;
/// Distinct fresh conversations cycled through: conversation `c` is stored in step `k`
/// (`c = k % FRESH_CONVS`), removed `WINDOW * 64` steps later, stored again after that.
const FRESH_CONVS: usize = 2 * WINDOW * WORKERS as usize;

struct Step {
    worker: String,
    store: Vec<KvEvent>,
    remove: Vec<KvEvent>,
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, got {v}")))
        .unwrap_or(default)
}

fn route_loop(router: &Router, probes: &[Probe], seconds: f64) -> (Vec<Vec<u64>>, u64) {
    let mut lat: Vec<Vec<u64>> = probes.iter().map(|_| Vec::with_capacity(1 << 20)).collect();
    let reqs: Vec<Request> = probes.iter().map(|p| Request::new(&p.tokens)).collect();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut n = 0u64;
    // Warm up caches and the per-thread scratch.
    for r in &reqs {
        for _ in 0..100 {
            std::hint::black_box(router.route(r).unwrap());
        }
    }
    while Instant::now() < end {
        for (i, r) in reqs.iter().enumerate() {
            let t = Instant::now();
            let d = router.route(r).unwrap();
            drop(std::hint::black_box(d));
            lat[i].push(t.elapsed().as_nanos() as u64);
            n += 1;
        }
    }
    (lat, n)
}

fn report(label: &str, probes: &[Probe], lat: &mut [Vec<u64>]) {
    let mut all: Vec<u64> = lat.iter().flatten().copied().collect();
    let line = |v: &mut [u64]| {
        format!(
            "p50 {:>9}  p99 {:>9}  p999 {:>9}  max {:>9}  (n={})",
            fmt_ns(quantile(v, 0.5) as f64),
            fmt_ns(quantile(v, 0.99) as f64),
            fmt_ns(quantile(v, 0.999) as f64),
            fmt_ns(quantile(v, 1.0) as f64),
            v.len()
        )
    };
    println!("{label}");
    println!("  {:<18} {}", "all", line(&mut all));
    for (p, v) in probes.iter().zip(lat.iter_mut()) {
        println!("  {:<18} {}", p.name, line(v));
    }
}

fn main() {
    let seconds = arg("--seconds", 3.0);
    let rate = arg("--rate", 1e6);
    let spin = std::env::args().any(|a| a == "--spin");
    let t = Instant::now();
    let router = Arc::new(Router::from_json(&config_json("xxh3", FOUR)).expect("router config"));
    populate(&router);
    let probes = probes(&router);
    for p in &probes {
        check_probe(&router, p);
    }
    let s = router.index_stats();
    println!(
        "populated in {:.1} s: {} blocks, {} holder-blocks over {WORKERS} workers",
        t.elapsed().as_secs_f64(),
        s.blocks,
        s.holder_blocks
    );

    // Pre-built ingest steps: conversation k goes to worker k % 64; the removal in step k
    // frees the conversation of step k - WINDOW * 64 (same worker).
    let convs: Vec<(u32, [(u64, usize); 2])> = (0..FRESH_CONVS)
        .map(|k| {
            let w = (k % WORKERS as usize) as u32;
            (w, [system(w), (FRESH + k as u64, OWN)])
        })
        .collect();
    let lag = WINDOW * WORKERS as usize;
    let steps: Vec<Step> = (0..FRESH_CONVS)
        .map(|k| {
            let (w, parts) = &convs[k];
            let (_, old) = &convs[(k + FRESH_CONVS - lag) % FRESH_CONVS];
            Step {
                worker: worker_name(*w),
                store: store_events(parts, SYSTEM),
                remove: remove_events(old, SYSTEM),
            }
        })
        .collect();

    let (mut alone, n) = route_loop(&router, &probes, seconds);
    println!("\nroute alone: {n} routes in {seconds} s");
    report("route latency, no ingest", &probes, &mut alone);

    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let router = Arc::clone(&router);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut blocks = 0u64;
            let mut k = 0usize;
            let mut apply_ns = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = &steps[k % FRESH_CONVS];
                // The first lap has nothing to remove yet (removals of unknown blocks would
                // be counted, not errors); skip them so the rate counts real work.
                let store = batch(s.store.clone());
                let remove = (k >= lag).then(|| batch(s.remove.clone()));
                let t = Instant::now();
                let r = router.apply_events(&s.worker, &store).unwrap();
                blocks += u64::from(r.blocks_stored);
                if let Some(remove) = remove {
                    let r = router.apply_events(&s.worker, &remove).unwrap();
                    assert_eq!(r.unknown_removals, 0, "ingest removes only what it stored");
                    blocks += u64::from(r.blocks_removed);
                }
                apply_ns += t.elapsed().as_nanos() as u64;
                k += 1;
                if rate > 0.0 {
                    let due = Duration::from_secs_f64(blocks as f64 / rate);
                    while start.elapsed() < due && !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                        if !spin && due.saturating_sub(start.elapsed()) > Duration::from_micros(200)
                        {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    }
                }
            }
            (blocks, start.elapsed(), apply_ns)
        })
    };
    // Let the ingest thread reach its pace and fill its window first.
    std::thread::sleep(Duration::from_millis(300));
    let (mut busy, n) = route_loop(&router, &probes, seconds);
    stop.store(true, Ordering::Relaxed);
    let (blocks, elapsed, apply_ns) = ingest.join().expect("ingest thread");
    let achieved = blocks as f64 / elapsed.as_secs_f64();
    println!(
        "\nroute with ingest: {n} routes in {seconds} s; ingest thread: {blocks} blocks in \
         {:.2} s = {} blocks/s (target {}, {}), {:.0} ns per block inside apply_events \
         (event clones excluded)",
        elapsed.as_secs_f64(),
        fmt_rate(achieved),
        if rate > 0.0 { fmt_rate(rate) } else { "max".into() },
        if spin { "spin pacing" } else { "sleep pacing" },
        apply_ns as f64 / blocks.max(1) as f64
    );
    report("route latency, while ingesting", &probes, &mut busy);
}
