"""Weight-only int4 GEMM: y = x @ W^T with W dequantized from 4-bit values in the kernel, never in memory.

Weight layout (the one both AWQ and compressed-tensors checkpoints are repacked into at load):
  qweight (in / 8, out) int32: nibble j (bits 4j..4j+3) of row r, column n is q[8r + j, n] in [0, 15]
  scales, zeros (in / group, out) float: w[n, k] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]
Packing along the input dimension makes one program's K-slice of the weight a dense (BLOCK_K / 8, BLOCK_N) tile.
Layout: pack, reference, Triton kernel, dispatch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
    k = x.shape[-1]
    assert qweight.dtype == torch.int32 and qweight.shape[0] * 8 == k, (tuple(x.shape), tuple(qweight.shape))
    assert k % group == 0 and scales.shape == zeros.shape == (k // group, qweight.shape[1]), (
        k, group, tuple(scales.shape), tuple(zeros.shape))


def int4_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group: int) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, with a float32 product."""
    _check(x, qweight, scales, zeros, group)
    q = unpack_int4_k(qweight).float()
    w = (q - zeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return (x.float() @ w).to(x.dtype)


@triton.jit
def int4_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, x_stride, out_stride,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        # Each int32 row serves 8 consecutive k: the repeated loads hit the same cache lines.
        packed = tl.load(qweight_ptr + (rk // 8)[:, None].to(tl.int64) * N + rn[None, :], mask=w_mask, other=0)
        q = (packed >> ((rk % 8) * 4)[:, None]) & 0xF
        g = (rk // GROUP)[:, None].to(tl.int64) * N + rn[None, :]
        s = tl.load(scales_ptr + g, mask=w_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g, mask=w_mask, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(out_ptr + rm[:, None].to(tl.int64) * out_stride + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int4_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group: int) -> torch.Tensor:
    _check(x, qweight, scales, zeros, group)
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    k, n = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64  # tl.dot needs >= 16 rows; decode batches are small
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
        int4_gemm_kernel[grid](x2, qweight, scales, zeros, out, m, n, k, x2.stride(0), out.stride(0),
                               GROUP=group, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32)
    return out.view(*x.shape[:-1], n)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int) -> torch.Tensor:
    """The Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        return int4_gemm_triton(x, qweight, scales, zeros, group)
    return int4_gemm_reference(x, qweight, scales, zeros, group)
