"""Paged KV cache: one preallocated tensor of fixed-size blocks, and the block manager that hands them out.

Prefix caching: a full block is registered under a chained hash of (parent block's hash, the block's keys). Keys
are token ids, except image placeholders, which are keyed by the image's content hash, so a repeated image +
prompt finds its blocks, and the same placeholders over a different image do not. A hit is accepted only if the
stored block's parent hash and keys equal the looked-up ones (no silent hash collisions).

Blocks are reference counted, so sequences share prefix blocks. A block whose count drops to 0 goes to the back
of the free list but keeps its hash: it is reused on a later hit until it is reallocated from the front of the
list (lazy eviction, least recently freed first). Only blocks whose keys/values are written are registered."""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from kernels.kv_int8 import Int8KVCache, scale_bytes_per_block
from runtime.vlm.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the run dtype, or torch.int8 (kernels/kv_int8.py: values plus per-block-per-head scales)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        scales = scale_bytes_per_block(self.num_layers, self.num_kv_heads) if self.dtype == torch.int8 else 0
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize + scales

    def num_blocks(self, budget_bytes: int, max_model_len: int) -> int:
        """Blocks that fit in `budget_bytes`; raises ValueError when one max_model_len sequence does not fit."""
        blocks = budget_bytes // self.bytes_per_block
        needed = -(-max_model_len // self.block_size)
        if blocks < needed:
            raise ValueError(
                f"kv_cache_bytes={budget_bytes} holds {blocks} blocks of {self.block_size} tokens "
                f"({self.bytes_per_block} bytes each: 2 x {self.num_layers} layers x {self.block_size} tokens x "
                f"{self.num_kv_heads} kv heads x {self.head_dim} dims x {self.dtype}), fewer than the {needed} "
                f"blocks one max_model_len={max_model_len} sequence needs; give at least "
                f"{needed * self.bytes_per_block} bytes or lower max_model_len")
        return blocks

    def allocate(self, budget_bytes: int, max_model_len: int, device: torch.device) -> torch.Tensor | Int8KVCache:
        """(2, layers, blocks, block_size, kv_heads, head_dim) zeros: [0] keys, [1] values."""
        blocks = self.num_blocks(budget_bytes, max_model_len)
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s) on %s", blocks, self.block_size,
                 blocks * self.bytes_per_block / 2**20, self.dtype, device)
        if self.dtype == torch.int8:
            return Int8KVCache.zeros(self.num_layers, blocks, self.block_size, self.num_kv_heads, self.head_dim, device)
        return torch.zeros(2, self.num_layers, blocks, self.block_size, self.num_kv_heads, self.head_dim,
                           dtype=self.dtype, device=device)


def chain_hash(parent: int | None, keys: list[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update((-1 if parent is None else parent).to_bytes(9, "little", signed=True))
    h.update(np.asarray(keys, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its keys/values are written
    parent_hash: int | None = None
    keys: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front: evict first
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hash(self, seq: Sequence, i: int) -> int:
        """Chained hash of seq's full block i, memoized on seq (a full block's keys never change)."""
        assert (i + 1) * self.block_size <= len(seq), (i, len(seq))
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else None
            seq.block_hashes.append(chain_hash(parent, seq.keys(j * self.block_size, (j + 1) * self.block_size)))
        return seq.block_hashes[i]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks that hold seq's leading full blocks. The block holding the last token is
        never matched: its logits must be computed, and full shared blocks are never written again."""
        matched: list[int] = []
        for i in range((len(seq) - 1) // self.block_size):
            h = self.block_hash(seq, i)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = seq.block_hashes[i - 1] if i else None
            keys = tuple(seq.keys(i * self.block_size, (i + 1) * self.block_size))
            if block.hash != h or block.parent_hash != parent or block.keys != keys:
                log.warning("prefix cache: hash collision on block %d, recomputing", block_id)
                break
            matched.append(block_id)
        return matched

    def can_allocate(self, seq: Sequence, matched: list[int]) -> bool:
        # Matched blocks that sit on the free list are taken off it, like fresh ones.
        reclaimed = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        return self.num_free_blocks >= self.blocks_needed(len(seq)) - len(matched) + reclaimed

    def allocate(self, seq: Sequence, matched: list[int]) -> None:
        """Give seq its blocks: the matched prefix (shared), then fresh ones for the rest of its tokens."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        assert self.can_allocate(seq, matched)
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
        seq.block_table = list(matched)
        seq.num_cached_tokens = len(matched) * self.block_size
        seq.num_hashed_blocks = len(matched)
        for _ in range(self.blocks_needed(len(seq)) - len(matched)):
            seq.block_table.append(self._take_free_block())

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.blocks_needed(len(seq)) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for seq's last token, whose keys/values the next decode step writes."""
        if len(seq.block_table) < self.blocks_needed(len(seq)):
            seq.block_table.append(self._take_free_block())
        assert len(seq.block_table) == self.blocks_needed(len(seq))

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Register seq's full blocks among its first `num_computed` tokens (keys/values written)."""
        for i in range(seq.num_hashed_blocks, num_computed // self.block_size):
            h = self.block_hash(seq, i)
            block = self.blocks[seq.block_table[i]]
            assert block.hash is None and block.ref_count == 1, (block, seq.seq_id)
            block.hash, block.parent_hash = h, seq.block_hashes[i - 1] if i else None
            block.keys = tuple(seq.keys(i * self.block_size, (i + 1) * self.block_size))
            # A block computed twice (e.g. by two sequences in one batch) stays registered once.
            self.cached.setdefault(h, block.block_id)
            seq.num_hashed_blocks = i + 1

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks are freed first, so they are evicted before shared prefix blocks."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, block
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _take_free_block(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evict: the block's contents are about to be overwritten
        block.hash, block.parent_hash, block.keys = None, None, ()
        block.ref_count = 1
        return block_id
