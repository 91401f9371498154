#!/usr/bin/env bash
# Builds libkvroute.a and runs go vet and go test -race for the Go package
# (crates/ffi/go) and the reverse-proxy example (examples/go).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
command -v go >/dev/null || { echo "error: go is required" >&2; exit 1; }
bash "$ROOT/scripts/release-build.sh" kvroute-ffi
export CGO_ENABLED=1 GOFLAGS=-mod=mod
for dir in crates/ffi/go examples/go; do
  echo "--- $dir"
  (cd "$ROOT/$dir" && go vet ./... && go test -race -count=1 ./...)
done
