"""The package's import graph, read with ``ast``: circles, imports that run back up a layer, and floors.

    python -m tests.import_layers            # from the project root; exits 1 when a rule is broken

A module's layer is its folder (``LAYERS``, lowest first); a module may import its own folder and the layers below.
Imports inside functions count like the others. Floors: the longest chain of imports, a module importing nothing of
the package being floor 1.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "arc25_fast"
LAYERS = ("kernels", "runtime", "data", "sandbox", "training", "solving", "commands", "")  # "" = the package's top
MAX_FLOORS = 9


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (``kernels/`` is ``arc25_fast.kernels``)."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "kernels" in parts:
            continue
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((root / "kernels").glob("*.py")):
        files[f"{PACKAGE}.kernels.{path.stem}"] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != PACKAGE and target.startswith(PACKAGE + "."):
                found.add(target)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):  # a package of a few hundred modules: recursion is deep enough
        if v not in index:
            visit(v)
    return out


def floors(g: dict[str, set[str]]) -> int:
    """The longest import chain, counting every module of a circle as one floor."""
    memo: dict[str, int] = {}

    def depth(v, seen):
        if v in memo:
            return memo[v]
        seen = seen | {v}
        memo[v] = 1 + max((depth(w, seen) for w in g[v] if w not in seen), default=0)
        return memo[v]

    return max(depth(v, frozenset()) for v in g)


def upward(g: dict[str, set[str]]) -> list[str]:
    """Imports of a layer above (a folder imports its own modules and the layers below)."""
    bad = []
    for v, targets in sorted(g.items()):
        for w in sorted(targets):
            lv, lw = layer(v), layer(w)
            if lv not in LAYERS or lw not in LAYERS:
                bad.append(f"{v} -> {w}: {lv if lv not in LAYERS else lw} is not a layer")
            elif LAYERS.index(lw) > LAYERS.index(lv):
                bad.append(f"{v} -> {w}")
    return bad


def report(root: Path = ROOT) -> dict:
    g = graph(root)
    return {"modules": len(g), "floors": floors(g), "circles": circles(g), "upward": upward(g)}


def main() -> int:
    r = report()
    print(f"{r['modules']} modules, {r['floors']} floors (at most {MAX_FLOORS}), {len(r['circles'])} circles, "
          f"{len(r['upward'])} imports up a layer")
    for c in r["circles"]:
        print("circle:", " <-> ".join(c))
    for u in r["upward"]:
        print("up:", u)
    return 0 if r["floors"] <= MAX_FLOORS and not r["circles"] and not r["upward"] else 1


if __name__ == "__main__":
    sys.exit(main())
