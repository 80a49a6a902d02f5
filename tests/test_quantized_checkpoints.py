"""Quantized Qwen3-VL checkpoints (fp8 block, AWQ gemm, compressed-tensors pack-quantized): bit-exact unpacking
against references written here, strict loading errors, and a model loaded from a quantized checkpoint against the
same model loaded from its dequantized float weights; the int4 dequant-GEMM kernel (Triton, interpreted) and the
fp8 _scaled_mm layer against their references."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.images import random_image
from fixtures.quantized_checkpoints import (AWQ_PACK_ORDER, pack_awq, pack_sequential, quantize_fp8, write_dequantized,
                                            write_quantized)
from fixtures.vlm_checkpoints import make_qwen3_vl
from kernels.int4_gemm import int4_gemm_reference, pack_int4_k, unpack_int4_k
from kernels.int4_gemm_triton import int4_gemm_triton
from runtime.errors import ModelLoadError, WeightError
from runtime.models.qwen3_vl import load_qwen3_vl
from runtime.models.quantized_checkpoint_layers import Fp8Linear, Int4Linear
from runtime.models.quantized_checkpoint_formats import (Fp8Weight, Int4Weight, read_quant_format,
                                                         read_quantized_linear, unpack_awq, unpack_nibbles)
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from runtime.vlm.sequence import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("fp8", "awq", "pack-quantized")
QUESTION = "Is there roadwork in this image? Answer Yes or No."
ROOMY = VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256, max_num_batched_tokens=256, block_size=8)


# --- packing: each format's nibble order, checked element by element -----------------------------------------------


def nibble(word: int, j: int) -> int:
    return (word >> (4 * j)) & 0xF  # Python ints: an arithmetic shift of the signed word, masked


def test_awq_unpacking_follows_awq_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (5, 24), generator=g)
    packed = pack_awq(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    for r in range(5):
        for c in range(3):
            for j in range(8):  # nibble j of packed column c holds column 8c + AWQ_PACK_ORDER[j]
                assert nibble(int(packed[r, c]), j) == int(q[r, 8 * c + AWQ_PACK_ORDER[j]])
    assert torch.equal(unpack_awq(packed), q.to(torch.uint8))
    assert (packed < 0).any(), "a nibble >= 8 in position 7 must set the sign bit (covered)"


def test_sequential_and_kernel_unpacking():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (6, 32), generator=g)
    packed = pack_sequential(q)
    for r in range(6):
        for c in range(4):
            for j in range(8):
                assert nibble(int(packed[r, c]), j) == int(q[r, 8 * c + j])
    assert torch.equal(unpack_nibbles(packed), q.to(torch.uint8))
    kpacked = pack_int4_k(q.T.contiguous())  # (in, out) packed along in
    assert torch.equal(kpacked, pack_sequential(q).T)
    assert torch.equal(unpack_int4_k(kpacked), q.T.to(torch.uint8))


@pytest.mark.parametrize("method,group,block", [("fp8", 0, (128, 128)), ("fp8", 0, (16, 8)), ("awq", 8, None),
                                                ("awq", 32, None), ("pack-quantized", 16, None),
                                                ("pack-quantized", 0, None)])
def test_dequantized_weight_equals_reference(tmp_path, method, group, block):
    """Each layer read from a written checkpoint dequantizes to exactly the fixture's float weight."""
    from fixtures.quantized_checkpoints import quantize_awq, quantize_packed, quantization_config
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    if method == "fp8":
        parts, ref = quantize_fp8(w, block)
    elif method == "awq":
        parts, ref = quantize_awq(w, group)
    else:  # group 0: strategy "channel", one scale per output row
        parts, ref = quantize_packed(w, group or 64)
    cfg = quantization_config(method, group, block or (128, 128), [])
    if method == "pack-quantized" and not group:
        cfg["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None)
    fmt = read_quant_format({"quantization_config": cfg})
    tensors = {f"layer.{k}": v for k, v in parts.items()}
    weight = read_quantized_linear(tensors, fmt, "layer", 48, 64, "ckpt")
    assert torch.equal(weight.dequantize(), ref)
    # and it is a quantization of w: fp8 keeps 3 mantissa bits, int4 is off by half a step (range / 30 or amax / 14)
    assert (ref - w).abs().max() < 0.08 * w.abs().max()


# --- model parity -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny VLM; per format its quantized checkpoint and the float checkpoint of what that stands for."""
    root = tmp_path_factory.mktemp("quant")
    make_qwen3_vl(root / "float", seed=2)
    out = {}
    for method, kwargs in (("fp8", dict(block=(16, 16))), ("awq", dict(group=16)), ("pack-quantized", dict(group=32))):
        tensors = write_quantized(root / "float", root / method, method, **kwargs)
        write_dequantized(root / method, root / f"{method}-dequantized", tensors)
        out[method] = (root / method, root / f"{method}-dequantized")
    return out


@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_matches_dequantized_float_model(checkpoints, method):
    quantized, reference = checkpoints[method]
    assert "quantization_config" in json.loads((quantized / "config.json").read_text())
    a, b = load_qwen3_vl(quantized), load_qwen3_vl(reference)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    image = random_image(40, 56, seed=10)
    runs = []
    for path in (quantized, reference):
        engine = VLMEngine.load(path, config=ROOMY)
        score, = engine.score([image], QUESTION)
        text, = engine.generate([QUESTION], [[image]], SamplingParams(max_new_tokens=8, ignore_eos=True))
        runs.append((score.p_yes, text.token_ids))
    # Same tokens; P within float rounding: the two files place the (equal) float tensors at different alignments,
    # and CPU GEMV kernels round differently by alignment.
    assert runs[0][1] == runs[1][1]
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)


def test_vision_tower_quantized_too(checkpoints):
    """fp8 (as written here) quantizes the vision tower as well: its blocks were read from fp8 tensors."""
    tensors = load_file(str(checkpoints["fp8"][0] / "model.safetensors"))
    assert tensors["model.visual.blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.language_model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    awq = load_file(str(checkpoints["awq"][0] / "model.safetensors"))
    assert "model.language_model.layers.0.mlp.down_proj.qweight" in awq and "model.visual.blocks.0.attn.qkv.weight" in awq


# --- strictness ---------------------------------------------------------------------------------------------------


def edit(src, dst, drop=(), config=None, retype=None):
    import shutil
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for k in drop:
        del tensors[k]
    for k, f in (retype or {}).items():
        tensors[k] = f(tensors[k])
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


LAYER = "model.language_model.layers.1.self_attn.o_proj"


@pytest.mark.parametrize("method,drop", [("fp8", "weight_scale_inv"), ("awq", "qzeros"), ("awq", "scales"),
                                         ("pack-quantized", "weight_scale"), ("pack-quantized", "weight_shape")])
def test_missing_tensor_is_named(checkpoints, tmp_path, method, drop):
    path = edit(checkpoints[method][0], tmp_path / "m", drop=[f"{LAYER}.{drop}"])
    with pytest.raises(WeightError, match=f"missing tensor '{LAYER}.{drop}'"):
        load_qwen3_vl(path)


@pytest.mark.parametrize("method,group", [("awq", 32), ("pack-quantized", 16)])
def test_wrong_group_size_is_named(checkpoints, tmp_path, method, group):
    def regroup(q):
        if method == "awq":
            q["group_size"] = group
        else:
            q["config_groups"]["group_0"]["weights"]["group_size"] = group
    path = edit(checkpoints[method][0], tmp_path / "m", config=regroup)
    with pytest.raises(WeightError, match=r"tensor '.*\.(qzeros|weight_scale)' has shape .* \(group_size"):
        load_qwen3_vl(path)


def test_float_weight_where_fp8_expected_is_named(checkpoints, tmp_path):
    path = edit(checkpoints["fp8"][0], tmp_path / "m", retype={f"{LAYER}.weight": lambda t: t.float()})
    with pytest.raises(WeightError, match=f"'{LAYER}.weight' has dtype torch.float32, expected torch.float8_e4m3fn"):
        load_qwen3_vl(path)


@pytest.mark.parametrize("method,change,message", [
    ("awq", lambda q: q.update(version="gemv"), "awq version 'gemv' is not supported"),
    ("awq", lambda q: q.update(bits=8), "awq bits 8"),
    ("fp8", lambda q: q.update(activation_scheme="static"), "activation_scheme='static' is not supported"),
    ("fp8", lambda q: q.update(weight_block_size=None), "per-tensor fp8"),
    ("pack-quantized", lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "asymmetric"),
    ("pack-quantized", lambda q: q.update(format="marlin-24"), "format 'marlin-24' is not supported"),
    ("pack-quantized", lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     "activation quantization"),
    ("fp8", lambda q: q.update(quant_method="gptq"), "quant_method='gptq' is not supported"),
])
def test_unsupported_variant_is_a_startup_error(checkpoints, tmp_path, method, change, message):
    path = edit(checkpoints[method][0], tmp_path / "m", config=change)
    with pytest.raises(ModelLoadError, match=message) as e:
        load_qwen3_vl(path)
    assert "quantization_config" in str(e.value)


def test_ignored_layer_must_be_float(checkpoints, tmp_path):
    """A layer the config leaves in float but the checkpoint stores quantized: its tensors are unexpected."""
    path = edit(checkpoints["awq"][0], tmp_path / "m",
                config=lambda q: q.update(modules_to_not_convert=["lm_head", "visual", "layers.1.self_attn.o_proj"]))
    with pytest.raises(WeightError, match=f"missing tensor '{LAYER}.weight'"):
        load_qwen3_vl(path)


# --- kernels and CUDA layers, run on the CPU ----------------------------------------------------------------------


INT4_SHAPES = [  # (rows, in, out, group)
    (1, 64, 64, 32), (3, 128, 96, 128), (16, 64, 72, 8), (17, 96, 40, 16), (40, 256, 128, 64), (5, 40, 24, 8),
    (64, 128, 200, 32), (2, 512, 64, 128)]


@pytest.mark.parametrize("rows,k,n,group", INT4_SHAPES)
def test_int4_triton_kernel_matches_reference(rows, k, n, group):
    g = torch.Generator().manual_seed(rows * k + n)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=g) * 0.1
    zeros = torch.randint(0, 16, (k // group, n), generator=g).float()
    x = torch.randn(rows, k, generator=g)
    qweight = pack_int4_k(q)
    ref = int4_gemm_reference(x, qweight, scales, zeros, group)
    # and the reference against the weight written out here
    w = (q.float() - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    torch.testing.assert_close(ref, x @ w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(int4_gemm_triton(x, qweight, scales, zeros, group), ref, rtol=1e-5, atol=1e-4)


def test_int4_linear_matches_dequantized_linear():
    from fixtures.quantized_checkpoints import quantize_awq
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    parts, ref = quantize_awq(w, 16)
    weight = Int4Weight(unpack_awq(parts["qweight"]), unpack_awq(parts["qzeros"]), parts["scales"], 16)
    bias = torch.randn(48)
    layer = Int4Linear(weight, bias, torch.float32)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, ref, bias), rtol=1e-5, atol=1e-4)


def test_fp8_scaled_mm_layer_matches_its_math():
    """Fp8Linear's blockwise _scaled_mm sum (CPU's _scaled_mm here) equals the fp8-quantized activations times the
    dequantized weight, and stays near the float layer."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 256, generator=g)
    parts, ref = quantize_fp8(w, (32, 128))
    layer = Fp8Linear(Fp8Weight(parts["weight"], parts["weight_scale_inv"], (32, 128)), None, torch.float32)
    x = torch.randn(3, 256, generator=g)
    xq, sx = layer.quantize_input(x)
    x_dq = (xq.float() * sx[..., None]).view(3, 256)
    y = layer(x)
    torch.testing.assert_close(y, x_dq @ ref.T, rtol=1e-4, atol=1e-3)
    assert (y - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()
