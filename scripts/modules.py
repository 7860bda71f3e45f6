#!/usr/bin/env python3
"""The agent's module dependency graph, read from its source.

    scripts/modules.py check     # fails on an import cycle, or on docs/ARCHITECTURE.md
                                 # drifting from the tree (its picture or its module table)
    scripts/modules.py mermaid   # prints the picture docs/ARCHITECTURE.md opens with
    scripts/modules.py edges     # prints every module and what it uses

A module is a top-level file or directory of agent/src (lib.rs and main.rs
excepted); module A uses B when A's code names `crate::B` (also inside a
`use crate::{...}` group). Submodules of one directory are one module.

Cycles are checked over all code, tests included. The picture shows the
production code only (the text before a file's first `#[cfg(test)]`, and no
file that is itself a test module), with every edge implied by a longer path
left out (a transitive reduction), so it stays readable.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "agent", "src")
ARCHITECTURE = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
BEGIN = "<!-- modules:begin (scripts/modules.py mermaid) -->"
END = "<!-- modules:end -->"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def modules():
    """Module name -> its source files."""
    found = {}
    for name in sorted(os.listdir(SRC)):
        path = os.path.join(SRC, name)
        if name.endswith(".rs") and name not in ("lib.rs", "main.rs"):
            found.setdefault(name[:-3], []).append(path)
        elif os.path.isdir(path):
            for dirpath, _, files in os.walk(path):
                for f in sorted(files):
                    if f.endswith(".rs"):
                        found.setdefault(name, []).append(os.path.join(dirpath, f))
    return found


def test_only_files():
    """Files declared as `#[cfg(test)] mod x;` by their parent."""
    out = set()
    for dirpath, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            text = open(path, encoding="utf-8").read()
            base = dirpath if f in ("mod.rs", "lib.rs") else os.path.join(dirpath, f[:-3])
            for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+(\w+)\s*;", text):
                out.add(os.path.join(base, m.group(1) + ".rs"))
                out.add(os.path.join(base, m.group(1), "mod.rs"))
    return out


def group_heads(text, i):
    """The first identifier of each top-level item of the `{...}` at text[i]."""
    depth, out, at_start, j = 0, [], True, i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
            if depth == 1:
                at_start = True
                j += 1
                continue
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            at_start = True
            j += 1
            continue
        if depth == 1 and at_start and not c.isspace():
            m = IDENT.match(text, j)
            if m:
                out.append(m.group(0))
                j = m.end()
            at_start = False
            continue
        j += 1
    return out


def uses(text, known):
    text = re.sub(r"//[^\n]*", "", text)
    out = set()
    for m in re.finditer(r"\bcrate::", text):
        k = m.end()
        if text.startswith("{", k):
            names = group_heads(text, k)
        else:
            ident = IDENT.match(text, k)
            names = [ident.group(0)] if ident else []
        out.update(n for n in names if n in known)
    return out


def graph(production_only):
    mods = modules()
    skip = test_only_files() if production_only else set()
    edges = {m: set() for m in mods}
    for name, files in mods.items():
        for path in files:
            if path in skip:
                continue
            text = open(path, encoding="utf-8").read()
            if production_only and "#[cfg(test)]" in text:
                text = text[: text.index("#[cfg(test)]")]
            edges[name] |= uses(text, mods) - {name}
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges, start, skip_edge):
    seen, todo = set(), [w for w in edges[start] if (start, w) != skip_edge]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges[v])
    return seen


def reduction(edges):
    return {
        v: {w for w in ws if w not in reachable(edges, v, (v, w))} for v, ws in edges.items()
    }


def layers(edges):
    """Each module's height: 0 for one that uses none, else 1 + the highest it uses."""
    height = {}

    def h(v):
        if v not in height:
            height[v] = 0
            height[v] = 1 + max((h(w) for w in edges[v]), default=-1)
        return height[v]

    for v in edges:
        h(v)
    return height


def mermaid():
    edges = graph(production_only=True)
    reduced = reduction(edges)
    height = layers(edges)
    lines = ["```mermaid", "flowchart TD"]
    for level in sorted(set(height.values()), reverse=True):
        names = sorted(v for v in height if height[v] == level)
        lines.append(f'  subgraph L{level}["height {level}"]')
        lines.append("    direction LR")
        lines.extend(f"    {n}" for n in names)
        lines.append("  end")
    for v in sorted(reduced):
        for w in sorted(reduced[v]):
            lines.append(f"  {v} --> {w}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def table_modules(text):
    """Module names in the first column of ARCHITECTURE's module table."""
    section = text.split("## Modules", 1)
    if len(section) < 2:
        return None
    body = section[1].split("\n## ", 1)[0]
    names = set()
    for line in body.splitlines():
        m = re.match(r"\|\s*`([a-z_]+)(?:\.rs|/)?`", line)
        if m:
            names.add(m.group(1))
    return names


def check():
    problems = []
    for comp in cycles(graph(production_only=False)):
        problems.append("import cycle between modules: " + ", ".join(comp))
    doc = open(ARCHITECTURE, encoding="utf-8").read()
    if BEGIN not in doc or END not in doc:
        problems.append(f"docs/ARCHITECTURE.md lacks the picture between {BEGIN} and {END}")
    else:
        shown = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
        if shown != mermaid():
            problems.append(
                "docs/ARCHITECTURE.md's module picture is stale: replace it with the output of "
                "`scripts/modules.py mermaid`"
            )
    listed = table_modules(doc)
    actual = set(modules())
    if listed is None:
        problems.append("docs/ARCHITECTURE.md has no '## Modules' table")
    else:
        for m in sorted(actual - listed):
            problems.append(f"module {m} is missing from ARCHITECTURE's module table")
        for m in sorted(listed - actual):
            problems.append(f"ARCHITECTURE's module table lists {m}, which agent/src does not have")
    for p in problems:
        print(f"modules: {p}", file=sys.stderr)
    if not problems:
        print(f"modules: {len(actual)} modules, no import cycle, ARCHITECTURE matches the tree")
    return 1 if problems else 0


def main(argv):
    if argv == ["check"]:
        return check()
    if argv == ["mermaid"]:
        sys.stdout.write(mermaid())
        return 0
    if argv == ["edges"]:
        for v, ws in sorted(graph(production_only=False).items()):
            print(f"{v} -> {' '.join(sorted(ws))}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
