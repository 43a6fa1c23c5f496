#!/usr/bin/env bash
# End-to-end test of podium on a real (kind) cluster: build the image, install the Helm chart,
# run the examples, check that the leader Service answers from the leader, delete the leader pod
# and measure how long the Service takes to answer from the new one.
#
#   scripts/kind-e2e.sh            # = all: up, examples, check, failover, operator-failover,
#                                  #   downward, down
#   scripts/kind-e2e.sh up         # create the cluster (or reuse it), build + load the image, install the chart
#   scripts/kind-e2e.sh examples   # apply examples/ into $E2E_NAMESPACE and wait for the web pods
#   scripts/kind-e2e.sh leader     # wait until the ElectionGroup has a leader; print its name
#   scripts/kind-e2e.sh check      # the web-leader Service answers with the leader pod's name
#   scripts/kind-e2e.sh failover   # delete the leader pod; print failover_seconds=<s>
#   scripts/kind-e2e.sh operator-failover  # delete the active operator pod; another takes the Lease
#   scripts/kind-e2e.sh downward   # examples/downward-api.yaml: members see their role change live
#   scripts/kind-e2e.sh logs       # dump state and operator logs (for CI failures)
#   scripts/kind-e2e.sh down       # delete the cluster (unless PODIUM_E2E_KEEP_CLUSTER=1)
#
# Needs docker, kind, kubectl and helm on PATH (helm/kubectl also from ~/.cache/podium/bin).
# Environment:
#   KIND_CLUSTER_NAME         cluster name (default podium-e2e); an existing cluster is reused
#   PODIUM_E2E_KEEP_CLUSTER   1: `down` and `all` leave the cluster alone
#   PODIUM_E2E_SKIP_BUILD     1: do not docker build / kind load (image already loaded)
#   PODIUM_IMAGE              image to build and install (default ghcr.io/podium-dev/podium:e2e)
#   E2E_NAMESPACE             namespace for the examples (default podium-demo)
#   FAILOVER_TIMEOUT          seconds to wait for a new leader to answer (default 120)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${KIND_CLUSTER_NAME:-podium-e2e}"
CONTEXT="kind-$CLUSTER"
IMAGE="${PODIUM_IMAGE:-ghcr.io/podium-dev/podium:e2e}"
IMAGE_REPO="${IMAGE%:*}"
IMAGE_TAG="${IMAGE##*:}"
RELEASE="podium"
OPERATOR_NS="podium-system"
NS="${E2E_NAMESPACE:-podium-demo}"
FAILOVER_TIMEOUT="${FAILOVER_TIMEOUT:-120}"
CLIENT_POD="e2e-client"
CLIENT_IMAGE="curlimages/curl:8.10.1"
# helm and kubectl from PATH first, else where scripts/install-deps.sh puts them.
export PATH="$PATH:${PODIUM_BIN_DIR:-$HOME/.cache/podium/bin}"

say() { printf '\033[1;34m[kind-e2e]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[kind-e2e] FAIL:\033[0m %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH"; }
k() { kubectl --context "$CONTEXT" "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

cmd_up() {
  need docker; need kind; need kubectl; need helm
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "reusing kind cluster $CLUSTER"
    kind export kubeconfig --name "$CLUSTER" >/dev/null
  else
    say "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 120s
  fi
  if [ "${PODIUM_E2E_SKIP_BUILD:-0}" != 1 ]; then
    say "docker build -t $IMAGE"
    docker build -t "$IMAGE" "$ROOT"
    say "kind load docker-image $IMAGE"
    kind load docker-image "$IMAGE" --name "$CLUSTER"
  fi
  say "helm install $RELEASE ($OPERATOR_NS)"
  helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" "$ROOT/charts/podium" \
    --namespace "$OPERATOR_NS" --create-namespace \
    --set image.repository="$IMAGE_REPO" --set image.tag="$IMAGE_TAG" \
    --set image.pullPolicy=IfNotPresent \
    --set logFormat=text --set 'logLevel=info\,podium=debug' \
    --wait --timeout 5m
  k -n "$OPERATOR_NS" rollout status deployment/"$RELEASE" --timeout=180s
  k wait --for=condition=Established crd/electiongroups.podium.dev --timeout=60s
  operator_leader >/dev/null
}

# Name of the operator replica that holds the Lease podium-operator (waits for one).
operator_leader() {
  local deadline=$((SECONDS + 120)) holder
  while [ $SECONDS -lt $deadline ]; do
    holder=$(k -n "$OPERATOR_NS" get lease podium-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
    if [ -n "$holder" ] && k -n "$OPERATOR_NS" get pod "$holder" >/dev/null 2>&1; then
      echo "$holder"; return 0
    fi
    sleep 1
  done
  die "no operator replica holds the Lease $OPERATOR_NS/podium-operator"
}

cmd_examples() {
  need kubectl
  k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
  say "applying examples into $NS"
  k -n "$NS" apply -f "$ROOT/examples/deployment.yaml" -f "$ROOT/examples/electiongroup.yaml" \
    -f "$ROOT/examples/service.yaml"
  k -n "$NS" rollout status deployment/web --timeout=180s
  # A long-lived client pod, so each request is a kubectl exec rather than a pod start.
  if ! k -n "$NS" get pod "$CLIENT_POD" >/dev/null 2>&1; then
    k -n "$NS" run "$CLIENT_POD" --image="$CLIENT_IMAGE" --restart=Never --command -- sleep 3600 >/dev/null
  fi
  k -n "$NS" wait --for=condition=Ready pod/"$CLIENT_POD" --timeout=180s >/dev/null
}

# The leader per the ElectionGroup's status, once exactly that pod carries the leader label
# and is a ready endpoint of the web-leader Service.
cmd_leader() {
  local deadline=$((SECONDS + ${1:-120})) leader="" labelled="" endpoints=""
  while [ $SECONDS -lt $deadline ]; do
    leader=$(k -n "$NS" get electiongroup web -o jsonpath='{.status.leader}' 2>/dev/null || true)
    labelled=$(k -n "$NS" get pods -l app=web,podium.dev/role=leader \
      -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' 2>/dev/null || true)
    endpoints=$(k -n "$NS" get endpoints web-leader \
      -o jsonpath='{range .subsets[*].addresses[*]}{.targetRef.name}{"\n"}{end}' 2>/dev/null || true)
    if [ -n "$leader" ] && [ "$labelled" = "$leader" ] && [ "$endpoints" = "$leader" ]; then
      echo "$leader"; return 0
    fi
    sleep 0.5
  done
  k -n "$NS" get electiongroups,pods -L podium.dev/role >&2 || true
  die "no single leader for ElectionGroup $NS/web (status: '${leader:-}', labelled: '${labelled//$'\n'/ }', endpoints: '${endpoints//$'\n'/ }')"
}

# One request to the leader Service from inside the cluster; prints the answering pod's name.
ask() {
  k -n "$NS" exec "$CLIENT_POD" -- curl -s --max-time 2 "http://web-leader/hostname" 2>/dev/null || true
}

cmd_check() {
  local leader answer
  leader=$(cmd_leader)
  say "ElectionGroup web: leader $leader"
  k -n "$NS" get electiongroups >&2
  for _ in 1 2 3; do
    answer=$(ask)
    [ "$answer" = "$leader" ] || die "web-leader answered '$answer', expected the leader '$leader'"
  done
  say "web-leader Service answers from the leader ($answer)"
  echo "leader=$leader"
}

cmd_failover() {
  local old new answer t0 epoch_before epoch_after
  old=$(cmd_leader)
  epoch_before=$(k -n "$NS" get electiongroup web -o jsonpath='{.status.epoch}')
  say "deleting leader pod $old (epoch $epoch_before)"
  t0=$(now)
  k -n "$NS" delete pod "$old" --wait=false >/dev/null
  while :; do
    answer=$(ask)
    if [ -n "$answer" ] && [ "$answer" != "$old" ]; then
      break
    fi
    if awk -v a="$(elapsed "$t0")" -v t="$FAILOVER_TIMEOUT" 'BEGIN { exit !(a > t) }'; then
      k -n "$NS" get electiongroups,pods -L podium.dev/role >&2 || true
      die "web-leader did not answer from a new leader within ${FAILOVER_TIMEOUT}s (last answer '$answer')"
    fi
    sleep 0.2
  done
  local seconds
  seconds=$(elapsed "$t0")
  new=$(cmd_leader 60)
  [ "$answer" = "$new" ] || die "web-leader answered '$answer' but the ElectionGroup's leader is '$new'"
  epoch_after=$(k -n "$NS" get electiongroup web -o jsonpath='{.status.epoch}')
  [ "$epoch_after" -gt "$epoch_before" ] || die "epoch did not grow: $epoch_before -> $epoch_after"
  [ "$(k -n "$NS" get pod "$new" -o jsonpath='{.metadata.annotations.podium\.dev/epoch}')" = "$epoch_after" ] \
    || die "new leader $new does not carry podium.dev/epoch=$epoch_after"
  say "failover $old -> $new in ${seconds}s (epoch $epoch_before -> $epoch_after)"
  echo "old_leader=$old"
  echo "new_leader=$new"
  echo "failover_seconds=$seconds"
}

cmd_operator_failover() {
  local old new t0 deadline
  old=$(operator_leader)
  say "deleting the active operator pod $old"
  t0=$(now)
  k -n "$OPERATOR_NS" delete pod "$old" --wait=false >/dev/null
  deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    new=$(k -n "$OPERATOR_NS" get lease podium-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
    if [ -n "$new" ] && [ "$new" != "$old" ]; then
      say "operator Lease moved $old -> $new in $(elapsed "$t0")s"
      echo "operator_failover_seconds=$(elapsed "$t0")"
      # The new operator keeps the group led.
      cmd_check >/dev/null
      return 0
    fi
    sleep 0.5
  done
  die "no other operator replica took the Lease podium-operator within 120s"
}

# Waits until the logs of pod $1 in $NS contain $2; prints the seconds it took.
wait_log() {
  local pod="$1" needle="$2" timeout="${3:-150}" t0
  t0=$(now)
  while ! k -n "$NS" logs "$pod" 2>/dev/null | grep -q -- "$needle"; do
    if awk -v a="$(elapsed "$t0")" -v t="$timeout" 'BEGIN { exit !(a > t) }'; then
      k -n "$NS" logs "$pod" --tail=20 >&2 || true
      die "pod $pod never logged '$needle' within ${timeout}s"
    fi
    sleep 1
  done
  elapsed "$t0"
}

# examples/downward-api.yaml: each worker prints the role and epoch it reads from its Downward
# API volume; after a failover the new leader must print role=leader without a restart.
cmd_downward() {
  local leader follower new deadline seconds
  k -n "$NS" apply -f "$ROOT/examples/downward-api.yaml" >/dev/null
  k -n "$NS" rollout status deployment/worker --timeout=180s
  deadline=$((SECONDS + 120))
  leader=""
  while [ -z "$leader" ]; do
    [ $SECONDS -lt $deadline ] || die "ElectionGroup worker elected nobody"
    leader=$(k -n "$NS" get electiongroup worker -o jsonpath='{.status.leader}' 2>/dev/null || true)
    sleep 1
  done
  wait_log "$leader" "role=leader epoch=" >/dev/null
  follower=$(k -n "$NS" get pods -l app=worker,podium.dev/role=follower -o jsonpath='{.items[0].metadata.name}')
  [ -n "$follower" ] || die "no follower among the workers"
  wait_log "$follower" "role=follower" >/dev/null
  say "downward: $leader logs role=leader, $follower logs role=follower; deleting $leader"
  k -n "$NS" delete pod "$leader" --wait=false >/dev/null
  deadline=$((SECONDS + 120))
  new=""
  while [ -z "$new" ] || [ "$new" = "$leader" ]; do
    [ $SECONDS -lt $deadline ] || die "ElectionGroup worker did not replace $leader"
    new=$(k -n "$NS" get electiongroup worker -o jsonpath='{.status.leader}' 2>/dev/null || true)
    sleep 0.5
  done
  seconds=$(wait_log "$new" "role=leader epoch=")
  [ "$(k -n "$NS" get pod "$new" -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 0 ] \
    || die "$new restarted; the role must change live"
  say "downward: new leader $new read role=leader from its volume ${seconds}s after the election"
  echo "downward_leader=$new"
  echo "downward_update_seconds=$seconds"
}

cmd_logs() {
  k get nodes -o wide || true
  k -n "$OPERATOR_NS" get all,leases || true
  k -n "$NS" get electiongroups,leases -o wide || true
  k -n "$NS" get pods -o wide -L podium.dev/role || true
  k -n "$NS" get events --sort-by=.lastTimestamp | tail -50 || true
  k -n "$OPERATOR_NS" logs -l app.kubernetes.io/name=podium --all-containers --prefix --tail=300 || true
}

cmd_down() {
  if [ "${PODIUM_E2E_KEEP_CLUSTER:-0}" = 1 ]; then
    say "keeping cluster $CLUSTER (PODIUM_E2E_KEEP_CLUSTER=1)"
    return 0
  fi
  need kind
  say "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
}

cmd_all() {
  # shellcheck disable=SC2154 # status is assigned inside the trap
  trap 'status=$?; [ $status -eq 0 ] || cmd_logs >&2; cmd_down; exit $status' EXIT
  cmd_up
  cmd_examples
  cmd_check
  cmd_failover
  cmd_operator_failover
  cmd_downward
}

case "${1:-all}" in
  up) cmd_up ;;
  examples) cmd_examples ;;
  leader) cmd_leader "${2:-120}" ;;
  check) cmd_check ;;
  failover) cmd_failover ;;
  operator-failover) cmd_operator_failover ;;
  downward) cmd_downward ;;
  logs) cmd_logs ;;
  down) cmd_down ;;
  all) cmd_all ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (try: $0 help)" ;;
esac
