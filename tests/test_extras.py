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


def test_the_cpu_path_runs_without_triton():
    """The default bundle loads and answers every sample with triton unimportable (a CPU install has none: triton
    is in the gpu and test extras), and nothing on the way imports a kernels/*_triton.py module."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from pathlib import Path\n"
            "from runtime.cascade.engine import Engine\n"
            "from runtime.image_decode import decode_image\n"
            "import server.app, server.__main__\n"
            "engine = Engine.load(Path('bundles/default'), precision_cache=None)\n"
            "images = [decode_image(p.read_bytes()) for p in sorted(Path('samples').glob('*.jpg'))]\n"
            "results = engine.predict(images)\n"
            "assert len(results) == len(images) and all(0 <= r.prediction <= 1 for r in results), results\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('kernels.') and m.endswith('_triton'))\n"
            "assert not loaded, loaded\n"
            "print('ok', len(results))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
