#!/usr/bin/env bash
# The project's one test command: installs what it needs, then runs every test suite
# (Rust, C, Go, Python). It is what CI runs (.ci/run) and what the README tells newcomers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

step() { printf '\n==> %s\n' "$*"; }

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
if ! .venv/bin/python -c 'import zmq, msgpack' >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check pyzmq msgpack
fi
export KVROUTE_PYTHON="$ROOT/.venv/bin/python"

step "Rust tests"
cargo test --workspace --release

step "C tests"
crates/ffi/tests/run_c_tests.sh

step "Go tests"
crates/ffi/go/run_go_tests.sh

step "Python tests"
bash crates/py/run_py_tests.sh

step "fuzz targets run"
# Every target of fuzz/Cargo.toml (found with `cargo fuzz list`) runs FUZZ_SECONDS (30)
# from its committed seeds in fuzz/seeds/<target>/; installs cargo-fuzz if missing.
bash scripts/fuzz.sh
