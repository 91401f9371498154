//! `Router::route` with session keys, from one thread and from two threads at once: the
//! session table is read (session-affinity scorer) and written (the chosen worker is
//! recorded) on every session-keyed request, so its locking decides how two routing
//! threads scale.
//!
//! Setup: 16 workers, the `session-affinity` preset, 256-token prompts (16 blocks) over
//! an index where each worker holds a 64-block prefix of its own, 65,536 distinct session
//! keys cycled through (each thread its own half), default session capacity.
//!
//! Groups (criterion reports routes per second as element throughput):
//! - `route_sessions/1_thread`: one route per iteration.
//! - `route_sessions/2_threads`: two threads each run the iteration count; one iteration
//!   is one route on each thread, so its time is that of two concurrent routes.
//! - `route_no_session/2_threads`: the same without session keys (the floor).
//! - `session_table/2_threads/{one_lock,sharded}`: the table alone, a get and a record
//!   per key on each of two threads, behind one `RwLock<SessionTable>` (how the router
//!   held it before) and as a `ShardedSessionTable` (how it holds it now). Both in one
//!   process, so their ratio holds even on a busy machine.
//!
//! Run: `cargo bench -p kvroute-benches --bench route_sessions -- --warm-up-time 1 --measurement-time 3`.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute::events::{BlockStored, EngineHash, KvEvent, KvEventBatch};
use kvroute::router::{Request, Router};
use kvroute::score::{SessionLookup, SessionTable, ShardedSessionTable};
use kvroute::WorkerId;
use parking_lot::RwLock;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const WORKERS: u32 = 16;
const KEYS: usize = 1 << 16;
const PROMPT: usize = 256;

fn router() -> Router {
    let workers: Vec<String> =
        (0..WORKERS).map(|w| format!(r#"{{"name": "10.0.0.{w}:8000"}}"#)).collect();
    let json = format!(r#"{{"profile": "session-affinity", "workers": [{}]}}"#, workers.join(", "));
    let r = Router::from_json(&json).expect("router config");
    for w in 0..WORKERS {
        let tokens: Vec<u32> = (0..64 * 16).map(|i| w * 100_000 + i).collect();
        let ev = KvEvent::BlockStored(BlockStored {
            block_hashes: (0..64).map(|i| EngineHash::Int(u64::from(w) << 32 | i)).collect(),
            token_ids: tokens,
            block_size: 16,
            ..Default::default()
        });
        r.apply_events(&format!("10.0.0.{w}:8000"), &KvEventBatch::new(0.0, vec![ev]))
            .expect("events");
    }
    r
}

fn prompts() -> Vec<Vec<u32>> {
    (0..WORKERS).map(|w| (0..PROMPT as u32).map(|i| w * 100_000 + i).collect()).collect()
}

/// Runs `iters` routes on each of `threads` threads at once; returns the wall time.
fn run(
    r: &Router,
    prompts: &[Vec<u32>],
    keys: &[String],
    threads: usize,
    iters: u64,
    sessions: bool,
) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let half = keys.len() / threads;
                for i in 0..iters as usize {
                    let key = &keys[t * half + i % half];
                    let req = Request {
                        session: sessions.then_some(key.as_str()),
                        now_ms: Some(1_000),
                        ..Request::new(&prompts[i % prompts.len()])
                    };
                    black_box(r.route(&req).expect("route"));
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        t.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let r = router();
    let prompts = prompts();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("192.168.{}.{}", i >> 8, i & 255)).collect();
    let mut g = c.benchmark_group("route_sessions");
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_thread", |b| b.iter_custom(|n| run(&r, &prompts, &keys, 1, n, true)));
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads", |b| b.iter_custom(|n| run(&r, &prompts, &keys, 2, n, true)));
    g.finish();
    let mut g = c.benchmark_group("route_no_session");
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads", |b| b.iter_custom(|n| run(&r, &prompts, &keys, 2, n, false)));
    g.finish();
}

/// A get and a record per key, `iters` keys on each of two threads at once.
fn table_run(keys: &[String], iters: u64, op: &(dyn Fn(&str, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for t in 0..2 {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let half = keys.len() / 2;
                for i in 0..iters as usize {
                    op(&keys[t * half + i % half], 1_000 + i as u64);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        t.elapsed()
    })
}

fn bench_table(c: &mut Criterion) {
    let keys: Vec<String> = (0..KEYS).map(|i| format!("192.168.{}.{}", i >> 8, i & 255)).collect();
    let one = RwLock::new(SessionTable::new(1 << 20, 7_200_000).expect("table"));
    let sharded = ShardedSessionTable::new(1 << 20, 7_200_000).expect("table");
    let mut g = c.benchmark_group("session_table/2_threads");
    g.throughput(Throughput::Elements(2));
    g.bench_function("one_lock", |b| {
        b.iter_custom(|n| {
            table_run(&keys, n, &|k, now| {
                black_box(one.read().get(k, now));
                one.write().record(k, WorkerId(1), now);
            })
        })
    });
    g.bench_function("sharded", |b| {
        b.iter_custom(|n| {
            table_run(&keys, n, &|k, now| {
                black_box(SessionLookup::get(&sharded, k, now));
                sharded.record(k, WorkerId(1), now);
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_table);
criterion_main!(benches);
