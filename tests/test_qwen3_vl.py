"""Qwen3-VL parity with transformers on random weights: image preprocessing, prefill logits, greedy generation,
tokenizer + chat template, and loading errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch as st
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from kernels.vlm_preprocess import patchify_reference, smart_resize, vision_input_reference
from kernels.vlm_preprocess_triton import patchify_triton, vision_input_triton
from fixtures.triton_mode import KERNEL_DEVICE
from runtime.errors import ModelLoadError, WeightError
from runtime.models.preprocessor import vision_preprocess_spec
from runtime.vlm.scheduler import ScheduledBatch
from runtime.vlm.sequence import SamplingParams
from runtime.vlm.tokenizer import ChatTokenizer
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from fixtures.images import random_image
from fixtures.vlm_checkpoints import (IMAGE_PAD, QWEN3_VL_2B_LAYERS_REDUCED, QWEN3_VL_2B_SHAPED, TINY, hf_inputs,
                                      image_processor, make_qwen3_vl, write_tokenizer)
from fixtures.vlm_prefill import prefill_logits

ENGINE = VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=512, max_num_batched_tokens=1024, block_size=8)
QUESTION = "Is there roadwork in this image? Answer Yes or No."


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# --- preprocessing ------------------------------------------------------------------------------------------------

PREPROCESS_CASES = [  # (h, w, processor kwargs)
    (224, 224, dict(patch_size=16, min_pixels=65536, max_pixels=16777216)),  # Qwen3-VL's config: upscaled to 256
    (100, 37, dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)),  # transformers' defaults
    (500, 300, dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 64)),  # downscaled to max_pixels
    (13, 250, dict(patch_size=8, min_pixels=32 * 32, max_pixels=64 * 64)),  # extreme aspect ratio
    (64, 48, dict(patch_size=8, min_pixels=16 * 16, max_pixels=64 * 64)),  # already a multiple: no resize
]


@pytest.mark.parametrize("h,w,kwargs", PREPROCESS_CASES)
def test_preprocess_matches_transformers_pil_processor(h, w, kwargs):
    processor = image_processor(kwargs["patch_size"], kwargs["min_pixels"], kwargs["max_pixels"])
    spec = vision_preprocess_spec(json.loads(processor.to_json_string()))
    image = random_image(h, w, seed=h * w)
    expected = processor(images=[image], return_tensors="pt")
    rows, grid = vision_input_reference(torch.from_numpy(image), spec)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    # Pillow does the resize and the float ops run in the same order: bit-identical.
    torch.testing.assert_close(rows, expected["pixel_values"], rtol=0, atol=0)


def test_smart_resize_matches_transformers():
    # 224 * sqrt(65536 / 50176) / 32 rounds up to 8.000000000000002 with another association: 288, not 256.
    assert smart_resize(224, 224, 32, 65536, 16777216) == (256, 256)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (500, 2)).tolist():
        if max(h, w) / min(h, w) <= 200:
            for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 65536, 16777216), (32, 65536, 1 << 20)):
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 56 * 56, 28 * 28 * 1280)


@pytest.mark.parametrize("patch,merge,temporal,h,w", [(16, 2, 2, 64, 96), (14, 2, 2, 56, 28), (8, 1, 1, 24, 16),
                                                      (4, 2, 3, 16, 24)])
def test_patchify_kernel_matches_reference(patch, merge, temporal, h, w):
    spec = vision_preprocess_spec({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": patch, "merge_size": merge,
        "temporal_patch_size": temporal})
    pixels = torch.randn(3, h, w)
    out = torch.empty((h // patch) * (w // patch), spec.row_size, device=KERNEL_DEVICE)
    patchify_triton(pixels.to(KERNEL_DEVICE), spec, out)
    torch.testing.assert_close(out.cpu(), patchify_reference(pixels, spec), rtol=0, atol=0)


def test_triton_pipeline_matches_reference():
    spec = vision_preprocess_spec(json.loads(
        image_processor(8, 32 * 32, 64 * 64).to_json_string()))
    image = torch.from_numpy(random_image(50, 37, seed=3))
    ref, grid = vision_input_reference(image, spec)
    got, got_grid = vision_input_triton(image, spec, torch.float32, KERNEL_DEVICE)
    assert got_grid == grid
    # The resize kernel fuses rescale and normalize into one multiply-add: float rounding only.
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg,match", [
    ({"image_processor_type": "ViTImageProcessor"}, "image_processor_type"),
    ({"image_processor_type": "Qwen2VLImageProcessor", "do_center_crop": True}, "do_center_crop"),
    ({"image_processor_type": "Qwen2VLImageProcessor", "resample": 1}, "resample"),
    ({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 10_000, "max_pixels": 100}, "min_pixels"),
    ({"image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.5, 0, 0.5]}, "image_std"),
])
def test_preprocess_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        vision_preprocess_spec(cfg)


# --- model parity -------------------------------------------------------------------------------------------------


def check_prefill(path, ref_model, prompt, images, config: VLMEngineConfig = ENGINE):
    engine = VLMEngine.load(path, config=config)
    logits, token_ids = prefill_logits(engine, prompt, images)
    assert token_ids.count(IMAGE_PAD) == sum(engine.image_spec.num_tokens(*im.shape[:2]) for im in images)
    with torch.no_grad():
        ref = ref_model(**hf_inputs(path, token_ids, images)).logits[0]
    assert logits.shape == ref.shape
    err = rel_err(logits, ref)
    assert err <= 1e-4, err
    return err


def test_prefill_logits_match_transformers_tiny(tmp_path):
    ref = make_qwen3_vl(tmp_path)
    images = [random_image(40, 56, seed=1), random_image(70, 30, seed=2)]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    check_prefill(tmp_path, ref, chat, images)


def test_prefill_logits_match_transformers_text_only(tmp_path):
    ref = make_qwen3_vl(tmp_path)
    check_prefill(tmp_path, ref, QUESTION, [])


def test_prefill_logits_match_transformers_qwen3_vl_2b_shapes(tmp_path):
    # head_dim 128, GQA 2:1, MRoPE sections [24, 20, 20], DeepStack taps [5, 11, 17], tied LM head.
    ref = make_qwen3_vl(tmp_path, QWEN3_VL_2B_SHAPED, min_pixels=64 * 64, max_pixels=128 * 128)
    check_prefill(tmp_path, ref, QUESTION, [random_image(90, 120, seed=4)])


@pytest.mark.parametrize("cfg,pixels", [(TINY, {}), (QWEN3_VL_2B_SHAPED, dict(min_pixels=64 * 64, max_pixels=96 * 96))],
                         ids=["tiny", "qwen3-vl-2b-shapes"])
def test_greedy_generation_matches_transformers_generate(tmp_path, cfg, pixels):
    ref = make_qwen3_vl(tmp_path, cfg, seed=1, **pixels)
    engine = VLMEngine.load(tmp_path, config=ENGINE)
    image = random_image(48, 64, seed=5)
    result, = engine.generate([QUESTION], [[image]], SamplingParams(max_new_tokens=32, ignore_eos=True))
    request_id = engine.add_request(QUESTION, [image])
    prompt = engine.requests[request_id].token_ids
    engine.cancel(request_id)
    with torch.no_grad():
        out = ref.generate(**hf_inputs(tmp_path, prompt, [image]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False)
    expected = out[0, len(prompt):].tolist()
    assert len(result.token_ids) == 32
    assert result.token_ids == expected
    assert result.finish_reason == "length" and result.num_prompt_tokens == len(prompt)


def test_a_cpu_engine_does_not_look_for_flashinfer(tmp_path, monkeypatch):
    """flashinfer is CUDA-only: a CPU start neither imports it nor logs that it is missing."""
    from runtime.vlm import runner

    looked = []
    monkeypatch.setattr(runner, "flashinfer_module", lambda: looked.append(1))
    make_qwen3_vl(tmp_path)
    engine = VLMEngine.load(tmp_path, config=ENGINE)
    assert looked == [] and engine.runner.attention_backend == "cpu"


@pytest.mark.slow
def test_qwen3_vl_2b_real_layer_shapes_prefill_and_greedy_tokens(tmp_path):
    """Qwen3-VL-2B's real per-layer shapes and vocabulary (fewer layers: fixtures/vlm_checkpoints.py says which):
    prefill logits at every position and 4 greedy tokens equal transformers'."""
    ref = make_qwen3_vl(tmp_path, QWEN3_VL_2B_LAYERS_REDUCED, min_pixels=64 * 64, max_pixels=96 * 96)
    image = random_image(90, 120, seed=4)
    config = VLMEngineConfig(kv_cache_bytes=1 << 24, max_model_len=512, max_num_batched_tokens=1024, block_size=8)
    check_prefill(tmp_path, ref, QUESTION, [image], config)
    engine = VLMEngine.load(tmp_path, config=config)
    result, = engine.generate([QUESTION], [[image]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    request_id = engine.add_request(QUESTION, [image])
    prompt = engine.requests[request_id].token_ids
    engine.cancel(request_id)
    with torch.no_grad():
        out = ref.generate(**hf_inputs(tmp_path, prompt, [image]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert result.token_ids == out[0, len(prompt):].tolist() and len(result.token_ids) == 4


def test_bf16_drift_within_transformers_own(tmp_path):
    """bf16 keeps 8 mantissa bits; our bf16 logits must stay as close to the fp32 reference as transformers' bf16
    run is (x1.5, plus 1% of the logit scale)."""
    ref = make_qwen3_vl(tmp_path)
    image = random_image(40, 56, seed=6)
    engine = VLMEngine.load(tmp_path, dtype=torch.bfloat16, config=ENGINE)
    ours, token_ids = prefill_logits(engine, QUESTION, [image])
    inputs = hf_inputs(tmp_path, token_ids, [image])
    with torch.no_grad():
        exact = ref(**inputs).logits[0]
        theirs = ref.to(torch.bfloat16)(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}).logits[0]
    assert rel_err(ours, exact) <= 1.5 * rel_err(theirs, exact) + 0.01, (rel_err(ours, exact), rel_err(theirs, exact))


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    write_tokenizer(tmp_path)
    ours = ChatTokenizer.load(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "system", "content": "You judge street images."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
        assert ours.encode_chat(chat, generation_prompt) == expected["input_ids"]
    ids = ours.encode_chat(chat)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.token_id("<|image_pad|>") == IMAGE_PAD
    assert ours.single_token_id("Yes") != ours.single_token_id("No")
    with pytest.raises(ValueError, match="single tokens"):
        ours.single_token_id("roadwork ahead")


# --- loading errors -----------------------------------------------------------------------------------------------


def test_load_errors(tmp_path):
    make_qwen3_vl(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "model_type": "qwen2_vl"}))
    with pytest.raises(ModelLoadError, match="model_type"):
        VLMEngine.load(tmp_path, config=ENGINE)
    bad_rope = json.loads(json.dumps(cfg))
    bad_rope["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 1]
    cfg_path.write_text(json.dumps(bad_rope))
    with pytest.raises(ModelLoadError, match="mrope_section"):
        VLMEngine.load(tmp_path, config=ENGINE)
    cfg_path.write_text(json.dumps(cfg))

    weights = tmp_path / "model.safetensors"
    tensors = st.load_file(weights)
    st.save_file({**tensors, "model.visual.extra": torch.zeros(1)}, weights)
    with pytest.raises(WeightError, match="model.visual.extra"):
        VLMEngine.load(tmp_path, config=ENGINE)
    st.save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, weights)
    with pytest.raises(WeightError, match="lm_head.weight"):
        VLMEngine.load(tmp_path, config=ENGINE)
    st.save_file(tensors, weights)

    pre_path = tmp_path / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre_path.write_text(json.dumps({**pre, "patch_size": 16}))
    with pytest.raises(ModelLoadError, match="patch_size"):
        VLMEngine.load(tmp_path, config=ENGINE)
    pre_path.write_text(json.dumps(pre))

    with pytest.raises(ValueError, match="kv_cache_bytes=1000 holds 0 blocks"):
        VLMEngine.load(tmp_path, config=VLMEngineConfig(kv_cache_bytes=1000, max_model_len=512,
                                                         max_num_batched_tokens=1024))
    engine = VLMEngine.load(tmp_path, config=ENGINE)
    with pytest.raises(ValueError, match="2 image placeholders"):
        engine.add_request([1, IMAGE_PAD, IMAGE_PAD, 2], [random_image(32, 32)])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(10, 30)) * 30)


def test_empty_batch_is_a_no_op(tmp_path):
    make_qwen3_vl(tmp_path)
    engine = VLMEngine.load(tmp_path, config=ENGINE)
    assert not engine.scheduler.schedule() and engine.step() == [] and ScheduledBatch().seqs == []
