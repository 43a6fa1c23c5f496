#!/usr/bin/env bash
# The demo command: installs what is missing, then runs `podium-demo` on a local control plane.
# Extra arguments go to `podium-demo` (try --keep to keep the cluster and use kubectl yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install a Rust toolchain (1.89 or newer) first, e.g. with rustup" >&2
  exit 1
fi
scripts/install-deps.sh
export PODIUM_BIN_DIR="${PODIUM_BIN_DIR:-${PODIUM_CACHE:-$HOME/.cache/podium}/bin}"
echo "building podium-demo..." >&2
cargo build --locked --quiet -p podium -p podium-demo
exec target/debug/podium-demo "$@"
