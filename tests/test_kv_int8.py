"""int8 KV cache: the Triton store and decode kernels (interpreted) against their torch references, the error bound
of the stored values (also after a block's scale grows), and the engine with kv_cache_dtype = "int8" against the
float cache on the tiny VLM."""
from __future__ import annotations

import pytest
import torch

from fixtures.images import random_image
from fixtures.paged_attention import TILED_DECODE_CASES, dense_attention
from fixtures.triton_mode import KERNEL_DEVICE
from fixtures.vlm_checkpoints import make_qwen3_vl
from kernels.kv_int8 import Int8KVCache, Int8Pages, dequantize_blocks, paged_decode_int8_reference, store_int8_reference
from kernels.kv_int8_triton import paged_decode_int8_triton, store_int8_triton
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from runtime.vlm.block_manager import KVCacheSpec
from runtime.vlm.sequence import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def write_steps(block_size: int, seqs: list[tuple[list[int], int]], decode_steps: int):
    """Slot mappings of a prefill of every sequence (its blocks, its prompt length) then `decode_steps` decode steps
    of one token each: the order the runner stores them in."""
    steps = [torch.cat([torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(n)])
                        for blocks, n in seqs])]
    for step in range(decode_steps):
        steps.append(torch.tensor([blocks[(n + step) // block_size] * block_size + (n + step) % block_size
                                   for blocks, n in seqs]))
    return steps


@pytest.mark.parametrize("heads,dim,block_size", [(2, 16, 4), (1, 24, 8), (3, 128, 16)])
def test_store_kernel_matches_reference_and_error_bound(heads, dim, block_size):
    g = torch.Generator().manual_seed(dim)
    seqs = [([3, 0, 5], 5), ([1, 6, 2], 2 * block_size - 1), ([4, 7], 1)]
    steps = write_steps(block_size, seqs, decode_steps=block_size + 1)
    caches = [Int8KVCache.zeros(1, 8, block_size, heads, dim, torch.device("cpu")) for _ in range(2)]
    for c in caches:
        c.scales.fill_(9.0)  # stale scales of reused blocks must not matter: a block's first token resets them
    written: dict[int, torch.Tensor] = {}
    bound: dict[int, torch.Tensor] = {}  # per slot and head: half a step at writing, plus half a step per requantization
    for i, slots in enumerate(steps):
        # growing magnitudes: later tokens force a block's scale up and its earlier tokens to be requantized
        x = torch.randn(len(slots), heads, dim, generator=g) * (1 + i)
        padded_slots = torch.cat([slots, torch.tensor([-1])])  # a padding row stores nothing
        padded_x = torch.cat([x, torch.full((1, heads, dim), 1e3)])
        before = caches[0].scales[0, 0].clone()
        store_int8_reference(padded_x, caches[0][0, 0], padded_slots)
        store_int8_triton(padded_x, caches[1][0, 0], padded_slots.to(torch.int32))
        assert torch.equal(caches[1].values, caches[0].values), f"step {i}"
        assert torch.equal(caches[1].scales, caches[0].scales), f"step {i}"
        after = caches[0].scales[0, 0]
        for s in bound:
            b = s // block_size
            bound[s] = bound[s] + torch.where(after[b] > before[b], after[b] / 2, 0.0)
        for j, s in enumerate(slots.tolist()):
            written[s], bound[s] = x[j], after[s // block_size] / 2
    pages = caches[0][0, 0]
    deq = (pages.values.float() * pages.scales[:, None, :, None]).view(-1, heads, dim)
    for s, x in written.items():
        assert bool((x.abs().amax(-1) <= 127 * pages.scales[s // block_size] * (1 + 1e-6)).all())
        assert bool(((deq[s] - x).abs() <= bound[s][:, None] * (1 + 1e-4) + 1e-6).all()), s


# tile None: the launcher's choice (a whole page under the interpreter); the tiled cases read each page in tiles.
@pytest.mark.parametrize("lens,heads,kv_heads,dim,block_size,tile", [
    ([1, 7, 16, 33], 4, 4, 16, 8, None), ([5, 12], 8, 2, 64, 4, None), ([9, 3, 20], 6, 2, 24, 16, None),
    ([40], 4, 2, 128, 16, None), ([9, 3, 20], 6, 2, 24, 16, 2), *TILED_DECODE_CASES])
def test_decode_kernel_matches_reference(lens, heads, kv_heads, dim, block_size, tile):
    g = torch.Generator().manual_seed(sum(lens))
    width = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * width + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens) + 1, width), -1, dtype=torch.int32)  # + a padding row (context 0)
    cache = Int8KVCache.zeros(1, num_blocks, block_size, kv_heads, dim, torch.device("cpu"))
    k_dense, v_dense = [], []
    for i, n in enumerate(lens):
        blocks = perm[i * width:i * width + -(-n // block_size)]
        tables[i, :len(blocks)] = blocks.to(torch.int32)
        slots = torch.tensor([int(blocks[t // block_size]) * block_size + t % block_size for t in range(n)])
        k, v = torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)
        store_int8_reference(k, cache[0, 0], slots)
        store_int8_reference(v, cache[1, 0], slots)
        k_dense.append(k)
        v_dense.append(v)
    lens_t = torch.tensor([*lens, 0], dtype=torch.int32)
    q = torch.randn(len(lens) + 1, heads, dim, generator=g)
    ref = paged_decode_int8_reference(q, cache[0, 0], cache[1, 0], tables, lens_t, dim ** -0.5)
    there = [Int8Pages(p.values.to(KERNEL_DEVICE), p.scales.to(KERNEL_DEVICE)) for p in (cache[0, 0], cache[1, 0])]
    out = paged_decode_int8_triton(q.to(KERNEL_DEVICE), *there, tables.to(KERNEL_DEVICE), lens_t.to(KERNEL_DEVICE),
                                   dim ** -0.5, tile_tokens=tile).cpu()
    torch.testing.assert_close(out[:-1], ref[:-1], rtol=1e-4, atol=1e-5)
    assert torch.equal(ref[-1], torch.zeros_like(ref[-1]))
    for i in range(len(lens)):  # near attention over the float keys/values
        dense = dense_attention(q[i:i + 1], k_dense[i], v_dense[i], dim ** -0.5)
        torch.testing.assert_close(ref[i:i + 1], dense, rtol=0, atol=0.05)


def test_dequantize_blocks_renumbers_tables():
    cache = Int8KVCache.zeros(1, 4, 2, 1, 8, torch.device("cpu"))
    store_int8_reference(torch.ones(3, 1, 8), cache[0, 0], torch.tensor([6, 7, 2]))
    blocks, tables = dequantize_blocks(cache[0, 0], torch.tensor([[3, 1], [1, -1]], dtype=torch.int32), torch.float32)
    assert tables.tolist() == [[0, 1], [2, -1]]
    assert torch.allclose(blocks[0], torch.ones(2, 1, 8)) and torch.allclose(blocks[1, 0], torch.ones(1, 8))


def test_int8_spec_halves_bf16_bytes_plus_scales():
    bf16 = KVCacheSpec(28, 8, 128, 16, torch.bfloat16)
    int8 = KVCacheSpec(28, 8, 128, 16, torch.int8)
    assert int8.bytes_per_block == bf16.bytes_per_block // 2 + 2 * 28 * 8 * 4
    assert int8.num_blocks(1 << 30, 4096) > 1.9 * bf16.num_blocks(1 << 30, 4096)


QUESTION = "Is there roadwork in this image? Answer Yes or No."


def test_engine_int8_cache_close_to_float_cache(tmp_path):
    make_qwen3_vl(tmp_path, seed=2)
    images = [random_image(40 + 8 * i, 56, seed=20 + i) for i in range(4)]
    runs = {}
    for kv in ("auto", "int8"):
        engine = VLMEngine.load(tmp_path, config=VLMEngineConfig(kv_cache_bytes=1 << 22, max_model_len=256,
                                                                 block_size=8, kv_cache_dtype=kv))
        assert isinstance(engine.runner.kv_cache, Int8KVCache) == (kv == "int8")
        scores = [s.p_yes for s in engine.score(images, QUESTION)]
        texts = engine.generate([QUESTION] * 2, [[images[0]], [images[1]]],
                                SamplingParams(max_new_tokens=12, ignore_eos=True))
        runs[kv] = scores, [t.token_ids for t in texts]
    assert max(abs(a - b) for a, b in zip(runs["auto"][0], runs["int8"][0])) < 0.02
    agree = sum(a == b for x, y in zip(runs["auto"][1], runs["int8"][1]) for a, b in zip(x, y))
    assert agree >= 20, (agree, runs)


def test_bundle_key_and_budget_count_int8(tmp_path):
    """kv_cache_dtype in cascade.toml; the startup budget check counts int8 bytes: 0.001 GiB is too little for one
    4096-token fp32 sequence of the tiny VLM (3 MiB) but enough in int8 (0.76 MiB)."""
    from runtime.cascade.bundle import VLMStageSpec, parse_vlm_stage, toml_table, STAGE_KINDS
    from runtime.cascade.vlm_memory import engine_config
    from runtime.errors import ModelLoadError
    make_qwen3_vl(tmp_path / "vlm", seed=2)
    keys = STAGE_KINDS["vlm"][1]
    spec = parse_vlm_stage(tmp_path, toml_table({"model": "vlm", "kv_cache_dtype": "int8", "kv_cache_gb": 0.001},
                                                "stage 2", keys), False)
    assert spec.kv_cache_dtype == "int8"
    with pytest.raises(ModelLoadError, match=r"kv_cache_dtype='fp8' is not supported \(supported: auto, int8\)"):
        parse_vlm_stage(tmp_path, toml_table({"model": "vlm", "kv_cache_dtype": "fp8"}, "stage 2", keys), False)
    cpu = torch.device("cpu")
    assert engine_config(spec, "stage 2", cpu, torch.float32).kv_cache_dtype == "int8"
    with pytest.raises(ModelLoadError, match="less than one 4096-token sequence needs .* of torch.float32 keys"):
        engine_config(VLMStageSpec("vlm", spec.model, kv_cache_gb=0.001), "stage 2", cpu, torch.float32)
