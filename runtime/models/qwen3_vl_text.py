"""Qwen3-VL language model: Qwen3 decoder layers (GQA, per-head q/k RMSNorm, SwiGLU MLP) with interleaved
multimodal RoPE over (t, h, w) positions, DeepStack visual features added after the first layers, and attention
over the paged KV cache.

One forward call takes a flat batch of tokens from several sequences (varlen): the prefill sequences' new tokens
first, then one token per decoding sequence; AttentionMetadata says which is which and where their keys go.
Parameter names equal the checkpoint's under `model.language_model.`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.kv_int8 import Int8Pages, int8_attention
from kernels.kv_store import kv_store
from kernels.paged_attention import paged_decode, paged_prefill
from runtime.config import ConfigReader
from runtime.models.vit_block import activation, rotate_half
from runtime.errors import ModelLoadError

SOURCE = "config.json text_config"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    attention_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, cfg: dict) -> TextConfig:
        r = ConfigReader(cfg, SOURCE)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelLoadError(f"{SOURCE}: rope_type {rope_type!r} is not supported (only 'default')")
        if rope.get("mrope_interleaved") is False:
            raise ModelLoadError(f"{SOURCE}: mrope_interleaved=false (chunked MRoPE) is not supported")
        section = tuple(rope.get("mrope_section", (24, 20, 20)))
        num_heads = r.get("num_attention_heads", int)
        hidden = r.get("hidden_size", int)
        out = cls(
            vocab_size=r.get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=r.get("intermediate_size", int),
            num_layers=r.get("num_hidden_layers", int),
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            hidden_act=cfg.get("hidden_act", "silu"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 5_000_000.0))),
            mrope_section=section,
            attention_bias=bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 128000),
        )
        out.validate()
        return out

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{SOURCE}: num_attention_heads {self.num_heads} is not a multiple of "
                                 f"num_key_value_heads {self.num_kv_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ModelLoadError(f"{SOURCE}: rope_parameters.mrope_section {list(self.mrope_section)} must be 3 "
                                 f"numbers summing to head_dim / 2 = {self.head_dim // 2}")
        if self.mrope_section[1] > self.mrope_section[0] or self.mrope_section[2] > self.mrope_section[0]:
            raise ModelLoadError(f"{SOURCE}: rope_parameters.mrope_section {list(self.mrope_section)}: interleaving "
                                 "needs the t section to be the largest")
        activation(self.hidden_act)


@dataclass
class AttentionMetadata:
    """Where the tokens of one forward call come from and where their keys/values go.

    Tokens [0, num_prefill_tokens) are the prefill sequences' new tokens back to back (prefill_cu_seqlens);
    the remaining tokens are one per decoding sequence."""

    slot_mapping: torch.Tensor  # (tokens,) flat cache slot of each token; -1 = padding, not stored
    num_prefill_tokens: int
    prefill_cu_seqlens: list[int]  # (prefill seqs + 1,) offsets of each sequence's new tokens
    prefill_context_lens: list[int]  # cached + new tokens of each prefill sequence
    prefill_block_tables: torch.Tensor  # (prefill seqs, max blocks) int32, -1 padded
    decode_context_lens: torch.Tensor  # (decode seqs,) int32, including the token being decoded
    decode_block_tables: torch.Tensor  # (decode seqs, max blocks) int32, -1 padded
    # Planned decode attention (runtime/vlm/attention.py), paged_decode's signature.
    decode_attention: Callable[..., torch.Tensor] = paged_decode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel for the normalization in float32 (~5x faster on CPU than pow/mean/rsqrt/mul, and
        # equal to them); the cast and the weight stay outside, as in the reference.
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * xf.to(x.dtype)


class MultimodalRope(nn.Module):
    """Interleaved MRoPE: frequency j rotates by the h position when j % 3 == 1 (first mrope_section[1] such j),
    by the w position when j % 3 == 2 (first mrope_section[2]), else by the t position."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        # Plain attributes, not buffers: built on the CPU even when the module is built on the meta device.
        cpu = torch.device("cpu")
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=cpu)
                                                 / cfg.head_dim)
        self.axis = torch.zeros(cfg.head_dim // 2, dtype=torch.long, device=cpu)
        self.axis[1:3 * cfg.mrope_section[1]:3] = 1
        self.axis[2:3 * cfg.mrope_section[2]:3] = 2

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, tokens) -> cos, sin (tokens, head_dim) in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq, self.axis = self.inv_freq.to(positions.device), self.axis.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (3, tokens, half)
        freqs = freqs.gather(0, self.axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class PagedSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(k_cache, Int8Pages):  # kv_cache_dtype = "int8": its own store and attention kernels
            out = int8_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))
        kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        p = meta.num_prefill_tokens
        parts = []
        if p:
            parts.append(paged_prefill(q[:p], k[:p], v[:p], k_cache, v_cache, meta.prefill_cu_seqlens,
                                       meta.prefill_context_lens, meta.prefill_block_tables, self.scale))
        if n > p:
            parts.append(meta.decode_attention(q[p:], k_cache, v_cache, meta.decode_block_tables,
                                               meta.decode_context_lens, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = PagedSelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = MultimodalRope(cfg)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, visual_rows: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] = ()) -> torch.Tensor:
        """embeds (tokens, hidden) with image features already in place; positions (3, tokens); kv_cache
        (2, layers, blocks, block_size, kv_heads, head_dim). DeepStack feature i (rows, hidden) is added at
        `visual_rows` after layer i. Returns the final-normed hidden states (tokens, hidden)."""
        assert kv_cache.shape[1] == len(self.layers), (tuple(kv_cache.shape), len(self.layers))
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, kv_cache[0, i], kv_cache[1, i])
            if i < len(deepstack):
                # In place on the layer's fresh output; rows are unique, so this equals index_add, which runs
                # serially on CPU (~7x slower at 32 images).
                x[visual_rows] += deepstack[i].to(x.dtype)
        return self.norm(x)
