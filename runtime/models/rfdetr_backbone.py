"""RF-DETR's feature path: a DINOv2 ViT whose layers attend within windows or over the whole image, and the LW-DETR
C2f projector that fuses the chosen layers' maps into one stride-`patch_size` map of d_model channels."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.deimv2_encoder import activation
from runtime.models.rfdetr_config import RfDetrBackboneConfig, RfDetrConfig
from runtime.models.vit_block import Block

# Block parameter names -> the checkpoint's (original DINOv2 layout), inside `encoder.layer.N.`.
BLOCK_DISK_NAMES = (("attention.q_proj.", "attention.attention.query."),
                    ("attention.k_proj.", "attention.attention.key."),
                    ("attention.v_proj.", "attention.attention.value."),
                    ("attention.o_proj.", "attention.output.dense."))
PLAIN_MLP_DISK_NAMES = (("mlp.up_proj.", "mlp.fc1."), ("mlp.down_proj.", "mlp.fc2."))


class WindowedDinov2(nn.Module):
    """transformers' `RfDetrDinov2Backbone`: CLS + patch tokens with (interpolated) learned position embeddings,
    split into num_windows x num_windows windows that each carry a copy of the CLS token."""

    def __init__(self, cfg: RfDetrBackboneConfig):
        super().__init__()
        self.cfg = cfg
        c, p = cfg.block.hidden_size, cfg.patch_size
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        if cfg.use_mask_token:  # training-only; kept for strict loading
            self.embeddings.mask_token = nn.Parameter(torch.zeros(1, c))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + cfg.position_grid ** 2, c))
        self.embeddings.patch_embeddings = nn.Conv2d(cfg.num_channels, c, p, p)
        self.layer = nn.ModuleList(Block(cfg.block) for _ in range(cfg.num_layers))
        self.layernorm = nn.LayerNorm(c, eps=cfg.block.layer_norm_eps)
        self._position_cache: dict[tuple, torch.Tensor] = {}

    @property
    def input_multiple(self) -> int:
        return self.cfg.patch_size * self.cfg.num_windows

    def disk_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's, relative to `backbone.0.encoder.encoder.`."""
        m = re.fullmatch(r"layer\.(\d+)\.(.*)", name)
        if m is None:
            return name.replace("embeddings.patch_embeddings.", "embeddings.patch_embeddings.projection.")
        inner = m[2]
        for ours, disk in BLOCK_DISK_NAMES + (() if self.cfg.block.gated_mlp else PLAIN_MLP_DISK_NAMES):
            if inner.startswith(ours):
                inner = disk + inner[len(ours):]
        return f"encoder.layer.{m[1]}.{inner}"

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[1, 1 + grid_h * grid_w, C], resized (bicubic, antialiased, in fp32) from the stored grid when it
        differs; a shape-only constant, cached."""
        grid_h, grid_w = int(grid_h), int(grid_w)  # traced for ONNX export, sizes are tensors: key by value
        key = (grid_h, grid_w, dtype, device)
        if key not in self._position_cache:
            stored = self.embeddings.position_embeddings.detach()
            n, c = self.cfg.position_grid, stored.shape[-1]
            patches = stored[:, 1:]
            if (grid_h, grid_w) != (n, n):
                grid = patches.reshape(1, n, n, c).permute(0, 3, 1, 2).float()
                grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True)
                patches = grid.to(stored.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, c)
            self._position_cache[key] = torch.cat([stored[:, :1], patches], 1).to(device=device, dtype=dtype)
        return self._position_cache[key]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixels [B, 3, H, W] -> one [B, C, H / patch, W / patch] map per out_indices stage."""
        cfg = self.cfg
        b, _, h, w = pixel_values.shape
        if h % self.input_multiple or w % self.input_multiple:
            raise ValueError(f"input sides must be multiples of {self.input_multiple} (patch_size {cfg.patch_size} "
                             f"x num_windows {cfg.num_windows}), got {h}x{w}")
        emb = self.embeddings
        x = emb.patch_embeddings(pixel_values.to(emb.patch_embeddings.weight.dtype))
        gh, gw = x.shape[2], x.shape[3]
        x = torch.cat([emb.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = self._partition(x + self.position_embedding(gh, gw, x.dtype, x.device), gh, gw)
        maps = [self._to_map(x, b, gh, gw)] if cfg.out_indices[0] == 0 else []
        # Layers after the last output stage cannot change the outputs: they are not run.
        for i in range(cfg.out_indices[-1]):
            if cfg.global_layers[i]:
                x = self.layer[i](x.reshape(b, -1, x.shape[-1])).reshape(x.shape)
            else:
                x = self.layer[i](x)
            if i + 1 in cfg.out_indices:
                maps.append(self._to_map(x, b, gh, gw))
        return maps

    def _partition(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[B, 1 + gh*gw, C] -> [B * nw², 1 + gh*gw / nw², C]. The grid is read as transformers reads it,
        (nw, gw / nw, nw, gh / nw): true square windows when gh == gw. Every image's CLS token is the same
        (CLS parameter + its position embedding), so each window takes the first one."""
        nw = self.cfg.num_windows
        if nw == 1:
            return x
        b, _, c = x.shape
        windows = x[:, 1:].reshape(b, nw, gw // nw, nw, gh // nw, c).transpose(2, 3).reshape(b * nw * nw, -1, c)
        return torch.cat([x[:1, :1].expand(b * nw * nw, -1, -1), windows], 1)

    def _to_map(self, x: torch.Tensor, b: int, gh: int, gw: int) -> torch.Tensor:
        """Windowed sequence -> [B, C, gh, gw] patch map (CLS copies dropped)."""
        if self.cfg.apply_layernorm:
            x = self.layernorm(x)
        x = x[:, 1:]
        nw, c = self.cfg.num_windows, x.shape[-1]
        if nw > 1:
            x = x.reshape(b, nw, nw, gh // nw, gw // nw, c).transpose(2, 3)
        return x.reshape(b, gh, gw, c).permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvLayerNorm(nn.Module):
    """Conv (no bias) -> channel LayerNorm -> activation (LW-DETR's ConvNormLayer). Unlike BatchNorm the norm
    depends on the input, so it cannot be folded into the conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, eps: float, act: str):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, 1, padding=kernel // 2, bias=False)
        self.norm = ChannelLayerNorm(out_ch, eps=eps)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvLayerNorms, no shortcut."""

    def __init__(self, ch: int, eps: float, act: str):
        super().__init__()
        self.conv1 = ConvLayerNorm(ch, ch, 3, eps, act)
        self.conv2 = ConvLayerNorm(ch, ch, 3, eps, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class C2f(nn.Module):
    """1x1 conv into two halves; bottlenecks chained on the second, every intermediate kept; 1x1 conv of them all."""

    def __init__(self, in_ch: int, cfg: RfDetrConfig):
        super().__init__()
        eps, act = cfg.layer_norm_eps, cfg.activation_function
        self.hidden = int(cfg.d_model * cfg.hidden_expansion)
        self.conv1 = ConvLayerNorm(in_ch, 2 * self.hidden, 1, eps, act)
        self.bottlenecks = nn.ModuleList(Bottleneck(self.hidden, eps, act) for _ in range(cfg.c2f_num_blocks))
        self.conv2 = ConvLayerNorm((2 + cfg.c2f_num_blocks) * self.hidden, cfg.d_model, 1, eps, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.conv1(x).split(self.hidden, 1))
        y = parts[-1]
        for block in self.bottlenecks:
            y = block(y)
            parts.append(y)
        return self.conv2(torch.cat(parts, 1))


class Projector(nn.Module):
    """The backbone maps, concatenated on channels -> C2f -> channel LayerNorm (transformers'
    `RfDetrScaleProjector`; its final norm has a fixed eps of 1e-6)."""

    def __init__(self, cfg: RfDetrConfig):
        super().__init__()
        bb = cfg.backbone
        self.projector_layer = C2f(bb.block.hidden_size * len(bb.out_indices), cfg)
        self.layer_norm = ChannelLayerNorm(cfg.d_model, eps=1e-6)

    @staticmethod
    def disk_name(name: str) -> str:
        """Our parameter name -> the checkpoint's, relative to `backbone.0.projector.`."""
        name = re.sub(r"^projector_layer\.", "stages.0.0.", name)
        name = re.sub(r"^layer_norm\.", "stages.0.1.", name)
        name = re.sub(r"bottlenecks\.(\d+)\.", r"m.\1.", name)
        name = re.sub(r"conv([12])\.norm\.", r"cv\1.bn.", name)
        return re.sub(r"conv([12])\.conv\.", r"cv\1.conv.", name)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.layer_norm(self.projector_layer(torch.cat(maps, 1)))
