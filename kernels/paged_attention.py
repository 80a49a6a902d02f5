"""Attention over the paged KV cache, for prefill (many query tokens per sequence, causal) and decode (one).

Cache per layer: (num_blocks, block_size, num_kv_heads, head_dim). A sequence's tokens live in the blocks of its
row of `block_tables` (int32, padded with -1), token j at block_tables[s, j // block_size], offset j % block_size.
Grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads).

  decode:  paged_decode_reference (plain torch, what CPU runs) and kernels/paged_attention_triton.py's
           paged_decode_triton (one program per (sequence, kv head), all the heads of its group at once, online
           softmax over tiles of each page), imported only where it launches; kernels/kv_int8.py's int8 decode
           kernel is built from the same parts.
  prefill: paged_prefill_reference gathers each sequence's context and runs causal SDPA with the queries at the
           end of it (CPU, and CUDA without flash-attn); on CUDA flash-attn's varlen kernel when it is installed.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F


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
    except Exception as e:  # an ABI or driver mismatch raises RuntimeError or OSError, not ImportError
        # not installed is routine (info); installed but broken is worth a warning
        log.log(logging.INFO if isinstance(e, ModuleNotFoundError) else logging.WARNING,
                "flash-attn does not import (%s: %s): CUDA prefill uses SDPA over the gathered context",
                type(e).__name__, e)
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
# Decode: the Triton kernel's tiles, and dispatch
# ----------------------------------------------------------------------------------------------------------------


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
        from kernels.paged_attention_triton import paged_decode_triton
        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
