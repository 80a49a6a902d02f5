"""Write new keys/values into the paged KV cache: token i goes to flat slot slot_mapping[i] = block * block_size +
offset. Slots marked -1 are skipped (padded rows of a fixed-size decode batch).

Cache layout per layer: (num_blocks, block_size, num_kv_heads, head_dim), contiguous; key/value: (tokens,
num_kv_heads, head_dim) with any token stride (they are often views of a fused projection).
Layout: reference, dispatch; the Triton kernel is in kernels/kv_store_triton.py, imported only where it
launches."""
from __future__ import annotations

import torch



def check_args(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    assert key.dim() == 3 and key.shape == value.shape, (tuple(key.shape), tuple(value.shape))
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, (tuple(k_cache.shape), tuple(v_cache.shape))
    assert key.shape[1:] == k_cache.shape[2:], f"key heads/dim {tuple(key.shape[1:])} vs cache {tuple(k_cache.shape)}"
    assert slot_mapping.shape == (key.shape[0],), (tuple(slot_mapping.shape), key.shape[0])
    assert not slot_mapping.dtype.is_floating_point


def kv_store_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    check_args(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def kv_store(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The Triton kernel on CUDA, the torch reference on CPU."""
    if k_cache.is_cuda:
        from kernels.kv_store_triton import kv_store_triton
        kv_store_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        kv_store_reference(key, value, k_cache, v_cache, slot_mapping)
