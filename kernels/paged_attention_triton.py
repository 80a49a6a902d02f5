"""The Triton kernel of kernels/paged_attention.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.paged_attention import decode_tile_tokens


# Eager decode steps size the block table to their longest sequence: its stride must not pick kernel variants.
@triton.jit(do_not_specialize=["block_table_stride"])
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr,
    scale, q_stride_seq, q_stride_head, out_stride_seq, out_stride_head, block_table_stride,
    cache_stride_block, cache_stride_token, cache_stride_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, TOKENS: tl.constexpr,  # a page is read in tiles of TOKENS tokens (keeps registers bounded)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    t = tl.arange(0, TOKENS)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), dtype=tl.float32)
    num_pages = tl.cdiv(context, PAGE)  # 0 for padded rows: the loop is skipped and the output is zero
    for page in range(0, num_pages):
        block = tl.load(block_tables_ptr + seq * block_table_stride + page).to(tl.int64)
        for first in range(0, PAGE, TOKENS):  # a loop, not unrolled: unrolled tiles share registers again
            tok = first + t
            tok_ok = page * PAGE + tok < context
            offs = (block * cache_stride_block + tok[:, None] * cache_stride_token + kv_head * cache_stride_head
                    + d[None, :])
            kv_mask = tok_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            # (GROUP_PAD, TOKENS) scores as a broadcast product: exact fp32, and no minimum tile size for the group.
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
            scores = tl.where(tok_ok[None, :], scores, float("-inf"))
            # The first tile holds token 0, so m_i is finite from then on, and so is m_new (a tile past the
            # context has only -inf scores: p = 0 and alpha = 1).
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + seq * out_stride_seq + heads[:, None] * out_stride_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                        tile_tokens: int | None = None) -> torch.Tensor:
    """Same contract as paged_decode_reference, computed by the Triton kernel. tile_tokens: tokens per tile (a power
    of two <= block_size), or None for decode_tile_tokens' choice."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0, (tuple(q.shape), tuple(k_cache.shape))
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert block_size == triton.next_power_of_2(block_size), f"block_size {block_size} must be a power of two"
    assert block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,)
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    with launch_device(q.device):
        paged_decode_kernel[(num_seqs, num_kv_heads)](
            q, k_cache, v_cache, out, block_tables, context_lens,
            scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=dim_pad, PAGE=block_size,
            TOKENS=tile_tokens or decode_tile_tokens(group_pad, dim_pad, block_size, q.is_cuda),
        )
    return out
