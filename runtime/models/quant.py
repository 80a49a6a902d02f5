"""int8 dynamic quantization of a loaded model's nn.Linear layers, in place.

Weights: per-output-channel symmetric int8, quantized once at load (scale = max|w_row| / 127).
Activations: per-token symmetric int8, quantized at run time (scale = max|x_row| / 127), so one outlier token
costs precision only in its own row. The product runs on integer units (torch._int_mm: int8 x int8 -> int32,
AVX-512 VNNI / AMX on x86, tensor cores on CUDA) and is dequantized with the outer product of the two scales:
    y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] + bias[n]
Where torch._int_mm does not accept the shape (CUDA: M <= 16, K or N not a multiple of 8) the layer multiplies
in the activation dtype with the dequantized int8 weight instead, so results stay int8-weight results.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QMAX = 127  # symmetric: -127..127, so negating a value never overflows


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


class Int8Linear(nn.Module):
    """A drop-in nn.Linear replacement computing with int8 weights and per-token int8 activations."""

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
        out = acc.to(x.dtype).mul_(x_scale.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
        if self.bias is not None:
            out.add_(self.bias.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """Float activations times the dequantized int8 weight: for shapes torch._int_mm refuses."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def quantize_int8(model: nn.Module, exclude: tuple[str, ...] = ("classifier",)) -> list[str]:
    """Replace every nn.Linear of `model` by an Int8Linear, in place; returns the replaced modules' names.

    Modules whose qualified name starts with an entry of `exclude` stay in floating point: by default the
    classification head, which is tiny (no speed to gain) and feeds the probability directly."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.startswith(exclude)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(linear))
    log.info("int8: quantized %d linear layers (kept in floating point: %s)", len(targets), ", ".join(exclude))
    return [name for name, _ in targets]
