"""Front ends whose optional dependency is missing say which extra to install, in one line, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_without(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m <args>` with `module` made unimportable (None in sys.modules: import raises ImportError)."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = {args!r}; "
            f"runpy.run_module({args[0]!r}, run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, args, extra", [
    ("bittensor", ["miner", "--help"], "pip install -e '.[miner]'"),
    ("transformers", ["bench.vision", "--batches", "1"], "pip install -e '.[test]'"),
])
def test_a_missing_extra_is_named(module, args, extra):
    done = run_without(module, args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert extra in lines[0] and "Traceback" not in done.stderr
