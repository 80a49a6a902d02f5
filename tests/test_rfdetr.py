"""Parity of our RF-DETR detector and post-processing with transformers on random weights."""
from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import transformers
from transformers.image_transforms import center_to_corners_format
from transformers.utils import TensorType

from fixtures.rfdetr_checkpoints import BASE, BASE_BACKBONE, BASE_SIZE, IMAGE_PROCESSOR_TYPE, TINY_BACKBONE, \
    make_rfdetr
from runtime.errors import ModelLoadError, WeightError
from runtime.models.detect_postprocess import post_process_object_detection
from runtime.models.rfdetr import RfDetrDetector
from runtime.models.rfdetr_config import RfDetrConfig as OurConfig

TOL = 1e-4  # max abs diff relative to the reference output's max magnitude


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_parity(ref_model, ours, pixels) -> tuple[float, float]:
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    assert out.logits.shape == ref.logits.shape and out.pred_boxes.shape == ref.pred_boxes.shape
    errs = rel_err(out.logits, ref.logits), rel_err(out.pred_boxes, ref.pred_boxes)
    assert max(errs) <= TOL, errs
    return errs


@functools.cache
def transformers_post_process():
    """RfDetrImageProcessor.post_process_object_detection of the installed transformers. Its module imports
    torchvision, which is not installed here, so the method is compiled from that module's source on its own (it
    reads nothing from self)."""
    path = Path(transformers.__file__).parent / "models" / "rf_detr" / "image_processing_rf_detr.py"
    cls = next(n for n in ast.parse(path.read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == IMAGE_PROCESSOR_TYPE)
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "post_process_object_detection")
    namespace = {"torch": torch, "center_to_corners_format": center_to_corners_format, "TensorType": TensorType}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return functools.partial(namespace["post_process_object_detection"], None)


@pytest.mark.parametrize("cfg, shape", [
    (dict(), (2, 3, 64, 64)),
    (dict(), (2, 3, 64, 96)),
    (dict(backbone=dict(TINY_BACKBONE, num_windows=1, use_swiglu_ffn=True, apply_layernorm=False, out_indices=[0, 2, 3],
                        use_mask_token=False), activation_function="relu", decoder_activation_function="gelu",
          hidden_expansion=1.0, c2f_num_blocks=1, decoder_layers=3), (1, 3, 48, 64)),
    (dict(backbone=dict(TINY_BACKBONE, num_windows=4, window_block_indexes=[0, 2], hidden_act="silu", qkv_bias=False),
          decoder_n_points=3, group_detr=1), (2, 3, 64, 64)),
    (dict(num_queries=10), (1, 3, 32, 32)),
], ids=["windows", "non-square", "no-windows-swiglu-stem", "4x4-windows-stored-window-layers", "native-grid"])
def test_parity_tiny(tmp_path, cfg, shape):
    ref_model = make_rfdetr(tmp_path, **cfg)
    ours = RfDetrDetector.from_pretrained(tmp_path)
    check_parity(ref_model, ours, torch.randn(*shape))


def test_config_reads_window_layout(tmp_path):
    make_rfdetr(tmp_path)
    bb = OurConfig.from_dict(json.loads((tmp_path / "config.json").read_text())).backbone
    assert bb.out_indices == (1, 2, 4) and bb.global_layers == (False, True, True, False)
    assert bb.position_grid == 4 and bb.num_windows == 2


def test_postprocess_equals_transformers_on_same_outputs(tmp_path):
    ref_model = make_rfdetr(tmp_path)
    with torch.inference_mode():
        ref = ref_model(torch.randn(3, 3, 64, 64))
    sizes = [(480, 640), (64, 64), (1080, 1920)]
    for threshold, target_sizes in [(0.5, torch.tensor(sizes)), (0.3, sizes), (0.6, None)]:
        expected = transformers_post_process()(ref, threshold=threshold, target_sizes=target_sizes)
        got = post_process_object_detection(ref.logits, ref.pred_boxes, threshold, target_sizes)
        assert len(got) == len(expected) == 3
        for g, e in zip(got, expected):
            assert torch.equal(g.scores, e["scores"]) and torch.equal(g.labels, e["labels"])
            assert torch.equal(g.boxes, e["boxes"])
    assert sum(len(e["scores"]) for e in expected) > 0


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in a clear gap between consecutive sorted scores, so both runs keep the same set."""
    s = scores.sort(descending=True).values
    k = max(range(len(s) // 4, 3 * len(s) // 4), key=lambda i: s[i] - s[i + 1])
    assert s[k] - s[k + 1] > 1e-4
    return ((s[k] + s[k + 1]) / 2).item()


def test_end_to_end_detections_match(tmp_path):
    ref_model = make_rfdetr(tmp_path)
    ours = RfDetrDetector.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 64, 64)
    sizes = torch.tensor([[720, 1280], [224, 224]])
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    threshold = gap_threshold(torch.sigmoid(ref.logits[0]).flatten())
    expected = transformers_post_process()(ref, threshold=threshold, target_sizes=sizes)
    got = post_process_object_detection(out.logits, out.pred_boxes, threshold, sizes)
    for g, e, size in zip(got, expected, sizes):
        assert len(g.scores) == len(e["scores"]) > 0
        torch.testing.assert_close(g.scores, e["scores"], atol=1e-5, rtol=0)
        # Equal scores may swap places; match every expected detection to one of ours.
        unmatched = list(range(len(g.scores)))
        for score, label, box in zip(e["scores"], e["labels"], e["boxes"]):
            hit = next(j for j in unmatched if g.labels[j] == label and abs(g.scores[j] - score) <= 1e-5
                       and (g.boxes[j] - box).abs().max() <= TOL * size.max())
            unmatched.remove(hit)


def test_preprocessor_config(tmp_path):
    make_rfdetr(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "RfDetrImageProcessor" and cfg["size"] == {"height": 64, "width": 64}
    assert cfg["do_rescale"] and cfg["do_normalize"] and cfg["resample"] == 2
    assert cfg["image_mean"] == [0.485, 0.456, 0.406] and cfg["image_std"] == [0.229, 0.224, 0.225]


def test_bf16_runs_finite_and_close(tmp_path):
    ref_model = make_rfdetr(tmp_path)
    ours = RfDetrDetector.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.pred_boxes).all()
    # Loose: bf16 can swap near-equal proposals in the top-k; this catches a broken cast, not precision.
    assert (torch.sigmoid(out.logits.float()) - torch.sigmoid(ref.logits)).abs().mean() < 0.05


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 64, 72), "multiples of 16"),
    ((1, 3, 32, 16), "num_queries=20 exceeds the 8 cells"),
], ids=["not-multiple", "too-few-cells"])
def test_input_size_errors(tmp_path, shape, message):
    make_rfdetr(tmp_path)
    ours = RfDetrDetector.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message), torch.inference_mode():
        ours(torch.randn(*shape))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.decoder.layers.1.cross_attn.sampling_offsets.weight"),
     "missing tensor 'transformer.decoder.layers.1.cross_attn.sampling_offsets.weight'"),
    (lambda t: t.pop("backbone.0.encoder.encoder.encoder.layer.3.mlp.fc1.weight"),
     "missing tensor 'backbone.0.encoder.encoder.encoder.layer.3.mlp.fc1.weight'"),
    (lambda t: t.update({"backbone.0.projector.stages.0.0.m.1.cv2.bn.weight": torch.ones(7)}),
     r"tensor 'backbone.0.projector.stages.0.0.m.1.cv2.bn.weight' has shape \(7,\), expected \(16,\)"),
    (lambda t: t.update({"query_feat.weight": torch.ones(20, 32)}),
     r"tensor 'query_feat.weight' has shape \(20, 32\), expected \(60, 32\)"),
    (lambda t: t.update({"transformer.decoder.extra_head.weight": torch.ones(2)}),
     "unexpected tensor 'transformer.decoder.extra_head.weight'"),
    (lambda t: t.update({"transformer.enc_output.3.weight": torch.ones(2)}),  # group_detr=3: groups 0..2
     "unexpected tensor 'transformer.enc_output.3.weight'"),
    (lambda t: t.update({"model.decoder.layernorm.weight": t.pop("transformer.decoder.norm.weight")}),
     "tensors are named 'model.*'"),
], ids=["missing-decoder", "missing-backbone", "misshaped", "query-rows", "unexpected", "extra-group", "hf-names"])
def test_weight_errors_name_the_tensor(tmp_path, edit, message):
    make_rfdetr(tmp_path)
    tensors = st.load_file(tmp_path / "model.safetensors")
    edit(tensors)
    st.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightError, match=message):
        RfDetrDetector.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "lw_detr"}, "model_type must be 'rf_detr'"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="lw_detr_vit")}, "model_type 'lw_detr_vit' is not supported"),
    ({"num_feature_levels": 2}, "num_feature_levels must be 1"),
    ({"attention_bias": False}, "attention_bias=false is not supported"),
    ({"activation_function": "mish"}, "activation_function='mish' is not supported"),
    ({"decoder_self_attention_heads": 5}, "not divisible by decoder_self_attention_heads=5"),
    ({"num_queries": "300"}, "field 'num_queries' must be int"),
    ({"backbone_config": dict(TINY_BACKBONE, reshape_hidden_states=False)}, "reshape_hidden_states=false"),
    ({"backbone_config": dict(TINY_BACKBONE, out_indices=[4, 2])}, "out_indices must be increasing"),
    ({"backbone_config": dict(TINY_BACKBONE, image_size=[32, 48])}, "image_size must be square"),
    ({"backbone_config": dict(TINY_BACKBONE, hidden_act="quick_gelu")}, "hidden_act 'quick_gelu' is not supported"),
], ids=["model-type", "backbone-type", "levels", "attention-bias", "activation", "heads", "type", "reshape",
        "out-indices", "image-size", "hidden-act"])
def test_unsupported_config_is_named(tmp_path, change, message):
    make_rfdetr(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelLoadError, match=message):
        OurConfig.from_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        RfDetrDetector.from_pretrained(tmp_path)


@pytest.mark.slow
def test_parity_rfdetr_base_real_shape(tmp_path):
    ref_model = make_rfdetr(tmp_path, backbone=BASE_BACKBONE, size=BASE_SIZE, **BASE)
    ours = RfDetrDetector.from_pretrained(tmp_path)
    assert ours.cfg.backbone.global_layers == tuple(i in (2, 5, 8, 11) for i in range(12))
    check_parity(ref_model, ours, torch.randn(1, 3, BASE_SIZE, BASE_SIZE))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parity_cuda(tmp_path):
    ref_model = make_rfdetr(tmp_path)
    ours = RfDetrDetector.from_pretrained(tmp_path, device="cuda")
    pixels = torch.randn(2, 3, 64, 96)
    conv_tf32, mm_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, not TF32
    try:
        with torch.inference_mode():
            ref = ref_model(pixels)
            out = ours(pixels.cuda())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, mm_tf32
    assert rel_err(out.logits.cpu(), ref.logits) <= TOL
    assert rel_err(out.pred_boxes.cpu(), ref.pred_boxes) <= TOL
