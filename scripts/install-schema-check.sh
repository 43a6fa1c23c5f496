#!/usr/bin/env bash
# Installs check-jsonschema (PyPI) into its own venv under $PODIUM_CACHE (default
# ~/.cache/podium), only when it is missing, and prints the venv's path on stdout.
# scripts/test.sh validates .github/workflows/*.yml with it (its built-in, vendored copy of
# GitHub's workflow schema: no network once installed) and parses the krew manifest with the
# ruamel.yaml it brings; .github/workflows/release.yml uses it for the latter too.
set -euo pipefail

CHECK_JSONSCHEMA_VERSION="0.39.0"
CACHE="${PODIUM_CACHE:-$HOME/.cache/podium}"
VENV="$CACHE/venv/check-jsonschema-$CHECK_JSONSCHEMA_VERSION"

say() { printf '\033[1;34m[install-schema-check]\033[0m %s\n' "$*" >&2; }

if [ -x "$VENV/bin/check-jsonschema" ] \
   && "$VENV/bin/check-jsonschema" --version 2>/dev/null | grep -q "$CHECK_JSONSCHEMA_VERSION"; then
  say "check-jsonschema $CHECK_JSONSCHEMA_VERSION: cached in $VENV"
  echo "$VENV"
  exit 0
fi

# Debian's python3 has no venv module (ensurepip) without python3-venv.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  # shellcheck source=scripts/apt.sh
  . "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
  apt_install python3 python3-venv
fi

say "pip install check-jsonschema==$CHECK_JSONSCHEMA_VERSION (into $VENV)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
log="$(dirname "$VENV")/pip-install.log"
if ! "$VENV/bin/pip" install --quiet "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" >"$log" 2>&1; then
  tail -20 "$log" >&2
  rm -rf "$VENV"
  say "ERROR: pip could not install check-jsonschema==$CHECK_JSONSCHEMA_VERSION from PyPI (log above, in full in $log)."
  say "       It needs PyPI once (or a pip index/find-links that holds it); then it is cached in $VENV."
  exit 1
fi
say "check-jsonschema: $("$VENV/bin/check-jsonschema" --version)"
echo "$VENV"
