"""The Triton kernel of kernels/kv_int8.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_int8 import Int8Pages
from kernels.launch import launch_device
from kernels.paged_attention_triton import (decode_constants, decode_epilogue, decode_prologue, decode_tile,
                                            online_softmax_start, online_softmax_tile)


@triton.jit
def _reset_fresh_kernel(slot_ptr, scales_ptr, BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr,
                        HEADS_PAD: tl.constexpr):
    slot = tl.load(slot_ptr + tl.program_id(0)).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    fresh = (slot >= 0) & (slot % BLOCK_SIZE == 0)
    # masks compare against a where() limit: the interpreter rejects a vector mask and-ed with a scalar one
    tl.store(scales_ptr + (slot // BLOCK_SIZE) * HEADS + h, tl.zeros((HEADS_PAD,), tl.float32),
             mask=h < tl.where(fresh, HEADS, 0))


@triton.jit
def _grow_scales_kernel(x_ptr, slot_ptr, scales_ptr, x_stride, BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    h_ok = h < tl.where(slot >= 0, HEADS, 0)
    mask = h_ok[:, None] & (d[None, :] < HEAD_DIM)
    x = tl.load(x_ptr + token * x_stride + h[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1) / 127.0
    tl.atomic_max(scales_ptr + (slot // BLOCK_SIZE) * HEADS + h, amax, mask=h_ok)


@triton.jit
def _write_kernel(x_ptr, slot_ptr, values_ptr, scales_ptr, old_ptr, x_stride, BLOCK_SIZE: tl.constexpr,
                  HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    h_ok = h < tl.where(slot >= 0, HEADS, 0)
    mask = h_ok[:, None] & (d[None, :] < HEAD_DIM)
    new = tl.load(scales_ptr + block * HEADS + h, mask=h_ok, other=0.0)
    inv = tl.where(new > 0, 1.0 / tl.maximum(new, 1e-30), 0.0)
    x = tl.load(x_ptr + token * x_stride + h[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(tl.floor(x * inv[:, None] + 0.5), -127.0), 127.0)
    row = h[:, None] * HEAD_DIM + d[None, :]
    tl.store(values_ptr + slot * HEADS * HEAD_DIM + row, q.to(tl.int8), mask=mask)
    # The first token of this call in its block requantizes the tokens stored there before.
    prev = tl.where(token > 0, tl.load(slot_ptr + tl.maximum(token - 1, 0)).to(tl.int64), -1)
    first = (slot >= 0) & (offset > 0) & ((prev < 0) | (prev // BLOCK_SIZE != block))
    old = tl.load(old_ptr + block * HEADS + h, mask=h_ok, other=0.0)
    ratio = tl.where(new > 0, old * inv, 0.0)
    for pos in range(0, tl.where(first, offset, 0)):
        at = values_ptr + (block * BLOCK_SIZE + pos) * HEADS * HEAD_DIM + row
        v = tl.load(at, mask=mask, other=0).to(tl.float32)
        tl.store(at, tl.floor(v * ratio[:, None] + 0.5).to(tl.int8), mask=mask)


def store_int8_triton(x: torch.Tensor, pages: Int8Pages, slot_mapping: torch.Tensor) -> None:
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == dim, f"rows are not dense: strides {x.stride()}"
    assert pages.values.is_contiguous() and pages.scales.is_contiguous()
    assert tuple(pages.values.shape[2:]) == (heads, dim), (tuple(x.shape), tuple(pages.values.shape))
    if tokens == 0:
        return
    block_size = pages.values.shape[1]
    shape = dict(BLOCK_SIZE=block_size, HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads))
    dims = dict(shape, HEAD_DIM=dim, DIM_PAD=triton.next_power_of_2(dim))
    with launch_device(x.device):
        _reset_fresh_kernel[(tokens,)](slot_mapping, pages.scales, **shape)
        old = pages.scales.clone()
        _grow_scales_kernel[(tokens,)](x, slot_mapping, pages.scales, x.stride(0), **dims)
        _write_kernel[(tokens,)](x, slot_mapping, pages.values, pages.scales, old, x.stride(0), **dims)


# Eager decode steps size the block table to their longest sequence: its stride must not pick kernel variants.
@triton.jit(do_not_specialize=["block_table_stride"])
def paged_decode_int8_kernel(
    q_ptr, k_ptr, v_ptr, k_scales_ptr, v_scales_ptr, out_ptr, block_tables_ptr, context_lens_ptr,
    scale, q_stride_seq, q_stride_head, out_stride_seq, out_stride_head, block_table_stride,
    cache_stride_block, cache_stride_token, cache_stride_head, KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PAGE: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """kernels/paged_attention_triton.py's paged_decode_kernel over int8 pages, each tile dequantized in registers
    with its block's scales."""
    seq, kv_head, context, heads, head_mask, q = decode_prologue(
        q_ptr, context_lens_ptr, q_stride_seq, q_stride_head, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD)
    m_i, l_i, acc = online_softmax_start(GROUP_PAD, DIM_PAD)
    for page in range(0, tl.cdiv(context, PAGE)):
        block = tl.load(block_tables_ptr + seq * block_table_stride + page).to(tl.int64)
        k_scale = tl.load(k_scales_ptr + block * KV_HEADS + kv_head)
        v_scale = tl.load(v_scales_ptr + block * KV_HEADS + kv_head)
        for first in range(0, PAGE, TOKENS):
            offs, tok_ok, kv_mask = decode_tile(block, page, first, context, kv_head, cache_stride_block,
                                                cache_stride_token, cache_stride_head, HEAD_DIM, DIM_PAD, PAGE, TOKENS)
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0).to(tl.float32) * k_scale
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0).to(tl.float32) * v_scale
            m_i, l_i, acc = online_softmax_tile(q, k, v, tok_ok, scale, m_i, l_i, acc)
    decode_epilogue(out_ptr, seq, heads, head_mask, out_stride_seq, out_stride_head, l_i, acc, DIM_PAD)


def paged_decode_int8_triton(q: torch.Tensor, k: Int8Pages, v: Int8Pages, block_tables: torch.Tensor,
                             context_lens: torch.Tensor, scale: float, tile_tokens: int | None = None) -> torch.Tensor:
    """Same contract as paged_decode_int8_reference, computed by the Triton kernel. tile_tokens: tokens per tile (a
    power of two <= block_size), or None for decode_tile_tokens' choice (the float kernel's)."""
    constants = decode_constants(q, k.values.shape, block_tables, context_lens, tile_tokens)
    assert k.values.is_contiguous() and v.values.is_contiguous() and k.values.shape == v.values.shape
    assert k.scales.is_contiguous() and v.scales.is_contiguous()
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    num_kv_heads = k.values.shape[2]
    with launch_device(q.device):
        paged_decode_int8_kernel[(q.shape[0], num_kv_heads)](
            q, k.values, v.values, k.scales, v.scales, out, block_tables, context_lens,
            scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k.values.stride(0), k.values.stride(1), k.values.stride(2), KV_HEADS=num_kv_heads, **constants,
        )
    return out
