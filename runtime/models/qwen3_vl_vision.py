"""Qwen3-VL vision tower: Conv3d patch embedding, bilinearly resampled learned position grid, 2D RoPE ViT blocks,
2x2 patch merger into the language model's width, and DeepStack mergers tapping intermediate blocks.

Parameter names equal the checkpoint's under `model.visual.` (patch_embed.proj, pos_embed, blocks.N.*, merger.*,
deepstack_merger_list.N.*). Input rows come from kernels/vlm_preprocess.py, in spatial-merge-block order, so
every 4 consecutive rows are one merged token."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ConfigReader
from runtime.models.vit_block import activation, rotate_half
from runtime.errors import ModelLoadError

SOURCE = "config.json vision_config"


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @classmethod
    def from_dict(cls, cfg: dict) -> VisionConfig:
        r = ConfigReader(cfg, SOURCE)
        rope = cfg.get("rope_parameters") or {}
        cfg_out = cls(
            depth=r.get("depth", int),
            hidden_size=r.get("hidden_size", int),
            intermediate_size=r.get("intermediate_size", int),
            num_heads=r.get("num_heads", int),
            in_channels=cfg.get("in_channels", 3),
            patch_size=r.get("patch_size", int),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            spatial_merge_size=cfg.get("spatial_merge_size", 2),
            out_hidden_size=r.get("out_hidden_size", int),
            num_position_embeddings=r.get("num_position_embeddings", int),
            deepstack_visual_indexes=tuple(cfg.get("deepstack_visual_indexes", ())),
            hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        )
        cfg_out.validate()
        return cfg_out

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ModelLoadError(f"{SOURCE}: hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                                 "head size divisible by 4 (2D RoPE splits it over height and width)")
        side = int(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ModelLoadError(f"{SOURCE}: num_position_embeddings {self.num_position_embeddings} is not a square")
        if self.in_channels != 3:
            raise ModelLoadError(f"{SOURCE}: in_channels {self.in_channels} is not supported (RGB only)")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ModelLoadError(f"{SOURCE}: deepstack_visual_indexes {bad} are outside 0..{self.depth - 1}")
        activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        n, c = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # RoPE in fp32, as the reference does, then back to the model dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(x.dtype)
        # Each image attends only to itself. Images of one size (the usual prefill) are one batched call; inputs
        # are 4-D either way: torch's CPU SDPA takes its slower math path for 3-D ones.
        if len(set(seq_lens)) == 1:
            shape = (len(seq_lens), seq_lens[0], self.num_heads, -1)
            q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, c))
        outs = []
        start = 0
        for length in seq_lens:
            sl = slice(start, start + length)
            o = F.scaled_dot_product_attention(*(t[None, sl].transpose(1, 2) for t in (q, k, v)))
            outs.append(o[0].transpose(0, 1).reshape(length, c))
            start += length
        return self.proj(torch.cat(outs))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge^2 neighbouring rows -> one language-model token. The final merger normalizes each row before the
    concatenation; DeepStack mergers normalize the concatenated row (`norm_after_merge`)."""

    def __init__(self, cfg: VisionConfig, norm_after_merge: bool):
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_merge = norm_after_merge
        self.norm = nn.LayerNorm(self.merged_size if norm_after_merge else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size)
        self.linear_fc2 = nn.Linear(self.merged_size, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.norm(x.view(-1, self.merged_size))
        else:
            x = self.norm(x).view(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Module()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, kernel)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_merge=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, norm_after_merge=True) for _ in cfg.deepstack_visual_indexes)
        half = cfg.head_dim // 2  # rows and columns each rotate half of the head, with head_dim / 4 frequencies
        # A plain attribute, not a buffer: built on the CPU even when the module is built on the meta device.
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device="cpu") / half)

    def grid_coords(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) patch coordinates of every input row, in the merge-block order of the rows."""
        m = self.cfg.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grids:
            r = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            c = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rows.append(r.permute(0, 2, 1, 3).reshape(-1).repeat(t))
            cols.append(c.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        return torch.cat(rows), torch.cat(cols)

    def position_embedding(self, grids: list[tuple[int, int, int]], rows: torch.Tensor, cols: torch.Tensor
                           ) -> torch.Tensor:
        """The learned square grid resampled to each image's grid: bilinear, align_corners=True."""
        side = int(self.cfg.num_position_embeddings ** 0.5)
        heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grids]).to(rows.device)
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grids]).to(rows.device)

        def taps(index: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
            low = src.floor()
            frac = src - low
            low = low.long()
            return torch.stack([low, (low + 1).clamp(max=side - 1)], 1), torch.stack([1 - frac, frac], 1)

        y_idx, y_w = taps(rows, heights)
        x_idx, x_w = taps(cols, widths)
        index = (y_idx[:, :, None] * side + x_idx[:, None, :]).flatten(1)
        weight = (y_w[:, :, None] * x_w[:, None, :]).flatten(1)
        return (self.pos_embed(index) * weight[:, :, None]).sum(1)

    def rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != rows.device:
            self.inv_freq = self.inv_freq.to(rows.device)
        freqs = torch.cat([rows[:, None].float() * self.inv_freq, cols[:, None].float() * self.inv_freq], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def forward(self, pixel_rows: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_rows: (patches, C*T*P*P) for the images of `grids` concatenated. Returns the merged tokens
        (patches / merge^2, out_hidden_size) and one DeepStack feature of that shape per deepstack index."""
        weight = self.patch_embed.proj.weight
        expected = sum(t * h * w for t, h, w in grids)
        assert pixel_rows.shape == (expected, weight[0].numel()), (tuple(pixel_rows.shape), expected)
        x = F.linear(pixel_rows.to(weight.dtype), weight.flatten(1), self.patch_embed.proj.bias)
        rows, cols = self.grid_coords(grids, x.device)
        x = x + self.position_embedding(grids, rows, cols).to(x.dtype)
        cos, sin = self.rope(rows, cols)
        seq_lens = [h * w for t, h, w in grids for _ in range(t)]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, seq_lens)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
