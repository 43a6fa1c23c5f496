#!/usr/bin/env python3
"""Render and check the krew plugin manifest (.github/krew/podium.yaml.tmpl).

  krew-manifest.py render --version 0.1.0 --repo podium-dev/podium --dist DIR -o plugins/podium.yaml
      the sums of DIR/kubectl-podium_<version>_<os>_<arch>.tar.gz (the release workflow)
  krew-manifest.py render --version 0.1.0 --repo podium-dev/podium --placeholder-sums -o FILE
      a made-up sum per platform, for scripts/test.sh
  krew-manifest.py check FILE [--version 0.1.0]
      the fields krew's own validation requires (kubernetes-sigs/krew,
      internal/index/validation), plus the four platforms this project ships

render needs only the standard library; check needs a YAML parser (ruamel.yaml, which
check-jsonschema installs into its venv, or PyYAML).
"""
import argparse
import hashlib
import os
import re
import string
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, ".github", "krew", "podium.yaml.tmpl")
PLATFORMS = [("linux", "amd64"), ("linux", "arm64"), ("darwin", "amd64"), ("darwin", "arm64")]
SHA256 = re.compile(r"^[a-f0-9]{64}$")
# krew parses spec.version as semver with a leading v.
SEMVER = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


def archive(version, os_, arch):
    return f"kubectl-podium_{version}_{os_}_{arch}.tar.gz"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render(args):
    values = {"VERSION": args.version, "REPO": args.repo}
    for os_, arch in PLATFORMS:
        key = f"SHA256_{os_.upper()}_{arch.upper()}"
        if args.placeholder_sums:
            # Distinct per platform, and of the form krew accepts.
            values[key] = hashlib.sha256(f"placeholder {os_} {arch}".encode()).hexdigest()
        else:
            path = os.path.join(args.dist, archive(args.version, os_, arch))
            if not os.path.isfile(path):
                sys.exit(f"krew-manifest: {path} is missing")
            values[key] = sha256_of(path)
    with open(TEMPLATE) as f:
        lines = f.read().splitlines(keepends=True)
    # The header comment documents the placeholders (with a made-up one); it is not rendered.
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    try:
        # substitute, not safe_substitute: an unknown placeholder fails the release.
        body = string.Template("".join(lines)).substitute(values)
    except (KeyError, ValueError) as e:
        sys.exit(f"krew-manifest: {TEMPLATE}: bad or unknown placeholder: {e}")
    out = f"# Rendered from .github/krew/podium.yaml.tmpl for v{args.version}.\n" + body
    if args.output == "-":
        sys.stdout.write(out)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(out)


def load_yaml(path):
    try:
        from ruamel.yaml import YAML

        with open(path) as f:
            return YAML(typ="safe").load(f)
    except ImportError:
        pass
    try:
        import yaml
    except ImportError:
        sys.exit("krew-manifest: check needs ruamel.yaml or PyYAML")
    with open(path) as f:
        return yaml.safe_load(f)


def check(args):
    errors = []

    def need(cond, msg):
        if not cond:
            errors.append(msg)
        return cond

    with open(args.file) as f:
        text = f.read()
    need("${" not in text, "a placeholder was left unrendered")
    doc = load_yaml(args.file)
    if not need(isinstance(doc, dict), "not a YAML mapping"):
        return report(args.file, errors)
    need(doc.get("apiVersion") == "krew.googlecontainertools.github.com/v1alpha2",
         f"apiVersion is {doc.get('apiVersion')!r}")
    need(doc.get("kind") == "Plugin", f"kind is {doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name")
    # krew requires the manifest's file name to be the plugin's name.
    stem = os.path.basename(args.file).split(".")[0]
    need(name == "podium", f"metadata.name is {name!r}, not 'podium'")
    need(stem == name or args.any_name, f"the file is named {stem!r}, krew wants {name!r}.yaml")
    spec = doc.get("spec") or {}
    version = spec.get("version") or ""
    need(SEMVER.match(str(version)), f"spec.version {version!r} is not v-prefixed semver")
    if args.version:
        need(version == f"v{args.version}", f"spec.version is {version!r}, not v{args.version}")
    short = spec.get("shortDescription") or ""
    need(short and "\n" not in short and "\r" not in short,
         "spec.shortDescription must be set and on one line")
    platforms = spec.get("platforms") or []
    need(platforms, "spec.platforms is empty")
    seen = []
    for i, p in enumerate(platforms):
        where = f"spec.platforms[{i}]"
        sel = p.get("selector") or {}
        labels = sel.get("matchLabels") or {}
        need(labels and not sel.get("matchExpressions"), f"{where}.selector must be matchLabels")
        need(set(labels) <= {"os", "arch"}, f"{where}.selector has keys other than os and arch")
        plat = (labels.get("os"), labels.get("arch"))
        seen.append(plat)
        uri = p.get("uri") or ""
        need(uri.startswith("https://"), f"{where}.uri {uri!r} is not https")
        v = str(version).lstrip("v")
        need(uri.endswith("/v" + v + "/" + archive(v, *plat)),
             f"{where}.uri {uri!r} is not the release asset for {plat}")
        need(SHA256.match(str(p.get("sha256") or "")), f"{where}.sha256 is not 64 lowercase hex digits")
        binary = p.get("bin") or ""
        need(binary, f"{where}.bin is not set")
        files = p.get("files")
        if files is not None:
            need(files, f"{where}.files must be left out or non-empty")
            for j, op in enumerate(files or []):
                need(op.get("from") and op.get("to"), f"{where}.files[{j}] needs from and to")
            need(any(op.get("from") == binary for op in files or []),
                 f"{where}.files does not extract bin {binary!r}")
    need(sorted(seen) == sorted(PLATFORMS), f"platforms are {seen}, expected {PLATFORMS}")
    need(len(set(seen)) == len(seen), "a platform appears twice")
    return report(args.file, errors)


def report(path, errors):
    if errors:
        for e in errors:
            print(f"{path}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{path}: a valid krew manifest ({len(PLATFORMS)} platforms)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--version", required=True, help="without the v, e.g. 0.1.0")
    r.add_argument("--repo", required=True, help="owner/name")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--dist", help="directory holding the four archives")
    g.add_argument("--placeholder-sums", action="store_true")
    r.add_argument("-o", "--output", default="-")
    c = sub.add_parser("check")
    c.add_argument("file")
    c.add_argument("--version", help="the version spec.version must carry (without the v)")
    c.add_argument("--any-name", action="store_true", help="do not require the file to be podium.yaml")
    args = ap.parse_args()
    render(args) if args.cmd == "render" else check(args)


if __name__ == "__main__":
    main()
