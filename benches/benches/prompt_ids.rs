//! Reading the token ids of a `/v1/completions` body: the byte scanner
//! (`kvroute_tokenize::ids::scan`, what `kvroute serve` runs first) against the serde_json
//! pass it falls back to (`ids::parse_serde`, what the server ran before), the scanner
//! with the AVX2 block reader (`ids::scan_avx2`, what `scan` runs on CPUs with AVX2 but
//! without AVX-512 VBMI2) and without a vector reader (`ids::scan_portable`), on the serve
//! bench's body: 8,192 ids below 600, serde_json's compact writing (about 40 KB), and the
//! same ids with Python's `json.dumps` spacing and as ids of a 150k vocabulary.
//!
//! Measured as this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: on the
//! shared 2-core machine, wall time mostly measures the other processes' load.
//!
//! Run: `cargo bench -p kvroute-benches --bench prompt_ids`.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvroute_tokenize::ids;

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    // As the serve bench builds them (prefix 3 of 32, tail of request 3).
    let (p, i) = (3u32, 3u32);
    let serve: Vec<u32> = (0..8192u32)
        .map(|t| if t < 6144 { (p * 7919 + t) % 600 } else { (i * 31 + t) % 600 })
        .collect();
    let big: Vec<u32> = (0..8192u32).map(|t| t.wrapping_mul(2_654_435_761) % 151_936).collect();
    let body = |ids: &[u32]| {
        serde_json::json!({"model": "m", "prompt": ids, "max_tokens": 1}).to_string().into_bytes()
    };
    let python = String::from_utf8(body(&serve)).unwrap().replace(',', ", ").replace(':', ": ");
    vec![
        ("serve_bench_body", body(&serve)),
        ("python_spacing", python.into_bytes()),
        ("vocab_150k", body(&big)),
    ]
}

/// This thread's CPU time, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is valid on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Criterion measurement: thread CPU time.
struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, i: u64) -> u64 {
        thread_cpu_ns() - i
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Micros
    }
}

/// CPU time in µs, throughput in MB/s.
struct Micros;

impl ValueFormatter for Micros {
    fn scale_values(&self, _typical: f64, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v /= 1e3);
        "µs (CPU)"
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let n = match *t {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) | Throughput::Elements(n) => n,
        } as f64;
        values.iter_mut().for_each(|v| *v = n * 1e3 / *v);
        "MB/s (CPU)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn bench(c: &mut Criterion<ThreadCpu>) {
    for (name, b) in bodies() {
        let want = ids::parse_serde(&b).unwrap();
        assert_eq!(ids::scan(&b).as_ref(), Some(&want));
        assert_eq!(ids::scan_portable(&b).as_ref(), Some(&want));
        assert_eq!(ids::scan_avx2(&b).as_ref(), Some(&want));
        assert_eq!(want.tokens.len(), 8192);
        let mut g = c.benchmark_group(format!("prompt_ids/{name}"));
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_function("scan", |x| x.iter(|| ids::scan(black_box(&b))));
        // The AVX2 reader (what `scan` runs on CPUs with AVX2 but without AVX-512 VBMI2;
        // the SWAR loop on CPUs without AVX2).
        g.bench_function("scan_avx2", |x| x.iter(|| ids::scan_avx2(black_box(&b))));
        // The SWAR loop alone (what `scan` runs on CPUs without AVX2).
        g.bench_function("scan_portable", |x| x.iter(|| ids::scan_portable(black_box(&b))));
        g.bench_function("serde_json", |x| x.iter(|| ids::parse_serde(black_box(&b))));
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu).sample_size(30);
    targets = bench
}
criterion_main!(benches);
