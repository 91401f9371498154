#!/usr/bin/env bash
# W1 side by side: builds the peers harness (fat LTO), runs every index RUNS times (default
# 3), one process per run, and prints the table of medians. Not part of CI.
#   bash benches/peers/run.sh            # all four indexes, 3 runs each
#   RUNS=1 bash benches/peers/run.sh kvroute kv-index
#   WARM_GB=20 bash benches/peers/run.sh # first touch WARM_GB GiB of memory once (see below)
# On a freshly booted VM the first touch of guest memory the host has not backed yet is
# slow (0.42 GB/s measured on a KVM guest, 14 GB/s afterwards), and every index's fill
# grows into new memory: WARM_GB touches that much once, in 1 GiB pieces, before the runs,
# so that fill measures the index and not the hypervisor (docs/benchmarks.md, "Session 9").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="${RUNS:-3}"
indexes=("$@")
[ ${#indexes[@]} -gt 0 ] || indexes=(kvroute kv-index smg-radix-tree dynamo-kv-router)
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
if [ -n "${WARM_GB:-}" ]; then
  python3 -c "import sys
for _ in range(int(sys.argv[1])): x = b'\\x01' * (1 << 30); del x" "$WARM_GB"
fi
bin="$here/target/release/kvroute-peers"
out="$(mktemp -d)"
for r in $(seq 1 "$runs"); do
  for ix in "${indexes[@]}"; do
    "$bin" "$ix" > "$out/$ix.$r.tsv"
  done
done
python3 - "$out" "$runs" "${indexes[@]}" <<'PY'
import statistics, sys
out, runs, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cols = {}
for n in names:
    rows = {}
    for r in range(1, runs + 1):
        for line in open(f"{out}/{n}.{r}.tsv"):
            k, v = line.rstrip("\n").split("\t")
            rows.setdefault(k, []).append(v)
    cols[n] = rows
def med(n, k):
    vs = cols[n].get(k, [])
    try:
        return statistics.median(float(v) for v in vs)
    except ValueError:
        return vs[0] if vs else None
def ns(v):
    if isinstance(v, str) or v is None: return v or "-"
    return f"{v:.0f} ns" if v < 1000 else f"{v/1000:.2f} us"
def rate(v, unit=""):
    if isinstance(v, str) or v is None: return v or "-"
    return f"{v/1e6:.2f}M{unit}" if v >= 1e6 else f"{v/1e3:.0f}k{unit}"
lines = [
    ("heap B / holder-block", lambda n: f"{med(n, 'heap B/hb'):.1f}"),
    ("RSS growth B / holder-block", lambda n: f"{med(n, 'RSS B/hb'):.1f}"),
    ("P1 / P16 p50", lambda n: f"{ns(med(n, 'P1 p50 ns'))} / {ns(med(n, 'P16 p50 ns'))}"),
    ("P64 / P256 p50", lambda n: f"{ns(med(n, 'P64 p50 ns'))} / {ns(med(n, 'P256 p50 ns'))}"),
    ("S64 p50 / p99", lambda n: f"{ns(med(n, 'S64 p50 ns'))} / {ns(med(n, 'S64 p99 ns'))}"),
    ("miss / prefix-then-miss p50", lambda n: f"{ns(med(n, 'miss p50 ns'))} / {ns(med(n, 'prefix-then-miss p50 ns'))}"),
    ("cycled p50 / p99", lambda n: f"{ns(med(n, 'cycled p50 ns'))} / {ns(med(n, 'cycled p99 ns'))}"),
    ("two-thread reads", lambda n: rate(med(n, 'two-thread reads q/s'), " q/s")),
    ("fill / churn store / churn remove / drain (blocks/s)", lambda n: " / ".join(
        rate(med(n, k)) for k in ["fill blocks/s", "churn stores blocks/s", "churn removes blocks/s", "drain removes blocks/s"])),
]
print(f"medians of {runs} runs, one process per run")
print("| W1 line | " + " | ".join(names) + " |")
print("|---" * (len(names) + 1) + "|")
for title, f in lines:
    print(f"| {title} | " + " | ".join(f(n) for n in names) + " |")
print("\nper-run values:")
for n in names:
    for k, vs in cols[n].items():
        if k != "index":
            print(f"  {n:18} {k:28} {'  '.join(vs)}")
PY
