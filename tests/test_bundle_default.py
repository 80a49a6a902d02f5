"""The bundled default cascade (bundles/default) and the shipped sample images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Deimv2ForObjectDetection, DINOv3ViTModel, Qwen3VLForConditionalGeneration

from kernels.preprocess import preprocess_reference
from runtime.models.classifier import load_classifier
from runtime.config import read_json
from runtime.image_decode import decode_image
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.preprocessor import read_preprocess
from runtime.cascade.engine import Engine, image_tensor
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from fixtures.vlm_checkpoints import hf_inputs
from fixtures.vlm_prefill import prefill_logits
from train.generate import make_sample
from train.vlm_tokenizer import SCORE_PROMPT

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "default"
SAMPLES = REPO / "samples"
MAX_BUNDLE_BYTES = 25 * 2 ** 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.load(BUNDLE)   # the server's defaults: CPU, the engine's dtype choice
    engine.warmup()
    yield engine
    engine.close()


def sample_index() -> list[dict]:
    return json.loads((SAMPLES / "samples.json").read_text())


def test_bundle_is_small_and_well_formed():
    total = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert total < MAX_BUNDLE_BYTES, f"bundle is {total / 2 ** 20:.1f} MiB"
    cfg = read_json(BUNDLE / "classifier" / "config.json")
    assert cfg["model_type"] == "dinov3_vit" and cfg["id2label"] == {"0": "none", "1": "roadwork"}
    assert read_json(BUNDLE / "detector" / "config.json")["model_type"] == "deimv2"
    assert read_json(BUNDLE / "dfine" / "config.json")["model_type"] == "d_fine"
    assert read_json(BUNDLE / "vlm" / "config.json")["model_type"] == "qwen3_vl"


def test_three_stages_two_detector_families_one_sharing_the_backbone(engine):
    stages = engine.describe()["stages"]
    assert [s["name"] for s in stages] == ["classifier", "detectors", "vlm"]
    members = stages[1]["detectors"]
    assert [(m["model_type"], m["shared_backbone"]) for m in members] == [("deimv2", True), ("d_fine", False)]
    # thresholds chosen by tools.tune (docs/training.md): the detectors and the VLM get an undecided band
    assert 0.0 < stages[0]["exit_below"] <= 0.5 <= stages[0]["exit_above"] < 1.0
    assert 0.0 < stages[1]["exit_below"] <= stages[1]["exit_above"] < 1.0


def test_samples_are_scored_on_the_right_side(engine):
    entries = sample_index()
    assert sorted(e["label"] for e in entries) == [0, 0, 0, 1, 1, 1]
    results = engine.predict([decode_image((SAMPLES / e["file"]).read_bytes()) for e in entries])
    for e, r in zip(entries, results):
        assert (r.prediction > 0.5) == bool(e["label"]), (e["file"], r)
        assert r.stage == e["stage"][str(engine.dtype).removeprefix("torch.")], (e["file"], r)
    # out of the box, the samples exercise every stage (train/samples.py picks them so)
    assert {r.stage for r in results} == {"classifier", "detectors", "vlm"}


def test_one_image_at_a_time_in_bf16():
    """A lone request is a batch of one: its detector pass gave NaN in bf16 (runtime/models/deimv2_decoder.py, _sample)."""
    engine = Engine.load(BUNDLE, dtype="bfloat16", max_batch=4)
    images = [decode_image((SAMPLES / e["file"]).read_bytes()) for e in sample_index()]
    try:
        together = engine.predict(images)
        for image, want in zip(images, together):
            got = engine.predict([image])[0]
            # Measured: bit-identical alone and in a batch of 6 (AVX-512 BF16 CPU). 0.01 leaves room for bf16 sums
            # blocked by batch size on other CPUs; a NaN or a wrong-row bug is far larger.
            assert np.isfinite(got.prediction) and abs(got.prediction - want.prediction) <= 0.01, (got, want)
            assert got.label == want.label
    finally:
        engine.close()   # the vlm stage's loop thread


def test_samples_come_from_the_generator():
    for e in sample_index():
        assert e["file"].startswith("roadwork_" if e["label"] else "none_")
        made = decode_image(make_sample(e["seed"], e["index"]).jpeg).astype(np.float32)
        shipped = decode_image((SAMPLES / e["file"]).read_bytes()).astype(np.float32)
        # the same pixels up to the JPEG codec of the Pillow build
        assert np.abs(made - shipped).mean() < 1.0, e["file"]


def _pixels(model_dir: Path, files: list[Path]) -> torch.Tensor:
    spec = read_preprocess(model_dir)
    out = torch.empty(len(files), 3, spec.height, spec.width)
    for i, f in enumerate(files):
        preprocess_reference(image_tensor(decode_image(f.read_bytes())), spec, out[i])
    return out


def test_transformers_reads_the_bundled_checkpoints():
    files = [SAMPLES / e["file"] for e in sample_index()]
    pixels = _pixels(BUNDLE / "classifier", files)
    ours = load_classifier(BUNDLE / "classifier", torch.float32)
    ref = DINOv3ViTModel.from_pretrained(BUNDLE / "classifier", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        seq, _ = ours.backbone(pixels)
        ref_seq = ref(pixel_values=pixels).last_hidden_state
    assert (seq - ref_seq).abs().max() <= 1e-4 * ref_seq.abs().max()
    det = Deimv2Detector.from_pretrained(BUNDLE / "detector")
    ref_det = Deimv2ForObjectDetection.from_pretrained(BUNDLE / "detector", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ref_det(pixel_values=pixels), det(pixels)
    assert (a.logits - b.logits).abs().max() <= 1e-3 * a.logits.abs().max()


def test_transformers_reads_the_bundled_vlm():
    """The bundled VLM scores a sample as transformers' Qwen3VLForConditionalGeneration does on the same files."""
    engine = VLMEngine.load(BUNDLE / "vlm", dtype=torch.float32, config=VLMEngineConfig(
        kv_cache_bytes=1 << 24, max_model_len=512, max_num_batched_tokens=1024, block_size=16))
    image = decode_image((SAMPLES / sample_index()[0]["file"]).read_bytes())
    ours, token_ids = prefill_logits(engine, SCORE_PROMPT, [image])
    ref_model = Qwen3VLForConditionalGeneration.from_pretrained(BUNDLE / "vlm", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(**hf_inputs(BUNDLE / "vlm", token_ids, [image])).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
