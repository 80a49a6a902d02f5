"""Precision `auto` (runtime/models/auto_precision.py): the choice from injected measurements, never slower or less
accurate than fp32 allows, reported in describe(), the log and the metrics; explicit settings win with a warning."""
from __future__ import annotations

import logging

import pytest
import torch

from fixtures.checkpoints import make_dinov3, make_vit
from runtime.cascade import precision as precision_module
from runtime.cascade.engine import Engine
from runtime.models import auto_precision
from runtime.models.classifier import load_classifier
from runtime.models.auto_precision import FP32, Calibration, Candidate, pick
from runtime.models.preprocessor import read_preprocess
from runtime.models.int8_dynamic import PackedInt8Linear
from server.config import ServerConfig, parse_config
from server.metrics import ServerMetrics

BF16 = Candidate(torch.bfloat16)
FP16 = Candidate(torch.float16)
FBGEMM = Candidate(torch.float32, "int8-fbgemm")
ONEDNN = Candidate(torch.float32, "int8-onednn")
INTMM = Candidate(torch.float32, "int8")
ALL = [FP32, INTMM, FBGEMM, ONEDNN, BF16, FP16]


def checker(drifts: dict[Candidate, tuple[float, int]], calls: list[Candidate]):
    def check(c: Candidate) -> tuple[float, int]:
        calls.append(c)
        return drifts.get(c, (0.0, 0))
    return check


def test_picks_fp32_when_every_other_candidate_is_slower():
    speeds = {FP32: 1.0, INTMM: 70.0, FBGEMM: 1.01, ONEDNN: 2.0, BF16: None, FP16: 50.0}
    calls = []
    chosen, trials = pick(speeds, checker({}, calls), ALL)
    assert chosen == FP32 and calls == []  # nothing faster than fp32: no accuracy check needed
    verdicts = {t.candidate: t.verdict for t in trials}
    assert verdicts[FP32].startswith("chosen") and "not timed further" in verdicts[BF16]
    assert "not faster than fp32" in verdicts[FBGEMM]  # 1 % faster is within the noise margin


def test_picks_fp32_when_faster_candidates_drift_or_flip():
    speeds = {FP32: 1.0, INTMM: 0.5, FBGEMM: 0.3, ONEDNN: 0.4, BF16: 0.6, FP16: 3.0}
    drifts = {FBGEMM: (0.03, 0), ONEDNN: (0.001, 1), INTMM: (0.05, 2), BF16: (0.021, 0)}
    calls = []
    chosen, trials = pick(speeds, checker(drifts, calls), ALL)
    assert chosen == FP32
    assert calls == [FBGEMM, ONEDNN, INTMM, BF16]  # fastest first; fp16 (slower than fp32) never checked
    assert all("too inaccurate" in t.verdict for t in trials if t.candidate in drifts)


def test_a_drift_under_the_bound_but_over_its_margin_is_refused():
    """The calibration set must show half the promised bound: what passes at 0.015 on 16 images can exceed 0.02
    on the images served."""
    assert auto_precision.CHOOSE_DRIFT == auto_precision.MAX_DRIFT / 2
    speeds = {FP32: 1.0, FBGEMM: 0.3, ONEDNN: 0.4}
    chosen, trials = pick(speeds, checker({FBGEMM: (0.015, 0), ONEDNN: (0.009, 0)}, []), [FP32, FBGEMM, ONEDNN])
    assert chosen == ONEDNN
    assert "over the 0.01 that keeps 0.02 on unseen images" in next(t for t in trials if t.candidate == FBGEMM).verdict


def test_picks_the_fastest_accurate_candidate_and_stops_checking():
    speeds = {FP32: 1.0, INTMM: 0.5, FBGEMM: 0.3, ONEDNN: 0.4, BF16: 0.45, FP16: 3.0}
    calls = []
    chosen, trials = pick(speeds, checker({FBGEMM: (0.1, 3)}, calls), ALL)
    assert chosen == ONEDNN and calls == [FBGEMM, ONEDNN]
    verdicts = {t.candidate: t.verdict for t in trials}
    assert verdicts[ONEDNN] == "chosen" and verdicts[BF16].startswith("not checked")
    trial = next(t for t in trials if t.candidate == ONEDNN)
    assert trial.speedup == pytest.approx(2.5) and trial.max_drift == 0.0


def test_explicit_dtype_limits_the_candidates():
    eligible = auto_precision.candidates_for(torch.bfloat16, None)
    assert FP32 not in eligible and eligible[0] == BF16
    speeds = {FP32: 1.0, **{c: 2.0 for c in eligible}}
    chosen, _ = pick(speeds, checker({}, []), eligible)
    assert chosen == BF16  # nothing allowed beats fp32: the explicit dtype without int8


def test_candidates():
    auto = auto_precision.candidates_for(None, None)
    assert auto[0] == FP32 and BF16 in auto and FP16 in auto and FBGEMM in auto
    assert all(c.dtype == torch.float32 for c in auto if c.quantize != "none")
    assert auto_precision.candidates_for(torch.float32, "int8-onednn") == [ONEDNN]
    assert ONEDNN.name == "fp32+int8-onednn" and BF16.name == "bf16"


@pytest.fixture
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    make_vit(path)
    return path


def inject(monkeypatch, speeds: dict[Candidate, float | None]) -> list:
    """Replace the speed measurement; accuracy is really checked on the model."""
    measured = []

    def measure_speed(candidates, linears, rows, budget_s):
        measured.append((list(candidates), linears, rows))
        return {c: speeds.get(c, 10.0) for c in candidates}

    monkeypatch.setattr(auto_precision, "measure_speed", measure_speed)
    monkeypatch.setattr(precision_module, "CHOICES", {})
    return measured


def test_engine_auto_falls_back_to_fp32_and_reports_it(vit, monkeypatch, caplog):
    measured = inject(monkeypatch, {FP32: 1.0})
    with caplog.at_level(logging.INFO, logger="runtime.models.auto_precision"):
        engine = Engine.load(vit, "cpu", "auto", max_batch=4, quantize="auto")
    assert engine.dtype == torch.float32 and engine.describe()["stages"][0]["quantize"] == "none"
    reported = engine.describe()["precision"]
    assert (reported["chosen"], reported["how"], reported["dtype"], reported["quantize"]) == \
        ("fp32", "auto", "float32", "none")
    assert {t["candidate"] for t in reported["trials"]} == {c.name for c in measured[0][0]}
    assert "precision auto: fp32" in caplog.text
    shapes = [(layer.in_features, layer.out_features, count) for layer, count in measured[0][1]]
    rows = measured[0][2]
    assert (64, 64, 8) in shapes and rows == 4 * 5  # the tiny ViT: 4 tokens + CLS, at max_batch
    metrics = ServerMetrics()
    metrics.report_precision(reported)
    text = metrics.render()[0].decode()
    assert 'roadwork_precision{dtype="float32",how="auto",quantize="none"} 1.0' in text


def test_engine_auto_takes_a_faster_accurate_int8_kernel(vit, monkeypatch):
    inject(monkeypatch, {FP32: 1.0, FBGEMM: 0.4})
    monkeypatch.setattr(auto_precision, "CHOOSE_DRIFT", auto_precision.MAX_DRIFT)  # the tiny ViT's int8 drifts 0.015
    engine = Engine.load(vit, "cpu", "auto", max_batch=4, quantize="auto")
    reported = engine.describe()["precision"]
    assert reported["chosen"] == "fp32+int8-fbgemm" and reported["speedup_vs_fp32"] == pytest.approx(2.5)
    assert reported["max_drift"] <= auto_precision.CHOOSE_DRIFT
    assert engine.describe()["stages"][0]["quantize"] == "int8-fbgemm"
    assert isinstance(engine.classifier.backbone.layer[0].mlp.up_proj, PackedInt8Linear)
    metrics = ServerMetrics()
    metrics.report_precision(reported)
    assert "roadwork_precision_speedup 2.5" in metrics.render()[0].decode()


def test_explicit_setting_wins_with_a_warning(vit, monkeypatch, caplog):
    inject(monkeypatch, {FP32: 1.0, Candidate(torch.float16): 3.0})
    with caplog.at_level(logging.WARNING, logger="runtime.models.auto_precision"):
        engine = Engine.load(vit, "cpu", "float16", max_batch=4, quantize="auto")
    assert engine.dtype == torch.float16  # dtype explicit: int8 candidates at fp16 were slower still (10.0)
    assert "measured slower than fp32" not in caplog.text  # quantize was auto: a choice, not an explicit slow path
    monkeypatch.setattr(precision_module, "CHOICES", {})
    with caplog.at_level(logging.WARNING, logger="runtime.models.auto_precision"):
        engine = Engine.load(vit, "cpu", "float16", max_batch=4, quantize="none")
    assert engine.dtype == torch.float16 and engine.describe()["precision"]["how"] == "explicit"
    assert "fp16 was set explicitly but is measured slower than fp32" in caplog.text


def test_library_defaults_do_not_measure(vit, monkeypatch):
    measured = inject(monkeypatch, {})
    engine = Engine.load(vit, "cpu", None, max_batch=4)
    assert measured == [] and engine.describe()["precision"] is None
    Engine.load(vit, "cpu", "float32", max_batch=4, quantize="none")
    assert measured == []


def test_real_measurement_is_never_slower_than_fp32(vit, monkeypatch):
    monkeypatch.setattr(precision_module, "CHOICES", {})
    engine = Engine.load(vit, "cpu", "auto", max_batch=4, quantize="auto")
    choice = engine.precision.choice
    chosen = choice.trial(choice.candidate)
    assert choice.candidate == FP32 or chosen.speedup >= auto_precision.MIN_SPEEDUP
    assert chosen.candidate == FP32 or chosen.max_drift <= auto_precision.CHOOSE_DRIFT and chosen.flips == 0


def test_server_defaults_are_auto():
    config = parse_config([], environ={})
    assert config.dtype == "auto" and config.quantize == "auto" and config == ServerConfig()
    assert parse_config(["--quantize", "int8-fbgemm", "--dtype", "float32"], environ={}).quantize == "int8-fbgemm"


@pytest.mark.parametrize("maker", [make_vit, make_dinov3])
def test_candidates_built_in_memory_equal_loading_them(maker, tmp_path):
    """auto reads the checkpoint once: a candidate cast and quantized from the fp32 model gives the same outputs
    as loading it in that precision, and building it leaves the fp32 model as it was."""
    maker(tmp_path)
    load = auto_precision.load_in(tmp_path, torch.device("cpu"))
    fp32 = load(FP32)
    before = {name: t.clone() for name, t in fp32.state_dict().items()}
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for candidate in (BF16, FBGEMM, INTMM, Candidate(torch.bfloat16, "int8")):
        loaded = load_classifier(tmp_path, candidate.dtype)
        if candidate.quantize != "none":
            auto_precision.quantize_int8(loaded, backend=candidate.quantize)
        with torch.inference_mode():
            expected, _ = loaded(pixels.to(candidate.dtype))
            got, _ = load(candidate)(pixels.to(candidate.dtype))
        assert torch.equal(got, expected), candidate.name
    assert all(torch.equal(before[name], t) for name, t in fp32.state_dict().items())
    # The copies share what they do not change (no second copy of the weights): in the fp32 int8 model, all but
    # the quantized Linear layers.
    shared = {id(t) for t in fp32.parameters()} & {id(t) for t in load(FBGEMM).parameters()}
    quantized = {id(t) for name, m in fp32.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.startswith("classifier") for t in m.parameters()}
    assert shared == {id(t) for t in fp32.parameters()} - quantized and quantized


def test_calibration_stops_at_the_first_chunk_that_fails(vit, monkeypatch):
    """Drift is a maximum: a candidate over MAX_DRIFT on the first chunk is not run on the rest, and fp32's
    reference is computed only as far as some candidate got."""
    load = auto_precision.load_in(vit, torch.device("cpu"))
    reference_model = load(FP32)
    calls = []
    real = auto_precision.probabilities

    def probabilities(model, preprocess, images, dtype):
        calls.append(("fp32 reference" if model is reference_model else dtype, len(images)))
        p = real(model, preprocess, images, dtype)
        return p + 0.5 if dtype == torch.bfloat16 else p  # bf16 made to drift

    monkeypatch.setattr(auto_precision, "probabilities", probabilities)
    calibration = Calibration(load, read_preprocess(vit), reference_model)
    worst, flips = calibration(BF16)
    chunk = auto_precision.CALIBRATION_CHUNKS[0]
    assert worst > auto_precision.MAX_DRIFT and calibration.images_checked[BF16] == chunk
    assert calls == [("fp32 reference", chunk), (torch.bfloat16, chunk)]
    assert calibration(FBGEMM)[0] <= auto_precision.MAX_DRIFT
    assert calibration.images_checked[FBGEMM] == auto_precision.CALIBRATION_IMAGES
    assert [what for what, _ in calls].count("fp32 reference") == len(calibration.chunks)  # each chunk once


def test_an_early_rejection_is_reported_with_the_images_checked(vit, monkeypatch):
    inject(monkeypatch, {FP32: 1.0, BF16: 0.5})
    real = auto_precision.probabilities
    monkeypatch.setattr(auto_precision, "probabilities", lambda model, preprocess, images, dtype:
                        real(model, preprocess, images, dtype) + (0.5 if dtype == torch.bfloat16 else 0.0))
    engine = Engine.load(vit, "cpu", "auto", max_batch=4, quantize="auto")
    trials = {t["candidate"]: t for t in engine.describe()["precision"]["trials"]}
    assert engine.dtype == torch.float32
    assert trials["bf16"]["verdict"].endswith(
        f"on {auto_precision.CALIBRATION_CHUNKS[0]} of {auto_precision.CALIBRATION_IMAGES} calibration images")
