"""Attention over the paged KV cache, for prefill (many query tokens per sequence, causal) and decode (one).

Cache per layer: (num_blocks, block_size, num_kv_heads, head_dim). A sequence's tokens live in the blocks of its
row of `block_tables` (int32, padded with -1), token j at block_tables[s, j // block_size], offset j % block_size.
Grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads).

  decode:  paged_decode_reference (plain torch, what CPU runs) and paged_decode_triton (one program per
           (sequence, kv head), all the heads of its group at once, online softmax over the pages).
  prefill: paged_prefill_reference gathers each sequence's context and runs causal SDPA with the queries at the
           end of it (CPU, and CUDA without flash-attn); on CUDA flash-attn's varlen kernel when it is installed.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import launch_device

log = logging.getLogger(__name__)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """(length, kv_heads, head_dim) tokens of one sequence."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)].long()
    return cache.index_select(0, blocks).flatten(0, 1)[:length]


# ----------------------------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------------------------


def paged_prefill_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: list[int], context_lens: list[int], block_tables: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """q: (tokens, heads, head_dim), the new tokens of each sequence back to back (cu_seqlens_q, host ints). The
    new tokens of sequence s are the last cu_seqlens_q[s+1] - cu_seqlens_q[s] of its context_lens[s] tokens, whose
    keys/values are all in the cache already. Returns (tokens, heads, head_dim)."""
    out = torch.empty_like(q)
    for s, context in enumerate(context_lens):
        start, end = cu_seqlens_q[s], cu_seqlens_q[s + 1]
        new = end - start
        assert 0 < new <= context, (s, new, context)
        k = _gather_context(k_cache, block_tables[s], context).transpose(0, 1)
        v = _gather_context(v_cache, block_tables[s], context).transpose(0, 1)
        qs = q[start:end].transpose(0, 1)
        # 4-D inputs: torch's CPU SDPA takes its slower math path for 3-D ones.
        if new == context:
            o = F.scaled_dot_product_attention(qs[None], k[None], v[None], is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:  # query i sits at position context - new + i and sees keys up to there
            visible = (torch.arange(new, device=q.device)[:, None] + (context - new)
                       >= torch.arange(context, device=q.device)[None, :])
            o = F.scaled_dot_product_attention(qs[None], k[None], v[None], attn_mask=visible, scale=scale,
                                               enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        log.info("flash-attn is not installed: CUDA prefill uses SDPA over the gathered context")
        return None
    return flash_attn_varlen_func


def paged_prefill(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, cu_seqlens_q: list[int], context_lens: list[int], block_tables: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Prefill attention; k_new/v_new are the new tokens' keys/values (already stored in the cache too)."""
    # flash-attn computes in fp16/bf16 only; fp32 models take the SDPA path.
    flash = _flash_attn_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    new_lens = [b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:])]
    no_prefix = new_lens == list(context_lens)  # no cached prefix: the new keys are all there is to attend over
    if flash is not None:
        cu_q = torch.tensor(cu_seqlens_q, dtype=torch.int32, device=q.device)
        if no_prefix:
            return flash(q, k_new, v_new, cu_q, cu_q, max(new_lens), max(new_lens), softmax_scale=scale, causal=True)
        if k_cache.shape[1] % 256 == 0:  # flash-attn reads paged KV only with pages of a multiple of 256 tokens
            cu_k = torch.tensor([0, *torch.tensor(context_lens).cumsum(0).tolist()], dtype=torch.int32,
                                device=q.device)
            return flash(q, k_cache, v_cache, cu_q, cu_k, max(new_lens), max(context_lens), softmax_scale=scale,
                         causal=True, block_table=block_tables)
    if no_prefix and len(set(new_lens)) == 1:
        # No cached prefix and one length (the same image size and prompt): one batched causal call over the new
        # keys, instead of one per sequence over keys gathered back from the cache.
        shape = (len(new_lens), new_lens[0], -1, q.shape[-1])
        q4, k4, v4 = (t.reshape(shape).transpose(1, 2) for t in (q, k_new, v_new))
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape)
    return paged_prefill_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


# ----------------------------------------------------------------------------------------------------------------
# Decode: reference
# ----------------------------------------------------------------------------------------------------------------


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (seqs, heads, head_dim), one query per sequence at its last position. Rows with context_lens 0 (padding)
    give zeros. Returns (seqs, heads, head_dim) in q's dtype, computed in float32 as the kernel does."""
    num_seqs, max_blocks = block_tables.shape
    block_size = k_cache.shape[1]
    blocks = block_tables.clamp(min=0).long().flatten()
    # (seqs, kv_heads, max_blocks * block_size, head_dim), padded; the mask hides tokens past each context.
    # index_select: several times faster than advanced indexing for this gather on CPU.
    k = decode_keys(k_cache, blocks, num_seqs, max_blocks * block_size)
    v = decode_keys(v_cache, blocks, num_seqs, max_blocks * block_size)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    visible = (positions[None, :] < context_lens[:, None].to(q.device))[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, attn_mask=visible, scale=scale,
                                       enable_gqa=True)
    return torch.where(context_lens.to(q.device)[:, None, None] > 0, o[:, :, 0, :], 0).to(q.dtype)


def decode_keys(cache: torch.Tensor, blocks: torch.Tensor, num_seqs: int, tokens: int) -> torch.Tensor:
    """(seqs, kv_heads, tokens, head_dim) float32 keys or values of `blocks` (seqs x blocks each, flattened).

    float32: torch's CPU SDPA takes ~8x longer in bf16 than in float32 at decode shapes (one query per sequence),
    more than the cast of the gathered tokens costs (BENCHMARKS.md section 8)."""
    return cache.index_select(0, blocks).float().view(num_seqs, tokens, *cache.shape[2:]).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Decode: Triton kernel
# ----------------------------------------------------------------------------------------------------------------


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


DECODE_TILE_ELEMENTS = 4096  # GROUP_PAD x TOKENS x DIM_PAD products per tile: ~32 fp32 registers a thread at 4 warps


def decode_tile_tokens(group_pad: int, dim_pad: int, block_size: int, on_cuda: bool) -> int:
    """Tokens per tile of the decode kernel: a whole page under the interpreter (it pays per op), else as many as
    keep the broadcast products of a tile at DECODE_TILE_ELEMENTS (GQA 8 x head_dim 128 x page 16 at once needed
    255 registers a thread on sm_90)."""
    if not on_cuda:
        return block_size
    return max(1, min(block_size, DECODE_TILE_ELEMENTS // (group_pad * dim_pad)))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton kernel on CUDA, the torch reference on CPU."""
    if q.is_cuda:
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
