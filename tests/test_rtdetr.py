"""Parity of our RT-DETR / RT-DETRv2 detector (ResNet-vd backbone) and post-processing with transformers on random
weights."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import safetensors.torch as st
import torch
from transformers import RTDetrImageProcessorPil

from fixtures.rtdetr_checkpoints import R18VD, R50VD, TINY_BACKBONE, V2_R18VD, make_rtdetr
from runtime.errors import ModelLoadError, WeightError
from runtime.models.deimv2_encoder import ConvNorm
from runtime.models.detect_postprocess import post_process_object_detection
from runtime.models.preprocessor import read_preprocess
from runtime.models.rtdetr import RTDetrDetector
from runtime.models.rtdetr_config import RTDetrConfig as OurConfig

TOL = 1e-4  # max abs diff relative to the reference output's max magnitude
BOTTLENECK_BACKBONE = dict(TINY_BACKBONE, layer_type="bottleneck", hidden_sizes=[16, 24, 32, 48],
                           downsample_in_bottleneck=True, hidden_act="silu")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def align_swapped_queries(out, ref) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Our (logits, boxes) with the queries that differ from the reference at the same index re-ordered to their
    nearest reference query, and how many moved. Encoder proposals whose scores tie to ~1e-7 (common among 8400
    at 640x640) may leave top-k in either order; the decoder is permutation-equivariant over queries, so such a
    swap only permutes the outputs."""
    logits, boxes = out.logits.clone(), out.pred_boxes.clone()
    moved = 0
    for b in range(logits.shape[0]):
        ref_rows = torch.cat([ref.logits[b], ref.pred_boxes[b]], -1)
        rows = torch.cat([out.logits[b], out.pred_boxes[b]], -1)
        bad = ((rows - ref_rows).abs().amax(-1) > TOL * ref_rows.abs().max()).nonzero().flatten().tolist()
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


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in a clear gap between consecutive sorted scores, so both runs keep the same set."""
    s = scores.sort(descending=True).values
    k = max(range(len(s) // 4, 3 * len(s) // 4), key=lambda i: s[i] - s[i + 1])
    assert s[k] - s[k + 1] > 1e-4
    return ((s[k] + s[k + 1]) / 2).item()


def check_detections_match(ref_model, ours, pixels, sizes) -> None:
    """transformers' post-processing of its outputs == ours of our outputs: same labels, scores, boxes."""
    with torch.inference_mode():
        ref = ref_model(pixels)
        out = ours(pixels)
    threshold = gap_threshold(torch.sigmoid(ref.logits[0]).flatten())
    expected = RTDetrImageProcessorPil().post_process_object_detection(ref, threshold=threshold, target_sizes=sizes)
    got = post_process_object_detection(out.logits, out.pred_boxes, threshold, sizes)
    assert len(got) == len(expected) == len(pixels)
    for g, e, size in zip(got, expected, sizes):
        assert len(g.scores) == len(e["scores"]) > 0
        torch.testing.assert_close(g.scores, e["scores"], atol=1e-5, rtol=0)
        # Equal scores may swap places; match every expected detection to one of ours.
        unmatched = list(range(len(g.scores)))
        for score, label, box in zip(e["scores"], e["labels"], e["boxes"]):
            hit = next(j for j in unmatched if g.labels[j] == label and abs(g.scores[j] - score) <= 1e-5
                       and (g.boxes[j] - box).abs().max() <= TOL * size.max())
            unmatched.remove(hit)


BASE = {"v1": dict(), "v2": dict(v2=True), "v2-discrete": dict(v2=True, decoder_method="discrete")}


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory) -> dict[str, tuple]:
    """(transformers model, directory) per BASE variant, written once for the module."""
    out = {}
    for name, cfg in BASE.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = make_rtdetr(path, **cfg), path
    return out


@pytest.fixture
def v1_copy(base_checkpoints, tmp_path):
    """A private copy of the v1 checkpoint directory, to edit."""
    shutil.copytree(base_checkpoints["v1"][1], tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.mark.parametrize("name", list(BASE))
def test_parity_tiny(base_checkpoints, name):
    ref_model, path = base_checkpoints[name]
    ours = RTDetrDetector.from_pretrained(path)
    assert ours.cfg.is_v2 == (name != "v1") and ours.cfg.decoder_method == ("discrete" if "discrete" in name
                                                                             else "default")
    check_parity(ref_model, ours, torch.randn(2, 3, 64, 96))  # batch of 2, not square
    check_parity(ref_model, ours, torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize("cfg", [
    dict(backbone=BOTTLENECK_BACKBONE, hidden_expansion=1.0, normalize_before=True, encoder_layers=2,
         activation_function="relu", encoder_activation_function="silu", decoder_activation_function="gelu"),
    dict(num_feature_levels=5, feat_strides=[8, 16, 32, 64, 128], decoder_layers=2, decoder_n_points=2),
    dict(v2=True, num_feature_levels=4, decoder_n_levels=4, decoder_offset_scale=0.3, decoder_n_points=2,
         decoder_method="discrete", backbone=dict(TINY_BACKBONE, out_indices=[3, 4]), encoder_in_channels=[32, 48],
         decoder_in_channels=[32, 32], feat_strides=[16, 32, 64, 128], encode_proj_layers=[0, 1]),
    dict(v2=True, anchor_image_size=[96, 64], layer_norm_eps=1e-3, batch_norm_eps=1e-3),
], ids=["v1-bottleneck-prenorm-acts", "v1-two-extra-levels", "v2-two-maps-4-levels-discrete",
        "v2-fixed-anchors"])
def test_parity_tiny_variants(tmp_path, cfg):
    ref_model = make_rtdetr(tmp_path, **cfg)
    ours = RTDetrDetector.from_pretrained(tmp_path)
    check_parity(ref_model, ours, torch.randn(2, 3, 96, 64))


def test_fixed_anchors_refuse_another_input_size(tmp_path):
    make_rtdetr(tmp_path, anchor_image_size=[96, 64])
    ours = RTDetrDetector.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="anchor_image_size"), torch.inference_mode():
        ours(torch.randn(1, 3, 64, 64))


def test_unfolded_batchnorm_is_exact_and_folding_stays_close(base_checkpoints):
    ref_model, path = base_checkpoints["v2"]
    pixels = torch.randn(2, 3, 64, 64)
    unfolded = RTDetrDetector.from_pretrained(path, fold_batchnorm=False)
    assert max(check_parity(ref_model, unfolded, pixels)) <= 1e-6
    folded = RTDetrDetector.from_pretrained(path)
    assert not any(isinstance(m, ConvNorm) and not isinstance(m.norm, torch.nn.Identity) for m in folded.modules())
    assert max(check_parity(ref_model, folded, pixels)) <= 1e-5


def test_checkpoint_with_current_tensor_names_loads(base_checkpoints, v1_copy):
    # transformers writes pre-5.0 names (self_attn.out_proj, fc1, encoder.encoder.N); a file with the names its
    # modules use (self_attn.o_proj, mlp.fc1, encoder.aifi.N) loads to the same model.
    ref_model = base_checkpoints["v1"][0]
    tensors = st.load_file(v1_copy / "model.safetensors")
    assert any(".out_proj." in k for k in tensors) and any(k.startswith("model.encoder.encoder.0.") for k in tensors)
    current = {k: v.clone() for k, v in ref_model.state_dict().items() if k.startswith("model.")}
    assert "model.encoder.aifi.0.layers.0.mlp.fc1.weight" in current
    st.save_file(current, v1_copy / "model.safetensors", metadata={"format": "pt"})
    check_parity(ref_model, RTDetrDetector.from_pretrained(v1_copy), torch.randn(1, 3, 64, 96))


def test_heads_saved_only_at_top_level_load(base_checkpoints, tmp_path):
    # RT-DETRv2 ties model.decoder.{class,bbox}_embed to the top-level heads; a file holding only the top-level copy
    # loads to the same model.
    ref_model, path = base_checkpoints["v2"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    tensors = st.load_file(tmp_path / "model.safetensors")
    heads = ("model.decoder.class_embed.", "model.decoder.bbox_embed.")
    moved = {(k[len("model.decoder."):] if k.startswith(heads) else k): v for k, v in tensors.items()}
    assert len(moved) == len(tensors) and not any(k.startswith(heads) for k in moved)
    st.save_file(moved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    check_parity(ref_model, RTDetrDetector.from_pretrained(tmp_path), torch.randn(1, 3, 64, 64))


def test_preprocessor_config_is_rt_detr_at_the_model_size(base_checkpoints):
    path = base_checkpoints["v1"][1]
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "RTDetrImageProcessor" and cfg["size"] == {"height": 64, "width": 64}
    assert cfg["do_rescale"] and not cfg["do_normalize"] and not cfg["do_pad"] and cfg["resample"] == 2
    spec = read_preprocess(path)
    assert (spec.height, spec.width) == (64, 64)


def test_postprocess_equals_transformers_on_same_outputs(base_checkpoints):
    ref_model = base_checkpoints["v2"][0]
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


@pytest.mark.parametrize("name", list(BASE))
def test_end_to_end_detections_match(base_checkpoints, name):
    ref_model, path = base_checkpoints[name]
    ours = RTDetrDetector.from_pretrained(path)
    check_detections_match(ref_model, ours, torch.randn(2, 3, 64, 96), torch.tensor([[720, 1280], [224, 224]]))


def test_input_size_must_divide_by_the_backbone_stride(base_checkpoints):
    ours = RTDetrDetector.from_pretrained(base_checkpoints["v1"][1])
    assert ours.input_multiple == 32
    with pytest.raises(ValueError, match="multiples of 32"), torch.inference_mode():
        ours(torch.randn(1, 3, 80, 64))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.decoder.layers.1.encoder_attn.sampling_offsets.weight"),
     "missing tensor 'model.decoder.layers.1.encoder_attn.sampling_offsets.weight'"),
    (lambda t: t.pop("model.backbone.model.encoder.stages.1.layers.0.shortcut.1.normalization.running_mean"),
     "missing tensor 'model.backbone.model.encoder.stages.1.layers.0.shortcut.1.normalization.running_mean'"),
    (lambda t: t.pop("model.encoder.encoder.0.layers.0.self_attn.out_proj.weight"),
     "missing tensor 'model.encoder.aifi.0.layers.0.self_attn.o_proj.weight'"),
    (lambda t: t.update({"model.encoder_input_proj.1.1.running_var": torch.ones(7)}),
     r"tensor 'model.encoder_input_proj.1.1.running_var' has shape \(7,\), expected \(32,\)"),
    (lambda t: t.update({"model.decoder.extra_head.weight": torch.ones(2)}),
     "unexpected tensor 'model.decoder.extra_head.weight'"),
    (lambda t: t.update({"model.decoder.layers.0.mlp.fc1.weight": t["model.decoder.layers.0.fc1.weight"].clone()}),
     "both name 'model.decoder.layers.0.mlp.fc1.weight'"),
], ids=["missing-head", "missing-backbone-shortcut", "missing-legacy-name", "misshaped", "unexpected", "two-names"])
def test_weight_errors_name_the_tensor(v1_copy, edit, message):
    tensors = st.load_file(v1_copy / "model.safetensors")
    edit(tensors)
    st.save_file(tensors, v1_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightError, match=message):
        RTDetrDetector.from_pretrained(v1_copy)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "d_fine"}, "model_type must be one of rt_detr, rt_detr_v2"),
    ({"use_timm_backbone": True}, "use_timm_backbone=true is not supported"),
    ({"backbone": "resnet50d"}, "backbone='resnet50d' is not supported"),
    ({"backbone_config": {"model_type": "resnet"}}, "model_type 'resnet' is not supported"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="rt_detr_resnet", layer_type="preactivation")},
     "layer_type"),
    ({"backbone_config": dict(TINY_BACKBONE, model_type="rt_detr_resnet", out_indices=[4, 3, 2])},
     "out_indices must be increasing"),
    ({"encoder_in_channels": [24, 32]}, "encoder_in_channels has 2 entries but the backbone yields 3 maps"),
    ({"decoder_in_channels": [32, 32, 48]}, "decoder_in_channels must be encoder_hidden_dim=32"),
    ({"decoder_n_points": [2, 3, 4]}, "decoder_n_points"),
    ({"learn_initial_query": True}, "learn_initial_query=true is not supported"),
    ({"activation_function": "mish"}, "activation_function='mish' is not supported"),
    ({"num_queries": "300"}, "field 'num_queries' must be int"),
    ({"num_feature_levels": 2}, "num_feature_levels=2 is below the 3 levels"),
    ({"encode_proj_layers": [3]}, "encode_proj_layers must index the 3 encoder levels"),
], ids=["model-type", "timm", "named-backbone", "backbone-type", "layer-type", "out-indices", "channel-lists",
        "decoder-channels", "per-level-points", "learned-queries", "activation", "type", "levels", "aifi-level"])
def test_unsupported_config_is_named(v1_copy, change, message):
    cfg = json.loads((v1_copy / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelLoadError, match=message):
        OurConfig.from_dict(cfg)
    (v1_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        RTDetrDetector.from_pretrained(v1_copy)


@pytest.mark.parametrize("change, message", [
    ({"decoder_n_levels": 4}, "decoder_n_levels=4 must equal num_feature_levels=3"),
    ({"decoder_method": "nearest"}, "decoder_method='nearest' is not supported"),
], ids=["levels", "method"])
def test_unsupported_v2_config_is_named(base_checkpoints, change, message):
    cfg = json.loads((base_checkpoints["v2"][1] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=message):
        OurConfig.from_dict({**cfg, **change})


@pytest.mark.slow
@pytest.mark.parametrize("real", [R18VD, R50VD, V2_R18VD], ids=["rtdetr-r18vd", "rtdetr-r50vd", "rtdetr-v2-r18vd"])
def test_parity_real_shape(tmp_path, real):
    backbone, cfg = real
    ref_model = make_rtdetr(tmp_path, backbone=backbone, **cfg)
    ours = RTDetrDetector.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": 640, "width": 640}
    pixels = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(0))  # rescaled pixels
    check_parity(ref_model, ours, pixels, max_swapped=16)
    check_detections_match(ref_model, ours, pixels, torch.tensor([[480, 640]]))
