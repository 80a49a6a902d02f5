"""int8 dynamic quantization of a loaded model's nn.Linear layers, in place, on one of three kernels.

Weights: per-output-channel symmetric int8, quantized once at load (scale = max|w_row| / 127).

  int8         torch._int_mm (int8 x int8 -> int32; AVX-512 VNNI / AMX on x86, tensor cores on CUDA). Activations
               per-token symmetric int8 (scale = max|x_row| / 127): an outlier token costs precision only in its
               own row. Dequantized in float32, then cast to the activation dtype:
                   y[m, n] = float32(acc[m, n]) * x_scale[m] * w_scale[n] + bias[n]
               (an int32 sum over K = 3072 exceeds fp16's 65504, so scaling after an fp16 cast gives inf).
               Where torch._int_mm refuses the shape (CUDA: M <= 16, K or N not a multiple of 8) the layer
               multiplies the activations with the dequantized int8 weight instead.
  int8-fbgemm  torch's quantized dynamic linear (quantized::linear_dynamic) on weights packed by fbgemm: AVX2 and
               AVX-512 kernels with the dequantization fused. Activations: dynamic per-tensor uint8.
  int8-onednn  the same op on weights packed by oneDNN (AVX-512 VNNI / AMX kernels).
  Both take a 7-bit activation range (reduce_range, about twice the error) on CPUs without VNNI: there the u8 x s8
  pair sums (vpmaddubsw) saturate int16 with the full 8 bits (measured on an AVX2 EPYC at 64 x 768 x 3072: 12 %
  off the float layer with 8 bits, 1.9 % with 7, for either engine).
The fbgemm/onednn kernels run on CPU in float32: other activation dtypes are cast around them.
"""
from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.options import INT8_BACKENDS

log = logging.getLogger(__name__)

QMAX = 127  # symmetric: -127..127, so negating a value never overflows
PACKED_ENGINES = {"int8-fbgemm": "fbgemm", "int8-onednn": "onednn"}  # torch.backends.quantized.engine names


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether torch._int_mm takes an (m, k) x (k, n) product on `device`.

    CPU accepts every shape (checked against int32 matmul in tests). CUDA's cuBLASLt int8 path needs
    m > 16 and k, n multiples of 8."""
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return device.type == "cpu"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row [rows, 1]) with x ~= values * scale, symmetric per row.

    The multiplier is rounded to x's dtype before use and the scale is its exact reciprocal, so a bf16
    activation never meets a float32 operand (mixed-dtype elementwise ops are several times slower on CPU).
    The multiplier is rounded down, so max|x| * multiplier <= 127 exactly; as 127 is representable in every
    float dtype and rounding is monotone, |x * multiplier| rounds to at most 127 and needs no clamp."""
    if x.dtype == torch.float16:
        x = x.float()  # fp16 cannot hold 127 / max|x| of a row of small values (> 65504)
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True)).float().clamp_(min=1e-30)
    multiplier = (QMAX / amax).to(x.dtype)
    rounded_up = multiplier.float() * amax > QMAX
    multiplier = torch.where(rounded_up, torch.nextafter(multiplier, torch.zeros_like(multiplier)), multiplier)
    values = (x * multiplier).round_().to(torch.int8)
    return values, multiplier.float().reciprocal()


@functools.cache
def cpu_has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI: u8 x s8 products accumulate straight into int32 (no int16 saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def backend_available(backend: str) -> bool:
    """Whether this torch build has the backend's kernels (fbgemm and onednn are x86/CPU builds' engines)."""
    assert backend in INT8_BACKENDS, backend
    return backend == "int8" or PACKED_ENGINES[backend] in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """A drop-in nn.Linear replacement computing with int8 weights and per-token int8 activations (torch._int_mm)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(weight.float())
        self.register_buffer("weight_int8", q)  # [out, in], row-major: its transpose is the (k, n) operand
        self.register_buffer("weight_scale", scale.view(-1).to(weight.dtype))  # [out]
        bias = linear.bias.detach().to(weight.dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.in_features, (tuple(x.shape), self.in_features)
        rows = x.numel() // self.in_features
        if int_mm_supported(rows, self.in_features, self.out_features, x.device):
            return self.forward_int8(x)
        return self.forward_dequantized(x)

    def forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        values, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        acc = torch._int_mm(values, self.weight_int8.t())
        out = acc.float().mul_(x_scale).mul_(self.weight_scale.float())  # float32: acc can exceed fp16's range
        if self.bias is not None:
            out.add_(self.bias.float())
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """Float activations times the dequantized int8 weight: for shapes torch._int_mm refuses."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


class PackedInt8Linear(nn.Module):
    """A drop-in nn.Linear replacement on fbgemm's or oneDNN's packed int8 weights (CPU only): dynamic per-tensor
    uint8 activations, int32 accumulation and float32 dequantization inside quantized::linear_dynamic."""

    def __init__(self, linear: nn.Linear, backend: str):
        super().__init__()
        assert backend in PACKED_ENGINES, backend
        assert linear.weight.device.type == "cpu", f"{backend} runs on CPU, the weight is on {linear.weight.device}"
        self.in_features, self.out_features, self.backend = linear.in_features, linear.out_features, backend
        values, scale = quantize_rows(linear.weight.detach().float())
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; prepack still takes one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(
                values, scale.view(-1).double(), torch.zeros(self.out_features, dtype=torch.long), 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = PACKED_ENGINES[backend]  # prepack picks the kernel family; it is kept
        try:
            self.packed = torch.ops.quantized.linear_prepack(weight, bias)
        finally:
            torch.backends.quantized.engine = engine
        self.reduce_range = not cpu_has_vnni()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.in_features, (tuple(x.shape), self.in_features)
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.quantized.linear_dynamic(rows.float(), self.packed, self.reduce_range)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, exclude: tuple[str, ...] = ("classifier",), backend: str = "int8") -> list[str]:
    """Replace every nn.Linear of `model` by an int8 layer of `backend` (INT8_BACKENDS), in place; returns the
    replaced modules' names.

    Modules whose qualified name starts with an entry of `exclude` stay in floating point: by default the
    classification head, which is tiny (no speed to gain) and feeds the probability directly."""
    assert backend in INT8_BACKENDS, f"int8 backend {backend!r} is not one of {INT8_BACKENDS}"
    if not backend_available(backend):
        raise RuntimeError(f"{backend}: torch's quantized engine {PACKED_ENGINES[backend]!r} is not in this build "
                           f"({', '.join(torch.backends.quantized.supported_engines)})")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.startswith(exclude)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(linear) if backend == "int8" else PackedInt8Linear(linear, backend))
    log.info("%s: quantized %d linear layers (kept in floating point: %s)", backend, len(targets),
             ", ".join(exclude))
    return [name for name, _ in targets]
