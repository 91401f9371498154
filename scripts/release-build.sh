#!/usr/bin/env bash
# Makes sure the release artifacts of the given packages (libkvroute.a, the kvroute binary)
# are built and current, without a second build of the dependency graph.
#
#   bash scripts/release-build.sh kvroute-ffi [kvroute-cli ...]
#
# Run on its own, it builds just those packages (`cargo build -p ... --release`). Under
# scripts/test.sh (KVROUTE_WORKSPACE_BUILT=1), the workspace's release test build has
# already produced the same artifacts: building a single package again would resolve
# dependency features differently (Cargo unifies features only over the packages of one
# invocation), so every shared dependency and kvroute itself would compile a second time.
# This build selects the same packages and targets as `cargo test --workspace --release`
# (so the same features) and adds the library targets that tests never link (the C
# staticlib of kvroute-ffi): only those compile.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
if [ "${KVROUTE_WORKSPACE_BUILT:-}" = 1 ]; then
  cargo build --workspace --release --lib --bins --tests --examples --quiet
else
  cargo build --release "${@/#/-p=}"
fi
