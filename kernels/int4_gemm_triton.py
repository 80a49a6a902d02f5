"""The Triton kernel of kernels/int4_gemm.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.int4_gemm import check_args
from kernels.launch import launch_device


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
    check_args(x, qweight, scales, zeros, group)
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
        with launch_device(x.device):
            int4_gemm_kernel[grid](x2, qweight, scales, zeros, out, m, n, k, x2.stride(0), out.stride(0),
                                   GROUP=group, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32)
    return out.view(*x.shape[:-1], n)
