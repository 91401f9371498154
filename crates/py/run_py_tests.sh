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
"${PIP[@]}" install --quiet maturin pytest numpy aiohttp pyzmq msgpack mypy

echo "pip install ./crates/py"
start=$(date +%s)
"${PIP[@]}" install --quiet --force-reinstall --no-deps ./crates/py
echo "built and installed in $(( $(date +%s) - start )) s"

# pytest exits 5 when it collected no test: that is a failure here too. Under CI=true a
# missing numpy or pyzmq fails the run instead of skipping (conftest.require).
"$PY" -m pytest -q -p no:cacheprovider crates/py/tests examples/python

# The type stubs must describe the built module: every function, class, method and
# signature in _kvroute.pyi exists with the same parameters, and nothing is missing.
echo "mypy.stubtest kvroute._kvroute"
# From a directory without the source package, so the installed module is checked.
(cd "$ROOT/target" && "$PY" -m mypy.stubtest kvroute._kvroute \
  --allowlist "$ROOT/crates/py/stubtest-allowlist.txt")

echo "pip wheel ./crates/py"
rm -f target/wheels/kvroute-*.whl
"${PIP[@]}" wheel --quiet --no-deps ./crates/py -w target/wheels
ls target/wheels/kvroute-*-abi3-*.whl
