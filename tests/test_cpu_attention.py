"""The CPU decode attention (runtime/vlm/cpu_attention.py) against the reference paged attention, exactly."""
from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_decode_reference
from runtime.vlm.attention import choose_decode_backend, make_decode_attention, DecodeAttentionSpec


def paged_case(seed: int, lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, extra_width: int):
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered through the cache
    width = max(blocks_needed) + extra_width  # tables wider than the longest context, as fixed-size ones are
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for row, n in enumerate(blocks_needed):
        tables[row, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,heads,kv_heads,head_dim,block_size,extra", [
    ([1], 4, 2, 128, 16, 0),
    ([5, 17, 32, 33, 100], 4, 2, 128, 16, 3),
    ([94, 0, 95, 130, 1], 8, 2, 64, 16, 1),  # a padding row (context 0) gives zeros
    ([7, 9], 6, 6, 32, 4, 2),  # no GQA
    ([200] * 32, 16, 8, 128, 16, 60),  # 32 sequences, tables as wide as max_model_len
])
def test_cpu_decode_matches_reference_exactly(dtype, lens, heads, kv_heads, head_dim, block_size, extra):
    q, k_cache, v_cache, tables, context = paged_case(len(lens), lens, heads, kv_heads, head_dim, block_size, dtype,
                                                      extra)
    scale = head_dim ** -0.5
    spec = DecodeAttentionSpec(heads, kv_heads, head_dim, block_size, dtype, scale)
    attention = make_decode_attention("cpu", spec)
    attention.plan(tables, context)
    out = attention(q, k_cache, v_cache, tables, context, scale)
    width = -(-max(lens) // block_size)
    ref = paged_decode_reference(q, k_cache, v_cache, tables[:, :width].contiguous(), context, scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref)  # bit for bit on the table trimmed to the longest context
    # The reference on the padded table reduces over more (masked) columns: equal up to the last bits.
    padded = paged_decode_reference(q, k_cache, v_cache, tables, context, scale)
    torch.testing.assert_close(out, padded, rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)


def test_cpu_is_the_cpu_backend():
    assert choose_decode_backend(torch.device("cpu"), torch.float32, 128, have_flashinfer=False) == "cpu"
