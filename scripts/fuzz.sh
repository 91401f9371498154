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
for t in "${targets[@]}"; do
  seeds="$ROOT/fuzz/seeds/$t"
  work="$scratch/$t"
  mkdir -p "$work"
  dirs=("$work")
  n_seeds=0
  if [ -d "$seeds" ]; then
    dirs+=("$seeds")
    n_seeds=$(find "$seeds" -type f | wc -l)
  fi
  echo "fuzz $t: ${SECONDS_PER_TARGET} s from $n_seeds seeds"
  # libFuzzer writes new inputs into the first corpus directory only (the scratch one).
  cargo fuzz run --fuzz-dir fuzz -O --debug-assertions "$t" "${dirs[@]}" -- \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 2>"$scratch/$t.log" || {
    tail -n 60 "$scratch/$t.log" >&2
    echo "error: fuzz target $t failed; the crashing input is in fuzz/artifacts/$t/" >&2
    exit 1
  }
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$t.log" || true
done
