#!/usr/bin/env bash
# The test command: installs what is missing (scripts/install-deps.sh), then runs formatting,
# lints, unit tests and the integration tests against a real local control plane.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1;34m==> %s\033[0m\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install a Rust toolchain (1.89 or newer) first, e.g. with rustup" >&2
  exit 1
fi

step "installing dependencies (etcd, kube-apiserver, kube-controller-manager, helm, kubectl)"
scripts/install-deps.sh

export PODIUM_BIN_DIR="${PODIUM_BIN_DIR:-${PODIUM_CACHE:-$HOME/.cache/podium}/bin}"

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "podium crd matches crds/electiongroup.yaml"
cargo run --locked --quiet -- crd | diff -u crds/electiongroup.yaml - \
  || { echo "crds/electiongroup.yaml is stale: run 'cargo run -- crd > crds/electiongroup.yaml'" >&2; exit 1; }

step "cargo test (unit, property and integration tests on the local control plane)"
# The kind end-to-end tests need Docker and are #[ignore]d with that reason; cargo lists them.
cargo test --locked

step "no control-plane process outlives the tests"
sleep 1
if pgrep -af 'podium-testbed-' ; then
  echo "processes of a podium testbed are still running (listed above)" >&2
  exit 1
fi
echo "none left"
