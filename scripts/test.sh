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

step "installing dependencies (etcd, kube-apiserver, kube-controller-manager, helm, kubectl, the real node)"
scripts/install-deps.sh

export PODIUM_BIN_DIR="${PODIUM_BIN_DIR:-${PODIUM_CACHE:-$HOME/.cache/podium}/bin}"

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "workflows match GitHub's schema; the krew manifest template renders to what krew requires"
# check-jsonschema's built-in copy of the workflow schema: offline once installed
# (scripts/install-schema-check.sh, which install-deps.sh ran above; a no-op when cached).
schema_venv=$(scripts/install-schema-check.sh)
"$schema_venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
krew_tmp=$(mktemp -d)
trap 'rm -rf "$krew_tmp"' EXIT
chart_version=$(sed -n 's/^version:[[:space:]]*//p' charts/podium/Chart.yaml)
python3 scripts/krew-manifest.py render --version "$chart_version" --repo podium-dev/podium \
  --placeholder-sums -o "$krew_tmp/plugins/podium.yaml"
"$schema_venv/bin/python" scripts/krew-manifest.py check "$krew_tmp/plugins/podium.yaml" --version "$chart_version"

step "podium crd matches crds/electiongroup.yaml"
cargo run --locked --quiet -p podium -- crd | diff -u crds/electiongroup.yaml - \
  || { echo "crds/electiongroup.yaml is stale: run 'cargo run -p podium -- crd > crds/electiongroup.yaml'" >&2; exit 1; }

step "only the operator ships: podium's normal dependencies hold no harness crate"
harness=$(cargo tree --locked -p podium -e normal --prefix none | awk '{print $1}' | sort -u \
  | grep -xE 'rcgen|tempfile|tower-test|podium-testkit|podium-bench|podium-demo|proptest' || true)
if [ -n "$harness" ]; then
  echo "the shipped podium crate depends on harness crates: $harness" >&2
  exit 1
fi
echo "none"

step "exhaustive model check of the handover protocol (prints the states it explored)"
cargo test --locked -p podium-core --test model_check -- --nocapture 2>&1 \
  | grep -E '^(model check|legacy counterexample|test |test result)'
test "${PIPESTATUS[0]}" = 0

step "exhaustive model check of role notifications: no two leader processes (prints the states it explored)"
cargo test --locked -p podium-core --test model_notify -- --nocapture 2>&1 \
  | grep -E '^(model check|test |test result)'
test "${PIPESTATUS[0]}" = 0

step "cargo test (unit and property tests; integration tests on the local control plane)"
# The kind end-to-end tests need Docker and are #[ignore]d with that reason; cargo lists them.
# The model checks ran in the steps above, the real-node suite runs in the step below.
cargo test --locked --workspace -- --skip every_interleaving_keeps_one_leader_and_a_growing_epoch \
  --skip renewals_at_any_moment_keep_one_leader_and_a_growing_epoch \
  --skip every_interleaving_keeps_at_most_one_leader_process \
  --skip the_check_finds_forgeries_when_any_operator_token_is_taken \
  --skip chart_in_cluster_operator_and_service_traffic_on_a_real_node

step "end-to-end suite on a real local node (helm install, in-cluster operator, Service traffic; prints its figures)"
# Needs root; fails with the reason (never skips) when the node cannot start. See the README.
# --workspace: the same feature set as the step above, so nothing is built again.
cargo test --locked --workspace --test real_node -- --nocapture

step "no control-plane process outlives the tests"
# A testbed's processes carry their owner's PID in their temp dir (podium-testbed-<pid>-...).
# Ones whose owner is gone are leftovers; ones whose owner still runs (say, a benchmark in
# another terminal) are not ours to judge.
find_leftovers() {
  { pgrep -af 'podium-testbed-' || true; } | while read -r pid cmd; do
    owner=$(printf '%s\n' "$cmd" | sed -n 's/.*podium-testbed-\([0-9]*\)-.*/\1/p' | head -1)
    if [ -n "$owner" ] && ! kill -0 "$owner" 2>/dev/null; then printf '%s %s\n' "$pid" "$cmd"; fi
  done
}
# SIGKILL from a dying owner lands at once, but give the kernel a few seconds to reap.
for _ in 1 2 3 4 5; do
  leftovers=$(find_leftovers)
  [ -z "$leftovers" ] && break
  sleep 1
done
if [ -n "$leftovers" ]; then
  printf '%s\n' "$leftovers" | cut -c1-200
  echo "processes of a finished podium testbed are still running (listed above)" >&2
  exit 1
fi
echo "none left"

step "the real node left nothing behind (iptables chains, mounts, bridge, node processes)"
# One real node per machine (docs/real-node-recipe.md), so any of these is a leftover of ours.
leftover=0
for tool in iptables ip6tables; do
  command -v "$tool" >/dev/null 2>&1 || continue
  for table in filter nat mangle raw security; do
    chains=$("$tool" -t "$table" -S 2>/dev/null | grep -E -- '-[NAj] (KUBE|CNI)-' || true)
    if [ -n "$chains" ]; then
      printf '%s -t %s:\n%s\n' "$tool" "$table" "$chains" | head -20
      leftover=1
    fi
  done
done
mounts=$(awk '$5 ~ /podium-testbed-/ {print $5}' /proc/self/mountinfo)
if [ -n "$mounts" ]; then printf 'mounts:\n%s\n' "$mounts" | head -20; leftover=1; fi
if [ -e /sys/class/net/podium0 ]; then echo "the node bridge podium0 still exists"; leftover=1; fi
node_procs=$({ pgrep -af '^(/usr/bin/)?(containerd|containerd-shim-runc-v2|ctr) |/(kubelet|kube-proxy|kube-scheduler) ' || true; } \
  | grep 'podium-testbed-' || true)
if [ -n "$node_procs" ]; then printf 'processes:\n%s\n' "$node_procs" | cut -c1-200; leftover=1; fi
if [ "$leftover" != 0 ]; then
  echo "the real node left the above behind (the next run of tests/real_node.rs cleans it up)" >&2
  exit 1
fi
echo "none left"
