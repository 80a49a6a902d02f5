"""The runtime object a server calls: decoded images in, P(roadwork) per image out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.preprocess import preprocess_reference
from runtime.models.classifier import load_classifier
from runtime.cascade.engine import Engine, cpu_has_bf16, resolve_dtype
from runtime.errors import ModelLoadError
from runtime.models.preprocessor import read_preprocess
from fixtures.checkpoints import make_dinov3, make_vit


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(224, 224), (37, 91), (300, 180), (1, 1), (64, 64)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def expected(model_dir, images) -> list[float]:
    """Step by step: reference preprocessing of each image alone, then the classifier on it alone."""
    model = load_classifier(model_dir, torch.float32)
    spec = read_preprocess(model_dir)
    out = []
    for image in images:
        x = torch.empty(1, 3, spec.height, spec.width)
        preprocess_reference(torch.from_numpy(image), spec, x[0])
        with torch.no_grad():
            out.append(model(x)[0].item())
    return out


@pytest.mark.parametrize("make", [make_dinov3, make_vit], ids=["dinov3", "vit"])
def test_predict_matches_step_by_step(tmp_path, make):
    make(tmp_path)
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=4)
    engine.warmup()
    images = random_images(11)  # three chunks: 4 + 4 + 3 (bucket 4)
    results = engine.predict(images)
    assert [r.stage for r in results] == ["classifier"] * 11
    np.testing.assert_allclose([r.prediction for r in results], expected(tmp_path, images), atol=1e-5)
    for r in results:
        assert 0.0 <= r.prediction <= 1.0
        assert r.label == ("roadwork" if r.prediction > 0.5 else "none")
        assert r.scores == {"classifier": r.prediction} and not r.degraded
    assert engine.predict([]) == []


def test_bf16_engine_close_to_fp32(tmp_path):
    make_dinov3(tmp_path)
    images = random_images(5)
    fp32 = [r.prediction for r in Engine.load(tmp_path, "cpu", "float32").predict(images)]
    bf16 = [r.prediction for r in Engine.load(tmp_path, "cpu", "bfloat16").predict(images)]
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_describe(tmp_path):
    make_vit(tmp_path)
    info = Engine.load(tmp_path, "cpu", "float32", max_batch=8).describe()
    assert info["stages"][0]["model_type"] == "vit"
    assert info["stages"][0]["roadwork_label"] == "Roadwork"
    assert info["dtype"] == "float32" and info["batch_buckets"] == [1, 2, 4, 8]
    assert info["input_size"] == [32, 32]


def test_default_dtype_follows_cpu():
    assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.load(tmp_path / "missing")
    make_vit(tmp_path)
    with pytest.raises(ModelLoadError, match="dtype 'int3'"):
        Engine.load(tmp_path, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            Engine.load(tmp_path, device="cuda")
    with pytest.raises(ModelLoadError, match="not a valid torch device"):
        Engine.load(tmp_path, device="gpu7")
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="preprocessor_config.json: file not found"):
        Engine.load(tmp_path)


def test_single_classifier_dir_is_a_one_stage_cascade(tmp_path):
    make_vit(tmp_path)
    engine = Engine.load(tmp_path, "cpu", "float32", max_batch=2)
    assert engine.stage_states() == {} and engine.describe()["bundle"] is False
    results = engine.predict(random_images(3), boxes=True)
    assert [r.boxes for r in results] == [None] * 3 and all(r.detector_scores == {} for r in results)
