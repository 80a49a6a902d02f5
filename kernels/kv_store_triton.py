"""The Triton kernel of kernels/kv_store.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.kv_store import check_args


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
    check_args(key, value, k_cache, v_cache, slot_mapping)
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
