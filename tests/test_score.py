"""python -m tools.score: inputs of every kind, bad files as rows, resume after an interruption, the three output
formats, and the same answers as the server."""
from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import pytest

from runtime.cascade.engine import Engine
from runtime.image_decode import decode_image
from fixtures.checkpoints import make_vit
from fixtures.images import b64
from fixtures.score_inputs import inputs_of, make_inputs, rows_of
from fixtures.serving import serving
from tools import score as tool
from imagesets.hardcase_capture import CaptureConfig, HardCaseCapture, engine_digest, vlm_stage_name
from imagesets.hardcase_store import read_index

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "default"
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=4)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir, "cpu", "float32", max_batch=4)


def test_scores_every_kind_of_input_and_reports_bad_files(engine, tmp_path):
    images = make_inputs(tmp_path)
    out = tmp_path / "out.jsonl"
    summary = tool.score(engine, inputs_of(tmp_path), out, decode_threads=2, progress=False)
    rows = {row["id"]: row for row in rows_of(out)}
    expected = {k: v for k, v in images.items() if "y6" not in k}  # the glob takes x*.jpg only
    scored = {k: r for k, r in rows.items() if r["error"] is None}
    assert set(scored) == set(expected)
    direct = engine.predict([decode_image(expected[k]) for k in scored])
    for (k, row), want in zip(scored.items(), direct):
        assert row["prediction"] == pytest.approx(want.prediction, abs=TOL) and row["label"] == want.label
    errors = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert set(errors) == {str(tmp_path / "dir" / "a" / "broken.jpg"), str(tmp_path / "missing.jpg")}
    assert errors[str(tmp_path / "missing.jpg")] == "no such file or directory"
    assert errors[str(tmp_path / "dir" / "a" / "broken.jpg")].startswith("undecodable_image")
    assert summary["scored"] == 8 and summary["errors"] == 2 and summary["labels"] and summary["images_per_s"] > 0


def test_file_lists_name_the_images_to_score(engine, tmp_path):
    """A .txt of paths (relative to the list, comments skipped) and a .parquet with a `path` column score what
    they name, in their order, as naming the files does; a listed file that is not there is an error row."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    make_inputs(tmp_path)
    named = [tmp_path / "dir" / "a" / "1.jpg", tmp_path / "loose" / "x4.jpg", tmp_path / "dir" / "b" / "3.png"]
    (tmp_path / "list.txt").write_text("# the validators' picks\ndir/a/1.jpg\n\n" + f"{named[1]}\ndir/b/3.png\n"
                                       "gone.jpg\n")
    pq.write_table(pa.table({"path": ["dir/a/1.jpg", str(named[1]), "dir/b/3.png", "gone.jpg"]}),
                   tmp_path / "list.parquet")
    by_name = rows_of_run(engine, [str(p) for p in named], tmp_path / "named.jsonl")
    for listing in ("list.txt", "list.parquet"):
        rows = rows_of_run(engine, [str(tmp_path / listing)], tmp_path / f"{listing}.jsonl")
        assert [r["id"] for r in rows] == [str(p) for p in named] + [str(tmp_path / "gone.jpg")]
        assert [r["prediction"] for r in rows[:3]] == [r["prediction"] for r in by_name]
        assert rows[3]["error"] is not None and rows[3]["prediction"] is None
    pq.write_table(pa.table({"file": ["dir/a/1.jpg"]}), tmp_path / "columns.parquet")
    [row] = rows_of_run(engine, [str(tmp_path / "columns.parquet")], tmp_path / "columns.jsonl")
    assert "unreadable file list: no 'path' column (columns: file)" in row["error"]


def rows_of_run(engine, inputs: list[str], out) -> list[dict]:
    tool.score(engine, inputs, out, decode_threads=2, progress=False)
    return rows_of(out)


def test_resume_after_an_interruption_scores_nothing_twice(engine, tmp_path, monkeypatch):
    make_inputs(tmp_path)
    out = tmp_path / "out.jsonl"
    predict = engine.predict
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return predict(*args, **kwargs)

    monkeypatch.setattr(engine, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tool.score(engine, inputs_of(tmp_path), out, decode_threads=2, progress=False)
    monkeypatch.setattr(engine, "predict", predict)
    first = rows_of(out)
    assert 0 < len(first) < 10
    with open(out, "a") as f:
        f.write('{"id": "half a line')  # a kill in the middle of a write
    summary = tool.score(engine, inputs_of(tmp_path), out, decode_threads=2, progress=False)
    ids = [row["id"] for row in rows_of(out)]
    assert len(ids) == len(set(ids)) == 10
    assert summary["skipped_already_scored"] + summary["scored"] + summary["errors"] == 10
    assert summary["skipped_already_scored"] == len(first)
    again = tool.score(engine, inputs_of(tmp_path), out, decode_threads=2, progress=False)
    assert again["scored"] == 0 and again["errors"] == 0


def test_csv_and_parquet_hold_the_jsonl_answers(model_dir, engine, tmp_path):
    make_inputs(tmp_path)
    tool.score(engine, inputs_of(tmp_path), tmp_path / "out.jsonl", detail=True, progress=False)
    want = {row["id"]: row for row in rows_of(tmp_path / "out.jsonl")}
    assert tool.main(inputs_of(tmp_path) + ["--out", str(tmp_path / "out.csv"), "--model", str(model_dir),
                                            "--dtype", "float32", "--quantize", "none", "--max-batch", "4",
                                            "--detail", "--no-progress",
                                            "--summary", str(tmp_path / "s.json")]) == 0
    with open(tmp_path / "out.csv", newline="") as f:
        got = {row["id"]: row for row in csv.DictReader(f)}
    assert set(got) == set(want)
    for k, row in want.items():
        if row["error"] is None:
            assert float(got[k]["prediction"]) == pytest.approx(row["prediction"], abs=TOL)
            assert json.loads(got[k]["scores"]) == pytest.approx(row["scores"], abs=TOL)
        else:
            assert got[k]["error"] == row["error"] and got[k]["prediction"] == ""
    assert json.loads((tmp_path / "s.json").read_text())["scored"] == 8

    pq = pytest.importorskip("pyarrow.parquet")
    tool.score(engine, inputs_of(tmp_path)[:1], tmp_path / "out.parquet", progress=False)
    tool.score(engine, inputs_of(tmp_path), tmp_path / "out.parquet", progress=False)  # resumes from the parquet
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(want)
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    for r in table:
        if r["error"] is None:
            assert r["prediction"] == pytest.approx(want[r["id"]]["prediction"], abs=TOL)


@pytest.fixture(scope="module")
def bundle_engine():
    engine = Engine.load(BUNDLE, "cpu", "float32", max_batch=8)
    yield engine
    engine.close()


def test_bundle_scores_match_the_server_and_capture_hard_cases(bundle_engine, tmp_path):
    folder = tmp_path / "samples"
    shutil.copytree(REPO / "samples", folder)
    capture = HardCaseCapture(tmp_path / "hc", CaptureConfig(rates={r: 1.0 for r in ("vlm", "disagree", "band")}),
                              lambda: engine_digest(bundle_engine), vlm_stage_name(bundle_engine))
    capture.start()
    summary = tool.score(bundle_engine, [str(folder)], tmp_path / "out.jsonl", detail=True, capture=capture,
                         progress=False)
    rows = {Path(row["id"]).name: row for row in rows_of(tmp_path / "out.jsonl")}
    assert summary["scored"] == 6 and set(summary["stages"]) == {"classifier", "detectors", "vlm"}

    async def ask_server():
        async with serving(bundle_engine, BUNDLE, cache_entries=0) as s:
            return {name: (await s.post("/v1/predict?detail=1", {"image": b64((folder / name).read_bytes())}))[1]
                    for name in rows}

    answers = asyncio.run(ask_server())
    for name, row in rows.items():
        assert row["prediction"] == pytest.approx(answers[name]["prediction"], abs=TOL), name
        assert row["stage"] == answers[name]["stage"] and row["scores"] == pytest.approx(answers[name]["scores"],
                                                                                         abs=TOL)
    captured = read_index(tmp_path / "hc")
    assert captured and summary["hardcases"]["captured"]
    assert {Path(s.source).name for s in captured} <= set(rows)
    assert any(s.stage == "vlm" and "vlm" in s.rules for s in captured)
