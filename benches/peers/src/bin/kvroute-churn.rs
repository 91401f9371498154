//! kvroute alone on W1's fill and churn, with the time of every store event (64 blocks)
//! recorded: medians per event are much less disturbed by other processes than the
//! totals that `kvroute-peers` reports (a preempted event moves a total, not a median).
//! Used to compare builds of the write path against each other (alternate two builds).
//!   cargo build --release --manifest-path benches/peers/Cargo.toml
//!   benches/peers/target/release/kvroute-churn [ROUNDS=40]
use kvroute::index::{IndexConfig, PrefixIndex};
use kvroute::{Tier, WorkerId};
use std::time::{Duration, Instant};
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
const HOLDERS: u32 = 256;
const GROUPS: u32 = 16;
const PREFIX: usize = 128;
const OWN: usize = 384;
const CHAINS: u32 = 130;
const EVENT: usize = 64;
fn chain_parts(h: u32, c: u32) -> [(u64, usize); 2] {
    [(1 + u64::from(h % GROUPS), PREFIX), (0x10000 + u64::from(h) * 1024 + u64::from(c), OWN)]
}
fn store_chain(
    p: &mut PrefixIndex,
    h: u32,
    parent: Option<u64>,
    keys: &[u64],
    spent: &mut Duration,
    ev_ns: &mut Vec<u32>,
) {
    let mut parent = parent;
    for ev in keys.chunks(EVENT) {
        let t = Instant::now();
        p.store(WorkerId(h), Tier::Gpu, parent, ev).unwrap();
        let e = t.elapsed();
        *spent += e;
        ev_ns.push(e.as_nanos() as u32);
        parent = ev.last().copied();
    }
}
fn remove_chain(
    p: &mut PrefixIndex,
    h: u32,
    keys: &[u64],
    scratch: &mut Vec<u64>,
    spent: &mut Duration,
) {
    for batch in keys.rchunks(EVENT) {
        scratch.clear();
        scratch.extend(batch.iter().rev());
        let t = Instant::now();
        p.remove(WorkerId(h), Tier::Gpu, scratch);
        *spent += t.elapsed();
    }
}
fn main() {
    let rounds: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(40);
    let mut keys = Vec::new();
    let mut scratch = Vec::new();
    let mut p = PrefixIndex::new(IndexConfig::default());
    let mut fill = Duration::ZERO;
    let mut ev_ns: Vec<u32> = Vec::new();
    let mut n = 0u64;
    for c in 0..CHAINS {
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, c), &mut keys);
            if c == 0 {
                store_chain(&mut p, h, None, &keys, &mut fill, &mut ev_ns);
                n += 512;
            } else {
                store_chain(
                    &mut p,
                    h,
                    Some(keys[PREFIX - 1]),
                    &keys[PREFIX..],
                    &mut fill,
                    &mut ev_ns,
                );
                n += 384;
            }
        }
    }
    let fev = {
        let mut v = std::mem::take(&mut ev_ns);
        v.sort();
        v
    };
    let heap = p.stats().heap_bytes as f64 / p.stats().holder_blocks as f64;
    let mut sts = Vec::new();
    let mut rms = Vec::new();
    for r in 0..rounds {
        let (mut st, mut rm) = (Duration::ZERO, Duration::ZERO);
        for h in 0..HOLDERS {
            chain_keys_into(&chain_parts(h, CHAINS + r), &mut keys);
            store_chain(&mut p, h, Some(keys[PREFIX - 1]), &keys[PREFIX..], &mut st, &mut ev_ns);
            chain_keys_into(&chain_parts(h, r), &mut keys);
            remove_chain(&mut p, h, &keys[PREFIX..], &mut scratch, &mut rm);
        }
        let b = (HOLDERS as usize * OWN) as f64;
        sts.push(b / st.as_secs_f64() / 1e6);
        rms.push(b / rm.as_secs_f64() / 1e6);
    }
    let cev_raw = std::mem::take(&mut ev_ns);
    let cev = {
        let mut v = cev_raw.clone();
        v.sort();
        v
    };
    for pos in 0..6 {
        let mut v: Vec<u32> = cev_raw.iter().skip(pos).step_by(6).copied().collect();
        v.sort();
        let mean = v.iter().map(|&x| x as u64).sum::<u64>() / v.len() as u64;
        println!(
            "  churn event {pos}: p50 {} p90 {} p99 {} mean {}",
            v[v.len() / 2],
            v[v.len() * 9 / 10],
            v[v.len() * 99 / 100],
            mean
        );
    }
    println!(
        "per 64-block event: fill p25/p50 {}/{} ns, churn store p25/p50 {}/{} ns",
        fev[fev.len() / 4],
        fev[fev.len() / 2],
        cev[cev.len() / 4],
        cev[cev.len() / 2]
    );
    sts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = sts.len() / 2;
    println!("fill {:.2}M/s heap {:.2} B/hb | churn stores median {:.2}M/s (q25 {:.2} q75 {:.2}) | removes median {:.2}M/s",
        n as f64 / fill.as_secs_f64() / 1e6, heap, sts[m], sts[m / 2], sts[m + m / 2], rms[m]);
}
