"""Block accounting: allocation from a byte budget, prefix-cache hits, image keys, sharing, freeing, eviction."""
from __future__ import annotations

import pytest
import torch

from runtime.vlm.block_manager import BlockManager, KVCacheSpec
from runtime.vlm.sequence import image_digest, image_key
from fixtures.sequences import make_seq

BS = 4


def admit(bm: BlockManager, seq) -> list[int]:
    matched = bm.match_prefix(seq)
    assert bm.can_allocate(seq, matched)
    bm.allocate(seq, matched)
    bm.commit(seq, len(seq))  # as after its prefill step: every token's keys/values written
    return matched


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_budget_sets_block_count_and_rejects_too_small():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 3 * 8 * 2 * 16 * 4
    cache = spec.allocate(10 * spec.bytes_per_block + 5, max_model_len=80, device=torch.device("cpu"))
    assert cache.shape == (2, 3, 10, 8, 2, 16)
    bf16 = KVCacheSpec(3, 2, 16, 8, torch.bfloat16)
    assert bf16.num_blocks(10 * spec.bytes_per_block, 80) == 20
    with pytest.raises(ValueError, match=r"holds 9 blocks .* fewer than the 10 blocks one max_model_len=80 "
                                         r"sequence needs; give at least 61440 bytes"):
        spec.num_blocks(10 * spec.bytes_per_block - 1, 80)


def test_fresh_allocation_and_free():
    bm = BlockManager(8, BS)
    seq = make_seq(0, range(10))
    assert admit(bm, seq) == []
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5 and seq.num_cached_tokens == 0
    assert len(bm.cached) == 2  # the two full blocks; the partial third is not registered
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and ref_counts(bm) == [0] * 8


def test_prefix_hit_shares_blocks_and_counts_references():
    bm = BlockManager(16, BS)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    admit(bm, a)
    b = make_seq(1, [1, 2, 3, 4, 5, 6, 7, 8, 42, 43, 44])
    assert admit(bm, b) == a.block_table[:2]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 3 - 1
    bm.free(a)  # b still holds the shared prefix
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16 and sum(ref_counts(bm)) == 0


def test_divergence_in_first_block_misses_everything():
    bm = BlockManager(16, BS)
    admit(bm, make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first one: chained hashes make the second block miss too.
    assert bm.match_prefix(make_seq(1, [0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_block_holding_the_last_token_is_never_matched():
    bm = BlockManager(16, BS)
    a = make_seq(0, range(8))
    admit(bm, a)
    b = make_seq(1, range(8))  # identical prompt, exactly two blocks
    assert admit(bm, b) == a.block_table[:1]
    assert b.num_cached_tokens == 4  # the last block is recomputed so its logits exist
    blocks_a = list(a.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.match_prefix(make_seq(2, range(9))) == blocks_a  # a longer prompt reuses both


def test_image_placeholders_are_keyed_by_image_content():
    red, blue = torch.zeros(8, 8, 3, dtype=torch.uint8), torch.zeros(8, 8, 3, dtype=torch.uint8)
    blue[..., 2] = 255
    assert image_digest(red) == image_digest(red.clone()) != image_digest(blue)
    pad = 5
    tokens = [1, 2, pad, pad, pad, pad, pad, pad, pad, pad, 9, 9]

    def with_image(seq_id, image):
        keys = [t if t != pad else image_key(image_digest(image)) for t in tokens]
        return make_seq(seq_id, tokens, keys)

    bm = BlockManager(16, BS)
    admit(bm, with_image(0, red))
    # Same placeholder token ids, other pixels: only the text-only first block is shared.
    assert len(bm.match_prefix(with_image(1, blue))) == 0
    assert len(bm.match_prefix(with_image(2, red.clone()))) == 2


def test_hash_collision_is_caught_by_key_check():
    bm = BlockManager(8, BS)
    a = make_seq(0, range(9))
    admit(bm, a)
    # Make block 1's stored keys disagree with its hash, as a colliding block would.
    bm.blocks[a.block_table[1]].keys = (9, 9, 9, 9)
    assert bm.match_prefix(make_seq(1, range(9))) == a.block_table[:1]


def test_lazy_eviction_keeps_freed_blocks_reusable_until_reallocated():
    bm = BlockManager(6, BS)
    a = make_seq(0, range(13))  # 4 blocks, 3 of them full and registered
    admit(bm, a)
    blocks_a = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6 and len(bm.cached) == 3
    # Freed blocks are still hits.
    again = make_seq(1, range(13))
    assert bm.match_prefix(again) == blocks_a[:3]
    # Free list, front first: the 2 never-used blocks, then a's blocks tail first (its partial last block, then
    # blocks 2, 1, 0). Taking 4 blocks reuses a's partial block and evicts its block 2; its prefix survives.
    other = make_seq(2, [100 + i for i in range(16)])
    admit(bm, other)
    assert bm.match_prefix(again) == blocks_a[:2]
    assert set(blocks_a[2:]) <= set(other.block_table) and len(bm.cached) == 2 + 4
    bm.free(other)
    bm.free(make_seq(3, []))  # freeing an empty sequence is a no-op
    assert bm.num_free_blocks == 6


def test_can_allocate_counts_reclaimed_cached_blocks():
    bm = BlockManager(4, BS)
    a = make_seq(0, range(9))  # 3 blocks
    admit(bm, a)
    bm.free(a)
    hog = make_seq(1, [50])  # takes the only never-used block
    admit(bm, hog)
    assert bm.num_free_blocks == 3
    b = make_seq(2, range(12))  # 3 blocks: 2 matched (both on the free list) + 1 fresh
    matched = bm.match_prefix(b)
    assert len(matched) == 2 and bm.can_allocate(b, matched)
    c = make_seq(3, range(16))  # 4 blocks: 3 matched + 1 fresh, but only 3 free in all
    assert not bm.can_allocate(c, bm.match_prefix(c))


def test_append_slot_adds_a_block_at_boundaries_and_commit_registers_decoded_blocks():
    bm = BlockManager(8, BS)
    seq = make_seq(0, range(3))
    admit(bm, seq)
    for t in range(3, 9):  # generate: token t-1's keys are written by the step that appends token t
        seq.token_ids.append(t)
        bm.append_slot(seq)
        assert len(seq.block_table) == -(-len(seq) // BS)
        bm.commit(seq, len(seq))
    assert len(seq.block_table) == 3 and seq.num_hashed_blocks == 2
    # A request with the generated text as its prompt reuses the decoded blocks.
    assert bm.match_prefix(make_seq(1, range(10))) == seq.block_table[:2]
