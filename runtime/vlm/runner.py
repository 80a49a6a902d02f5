"""Turns a scheduled batch into one model forward: flat token ids, multimodal positions, cache slots, attention
metadata, and the image features of the images whose placeholders are not cached. Returns each sequence's
last-position logits.

Decode attention goes through a planned backend (runtime/vlm/attention.py: flashinfer, Triton or the torch
reference). With decode graphs on, a decode-only step runs padded to a batch bucket through static buffers
(runtime/vlm/decode_graphs.py), captured as CUDA graphs on CUDA; steps with prefills run eagerly.

Vision-tower outputs are kept in a small LRU keyed by image content, so an image whose prompt is only partly
cached (same image, another question) does not run the vision tower again."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from graphs.nvtx import nvtx_range
from runtime.vlm.decode_graphs import DecodeGraphs, decode_inputs
from graphs.runner import default_buckets
from runtime.vlm.attention import (FLASHINFER_WORKSPACE_BYTES, DecodeAttention, DecodeAttentionSpec,
                                   choose_decode_backend, flashinfer_module, flashinfer_unusable, make_decode_attention)
from runtime.models.qwen3_vl import Qwen3VL
from runtime.models.qwen3_vl_text import AttentionMetadata
from runtime.vlm.scheduler import ScheduledBatch
from runtime.vlm.sequence import ImageInput, Sequence

log = logging.getLogger(__name__)


class VisionCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[int, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, digest: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.entries.move_to_end(digest)
            self.hits += 1
        else:
            self.misses += 1
        return entry

    def put(self, digest: int, features: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
        if self.max_entries <= 0:
            return
        self.entries[digest] = features
        self.entries.move_to_end(digest)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def _block_tables(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    width = max((len(s.block_table) for s in seqs), default=0)
    table = torch.full((len(seqs), max(width, 1)), -1, dtype=torch.int32)
    for i, s in enumerate(seqs):
        table[i, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    return table.to(device)


class ModelRunner:
    def __init__(self, model: Qwen3VL, kv_cache: torch.Tensor, block_size: int, vision_cache_entries: int = 16, *,
                 max_num_seqs: int = 0, max_model_len: int = 0, decode_graphs: bool = False,
                 attention_backend: str = "auto"):
        """decode_graphs: decode-only steps of up to max_num_seqs sequences of up to max_model_len tokens run
        padded to batch buckets, as CUDA graphs on CUDA (captured here) and eagerly elsewhere.
        attention_backend: "auto" (flashinfer, else Triton on CUDA; the torch reference on CPU) or a name."""
        assert kv_cache.shape[3] == block_size, (tuple(kv_cache.shape), block_size)
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.vision_cache = VisionCache(vision_cache_entries)
        text = model.cfg.text
        self.attention_spec = DecodeAttentionSpec(text.num_heads, text.num_kv_heads, text.head_dim, block_size,
                                                  kv_cache.dtype, text.head_dim ** -0.5)
        self.attention_note = ""  # why "auto" did not pick flashinfer after all (logged, and in /v1/models)
        if attention_backend == "auto":
            # flashinfer is looked for (and its absence logged) only where it could run
            have_flashinfer = self.device.type == "cuda" and flashinfer_module() is not None
            attention_backend = choose_decode_backend(self.device, kv_cache.dtype, text.head_dim, have_flashinfer,
                                                      text.num_heads // text.num_kv_heads)
        # flashinfer's wrappers share one float workspace (zeroed before first use, as flashinfer asks).
        self.workspace = (torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
                          if attention_backend == "flashinfer" else None)
        if self.workspace is not None:
            why = flashinfer_unusable(self.attention_spec, self.workspace)
            if why is not None:
                self.attention_note = f"flashinfer unusable: {why}; using the Triton kernel"
                log.warning("VLM decode attention: %s", self.attention_note)
                attention_backend, self.workspace = "triton", None
        self.attention_backend = attention_backend
        self.decode_attention = self.new_decode_attention()
        self.decode_graphs: DecodeGraphs | None = None
        if decode_graphs:
            assert max_num_seqs >= 1 and max_model_len >= 1, (max_num_seqs, max_model_len)
            max_blocks = -(-max_model_len // block_size)
            self.decode_graphs = DecodeGraphs(
                model, kv_cache, block_size, max_blocks, default_buckets(max_num_seqs),
                lambda b: self.new_decode_attention(fixed_batch=b, max_pages=b * max_blocks))
            self.decode_graphs.capture()
            log.info("VLM decode: %s attention, batch buckets %s (%s)", attention_backend, self.decode_graphs.buckets,
                     "CUDA graphs" if self.decode_graphs.graphs.use_cuda_graphs else "eager")
        else:
            log.info("VLM decode: %s attention, eager", attention_backend)

    def new_decode_attention(self, fixed_batch: int | None = None, max_pages: int = 0) -> DecodeAttention:
        return make_decode_attention(self.attention_backend, self.attention_spec, self.workspace, fixed_batch,
                                     max_pages)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[i // bs] * bs + i % bs for i in range(start, end)]

    def image_features(self, images: list[ImageInput]) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Vision features by digest for `images`: cached ones looked up, the rest in one vision-tower call."""
        features: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        todo: list[ImageInput] = []
        for image in images:
            if image.digest in features or any(t.digest == image.digest for t in todo):
                continue
            cached = self.vision_cache.get(image.digest)
            if cached is not None:
                features[image.digest] = cached
            else:
                todo.append(image)
        if todo:
            rows = torch.cat([t.pixel_rows for t in todo]) if len(todo) > 1 else todo[0].pixel_rows
            embeds, deepstack = self.model.encode_images(rows, [t.grid for t in todo])
            start = 0
            for t in todo:
                part = slice(start, start + t.num_tokens)
                # Copies: a cached view would keep the whole batch's features alive.
                features[t.digest] = (embeds[part].clone(), [d[part].clone() for d in deepstack])
                self.vision_cache.put(t.digest, features[t.digest])
                start += t.num_tokens
        return features

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, all_positions: bool = False) -> torch.Tensor:
        """(sequences, vocab) float32 logits at each sequence's last token, prefill sequences first; with
        all_positions, (tokens, vocab) at every token computed (the uncached prompt tokens, then decodes)."""
        if self.decode_graphs is not None and not batch.prefill and len(batch.decode) <= self.decode_graphs.max_batch:
            with nvtx_range("vlm decode"):
                return self.decode_graphs.run(batch.decode)  # a decode step computes only last tokens
        with nvtx_range("vlm prefill" if batch.prefill else "vlm decode"):
            return self._run_eager(batch, all_positions)

    def _run_eager(self, batch: ScheduledBatch, all_positions: bool) -> torch.Tensor:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        last_rows: list[int] = []
        # (first flat row, image, first and end token within the image) of each run of uncached placeholders
        image_runs: list[tuple[int, ImageInput, int, int]] = []
        for seq in batch.prefill:
            start, end = seq.num_cached_tokens, len(seq)
            base = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.append(seq.position_ids(start, end))
            slots.extend(self.slots(seq, start, end))
            for image in seq.images:
                lo, hi = max(image.start, start), min(image.end, end)
                if lo < hi:
                    image_runs.append((base + lo - start, image, lo - image.start, hi - image.start))
            cu.append(len(ids))
            context_lens.append(end)
            last_rows.append(len(ids) - 1)
        num_prefill = len(ids)
        width = max((len(s.block_table) for s in batch.decode), default=1)
        decode = decode_inputs(batch.decode, self.block_size, len(batch.decode), width)
        ids.extend(decode.token_ids.tolist())
        positions.append(decode.positions)
        last_rows.extend(range(num_prefill, len(ids)))
        if batch.decode:
            self.decode_attention.plan(decode.block_tables, decode.context_lens)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat([torch.tensor(slots, dtype=torch.int64), decode.slot_mapping]).to(dev),
            num_prefill_tokens=num_prefill,
            prefill_cu_seqlens=cu,
            prefill_context_lens=context_lens,
            prefill_block_tables=_block_tables(batch.prefill, dev),
            decode_context_lens=decode.context_lens.to(dev),
            decode_block_tables=decode.block_tables.to(dev),
            decode_attention=self.decode_attention,
        )
        rows = embeds = None
        deepstack: list[torch.Tensor] = []
        if image_runs:
            features = self.image_features([image for _, image, _, _ in image_runs])
            rows = torch.cat([torch.arange(row, row + hi - lo) for row, _, lo, hi in image_runs]).to(dev)
            embeds = torch.cat([features[image.digest][0][lo:hi] for _, image, lo, hi in image_runs])
            num_deepstack = len(self.model.cfg.vision.deepstack_visual_indexes)
            deepstack = [torch.cat([features[image.digest][1][d][lo:hi] for _, image, lo, hi in image_runs])
                         for d in range(num_deepstack)]
        hidden = self.model(torch.tensor(ids, dtype=torch.int64).to(dev), torch.cat(positions, dim=1).to(dev),
                            meta, self.kv_cache, rows, embeds, deepstack)
        if not all_positions:
            hidden = hidden[torch.tensor(last_rows, device=dev)]
        return self.model.logits(hidden).float()
