"""int8 paged KV cache: int8 values with one float32 scale per (block, kv head), x ~= q * scale (symmetric,
|q| <= 127). Half the bytes of a bf16 cache (the scales add 4 bytes per block and head).

Writing: a block's scale only grows. Tokens are appended to a sequence's blocks in order, so a token at offset 0
starts a fresh block (its old scale and values are void: scale reset to 0); otherwise the block keeps its scale
unless a new token needs a larger one, and then the values already in the block are requantized to the new scale
(round(q * old / new): one more rounding for those, never a clamp). Within one store call, the tokens going to one
block are consecutive and in order (a prefill's tokens, or one decode token per sequence): the Triton kernel lets
the first of them requantize the block's earlier tokens while the others write theirs.
Rounding is floor(x + 0.5) everywhere, so the kernel and the reference store the same bytes.

Reading: the references dequantize the blocks a batch reads and run kernels/paged_attention.py's references on
them; the Triton decode kernel (kernels/paged_attention_triton.py's decode kernel, tiled the same way) dequantizes
each tile of a page in registers.
Layout: cache types, store, attention (references and dispatch), a layer's entry point; the Triton store and
decode kernels are in kernels/kv_int8_triton.py, imported only where they launch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention import paged_decode_reference, paged_prefill_reference

QMAX = 127.0


@dataclass(frozen=True)
class Int8Pages:
    """One layer's keys or values."""

    values: torch.Tensor  # (blocks, block_size, kv_heads, head_dim) int8
    scales: torch.Tensor  # (blocks, kv_heads) float32

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


@dataclass(frozen=True)
class Int8KVCache:
    """The whole cache; [kind, layer] is that layer's keys (kind 0) or values (kind 1), like the float cache."""

    values: torch.Tensor  # (2, layers, blocks, block_size, kv_heads, head_dim) int8
    scales: torch.Tensor  # (2, layers, blocks, kv_heads) float32

    shape = property(lambda self: self.values.shape)
    device = property(lambda self: self.values.device)
    dtype = torch.int8

    def __getitem__(self, index: tuple[int, int]) -> Int8Pages:
        kind, layer = index
        return Int8Pages(self.values[kind, layer], self.scales[kind, layer])

    @classmethod
    def zeros(cls, layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int,
              device: torch.device) -> Int8KVCache:
        return cls(torch.zeros(2, layers, blocks, block_size, kv_heads, head_dim, dtype=torch.int8, device=device),
                   torch.zeros(2, layers, blocks, kv_heads, dtype=torch.float32, device=device))


def scale_bytes_per_block(layers: int, kv_heads: int) -> int:
    return 2 * layers * kv_heads * 4


# ----------------------------------------------------------------------------------------------------------------
# Store
# ----------------------------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) float over scale (...,) -> int8; a zero scale (an all-zero head) gives zeros."""
    inv = torch.where(scale > 0, 1.0 / scale.clamp(min=1e-30), 0.0)
    return torch.floor(x.float() * inv[..., None] + 0.5).clamp(-QMAX, QMAX).to(torch.int8)


def store_int8_reference(x: torch.Tensor, pages: Int8Pages, slot_mapping: torch.Tensor) -> None:
    """x (tokens, kv_heads, head_dim) into `pages` at flat slots; -1 slots are skipped."""
    slots = slot_mapping.long()
    valid = slots >= 0
    slots, x = slots[valid], x[valid]
    if slots.numel() == 0:
        return
    block_size = pages.values.shape[1]
    blocks = slots // block_size
    pages.scales.index_fill_(0, blocks[slots % block_size == 0], 0.0)  # fresh blocks
    old = pages.scales.clone()
    amax = x.float().abs().amax(-1) / QMAX
    pages.scales.scatter_reduce_(0, blocks[:, None].expand_as(amax), amax, "amax")
    touched = blocks.unique()
    new = pages.scales[touched]
    inv = torch.where(new > 0, 1.0 / new.clamp(min=1e-30), 0.0)
    ratio = old[touched] * inv  # 1 where the scale did not grow (old * (1 / new), as the kernel computes it)
    requantized = torch.floor(pages.values[touched].float() * ratio[:, None, :, None] + 0.5).to(torch.int8)
    pages.values.index_copy_(0, touched, requantized)
    pages.values.view(-1, *pages.values.shape[2:]).index_copy_(0, slots, quantize(x, pages.scales[blocks]))


def store_int8(x: torch.Tensor, pages: Int8Pages, slot_mapping: torch.Tensor) -> None:
    if x.is_cuda:
        from kernels.kv_int8_triton import store_int8_triton
        store_int8_triton(x, pages, slot_mapping)
    else:
        store_int8_reference(x, pages, slot_mapping)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def dequantize_blocks(pages: Int8Pages, block_tables: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks `block_tables` names (-1: none), dequantized into a small float cache, and the tables renumbered
    into it."""
    rows, width = block_tables.shape
    blocks = block_tables.clamp(min=0).long().flatten()
    cache = pages.values.index_select(0, blocks).to(dtype) * pages.scales.index_select(0, blocks).to(dtype)[:, None, :, None]
    tables = torch.arange(rows * width, dtype=torch.int32, device=block_tables.device).view(rows, width)
    return cache, torch.where(block_tables >= 0, tables, -1)


def paged_decode_int8_reference(q: torch.Tensor, k: Int8Pages, v: Int8Pages, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    k_cache, tables = dequantize_blocks(k, block_tables, q.dtype)
    v_cache, _ = dequantize_blocks(v, block_tables, q.dtype)
    return paged_decode_reference(q, k_cache, v_cache, tables, context_lens, scale)


def paged_prefill_int8(q: torch.Tensor, k: Int8Pages, v: Int8Pages, cu_seqlens_q: list[int], context_lens: list[int],
                       block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Prefill over the dequantized context (CPU and CUDA alike)."""
    k_cache, tables = dequantize_blocks(k, block_tables, q.dtype)
    v_cache, _ = dequantize_blocks(v, block_tables, q.dtype)
    return paged_prefill_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, tables, scale)


def paged_decode_int8(q: torch.Tensor, k: Int8Pages, v: Int8Pages, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if q.is_cuda:
        from kernels.kv_int8_triton import paged_decode_int8_triton
        return paged_decode_int8_triton(q, k, v, block_tables, context_lens, scale)
    return paged_decode_int8_reference(q, k, v, block_tables, context_lens, scale)


def int8_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k: Int8Pages, v: Int8Pages, meta,
                   scale: float) -> torch.Tensor:
    """One layer over the int8 cache: store the new keys/values, then prefill and decode attention. `meta` is the
    layer's AttentionMetadata (runtime/models/qwen3_vl_text.py); its planned decode backend is for float caches."""
    store_int8(key, k, meta.slot_mapping)
    store_int8(value, v, meta.slot_mapping)
    p = meta.num_prefill_tokens
    parts = []
    if p:
        parts.append(paged_prefill_int8(q[:p], k, v, meta.prefill_cu_seqlens, meta.prefill_context_lens,
                                        meta.prefill_block_tables, scale))
    if q.shape[0] > p:
        parts.append(paged_decode_int8(q[p:], k, v, meta.decode_block_tables, meta.decode_context_lens, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
