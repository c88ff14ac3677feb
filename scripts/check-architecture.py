#!/usr/bin/env python3
"""Checks the crate graph against docs/architecture.md.

docs/architecture.md lists, between `<!-- deps:begin -->` and `<!-- deps:end -->`,
one line per workspace crate: `crate -> dep, dep` (its normal and build
dependencies among workspace crates; `crate ->` for none). This script reads
`cargo metadata` (no build) and fails if the document and the manifests
disagree, if an arrow points up the crate table, or if a crate's normal
dependency tree contains a package it must never pull in (RocksDB, io_uring,
Redis, CUDA or candle in the client, candle in the daemon library).

Run by `make test` (target `arch-check`).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

# Packages a crate's normal dependency tree must not contain.
FORBIDDEN = {
    "kvstrata-types": {"librocksdb-sys", "io-uring", "redis", "cudarc", "candle-core"},
    "kvstrata-client": {"librocksdb-sys", "io-uring", "redis", "cudarc", "candle-core"},
    "kvstrata-router": {"librocksdb-sys", "io-uring", "redis", "cudarc", "candle-core"},
    "kvstrata-engine": {"librocksdb-sys", "io-uring", "redis", "cudarc"},
    "kvstrata-server": {"candle-core"},
}


def documented_edges(text):
    m = re.search(r"<!-- deps:begin -->(.*?)<!-- deps:end -->", text, re.S)
    if not m:
        sys.exit(f"{DOC}: no <!-- deps:begin --> ... <!-- deps:end --> block")
    order, edges = [], {}
    for line in m.group(1).splitlines():
        line = line.strip()
        if not line or line.startswith("```"):
            continue
        if "->" not in line:
            sys.exit(f"{DOC}: malformed dependency line {line!r} (want `crate -> dep, dep`)")
        name, deps = (part.strip() for part in line.split("->", 1))
        order.append(name)
        edges[name] = {d.strip() for d in deps.split(",") if d.strip()}
    return order, edges


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    members = {packages[i]["name"] for i in meta["workspace_members"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}

    def normal_deps(pid):
        for d in nodes[pid]["deps"]:
            kinds = {k["kind"] for k in d["dep_kinds"]}
            if kinds & {None, "build"}:
                yield d["pkg"]

    actual = {}
    for pid in meta["workspace_members"]:
        name = packages[pid]["name"]
        actual[name] = {
            packages[d]["name"] for d in normal_deps(pid) if packages[d]["name"] in members
        }

    order, documented = documented_edges(DOC.read_text())
    errors = []
    for name in sorted(members - set(documented)):
        errors.append(f"{name}: missing from the dependency block of docs/architecture.md")
    for name in sorted(set(documented) - members):
        errors.append(f"{name}: in docs/architecture.md but not a workspace crate")
    for name in sorted(members & set(documented)):
        if documented[name] != actual[name]:
            extra = sorted(actual[name] - documented[name])
            missing = sorted(documented[name] - actual[name])
            if extra:
                errors.append(f"{name}: depends on {', '.join(extra)} (not in docs/architecture.md)")
            if missing:
                errors.append(f"{name}: docs/architecture.md says it depends on {', '.join(missing)}, Cargo.toml does not")
    rank = {name: i for i, name in enumerate(order)}
    for name, deps in actual.items():
        for dep in deps:
            if name in rank and dep in rank and rank[dep] >= rank[name]:
                errors.append(f"{name} -> {dep}: points up the table (list dependencies before their users)")

    by_name = {}
    for pid, p in packages.items():
        by_name.setdefault(p["name"], []).append(pid)
    for name, banned in FORBIDDEN.items():
        for root in by_name.get(name, []):
            seen, stack, hits = set(), [root], set()
            while stack:
                pid = stack.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                if packages[pid]["name"] in banned:
                    hits.add(packages[pid]["name"])
                stack.extend(normal_deps(pid))
            if hits:
                errors.append(f"{name}: its dependency tree contains {', '.join(sorted(hits))}")

    if errors:
        print("architecture check failed:")
        for e in errors:
            print(f"  {e}")
        return 1
    print(f"architecture check: {len(members)} crates, {sum(len(v) for v in actual.values())} arrows, all as documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
