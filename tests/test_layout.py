"""The layering, read from the source (ast, nothing imported). No import cycle between top-level packages, between
runtime's subpackages, or between modules (imports under `if TYPE_CHECKING:` included); graphs/ and kernels/ import nothing from runtime/;
imagesets/ sits below server/, tools/ and train/, tools/ imports nothing from server/, train/ nothing from tools/. Shared test helpers
live in fixtures/: no test module imports another, neither bench/ nor fixtures/ imports tests/, and fixtures/
imports nothing from bench/."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_MODULES = {path.stem for path in (REPO / "tests").glob("*.py")}


def import_statements(source: str, package: str) -> list[tuple[str, bool, bool]]:
    """(module, at module level?, under `if TYPE_CHECKING:`?) for every module an import statement names, anywhere
    in the file (function bodies too), relative ones resolved against `package`; `from a import b` names both a and
    a.b, since b may be a module."""
    tree = ast.parse(source)
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                 for n in ast.walk(node) if n is not node.test}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top, id(node) in type_only) for name in names]
    return found


def imported_modules(source: str, package: str) -> set[str]:
    return {module for module, _, _ in import_statements(source, package)}


def names_tests(module: str) -> bool:
    """A module of tests/: through the package, or by its bare name as pytest's rootdir insertion would allow."""
    return module == "tests" or module.startswith("tests.") or module.split(".")[0] in TEST_MODULES


def imports_of(folder: str) -> list[tuple[str, str]]:
    """(file, module) for every import in every file under `folder`."""
    return [(str(path.relative_to(REPO)), module)
            for path in sorted((REPO / folder).rglob("*.py"))
            for module in sorted(imported_modules(path.read_text(), ".".join(path.relative_to(REPO).parent.parts)))]


@pytest.mark.parametrize("folder", ["tests", "bench", "fixtures"])
def test_nothing_imports_a_test_module(folder):
    assert [f"{path} imports {module}" for path, module in imports_of(folder) if names_tests(module)] == []


def test_fixtures_import_no_benchmark():
    """fixtures/ sits below both tests/ and bench/."""
    assert [f"{path} imports {module}" for path, module in imports_of("fixtures")
            if module.split(".")[0] == "bench"] == []


@pytest.mark.parametrize("source, package, found", [
    ("from tests.test_cascade import write_bundle", "bench", True),
    ("def f():\n    from tests import test_server", "fixtures", True),
    ("from . import test_vote", "tests", True),
    ("from .test_vote import formula", "tests", True),
    ("import test_server", "tests", True),
    ("import conftest", "tests", True),
    ("from fixtures.bundles import write_bundle", "tests", False),
    ("from bench.cascade import main", "tests", False),
    ("from .common import jpeg_images", "bench", False),
])
def test_the_walk_finds_test_imports(source, package, found):
    assert any(names_tests(m) for m in imported_modules(source, package)) == found


# --- no cycles between packages, runtime's subpackages, or modules ---

PACKAGES = ("kernels", "graphs", "runtime", "imagesets", "server", "tools", "train", "bench", "fixtures")
LAYERED = {"runtime.models", "runtime.vlm", "runtime.cascade"}  # runtime's subpackages; its own modules: "runtime"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, list[tuple[str, bool]]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # "a.b.c" may name a module or an attribute of module "a.b": keep the longest that is a module.
        targets = []
        package = ".".join(path.relative_to(REPO).parent.parts)
        for target, at_top, type_only in import_statements(path.read_text(), package):
            if target.split(".")[0] not in PACKAGES:
                continue
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                # A type-only import counts as a module-level one: a circle through annotations is still a circle
                # in the design, and it is one edit from a real import.
                targets.append((target, at_top or type_only))
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


# Function-level imports count too: a lazy import is still a dependency of the package.
FORBIDDEN = {"tools": {"server"}, "train": {"tools"}, "imagesets": {"server", "tools", "train", "bench"}}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_from_the_packages_above_it(package):
    offending = [(source, target) for source, targets in graph().items() if group(source) == package
                 for target, _ in targets if group(target) in FORBIDDEN[package]]
    assert offending == []


# --- settings written once -----------------------------------------------------------------------------------------

SOURCE_PACKAGES = ("kernels", "graphs", "runtime", "server", "tools", "train", "bench", "miner", "imagesets")


def source_files():
    return [p for pkg in SOURCE_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


def test_option_names_and_the_max_batch_default_are_written_once():
    """The dtype and int8-backend name lists and the default max_batch live in runtime/options.py only."""
    spelled = ('"float32", "bfloat16", "float16"', '"int8", "int8-fbgemm", "int8-onednn"', '("auto", "int8")')
    found = [f"{path.relative_to(REPO)}: {text}" for path in source_files() if path != REPO / "runtime" / "options.py"
             for text in spelled if text in path.read_text()]
    assert found == []
    batch_default = re.compile(r"max_batch: int = \d|--max-batch\", type=int, default=\d|CPU_BATCH|CUDA_BATCH")
    assert [str(p.relative_to(REPO)) for p in source_files() if batch_default.search(p.read_text())] == []
