"""python -m tools.score --ray on a local Ray (2 CPUs, loopback, started once for the module): the same rows and
summary as the local path, resume after an interruption, a worker killed mid-batch retried; and without ray, --ray
fails in one line naming the extra."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fixtures.checkpoints import make_vit
from fixtures.score_inputs import inputs_of, make_inputs, rows_of
from runtime.cascade.settings import EngineSettings
from tools import bulk
from tools import score as tool

try:
    import ray

    from tools import score_ray
except ImportError:
    ray = score_ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6
TIMED = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> EngineSettings:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=4)
    return EngineSettings(model=path, device="cpu", dtype="float32", quantize="none", max_batch=4,
                          precision_cache="off")


@pytest.fixture(scope="module")
def local(settings, tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """The local path's answers: (inputs root, rows, summary)."""
    root = tmp_path_factory.mktemp("inputs")
    make_inputs(root)
    engine = settings.load()
    try:
        summary = tool.score(engine, inputs_of(root), root / "local.jsonl", detail=True, decode_threads=2,
                             progress=False)
    finally:
        engine.close()
    return root, rows_of(root / "local.jsonl"), summary


def on_ray(settings: EngineSettings, root: Path, out: Path, **kwargs) -> dict:
    return score_ray.score_on_ray(settings, inputs_of(root), out, detail=True, decode_threads=2, progress=False,
                                  **{"actors": 2, **kwargs})


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same ids in the same order, same error rows, the same answers (probabilities to TOL)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), g["id"]
        assert (g["error"], g["label"], g["stage"], g["degraded"]) == (w["error"], w["label"], w["stage"],
                                                                       w["degraded"]), g["id"]
        if w["error"] is None:
            assert g["prediction"] == pytest.approx(w["prediction"], abs=TOL), g["id"]
            assert g["scores"] == pytest.approx(w["scores"], abs=TOL) and g["detector_scores"] == w["detector_scores"]


@needs_ray
def test_ray_answers_as_the_local_path_does(cluster, settings, local, tmp_path):
    root, want, want_summary = local
    summary = on_ray(settings, root, tmp_path / "ray.jsonl")
    assert_same_rows(rows_of(tmp_path / "ray.jsonl"), want)
    assert {k: v for k, v in summary.items() if k not in TIMED} == {k: v for k, v in want_summary.items()
                                                                    if k not in TIMED}
    assert summary["scored"] == 8 and summary["errors"] == 2


@needs_ray
def test_ray_resumes_after_an_interruption(cluster, settings, local, tmp_path, monkeypatch):
    root, want, _ = local
    out = tmp_path / "ray.jsonl"
    write, calls = bulk.JsonlWriter.write, []

    def interrupted(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:  # the missing input's row, one batch, then Ctrl-C
            raise KeyboardInterrupt
        write(self, rows)

    monkeypatch.setattr(bulk.JsonlWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        on_ray(settings, root, out)
    monkeypatch.setattr(bulk.JsonlWriter, "write", write)
    first = rows_of(out)
    assert 1 < len(first) < len(want)
    summary = on_ray(settings, root, out)
    assert summary["skipped_already_scored"] == len(first)
    assert summary["scored"] + summary["errors"] == len(want) - len(first)
    assert_same_rows(rows_of(out), want)  # the first run's rows, then the rest, in input order
    again = on_ray(settings, root, out)
    assert again["scored"] == 0 and again["errors"] == 0


class ExitsOnce:
    """Built in tools.score_ray.Scorer's place: records its process in MODEL/pids, and the first batch any actor
    takes while MODEL/exit-once exists kills that actor's process (the rename lets exactly one claim it)."""

    def __init__(self, settings: EngineSettings, **kwargs) -> None:
        self.scorer = score_ray.Scorer(settings, **kwargs)
        self.flag = settings.model / "exit-once"
        with open(settings.model / "pids", "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, batch):
        try:
            os.rename(self.flag, self.flag.with_name("exit-once.taken"))
        except FileNotFoundError:
            return self.scorer(batch)
        os._exit(1)


@needs_ray
def test_a_killed_worker_has_its_batch_retried(cluster, settings, local, tmp_path):
    root, want, _ = local
    (settings.model / "exit-once").touch()
    (settings.model / "pids").unlink(missing_ok=True)
    try:
        summary = on_ray(settings, root, tmp_path / "ray.jsonl", scorer=ExitsOnce)
    finally:
        (settings.model / "exit-once").unlink(missing_ok=True)
    assert (settings.model / "exit-once.taken").exists()  # an actor died in a batch
    pids = (settings.model / "pids").read_text().split()
    assert len(pids) == len(set(pids)) == 3  # two actors, and the one that replaced the dead one
    assert_same_rows(rows_of(tmp_path / "ray.jsonl"), want)
    assert summary["scored"] == 8 and summary["errors"] == 2


def test_without_ray_the_flag_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails: the extra is not installed
    monkeypatch.delitem(sys.modules, "tools.score_ray", raising=False)
    with pytest.raises(SystemExit) as caught:
        tool.main([str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--ray"])
    message = str(caught.value)
    assert message.startswith("python -m tools.score --ray: ") and "pip install -e '.[ray]'" in message
    assert "\n" not in message
