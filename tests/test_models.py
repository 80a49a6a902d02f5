"""Parity of our ViT / DINOv3 classifiers with transformers on the same random weights."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

from runtime.models.classifier import load_classifier
from runtime.errors import ModelLoadError, WeightError
from fixtures.checkpoints import dinov3_reference, make_dinov3, make_vit

# Real sizes (random weights): DINOv3 ViT-S/16, ViT-S+/16 (SwiGLU), ViT-B/16; the NATIX reference ViT-B/16.
DINOV3_S16 = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                  num_register_tokens=4, image_size=224, patch_size=16)
DINOV3_S16_PLUS = dict(DINOV3_S16, intermediate_size=1536, use_gated_mlp=True, hidden_act="silu")
DINOV3_B16 = dict(DINOV3_S16, hidden_size=768, intermediate_size=3072, num_attention_heads=12)
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=16)

# bf16 keeps 8 mantissa bits: against the fp32 reference, transformers' own bf16 run drifts by 1-10% of the
# logit scale on these random models. Ours must stay within 1.5x of that drift, plus 1% of scale.
BF16_DRIFT_RATIO = 1.5
BF16_DRIFT_FLOOR = 0.01


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_dinov3(tmp_path, pixels, seed=0, **cfg):
    ref_model = make_dinov3(tmp_path, seed=seed, **cfg)
    ours = load_classifier(tmp_path, torch.float32)
    with torch.no_grad():
        ref_seq, ref_logits = dinov3_reference(ref_model, pixels, tmp_path)
        seq, _ = ours.backbone(pixels)
        probs, logits = ours(pixels)
    assert rel_err(seq, ref_seq) <= 1e-4
    assert rel_err(logits, ref_logits) <= 1e-4
    torch.testing.assert_close(probs, torch.softmax(ref_logits, -1)[:, 1], atol=1e-5, rtol=0)
    return ref_model, ref_logits


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(num_register_tokens=0),
    dict(use_gated_mlp=True, hidden_act="silu"),
    dict(patch_size=8, key_bias=True, layerscale_value=0.1),
], ids=["registers", "no-registers", "swiglu", "patch8-keybias"])
def test_dinov3_parity(tmp_path, cfg):
    check_dinov3(tmp_path, torch.randn(3, 3, 32, 32), **cfg)


def test_dinov3_non_square_input(tmp_path):
    # RoPE is recomputed for the actual grid, so a 48x80 input works on a 32x32-configured model.
    check_dinov3(tmp_path, torch.randn(2, 3, 48, 80), image_size=[48, 80])


def test_dinov3_single_logit_and_many_labels(tmp_path):
    ref_model = make_dinov3(tmp_path / "one", num_labels=1)
    ours = load_classifier(tmp_path / "one", torch.float32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, ref_logits = dinov3_reference(ref_model, x, tmp_path / "one")
        torch.testing.assert_close(ours(x)[0], torch.sigmoid(ref_logits[:, 0]), atol=1e-5, rtol=0)
    make_dinov3(tmp_path / "three", num_labels=3)
    cfg_path = tmp_path / "three" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    with pytest.raises(ModelLoadError, match="roadwork_label"):
        load_classifier(tmp_path / "three", torch.float32)
    cfg["roadwork_label"] = "class_2"
    cfg_path.write_text(json.dumps(cfg))
    assert load_classifier(tmp_path / "three", torch.float32).labels.roadwork_index == 2


def test_vit_parity(tmp_path):
    ref = make_vit(tmp_path)
    ours = load_classifier(tmp_path, torch.float32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref_logits = ref(pixel_values=x).logits
        probs, logits = ours(x)
    assert rel_err(logits, ref_logits) <= 1e-4
    torch.testing.assert_close(probs, torch.softmax(ref_logits, -1)[:, 1], atol=1e-5, rtol=0)
    assert ours.labels.names == ("None", "Roadwork") and ours.labels.roadwork_index == 1


def test_sharded_checkpoint_and_nested_layer_names(tmp_path):
    ref_model = make_dinov3(tmp_path / "a")
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    # Add the head as one more shard, listed in the index.
    head = {k: v for k, v in st.load_file(tmp_path / "a" / "model.safetensors").items() if k.startswith("classifier.")}
    st.save_file(head, tmp_path / "sharded" / "head.safetensors")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "head.safetensors" for k in head})
    index_path.write_text(json.dumps(index))
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / "sharded" / name).write_text((tmp_path / "a" / name).read_text())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_classifier(tmp_path / "a", torch.float32)(x)[1]
        torch.testing.assert_close(load_classifier(tmp_path / "sharded", torch.float32)(x)[1], expected)
        # In-memory transformers naming (`model.layer.N.`) loads the same.
        tensors = st.load_file(tmp_path / "a" / "model.safetensors")
        st.save_file({("model." + k if k.startswith("layer.") else k): v for k, v in tensors.items()},
                     tmp_path / "a" / "model.safetensors")
        torch.testing.assert_close(load_classifier(tmp_path / "a", torch.float32)(x)[1], expected)


@pytest.mark.parametrize("disk_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_on_disk(tmp_path, disk_dtype):
    make_dinov3(tmp_path)
    path = tmp_path / "model.safetensors"
    st.save_file({k: v.to(disk_dtype) for k, v in st.load_file(path).items()}, path)
    model = load_classifier(tmp_path, torch.float32)
    assert model.classifier.weight.dtype == torch.float32
    tensors = st.load_file(path)
    torch.testing.assert_close(model.classifier.weight, tensors["classifier.weight"].float())


def check_bf16_drift(path, reference, x: torch.Tensor) -> None:
    """`reference(model_dtype)` gives transformers' logits with weights and input in that dtype."""
    with torch.no_grad():
        exact = reference(torch.float32)
        theirs = reference(torch.bfloat16)
        ours_model = load_classifier(path, torch.bfloat16)
        probs, ours = ours_model(x)
    assert ours.dtype == torch.bfloat16 and probs.dtype == torch.float32
    assert rel_err(ours, exact) <= BF16_DRIFT_RATIO * rel_err(theirs, exact) + BF16_DRIFT_FLOOR


def dinov3_bf16_reference(ref_model, path, x):
    return lambda dtype: dinov3_reference(ref_model.to(dtype), x.to(dtype), path)[1]


def test_bf16_drift_within_stated_tolerance(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    check_bf16_drift(tmp_path, dinov3_bf16_reference(make_dinov3(tmp_path), tmp_path, x), x)
    vit = make_vit(tmp_path / "vit")
    check_bf16_drift(tmp_path / "vit", lambda dtype: vit.to(dtype)(pixel_values=x.to(dtype)).logits, x)


def edit_tensors(path, fn):
    tensors = st.load_file(path / "model.safetensors")
    fn(tensors)
    st.save_file(tensors, path / "model.safetensors")


def test_weight_errors_name_the_tensor(tmp_path):
    make_dinov3(tmp_path)
    edit_tensors(tmp_path, lambda t: t.pop("layer.1.mlp.up_proj.weight"))
    with pytest.raises(WeightError, match=r"missing tensor 'layer\.1\.mlp\.up_proj\.weight'"):
        load_classifier(tmp_path, torch.float32)

    make_dinov3(tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"layer.0.norm1.weight": torch.ones(65)}))
    with pytest.raises(WeightError, match=r"'layer\.0\.norm1\.weight' has shape \(65,\), expected \(64,\)"):
        load_classifier(tmp_path, torch.float32)

    make_dinov3(tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"layer.7.extra.weight": torch.ones(3)}))
    with pytest.raises(WeightError, match=r"unexpected tensor 'layer\.7\.extra\.weight'"):
        load_classifier(tmp_path, torch.float32)

    make_vit(tmp_path / "vit")
    edit_tensors(tmp_path / "vit", lambda t: t.pop("vit.encoder.layer.0.attention.attention.key.bias"))
    with pytest.raises(WeightError, match=r"missing tensor 'vit\.encoder\.layer\.0\.attention\.attention\.key\.bias'"):
        load_classifier(tmp_path / "vit", torch.float32)


def test_model_dir_errors(tmp_path):
    make_dinov3(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "resnet"}))
    with pytest.raises(ModelLoadError, match="model_type 'resnet' is not supported"):
        load_classifier(tmp_path, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightError, match="only pickle checkpoints"):
        load_classifier(tmp_path, torch.float32)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightError, match="cannot read safetensors"):
        load_classifier(tmp_path, torch.float32)
    with pytest.raises(ModelLoadError, match="file not found"):
        load_classifier(tmp_path / "nowhere", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [DINOV3_S16, DINOV3_S16_PLUS, DINOV3_B16], ids=["vits16", "vits16plus", "vitb16"])
def test_dinov3_real_configs(tmp_path, cfg):
    x = torch.randn(2, 3, 224, 224)
    ref_model, _ = check_dinov3(tmp_path, x, **cfg)
    check_bf16_drift(tmp_path, dinov3_bf16_reference(ref_model, tmp_path, x), x)


@pytest.mark.slow
def test_vit_b16_natix_reference_architecture(tmp_path):
    ref = make_vit(tmp_path, **VIT_B16)
    ours = load_classifier(tmp_path, torch.float32)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref_logits = ref(pixel_values=x).logits
        assert rel_err(ours(x)[1], ref_logits) <= 1e-4
    check_bf16_drift(tmp_path, lambda dtype: ref.to(dtype)(pixel_values=x.to(dtype)).logits, x)


def test_skip_random_init_skips_only_random_fills_and_only_in_its_thread():
    """Loading builds modules under skip_random_init (the random fill of a ViT-B costs more than reading it):
    computed tensors are still computed, and a thread building modules meanwhile still gets its random init."""
    import threading

    from runtime.models.weights import skip_random_init

    other = []
    with skip_random_init():
        layer = torch.nn.Linear(64, 64)
        torch.nn.init.zeros_(layer.bias)  # not random: still done
        skipped = torch.zeros(8)
        torch.nn.init.kaiming_uniform_(skipped.view(2, 4))
        skipped.normal_()
        frequencies = 1 / 100.0 ** torch.arange(0, 1, 0.25)
        thread = threading.Thread(target=lambda: other.append(torch.nn.Linear(64, 64).weight.detach().clone()))
        thread.start()
        thread.join()
    assert torch.equal(skipped, torch.zeros(8))
    assert torch.equal(layer.bias, torch.zeros(64)) and torch.allclose(frequencies[1], torch.tensor(100 ** -0.25))
    reference = torch.nn.Linear(64, 64)  # outside: random as usual
    assert reference.weight.std() > 0 and other[0].std() > 0 and other[0].abs().max() <= 1 / 8
