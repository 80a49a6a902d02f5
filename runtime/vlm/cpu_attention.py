"""Decode attention over the paged KV cache on CPU, planned once per step instead of once per layer.

paged_decode_reference (kernels/paged_attention.py) rebuilds the same things in every layer: the flat block index
of every row, the visibility mask and the padding-row mask, over every column of the block table, however wide
(tables padded to max_model_len gather max_model_len tokens per row). plan() builds them once per step from the
host block tables, trimmed to the longest context; each layer then runs the reference's own gather and SDPA call
on them, so its output equals the reference's on the trimmed table bit for bit (the reference's own last bits
depend on the padded width: a differently blocked reduction).

Keys and values are cast to float32 after the gather (kernels.paged_attention.decode_keys): torch's bf16 CPU SDPA
is ~8x slower than its float32 one at one query per sequence. tests/test_cpu_attention.py checks equality with
the reference; BENCHMARKS.md section 8 has the speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.paged_attention import decode_keys


@dataclass
class CpuDecodePlan:
    blocks: torch.Tensor  # (rows * width,) int64 block ids, padding -> block 0 (masked out)
    visible: torch.Tensor  # (rows, 1, 1, width * block_size) bool: token j < context length
    live: torch.Tensor  # (rows, 1, 1) bool: context length > 0
    rows: int
    tokens: int  # width * block_size


class CpuDecodeAttention:
    """DecodeAttention (runtime/vlm/attention.py) for CPU. Not thread-safe: one runner plans and calls it."""

    name = "cpu"

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.planned: CpuDecodePlan | None = None

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
        rows = block_tables.shape[0]
        longest = int(context_lens.max()) if rows else 0
        width = max(1, -(-longest // self.block_size))
        assert width <= block_tables.shape[1], (width, tuple(block_tables.shape))
        tokens = width * self.block_size
        blocks = block_tables[:, :width].clamp(min=0).long().flatten()
        visible = (torch.arange(tokens)[None, :] < context_lens[:, None])[:, None, None, :]
        self.planned = CpuDecodePlan(blocks, visible, (context_lens > 0)[:, None, None], rows, tokens)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        plan = self.planned
        assert plan is not None and q.shape[0] == plan.rows, "plan() the step's block tables first"
        rows = q.shape[0]
        k = decode_keys(k_cache, plan.blocks, rows, plan.tokens)
        v = decode_keys(v_cache, plan.blocks, rows, plan.tokens)
        o = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, attn_mask=plan.visible, scale=scale,
                                           enable_gqa=True)
        return torch.where(plan.live, o[:, :, 0, :], 0).to(q.dtype)
