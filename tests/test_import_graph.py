"""The layering holds: no import cycle between top-level packages, between runtime's subpackages, or between
modules; graphs/ and kernels/ import nothing from runtime/. Read from the source (ast), nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "graphs", "runtime", "server", "tools", "train", "bench", "fixtures")
LAYERED = {"runtime.models", "runtime.vlm", "runtime.cascade"}  # runtime's subpackages; its own modules: "runtime"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
               for n in ast.walk(node) if n is not node.test}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n.split(".")[0] in PACKAGES]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # "a.b.c" may name a module or an attribute of module "a.b": keep the longest that is a module.
        targets = []
        for target, at_top in imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.append((target, at_top))
        edges[name] = targets
    return edges


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "runtime" and ".".join(parts[:2]) in LAYERED:
        return ".".join(parts[:2])
    return parts[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_between_packages_or_runtime_subpackages():
    groups: dict[str, set[str]] = {}
    for source, targets in graph().items():
        for target, _ in targets:
            if group(source) != group(target):
                groups.setdefault(group(source), set()).add(group(target))
    assert cycles(groups) == []


def test_no_cycle_between_modules():
    edges = {source: {target for target, at_top in targets if at_top} for source, targets in graph().items()}
    assert cycles(edges) == []


def test_graphs_and_kernels_import_nothing_from_runtime():
    offending = [(source, target) for source, targets in graph().items() if group(source) in ("graphs", "kernels")
                 for target, _ in targets if target.startswith("runtime")]
    assert offending == []
