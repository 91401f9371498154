#!/usr/bin/env bash
# The project's one test command: installs what it needs, then runs every test suite
# (Rust, C, Go, Python). It is what CI runs (.ci/run) and what the README tells newcomers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Each step's wall time is printed at the end (CI budget: well under 30 minutes).
STEP_NAMES=(); STEP_TIMES=(); STEP_START=$SECONDS
step() {
  if [ "${#STEP_NAMES[@]}" -gt 0 ]; then STEP_TIMES+=($((SECONDS - STEP_START))); fi
  STEP_NAMES+=("$*"); STEP_START=$SECONDS
  printf '\n==> %s\n' "$*"
}
summary() {
  STEP_TIMES+=($((SECONDS - STEP_START)))
  printf '\n==> all tests passed in %d s\n' "$SECONDS"
  for i in "${!STEP_NAMES[@]}"; do printf '%6d s  %s\n' "${STEP_TIMES[$i]}" "${STEP_NAMES[$i]}"; done
}

# Build settings for the suite (not for benchmarks, which keep the committed profiles):
# the release profile's thin LTO and debug info cost minutes when linking the many test
# binaries and buy nothing a test can observe. The dev profile (clippy, cargo package's
# verify build, cargo install --debug) drops debug info for the same reason. Exported so
# that every step and the scripts below share one set of artifacts.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_DEV_DEBUG=false

step "self-contained checkout"
# Everything the tests read is inside the repository (testdata/, provenance in its README);
# no tracked file may point at a folder beside the checkout.
if git ls-files -z 2>/dev/null | xargs -0 grep -lF -- "..""/shared" 2>/dev/null; then
  echo "error: the files above refer to a folder outside the checkout; use testdata/" >&2
  exit 1
fi
(cd testdata && sha256sum --quiet -c SHA256SUMS) || { echo "error: testdata/ differs from its recorded sha256" >&2; exit 1; }

step "toolchain"
command -v cargo >/dev/null || { echo "error: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

step "Python venv for the ZeroMQ peer tests"
# kvroute-zmq's integration tests drive a pyzmq publisher (crates/zmq/tests/peer).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# prometheus_client (the library vLLM renders /metrics with) parses kvroute emulate's output.
if ! .venv/bin/python -c 'import zmq, msgpack, prometheus_client' >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check pyzmq msgpack prometheus_client
fi
export KVROUTE_PYTHON="$ROOT/.venv/bin/python"

step "Rust tests"
cargo test --workspace --release
# The C, Go, Kubernetes and Python steps reuse these artifacts (scripts/release-build.sh).
export KVROUTE_WORKSPACE_BUILT=1

step "API docs (rustdoc, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet

step "crates.io packages (cargo package, verified)"
# Packs the publishable crates together (workspace dependencies resolve through a temporary
# local registry) and builds each from its packaged files alone. Cargo unpacks that registry's
# crates under $CARGO_HOME/registry, and treats registry sources as immutable: an earlier
# unpacking or build of the same name and version would be reused and stale sources
# verified. Drop those first.
PUBLISHED=(kvroute kvroute-zmq kvroute-sim kvroute-tokenize kvroute-server kvroute-emulate kvroute-cli)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
for c in "${PUBLISHED[@]}"; do
  rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$c-$VERSION" \
         "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$c-$VERSION.crate"
done
cargo clean --quiet --profile dev "${PUBLISHED[@]/#/-p=}"
cargo package --quiet --locked --allow-dirty "${PUBLISHED[@]/#/-p=}"

step "cargo install --path crates/cli"
# What the README tells users. Installing builds kvroute-cli alone, whose dependency
# features differ from the workspace test build's; in the dev profile it reuses what the
# package verification above compiled for the same crate, instead of a third release build.
CLI_ROOT=$(mktemp -d)
cargo install --quiet --locked --debug --path crates/cli --root "$CLI_ROOT" --target-dir "$ROOT/target"
"$CLI_ROOT/bin/kvroute" --version
echo '[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]' | "$CLI_ROOT/bin/kvroute" hash --algo xxh3 >/dev/null
rm -rf "$CLI_ROOT"

step "C tests"
crates/ffi/tests/run_c_tests.sh

step "Go tests"
crates/ffi/go/run_go_tests.sh

step "Kubernetes manifests"
deploy/kubernetes/run_manifest_tests.sh

step "Python tests"
bash crates/py/run_py_tests.sh

step "fuzz targets run"
# Every target of fuzz/Cargo.toml (found with `cargo fuzz list`) runs FUZZ_SECONDS (30)
# from its committed seeds in fuzz/seeds/<target>/; installs cargo-fuzz if missing.
bash scripts/fuzz.sh

summary
