"""Where test and benchmark code may import from, read from the source (ast, nothing imported). Shared helpers live
in fixtures/: no test module imports another, neither bench/ nor fixtures/ imports tests/, and fixtures/ imports
nothing from bench/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_MODULES = {path.stem for path in (REPO / "tests").glob("*.py")}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement names, anywhere in the file (function bodies too), relative ones resolved
    against `package`; `from a import b` names both a and a.b, since b may be a module."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


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
