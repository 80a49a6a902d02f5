"""`python -m tools.selftest --cpu`: every step's logic on the CPU with small shapes (the interpreter for the Triton
kernels, the CPU fallbacks for the GPU libraries), each step in its own subprocess; the report and summary written;
CUDA-only steps skipped with their reason. A step that raises, hangs or aborts its process fails by name and the
steps after it still run."""
from __future__ import annotations

import ast
import json
import threading
import time
from pathlib import Path

import pytest

from tools import selftest

pytestmark = pytest.mark.slow

STEPS = [step.name for step in selftest.STEPS]
# Steps that cannot run on the CPU, and the start of the reason they give.
CPU_SKIPS = {"graph_lifetime": "needs CUDA graphs", "flashinfer": "needs CUDA", "cascade_split": "needs two CUDA",
             "fp8_linear": "FP8 GEMMs need CUDA sm90+", "tensorrt": "needs a CUDA device"}


@pytest.fixture(autouse=True, scope="module")
def one_thread_steps():
    """Tiny models gain nothing from intra-op threads on a shared CPU; the steps' subprocesses inherit this."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    status = selftest.main(["--cpu", "--out", str(out), "--budget-s", "1800"])
    return status, json.loads((out / "report.json").read_text()), (out / "summary.txt").read_text(), out


def run(out: Path, *args: str) -> tuple[int, list[dict]]:
    status = selftest.main(["--cpu", "--out", str(out), *args])
    return status, json.loads((out / "report.json").read_text())["steps"]


def test_every_step_reported(report):
    status, report, summary, out = report
    assert report["mode"] == "cpu" and [s["name"] for s in report["steps"]] == STEPS
    assert summary.startswith("selftest (cpu): ") and all(f" {name} " in summary for name in STEPS)
    assert status == (1 if any(s["status"] == "fail" for s in report["steps"]) else 0)
    assert all((out / "logs" / f"{name}.log").exists() for name in STEPS)


@pytest.mark.parametrize("name", STEPS)
def test_step_passes_or_is_skipped_with_its_reason(report, name):
    step = next(s for s in report[1]["steps"] if s["name"] == name)
    if name in CPU_SKIPS:
        assert step["status"] == "skip" and step["error"].startswith(CPU_SKIPS[name]), step["error"]
    else:
        assert step["status"] == "pass", step["error"]


def test_decode_graphs_compare_every_prompt(report):
    bundled = next(s for s in report[1]["steps"] if s["name"] == "decode_graphs")["details"]["bundled"]
    assert bundled["tokens_compared"] == 8 * 16 and sum(bundled["decode_steps_by_bucket"].values())
    assert bundled["vision_replays"] > 0 and bundled["distinct_tokens"] > 1


def test_a_failing_step_does_not_stop_the_run(tmp_path):
    status, steps = run(tmp_path, "--only", "environment", "fault", "flashinfer", "--fault", "raise")
    assert status == 1
    assert [(s["name"], s["status"]) for s in steps] == [("environment", "pass"), ("fault", "fail"),
                                                         ("flashinfer", "skip")]
    assert steps[1]["error"].startswith("RuntimeError: boom")


def test_a_hanging_step_is_killed_at_its_timeout_and_the_next_runs(tmp_path):
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:  # the report names the hanging step as running while it hangs
        while not done.is_set():
            try:
                steps = json.loads((tmp_path / "report.json").read_text())["steps"]
                seen.extend(f"{s['name']}:{s['status']}" for s in steps)
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        start = time.monotonic()
        status, steps = run(tmp_path, "--only", "environment", "fault", "flashinfer", "--fault", "hang",
                            "--step-timeout-s", "6")
    finally:
        done.set()
        watcher.join()
    assert status == 1 and time.monotonic() - start < 60
    assert [(s["name"], s["status"]) for s in steps] == [("environment", "pass"), ("fault", "fail"),
                                                         ("flashinfer", "skip")]
    assert steps[1]["error"].startswith("timeout after 6 s")
    assert "fault:running" in seen
    assert "selftest (cpu): 1 pass, 1 fail, 1 skip" in (tmp_path / "summary.txt").read_text()


def test_an_aborting_step_fails_by_name_and_the_next_runs(tmp_path):
    status, steps = run(tmp_path, "--only", "fault", "flashinfer", "--fault", "abort")
    assert status == 1
    assert [(s["name"], s["status"]) for s in steps] == [("fault", "fail"), ("flashinfer", "skip")]
    assert steps[0]["error"].startswith("exit signal SIGABRT")


def test_the_budget_bounds_a_hanging_step_and_skips_the_rest(tmp_path):
    status, steps = run(tmp_path, "--only", "fault", "flashinfer", "--fault", "hang", "--budget-s", "5")
    assert status == 1
    assert steps[0]["status"] == "fail" and steps[0]["error"].startswith("timeout after 5 s")
    assert steps[1] == {**steps[1], "status": "skip", "error": "over the 5 s budget"}


def test_unknown_steps_are_refused(capsys):
    with pytest.raises(SystemExit):
        selftest.main(["--cpu", "--out", "unused", "--only", "kernel"])
    assert "no step named kernel" in capsys.readouterr().err


def test_the_old_name_runs_the_same_program():
    from bench import gpu_selftest

    assert gpu_selftest.main is selftest.main


def test_the_self_test_needs_no_test_dependency():
    """What operators run imports nothing from tests/, fixtures/, bench/ or server/, nor transformers."""
    forbidden = ("tests", "fixtures", "bench", "server", "transformers")
    found = []
    for path in sorted(Path(selftest.__file__).parent.glob("selftest*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert found == []
