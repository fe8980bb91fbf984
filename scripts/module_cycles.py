#!/usr/bin/env python3
"""Fail when the module graph of src/ has an import cycle.

The graph: one node per source file (src/a.rs and src/a/mod.rs are `a`, src/a/b.rs is `a::b`); an edge
a -> b for every `crate::` or `super::` path in a's code (comments and string literals left out) that
names b or something inside b (the longest module prefix of the path). Uses inside `#[cfg(test)]` code
count too: a test that needs a module above its own is a layering smell as well.

Prints each cycle (strongly connected component of two or more modules) and exits 1, else prints the
module count and exits 0. Run by the integration test `module_graph_has_no_cycle` (tests/layout.rs).

    python3 scripts/module_cycles.py [SRC_DIR] [--dot]
"""
import re
import sys
from pathlib import Path


def module_name(src: Path, file: Path) -> str:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def strip_comments_and_strings(text: str) -> str:
    """Blank out comments, string and char literals so that only code is searched."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 40]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12])
            i += len(m.group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def expand(text: str, start: int) -> list[list[str]]:
    """The paths spelled from `start` (just after `crate::`): a::b::C, or a::{b, c::{D, E}}."""

    def parse(i):
        # returns (list of segment lists, end index)
        segs = []
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i < len(text) and text[i] == "{":
                groups, i = [], i + 1
                while True:
                    while i < len(text) and (text[i].isspace() or text[i] == ","):
                        i += 1
                    if i >= len(text) or text[i] == "}":
                        return [segs + g for g in groups] or [segs], i + 1
                    sub, i = parse(i)
                    groups.extend(sub)
            m = re.compile(IDENT).match(text, i)
            if not m:
                return [segs], i
            segs.append(m.group(0))
            i = m.end()
            m = re.compile(r"\s*::\s*").match(text, i)
            if not m:
                return [segs], i
            i = m.end()

    return parse(start)[0]


def inline_modules(code: str) -> list[tuple[int, int]]:
    """(start, end) of each inline `mod name { … }` block."""
    spans = []
    for m in re.finditer(r"\bmod\s+" + IDENT + r"\s*\{", code):
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        spans.append((m.start(), i))
    return spans


def graph(src: Path):
    files = sorted(p for p in src.rglob("*.rs"))
    modules = {module_name(src, f): f for f in files}
    edges = {m: set() for m in modules}
    for name, file in modules.items():
        code = strip_comments_and_strings(file.read_text())
        here = name.split("::") if name != "crate" else []
        inline = inline_modules(code)
        for m in re.finditer(r"\b(crate|super|self)\s*::", code):
            if m.group(1) == "crate":
                base = []
            else:
                # `self`/`super` inside an inline `mod tests { … }` start from that inline module
                depth = sum(start <= m.start() < end for start, end in inline)
                up = (m.group(1) == "super") - depth
                if up <= 0:
                    continue  # this file's own module (or an inline module in it)
                base = here[:-up]
            for path in expand(code, m.end()):
                full = list(base)
                for segment in path:
                    if segment == "super":  # super::super::…
                        full = full[:-1]
                    elif segment != "self":
                        full.append(segment)
                # the longest prefix that is a module file
                for k in range(len(full), -1, -1):
                    target = "::".join(full[:k]) or "crate"
                    if target in modules:
                        break
                if target != name and target != "crate":
                    edges[name].add(target)
    return modules, edges


def cycles(edges):
    """Tarjan's strongly connected components with two or more members."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "src"
    modules, edges = graph(src)
    if "--dot" in sys.argv:
        print("digraph sdscale {")
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    found = cycles(edges)
    for comp in found:
        members = set(comp)
        print(f"cycle among {len(comp)} modules: {', '.join(comp)}")
        for a in comp:
            inside = sorted(edges[a] & members)
            print(f"  {a} -> {', '.join(inside)}")
    if found:
        return 1
    print(f"{len(modules)} modules, {sum(map(len, edges.values()))} edges, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
