#!/usr/bin/env bash
# Checks that the workspace's `rust-version` (Cargo.toml, [workspace.package])
# is one the locked dependency tree builds with: fails, naming the package,
# when any package resolved for the workspace (Cargo.lock, every target and
# dev-dependencies included) declares a `rust-version` above the workspace's;
# also fails when the installed rustc is older than the workspace's.
#
#   scripts/check-msrv.sh
#
# Needs cargo and python3 (scripts/setup.sh installs python3-venv).
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

metadata=$(mktemp)
trap 'rm -f "$metadata"' EXIT
cargo metadata --locked --format-version 1 >"$metadata"

rustc_version=$(rustc --version | awk '{print $2}')

python3 - "$metadata" "$rustc_version" <<'PY'
import json
import sys


def parse(version):
    # "1.85" and "1.85.0" are the same; a pre-release suffix ("1.90.0-beta")
    # counts as its release.
    core = version.split("-", 1)[0].split("+", 1)[0]
    parts = [int(p) for p in core.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


with open(sys.argv[1], encoding="utf-8") as f:
    meta = json.load(f)
rustc = sys.argv[2]

packages = {p["id"]: p for p in meta["packages"]}
members = [packages[i] for i in meta["workspace_members"]]

undeclared = [m["name"] for m in members if not m.get("rust_version")]
if undeclared:
    print(
        "check-msrv: workspace member(s) without rust-version: "
        + ", ".join(undeclared),
        file=sys.stderr,
    )
    sys.exit(1)

# The workspace's MSRV: its members inherit [workspace.package] rust-version;
# the lowest one is the promise to check.
msrv_member = min(members, key=lambda m: parse(m["rust_version"]))
msrv = msrv_member["rust_version"]

member_ids = set(meta["workspace_members"])
resolved = [
    packages[n["id"]]
    for n in meta["resolve"]["nodes"]
    if n["id"] not in member_ids
]
above = sorted(
    (
        p
        for p in resolved
        if p.get("rust_version") and parse(p["rust_version"]) > parse(msrv)
    ),
    key=lambda p: (tuple(-x for x in parse(p["rust_version"])), p["name"]),
)

declared = [p for p in resolved if p.get("rust_version")]
highest = max(declared, key=lambda p: parse(p["rust_version"]), default=None)

failed = False
if above:
    top = parse(above[0]["rust_version"])
    setters = ", ".join(p["name"] for p in above if parse(p["rust_version"]) == top)
    print(
        f"check-msrv: the workspace declares rust-version = \"{msrv}\", "
        f"but {len(above)} resolved package(s) need more:",
        file=sys.stderr,
    )
    for p in above:
        print(
            f"  {p['name']} {p['version']} declares rust-version {p['rust_version']}",
            file=sys.stderr,
        )
    print(
        f"check-msrv: raise rust-version in Cargo.toml to at least "
        f"\"{above[0]['rust_version']}\" (set by {setters}), "
        "or pin the package(s) lower in Cargo.lock",
        file=sys.stderr,
    )
    failed = True

if parse(rustc) < parse(msrv):
    print(
        f"check-msrv: the installed rustc {rustc} is older than the workspace's "
        f"rust-version {msrv}",
        file=sys.stderr,
    )
    failed = True

if failed:
    sys.exit(1)

if highest is not None:
    print(
        f"check-msrv: ok: rust-version {msrv} (rustc {rustc}); highest declared by a "
        f"dependency: {highest['rust_version']} ({highest['name']} {highest['version']}), "
        f"{len(resolved)} resolved packages",
        file=sys.stderr,
    )
else:
    print(f"check-msrv: ok: rust-version {msrv} (rustc {rustc})", file=sys.stderr)
PY
