"""KV-store and paged-attention kernels (Triton compiled on CUDA, else under the interpreter) against their torch references, and the
references against dense attention written out by hand."""
from __future__ import annotations

import pytest
import torch

from fixtures.paged_attention import dense_attention, paged_layout
from fixtures.triton_mode import KERNEL_DEVICE
from kernels.kv_store import kv_store, kv_store_reference, kv_store_triton
from kernels.paged_attention import (paged_decode, paged_decode_reference, paged_decode_triton, paged_prefill,
                                     paged_prefill_reference)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gather(cache, table, length):
    bs = cache.shape[1]
    return torch.cat([cache[b] for b in table[: -(-length // bs)].tolist()])[:length]


# --- KV store -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size,num_blocks", [
    (5, 2, 16, 4, 8), (17, 1, 64, 16, 4), (9, 4, 128, 8, 6), (3, 3, 24, 2, 5)])
def test_kv_store_kernel_matches_reference(tokens, kv_heads, head_dim, block_size, num_blocks):
    g = torch.Generator().manual_seed(tokens)
    # key/value as views of one fused projection output: a token stride larger than the row
    fused = torch.randn(tokens, 3, kv_heads, head_dim, generator=g)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::3] = -1  # padding rows are skipped
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0) for _ in range(4)]
    kv_store_reference(key, value, caches[0], caches[1], slots)
    fused_there = fused.to(KERNEL_DEVICE)  # the same strided views on the kernel's device
    caches_there = [c.to(KERNEL_DEVICE) for c in caches[2:]]
    kv_store_triton(fused_there[:, 1], fused_there[:, 2], *caches_there, slots.to(KERNEL_DEVICE, torch.int32))
    caches[2], caches[3] = (c.cpu() for c in caches_there)
    torch.testing.assert_close(caches[2], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0)
    flat_k = caches[0].view(-1, kv_heads, head_dim)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[i])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (flat_k[untouched] == 7.0).all()


def test_kv_store_casts_to_cache_dtype():
    key = torch.randn(4, 2, 8)
    cache = [torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16) for _ in range(2)]
    kv_store(key, key, cache[0], cache[1], torch.tensor([0, 5, -1, 7]))
    assert torch.equal(cache[0].view(-1, 2, 8)[5], key[1].bfloat16())


# --- decode -------------------------------------------------------------------------------------------------------

DECODE_CASES = [  # (context lens, heads, kv heads, head dim, block size)
    ([1, 7, 16, 33], 4, 4, 16, 8),  # MHA; a context of exactly two blocks
    ([5, 12], 8, 2, 64, 4),  # GQA 4:1
    ([9, 3, 20], 6, 2, 24, 16),  # group of 3 and head dim 24: both padded to powers of two in the kernel
    ([40], 4, 2, 128, 16),  # Qwen3-VL-2B's head dim and GQA ratio
    ([6, 0, 11], 2, 1, 32, 4),  # a padded row: context 0, block table all -1
]


@pytest.mark.parametrize("context_lens,heads,kv_heads,head_dim,block_size", DECODE_CASES)
def test_paged_decode_kernel_and_reference_match_dense(context_lens, heads, kv_heads, head_dim, block_size):
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, kv_heads, head_dim)
    q = torch.randn(len(context_lens), heads, head_dim, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    ref = paged_decode_reference(q, k_cache, v_cache, tables, lens, scale)
    got = paged_decode_triton(*(t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, tables, lens)), scale).cpu()
    for s, c in enumerate(context_lens):
        if c == 0:
            assert (ref[s] == 0).all() and (got[s] == 0).all()
            continue
        k, v = gather(k_cache, tables[s], c), gather(v_cache, tables[s], c)
        expected = dense_attention(q[s:s + 1], k, v, scale)[0]
        torch.testing.assert_close(ref[s], expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(got[s], expected, rtol=0, atol=2e-6)


def test_paged_decode_kernel_with_strided_query():
    # q as a view of a wider projection output (token stride > heads * head_dim)
    k_cache, v_cache, tables = paged_layout([10, 4], 8, 4, 2, 16)
    wide = torch.randn(2, 6, 16)
    q = wide[:, :4]
    lens = torch.tensor([10, 4], dtype=torch.int32)
    got = paged_decode_triton(wide.to(KERNEL_DEVICE)[:, :4],
                              *(t.to(KERNEL_DEVICE) for t in (k_cache, v_cache, tables, lens)), 0.25).cpu()
    torch.testing.assert_close(got, paged_decode_reference(q, k_cache, v_cache, tables, lens, 0.25), rtol=0,
                               atol=2e-6)


# --- prefill ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("new_lens,context_lens,heads,kv_heads,head_dim,block_size", [
    ([5, 9], [5, 9], 4, 2, 16, 4),  # no cached prefix
    ([3, 1, 8], [11, 8, 8], 4, 1, 32, 8),  # cached prefixes of 8 and 7 tokens (a 1-token suffix included)
    ([16], [48], 6, 3, 24, 16),
])
def test_paged_prefill_reference_matches_dense_causal(new_lens, context_lens, heads, kv_heads, head_dim, block_size):
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 2
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, kv_heads, head_dim)
    q = torch.randn(sum(new_lens), heads, head_dim, generator=torch.Generator().manual_seed(2))
    cu = [0]
    for n in new_lens:
        cu.append(cu[-1] + n)
    scale = head_dim ** -0.5
    got = paged_prefill_reference(q, k_cache, v_cache, cu, context_lens, tables, scale)
    for s, (n, c) in enumerate(zip(new_lens, context_lens)):
        k, v = gather(k_cache, tables[s], c), gather(v_cache, tables[s], c)
        expected = dense_attention(q[cu[s]:cu[s + 1]], k, v, scale, causal_offset=c - n)
        torch.testing.assert_close(got[cu[s]:cu[s + 1]], expected, rtol=0, atol=2e-6)


# --- CUDA (flash-attn prefill when installed, the Triton kernels through dispatch) ----------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_cuda_dispatch_matches_reference(block_size):
    context_lens, new_lens = [300, 40], [20, 40]
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 1
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, 2, 128)
    q = torch.randn(sum(new_lens), 4, 128)
    cu = [0, 20, 60]
    k_new = torch.cat([gather(k_cache, tables[s], c)[c - n:] for s, (n, c) in enumerate(zip(new_lens, context_lens))])
    v_new = torch.cat([gather(v_cache, tables[s], c)[c - n:] for s, (n, c) in enumerate(zip(new_lens, context_lens))])
    expected = paged_prefill_reference(q, k_cache, v_cache, cu, context_lens, tables, 0.1)
    dev = [t.cuda().bfloat16() for t in (q, k_new, v_new, k_cache, v_cache)]
    got = paged_prefill(*dev, cu, context_lens, tables.cuda(), 0.1)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=0, atol=3e-2)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    qd = torch.randn(2, 4, 128)
    expected = paged_decode_reference(qd, k_cache, v_cache, tables, lens, 0.1)
    got = paged_decode(qd.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), lens.cuda(), 0.1)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-5)
