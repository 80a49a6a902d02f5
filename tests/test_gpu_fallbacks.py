"""GPU readiness on the CPU: an optional GPU library that fails to import in any way (an ABI or driver mismatch raises
RuntimeError or OSError, not ImportError) is logged with its reason and the fallback taken; FP8 GEMMs are gated on
compute capability 9.0 (sm89 refused with a log); the one blockwise _scaled_mm per FP8 layer equals the per-group
math it replaces."""
from __future__ import annotations

import builtins
import logging

import pytest
import torch
from torch import nn

from fixtures.quantized_checkpoints import quantize_fp8
from kernels import paged_attention
from runtime.models import quantized_checkpoint_layers
from runtime.models.quantized_checkpoint_layers import (Fp8Linear, fp8_blockwise_reference, fp8_blockwise_supported,
                                                        fp8_gemm_supported, load_quantized_linears)
from runtime.models.quantized_checkpoint_formats import FP8, Fp8Weight, QuantFormat
from runtime.vlm import attention

GPU = torch.device("cuda")


def fail_import(monkeypatch, module: str, error: Exception):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.fixture
def fresh_caches():
    """The probes are cached per process; each test starts and leaves them empty."""
    caches = (attention.flashinfer_module, paged_attention._flash_attn_varlen, fp8_gemm_supported)
    for f in caches:
        f.cache_clear()
    yield
    for f in caches:
        f.cache_clear()


BROKEN = [RuntimeError("CUDA driver version is insufficient for CUDA runtime version"),
          OSError("libcudart.so.13: cannot open shared object file: No such file or directory")]


@pytest.mark.parametrize("error", BROKEN, ids=lambda e: type(e).__name__)
def test_broken_flashinfer_falls_back_to_triton(monkeypatch, caplog, fresh_caches, error):
    fail_import(monkeypatch, "flashinfer", error)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert attention.flashinfer_module() is None
        assert attention.flashinfer_module() is None  # cached: logged once
    [record] = [r for r in caplog.records if "flashinfer" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"{type(error).__name__}: {error}" in record.getMessage() and "Triton" in record.getMessage()
    have = attention.flashinfer_module() is not None
    assert attention.choose_decode_backend(GPU, torch.bfloat16, 128, have, group=4) == "triton"


@pytest.mark.parametrize("version, six", [("0.6.13", False), ("0.6.17", False), ("0.6.18", True),
                                          ("0.6.18.post1", True), ("0.7.4", True)])
def test_gqa_6_goes_to_flashinfer_from_the_version_that_dispatches_it(monkeypatch, version, six):
    """DISPATCH_GQA_GROUP_SIZE gains 6 in flashinfer 0.6.18: a Qwen-style 6:1 GQA decodes on flashinfer there, on
    the Triton kernel before (where flashinfer would raise "Unsupported group_size")."""
    monkeypatch.setattr(attention, "flashinfer_module", lambda: type("flashinfer", (), {"__version__": version}))
    assert (6 in attention.flashinfer_group_sizes()) is six
    assert set(attention.flashinfer_group_sizes()) - {6} == {1, 2, 3, 4, 8}
    assert attention.choose_decode_backend(GPU, torch.bfloat16, 128, True, group=6) == (
        "flashinfer" if six else "triton")
    if not six:
        spec = attention.DecodeAttentionSpec(12, 2, 128, 16, torch.bfloat16, 0.1)  # 6 query heads per kv head
        assert "GQA group size 6" in attention.flashinfer_unusable(spec, torch.zeros(1, dtype=torch.uint8))


@pytest.mark.parametrize("error", BROKEN, ids=lambda e: type(e).__name__)
def test_broken_flash_attn_falls_back_to_sdpa(monkeypatch, caplog, fresh_caches, error):
    fail_import(monkeypatch, "flash_attn", error)
    with caplog.at_level(logging.INFO, logger=paged_attention.__name__):
        assert paged_attention._flash_attn_varlen() is None
        assert paged_attention._flash_attn_varlen() is None
    [record] = [r for r in caplog.records if "flash-attn" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"{type(error).__name__}: {error}" in record.getMessage() and "SDPA" in record.getMessage()


def test_missing_library_is_routine(monkeypatch, caplog, fresh_caches):
    fail_import(monkeypatch, "flashinfer", ModuleNotFoundError("No module named 'flashinfer'"))
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert attention.flashinfer_module() is None
    [record] = [r for r in caplog.records if "flashinfer" in r.getMessage()]
    assert record.levelno == logging.INFO and "ModuleNotFoundError" in record.getMessage()


# --- FP8: gated on compute capability 9.0 ------------------------------------------------------------------------


def fake_gpu(monkeypatch, capability: tuple[int, int], cuda: str | None = "12.9"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "cuda", cuda)


def fp8_model() -> tuple[nn.Module, dict[str, torch.Tensor], QuantFormat]:
    model = nn.Module()
    model.proj = nn.Linear(256, 64, bias=False)
    parts, _ = quantize_fp8(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), (128, 128))
    tensors = {f"model.proj.{k}": v for k, v in parts.items()}
    return model, tensors, QuantFormat(FP8, 0, (128, 128), ())


def test_sm89_is_refused_with_a_log(monkeypatch, caplog, fresh_caches):
    fake_gpu(monkeypatch, (8, 9))
    model, tensors, fmt = fp8_model()
    with caplog.at_level(logging.INFO, logger=quantized_checkpoint_layers.__name__):
        assert not fp8_gemm_supported(GPU)
        rest = load_quantized_linears(model, tensors, fmt, torch.bfloat16, GPU, "ckpt")
    assert isinstance(model.proj, nn.Linear) and rest["model.proj.weight"].dtype == torch.float32  # dequantized
    [refusal] = [r for r in caplog.records if "compute capability" in r.getMessage()]
    assert refusal.levelno == logging.WARNING and "sm89" in refusal.getMessage()
    assert "dequantized" in refusal.getMessage()


def test_rocm_build_is_refused(monkeypatch, fresh_caches):
    fake_gpu(monkeypatch, (9, 4), cuda=None)  # torch.version.cuda is None in ROCm builds
    assert not fp8_gemm_supported(GPU)


@pytest.mark.parametrize("capability,cuda,blockwise", [((9, 0), "12.9", True), ((9, 0), "13.0", True),
                                                       ((9, 0), "12.8", False), ((10, 0), "12.9", False)])
def test_sm90_is_accepted(monkeypatch, caplog, fresh_caches, capability, cuda, blockwise):
    fake_gpu(monkeypatch, capability, cuda)
    model, tensors, fmt = fp8_model()
    with caplog.at_level(logging.INFO, logger=quantized_checkpoint_layers.__name__):
        assert fp8_gemm_supported(GPU)
        assert fp8_blockwise_supported(GPU) == blockwise
        rest = load_quantized_linears(model, tensors, fmt, torch.bfloat16, GPU, "ckpt")
    assert isinstance(model.proj, Fp8Linear) and model.proj.blockwise == blockwise
    assert not any(k.startswith("model.proj.") for k in rest)
    assert not any("compute capability" in r.getMessage() for r in caplog.records)


# --- FP8: one blockwise GEMM per layer against the per-group math ----------------------------------------------


def fp8_layer(block: tuple[int, int], blockwise: bool, out_f: int = 64, in_f: int = 384) -> Fp8Linear:
    parts, _ = quantize_fp8(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)), block)
    return Fp8Linear(Fp8Weight(parts["weight"], parts["weight_scale_inv"], block), None, torch.float32, blockwise)


@pytest.mark.parametrize("block", [(128, 128), (32, 128)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_blockwise_reference_matches_per_group_math(block, rows):
    layer = fp8_layer(block, blockwise=False)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows))
    xq, sx = layer.quantize_input(x)
    torch.testing.assert_close(fp8_blockwise_reference(xq, sx, layer.weight, layer.scale_b), layer(x),
                               rtol=1e-5, atol=1e-4)


def test_blockwise_layer_makes_one_scaled_mm_in_torchs_layout(monkeypatch):
    """The scale layouts torch._scaled_mm takes for (1x128, 1x128) block scaling: scale_a (M, K/128) outer-dim-major
    (strides (1, M)), scale_b (K/128, N) row-major (torch/_meta_registrations.py, ScaledBlas.cpp); CPU torch has no
    blockwise kernel, so the fake checks the layout and computes the reference."""
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        m, k = a.shape
        n = b.shape[1]
        assert a.stride(1) == 1 and b.stride(0) == 1, (a.stride(), b.stride())  # row-major x column-major
        assert scale_a.shape == (m, k // 128) and scale_a.stride() == (1, m), (scale_a.shape, scale_a.stride())
        assert scale_b.shape == (k // 128, n) and scale_b.is_contiguous(), scale_b.shape
        calls.append(out_dtype)
        return fp8_blockwise_reference(a.view(m, -1, 128), scale_a, b.t(), scale_b).to(out_dtype)

    blockwise, per_group = fp8_layer((128, 128), blockwise=True), fp8_layer((128, 128), blockwise=False)
    x = torch.randn(2, 3, 384, generator=torch.Generator().manual_seed(2))
    want = per_group(x)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    got = blockwise(x)
    assert calls == [torch.bfloat16]  # one GEMM for the layer's 3 input blocks
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 output


def test_blockwise_needs_128_wide_input_blocks():
    assert not fp8_layer((128, 64), blockwise=True).blockwise
    assert fp8_layer((32, 128), blockwise=True).blockwise
