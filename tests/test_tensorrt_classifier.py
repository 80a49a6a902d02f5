"""The classifier as a TensorRT engine (issue 27 item 3). Without a GPU: the engine cache's key and its file logic
(the build and deserialize steps passed in, as TensorRTClassifier.load passes TensorRT's), the errors for a machine
without CUDA or tensorrt, the bundle keys and flags. With CUDA and tensorrt: the engine of a tiny exported
classifier answers as the torch backend does, within fp16's tolerance, and a second start reads it from the cache."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from fixtures.bundles import write_bundle
from fixtures.images import tinted_images
from runtime.cascade.bundle import load_bundle, with_backend
from runtime.cascade.engine import Engine
from runtime.cascade.settings import EngineSettings
from runtime.errors import ModelLoadError
from runtime.models import tensorrt_classifier as trt_classifier
from runtime.models.preprocessor import read_preprocess
from runtime.models.tensorrt_classifier import EngineCache, EngineKey, TensorRTClassifier
from runtime.options import BACKENDS
from tools.selftest_checkpoints import write_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = EngineKey("ab" * 32, "NVIDIA H100 80GB HBM3", "sm_90", "10.13.3.9", ("FP16",), 8)
MAX_BATCH = 4
FP16_TOLERANCE = 2e-2  # P(roadwork) of an fp16 engine against fp32 torch
ON_GPU = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """cls: a tiny DINOv3 classifier (32x32 pixels); onnx/: its tools.export output (export.json beside it), or a
    placeholder classifier.onnx and no export.json where onnx is not installed (enough for parsing)."""
    root = tmp_path_factory.mktemp("models")
    write_classifier(root / "cls", "tiny")
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        from tools import export as export_tool
        export_tool.export(root / "cls", root / "onnx")
    else:
        (root / "onnx").mkdir()
        (root / "onnx" / "classifier.onnx").write_bytes(b"not exported")
    return root


def classifier_toml(models: Path, keys: str) -> str:
    return f'[[stage]]\nkind = "classifier"\nmodel = "{models / "cls"}"\n{keys}\n'


def trt_keys(models: Path) -> str:
    return f'backend = "tensorrt"\nonnx = "{models / "onnx" / "classifier.onnx"}"\n'


# ---------------------------------------------------------------------------------------------------------------
# The cache key and the cache file
# ---------------------------------------------------------------------------------------------------------------


def test_the_key_changes_with_each_input_and_is_stable_otherwise():
    assert KEY.digest() == dataclasses.replace(KEY).digest() == EngineKey(*dataclasses.astuple(KEY)).digest()
    changed = {"onnx_sha256": "cd" * 32, "gpu": "NVIDIA A100-SXM4-80GB", "capability": "sm_80",
               "tensorrt": "10.14.1.48", "flags": (), "max_batch": 32}
    assert set(changed) == {f.name for f in dataclasses.fields(EngineKey)}
    digests = {dataclasses.replace(KEY, **{name: value}).digest() for name, value in changed.items()}
    assert len(digests) == len(changed) and KEY.digest() not in digests


def test_builder_flags_follow_the_run_dtype():
    assert trt_classifier.builder_flags(torch.float16) == trt_classifier.builder_flags(torch.bfloat16) == ("FP16",)
    assert trt_classifier.builder_flags(torch.float32) == ()


def test_default_cache_dir_is_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert trt_classifier.default_cache_dir() == tmp_path / "roadwork-cascade" / "tensorrt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert trt_classifier.default_cache_dir() == Path.home() / ".cache" / "roadwork-cascade" / "tensorrt"


def test_the_cache_writes_one_file_per_key_and_reads_it_back(tmp_path):
    cache = EngineCache(tmp_path / "tensorrt")
    assert cache.read(KEY) is None
    cache.write(KEY, b"\0engine\nbytes")
    other = dataclasses.replace(KEY, max_batch=16)
    cache.write(other, b"another engine")
    assert cache.read(KEY) == b"\0engine\nbytes" and cache.read(other) == b"another engine"
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([f"{KEY.digest()}.engine",
                                                                   f"{other.digest()}.engine"])


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-3], "is torn"),
    (lambda data: b"garbage", "is not an engine file this version wrote"),
    (lambda data: trt_classifier.MAGIC + b"{not json\n" + b"engine", "has a header that does not read"),
])
def test_a_damaged_file_is_rebuilt_with_a_warning(tmp_path, caplog, damage, message):
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"engine bytes")
    path = cache.path(KEY)
    path.write_bytes(damage(path.read_bytes()))
    built = []
    with caplog.at_level(logging.WARNING, logger=trt_classifier.__name__):
        engine, cached = cache.load(KEY, lambda: built.append(1) or b"rebuilt", lambda blob: ("engine", blob))
    assert (engine, cached, built) == (("engine", b"rebuilt"), False, [1])
    assert message in caplog.text and "building the engine again" in caplog.text
    assert cache.read(KEY) == b"rebuilt"


def test_a_file_holding_another_keys_engine_is_rebuilt(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, tensorrt="10.0.1")
    cache.write(other, b"old engine")
    cache.path(other).rename(cache.path(KEY))
    with caplog.at_level(logging.WARNING, logger=trt_classifier.__name__):
        assert cache.read(KEY) is None
    assert "holds the engine of another key" in caplog.text and "10.0.1" in caplog.text


def test_load_builds_once_then_reads_the_cache(tmp_path):
    cache = EngineCache(tmp_path)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"serialized"

    assert cache.load(KEY, build, lambda blob: ("engine", blob)) == (("engine", b"serialized"), False)
    assert cache.load(KEY, build, lambda blob: ("engine", blob)) == (("engine", b"serialized"), True)
    assert builds == [1]


def test_an_engine_that_does_not_deserialize_is_rebuilt(tmp_path, caplog):
    """A file intact on disk that TensorRT refuses (a driver update, say) is built again."""
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"stale")
    with caplog.at_level(logging.WARNING, logger=trt_classifier.__name__):
        engine, cached = cache.load(KEY, lambda: b"fresh", lambda blob: None if blob == b"stale" else blob)
    assert (engine, cached) == (b"fresh", False) and "does not deserialize on this GPU" in caplog.text
    with pytest.raises(ModelLoadError, match="cannot deserialize the engine it just built"):
        EngineCache(tmp_path / "new").load(KEY, lambda: b"bad", lambda blob: None)


def test_an_unwritable_cache_still_serves_the_engine(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = EngineCache(blocker / "tensorrt")  # a directory under a file: neither lock nor write succeeds
    with caplog.at_level(logging.WARNING):
        assert cache.load(KEY, lambda: b"built", lambda blob: blob) == (b"built", False)
    assert "cannot be written" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Without CUDA or tensorrt
# ---------------------------------------------------------------------------------------------------------------


def test_without_cuda_or_tensorrt_one_line_names_both_and_the_extra(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    bundle = write_bundle(tmp_path, classifier_toml(models, trt_keys(models)))
    with pytest.raises(ModelLoadError) as caught:
        Engine.load(bundle, "cpu", "float32", MAX_BATCH)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("backend 'tensorrt' needs a CUDA device (the classifier's "
                                                      "device is cpu) and the tensorrt package")
    assert "pip install 'roadwork-cascade[tensorrt]'" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_named(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ModelLoadError, match=r"needs CUDA \(torch .* sees no CUDA device\) and the tensorrt package"):
        TensorRTClassifier.load(models / "onnx" / "classifier.onnx", models / "cls", read_preprocess(models / "cls"),
                                torch.device("cuda"), MAX_BATCH)


def test_tensorrt_11_is_refused_by_name(monkeypatch):
    """11.x removed BuilderFlag.FP16; the extra pins 10.x, and an 11.x found installed is named."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    sys.modules["tensorrt"].__version__ = "11.4.0.106"
    assert trt_classifier.missing_for_tensorrt(torch.device("cpu"))[1].startswith(
        "TensorRT 10.x (this is 11.4.0.106")


# ---------------------------------------------------------------------------------------------------------------
# cascade.toml and --backend
# ---------------------------------------------------------------------------------------------------------------


def test_bundle_backend_tensorrt_needs_the_onnx_key(models, tmp_path):
    assert "tensorrt" in BACKENDS
    spec = load_bundle(write_bundle(tmp_path / "ok", classifier_toml(models, trt_keys(models)))).stages[0]
    assert spec.backend == "tensorrt" and spec.onnx == models / "onnx" / "classifier.onnx"
    for keys, message in [('backend = "tensorrt"\n', "backend 'tensorrt' needs key 'onnx'"),
                          ('quantize = "int8"\n' + trt_keys(models),
                           "key 'quantize' ('int8') is for backend 'torch': backend 'tensorrt' runs the exported "
                           "graph as a TensorRT engine")]:
        bundle = write_bundle(tmp_path / str(len(message)), classifier_toml(models, keys))
        with pytest.raises(ModelLoadError) as caught:
            load_bundle(bundle)
        assert f"{bundle / 'cascade.toml'} stage 1 ('classifier'): {message}" in str(caught.value)


def test_backend_flag_tensorrt(models, tmp_path):
    on_torch = load_bundle(write_bundle(tmp_path / "torch", classifier_toml(models, "")))
    with pytest.raises(ModelLoadError, match=r"stage 1 \('classifier'\): --backend tensorrt needs key 'onnx'"):
        with_backend(on_torch, "tensorrt")
    with pytest.raises(ModelLoadError, match="--backend tensorrt needs a bundle"):
        with_backend(load_bundle(models / "cls"), "tensorrt")
    keys = f'onnx = "{models / "onnx" / "classifier.onnx"}"\n'
    named = load_bundle(write_bundle(tmp_path / "named", classifier_toml(models, keys)))
    assert with_backend(named, "tensorrt").stages[0].backend == "tensorrt"
    assert EngineSettings(backend="tensorrt").backend == "tensorrt"


# ---------------------------------------------------------------------------------------------------------------
# On a GPU with tensorrt
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and the tensorrt package")
def test_the_engine_answers_as_torch_and_is_cached(models, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = tinted_images(MAX_BATCH, seed=5)
    torch_engine = Engine.load(write_bundle(tmp_path / "torch", classifier_toml(models, "")), "cuda", "float32",
                               max_batch=MAX_BATCH, quantize="none")
    bundle = write_bundle(tmp_path / "trt", classifier_toml(models, trt_keys(models)))
    trt_engine = Engine.load(bundle, "cuda", "float16", max_batch=MAX_BATCH, quantize="none")
    stage = trt_engine.describe()["stages"][0]
    assert stage["backend"] == "tensorrt" and stage["precision"] == "fp16" and stage["engine_cached"] is False
    for batch in (1, 3, MAX_BATCH):
        got = [r.prediction for r in trt_engine.predict(images[:batch])]
        want = [r.prediction for r in torch_engine.predict(images[:batch])]
        assert got == pytest.approx(want, abs=FP16_TOLERANCE, rel=0)
    again = Engine.load(bundle, "cuda", "float16", max_batch=MAX_BATCH, quantize="none")
    assert again.describe()["stages"][0]["engine_cached"] is True
    assert Path(again.describe()["stages"][0]["engine"]).parent == tmp_path / "cache" / "roadwork-cascade" / "tensorrt"
