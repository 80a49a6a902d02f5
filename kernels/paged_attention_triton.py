"""The Triton kernel of kernels/paged_attention.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton.

The decode kernel is built from @triton.jit parts that kernels/kv_int8_triton.py's int8 decode kernel shares: the
prologue (program ids -> sequence, kv head, the group's queries), the block-table walk of one tile, the online-softmax
step over a tile and the epilogue. A page is read in tiles of TOKENS tokens, so the (GROUP_PAD, TOKENS, DIM_PAD)
broadcast products of a tile stay within a register budget (kernels/paged_attention.py's decode_tile_tokens)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.paged_attention import decode_tile_tokens


@triton.jit
def decode_prologue(q_ptr, context_lens_ptr, q_stride_seq, q_stride_head, GROUP: tl.constexpr,
                    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """One program per (sequence, kv head): the sequence, the kv head, its context length, the query heads of the kv
    head's group, the mask of real (head, dim) pairs and the group's (GROUP_PAD, DIM_PAD) queries in fp32."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g
    head_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + d[None, :], mask=head_mask,
                other=0.0).to(tl.float32)
    return seq, kv_head, context, heads, head_mask, q


@triton.jit
def decode_tile(block, page, first, context, kv_head, cache_stride_block, cache_stride_token, cache_stride_head,
                HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PAGE: tl.constexpr, TOKENS: tl.constexpr):
    """Tokens first .. first + TOKENS - 1 of page `page` (cache block `block`, int64): the cache offsets of their
    (TOKENS, DIM_PAD) keys/values, which of them are inside the context, and the load mask."""
    tok = first + tl.arange(0, TOKENS)
    d = tl.arange(0, DIM_PAD)
    tok_ok = page * PAGE + tok < context
    offs = block * cache_stride_block + tok[:, None] * cache_stride_token + kv_head * cache_stride_head + d[None, :]
    return offs, tok_ok, tok_ok[:, None] & (d < HEAD_DIM)[None, :]


@triton.jit
def online_softmax_start(GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    """The running max, sum and output of the online softmax before the first tile."""
    return (tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32), tl.zeros((GROUP_PAD,), dtype=tl.float32),
            tl.zeros((GROUP_PAD, DIM_PAD), dtype=tl.float32))


@triton.jit
def online_softmax_tile(q, k, v, tok_ok, scale, m_i, l_i, acc):
    """One tile of fp32 keys/values (TOKENS, DIM_PAD) folded into the running max m_i, sum l_i and output acc."""
    # (GROUP_PAD, TOKENS) scores as a broadcast product: exact fp32, and no minimum tile size for the group.
    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
    scores = tl.where(tok_ok[None, :], scores, float("-inf"))
    # The first tile holds token 0, so m_i is finite from then on, and so is m_new (a tile past the context has only
    # -inf scores: p = 0 and alpha = 1).
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def decode_epilogue(out_ptr, seq, heads, head_mask, out_stride_seq, out_stride_head, l_i, acc,
                    DIM_PAD: tl.constexpr):
    """The group's outputs acc / l_i; a row without context (padding: no tile ran) stores zeros."""
    d = tl.arange(0, DIM_PAD)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + seq * out_stride_seq + heads[:, None] * out_stride_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask)


# Eager decode steps size the block table to their longest sequence: its stride must not pick kernel variants.
@triton.jit(do_not_specialize=["block_table_stride"])
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr,
    scale, q_stride_seq, q_stride_head, out_stride_seq, out_stride_head, block_table_stride,
    cache_stride_block, cache_stride_token, cache_stride_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, TOKENS: tl.constexpr,
):
    seq, kv_head, context, heads, head_mask, q = decode_prologue(
        q_ptr, context_lens_ptr, q_stride_seq, q_stride_head, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    m_i, l_i, acc = online_softmax_start(GROUP_PAD, DIM_PAD)
    for page in range(0, tl.cdiv(context, PAGE)):  # 0 pages for padded rows: the output is zero
        block = tl.load(block_tables_ptr + seq * block_table_stride + page).to(tl.int64)
        for first in range(0, PAGE, TOKENS):  # a loop, not unrolled: unrolled tiles share registers again
            offs, tok_ok, kv_mask = decode_tile(block, page, first, context, kv_head, cache_stride_block,
                                                cache_stride_token, cache_stride_head, HEAD_DIM, DIM_PAD, PAGE, TOKENS)
            k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            m_i, l_i, acc = online_softmax_tile(q, k, v, tok_ok, scale, m_i, l_i, acc)
    decode_epilogue(out_ptr, seq, heads, head_mask, out_stride_seq, out_stride_head, l_i, acc, DIM_PAD)


def decode_constants(q: torch.Tensor, cache_shape: torch.Size, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, tile_tokens: int | None) -> dict[str, int]:
    """The checks and constexprs both decode kernels share; cache_shape: (blocks, block_size, kv_heads, head_dim)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = cache_shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0, (tuple(q.shape), tuple(cache_shape))
    assert q.stride(2) == 1, f"query head rows are not dense: strides {q.stride()}"
    assert block_size == triton.next_power_of_2(block_size), f"block_size {block_size} must be a power of two"
    assert block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,)
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    group = num_heads // num_kv_heads
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    tokens = tile_tokens or decode_tile_tokens(group_pad, dim_pad, block_size, q.is_cuda)
    assert tokens == triton.next_power_of_2(tokens) and tokens <= block_size, (tokens, block_size)
    return dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=dim_pad, PAGE=block_size,
                TOKENS=tokens)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                        tile_tokens: int | None = None) -> torch.Tensor:
    """Same contract as paged_decode_reference, computed by the Triton kernel. tile_tokens: tokens per tile (a power
    of two <= block_size), or None for decode_tile_tokens' choice."""
    constants = decode_constants(q, k_cache.shape, block_tables, context_lens, tile_tokens)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (k_cache.stride(), v_cache.stride())
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    with launch_device(q.device):
        paged_decode_kernel[(q.shape[0], k_cache.shape[2])](
            q, k_cache, v_cache, out, block_tables, context_lens,
            scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), **constants,
        )
    return out
