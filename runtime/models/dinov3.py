"""DINOv3 ViT backbone: CLS + register tokens, 2D RoPE on patch tokens only, layer scale, plain or SwiGLU MLP."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from runtime.config import ConfigReader
from runtime.models.vit_block import Block, BlockConfig
from runtime.models.weights import load_into


@dataclass(frozen=True)
class DINOv3Config:
    block: BlockConfig
    num_layers: int
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    num_channels: int
    num_register_tokens: int
    rope_theta: float

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> DINOv3Config:
        r = ConfigReader(cfg, source)
        return cls(
            block=BlockConfig.from_config(
                r, 1e-5, query_bias=cfg.get("query_bias", True), key_bias=cfg.get("key_bias", False),
                value_bias=cfg.get("value_bias", True), proj_bias=cfg.get("proj_bias", True),
                mlp_bias=cfg.get("mlp_bias", True), gated_mlp=cfg.get("use_gated_mlp", False), layer_scale=True),
            num_layers=r.get("num_hidden_layers", int),
            patch_size=r.pair("patch_size", 16),
            image_size=r.pair("image_size", 224),
            num_channels=cfg.get("num_channels", 3),
            num_register_tokens=cfg.get("num_register_tokens", 0),
            rope_theta=float(cfg.get("rope_theta", 100.0)),
        )


class DINOv3ViT(nn.Module):
    """Parameter names equal the on-disk Hugging Face names (embeddings.*, layer.N.*, norm.*)."""

    def __init__(self, cfg: DINOv3Config):
        super().__init__()
        self.cfg = cfg
        c = cfg.block.hidden_size
        self.num_prefix_tokens = 1 + cfg.num_register_tokens
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.embeddings.mask_token = nn.Parameter(torch.zeros(1, 1, c))  # training-only; kept for strict loading
        self.embeddings.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, c))
        self.embeddings.patch_embeddings = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, cfg.patch_size)
        self.layer = nn.ModuleList(Block(cfg.block) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(c, eps=cfg.block.layer_norm_eps)
        head_dim = c // cfg.block.num_heads
        assert head_dim % 4 == 0, "2D RoPE splits each head into 4 parts"
        self.register_buffer("inv_freq", 1 / cfg.rope_theta ** torch.arange(0, 1, 4 / head_dim), persistent=False)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, grid_h: int, grid_w: int, dtype: torch.dtype, device: torch.device):
        """cos/sin [tokens, head_dim] for the whole sequence; identity rows for the prefix tokens."""
        key = (grid_h, grid_w, dtype, device)
        if key not in self._rope_cache:
            ys = (torch.arange(0.5, grid_h, dtype=torch.float32) / grid_h) * 2 - 1
            xs = (torch.arange(0.5, grid_w, dtype=torch.float32) / grid_w) * 2 - 1
            coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [P, 2] as (y, x)
            angles = 2 * math.pi * coords[:, :, None] * self.inv_freq.float().cpu()[None, None, :]
            angles = angles.flatten(1, 2).tile(2)
            # Cast like the reference does (fp32 trig, then model dtype), before adding identity prefix rows.
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            n, d = self.num_prefix_tokens, cos.shape[1]
            cos = torch.cat([torch.ones(n, d, dtype=dtype), cos])
            sin = torch.cat([torch.zeros(n, d, dtype=dtype), sin])
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(self, pixel_values: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        """Returns (final-normed sequence [B, prefix + patches, C], raw hidden states after each 1-based layer
        in `hidden_layers`)."""
        emb = self.embeddings
        x = emb.patch_embeddings(pixel_values.to(emb.patch_embeddings.weight.dtype))
        grid_h, grid_w = x.shape[2], x.shape[3]
        b = x.shape[0]
        x = torch.cat([emb.cls_token.expand(b, -1, -1), emb.register_tokens.expand(b, -1, -1),
                       x.flatten(2).transpose(1, 2)], dim=1)
        rope = self.rope(grid_h, grid_w, x.dtype, x.device)
        hidden = []
        for i, block in enumerate(self.layer, start=1):
            x = block(x, rope)
            if i in hidden_layers:
                hidden.append(x)
        return self.norm(x), hidden

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "",
                     source: str = "checkpoint") -> set[str]:
        """Strictly load `prefix`-ed tensors, accepting both the on-disk `layer.N.` and the in-memory
        `model.layer.N.` namings of transformers."""
        nested = any(k.startswith(prefix + "model.layer.") for k in tensors)

        def key_of(name: str) -> str:
            return prefix + ("model." + name if nested and name.startswith("layer.") else name)

        return load_into(self, tensors, dtype, source=source, key_of=key_of)
