"""Qwen2-VL/Qwen3-VL image preprocessing: smart resize -> rescale/normalize -> patchify into vision-tower rows.

Matches transformers' PIL-backed Qwen2-VL image processor (the one Qwen3-VL checkpoints name):
  1. smart_resize picks (h, w), both multiples of patch_size * merge_size, keeping the aspect ratio and the pixel
     count within [min_pixels, max_pixels] (size.shortest_edge / size.longest_edge in the config);
  2. Pillow resizes the uint8 image (bicubic by default), then x * rescale_factor -> (x - mean) / std; this is the
     uint8-resize path of kernels/preprocess.py, reused as is;
  3. patchify: rows in spatial-merge-block order (block row, block col, row in block, col in block), each row the
     patch's (channel, time, y, x) values with the single frame repeated temporal_patch_size times.

Layout: spec, reference, dispatch; the Triton patchify kernel is in kernels/vlm_preprocess_triton.py, imported
only where it launches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.preprocess import PreprocessSpec, preprocess_reference


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of `factor`, near the input aspect ratio, with min_pixels <= h * w <= max_pixels.

    The float expressions keep transformers' exact order: e.g. 224x224 with min_pixels 65536 lands on 256, and
    a different association of the same math can round to 288."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio above 200 is not supported")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionPreprocessSpec:
    """Everything needed to turn one image into vision-tower rows (runtime/models/preprocessor.py reads it from a
    preprocessor_config.json)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    resample: int  # PIL code: 2 bilinear, 3 bicubic
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def row_size(self) -> int:
        """Values per vision-tower input row: channels x time x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        if not self.do_resize:
            if height % factor or width % factor:
                raise ValueError(f"image {height}x{width}: with do_resize=false both sides must be multiples of "
                                 f"patch_size * merge_size = {factor}")
            return height, width
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an input image of this size."""
        h, w = self.resized_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """Language-model placeholder tokens for an image of this size (patches / merge^2)."""
        _, gh, gw = self.grid(height, width)
        return gh * gw // self.merge_size ** 2

    def pixel_spec(self, height: int, width: int) -> PreprocessSpec:
        """kernels/preprocess.py's spec for the resize + normalize step of an image of this size."""
        h, w = self.resized_size(height, width)
        return PreprocessSpec(height=h, width=w, resize_to=(h, w), shortest_edge=None, center_crop=False,
                              resample=self.resample, resize_in_float=False, do_rescale=self.do_rescale,
                              rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
                              image_mean=self.image_mean, image_std=self.image_std)


def check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be a (H, W, 3) uint8 tensor, got {tuple(image.shape)} {image.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch)
# ----------------------------------------------------------------------------------------------------------------


def patchify_reference(pixels: torch.Tensor, spec: VisionPreprocessSpec) -> torch.Tensor:
    """(3, H, W) normalized image -> (patches, row_size) rows in merge-block order, the frame repeated over time."""
    c, h, w = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, ih, iw, c, y, x)
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
    return x.reshape(gh * gw, c * t * p * p)


def vision_input_reference(image: torch.Tensor, spec: VisionPreprocessSpec, dtype: torch.dtype = torch.float32
                           ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(rows, grid_thw) for a (H, W, 3) uint8 image, computed with the reference ops."""
    check_image(image)
    pixel_spec = spec.pixel_spec(image.shape[0], image.shape[1])
    pixels = torch.empty(3, pixel_spec.height, pixel_spec.width, dtype=torch.float32)
    preprocess_reference(image.cpu(), pixel_spec, pixels)
    return patchify_reference(pixels, spec).to(dtype), spec.grid(image.shape[0], image.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def vision_input(image: np.ndarray | torch.Tensor, spec: VisionPreprocessSpec, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Vision-tower rows (patches, row_size) in `dtype` on `device` and the (t, h, w) grid of one RGB uint8
    image: the Triton kernels on CUDA, the torch reference on CPU."""
    image = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if torch.device(device).type == "cuda":
        from kernels.vlm_preprocess_triton import vision_input_triton
        return vision_input_triton(image, spec, dtype, torch.device(device))
    rows, grid = vision_input_reference(image, spec, dtype)
    return rows.to(device), grid
