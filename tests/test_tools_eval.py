"""tools.eval (scores, levels, stages, cost) and tools.tune (threshold search, cascade.toml writing)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from runtime.cascade.bundle import read_bundle
from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine
from imagesets.confusion import Confusion
from imagesets.labeled import list_labeled
from tools.eval import main as eval_main, run_engine
from tools.tune import Observed, apply, bundle_toml, main as tune_main, search, vote_decisions
from fixtures.checkpoints import make_dinov3, write_preprocessor
from fixtures.deimv2_checkpoints import make_deimv2
from fixtures.vlm_checkpoints import make_qwen3_vl
from train.generate import write_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "set"
    write_dataset(out, seed=3, n=16)
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_dinov3(root / "classifier", seed=1, input_size=(64, 64))
    make_deimv2(root / "detector", seed=2)
    write_preprocessor(root / "detector", "dinov3", (64, 64))
    (root / "cascade.toml").write_text("""
[[stage]]
kind = "classifier"
model = "classifier"
exit_below = 0.3
exit_above = 0.7

[[stage]]
kind = "detectors"
time_budget_ms = 60000.0

[[stage.detector]]
model = "detector"
roadwork_classes = [0, 1]
box_threshold = 0.5
""")
    return root


@pytest.fixture(scope="module")
def vlm_bundle(bundle, tmp_path_factory):
    """The same classifier and detector, then a tiny random Qwen3-VL for what the detectors leave undecided."""
    root = tmp_path_factory.mktemp("vlm_bundle")
    shutil.copytree(bundle, root, dirs_exist_ok=True)
    make_qwen3_vl(root / "vlm", seed=2)
    text = (root / "cascade.toml").read_text().replace(
        "time_budget_ms = 60000.0", "time_budget_ms = 60000.0\nexit_below = 0.4\nexit_above = 0.6")
    (root / "cascade.toml").write_text(text + '\n[[stage]]\nkind = "vlm"\nmodel = "vlm"\nkv_cache_gb = 0.02\n'
                                               'max_explain_tokens = 8\n')
    return root


def test_mcc_and_rounding():
    c = Confusion(tp=3, fp=1, tn=4, fn=2)
    assert c.mcc == pytest.approx((3 * 4 - 1 * 2) / math.sqrt(4 * 5 * 5 * 6))
    assert c.accuracy == pytest.approx(0.7)
    # the validator's rounding: exactly 0.5 is "none"
    assert Confusion.of([1, 0, 1, 0], [0.5, 0.5, 0.51, 0.49]) == Confusion(tp=1, fp=0, tn=2, fn=1)
    assert Confusion.of([1, 1], [0.9, 0.8]).mcc == 0.0   # one class only: 0, not NaN


def test_list_labeled_and_spread(data):
    found = list_labeled(data)
    assert len(found) == 16 and found.labels.sum() == 8 and (found.levels >= 0).all()
    few = found.spread(5)
    assert len(few) == 5 and 0 < few.labels.sum() < 5


def test_eval_report_matches_engine(data, bundle, tmp_path, capsys):
    out = tmp_path / "report.json"
    eval_main([str(bundle), str(data), "--dtype", "float32", "--quantize", "none", "--max-batch", "8",
               "--json", str(out)])
    report = json.loads(out.read_text())
    assert "MCC" in capsys.readouterr().out
    engine = Engine.load(bundle, "cpu", "float32", max_batch=8)
    found = list_labeled(data)
    preds = [r.prediction for r in engine.predict([decode_image((data / f).read_bytes()) for f in found.files])]
    expected = Confusion.of(found.labels, preds)
    assert report["n"] == 16 and report["mcc"] == round(expected.mcc, 4)
    assert sum(m["n"] for m in report["levels"].values()) == 16
    stages = report["stages"]
    assert stages["classifier"]["reached"] == 1.0
    assert stages["classifier"]["decided"] + stages.get("detectors", {"decided": 0})["decided"] == pytest.approx(1.0)
    assert all(s["ms_per_image_reached"] > 0 for s in stages.values() if s["reached"] > 0)


def test_vote_decisions_are_the_rules():
    p = np.array([0.2, 0.2, 0.8, 0.8, 0.45, 0.55])
    c = np.array([[0.1], [0.9], [0.1], [0.9], [0.6], [0.4]])
    det = c[:, 0] > 0.5
    assert (vote_decisions(p, c, [1.0], 0.5, 0.0, 2 / 3) == det).all()
    assert (vote_decisions(p, c, [1.0], 0.5, 1.0, 0.5) == (det | (p > 0.5))).all()
    assert (vote_decisions(p, c, [1.0], 0.5, 1.0, 1.0) == (det & (p > 0.5))).all()


def test_search_routes_the_uncertain_band_to_a_good_detector():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.arange(n) % 2
    # classifier: right and sure on 70%, a coin flip near 0.5 on the rest; detector: right where it is unsure
    sure = rng.random(n) < 0.7
    p = np.where(sure, np.where(labels == 1, 0.95, 0.05), 0.5 + rng.uniform(-0.1, 0.1, n))
    c = np.where(labels == 1, 0.8, 0.2)[:, None]
    obs = Observed(labels, p, c, stage1_ms=1.0, stage2_ms=10.0)
    best, alone = search(obs, [1.0], max_routed=0.5)
    assert alone.mcc < 0.6 and best.mcc > 0.95   # exit bands step by quantiles: the edge images may exit
    assert best.routed <= 0.5 and 0.05 < best.exit_below < 0.5 < best.exit_above < 0.95   # sure ones exit
    assert best.ms_per_image == pytest.approx(1.0 + 10.0 * best.routed)
    capped, _ = search(obs, [1.0], max_routed=0.0)
    assert capped.routed == 0.0 and capped.mcc == pytest.approx(alone.mcc)
    cheap, _ = search(obs, [1.0], budget_ms=2.0)
    assert cheap.ms_per_image <= 2.0 and cheap.mcc < best.mcc


def test_search_sends_what_the_detectors_leave_unsure_to_a_good_vlm():
    rng = np.random.default_rng(1)
    n = 400
    labels = np.arange(n) % 2
    p = np.full(n, 0.5)   # the classifier decides nothing: every image goes to the detectors
    # the detector: sure and right on 60%, unsure (0.4-0.6) and a coin flip on the rest; the VLM is always right
    sure = rng.random(n) < 0.6
    c = np.where(sure, np.where(labels == 1, 0.9, 0.1), rng.uniform(0.4, 0.6, n))[:, None]
    v = np.where(labels == 1, 0.8, 0.2)
    obs = Observed(labels, p, c, stage1_ms=1.0, stage2_ms=10.0, v=v, stage3_ms=100.0)
    two_stage, _ = search(dataclasses.replace(obs, v=None), [1.0])
    best, _ = search(obs, [1.0], max_vlm=0.5)
    assert two_stage.mcc < 0.8 and best.mcc > 0.95 and two_stage.vlm_exit_below is None
    assert best.to_vlm <= 0.5 and best.vlm_exit_below <= 0.4 and best.vlm_exit_above >= 0.6
    assert best.ms_per_image == pytest.approx(1.0 + 10.0 * best.routed + 100.0 * best.to_vlm)
    none, _ = search(obs, [1.0], max_vlm=0.0)
    assert none.to_vlm == 0.0 and none.mcc == pytest.approx(two_stage.mcc)
    cheap, _ = search(obs, [1.0], max_vlm=0.5, budget_ms=11.0 + 100.0 * 0.1)
    assert cheap.to_vlm <= 0.1 + 1e-9 and none.mcc <= cheap.mcc < best.mcc


@pytest.mark.parametrize("which", ["bundle", "vlm_bundle"])
def test_bundle_toml_round_trip(which, request, tmp_path):
    root = request.getfixturevalue(which)
    parsed = read_bundle(root)
    observed = Observed(np.array([0, 1]), np.array([0.2, 0.7]), np.array([[0.1], [0.9]]), 1.0, 1.0,
                        v=np.array([0.3, 0.6]) if which == "vlm_bundle" else None, stage3_ms=5.0)
    tuned = apply(parsed, search(observed, [1.0])[0])
    (root / "cascade.toml").rename(tmp_path / "orig.toml")
    try:
        (root / "cascade.toml").write_text(bundle_toml(tuned, "a header\nsecond line"))
        again = read_bundle(root)
    finally:
        (tmp_path / "orig.toml").replace(root / "cascade.toml")
    assert again.stages == tuned.stages and len(again.stages) == (3 if which == "vlm_bundle" else 2)


def test_tune_cli_writes_a_loadable_bundle(data, bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    tune_main([str(copy), str(data), "--dtype", "float32", "--quantize", "none", "--max-batch", "8",
               "--max-routed", "0.5", "--write"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["chosen"]["routed"] <= 0.5
    assert result["chosen"]["mcc"] >= result["classifier_alone"]["mcc"]
    text = (copy / "cascade.toml").read_text()
    assert text.startswith("# Thresholds chosen by")
    engine = Engine.load(copy, "cpu", "float32", max_batch=8)
    scored = run_engine(engine, list_labeled(data), progress=False)
    assert Confusion.of(scored.labels, scored.predictions).mcc == pytest.approx(result["chosen"]["mcc"], abs=1e-4)


def test_tune_cli_with_a_vlm_stage(data, vlm_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(vlm_bundle, copy)
    tune_main([str(copy), str(data), "--dtype", "float32", "--quantize", "none", "--max-batch", "8", "--max-routed",
               "1.0", "--max-vlm", "0.5", "--write"])
    result = json.loads(capsys.readouterr().out)
    chosen = result["chosen"]
    assert chosen["to_vlm"] <= 0.5 and chosen["vlm_exit_below"] <= chosen["vlm_exit_above"]
    assert result["stage3_ms_per_routed"] > 0 and -1 <= result["vlm_alone"]["mcc"] <= 1
    assert "--max-vlm 0.5" in (copy / "cascade.toml").read_text()
    engine = Engine.load(copy, "cpu", "float32", max_batch=8)
    try:
        scored = run_engine(engine, list_labeled(data), progress=False)
    finally:
        engine.close()
    assert Confusion.of(scored.labels, scored.predictions).mcc == pytest.approx(chosen["mcc"], abs=1e-4)
    assert np.mean([s == "vlm" for s in scored.stages]) == pytest.approx(chosen["to_vlm"])
