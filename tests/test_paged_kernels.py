"""KV-store and paged-attention kernels (Triton compiled on CUDA, else under the interpreter) against their torch references, and the
references against dense attention written out by hand."""
from __future__ import annotations

import pytest
import torch
import triton

from fixtures.paged_attention import TILED_DECODE_CASES, dense_attention, paged_layout
from fixtures.triton_mode import KERNEL_DEVICE
from kernels.kv_store import kv_store, kv_store_reference
from kernels.kv_store_triton import kv_store_triton
from kernels.paged_attention import (decode_tile_tokens, paged_decode, paged_decode_reference, paged_prefill,
    paged_prefill_reference)
from kernels.paged_attention_triton import paged_decode_triton

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


@pytest.mark.parametrize("context_lens,heads,kv_heads,head_dim,block_size,tile", TILED_DECODE_CASES)
def test_paged_decode_kernel_tiles_match_dense(context_lens, heads, kv_heads, head_dim, block_size, tile):
    context_lens = [*context_lens, 0]  # and a padding row
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 2
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, kv_heads, head_dim, seed=tile)
    q = torch.randn(len(context_lens), heads, head_dim, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    got = paged_decode_triton(*(t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, tables, lens)), scale,
                              tile_tokens=tile).cpu()
    torch.testing.assert_close(got, paged_decode_reference(q, k_cache, v_cache, tables, lens, scale), rtol=0,
                               atol=2e-6)
    assert (got[-1] == 0).all()
    for s, c in enumerate(context_lens[:-1]):
        k, v = gather(k_cache, tables[s], c), gather(v_cache, tables[s], c)
        torch.testing.assert_close(got[s], dense_attention(q[s:s + 1], k, v, scale)[0], rtol=0, atol=2e-6)


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


def prefill_case(new_lens, context_lens, heads, kv_heads, head_dim, block_size, seed):
    """(q, k_cache, v_cache, block tables, cu_seqlens, the new tokens' keys, values): each sequence's last
    new_lens[s] of context_lens[s] tokens are new."""
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 2
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, kv_heads, head_dim)
    q = torch.randn(sum(new_lens), heads, head_dim, generator=torch.Generator().manual_seed(seed))
    cu = [0]
    for n in new_lens:
        cu.append(cu[-1] + n)
    new = list(enumerate(zip(new_lens, context_lens)))
    k_new = torch.cat([gather(k_cache, tables[s], c)[c - n:] for s, (n, c) in new])
    v_new = torch.cat([gather(v_cache, tables[s], c)[c - n:] for s, (n, c) in new])
    return q, k_cache, v_cache, tables, cu, k_new, v_new


@pytest.mark.parametrize("new_lens,context_lens,heads,kv_heads,head_dim,block_size", [
    ([5, 9], [5, 9], 4, 2, 16, 4),  # no cached prefix
    ([3, 1, 8], [11, 8, 8], 4, 1, 32, 8),  # cached prefixes of 8 and 7 tokens (a 1-token suffix included)
    ([16], [48], 6, 3, 24, 16),
])
def test_paged_prefill_reference_matches_dense_causal(new_lens, context_lens, heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, tables, cu, _, _ = prefill_case(new_lens, context_lens, heads, kv_heads, head_dim,
                                                         block_size, seed=2)
    scale = head_dim ** -0.5
    got = paged_prefill_reference(q, k_cache, v_cache, cu, context_lens, tables, scale)
    for s, (n, c) in enumerate(zip(new_lens, context_lens)):
        k, v = gather(k_cache, tables[s], c), gather(v_cache, tables[s], c)
        expected = dense_attention(q[cu[s]:cu[s + 1]], k, v, scale, causal_offset=c - n)
        torch.testing.assert_close(got[cu[s]:cu[s + 1]], expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("new_lens,context_lens", [
    ([7, 7, 7], [7, 7, 7]),  # no cached prefix, one length: the batched call
    ([5, 9], [5, 9]),  # two lengths: per sequence
    ([3, 3], [11, 3]),  # a cached prefix: per sequence
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_prefill_dispatch_matches_reference(new_lens, context_lens, dtype):
    q, k_cache, v_cache, tables, cu, k_new, v_new = prefill_case(new_lens, context_lens, 4, 2, 16, 4, seed=3)
    args = [t.to(dtype) for t in (q, k_new, v_new, k_cache, v_cache)]
    expected = paged_prefill_reference(args[0], *args[3:], cu, context_lens, tables, 0.25)
    got = paged_prefill(*args, cu, context_lens, tables, 0.25)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-2)


# --- CUDA (flash-attn prefill when installed, the Triton kernels through dispatch) ----------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_cuda_dispatch_matches_reference(block_size):
    context_lens, new_lens = [300, 40], [20, 40]
    q, k_cache, v_cache, tables, cu, k_new, v_new = prefill_case(new_lens, context_lens, 4, 2, 128, block_size, seed=4)
    expected = paged_prefill_reference(q, k_cache, v_cache, cu, context_lens, tables, 0.1)
    dev = [t.cuda().bfloat16() for t in (q, k_new, v_new, k_cache, v_cache)]
    got = paged_prefill(*dev, cu, context_lens, tables.cuda(), 0.1)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=0, atol=3e-2)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    qd = torch.randn(2, 4, 128)
    expected = paged_decode_reference(qd, k_cache, v_cache, tables, lens, 0.1)
    got = paged_decode(qd.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), lens.cuda(), 0.1)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-5)


# --- production configurations under the interpreter ---------------------------------------------------------------
# Qwen3-VL-2B's KV layout (8 kv heads x head_dim 128, GQA 16:8), the engine's block size 16 and flashinfer's 256, bf16
# caches as the bf16 model writes them. The interpreter has no bf16 arithmetic: a bf16 -> bf16 store is an exact
# copy, a bf16 load widens exactly, and its fp32 -> bf16 output cast truncates where torch rounds (one bf16 step).
QWEN3_VL_2B_KV = dict(heads=16, kv_heads=8, head_dim=128)
BF16_STEP = 2 ** -7  # relative size of one bf16 rounding step (8 significant bits)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store_production_layout(block_size, dtype):
    kv_heads, head_dim = QWEN3_VL_2B_KV["kv_heads"], QWEN3_VL_2B_KV["head_dim"]
    g = torch.Generator().manual_seed(block_size)
    fused = torch.randn(21, 3, kv_heads, head_dim, generator=g).to(dtype)  # q, k, v of one projection
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(3 * block_size, generator=g)[:21]
    slots[5::4] = -1
    caches = [torch.full((3, block_size, kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    kv_store_reference(key, value, caches[0], caches[1], slots)
    kv_store_triton(key, value, caches[2], caches[3], slots.to(torch.int32))
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_kv_store_zero_tokens_and_all_padding_store_nothing():
    for tokens, slot in ((0, 0), (4, -1)):
        key = torch.randn(tokens, 8, 128, dtype=torch.bfloat16)
        caches = [torch.full((2, 256, 8, 128), 7.0, dtype=torch.bfloat16) for _ in range(2)]
        kv_store_triton(key, key, caches[0], caches[1], torch.full((tokens,), slot, dtype=torch.int32))
        assert all((c == 7.0).all() for c in caches)


def huge_cache(num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A cache past 2^31 elements that costs only the pages a test touches: torch.empty maps the memory lazily."""
    cache = torch.empty(num_blocks, block_size, QWEN3_VL_2B_KV["kv_heads"], QWEN3_VL_2B_KV["head_dim"], dtype=dtype)
    assert cache.numel() > 2 ** 31
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store_slot_offsets_past_int32(dtype):
    """slot x row (8 x 128 elements) passes 2^31 from slot 2^21 on: the kernel must compute offsets in int64."""
    row = QWEN3_VL_2B_KV["kv_heads"] * QWEN3_VL_2B_KV["head_dim"]
    num_blocks = (2 ** 31 // row) // 256 + 2
    k_cache, v_cache = huge_cache(num_blocks, 256, dtype), huge_cache(num_blocks, 256, dtype)
    key, value = (torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(2))
    slots = [num_blocks * 256 - 1, 2 ** 31 // row, 2 ** 31 // row - 1, 3]  # the last two fit int32 offsets
    flat_k, flat_v = k_cache.view(-1, 8, 128), v_cache.view(-1, 8, 128)
    for s in slots:  # touch only these pages
        flat_k[s] = flat_v[s] = 7.0
    kv_store_triton(key, value, k_cache, v_cache, torch.tensor(slots, dtype=torch.int32))
    for i, s in enumerate(slots):
        assert torch.equal(flat_k[s], key[i]) and torch.equal(flat_v[s], value[i]), s
    assert slots[1] * row >= 2 ** 31 > slots[2] * row  # the first two overflow int32 (a negative offset there)


def cuda_tile(heads: int, kv_heads: int, head_dim: int, block_size: int) -> int:
    """The tokens per tile the decode kernel uses on CUDA at this layout (the interpreter's default is a page)."""
    group_pad, dim_pad = triton.next_power_of_2(heads // kv_heads), triton.next_power_of_2(head_dim)
    return decode_tile_tokens(group_pad, dim_pad, block_size, on_cuda=True)


@pytest.mark.parametrize("cuda_tiles", [False, True])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_production_layout(block_size, dtype, cuda_tiles):
    heads, kv_heads, head_dim = QWEN3_VL_2B_KV.values()
    context_lens = [1, block_size, 2 * block_size + 3, 0]  # one token, one full block, a partial third, padding
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 2
    k_cache, v_cache, tables = paged_layout(context_lens, num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    q = torch.randn(len(context_lens), heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    tile = cuda_tile(heads, kv_heads, head_dim, block_size) if cuda_tiles else None
    assert tile is None or tile == 16  # GQA 2 x head_dim 128: 16 tokens a tile, so a 256-token page is 16 tiles
    got = paged_decode_triton(*(t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, tables)),
                              torch.tensor(context_lens, dtype=torch.int32, device=KERNEL_DEVICE), head_dim ** -0.5,
                              tile_tokens=tile).cpu()
    assert got.dtype == dtype
    for s, c in enumerate(context_lens):
        if c == 0:
            assert (got[s] == 0).all()
            continue
        expected = dense_attention(q[s:s + 1].float(), gather(k_cache, tables[s], c).float(),
                                   gather(v_cache, tables[s], c).float(), head_dim ** -0.5)[0]
        rtol = BF16_STEP if dtype == torch.bfloat16 else 0
        torch.testing.assert_close(got[s].float(), expected, rtol=rtol, atol=2e-6)


@pytest.mark.parametrize("cuda_tiles", [False, True])
def test_paged_decode_block_offsets_past_int32(cuda_tiles):
    """block x block stride (256 x 8 x 128 elements) passes 2^31 from block 8192 on; bf16 as in production."""
    heads, kv_heads, head_dim = QWEN3_VL_2B_KV.values()
    stride = 256 * kv_heads * head_dim
    num_blocks = 2 ** 31 // stride + 3
    k_cache, v_cache = huge_cache(num_blocks, 256, torch.bfloat16), huge_cache(num_blocks, 256, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    blocks = [num_blocks - 1, 2 ** 31 // stride, 2 ** 31 // stride - 1, 0]
    for b in blocks:  # touch only these blocks
        k_cache[b] = torch.randn(256, kv_heads, head_dim, generator=g).bfloat16()
        v_cache[b] = torch.randn(256, kv_heads, head_dim, generator=g).bfloat16()
    tables = torch.tensor([blocks[:2], blocks[2:]], dtype=torch.int32)
    context_lens = [300, 257]
    q = torch.randn(2, heads, head_dim, generator=g).bfloat16()
    tile = cuda_tile(heads, kv_heads, head_dim, 256) if cuda_tiles else None
    got = paged_decode_triton(*(t.to(KERNEL_DEVICE) for t in (q, k_cache, v_cache, tables)),
                              torch.tensor(context_lens, dtype=torch.int32, device=KERNEL_DEVICE), 0.1,
                              tile_tokens=tile).cpu()
    for s, c in enumerate(context_lens):
        expected = dense_attention(q[s:s + 1].float(), gather(k_cache, tables[s], c).float(),
                                   gather(v_cache, tables[s], c).float(), 0.1)[0]
        torch.testing.assert_close(got[s].float(), expected, rtol=BF16_STEP, atol=2e-6)
