"""The cascade end to end on tiny random-weight checkpoints: early exits, backbone sharing, detectors + vote, boxes,
breakers, against a plain step-by-step computation with separately loaded models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.preprocess import preprocess_reference
from runtime.models.classifier import load_classifier
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.detect_postprocess import center_to_corners
from runtime.models.preprocessor import read_preprocess
from runtime.cascade.engine import Engine
from runtime.errors import ModelLoadError
from runtime.models.int8_dynamic import Int8Linear
from fixtures.bundles import classifier_stage, detector_stage, thresholds_splitting, write_bundle
from fixtures.checkpoints import write_preprocessor
from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2
from fixtures.images import tinted_images
from fixtures.vote_formula import vote_formula
from fixtures.triton_mode import COMPILED_ON_CUDA

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_deimv2(root / "det-a", seed=0)
    write_preprocessor(root / "det-a", "dinov3", (64, 64))  # the classifier's preprocessing: shares
    classifier_sharing_backbone(root / "det-a", root / "cls", seed=3, input_size=64)
    make_deimv2(root / "det-b", seed=5)
    write_preprocessor(root / "det-b", "dinov3", (96, 64))  # its own weights and input size: does not share
    return root


def preprocessed(image: np.ndarray, model_dir: Path) -> torch.Tensor:
    spec = read_preprocess(model_dir)
    x = torch.empty(1, 3, spec.height, spec.width)
    preprocess_reference(torch.from_numpy(image), spec, x[0])
    return x


def classifier_probs(models: Path, imgs) -> list[float]:
    model = load_classifier(models / "cls", torch.float32)
    with torch.no_grad():
        return [model(preprocessed(im, models / "cls"))[0].item() for im in imgs]


def detector_outputs(model_dir: Path, imgs) -> list:
    model = Deimv2Detector.from_pretrained(model_dir)
    with torch.no_grad():
        return [model(preprocessed(im, model_dir)) for im in imgs]


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def roadwork_conf(out, class_ids=(1, 3)) -> float:
    return torch.sigmoid(out.logits[0][:, list(class_ids)].max()).item()


@pytest.fixture(scope="module")
def reference(models):
    """Everything step by step, one image at a time, each model loaded on its own (no sharing, no batching)."""
    imgs = tinted_images()
    probs = classifier_probs(models, imgs)
    outs = {"a": detector_outputs(models / "det-a", imgs), "b": detector_outputs(models / "det-b", imgs)}
    confs = {k: [roadwork_conf(o) for o in v] for k, v in outs.items()}
    low, high = thresholds_splitting(probs, 3, 3)
    # Box thresholds at each detector's median confidence, so its votes split.
    box = {k: float(np.median(v)) for k, v in confs.items()}
    return dict(images=imgs, probs=probs, outs=outs, confs=confs, low=low, high=high, box=box)


def expected_results(ref, detectors: list[tuple[str, float]], cls_weight: float = 0.5):
    rows = []
    for i, p in enumerate(ref["probs"]):
        if p < ref["low"] or p > ref["high"]:
            rows.append(("classifier", p, {"classifier": p}, {}))
            continue
        logits = [[math.log(ref["confs"][name][i] / (1 - ref["confs"][name][i]))] for name, _ in detectors]
        confs, _, final = vote_formula(logits, [ref["box"][name] for name, _ in detectors], [w for _, w in detectors],
                                       p, cls_weight, 2 / 3)
        rows.append(("detectors", final, {"classifier": p, "detectors": final},
                     {name: c for (name, _), c in zip(detectors, confs)}))
    return rows


def check_results(results, expected, tol: float = 1e-5):
    assert len(results) == len(expected)
    for r, (stage, prediction, scores, det_scores) in zip(results, expected):
        assert r.stage == stage and not r.degraded
        assert r.prediction == pytest.approx(prediction, abs=tol)
        assert r.label == ("roadwork" if r.prediction > 0.5 else "none")
        assert r.scores.keys() == scores.keys() and r.detector_scores.keys() == det_scores.keys()
        for k in scores:
            assert r.scores[k] == pytest.approx(scores[k], abs=tol)
        for k in det_scores:
            assert r.detector_scores[k] == pytest.approx(det_scores[k], abs=tol)


@pytest.mark.parametrize("max_batch", [4, 16], ids=["chunks-of-4", "one-chunk"])
def test_two_detectors_match_step_by_step(models, reference, tmp_path, max_batch):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=max_batch)
    engine.warmup()
    detectors = engine.describe()["stages"][1]["detectors"]
    assert [(d["name"], d["shared_backbone"]) for d in detectors] == [("a", True), ("b", False)]
    assert engine.cascade.later[0].detectors[0].model.model.conv_encoder.backbone is engine.classifier.backbone
    results = engine.predict(ref["images"])
    expected = expected_results(ref, [("a", 1.0), ("b", 2.0)])
    stages = [e[0] for e in expected]
    assert stages.count("classifier") == 6 and stages.count("detectors") == 6
    assert {e[1] > 0.5 for e in expected if e[0] == "detectors"} == {True, False}  # the vote goes both ways
    check_results(results, expected)
    assert engine.stage_states() == {"detectors": "closed"}


def int8_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, Int8Linear) for m in module.modules())


@pytest.mark.parametrize("detector_quantize", ["int8", "none"])
def test_int8_per_model(models, reference, tmp_path, detector_quantize):
    """cascade.toml's quantize: the classifier's encoder in int8; a detector sharing its backbone only when both
    say the same; answers stay near the float cascade's."""
    ref = reference
    text = (classifier_stage(models, ref["low"], ref["high"]) + 'quantize = "int8"\n'
            + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    text = text.replace('box_threshold = ' + repr(ref["box"]["a"]),
                        f'box_threshold = {ref["box"]["a"]!r}\nquantize = "{detector_quantize}"')
    engine = Engine.load(write_bundle(tmp_path, text), "cpu", "float32", max_batch=16)
    first, second = engine.describe()["stages"]
    assert first["quantize"] == "int8" and second["detectors"][0]["quantize"] == detector_quantize
    assert second["detectors"][0]["shared_backbone"] is (detector_quantize == "int8")
    backbone_a = engine.cascade.later[0].detectors[0].model.model.conv_encoder.backbone
    assert int8_layers(engine.classifier.backbone) > 0 and not isinstance(engine.classifier.classifier, Int8Linear)
    assert int8_layers(backbone_a) == (int8_layers(engine.classifier.backbone) if detector_quantize == "int8" else 0)
    assert int8_layers(engine.cascade.later[0].detectors[1].model) == 0  # det-b says nothing: float
    float_results = Engine.load(write_bundle(tmp_path / "float", text.replace('quantize = "int8"', "")),
                                "cpu", "float32", max_batch=16).predict(ref["images"])
    for got, want in zip(engine.predict(ref["images"]), float_results):
        # These classifier probabilities are saturated (1e-26 .. 1e-16), so |P - P'| says nothing; compare logits.
        # Measured int8 logit drift on these 12 images: at most 0.35 (of logits -40 .. -60); bound 0.7 (2x).
        assert abs(logit(got.scores["classifier"]) - logit(want.scores["classifier"])) <= 0.7, (got, want)


def test_quantize_override_and_errors(models, reference, tmp_path):
    plain = Engine.load(models / "cls", "cpu", "float32", max_batch=4, quantize="int8")
    assert plain.describe()["stages"][0]["quantize"] == "int8" and int8_layers(plain.classifier) > 0
    text = classifier_stage(models, 0.2, 0.8) + 'quantize = "int8"\n' + detector_stage(models, 0.5, None)
    bundle = write_bundle(tmp_path, text)
    assert int8_layers(Engine.load(bundle, "cpu", "float32", max_batch=4, quantize="none").classifier) == 0
    write_bundle(tmp_path, text.replace('"int8"', '"int4"'))
    with pytest.raises(ModelLoadError, match="stage 1 .*key 'quantize' must be one of auto, none, int8, int8-fbgemm, int8-onednn, got 'int4'"):
        Engine.load(bundle, "cpu", "float32")
    with pytest.raises(ModelLoadError, match="quantize must be one of auto, none, int8, int8-fbgemm, int8-onednn, got 'fp8'"):
        Engine.load(models / "cls", "cpu", "float32", quantize="fp8")


def test_one_detector_k1(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], None))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=8)
    check_results(engine.predict(ref["images"]), expected_results(ref, [("a", 1.0)]))


def test_all_exit_and_none_exit(models, reference, tmp_path):
    ref = reference
    # Thresholds 0 and 1 with strict comparisons: nothing exits, every image is voted on.
    none_exit = write_bundle(tmp_path / "none", classifier_stage(models, 0.0, 1.0)
                             + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    results = Engine.load(none_exit, "cpu", "float32", max_batch=8).predict(ref["images"])
    assert [r.stage for r in results] == ["detectors"] * len(results)
    # Equal thresholds between two probabilities: everything exits, the detectors never run.
    mid = sorted(ref["probs"])[5]
    all_exit = write_bundle(tmp_path / "all", classifier_stage(models, mid, mid)
                            + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    engine = Engine.load(all_exit, "cpu", "float32", max_batch=8)
    engine.cascade.later[0].fault_hook = lambda: pytest.fail("the detectors stage ran with nothing routed")
    ok = [p != mid for p in ref["probs"]]
    results = engine.predict([im for im, keep in zip(ref["images"], ok) if keep])
    assert [r.stage for r in results] == ["classifier"] * sum(ok)


def test_boxes_match_post_processing(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=8)
    results = engine.predict(ref["images"], boxes=True)
    assert all(r.boxes is None for r in engine.predict(ref["images"]))
    found = 0
    for i, r in enumerate(results):
        if r.stage == "classifier":
            assert r.boxes is None
            continue
        h, w = ref["images"][i].shape[:2]
        want = []
        for name in ("a", "b"):
            out = ref["outs"][name][i]
            scores = torch.sigmoid(out.logits[0][:, [1, 3]])
            xyxy = center_to_corners(out.pred_boxes[0]) * torch.tensor([w, h, w, h])
            for q, c in (scores > ref["box"][name]).nonzero().tolist():
                want.append((name, ["LABEL_1", "LABEL_3"][c], scores[q, c].item(), xyxy[q].tolist()))
        want.sort(key=lambda x: -x[2])
        assert len(r.boxes) == len(want)
        found += len(want)
        for box, (name, label, score, xy) in zip(r.boxes, want):
            assert (box.detector, box.label) == (name, label) and box.score == pytest.approx(score, abs=1e-5)
            np.testing.assert_allclose(box.xyxy, xy, atol=1e-3)
    assert found > 0


def test_failing_stage_degrades_opens_and_recovers(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], None,
                                           extra="failure_threshold = 2\ncooldown_s = 5.0"))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=16)
    stage = engine.cascade.later[0]
    now = [0.0]
    stage.breaker.clock = lambda: now[0]
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("injected detector failure")

    stage.fault_hook = fail
    healthy = expected_results(ref, [("a", 1.0)])

    def check_degraded(results):
        for r, (stage_name, _, _, _), p in zip(results, healthy, ref["probs"]):
            assert r.prediction == pytest.approx(p, abs=1e-5) and r.stage == "classifier"
            assert r.scores.keys() == {"classifier"} and r.degraded == (stage_name == "detectors")

    check_degraded(engine.predict(ref["images"]))
    assert engine.stage_states() == {"detectors": "closed"} and len(calls) == 1
    check_degraded(engine.predict(ref["images"]))
    assert engine.stage_states() == {"detectors": "open"} and len(calls) == 2
    check_degraded(engine.predict(ref["images"]))  # open: the stage is not even called
    assert len(calls) == 2
    now[0] = 5.0  # cool-down over: the next call probes, and the probe fails
    check_degraded(engine.predict(ref["images"]))
    assert engine.stage_states() == {"detectors": "open"} and len(calls) == 3
    now[0] = 10.0
    stage.fault_hook = None  # the stage has recovered: the probe succeeds and closes the breaker
    check_results(engine.predict(ref["images"]), healthy)
    assert engine.stage_states() == {"detectors": "closed"}


class FailingModel(torch.nn.Module):
    """Stands in for a member's model and raises: the member failed."""

    def __init__(self, real: torch.nn.Module):
        super().__init__()
        self.real, self.cfg, self.calls = real, real.cfg, 0

    def forward(self, *args):
        self.calls += 1
        raise RuntimeError("injected member failure")


def test_failing_member_leaves_the_vote_and_its_breaker_recovers(models, reference, tmp_path):
    """Member b raises: the other member and the classifier vote alone (the answers equal a vote without b), the
    stage itself stays healthy, and b's own breaker opens, then closes after a successful probe."""
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], ref["box"]["b"],
                                           extra="failure_threshold = 2\ncooldown_s = 5.0"))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=16)
    stage = engine.cascade.later[0]
    member_b = stage.detectors[1]
    now = [0.0]
    member_b.breaker.clock = lambda: now[0]
    real, member_b.model = member_b.model, FailingModel(member_b.model)
    without_b = expected_results(ref, [("a", 1.0)])
    for _ in range(3):
        results = engine.predict(ref["images"])
        check_results(results, without_b)
        assert all("b" not in r.detector_ms for r in results)
    assert member_b.model.calls == 2 and member_b.breaker.state == "open"  # open: not called the third time
    assert engine.stage_states() == {"detectors": "closed"}
    assert stage.describe()["detectors"][1]["breaker"] == "open"
    now[0] = 5.0
    member_b.model = real
    results = engine.predict(ref["images"])
    check_results(results, expected_results(ref, [("a", 1.0), ("b", 2.0)]))
    assert member_b.breaker.state == "closed"
    routed = [r for r in results if r.stage == "detectors"]
    assert routed and all(r.detector_ms.keys() == {"a", "b"} for r in routed)
    timing = engine.member_timings()["detectors"]["b"]
    assert timing.calls == 1 and timing.images == len(routed) and timing.seconds > 0


def test_no_member_answering_fails_the_stage(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], None))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=16)
    member = engine.cascade.later[0].detectors[0]
    member.model = FailingModel(member.model)
    results = engine.predict(ref["images"])
    assert {r.stage for r in results} == {"classifier"} and any(r.degraded for r in results)


def test_zero_time_budget_degrades_and_opens(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], None,
                                           extra="time_budget_ms = 0\nfailure_threshold = 2"))
    engine = Engine.load(bundle, "cpu", "float32", max_batch=16)
    for state in ("closed", "open"):
        results = engine.predict(ref["images"])
        assert {r.stage for r in results} == {"classifier"} and sum(r.degraded for r in results) == 6
        assert engine.stage_states() == {"detectors": state}


def test_one_stage_bundle_equals_plain_classifier_dir(models, reference, tmp_path):
    bundle = write_bundle(tmp_path, f'[[stage]]\nkind = "classifier"\nmodel = "{models / "cls"}"\n')
    plain = Engine.load(models / "cls", "cpu", "float32", max_batch=4).predict(reference["images"])
    staged = Engine.load(bundle, "cpu", "float32", max_batch=4)
    assert staged.stage_states() == {} and staged.describe()["bundle"] is True
    assert staged.predict(reference["images"]) == plain


def test_describe_bundle(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, 0.5, 0.5, extra="time_budget_ms = 250"))
    info = Engine.load(bundle, "cpu", "float32", max_batch=8).describe()
    json.dumps(info)
    first, second = info["stages"]
    assert first["name"] == "classifier" and first["exit_below"] == ref["low"] and first["model_type"] == "dinov3_vit"
    assert second["name"] == "detectors" and second["breaker"] == "closed" and second["time_budget_ms"] == 250
    assert second["detectors"][1] == {"name": "b", "model": str(models / "det-b"), "model_type": "deimv2",
                                      "roadwork_classes": ["LABEL_1", "LABEL_3"], "weight": 2.0,
                                      "box_threshold": 0.5, "shared_backbone": False, "quantize": "none",
                                      "input_size": [96, 64], "format": "safetensors", "device": "cpu",
                                      "cuda_graphs": False, "breaker": "closed"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"LABEL_1", 3', '"LABEL_1", "cone"'), "roadwork class 'cone' is not a label"),
    (lambda t: t.replace('"LABEL_1", 3', '"LABEL_1", 9'), "roadwork class id 9 is outside 0..4"),
    (lambda t: t.replace('"LABEL_1", 3', '"LABEL_1", 1'), "name the same class twice"),
    (lambda t: t.replace('kind = "detectors"', 'kind = "detectors"\ndevice = "gpu7"'),
     "stage 'detectors': device 'gpu7' is not a valid torch device"),
], ids=["unknown-name", "bad-id", "same-class-twice", "bad-device"])
def test_load_errors_name_the_stage(models, tmp_path, edit, message):
    text = edit(classifier_stage(models, 0.2, 0.8) + detector_stage(models, 0.5, None))
    with pytest.raises(ModelLoadError, match=message):
        Engine.load(write_bundle(tmp_path, text), "cpu", "float32")


def test_detector_input_must_fit_deimv2(models, tmp_path):
    det = tmp_path / "det"
    make_deimv2(det, seed=1)
    write_preprocessor(det, "dinov3", (80, 64))
    text = classifier_stage(models, 0.2, 0.8) + detector_stage(models, 0.5, None).replace(
        str(models / "det-a"), str(det))
    with pytest.raises(ModelLoadError, match="input size 80x64 .* must be a multiple of 32"):
        Engine.load(write_bundle(tmp_path / "bundle", text), "cpu", "float32")


def test_bench_tiny_runs():
    from bench.cascade import main

    rows = main(["--tiny", "--images", "8", "--batch", "4", "--min-time", "0.01"])
    assert [r["exit_rate"] for r in rows] == [0.0, 0.5, 0.9]
    for r in rows:
        assert r["measured_exit_rate"] == pytest.approx(r["exit_rate"], abs=0.13)
        assert r["cascade_img_s"] > 0 and r["all_stages_img_s"] > 0 and r["speedup"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not COMPILED_ON_CUDA, reason="captures the route and vote kernels: needs them compiled")
def test_cuda_graphs_match_cpu(models, reference, tmp_path):
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    engine = Engine.load(bundle, "cuda", "float32", max_batch=8)
    conv_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, to compare with the CPU reference
    try:
        engine.warmup()
        assert engine.describe()["cuda_graphs"] and set(engine.cascade.later[0].graphs.graphs) == {1, 2, 4, 8}
        results = engine.predict(ref["images"])
    finally:
        torch.backends.cudnn.allow_tf32 = conv_tf32
    # Exit and vote decisions could flip only within rounding of a threshold; the thresholds sit in gaps.
    check_results(results, expected_results(ref, [("a", 1.0), ("b", 2.0)]), tol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not COMPILED_ON_CUDA, reason="needs CUDA with compiled Triton kernels")
def test_members_on_their_own_streams_match_cpu(models, reference, tmp_path):
    """On CUDA each member's graphs replay on its own stream and the vote waits on their events: the answers equal
    the CPU run's, and every member reports a time measured by its events."""
    ref = reference
    bundle = write_bundle(tmp_path, classifier_stage(models, ref["low"], ref["high"])
                          + detector_stage(models, ref["box"]["a"], ref["box"]["b"]))
    gpu = Engine.load(bundle, "cuda", "float32", max_batch=8)
    gpu.warmup()
    stage = gpu.cascade.later[0]
    assert set(stage.streams) == {"a", "b"} and all(d["cuda_graphs"] for d in stage.describe()["detectors"])
    results = gpu.predict(ref["images"])
    check_results(results, expected_results(ref, [("a", 1.0), ("b", 2.0)]), tol=1e-4)
    assert all(r.detector_ms.keys() == {"a", "b"} and min(r.detector_ms.values()) > 0
               for r in results if r.stage == "detectors")
