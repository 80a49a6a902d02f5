"""Write new keys/values into the paged KV cache: token i goes to flat slot slot_mapping[i] = block * block_size +
offset. Slots marked -1 are skipped (padded rows of a fixed-size decode batch).

Cache layout per layer: (num_blocks, block_size, num_kv_heads, head_dim), contiguous; key/value: (tokens,
num_kv_heads, head_dim) with any token stride (they are often views of a fused projection).
Layout: reference, Triton kernel, dispatch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device


def _check(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    assert key.dim() == 3 and key.shape == value.shape, (tuple(key.shape), tuple(value.shape))
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, (tuple(k_cache.shape), tuple(v_cache.shape))
    assert key.shape[1:] == k_cache.shape[2:], f"key heads/dim {tuple(key.shape[1:])} vs cache {tuple(k_cache.shape)}"
    assert slot_mapping.shape == (key.shape[0],), (tuple(slot_mapping.shape), key.shape[0])
    assert not slot_mapping.dtype.is_floating_point


def kv_store_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    _check(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


@triton.jit
def kv_store_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    key_stride, value_stride,  # elements between consecutive tokens of key / value
                    ROW: tl.constexpr, BLOCK: tl.constexpr):  # ROW = num_kv_heads * head_dim
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)  # a padded slot stores nothing
    k = tl.load(key_ptr + token * key_stride + offs, mask=mask)
    v = tl.load(value_ptr + token * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_store_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    _check(key, value, k_cache, v_cache, slot_mapping)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    # Heads and dims of one token must be one dense row; only the token stride may differ.
    for name, t in (("key", key), ("value", value)):
        assert t.stride(2) == 1 and t.stride(1) == t.shape[2], f"{name} rows are not dense: strides {t.stride()}"
    if key.shape[0] == 0:
        return
    row = key.shape[1] * key.shape[2]
    with launch_device(k_cache.device):
        kv_store_kernel[(key.shape[0],)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
                                         ROW=row, BLOCK=triton.next_power_of_2(row))


def kv_store(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The Triton kernel on CUDA, the torch reference on CPU."""
    if k_cache.is_cuda:
        kv_store_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        kv_store_reference(key, value, k_cache, v_cache, slot_mapping)
