"""Weight-only int4 GEMM: y = x @ W^T with W dequantized from 4-bit values in the kernel, never in memory.

Weight layout (the one both AWQ and compressed-tensors checkpoints are repacked into at load):
  qweight (in / 8, out) int32: nibble j (bits 4j..4j+3) of row r, column n is q[8r + j, n] in [0, 15]
  scales, zeros (in / group, out) float: w[n, k] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]
Packing along the input dimension makes one program's K-slice of the weight a dense (BLOCK_K / 8, BLOCK_N) tile.
Layout: pack, reference, dispatch; the Triton kernel is in kernels/int4_gemm_triton.py, imported only where
it launches."""
from __future__ import annotations

import torch


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """uint8 (in, out) in [0, 15] -> int32 (in / 8, out) packed along the input dimension."""
    k, n = q.shape
    assert k % 8 == 0, f"in_features {k} is not a multiple of 8"
    nib = q.to(torch.int64).view(k // 8, 8, n)
    word = (nib << torch.arange(0, 32, 4, device=q.device)[None, :, None]).sum(1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4_k(qweight: torch.Tensor) -> torch.Tensor:
    """int32 (in / 8, out) -> uint8 (in, out)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).to(torch.uint8).flatten(0, 1)


def check_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
    k = x.shape[-1]
    assert qweight.dtype == torch.int32 and qweight.shape[0] * 8 == k, (tuple(x.shape), tuple(qweight.shape))
    assert k % group == 0 and scales.shape == zeros.shape == (k // group, qweight.shape[1]), (
        k, group, tuple(scales.shape), tuple(zeros.shape))


def int4_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group: int) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, with a float32 product."""
    check_args(x, qweight, scales, zeros, group)
    q = unpack_int4_k(qweight).float()
    w = (q - zeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return (x.float() @ w).to(x.dtype)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int) -> torch.Tensor:
    """The Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        from kernels.int4_gemm_triton import int4_gemm_triton
        return int4_gemm_triton(x, qweight, scales, zeros, group)
    return int4_gemm_reference(x, qweight, scales, zeros, group)
