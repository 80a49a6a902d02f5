"""Quantized checkpoint formats: reading config.json's `quantization_config`, and unpacking each format's tensors.

  fp8:   Qwen's `*-FP8` releases (quant_method "fp8", weight_block_size [128, 128]). `x.weight` is float8_e4m3fn
         (out, in); `x.weight_scale_inv` (ceil(out / 128), ceil(in / 128)) multiplies each 128 x 128 block:
             w[o, i] = weight[o, i] * weight_scale_inv[o // 128, i // 128]
  awq:   AutoAWQ "gemm" (quant_method "awq", version "gemm", 4 bits, zero points). `x.qweight` int32 (in, out / 8)
         and `x.qzeros` int32 (in / group, out / 8) hold 8 nibbles per int32 in AWQ's interleaved order: nibble j
         (bits 4j..4j+3) of packed column c is output column 8c + AWQ_ORDER[j]. `x.scales` (in / group, out):
             w[o, i] = (q[i, o] - z[i // group, o]) * scales[i // group, o]
  pack-quantized: compressed-tensors (quant_method "compressed-tensors", format "pack-quantized"), symmetric int4.
         `x.weight_packed` int32 (out, in / 8), nibble j of packed column c is input column 8c + j, stored as
         q + 8 (q in [-8, 7]); `x.weight_scale` (out, in / group) (one column for strategy "channel");
         `x.weight_shape` = [out, in]:  w[o, i] = q[o, i] * weight_scale[o, i // group]

Which Linear layers are quantized comes from the config (everything but `modules_to_not_convert` / `ignore`); each
of them must carry its format's tensors with consistent shapes, else loading fails naming the tensor."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from runtime.config import ConfigReader
from runtime.errors import WeightError

FP8, AWQ, PACKED = "fp8", "awq", "pack-quantized"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble j holds column AWQ_ORDER[j] of its group of 8
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SOURCE = "config.json quantization_config"


@dataclass(frozen=True)
class QuantFormat:
    method: str  # FP8, AWQ or PACKED
    group_size: int  # int4: input channels per scale (0: one scale per output row); fp8: unused
    block: tuple[int, int]  # fp8 weight_block_size (out, in)
    ignore: tuple[str, ...]  # modules left in floating point: names, dotted name runs, or "re:<regex>"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors one quantized Linear stores besides its optional bias."""
        return {FP8: ("weight", "weight_scale_inv"), AWQ: ("qweight", "qzeros", "scales"),
                PACKED: ("weight_packed", "weight_scale", "weight_shape")}[self.method]

    def quantizes(self, name: str) -> bool:
        """Whether the Linear at checkpoint prefix `name` (e.g. model.visual.blocks.0.attn.qkv) is quantized."""
        parts = name.split(".")
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return False
                continue
            p = pattern.split(".")
            if any(parts[i:i + len(p)] == p for i in range(len(parts) - len(p) + 1)):
                return False
        return True


def _string_list(r: ConfigReader, key: str) -> tuple[str, ...]:
    value = r.data.get(key) or []
    r.check(isinstance(value, list) and all(isinstance(v, str) for v in value),
            f"field '{key}' must be a list of module names, got {value!r}")
    return tuple(value)


def _read_fp8(r: ConfigReader) -> QuantFormat:
    r.check(r.get("fmt", str, "e4m3") == "e4m3", f"fp8 fmt {r.data.get('fmt')!r} is not supported (only 'e4m3')")
    r.choice("activation_scheme", "dynamic", ("dynamic",), " (static activation scales are not supported)")
    block = r.int_list("weight_block_size", None) if r.data.get("weight_block_size") is not None else None
    r.check(block is not None and len(block) == 2 and min(block) > 0,
            f"fp8 without a 2-number weight_block_size (per-tensor fp8) is not supported, got {block!r}")
    return QuantFormat(FP8, 0, (block[0], block[1]), _string_list(r, "modules_to_not_convert"))


def _read_awq(r: ConfigReader) -> QuantFormat:
    r.check(r.get("version", str, "gemm").lower() == "gemm",
            f"awq version {r.data.get('version')!r} is not supported (only 'gemm' packing)")
    r.check(r.get("bits", int, 4) == 4, f"awq bits {r.data.get('bits')} is not supported (only 4)")
    r.check(r.get("zero_point", bool, True), "awq zero_point=false is not supported")
    group = r.get("group_size", int)
    r.check(group > 0 and group % 8 == 0, f"awq group_size {group} must be a positive multiple of 8")
    return QuantFormat(AWQ, group, (0, 0), _string_list(r, "modules_to_not_convert"))


def _read_compressed(r: ConfigReader) -> QuantFormat:
    fmt = r.get("format", str)
    r.check(fmt == PACKED, f"compressed-tensors format {fmt!r} is not supported (only '{PACKED}')")
    status = r.get("quantization_status", str, "compressed")
    r.check(status == "compressed", f"quantization_status {status!r}: only 'compressed' checkpoints load")
    groups = r.get("config_groups", dict)
    r.check(len(groups) >= 1, "config_groups is empty")
    schemes = set()
    for name, group in groups.items():
        g = ConfigReader(group, f"{SOURCE} config_groups.{name}")
        g.check(g.get("format", (str, type(None)), None) in (None, PACKED),
                f"format {g.data.get('format')!r} is not supported (only '{PACKED}')")
        g.check(g.get("targets", list) == ["Linear"], f"targets {g.data['targets']!r}: only ['Linear'] is supported")
        g.check(g.data.get("input_activations") is None and g.data.get("output_activations") is None,
                "activation quantization is not supported (weight-only schemes load)")
        w = g.table("weights")
        w.check(w.get("num_bits", int) == 4, f"num_bits {w.data['num_bits']} is not supported (only 4)")
        w.check(w.get("type", str, "int") == "int", f"type {w.data.get('type')!r} is not supported (only 'int')")
        w.check(w.get("symmetric", bool), "asymmetric (symmetric=false) int4 is not supported")
        w.check(not w.get("dynamic", bool, False), "dynamic weight quantization is not supported")
        w.check(w.data.get("actorder") in (None, "static"),
                f"actorder {w.data.get('actorder')!r} is not supported (needs g_idx; only null or 'static')")
        strategy = w.choice("strategy", "group", ("group", "channel"))
        size = w.get("group_size", int) if strategy == "group" else 0
        w.check(strategy == "channel" or (size > 0 and size % 8 == 0),
                f"group_size {size} must be a positive multiple of 8")
        schemes.add(size)
    r.check(len(schemes) == 1, f"config_groups use different group sizes {sorted(schemes)}; only one is supported")
    return QuantFormat(PACKED, schemes.pop(), (0, 0), _string_list(r, "ignore"))


READERS = {"fp8": _read_fp8, "awq": _read_awq, "compressed-tensors": _read_compressed}


def read_quant_format(cfg: dict) -> QuantFormat | None:
    """The format of config.json's `quantization_config`; None for a float checkpoint."""
    if cfg.get("quantization_config") is None:
        return None
    r = ConfigReader(cfg, "config.json").table("quantization_config")
    method = r.choice("quant_method", "", tuple(READERS))
    return READERS[method](r)


# ----------------------------------------------------------------------------------------------------------------
# Unpacking (torch references; the CUDA layers repack into kernels/int4_gemm.py's layout)
# ----------------------------------------------------------------------------------------------------------------


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 (rows, cols) -> uint8 (rows, cols * 8): nibble j of column c at column 8c + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed[:, :, None] >> shifts) & 0xF).to(torch.uint8).flatten(1)


AWQ_UNDO = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])  # column c sits in nibble AWQ_UNDO[c]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ qweight / qzeros int32 (rows, cols / 8) -> uint8 (rows, cols) in natural column order."""
    nibbles = unpack_nibbles(packed).view(packed.shape[0], -1, 8)
    return nibbles[:, :, AWQ_UNDO.to(packed.device)].flatten(1)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 (out, in) of a block-scaled fp8 weight."""
    out_features, in_features = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:out_features].repeat_interleave(block[1], 1)
    return weight.float() * scale[:, :in_features]


def dequantize_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (out, in) from q (in, out) in [0, 15] and per-group zeros / scales (in / group, out)."""
    z = zeros.float().repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((q.float() - z) * s).T.contiguous()  # a transposed view would take other matmul kernels


@dataclass(frozen=True)
class Int4Weight:
    """One int4 Linear in a format-independent form: q (in, out) in [0, 15], zeros and scales (in / group, out)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.q, self.zeros, self.scales, self.group_size)


@dataclass(frozen=True)
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn (out, in)
    scale_inv: torch.Tensor  # float32 (ceil(out / bo), ceil(in / bi))
    block: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_inv, self.block)


def _take(tensors: dict[str, torch.Tensor], key: str, source: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if key not in tensors:
        raise WeightError(f"{source}: missing tensor '{key}' (the quantization_config quantizes this layer)")
    t = tensors[key]
    if t.dtype not in dtypes:
        raise WeightError(f"{source}: tensor '{key}' has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    return t


def _expect(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise WeightError(f"{source}: tensor '{key}' {message}")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def read_quantized_linear(tensors: dict[str, torch.Tensor], fmt: QuantFormat, prefix: str, out_features: int,
                          in_features: int, source: str) -> Int4Weight | Fp8Weight:
    """The quantized weight of the Linear at checkpoint `prefix` (out_features x in_features), shapes checked."""
    key = f"{prefix}."
    if fmt.method == FP8:
        weight = _take(tensors, key + "weight", source, (torch.float8_e4m3fn,))
        _expect(tuple(weight.shape) == (out_features, in_features), source, key + "weight",
                f"has shape {tuple(weight.shape)}, expected {(out_features, in_features)}")
        scale = _take(tensors, key + "weight_scale_inv", source, FLOATS)
        bo, bi = fmt.block
        want = (-(-out_features // bo), -(-in_features // bi))
        _expect(tuple(scale.shape) == want, source, key + "weight_scale_inv",
                f"has shape {tuple(scale.shape)}, expected {want} ({fmt.block} blocks of a "
                f"{(out_features, in_features)} weight)")
        return Fp8Weight(weight, scale.float(), fmt.block)
    if fmt.method == AWQ:
        group = fmt.group_size
        _expect(in_features % group == 0 and out_features % 8 == 0, source, key + "qweight",
                f"cannot hold a {(out_features, in_features)} layer: in_features must be a multiple of the group size "
                f"{group} and out_features of 8")
        packed = _take(tensors, key + "qweight", source, (torch.int32,))
        zeros = _take(tensors, key + "qzeros", source, (torch.int32,))
        scales = _take(tensors, key + "scales", source, FLOATS)
        for name, t, want in (("qweight", packed, (in_features, out_features // 8)),
                              ("qzeros", zeros, (in_features // group, out_features // 8)),
                              ("scales", scales, (in_features // group, out_features))):
            _expect(tuple(t.shape) == want, source, key + name,
                    f"has shape {tuple(t.shape)}, expected {want} (group_size {group})")
        return Int4Weight(unpack_awq(packed), unpack_awq(zeros), scales, group)
    group = fmt.group_size or in_features  # strategy "channel": one group spanning the row
    _expect(in_features % group == 0 and in_features % 8 == 0, source, key + "weight_packed",
            f"cannot hold a {(out_features, in_features)} layer with group_size {group}")
    shape = _take(tensors, key + "weight_shape", source, (torch.int32, torch.int64))
    _expect(shape.tolist() == [out_features, in_features], source, key + "weight_shape",
            f"is {shape.tolist()}, expected {[out_features, in_features]}")
    packed = _take(tensors, key + "weight_packed", source, (torch.int32,))
    scales = _take(tensors, key + "weight_scale", source, FLOATS)
    for name, t, want in (("weight_packed", packed, (out_features, in_features // 8)),
                          ("weight_scale", scales, (out_features, in_features // group))):
        _expect(tuple(t.shape) == want, source, key + name,
                f"has shape {tuple(t.shape)}, expected {want} (group_size {fmt.group_size or 'channel'})")
    for name in ("weight_zero_point", "weight_g_idx"):
        _expect(key + name not in tensors, source, key + name, "is present: symmetric int4 without g_idx loads only")
    q = unpack_nibbles(packed).T.contiguous()  # stored as q + 8: that is q against a zero point of 8
    return Int4Weight(q, torch.full_like(scales.T, 8.0), scales.T.contiguous(), group)


def quantized_tensor_keys(fmt: QuantFormat, prefix: str, tensors: dict[str, torch.Tensor]) -> set[str]:
    return {f"{prefix}.{name}" for name in fmt.tensor_names if f"{prefix}.{name}" in tensors}
