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

Layout: reference first (what the CPU runtime runs), then dispatch; the Triton kernel is in
kernels/preprocess_triton.py, imported only where it launches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


BILINEAR = 2
BICUBIC = 3
_INTERPOLATE_MODE = {BILINEAR: "bilinear", BICUBIC: "bicubic"}


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


def check_args(image: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor) -> None:
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
    check_args(image, spec, out)
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
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def preprocess_into(batch: torch.Tensor, slot: int, image: torch.Tensor, spec: PreprocessSpec) -> None:
    """Preprocess `image` into batch[slot] of an NCHW buffer: Triton on CUDA, the torch reference on CPU."""
    assert 0 <= slot < batch.shape[0], (slot, batch.shape)
    out = batch[slot]
    if batch.is_cuda:
        from kernels.preprocess_triton import preprocess_triton
        preprocess_triton(image.to(batch.device, non_blocking=True), spec, out)
    else:
        preprocess_reference(image, spec, out)
