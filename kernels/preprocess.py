"""Preprocessing: a decoded (H, W, 3) uint8 image -> resized, rescaled, normalized (3, h, w) slot of an NCHW batch.

Two orderings exist in Hugging Face image processors and both are reproduced exactly:
  * DINOv3 ("resize in float"): x * rescale_factor -> bilinear/bicubic resize WITH antialias on the float image
    (torch.nn.functional.interpolate(..., antialias=True)) -> (x - mean) / std.
  * ViT and other PIL-backed processors ("resize in uint8"): Pillow's antialiased resize of the uint8 image
    (integer fixed-point taps, each pass rounded to uint8) -> [center crop] -> x * rescale_factor -> normalize.

Both resizes are the same separable convolution (Pillow's precompute_coeffs is what torch's antialias path
copies): for each output index a window of input taps with triangle (bilinear) or a=-0.5 cubic weights whose
support widens by the downscale factor, renormalized to sum to 1; upscaling reduces to plain half-pixel
bilinear/bicubic. The host computes those taps once per (input size, output size) and the Triton kernel does the
weighted sums, the uint8 rounding when asked, normalization and the dtype store.

Layout: reference first (what the CPU runtime runs), then the Triton kernel, then dispatch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from PIL import Image

from kernels.launch import launch_device

BILINEAR = 2
BICUBIC = 3
_FILTER_SUPPORT = {BILINEAR: 1.0, BICUBIC: 2.0}
_INTERPOLATE_MODE = {BILINEAR: "bilinear", BICUBIC: "bicubic"}

# Pillow's 8-bit resampler: coefficients in 32-8-2 = 22-bit fixed point, sums rounded half up.
_PIL_PRECISION_BITS = 22
# Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much as the width;
# with uint8 rounding between passes the pass order changes results by one level, so we mirror it.
_PIL_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn one image into one model input (runtime/models/preprocessor.py reads it from a
    preprocessor_config.json)."""

    height: int  # model input size (the crop size when center-cropping)
    width: int
    resize_to: tuple[int, int] | None  # fixed (height, width) resize target, or None ...
    shortest_edge: int | None  # ... resize so the short side is this long, keeping the aspect ratio
    center_crop: bool  # take the centered (height, width) window of the resized image
    resample: int  # PIL code: 2 bilinear, 3 bicubic
    resize_in_float: bool  # True: DINOv3 order (float resize); False: PIL order (uint8 resize, then rescale)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # The float resize widens its filter when downscaling (torch antialias=True, DINOv3); False: plain bilinear
    # (torchvision's default, RF-DETR's processor). The uint8 path is Pillow's, which always antialiases.
    antialias: bool = True

    def resized_size(self, in_h: int, in_w: int) -> tuple[int, int]:
        """(height, width) after the resize step, before any crop (transformers' shortest-edge rule)."""
        if self.resize_to is not None:
            return self.resize_to
        short, long = (in_w, in_h) if in_w <= in_h else (in_h, in_w)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if in_w <= in_h else (self.shortest_edge, new_long)

    def crop_offsets(self, resized_h: int, resized_w: int) -> tuple[int, int]:
        """(top, left) of the output window inside the resized image."""
        if not self.center_crop:
            return 0, 0
        return (resized_h - self.height) // 2, (resized_w - self.width) // 2

    def affine(self) -> tuple[list[float], list[float]]:
        """Per-channel (scale, shift) with out = resized_0_255 * scale + shift: rescale and normalize fused."""
        rescale = self.rescale_factor if self.do_rescale else 1.0
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        return [rescale / s for s in std], [-m / s for m, s in zip(mean, std)]


def _check_args(image: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be a (H, W, 3) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    if tuple(out.shape) != (3, spec.height, spec.width):
        raise ValueError(f"out must have shape (3, {spec.height}, {spec.width}), got {tuple(out.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch; Pillow for the uint8 resize, which is its definition)
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _value_table(spec: PreprocessSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(3, 256): the output value of each uint8 level per channel, computed with the reference pipeline's own ops.

    Whenever normalization starts from uint8 levels (the uint8-resize path, or no resize at all) a table lookup
    is bit-identical to running rescale/normalize on the image, and several times faster on CPU.
    """
    levels = torch.arange(256, device=device)
    if not spec.do_rescale:
        values = levels.float()
    elif spec.resize_in_float:
        values = levels.float() * spec.rescale_factor  # torchvision: float32 image * factor
    else:
        values = (levels.double() * spec.rescale_factor).float()  # transformers np_rescale: float64, then float32
    values = values.expand(3, 256)
    if spec.do_normalize:
        mean = torch.tensor(spec.image_mean, dtype=torch.float32, device=device).view(3, 1)
        std = torch.tensor(spec.image_std, dtype=torch.float32, device=device).view(3, 1)
        values = (values - mean) / std
    return values.to(dtype).contiguous()


def _normalize_levels(pixels: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor) -> None:
    """out[c] = table[c][pixels[..., c]] for (h, w, 3) uint8 pixels."""
    table = _value_table(spec, out.dtype, out.device)
    index = pixels.permute(2, 0, 1).to(out.device, torch.int64, memory_format=torch.contiguous_format)
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    for c in range(3):
        torch.index_select(table[c], 0, index[c].view(-1), out=target[c].view(-1))
    if target is not out:
        out.copy_(target)


def preprocess_reference(image: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor) -> None:
    """Write the preprocessed `image` ((H, W, 3) uint8) into `out` ((3, h, w), any float dtype)."""
    _check_args(image, spec, out)
    in_h, in_w = image.shape[:2]
    resized_h, resized_w = spec.resized_size(in_h, in_w)
    top, left = spec.crop_offsets(resized_h, resized_w)
    rows, cols = slice(top, top + spec.height), slice(left, left + spec.width)
    # At equal sizes both resizes are exactly the identity (one tap of weight 1), so skip them.
    if (resized_h, resized_w) == (in_h, in_w):
        _normalize_levels(image[rows, cols], spec, out)
    elif spec.resize_in_float:
        x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32, memory_format=torch.contiguous_format)
        if spec.do_rescale:
            x.mul_(spec.rescale_factor)
        x = F.interpolate(x, size=(resized_h, resized_w), mode=_INTERPOLATE_MODE[spec.resample],
                          align_corners=False, antialias=spec.antialias)[0, :, rows, cols]
        if spec.do_normalize:
            x = (x - torch.tensor(spec.image_mean, device=x.device).view(3, 1, 1)) / torch.tensor(
                spec.image_std, device=x.device).view(3, 1, 1)
        out.copy_(x)
    else:
        # The uint8 path is defined by Pillow's fixed-point resampler; calling it is exact and fast on CPU.
        resized = Image.fromarray(image.cpu().numpy()).resize((resized_w, resized_h), resample=spec.resample)
        _normalize_levels(torch.from_numpy(np.array(resized))[rows, cols], spec, out)


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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


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
    _check_args(image, spec, out)
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


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def preprocess_into(batch: torch.Tensor, slot: int, image: torch.Tensor, spec: PreprocessSpec) -> None:
    """Preprocess `image` into batch[slot] of an NCHW buffer: Triton on CUDA, the torch reference on CPU."""
    assert 0 <= slot < batch.shape[0], (slot, batch.shape)
    out = batch[slot]
    if batch.is_cuda:
        preprocess_triton(image.to(batch.device, non_blocking=True), spec, out)
    else:
        preprocess_reference(image, spec, out)
