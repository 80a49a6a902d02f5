"""`python -m bench.gpu_selftest --cpu`: every step's logic on the CPU with small shapes (the interpreter for the
Triton kernels), the report and summary written, CUDA-only steps skipped; and one step's failure does not hide the
rest."""
from __future__ import annotations

import json

import pytest

from bench import gpu_selftest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS = [name for name, _ in gpu_selftest.STEPS]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    status = gpu_selftest.main(["--cpu", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    return status, report, (out / "summary.txt").read_text()


def test_every_step_reported(report):
    status, report, summary = report
    assert report["mode"] == "cpu" and [s["name"] for s in report["steps"]] == STEPS
    assert summary.startswith("gpu_selftest (cpu): ") and all(f" {name} " in summary for name in STEPS)
    assert status == (1 if any(s["status"] == "fail" for s in report["steps"]) else 0)


@pytest.mark.parametrize("name", STEPS)
def test_step_passes_or_needs_cuda(report, name):
    step = next(s for s in report[1]["steps"] if s["name"] == name)
    if name == "flashinfer":
        assert step["status"] == "skip" and step["error"] == "needs CUDA"
    else:
        assert step["status"] == "pass", step["error"]


def test_a_failing_step_does_not_stop_the_run(tmp_path, monkeypatch):
    def broken(ctx, details):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_selftest, "STEPS", [("environment", gpu_selftest.step_environment), ("broken", broken),
                                                ("flashinfer", gpu_selftest.step_flashinfer)])
    assert gpu_selftest.main(["--cpu", "--out", str(tmp_path)]) == 1
    steps = json.loads((tmp_path / "report.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("environment", "pass"), ("broken", "fail"),
                                                         ("flashinfer", "skip")]
    assert steps[1]["error"].startswith("RuntimeError: boom")
