#!/usr/bin/env bash
# Builds a Kubernetes 1.36 apiextensions-apiserver (the CRD apiserver on its own, from
# k8s.io/apiextensions-apiserver 0.36.x) and caches it as
#   $PODIUM_CACHE/bin/apiextensions-apiserver-1.36   (default ~/.cache/podium/bin)
# Debian sid carries the Go sources of apiextensions-apiserver, apiserver and their whole
# dependency closure as golang-*-dev packages, plus Go 1.26. This script fetches them with
# a PRIVATE apt configuration under $PODIUM_CACHE/apiext (the machine's own apt setup is
# neither read nor changed), unpacks them into one scratch tree (on /dev/shm when it has room:
# deleting 120,000 files from disk took a minute here, from tmpfs a second) and builds in
# GOPATH mode. The scratch tree and the Go build cache are removed on exit.
# One line of the sources is changed before the build: upstream turns off the root /apis
# discovery of this server (it expects kube-aggregator in front of it); without /apis, kubectl
# and Helm cannot map a kind to a resource and refuse every manifest. See STAMP below.
# Idempotent: a cached binary of the right version makes a rerun take well under a second.
# How to run the server: docs/apiext-recipe.md.
set -euo pipefail

CACHE="${PODIUM_CACHE:-$HOME/.cache/podium}"
BIN="$CACHE/bin"
WORK="$CACHE/apiext"
APTDIR="$WORK/apt"      # private apt config, lists and state
DEBS="$WORK/debs"       # downloaded .debs, kept: the pinned inputs of the build
K8S_MINOR="1.36"        # the upstream k8s.io/* 0.36.x sources are Kubernetes 1.36.x
GO_PKG="golang-1.26"
OUT="$BIN/apiextensions-apiserver-$K8S_MINOR"
# Written into $OUT.version by the build and required of a cached binary; change it whenever
# the build changes, so that a cached binary from an older recipe is rebuilt.
STAMP="root discovery on"
mkdir -p "$BIN" "$WORK"

say() { printf '\033[1;34m[install-apiext]\033[0m %s\n' "$*" >&2; }

# Runs "$@" in the background, in a process group of its own (set -m) so that cleanup can stop
# all of it, with its output in $log, printing a line every 30 s.
run_logged() {
  local what="$1" log="$2"; shift 2
  local start pid
  start=$(date +%s)
  set -m
  "$@" >"$log" 2>&1 &
  pid=$!
  set +m
  RUNNING=$pid
  while kill -0 "$pid" 2>/dev/null; do
    local i=0
    while [ $i -lt 30 ] && kill -0 "$pid" 2>/dev/null; do sleep 1; i=$((i + 1)); done
    kill -0 "$pid" 2>/dev/null \
      && say "  still $what... $(( $(date +%s) - start ))s ($(tail -c 200 "$log" | tr '\n' ' ' | tail -c 80))"
  done
  if ! wait "$pid"; then
    RUNNING=""
    tail -40 "$log" >&2
    say "$what failed; see $log"
    exit 1
  fi
  RUNNING=""
  say "  $what took $(( $(date +%s) - start ))s"
}

# On any exit: stop the step running in the background, remove the scratch tree.
RUNNING="" SCRATCH=""
cleanup() {
  if [ -n "$RUNNING" ]; then
    kill -TERM -- "-$RUNNING" 2>/dev/null || true
    local i=0
    while kill -0 -- "-$RUNNING" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
    kill -KILL -- "-$RUNNING" 2>/dev/null || true
    wait "$RUNNING" 2>/dev/null || true
  fi
  if [ -n "$SCRATCH" ]; then rm -rf "$SCRATCH" "$WORK/scratch.path"; fi
  rm -f "$OUT.tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The server has no --version flag (it reports its version at /version), so the build
# writes what it built next to the binary.
if [ -x "$OUT" ] && grep -qs "^apiextensions-apiserver v$K8S_MINOR\..*$STAMP" "$OUT.version"; then
  say "apiextensions-apiserver: cached: $OUT ($(cat "$OUT.version"))"
  exit 0
fi
T0=$(date +%s)

# One run at a time: a second one waits here, then finds the binary cached.
exec 9>"$WORK/.lock"
flock 9
if [ -x "$OUT" ] && grep -qs "^apiextensions-apiserver v$K8S_MINOR\..*$STAMP" "$OUT.version"; then
  say "apiextensions-apiserver: cached: $OUT ($(cat "$OUT.version"))"
  exit 0
fi
# The scratch tree of a run that was killed.
if [ -s "$WORK/scratch.path" ]; then rm -rf "$(cat "$WORK/scratch.path")"; rm -f "$WORK/scratch.path"; fi

for tool in apt-get apt-cache dpkg-deb flock; do
  command -v "$tool" >/dev/null || { say "$tool is needed (a Debian machine)"; exit 1; }
done

# 1. A private apt configuration listing only sid. APT_CONFIG replaces /etc/apt/apt.conf and,
#    since it sets Dir::Etc::Parts, /etc/apt/apt.conf.d too; nothing under /etc or
#    /var/lib/apt is read or written.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] || { say "$KEYRING missing: apt-get install debian-archive-keyring"; exit 1; }
mkdir -p "$APTDIR"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d} "$DEBS"
[ -e "$APTDIR/status" ] || : >"$APTDIR/status"
cat >"$APTDIR/apt.conf" <<EOF
Dir::State "$APTDIR";
Dir::State::Lists "$APTDIR/lists";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR";
Dir::Cache::archives "$APTDIR/archives";
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "$APTDIR/etc/sources.list.d";
Dir::Etc::Preferences "$APTDIR/etc/preferences";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d";
Dir::Etc::Parts "$APTDIR/etc/apt.conf.d";
Dir::Log "$APTDIR/log";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
APT::Sandbox::User "root";
// The mirror reachable here may serve a sid that is some weeks old: its Release file is
// still signed and checked, only its Valid-Until date is not.
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
EOF
# The Debian archive this machine's own apt sources use (read, not changed: --print-uris
# fetches nothing and the lists directory is a throwaway one), unless PODIUM_DEBIAN_MIRROR is set.
mirror="${PODIUM_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mkdir -p "$APTDIR/probe/partial"
  mirror=$(apt-get -o Dir::State::Lists="$APTDIR/probe" update --print-uris 2>/dev/null \
    | sed -nE "s#^'(.*)/dists/(oldstable|stable|testing|unstable|sid|bullseye|bookworm|trixie|forky)/InRelease'.*#\1#p" \
    | head -1) || true
  rm -rf "$APTDIR/probe"
fi
[ -n "$mirror" ] || { say "no Debian archive in this machine's apt sources; set PODIUM_DEBIAN_MIRROR"; exit 1; }
echo "deb [signed-by=$KEYRING] $mirror sid main" >"$APTDIR/etc/sources.list"
export APT_CONFIG="$APTDIR/apt.conf"

# The lists are fetched once and kept with the .debs, so a rebuild uses the same package
# versions and needs no network. To move to a newer sid (or if a download fails because sid
# has dropped these versions), remove $APTDIR/lists.
if ! compgen -G "$APTDIR/lists/*_Packages*" >/dev/null; then
  say "apt-get update (private sid lists in $APTDIR)"
  apt-get update -qq >"$WORK/apt-update.log" 2>&1 || { cat "$WORK/apt-update.log" >&2; exit 1; }
fi

ver=$(apt-cache policy golang-k8s-apiextensions-apiserver-dev | awk '/Candidate:/ {print $2}')
case "$ver" in
  0.${K8S_MINOR#1.}.*) ;;
  *) say "sid has golang-k8s-apiextensions-apiserver-dev '$ver', not 0.${K8S_MINOR#1.}.x (lists of $(stat -c %y "$APTDIR/lists" | cut -d' ' -f1); remove $APTDIR/lists to refetch, or update K8S_MINOR/GO_PKG here)"; exit 1 ;;
esac
upstream="${ver%%-*}"                   # 0.36.4
K8S_VERSION="v1.${upstream#0.}"         # v1.36.4
say "sid: golang-k8s-apiextensions-apiserver-dev $ver (Kubernetes $K8S_VERSION), $GO_PKG-go $(apt-cache policy "$GO_PKG-go" | awk '/Candidate:/ {print $2}')"

# 2. The dependency closure, restricted to Go source packages (golang-*-dev): those carry all
#    the code the build needs. Everything else the closure reaches (libc6, tzdata, protoc, ...)
#    is for installing the packages, not for building from their sources.
apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev \
  | grep -E '^golang-.*-dev$' | sort -u >"$WORK/packages.txt"
printf '%s\n' "$GO_PKG-go" "$GO_PKG-src" >>"$WORK/packages.txt"
npkg=$(wc -l <"$WORK/packages.txt")

# Only the .debs not yet in $DEBS with their full size, by exact file name. (--print-uris
# prints "URI FILE SIZE HASH" but leaves out the files already in the current directory, hence
# an empty one.)
rm -rf "$APTDIR/empty" && mkdir "$APTDIR/empty"
mapfile -t pkgs <"$WORK/packages.txt"
mapfile -t uris < <(cd "$APTDIR/empty" && apt-get download --print-uris "${pkgs[@]}" | sort -u)
[ "${#uris[@]}" = "$npkg" ] || { say "apt-get download --print-uris named ${#uris[@]} files for $npkg packages"; exit 1; }
want=() missing=()
for line in "${uris[@]}"; do
  read -r _ f size _ <<<"$line"
  want+=("$f")
  [ "$(stat -c %s "$DEBS/$f" 2>/dev/null)" = "$size" ] || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
  # apt-get download names each .deb NAME_VERSION_ARCH.deb; the package name is the first field.
  names=()
  for f in "${missing[@]}"; do names+=("${f%%_*}"); rm -f "$DEBS/$f"; done
  say "apt-get download: ${#missing[@]} of $npkg packages (about 260 MB cold) into $DEBS"
  download() { cd "$DEBS" && exec apt-get download -q "${names[@]}"; }
  run_logged downloading "$WORK/download.log" download
else
  say "all $npkg .debs already in $DEBS"
fi

# 3. Unpack into a scratch tree: about 2.2 GB in 120,000 files.
if [ -n "${PODIUM_APIEXT_SCRATCH:-}" ]; then
  mkdir -p "$PODIUM_APIEXT_SCRATCH"
  SCRATCH=$(mktemp -d "$PODIUM_APIEXT_SCRATCH/podium-apiext.XXXXXX")
elif [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt $((6 * 1024 * 1024)) ]; then
  SCRATCH=$(mktemp -d /dev/shm/podium-apiext.XXXXXX)
else
  SCRATCH=$(mktemp -d "$WORK/scratch.XXXXXX")
fi
echo "$SCRATCH" >"$WORK/scratch.path"
ROOT="$SCRATCH/root"
mkdir -p "$ROOT"
say "unpacking $npkg .debs into $ROOT"
unpack() {
  local f
  for f in "${want[@]}"; do dpkg-deb -x "$DEBS/$f" "$ROOT"; done
}
run_logged unpacking "$WORK/unpack.log" unpack

# The packages' symlinks are relative (GOROOT/src -> ../../share/go-1.26/src and so on), so
# the tree works wherever it is unpacked.
GOROOT_DIR="$ROOT/usr/lib/go-${GO_PKG#golang-}"
[ -x "$GOROOT_DIR/bin/go" ] || { say "no go binary in $GOROOT_DIR/bin"; exit 1; }
[ -f "$ROOT/usr/share/gocode/src/k8s.io/apiextensions-apiserver/main.go" ] \
  || { say "k8s.io/apiextensions-apiserver/main.go missing from the unpacked tree"; exit 1; }

# Root discovery: pkg/apiserver/apiserver.go's Complete() sets GenericConfig.EnableDiscovery to
# false, so /apis answers 404 and kubectl/Helm fail with "couldn't get current server API group
# list". With the line gone, /apis serves apiextensions.k8s.io and, as aggregated discovery
# (what kubectl and Helm ask for), every CRD group too.
APISERVER_GO="$ROOT/usr/share/gocode/src/k8s.io/apiextensions-apiserver/pkg/apiserver/apiserver.go"
grep -q '^	c.GenericConfig.EnableDiscovery = false$' "$APISERVER_GO" \
  || { say "the EnableDiscovery line is not in $APISERVER_GO any more: check the patch"; exit 1; }
sed -i 's|^	c.GenericConfig.EnableDiscovery = false$|	// podium: root discovery left on (install-apiext.sh)|' "$APISERVER_GO"
say "patched $APISERVER_GO: root /apis discovery on"

# 4. Build in GOPATH mode against the unpacked sources only: no module proxy, no toolchain
#    download, no cgo, no file outside $WORK and the scratch tree.
say "building apiextensions-apiserver $K8S_VERSION with $("$GOROOT_DIR/bin/go" version 2>/dev/null | awk '{print $3}') (4 to 7 minutes on 2 cores, by load; log in $WORK/build.log)"
build() {
  exec env -i PATH="$GOROOT_DIR/bin:/usr/bin:/bin" HOME="$SCRATCH" \
    GOROOT="$GOROOT_DIR" GOPATH="$ROOT/usr/share/gocode" GO111MODULE=off GOTOOLCHAIN=local \
    CGO_ENABLED=0 GOFLAGS= GOPROXY=off GOENV=off GOTELEMETRY=off GOWORK=off \
    GOCACHE="$SCRATCH/gocache" GOTMPDIR="$SCRATCH" \
    go build -v -trimpath -o "$OUT.tmp" \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_MINOR#1.} -X k8s.io/component-base/version.gitTreeState=clean" \
      k8s.io/apiextensions-apiserver
}
run_logged building "$WORK/build.log" build
mv "$OUT.tmp" "$OUT"

# The binary is what matters. The .debs and the apt lists stay, so a rebuild needs no network
# and gets the same versions even after sid has moved on; the scratch tree goes (trap above).
echo "apiextensions-apiserver $K8S_VERSION (golang-k8s-apiextensions-apiserver-dev $ver, $("$GOROOT_DIR/bin/go" version | awk '{print $3}'), $STAMP)" >"$OUT.version"
rm -rf "$SCRATCH" "$WORK/scratch.path" "$APTDIR"/*.bin
SCRATCH=""
say "built $OUT in $(( $(date +%s) - T0 ))s: $(cat "$OUT.version")"
