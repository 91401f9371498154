#!/usr/bin/env bash
# Builds and tests the kvroute Python package: the project venv (.venv at the repo root),
# `pip install ./crates/py` (maturin compiles the extension in release into the repo's
# target/, so rebuilds are incremental), pytest on crates/py/tests and examples/python,
# and one wheel file built the way a user would (`pip wheel`).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CARGO_TARGET_DIR="$ROOT/target"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet maturin pytest numpy aiohttp pyzmq msgpack tokenizers transformers jinja2

echo "pip install ./crates/py"
start=$(date +%s)
"${PIP[@]}" install --quiet --force-reinstall --no-deps ./crates/py
echo "built and installed in $(( $(date +%s) - start )) s"

# test_tokenize_conformance.py drives the real `kvroute serve` binary.
cargo build --release --quiet -p kvroute-cli

# pytest exits 5 when it collected no test: that is a failure here too.
"$PY" -m pytest -q -p no:cacheprovider crates/py/tests examples/python

echo "pip wheel ./crates/py"
rm -f target/wheels/kvroute-*.whl
"${PIP[@]}" wheel --quiet --no-deps ./crates/py -w target/wheels
ls target/wheels/kvroute-*-abi3-*.whl
