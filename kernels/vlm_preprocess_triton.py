"""The Triton kernel of kernels/vlm_preprocess.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.preprocess_triton import preprocess_triton
from kernels.vlm_preprocess import VisionPreprocessSpec, check_image


# Per-image sizes: specialising them would compile new variants on the request path.
@triton.jit(do_not_specialize=["height", "width", "blocks_w"])
def patchify_kernel(
    pixels_ptr, out_ptr,  # (3, H, W) contiguous; (grid_h * grid_w, 3 * T * P * P) contiguous
    height, width, blocks_w,  # image size in pixels; merge blocks per grid row
    P: tl.constexpr, M: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr,
):
    patch = tl.program_id(0)
    # Patch index -> (block row, block col, row in block, col in block) -> patch row / col in the grid.
    in_col = patch % M
    in_row = (patch // M) % M
    block = patch // (M * M)
    grid_y = (block // blocks_w) * M + in_row
    grid_x = (block % blocks_w) * M + in_col
    offs = tl.arange(0, BLOCK)  # one frame's (channel, y, x) values of the patch
    mask = offs < 3 * P * P
    ch = offs // (P * P)
    y = (offs // P) % P
    x = offs % P
    src = ch * (height * width) + (grid_y * P + y) * width + grid_x * P + x
    value = tl.load(pixels_ptr + src, mask=mask, other=0.0)
    row = out_ptr + patch * (3 * T * P * P)
    dst = ch * (T * P * P) + y * P + x
    for t in tl.static_range(T):
        tl.store(row + dst + t * (P * P), value.to(out_ptr.dtype.element_ty), mask=mask)


def patchify_triton(pixels: torch.Tensor, spec: VisionPreprocessSpec, out: torch.Tensor) -> None:
    """Same result as patchify_reference, written into `out` (patches, row_size) by the Triton kernel."""
    c, h, w = pixels.shape
    p, m = spec.patch_size, spec.merge_size
    assert c == 3 and h % (p * m) == 0 and w % (p * m) == 0, (tuple(pixels.shape), p, m)
    num_patches = (h // p) * (w // p)
    assert tuple(out.shape) == (num_patches, spec.row_size) and out.is_contiguous(), tuple(out.shape)
    assert pixels.is_contiguous() and pixels.device == out.device
    assert pixels.numel() < 2**31, "int32 pixel offsets"
    block = triton.next_power_of_2(3 * p * p)
    with launch_device(out.device):
        patchify_kernel[(num_patches,)](pixels, out, h, w, w // (p * m), P=p, M=m, T=spec.temporal_patch_size,
                                        BLOCK=block)


def vision_input_triton(image: torch.Tensor, spec: VisionPreprocessSpec, dtype: torch.dtype, device: torch.device
                        ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(rows, grid_thw) computed by the two Triton kernels (resize + normalize, then patchify) on `device`."""
    check_image(image)
    pixel_spec = spec.pixel_spec(image.shape[0], image.shape[1])
    pixels = torch.empty(3, pixel_spec.height, pixel_spec.width, dtype=torch.float32, device=device)
    preprocess_triton(image.to(device), pixel_spec, pixels)
    grid = spec.grid(image.shape[0], image.shape[1])
    out = torch.empty(grid[1] * grid[2], spec.row_size, dtype=dtype, device=device)
    patchify_triton(pixels, spec, out)
    return out, grid
