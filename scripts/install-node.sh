#!/usr/bin/env bash
# Installs what Podium's real-node tests need on a Debian (bookworm) machine, beside what
# scripts/install-deps.sh installs (see docs/real-node-recipe.md for how the node is run):
#   containerd, runc, the CNI plugins, umoci, iptables, conntrack (apt);
#   kubelet, kube-scheduler and kube-proxy v1.20.2, built from the Debian kubernetes source
#   tree that install-deps.sh prepares in $PODIUM_CACHE/src (run install-deps.sh first);
#   two OCI image archives in $PODIUM_CACHE/images, for `ctr images import` at node start:
#     podium-pause.tar  localhost/podium-pause:v1  the pod sandbox's pause process
#     podium-app.tar    localhost/podium-app:v1    busybox httpd answering with its pod name
# Binaries and images are cached outside the repo, so a second run takes seconds.
# Idempotent: every step checks before it acts. Needs root (containerd and kubelet do too).
set -euo pipefail

CACHE="${PODIUM_CACHE:-$HOME/.cache/podium}"
BIN="$CACHE/bin"
SRC="$CACHE/src"
IMAGES="$CACHE/images"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODE_FILES="$HERE/node"
mkdir -p "$BIN" "$SRC" "$IMAGES"

say() { printf '\033[1;34m[install-node]\033[0m %s\n' "$*" >&2; }
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# 1. The container runtime, CNI plugins (/usr/lib/cni), image tooling and what kubelet and
#    kube-proxy call (iptables, conntrack, ip, mount, nsenter), all from Debian.
#    Debian's containerd package ships only a systemd unit, so nothing starts by itself.
apt_install containerd runc containernetworking-plugins umoci iptables conntrack iproute2 \
  util-linux kmod busybox-static gcc libc6-dev
say "containerd: $(containerd --version | awk '{print $3}'), runc: $(runc --version | awk 'NR==1{print $3}'), CNI plugins: $(dpkg-query -W -f='${Version}' containernetworking-plugins), umoci: $(umoci --version | awk '{print $3}')"

# 2. kubelet, kube-scheduler and kube-proxy v1.20.2 from the same source tree as kube-apiserver.
K8S_VERSION="v1.20.2"
NODE_BINS=(kubelet kube-scheduler kube-proxy)
cached=1
for b in "${NODE_BINS[@]}"; do
  { [ -x "$BIN/$b" ] && "$BIN/$b" --version 2>/dev/null | grep -q "$K8S_VERSION"; } || cached=0
done
if [ "$cached" = 1 ]; then
  say "kubelet + kube-scheduler + kube-proxy $K8S_VERSION: cached in $BIN"
else
  srcdir=$(find "$SRC" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
  if [ -z "$srcdir" ] || [ ! -L "$srcdir/.go/src/k8s.io/kubernetes" ]; then
    say "no prepared kubernetes source tree in $SRC: run scripts/install-deps.sh first"
    exit 1
  fi
  apt_install golang-go rsync jq
  # One build at a time in the tree: wait for any other (install-deps.sh's, another of ours).
  exec 9>"$SRC/.build.lock"
  tree_busy() {
    local p d
    for p in /proc/[0-9]*; do
      [ "${p#/proc/}" = "$$" ] && continue
      d=$(readlink "$p/cwd" 2>/dev/null) || continue
      case "$d/" in "$srcdir"/*) return 0 ;; esac
    done
    return 1
  }
  waited=$(date +%s)
  while ! flock -n 9 || tree_busy; do
    say "  waiting for another build in $srcdir to finish... $(( $(date +%s) - waited ))s"
    sleep 30
  done
  say "building kubelet + kube-scheduler + kube-proxy (about 3.5 minutes cold on 2 cores; output in $SRC/build-node.log)"
  start=$(date +%s)
  (
    cd "$srcdir"
    export GOPATH="$srcdir/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=on
    export PATH="/usr/lib/go/bin:$PATH"
    make WHAT="cmd/kubelet cmd/kube-scheduler cmd/kube-proxy" >"$SRC/build-node.log" 2>&1
  ) &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && say "  still building... $(( $(date +%s) - start ))s ($(tail -c 200 "$SRC/build-node.log" | tr '\n' ' ' | tail -c 80))"
  done
  if ! wait "$pid"; then
    tail -40 "$SRC/build-node.log" >&2
    say "build failed; see $SRC/build-node.log"
    exit 1
  fi
  flock -u 9
  for b in "${NODE_BINS[@]}"; do install -m 0755 "$srcdir/_output/bin/$b" "$BIN/"; done
  say "built in $(( $(date +%s) - start ))s: $("$BIN/kubelet" --version)"
fi

# 3. OCI image archives, built with umoci from local files only. Each is rebuilt when its
#    inputs change (their hash is kept beside the archive). Images are imported at node start
#    into the node's own containerd, which is new for every node.
IMAGE_RECIPE=1 # bump to force a rebuild after changing how the images are put together
inputs_hash() { { echo "recipe $IMAGE_RECIPE"; cat "$@"; } | sha256sum | cut -d' ' -f1; }
# build_image NAME ROOTFS_DIR UMOCI_CONFIG_ARGS...: writes $IMAGES/NAME.tar (tag v1).
build_image() {
  local name=$1 rootfs=$2 layout bundle
  shift 2
  layout=$(dirname "$rootfs")/oci
  bundle=$(dirname "$rootfs")/bundle
  umoci init --layout "$layout"
  umoci new --image "$layout:v1"
  # unpack + repack, not `umoci insert`: Debian's umoci 0.4.7 writes truncated layers with insert.
  umoci unpack --image "$layout:v1" "$bundle" >/dev/null
  cp -a "$rootfs/." "$bundle/rootfs/"
  umoci repack --image "$layout:v1" --history.created_by "podium install-node.sh" "$bundle"
  umoci config --image "$layout:v1" --history.created_by "podium install-node.sh" "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$IMAGES/$name.tar.tmp" .
  mv "$IMAGES/$name.tar.tmp" "$IMAGES/$name.tar"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 3a. The pause image: one static binary, /pause, as uid 65535 like upstream's.
hash=$(inputs_hash "$NODE_FILES/pause.c" <(gcc --version | head -1))
if [ -f "$IMAGES/podium-pause.tar" ] && [ "$(cat "$IMAGES/podium-pause.tar.inputs" 2>/dev/null)" = "$hash" ]; then
  say "pause image: cached in $IMAGES/podium-pause.tar"
else
  say "building the pause image (gcc -static, umoci)"
  mkdir -p "$tmp/pause/rootfs"
  gcc -static -Os -s -o "$tmp/pause/rootfs/pause" "$NODE_FILES/pause.c"
  build_image podium-pause "$tmp/pause/rootfs" \
    --config.entrypoint /pause --config.user 65535:65535 --config.workingdir /
  echo "$hash" >"$IMAGES/podium-pause.tar.inputs"
  say "pause image: $IMAGES/podium-pause.tar ($(du -h "$IMAGES/podium-pause.tar" | cut -f1))"
fi

# 3b. The app image: busybox-static with its applet links, /app/run.sh and its CGI scripts,
#     as uid 65532. See scripts/node/app/run.sh for what it serves.
mapfile -t app_files < <(cd "$NODE_FILES" && find app -type f | sort)
hash=$(inputs_hash /bin/busybox "${app_files[@]/#/$NODE_FILES/}" <(printf '%s\n' "${app_files[@]}"))
if [ -f "$IMAGES/podium-app.tar" ] && [ "$(cat "$IMAGES/podium-app.tar.inputs" 2>/dev/null)" = "$hash" ]; then
  say "app image: cached in $IMAGES/podium-app.tar"
else
  say "building the app image (busybox-static, umoci)"
  r="$tmp/app/rootfs"
  mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/etc/podinfo"
  chmod 1777 "$r/tmp"
  install -m 0755 /bin/busybox "$r/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$r/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/tmp:/bin/sh\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$r/etc/group"
  cp -r "$NODE_FILES/app" "$r/app"
  build_image podium-app "$r" \
    --config.entrypoint /app/run.sh --config.user 65532:65532 --config.workingdir /tmp \
    --config.env PATH=/bin --config.exposedports 8080/tcp
  echo "$hash" >"$IMAGES/podium-app.tar.inputs"
  say "app image: $IMAGES/podium-app.tar ($(du -h "$IMAGES/podium-app.tar" | cut -f1))"
fi

say "ready: kubelet, kube-scheduler, kube-proxy in $BIN; images in $IMAGES (docs/real-node-recipe.md runs the node)"
