"""Parity of our D-FINE detector (HGNetV2 backbone) and post-processing with transformers on random weights."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import safetensors.torch as st
import torch
from transformers import HGNetV2Backbone, HGNetV2Config, RTDetrImageProcessorPil

from fixtures.deimv2_checkpoints import randomize_
from fixtures.dfine_checkpoints import (
    DFINE_L,
    DFINE_N,
    DFINE_S,
    HGNETV2_B0,
    HGNETV2_B2,
    HGNETV2_B4,
    HGNETV2_B5,
    TINY_BACKBONE,
    make_dfine,
    randomize_backbone_affines_,
)
from runtime.errors import ModelLoadError, WeightError
from runtime.models import hgnetv2
from runtime.models.deimv2_encoder import ConvNorm
from runtime.models.detect_postprocess import post_process_object_detection
from runtime.models.dfine import DFineDetector
from runtime.models.dfine_config import DFineConfig as OurConfig
from runtime.models.hgnetv2 import HGNetV2
from runtime.models.hgnetv2 import HGNetV2Config as OurBackboneConfig
from runtime.models.preprocessor import read_preprocess
from runtime.models.weights import load_into, skip_random_init

TOL = 1e-4  # max abs diff relative to the reference output's max magnitude


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def align_swapped_queries(out, ref) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Our (logits, boxes) with the queries that differ from the reference at the same index re-ordered to their
    nearest reference query, and how many moved. Encoder proposals whose scores tie to ~1e-7 (common among 8400
    at 640x640) may come out of top-k in either order; the decoder is permutation-equivariant over queries, so
    such a swap only permutes the outputs."""
    logits, boxes = out.logits.clone(), out.pred_boxes.clone()
    moved = 0
    for b in range(logits.shape[0]):
        ref_rows = torch.cat([ref.logits[b], ref.pred_boxes[b]], -1)
        rows = torch.cat([out.logits[b], out.pred_boxes[b]], -1)
        tol = TOL * ref_rows.abs().max()
        bad = ((rows - ref_rows).abs().amax(-1) > tol).nonzero().flatten().tolist()
        free = list(bad)
        for i in bad:
            j = min(free, key=lambda k: (rows[k] - ref_rows[i]).abs().max().item())
            free.remove(j)
            logits[b, i], boxes[b, i] = out.logits[b, j], out.pred_boxes[b, j]
        moved += len(bad)
    return logits, boxes, moved


def check_parity(ref_model, ours, pixels, max_swapped: int = 0) -> tuple[float, float]:
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    assert out.logits.shape == ref.logits.shape and out.pred_boxes.shape == ref.pred_boxes.shape
    if max_swapped:
        logits, boxes, moved = align_swapped_queries(out, ref)
        assert moved <= max_swapped, moved
        out = SimpleNamespace(logits=logits, pred_boxes=boxes)
    # Random weights must still give queries of differing scores and box centres, or parity would prove little.
    assert torch.isfinite(ref.logits).all() and torch.isfinite(ref.pred_boxes).all()
    assert ref.logits.std(dim=1).mean() > 0.05 and ref.pred_boxes[..., :2].std(dim=1).min() > 0.05
    errs = rel_err(out.logits, ref.logits), rel_err(out.pred_boxes, ref.pred_boxes)
    assert max(errs) <= TOL, errs
    return errs


N_STYLE = dict(backbone=dict(TINY_BACKBONE, out_indices=[3, 4]), encoder_in_channels=[48, 64],
               decoder_in_channels=[32, 32], feat_strides=[16, 32], encode_proj_layers=[1], num_feature_levels=2,
               decoder_n_points=[6, 6])


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(decoder_method="discrete", normalize_before=True, encoder_layers=2, encode_proj_layers=[1, 2],
         encoder_activation_function="silu", decoder_activation_function="gelu", activation_function="relu"),
    N_STYLE,
    dict(N_STYLE, num_feature_levels=3, decoder_n_points=[2, 3, 4], d_model=48, decoder_attention_heads=4,
         feat_strides=[16, 32, 64]),
    dict(backbone=dict(TINY_BACKBONE, use_learnable_affine_block=False, stage_light_block=[False, True, False, True],
                       hidden_act="silu", stage_kernel_size=[3, 5, 3, 3]),
         eval_size=128, anchor_image_size=[128, 96], decoder_layers=2, max_num_bins=16, top_prob_values=3,
         lqe_layers=3),
], ids=["s-style", "discrete-prenorm-acts", "n-style-2levels", "extra-level-proj",
        "no-lab-eval-size-fixed-anchors-2layers"])
def test_parity_tiny(tmp_path, cfg):
    ref_model = make_dfine(tmp_path, **cfg)
    ours = DFineDetector.from_pretrained(tmp_path)
    check_parity(ref_model, ours, torch.randn(2, 3, 128, 96))


def test_unfolded_batchnorm_is_exact_and_folding_stays_close(tmp_path):
    ref_model = make_dfine(tmp_path)
    pixels = torch.randn(2, 3, 64, 64)
    unfolded = DFineDetector.from_pretrained(tmp_path, fold_batchnorm=False)
    assert max(check_parity(ref_model, unfolded, pixels)) <= 1e-6
    folded = DFineDetector.from_pretrained(tmp_path)
    assert not any(isinstance(m, ConvNorm) and not isinstance(m.norm, torch.nn.Identity)
                   for m in folded.modules())
    assert max(check_parity(ref_model, folded, pixels)) <= 1e-5


def test_checkpoint_with_current_tensor_names_loads(tmp_path):
    # transformers writes pre-5.0 names (self_attn.out_proj, fc1, encoder.encoder.N); a file with the names its
    # modules use (self_attn.o_proj, mlp.layers.0, encoder.aifi.N) loads to the same model.
    ref_model = make_dfine(tmp_path)
    tensors = st.load_file(tmp_path / "model.safetensors")
    assert any(".out_proj." in k for k in tensors) and any(k.startswith("model.encoder.encoder.0.") for k in tensors)
    current = {k: v.clone() for k, v in ref_model.state_dict().items() if k.startswith("model.")}
    assert "model.encoder.aifi.0.layers.0.self_attn.o_proj.weight" in current
    st.save_file(current, tmp_path / "model.safetensors", metadata={"format": "pt"})
    check_parity(ref_model, DFineDetector.from_pretrained(tmp_path), torch.randn(1, 3, 64, 96))


def test_preprocessor_config_is_rt_detr_at_the_model_size(tmp_path):
    make_dfine(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "RTDetrImageProcessor" and cfg["size"] == {"height": 64, "width": 64}
    spec = read_preprocess(tmp_path)
    assert (spec.height, spec.width) == (64, 64)


def test_postprocess_equals_transformers_on_same_outputs(tmp_path):
    ref_model = make_dfine(tmp_path)
    processor = RTDetrImageProcessorPil()
    with torch.inference_mode():
        ref = ref_model(torch.randn(3, 3, 64, 64))
    sizes = [(480, 640), (64, 64), (1080, 1920)]
    for threshold, target_sizes in [(0.5, torch.tensor(sizes)), (0.3, sizes), (0.6, None)]:
        expected = processor.post_process_object_detection(ref, threshold=threshold, target_sizes=target_sizes)
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


def check_detections_match(ref_model, ours, pixels, sizes) -> None:
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    threshold = gap_threshold(torch.sigmoid(ref.logits[0]).flatten())
    expected = RTDetrImageProcessorPil().post_process_object_detection(ref, threshold=threshold, target_sizes=sizes)
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


def test_end_to_end_detections_match(tmp_path):
    ref_model = make_dfine(tmp_path)
    ours = DFineDetector.from_pretrained(tmp_path)
    check_detections_match(ref_model, ours, torch.randn(2, 3, 128, 128), torch.tensor([[720, 1280], [224, 224]]))


def test_input_size_must_divide_by_the_backbone_stride(tmp_path):
    make_dfine(tmp_path)
    ours = DFineDetector.from_pretrained(tmp_path)
    assert ours.input_multiple == 32
    with pytest.raises(ValueError, match="multiples of 32"), torch.inference_mode():
        ours(torch.randn(1, 3, 80, 64))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.decoder.layers.1.encoder_attn.sampling_offsets.weight"),
     "missing tensor 'model.decoder.layers.1.encoder_attn.sampling_offsets.weight'"),
    (lambda t: t.pop("model.backbone.model.encoder.stages.2.blocks.1.layers.0.conv2.lab.scale"),
     "missing tensor 'model.backbone.model.encoder.stages.2.blocks.1.layers.0.conv2.lab.scale'"),
    (lambda t: t.pop("model.encoder.encoder.0.layers.0.self_attn.out_proj.weight"),
     r"missing tensor 'model.encoder.aifi.0.layers.0.self_attn.o_proj.weight'"),
    (lambda t: t.update({"model.encoder_input_proj.1.1.running_var": torch.ones(7)}),
     r"tensor 'model.encoder_input_proj.1.1.running_var' has shape \(7,\), expected \(32,\)"),
    (lambda t: t.update({"model.decoder.extra_head.weight": torch.ones(2)}),
     "unexpected tensor 'model.decoder.extra_head.weight'"),
    (lambda t: t.update({"model.decoder.layers.0.mlp.layers.0.weight": t["model.decoder.layers.0.fc1.weight"].clone()}),
     "both name 'model.decoder.layers.0.mlp.layers.0.weight'"),
], ids=["missing-head", "missing-lab", "missing-legacy-name", "misshaped", "unexpected", "two-names"])
def test_weight_errors_name_the_tensor(tmp_path, edit, message):
    make_dfine(tmp_path)
    tensors = st.load_file(tmp_path / "model.safetensors")
    edit(tensors)
    st.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightError, match=message):
        DFineDetector.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"backbone_config": {"model_type": "resnet"}}, "backbone_config.model_type 'resnet' is not supported"),
    ({"eval_idx": 0}, "eval_idx=0 is not supported"),
    ({"learn_initial_query": True}, "learn_initial_query=true is not supported"),
    ({"activation_function": "mish"}, "activation_function='mish' is not supported"),
    ({"decoder_n_points": [4, 4]}, "decoder_n_points must be"),
    ({"num_queries": "300"}, "field 'num_queries' must be int"),
    ({"encoder_in_channels": [48, 64]}, "need one entry per backbone output"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="hgnet_v2", out_indices=[3, 2])},
     r"backbone_config: out_indices must be increasing"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="hgnet_v2", hidden_sizes=[16, 32, 40, 64])},
     "output 3 has 48 channels but hidden_sizes declares 40"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="hgnet_v2", stem_strides=[2, 1, 1, [2, 2], 1])},
     "field 'stem_strides' must be a list of ints"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="hgnet_v2", stage_num_blocks=[1, 1, 2])},
     "stage_num_blocks has 3 entries, stage_in_channels 4"),
], ids=["resnet", "eval-idx", "learned-queries", "activation", "points", "type", "levels", "out-indices",
        "hidden-sizes", "axis-strides", "stage-lists"])
def test_unsupported_config_is_named(tmp_path, change, message):
    make_dfine(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelLoadError, match=message):
        OurConfig.from_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        DFineDetector.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, real", [("dfine-n", DFINE_N), ("dfine-s", DFINE_S), ("dfine-l", DFINE_L)])
def test_parity_real_shape(tmp_path, name, real):
    backbone, cfg = real
    ref_model = make_dfine(tmp_path, backbone=backbone, **cfg)
    ours = DFineDetector.from_pretrained(tmp_path)
    pixels = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(0))  # rescaled pixels
    check_parity(ref_model, ours, pixels, max_swapped=16)
    check_detections_match(ref_model, ours, pixels, torch.tensor([[480, 640]]))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [HGNETV2_B0, HGNETV2_B2, HGNETV2_B4, HGNETV2_B5], ids=["b0", "b2", "b4", "b5"])
def test_backbone_parity(backbone):
    ref = HGNetV2Backbone(HGNetV2Config(**backbone, out_indices=[1, 2, 3, 4])).eval()
    randomize_(ref, 0)
    randomize_backbone_affines_(ref, 1)
    cfg = OurBackboneConfig.from_dict(ref.config.to_dict(), "backbone")
    with skip_random_init():
        ours = HGNetV2(cfg)
    tensors = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_into(ours, tensors, torch.float32, key_of=hgnetv2.checkpoint_name)
    assert len(tensors) == len(ours.state_dict())
    for module in ours.modules():
        if isinstance(module, ConvNorm):
            module.fold()
    pixels = torch.rand(1, 3, 640, 640)
    with torch.inference_mode():
        expected = ref(pixels).feature_maps
        got = ours.eval()(pixels)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and e.std() > 0.1
        assert rel_err(g, e) <= TOL
