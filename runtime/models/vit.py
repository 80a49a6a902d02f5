"""Hugging Face ViT backbone (the NATIX reference miner's ViTForImageClassification architecture)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from runtime.config import ConfigReader
from runtime.models.vit_block import Block, BlockConfig
from runtime.errors import ModelLoadError
from runtime.models.weights import load_into

# Our parameter name -> on-disk name under the `vit.` prefix, as ViTForImageClassification saves it.
DISK_NAMES = [
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"layer\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"layer\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"layer\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"layer\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"layer\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"layer\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layer\.(\d+)\.mlp\.up_proj\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layer\.(\d+)\.mlp\.down_proj\.", r"encoder.layer.\1.output.dense."),
    (r"norm\.", r"layernorm."),
]
# Present in some ViT checkpoints but unused by classification.
UNUSED_PREFIXES = ("pooler.", "embeddings.mask_token")


def disk_name(name: str) -> str:
    for pattern, replacement in DISK_NAMES:
        new, n = re.subn("^" + pattern, replacement, name)
        if n:
            return new
    return name


@dataclass(frozen=True)
class ViTConfig:
    block: BlockConfig
    num_layers: int
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    num_channels: int

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ViTConfig:
        r = ConfigReader(cfg, source)
        qkv_bias = cfg.get("qkv_bias", True)
        return cls(
            block=BlockConfig.from_config(r, 1e-12, query_bias=qkv_bias, key_bias=qkv_bias, value_bias=qkv_bias),
            num_layers=r.get("num_hidden_layers", int),
            patch_size=r.pair("patch_size", 16),
            image_size=r.pair("image_size", 224),
            num_channels=cfg.get("num_channels", 3),
        )


class ViT(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.block.hidden_size
        grid = (cfg.image_size[0] // cfg.patch_size[0]) * (cfg.image_size[1] // cfg.patch_size[1])
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid, c))
        self.embeddings.patch_embeddings = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, cfg.patch_size)
        self.layer = nn.ModuleList(Block(cfg.block) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(c, eps=cfg.block.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, hidden_layers: tuple[int, ...] = ()):
        """Same contract as DINOv3ViT.forward: (final-normed sequence, raw hidden states of `hidden_layers`)."""
        if tuple(pixel_values.shape[2:]) != self.cfg.image_size:
            raise ValueError(f"ViT input is {tuple(pixel_values.shape[2:])}, the model's position embeddings "
                             f"are for image_size {self.cfg.image_size}")
        emb = self.embeddings
        x = emb.patch_embeddings(pixel_values.to(emb.patch_embeddings.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
        hidden = []
        for i, block in enumerate(self.layer, start=1):
            x = block(x)
            if i in hidden_layers:
                hidden.append(x)
        return self.norm(x), hidden

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "vit.",
                     source: str = "checkpoint") -> set[str]:
        if not any(k.startswith(prefix) for k in tensors):
            raise ModelLoadError(f"{source}: no tensor starts with '{prefix}'; not a ViTForImageClassification checkpoint")
        used = load_into(self, tensors, dtype, source=source, key_of=lambda name: prefix + disk_name(name))
        return used | {k for k in tensors if k.startswith(tuple(prefix + p for p in UNUSED_PREFIXES))}
