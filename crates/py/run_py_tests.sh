#!/usr/bin/env bash
# Builds and tests the kvroute Python package: one wheel file built by maturin with its
# manylinux compliance check (`--compatibility pypi`: the lowest manylinux tag the wheel
# complies with, audited; a wheel that links a library outside the policy fails here),
# installed from that file into a brand-new virtualenv and imported there (not from the
# source tree), then installed into the project venv (.venv) where pytest runs
# crates/py/tests and examples/python against the installed package.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CARGO_TARGET_DIR="$ROOT/target"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet maturin pytest numpy aiohttp pyzmq msgpack tokenizers transformers jinja2 mypy

echo "maturin build (manylinux audit)"
start=$(date +%s)
rm -f target/wheels/kvroute-*.whl
"$PY" -m maturin build --quiet --release -m crates/py/Cargo.toml --compatibility pypi -o target/wheels
WHEEL=$(ls target/wheels/kvroute-*-abi3-manylinux*.whl)
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"

echo "install the wheel file into a clean virtualenv"
CLEAN="$ROOT/target/wheel-venv"
rm -rf "$CLEAN"
python3 -m venv "$CLEAN"
"$CLEAN/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$WHEEL"
# Run from a folder outside the checkout so that nothing but the installed wheel can be imported.
(cd "$(mktemp -d)" && "$CLEAN/bin/python" - <<'PY'
import kvroute, pathlib, sys
where = pathlib.Path(kvroute.__file__).resolve()
assert "site-packages" in where.parts, f"kvroute imported from {where}, not the installed wheel"
r = kvroute.Router({"workers": [{"name": "a:1"}, {"name": "b:1"}]})
d = r.route(list(range(64)))
assert d.worker in ("a:1", "b:1"), d.worker
print(f"clean venv: kvroute {kvroute.__version__} imported from {where.parent}")
PY
)

"${PIP[@]}" install --quiet --force-reinstall --no-deps "$WHEEL"

# test_tokenize_conformance.py drives the real `kvroute serve` binary.
bash "$ROOT/scripts/release-build.sh" kvroute-cli

# pytest exits 5 when it collected no test: that is a failure here too. Under CI=true a
# missing numpy or pyzmq fails the run instead of skipping (conftest.require).
"$PY" -m pytest -q -p no:cacheprovider crates/py/tests examples/python

# The type stubs must describe the built module: every function, class, method and
# signature in _kvroute.pyi exists with the same parameters, and nothing is missing.
echo "mypy.stubtest kvroute._kvroute"
# From a directory without the source package, so the installed module is checked.
(cd "$ROOT/target" && "$PY" -m mypy.stubtest kvroute._kvroute \
  --allowlist "$ROOT/crates/py/stubtest-allowlist.txt")
