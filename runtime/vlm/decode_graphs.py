"""Decode-only steps of the VLM over fixed batch buckets with static inputs, captured as CUDA graphs on CUDA.

A batch of n decoding sequences is padded to the smallest bucket >= n (decode_inputs): padding rows have token 0,
position 0, slot -1 (the KV-store kernel stores nothing for it), a block-table row of -1 and context length 0.
Each bucket's forward reads the leading rows of the static buffers; BucketGraphs captures one graph per bucket
(largest first, one memory pool) and replays it, or runs it eagerly off CUDA. The decode attention of a bucket is
planned on the host before each replay, outside the graph."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from graphs.runner import BucketGraphs, weak_method
from runtime.vlm.attention import DecodeAttention
from runtime.models.qwen3_vl import Qwen3VL
from runtime.models.qwen3_vl_text import AttentionMetadata
from runtime.vlm.sequence import Sequence


@dataclass
class DecodeInputs:
    """One decode step's inputs on the CPU, rows past the real sequences padded."""

    token_ids: torch.Tensor  # (rows,) int64
    positions: torch.Tensor  # (3, rows) int64 multimodal RoPE positions
    slot_mapping: torch.Tensor  # (rows,) int64 flat cache slot of the token being decoded; -1: padding
    block_tables: torch.Tensor  # (rows, width) int32, -1 padded
    context_lens: torch.Tensor  # (rows,) int32 tokens including the one being decoded; 0: padding


def decode_inputs(seqs: list[Sequence], block_size: int, rows: int, width: int) -> DecodeInputs:
    """Inputs that decode each sequence's last token, in rows [0, len(seqs)); the rest are padding."""
    assert len(seqs) <= rows, f"{len(seqs)} sequences do not fit {rows} rows"
    token_ids = torch.zeros(rows, dtype=torch.int64)
    positions = torch.zeros(rows, dtype=torch.int64)
    slots = torch.full((rows,), -1, dtype=torch.int64)
    tables = torch.full((rows, width), -1, dtype=torch.int32)
    context_lens = torch.zeros(rows, dtype=torch.int32)
    for row, seq in enumerate(seqs):
        i = len(seq) - 1
        # The token being decoded was generated, so it follows the prompt: t = h = w = index + rope delta.
        assert i >= seq.num_prompt_tokens, (seq.seq_id, i)
        assert len(seq.block_table) <= width, (
            f"sequence {seq.seq_id} holds {len(seq.block_table)} blocks, more than the block-table width {width}")
        token_ids[row] = seq.last_token_id
        positions[row] = i + seq.rope_delta
        slots[row] = seq.block_table[i // block_size] * block_size + i % block_size
        tables[row, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        context_lens[row] = len(seq)
    return DecodeInputs(token_ids, positions.expand(3, -1), slots, tables, context_lens)


class DecodeGraphs:
    """Static decode inputs for up to buckets[-1] sequences of up to max_blocks_per_seq blocks, and one forward
    per bucket: (bucket, vocab) float32 logits. attention(bucket) gives the decode attention of that bucket's
    forward (flashinfer's CUDA-graph wrappers have a fixed batch size, so one each)."""

    def __init__(self, model: Qwen3VL, kv_cache: torch.Tensor, block_size: int, max_blocks_per_seq: int,
                 buckets: tuple[int, ...], attention: Callable[[int], DecodeAttention],
                 use_cuda_graphs: bool | None = None):
        assert kv_cache.shape[3] == block_size, (tuple(kv_cache.shape), block_size)
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.width = max_blocks_per_seq
        self.graphs = BucketGraphs(weak_method(self._forward), buckets, kv_cache.device, use_cuda_graphs)
        self.attention = {b: attention(b) for b in buckets}
        rows, dev = self.graphs.max_batch, kv_cache.device
        self.token_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(3, rows, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((rows, self.width), -1, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.no_prefill_tables = torch.zeros(0, 1, dtype=torch.int32, device=dev)
        self.steps: Counter[int] = Counter()  # decode steps run, by bucket

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.graphs.buckets

    @property
    def max_batch(self) -> int:
        return self.graphs.max_batch

    def _forward(self, b: int) -> tuple[torch.Tensor, ...]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], num_prefill_tokens=0, prefill_cu_seqlens=[0],
            prefill_context_lens=[], prefill_block_tables=self.no_prefill_tables,
            decode_context_lens=self.context_lens[:b], decode_block_tables=self.block_tables[:b],
            decode_attention=self.attention[b])
        hidden = self.model(self.token_ids[:b], self.positions[:, :b], meta, self.kv_cache)
        return (self.model.logits(hidden).float(),)

    def _load(self, inputs: DecodeInputs) -> None:
        b = inputs.token_ids.shape[0]
        self.token_ids[:b].copy_(inputs.token_ids)
        self.positions[:, :b].copy_(inputs.positions)
        self.slot_mapping[:b].copy_(inputs.slot_mapping)
        self.block_tables[:b].copy_(inputs.block_tables)
        self.context_lens[:b].copy_(inputs.context_lens)
        self.attention[b].plan(inputs.block_tables, inputs.context_lens)

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> None:
        """Run every bucket once and, on CUDA, capture its graph; all rows are padding, so the KV cache is not
        written. pool: a torch.cuda.graph_pool_handle() shared with other graphs of the device, or a new one."""
        padding = decode_inputs([], self.block_size, self.max_batch, self.width)
        with self.graphs.on_device():
            self._load(padding)
            for b in self.buckets[:-1]:
                self.attention[b].plan(padding.block_tables[:b], padding.context_lens[:b])
        self.graphs.warmup(pool)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """(len(seqs), vocab) float32 logits of one decode step (a copy: the static outputs are reused)."""
        n = len(seqs)
        b = self.graphs.bucket_for(n)
        with self.graphs.on_device():  # flashinfer plans on the current device's stream
            self._load(decode_inputs(seqs, self.block_size, b, self.width))
        logits, = self.graphs.replay(b)
        self.steps[b] += 1
        return logits[:n].clone()

    def close(self) -> None:
        """The graphs first, then the attention wrappers whose buffers they read. Idempotent."""
        self.graphs.close()
        self.attention.clear()
