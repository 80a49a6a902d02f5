"""The classifier on ONNX Runtime (issue 27 item 2): the classifier.onnx tools.export wrote, chosen by cascade.toml's
`backend` or --backend, answers as the torch classifier does; detectors after it load their own backbones; bad keys,
a graph exported for other pixels and a missing onnxruntime are specific errors."""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fixtures.bundles import detector_stage, write_bundle
from fixtures.checkpoints import write_preprocessor
from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2
from fixtures.images import tinted_images
from runtime.cascade.bundle import load_bundle
from runtime.cascade.bundle_digest import bundle_digest
from runtime.cascade.engine import Engine
from runtime.cascade.settings import EngineSettings
from runtime.errors import ModelLoadError
from runtime.models import onnx_classifier
from runtime.models.onnx_classifier import TENSORRT, OnnxClassifier
from runtime.models.preprocessor import read_preprocess
from tools import export as export_tool
from tools.tune import bundle_toml

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_BATCH = 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """cls: a DINOv3 classifier whose backbone det-a shares on torch; onnx/: its tools.export output."""
    root = tmp_path_factory.mktemp("models")
    make_deimv2(root / "det-a", seed=0)
    write_preprocessor(root / "det-a", "dinov3", (64, 64))
    classifier_sharing_backbone(root / "det-a", root / "cls", seed=3, input_size=64)
    export_tool.export(root / "cls", root / "onnx")
    return root


def classifier_toml(models: Path, keys: str = "", later: bool = False) -> str:
    exits = "exit_below = 0.0\nexit_above = 1.0\n" if later else ""  # every image goes on
    return f'[[stage]]\nkind = "classifier"\nmodel = "{models / "cls"}"\n{exits}{keys}\n'


def onnx_keys(models: Path, backend: str = "onnxruntime") -> str:
    return f'backend = "{backend}"\nonnx = "{models / "onnx" / "classifier.onnx"}"\n'


def predictions(engine: Engine, images) -> list[float]:
    return [r.prediction for r in engine.predict(images)]


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_onnxruntime_answers_as_torch(models, tmp_path, batch):
    images = tinted_images(batch, seed=batch)
    torch_engine = Engine.load(write_bundle(tmp_path / "torch", classifier_toml(models)), "cpu", "float32",
                               max_batch=MAX_BATCH)
    ort_engine = Engine.load(write_bundle(tmp_path / "ort", classifier_toml(models, onnx_keys(models))), "cpu",
                             "float32", max_batch=MAX_BATCH)
    assert predictions(ort_engine, images) == pytest.approx(predictions(torch_engine, images), abs=TOLERANCE, rel=0)
    stage = ort_engine.describe()["stages"][0]
    assert stage["backend"] == "onnxruntime" and stage["providers"] == ["CPUExecutionProvider"]
    assert stage["cuda_graphs"].startswith("no") and torch_engine.describe()["stages"][0]["backend"] == "torch"


def test_backend_flag_overrides_cascade_toml(models, tmp_path):
    on_torch = write_bundle(tmp_path / "torch", classifier_toml(models, onnx_keys(models, "torch")))
    on_ort = write_bundle(tmp_path / "ort", classifier_toml(models, onnx_keys(models)))
    backend = lambda engine: engine.describe()["stages"][0]["backend"]  # noqa: E731
    assert backend(Engine.load(on_torch, "cpu", "float32", MAX_BATCH)) == "torch"
    assert backend(Engine.load(on_torch, "cpu", "float32", MAX_BATCH, backend="onnxruntime")) == "onnxruntime"
    assert backend(Engine.load(on_ort, "cpu", "float32", MAX_BATCH, backend="auto")) == "onnxruntime"
    assert backend(Engine.load(on_ort, "cpu", "float32", MAX_BATCH, backend="torch")) == "torch"
    settings = EngineSettings(on_torch, "cpu", "float32", "none", MAX_BATCH, "off", "onnxruntime")
    assert backend(settings.load()) == "onnxruntime"
    with pytest.raises(ValueError, match="--backend must be one of auto, torch, onnxruntime, tensorrt, got 'openvino'"):
        EngineSettings(backend="openvino")


def test_the_bundle_digest_covers_the_onnx_graph_and_tune_keeps_its_keys(models, tmp_path):
    """Re-exporting the graph changes the answers the shared cache may hold, so it changes the content digest;
    tools.tune --write keeps the backend and onnx keys."""
    graph = tmp_path / "graph"
    shutil.copytree(models / "onnx", graph)
    keys = f'backend = "onnxruntime"\nonnx = "{graph / "classifier.onnx"}"\n'
    bundle = load_bundle(write_bundle(tmp_path / "ort", classifier_toml(models, keys, later=True)
                                      + detector_stage(models, 0.3, None)))
    before = bundle_digest(bundle)
    with (graph / "classifier.onnx").open("ab") as f:
        f.write(b"\0")
    assert bundle_digest(bundle) != before
    written = tomllib.loads(bundle_toml(bundle))["stage"][0]
    assert written["backend"] == "onnxruntime" and Path(written["onnx"]) == graph / "classifier.onnx"


def test_a_bundle_on_onnxruntime_exports_again_from_torch(models, tmp_path):
    bundle = write_bundle(tmp_path / "ort", classifier_toml(models, onnx_keys(models)))
    manifest = export_tool.export(bundle, tmp_path / "again")
    assert [f["file"] for f in manifest["exported"]] == ["classifier.onnx"]


def test_detectors_after_an_onnxruntime_classifier_load_their_own_backbone(models, tmp_path, caplog):
    images = tinted_images(6, seed=7)
    shared = Engine.load(write_bundle(tmp_path / "torch", classifier_toml(models, later=True)
                                      + detector_stage(models, 0.3, None)), "cpu", "float32", max_batch=MAX_BATCH)
    assert shared.describe()["stages"][1]["detectors"][0]["shared_backbone"] is True
    with caplog.at_level(logging.INFO, logger="runtime.cascade.build"):
        engine = Engine.load(write_bundle(tmp_path / "ort", classifier_toml(models, onnx_keys(models), later=True)
                                          + detector_stage(models, 0.3, None)), "cpu", "float32",
                             max_batch=MAX_BATCH)
    assert "runs its own model (the classifier runs on onnxruntime)" in caplog.text
    assert engine.describe()["stages"][1]["detectors"][0]["shared_backbone"] is False
    assert engine.cascade.later[0].detectors[0].model.model.conv_encoder.backbone is not None
    got, want = engine.predict(images), shared.predict(images)
    assert [r.stage for r in got] == [r.stage for r in want] == ["detectors"] * 6
    for a, b in zip(got, want):
        assert a.scores == pytest.approx(b.scores, abs=TOLERANCE, rel=0)


def test_cuda_providers_and_the_fallback_to_the_cpu_provider(models, caplog):
    spec = read_preprocess(models / "cls")
    cuda = torch.device("cuda", 1)
    trt, cuda_ep, cpu = onnx_classifier.providers_for(cuda, [TENSORRT, "CUDAExecutionProvider", "CPUExecutionProvider"],
                                                      spec, 8)
    assert trt == (TENSORRT, {"device_id": 1, "trt_profile_min_shapes": "pixel_values:1x3x64x64",
                              "trt_profile_opt_shapes": "pixel_values:8x3x64x64",
                              "trt_profile_max_shapes": "pixel_values:8x3x64x64"})
    assert cuda_ep == ("CUDAExecutionProvider", {"device_id": 1}) and cpu == "CPUExecutionProvider"
    with caplog.at_level(logging.WARNING, logger="runtime.models.onnx_classifier"):
        model = OnnxClassifier.load(models / "onnx" / "classifier.onnx", models / "cls", spec, cuda, 8)
    assert model.providers == ["CPUExecutionProvider"] and "runs on the CPU execution provider" in caplog.text


@pytest.mark.parametrize("keys, message", [
    ('backend = "openvino"\n', "backend='openvino' is not supported (supported: torch, onnxruntime, tensorrt)"),
    ('backend = "onnxruntime"\n', "backend 'onnxruntime' needs key 'onnx'"),
    ('onnx = "nowhere.onnx"\n', "key 'onnx' must be an .onnx file; 'nowhere.onnx'"),
    ("onnx = 3\n", "key 'onnx' must be str, got 3"),
    ('quantize = "int8"\n{onnx}', "key 'quantize' ('int8') is for backend 'torch'"),
])
def test_bad_keys_name_file_stage_and_key(models, tmp_path, keys, message):
    bundle = write_bundle(tmp_path, classifier_toml(models, keys.format(onnx=onnx_keys(models))))
    with pytest.raises(ModelLoadError) as caught:
        Engine.load(bundle, "cpu", "float32", MAX_BATCH)
    assert f"{bundle / 'cascade.toml'} stage 1 ('classifier'): " in str(caught.value)
    assert message in str(caught.value)


def test_backend_flag_needs_the_onnx_key(models, tmp_path):
    bundle = write_bundle(tmp_path, classifier_toml(models))
    with pytest.raises(ModelLoadError, match=r"stage 1 \('classifier'\): --backend onnxruntime needs key 'onnx'"):
        Engine.load(bundle, "cpu", "float32", MAX_BATCH, backend="onnxruntime")
    with pytest.raises(ModelLoadError, match="--backend onnxruntime needs a bundle"):
        Engine.load(models / "cls", "cpu", "float32", MAX_BATCH, backend="onnxruntime")


def test_a_graph_exported_for_other_pixels_is_refused(models, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(models / "onnx", out)
    manifest = json.loads((out / "export.json").read_text())
    manifest["exported"][0]["preprocess"]["height"] = 96
    (out / "export.json").write_text(json.dumps(manifest))
    keys = f'backend = "onnxruntime"\nonnx = "{out / "classifier.onnx"}"\n'
    bundle = write_bundle(tmp_path / "bundle", classifier_toml(models, keys))
    with pytest.raises(ModelLoadError, match="exported for other pixels .* height: 96 there, 64 here"):
        Engine.load(bundle, "cpu", "float32", MAX_BATCH)
    (out / "export.json").unlink()
    with pytest.raises(ModelLoadError, match="needs the export.json python -m tools.export wrote beside it"):
        Engine.load(bundle, "cpu", "float32", MAX_BATCH)


def test_without_onnxruntime_the_error_names_the_extra(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    bundle = write_bundle(tmp_path, classifier_toml(models, onnx_keys(models)))
    with pytest.raises(ModelLoadError) as caught:
        Engine.load(bundle, "cpu", "float32", MAX_BATCH)
    message = str(caught.value)
    assert "\n" not in message and "backend 'onnxruntime' needs the onnxruntime package" in message
    assert "pip install 'roadwork-cascade[onnx]'" in message
