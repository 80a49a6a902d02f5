"""The Triton kernel of kernels/preprocess.py and the resampling taps it reads; imported only where it launches
(CUDA tensors, or the interpreter in tests), so a CPU install runs without triton."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.preprocess import BICUBIC, BILINEAR, PreprocessSpec, check_args

_FILTER_SUPPORT = {BILINEAR: 1.0, BICUBIC: 2.0}

# Pillow's 8-bit resampler: coefficients in 32-8-2 = 22-bit fixed point, sums rounded half up.
_PIL_PRECISION_BITS = 22
# Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much as the width;
# with uint8 rounding between passes the pass order changes results by one level, so we mirror it.
_PIL_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13


# ----------------------------------------------------------------------------------------------------------------
# Resampling taps (host side, mirrors Pillow's precompute_coeffs / normalize_coeffs_8bpc)
# ----------------------------------------------------------------------------------------------------------------


def _filter(x: np.ndarray, resample: int) -> np.ndarray:
    ax = np.abs(x)
    if resample == BILINEAR:
        return np.maximum(1.0 - ax, 0.0)
    a = -0.5  # Pillow's and torch-antialias's cubic
    return np.where(ax < 1.0, ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0,
                    np.where(ax < 2.0, (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a, 0.0))


@functools.lru_cache(maxsize=256)
def _taps(in_size: int, out_size: int, resample: int, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """First input index (out_size,) and normalized float64 weights (out_size, taps); unused taps weigh 0.
    Without antialias the bilinear filter stays one input pixel wide; renormalizing the taps a border cuts is then
    what clamping the source coordinate gives (torch's antialias=False)."""
    scale = in_size / out_size
    # Downscaling widens the filter (antialias); upscaling keeps it at one input pixel.
    filter_scale = max(scale, 1.0) if antialias else 1.0
    support = _FILTER_SUPPORT[resample] * filter_scale
    num_taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C casts truncate toward zero; the max/min clamp the window into the image.
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    k = np.arange(num_taps)
    weights = _filter((k + first[:, None] - center[:, None] + 0.5) * (1.0 / filter_scale), resample)
    weights = np.where(k < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for j in range(num_taps):  # sequential sum, in Pillow's order, so the fixed-point rounding matches bit for bit
        total = total + weights[:, j]
    weights = weights / np.where(total == 0.0, 1.0, total)[:, None]
    return first, weights


def _fixed_point(weights: np.ndarray) -> np.ndarray:
    scaled = weights * (1 << _PIL_PRECISION_BITS)
    return np.where(weights < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)


@dataclass(frozen=True)
class AxisTaps:
    """One axis of a resize on the device: output i reads inputs first[i] .. first[i] + taps - 1 (zero weights past
    its window), all within the input span [lo, hi)."""

    first: torch.Tensor  # (out,) int32
    weight: torch.Tensor  # (out, taps) float32, or int32 in Pillow's fixed point
    lo: int
    hi: int

    @property
    def taps(self) -> int:
        return self.weight.shape[1]


@functools.lru_cache(maxsize=64)
def _device_taps(in_size: int, resized: int, offset: int, out_size: int, resample: int, fixed: bool,
                 device: torch.device, antialias: bool = True) -> AxisTaps:
    """Taps for the `out_size` outputs starting at `offset` of a resize in_size -> resized, on `device`."""
    first, weights = _taps(in_size, resized, resample, antialias)
    first, weights = first[offset:offset + out_size], weights[offset:offset + out_size]
    weights = _fixed_point(weights) if fixed else weights.astype(np.float32)
    lo, hi = int(first[0]), min(int(first[-1]) + weights.shape[1], in_size)  # first[] never decreases
    return AxisTaps(torch.from_numpy(first.astype(np.int32)).to(device),
                    torch.from_numpy(np.ascontiguousarray(weights)).to(device), lo, hi)


# Image sizes, tap counts and offsets change from image to image: specialising them on divisibility by 16 would
# compile a new variant on the request path for every new size class.
@triton.jit(do_not_specialize=["src_h", "src_w", "dst_h", "dst_w", "taps", "first_off", "cross_off"])
def resample_kernel(
    src_ptr, dst_ptr,  # src: (src_h, src_w, 3) uint8 or float32; dst: (dst_h, dst_w, 3) or, FINAL, (3, dst_h, dst_w)
    first_ptr, weight_ptr,  # int32 (dst rows or cols,), weights (same, taps) float32 or int32 fixed point
    src_h, src_w, dst_h, dst_w, taps,
    first_off,  # src index of first[] = 0 along the resampled axis (src may start inside the image)
    cross_off,  # src index of dst index 0 along the other axis
    scale0, scale1, scale2, shift0, shift1, shift2,  # FINAL: out = value_0_255 * scale + shift, per channel
    VERTICAL: tl.constexpr,  # resample rows (else columns)
    ROUND_UINT8: tl.constexpr,  # Pillow fixed point: the sum rounded and clamped to uint8
    FINAL: tl.constexpr,  # second pass: normalize and store planar; else store the HWC intermediate
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tiles are (channel, dst row, dst col, tap); the 3 channels are padded to a power of two.
    oy = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = oy < dst_h
    col_ok = ox < dst_w
    ch = tl.arange(0, 4)[:, None, None, None]
    k = tl.arange(0, BLOCK_K)[None, None, None, :]
    if VERTICAL:
        first = (tl.load(first_ptr + oy, mask=row_ok, other=0) - first_off)[None, :, None, None]
        col = tl.minimum(ox + cross_off, src_w - 1)[None, None, :, None]
    else:
        first = (tl.load(first_ptr + ox, mask=col_ok, other=0) - first_off)[None, None, :, None]
        row = tl.minimum(oy + cross_off, src_h - 1)[None, :, None, None]
    if ROUND_UINT8:
        acc = tl.zeros((4, BLOCK_H, BLOCK_W), dtype=tl.int32)
    else:
        acc = tl.zeros((4, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for k0 in range(0, taps, BLOCK_K):
        # Taps past a window weigh 0 (masked loads give 0); clamping keeps their pixel loads inside the image.
        tap = k0 + k
        if VERTICAL:
            w_ok = row_ok[None, :, None, None] & (tap < taps)
            w = tl.load(weight_ptr + oy[None, :, None, None] * taps + tap, mask=w_ok, other=0)
            row = tl.minimum(first + tap, src_h - 1)
        else:
            w_ok = col_ok[None, None, :, None] & (tap < taps)
            w = tl.load(weight_ptr + ox[None, None, :, None] * taps + tap, mask=w_ok, other=0)
            col = tl.minimum(first + tap, src_w - 1)
        pix = tl.load(src_ptr + (row * src_w + col) * 3 + ch, mask=ch < 3, other=0)
        if ROUND_UINT8:
            acc += tl.sum(w * pix.to(tl.int32), axis=3)
        else:
            acc += tl.sum(w * pix.to(tl.float32), axis=3)
    if ROUND_UINT8:  # Pillow's clip8: add half, shift out the fraction, clamp to a byte
        value = tl.minimum(tl.maximum((acc + (1 << 21)) >> 22, 0), 255)
    else:
        value = acc
    c = tl.arange(0, 4)[:, None, None]
    mask = (c < 3) & row_ok[None, :, None] & col_ok[None, None, :]
    if FINAL:
        scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, scale2))
        shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, shift2))
        result = value.to(tl.float32) * scale + shift
        out_offs = c * (dst_h * dst_w) + oy[None, :, None] * dst_w + ox[None, None, :]
        tl.store(dst_ptr + out_offs, result.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        out_offs = (oy[None, :, None] * dst_w + ox[None, None, :]) * 3 + c
        tl.store(dst_ptr + out_offs, value.to(dst_ptr.dtype.element_ty), mask=mask)


def preprocess_triton(image: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor) -> None:
    """Same contract as preprocess_reference, computed by the Triton kernel in two separable passes (image and out
    on one device): the first resamples one axis into an intermediate image (uint8, rounded as Pillow rounds
    between its passes, or float32), the second resamples the other axis, normalizes and stores."""
    check_args(image, spec, out)
    assert image.device == out.device, (image.device, out.device)
    assert out.is_contiguous(), "out must be a contiguous (3, h, w) slot"
    image = image.contiguous()
    in_h, in_w = image.shape[:2]
    assert in_h * in_w * 3 < 2**31, "int32 pixel offsets"
    resized_h, resized_w = spec.resized_size(in_h, in_w)
    top, left = spec.crop_offsets(resized_h, resized_w)
    fixed = not spec.resize_in_float
    ys = _device_taps(in_h, resized_h, top, spec.height, spec.resample, fixed, out.device, spec.antialias)
    xs = _device_taps(in_w, resized_w, left, spec.width, spec.resample, fixed, out.device, spec.antialias)
    vertical_first = (fixed and _PIL_ORDERS_PASSES and in_h - resized_h > 0
                      and in_h - resized_h > 2 * (in_w - resized_w))
    scale, shift = spec.affine()
    # GPU: tiles sized for registers. Interpreter (CPU tensors, tests): few big tiles, since it pays per op.
    block_h, block_w, block_k = (8, 32, 8) if image.is_cuda else (32, 32, 16)
    mid_dtype = torch.uint8 if fixed else torch.float32
    # The first pass covers only the input rows (cols) the second pass reads: a center crop skips the rest.
    # (src, dst, taps, resample rows?, first_off, cross_off) of each pass
    if vertical_first:
        mid = torch.empty(spec.height, xs.hi - xs.lo, 3, dtype=mid_dtype, device=out.device)
        passes = ((image, mid, ys, True, 0, xs.lo), (mid, out, xs, False, xs.lo, 0))
    else:
        mid = torch.empty(ys.hi - ys.lo, spec.width, 3, dtype=mid_dtype, device=out.device)
        passes = ((image, mid, xs, False, 0, ys.lo), (mid, out, ys, True, ys.lo, 0))
    with launch_device(out.device):
        for final, (src, dst, axis, vertical, first_off, cross_off) in zip((False, True), passes):
            dst_h, dst_w = (spec.height, spec.width) if final else mid.shape[:2]
            grid = (triton.cdiv(dst_h, block_h), triton.cdiv(dst_w, block_w))
            resample_kernel[grid](
                src, dst, axis.first, axis.weight, src.shape[0], src.shape[1], dst_h, dst_w, axis.taps,
                first_off, cross_off, *scale, *shift,
                VERTICAL=vertical, ROUND_UINT8=fixed, FINAL=final, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_K=block_k)
