"""Quantized checkpoints into a model: on CUDA, Linear layers that compute from the stored low-bit weights; elsewhere
(and for layers the GPU path cannot take) the weights dequantized once at load into plain nn.Linear.

  Int4Linear: AWQ / pack-quantized weights repacked into kernels/int4_gemm.py's layout, the Triton dequant-GEMM.
  Fp8Linear:  block-scaled fp8 through torch._scaled_mm (sm90+, CUDA builds of torch). Activations are quantized per
              token per 128-wide input block (dynamic, like the checkpoint's activation_scheme), so each input block
              is one fp8 GEMM with a row-wise scale on each side, exact for the weight's (out-block, in-block) scales:
                  y = sum_j (sx[:, j] * x_j) @ (sw[j, :] * w_j)^T
              On sm90 with CUDA 12.9+ the sum is one _scaled_mm with (1x128, 1x128) block scales (bf16 output);
              fp8_blockwise_reference is its plain-torch math.
Both keep their tensors as non-persistent buffers, so the float loader (weights.load_into) never sees them."""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from kernels.int4_gemm import int4_gemm, pack_int4_k
from runtime.config import read_json
from runtime.errors import WeightError
from runtime.models.quantized_checkpoint_formats import (FP8, FP8_MAX, Fp8Weight, Int4Weight, QuantFormat,
                                                         quantized_tensor_keys, read_quant_format,
                                                         read_quantized_linear)
from runtime.models.weights import checkpoint_files

log = logging.getLogger(__name__)


class Int4Linear(nn.Module):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = weight.q.shape
        self.group_size = weight.group_size
        self.register_buffer("qweight", pack_int4_k(weight.q), persistent=False)
        self.register_buffer("scales", weight.scales.to(dtype).contiguous(), persistent=False)
        self.register_buffer("zeros", weight.zeros.to(dtype).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_gemm(x, self.qweight, self.scales, self.zeros, self.group_size)
        return y if self.bias is None else y + self.bias


FP8_SCALE_BLOCK = 128  # the input block of _scaled_mm's blockwise recipes


def _cuda_version() -> tuple[int, ...]:
    return tuple(int(p) for p in torch.version.cuda.split(".")[:2]) if torch.version.cuda else ()


@functools.cache
def fp8_gemm_supported(device: torch.device) -> bool:
    """Row-wise-scaled torch._scaled_mm with float32 output needs sm90+ in a CUDA build of torch: sm89 raises at the
    first FP8 layer, and ROCm's row-wise path has bf16 output only. Cached: asked once per layer at load."""
    if device.type != "cuda":
        return False
    capability = torch.cuda.get_device_capability(device)
    if not torch.version.cuda or capability < (9, 0):
        log.warning("FP8 GEMM needs a CUDA build of torch on compute capability >= 9.0 (row-wise-scaled "
                    "torch._scaled_mm with float32 output); this is sm%d%d under torch %s (CUDA %s): FP8 weights are "
                    "dequantized at load into plain Linear layers", *capability, torch.__version__, torch.version.cuda)
        return False
    return True


def fp8_blockwise_supported(device: torch.device) -> bool:
    """One _scaled_mm per layer with (1x128, 1x128) block scales: cuBLASLt 12.9+ on sm90 only (PyTorch's own
    blockwise tests skip elsewhere, and its newer API refuses other architectures)."""
    return (fp8_gemm_supported(device) and torch.cuda.get_device_capability(device)[0] == 9
            and _cuda_version() >= (12, 9))


def fp8_blockwise_reference(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor,
                            scale_b: torch.Tensor) -> torch.Tensor:
    """Float32 math of the blockwise GEMM: fp8 (rows, blocks, block) activations with (rows, blocks) scales times
    the fp8 (out, in) weight with (blocks, out) scales."""
    x = (xq.float() * sx[..., None]).flatten(1)
    w = (weight.float().view(weight.shape[0], -1, xq.shape[-1]) * scale_b.T[..., None]).flatten(1)
    return x @ w.T


class Fp8Linear(nn.Module):
    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None, dtype: torch.dtype, blockwise: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.weight.shape
        bo, self.block_in = weight.block
        self.blockwise = blockwise and self.block_in == FP8_SCALE_BLOCK
        assert self.in_features % self.block_in == 0 and self.out_features % 16 == 0, (weight.weight.shape, weight.block)
        self.register_buffer("weight", weight.weight, persistent=False)
        # (in blocks, out): row n's scale for input block j, contiguous rows for _scaled_mm's (1, out) scale_b
        scale_b = weight.scale_inv.repeat_interleave(bo, 0)[:self.out_features].T.contiguous()
        self.register_buffer("scale_b", scale_b, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_in={self.block_in}, "
                f"blockwise={self.blockwise}")

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, in) -> fp8 (rows, blocks, block_in) and float32 scales (rows, blocks)."""
        xb = x.float().view(x.shape[0], -1, self.block_in)
        scale = xb.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
        return (xb / scale[..., None]).to(torch.float8_e4m3fn), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        pad = -rows % 16  # fp8 GEMM operands need dimensions in multiples of 16
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        xq, sx = self.quantize_input(x2)
        if self.blockwise:
            # 1x128 scales on both sides, outer-dim-major: scale_a (rows, blocks) with strides (1, rows), scale_b
            # (blocks, out) row-major
            acc = torch._scaled_mm(xq.flatten(1), self.weight.t(), scale_a=sx.t().contiguous().t(),
                                   scale_b=self.scale_b, out_dtype=torch.bfloat16)
        else:
            acc = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            for j in range(self.scale_b.shape[0]):
                w = self.weight[:, j * self.block_in:(j + 1) * self.block_in]
                acc += torch._scaled_mm(xq[:, j], w.t(), scale_a=sx[:, j:j + 1].contiguous(),
                                        scale_b=self.scale_b[j:j + 1], out_dtype=torch.float32)
        y = acc[:rows].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def checkpoint_prefix(module_name: str) -> str:
    """Qwen3VL module name -> its checkpoint prefix (Qwen3VL.load_weights' naming)."""
    return module_name if module_name == "lm_head" else f"model.{module_name}"


def _bias(tensors: dict[str, torch.Tensor], key: str, out_features: int, source: str) -> torch.Tensor:
    if key not in tensors:
        raise WeightError(f"{source}: missing tensor '{key}' (expected shape {(out_features,)})")
    bias = tensors.pop(key)
    if tuple(bias.shape) != (out_features,) or not bias.is_floating_point():
        raise WeightError(f"{source}: tensor '{key}' has shape {tuple(bias.shape)} / dtype {bias.dtype}, expected a "
                          f"floating-point {(out_features,)}")
    return bias


def load_quantized_linears(model: nn.Module, tensors: dict[str, torch.Tensor], fmt: QuantFormat,
                           dtype: torch.dtype, device: torch.device, source: str) -> dict[str, torch.Tensor]:
    """Read every quantized Linear of `model` from `tensors`. On CUDA a layer becomes an Int4Linear / Fp8Linear in
    place (its tensors leave the returned dict); otherwise its dequantized float weight replaces them under
    `prefix.weight`, for the float loader. Returns the tensors the float loader still has to load."""
    out = dict(tensors)
    kinds = Counter()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        prefix = checkpoint_prefix(name)
        if not fmt.quantizes(prefix):
            continue
        weight = read_quantized_linear(out, fmt, prefix, module.out_features, module.in_features, source)
        for key in quantized_tensor_keys(fmt, prefix, out):
            del out[key]
        layer = None
        if device.type == "cuda" and isinstance(weight, Int4Weight):
            layer = Int4Linear
        elif (isinstance(weight, Fp8Weight) and fp8_gemm_supported(device)
              and module.in_features % weight.block[1] == 0 and module.out_features % 16 == 0):
            layer = Fp8Linear
        if layer is None:
            out[f"{prefix}.weight"] = weight.dequantize()
            kinds["dequantized"] += 1
            continue
        bias = _bias(out, f"{prefix}.bias", module.out_features, source) if module.bias is not None else None
        parent_name, _, attr = name.rpartition(".")
        built = (Fp8Linear(weight, bias, dtype, blockwise=fp8_blockwise_supported(device)) if layer is Fp8Linear
                 else layer(weight, bias, dtype))
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, built)
        kinds[layer.__name__] += 1
    if not kinds:
        raise WeightError(f"{source}: quantization_config ({fmt.method}) quantizes no Linear layer of the model")
    log.info("%s: %s weights: %s", source, fmt.method, ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return out


def loaded_weight_bytes(model_dir: Path, dtype: torch.dtype, tied: bool, device: torch.device) -> int:
    """Bytes the loaded weights will take on `device`, from config.json and the safetensors headers (no tensor is
    read): float tensors in `dtype`; quantized layers as the CUDA layers hold them (Int4Linear: the packed values
    plus scales and zeros in `dtype`; Fp8Linear: a byte per weight plus float32 scales per row and input block), or
    dequantized to `dtype` where they are dequantized at load."""
    fmt = read_quant_format(read_json(model_dir / "config.json"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    packed = device.type == "cuda" and (fmt is None or fmt.method != FP8 or fp8_gemm_supported(device))
    total = 0
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if tied and name == "lm_head.weight":  # a tied head is the embedding, not a copy
                        continue
                    part = f.get_slice(name)
                    n = math.prod(part.get_shape())
                    suffix = name.rpartition(".")[2]
                    float_tensor = suffix == "weight" and part.get_dtype() != "F8_E4M3"
                    if fmt is None or suffix not in fmt.tensor_names or float_tensor:
                        total += n * itemsize
                    elif suffix in ("qweight", "weight_packed"):
                        total += n * 4 if packed else n * 8 * itemsize
                    elif suffix == "weight":  # fp8
                        total += n if packed else n * itemsize
                    elif suffix == "weight_scale_inv" and packed:
                        total += n * fmt.block[0] * 4
                    elif suffix in ("scales", "qzeros") and packed:
                        total += n * itemsize * (8 if suffix == "qzeros" else 1)
                    elif suffix == "weight_scale" and packed:
                        total += 2 * n * itemsize  # scales and the constant zero point
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise WeightError(f"{path}: cannot read safetensors file: {e}") from e
    return total
