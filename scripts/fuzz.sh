#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/Cargo.toml for a bounded time (CI runs this from
# scripts/test.sh). Targets are discovered with `cargo fuzz list`, so a new [[bin]] in
# fuzz/Cargo.toml is fuzzed without touching this script. Each target starts from its
# committed seed corpus, fuzz/seeds/<target>/ (if any); what libFuzzer finds goes to a
# scratch directory, never into the committed seeds. A crash fails the script and leaves
# the input in fuzz/artifacts/<target>/.
#
#   FUZZ_SECONDS   time per target (default 30)
#   FUZZ_TARGETS   space-separated targets to run instead of all of them
#   FUZZ_JOBS      targets run at once (default: the number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${FUZZ_SECONDS:-30}

# cargo-fuzz passes nightly-only flags (-Zsanitizer, ...) to rustc; RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
if [ "${#targets[@]}" -eq 0 ]; then
  echo "error: no fuzz targets found in fuzz/Cargo.toml" >&2
  exit 1
fi

# Build every target once (debug assertions on, release optimizations), then run each.
cargo fuzz build --fuzz-dir fuzz -O --debug-assertions

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# One target per core at a time (libFuzzer runs one process per target here).
JOBS=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}

run_target() {
  local t=$1 seeds="$ROOT/fuzz/seeds/$1" work="$scratch/$1" n_seeds=0
  mkdir -p "$work"
  local dirs=("$work")
  if [ -d "$seeds" ]; then
    dirs+=("$seeds")
    n_seeds=$(find "$seeds" -type f | wc -l)
  fi
  echo "fuzz $t: ${SECONDS_PER_TARGET} s from $n_seeds seeds"
  # libFuzzer writes new inputs into the first corpus directory only (the scratch one).
  cargo fuzz run --fuzz-dir fuzz -O --debug-assertions "$t" "${dirs[@]}" -- \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$scratch/$t.out" 2>"$scratch/$t.log"
}

failed=()
pids=()
names=()
finish_one() {
  # Waits for the oldest running target and reports it.
  local pid=${pids[0]} t=${names[0]}
  pids=("${pids[@]:1}")
  names=("${names[@]:1}")
  if wait "$pid"; then
    echo "fuzz $t: passed"
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$t.log" || true
  else
    tail -n 60 "$scratch/$t.log" >&2
    echo "error: fuzz target $t failed; the crashing input is in fuzz/artifacts/$t/" >&2
    failed+=("$t")
  fi
}
for t in "${targets[@]}"; do
  if [ "${#pids[@]}" -ge "$JOBS" ]; then finish_one; fi
  run_target "$t" &
  pids+=($!)
  names+=("$t")
done
while [ "${#pids[@]}" -gt 0 ]; do finish_one; done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "error: fuzz targets failed: ${failed[*]}" >&2
  exit 1
fi
