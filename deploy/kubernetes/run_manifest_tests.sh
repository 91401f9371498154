#!/usr/bin/env bash
# Strictly decodes every manifest in deploy/kubernetes into the Kubernetes API types and
# checks flags and ports against `kvroute serve --help` and `kvroute emulate --help`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
command -v go >/dev/null || { echo "error: go is required" >&2; exit 1; }
bash "$ROOT/scripts/release-build.sh" kvroute-cli
export KVROUTE_BIN="$ROOT/target/release/kvroute" GOFLAGS=-mod=mod
cd deploy/kubernetes
go vet ./...
go test -count=1 ./...
