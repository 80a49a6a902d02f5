"""ResNet-vd backbone as transformers' `RTDetrResNetBackbone` builds it (r18vd/r34vd basic blocks, r50vd/r101vd
bottlenecks): a three-conv deep stem, and shortcuts that downsample by 2x2 average pooling before their 1x1 conv.
Module names follow the checkpoint's except ConvNorm's conv/norm (`checkpoint_name` maps them)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from runtime.config import ConfigReader
from runtime.models.deimv2_config import ACTIVATION_NAMES
from runtime.models.deimv2_encoder import ConvNorm, activation

BATCH_NORM_EPS = 1e-5  # transformers' frozen (and default) BatchNorm eps in this backbone, whatever the config says
BLOCK_CONV_ACT = "relu"  # the convs inside a block ignore hidden_act; only the stem and the block outputs use it


@dataclass(frozen=True)
class ResNetVdConfig:
    num_channels: int
    embedding_size: int
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    layer_type: str
    hidden_act: str
    downsample_in_first_stage: bool
    downsample_in_bottleneck: bool
    out_indices: tuple[int, ...]  # 0 is the stem, i the i-th stage

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (self.embedding_size, *self.hidden_sizes)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stage_channels[i] for i in self.out_indices)

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Total stride of the stem and of each stage's output."""
        strides, s = [4], 4
        for i in range(len(self.depths)):
            s *= 2 if i > 0 or self.downsample_in_first_stage else 1
            strides.append(s)
        return tuple(strides)

    @classmethod
    def from_dict(cls, cfg: dict, source: str) -> ResNetVdConfig:
        r = ConfigReader(cfg, source)
        r.check(cfg.get("model_type", "rt_detr_resnet") == "rt_detr_resnet",
                f"model_type {cfg.get('model_type')!r} is not supported: only the ResNet-vd backbone "
                f"('rt_detr_resnet') is implemented")
        depths = r.int_list("depths", [3, 4, 6, 3])
        hidden_sizes = r.int_list("hidden_sizes", [256, 512, 1024, 2048])
        r.check(len(depths) == len(hidden_sizes) and min(depths, default=0) > 0,
                f"depths {list(depths)} and hidden_sizes {list(hidden_sizes)} must be one positive depth per stage")
        stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(depths) + 1)]
        if cfg.get("out_indices") is not None:
            out_indices = r.int_list("out_indices")
        elif cfg.get("out_features") is not None:
            names = cfg["out_features"]
            r.check(isinstance(names, list) and all(n in stage_names for n in names),
                    f"out_features must name stages of {stage_names}, got {names!r}")
            out_indices = tuple(stage_names.index(n) for n in names)
        else:
            out_indices = (len(depths),)
        r.check(list(out_indices) == sorted(set(out_indices)) and 0 <= out_indices[0]
                and out_indices[-1] < len(stage_names),
                f"out_indices must be increasing stage numbers in 0..{len(depths)}, got {list(out_indices)}")
        out = cls(
            num_channels=r.get("num_channels", int, 3),
            embedding_size=r.get("embedding_size", int, 64),
            hidden_sizes=hidden_sizes,
            depths=depths,
            layer_type=r.choice("layer_type", "bottleneck", ("basic", "bottleneck")),
            hidden_act=r.choice("hidden_act", "relu", ACTIVATION_NAMES),
            downsample_in_first_stage=r.get("downsample_in_first_stage", bool, False),
            downsample_in_bottleneck=r.get("downsample_in_bottleneck", bool, False),
            out_indices=out_indices,
        )
        r.check(out.embedding_size % 2 == 0, f"embedding_size must be even, got {out.embedding_size}")
        if out.layer_type == "bottleneck":
            r.check(all(c % 4 == 0 for c in hidden_sizes),
                    f"bottleneck hidden_sizes must divide by 4, got {list(hidden_sizes)}")
        return out


def pooled_shortcut(conv: nn.Module) -> nn.Sequential:
    """The -vd downsampling shortcut: 2x2 average pool, then the (1x1 conv or identity) branch."""
    return nn.Sequential(nn.AvgPool2d(2, 2, 0, ceil_mode=True), conv)


class BasicBlock(nn.Module):
    def __init__(self, cfg: ResNetVdConfig, in_ch: int, out_ch: int, stride: int, first: bool):
        super().__init__()
        eps = BATCH_NORM_EPS
        # Only a stage's first block has a shortcut branch, even where its channels and stride are unchanged.
        if not first:
            self.shortcut: nn.Module = nn.Identity()
        elif in_ch != out_ch:
            self.shortcut = pooled_shortcut(ConvNorm(in_ch, out_ch, 1, 1, eps))
        else:
            self.shortcut = ConvNorm(in_ch, out_ch, 1, stride, eps)
        self.layer = nn.Sequential(ConvNorm(in_ch, out_ch, 3, stride, eps, act=BLOCK_CONV_ACT),
                                   ConvNorm(out_ch, out_ch, 3, 1, eps))
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.layer(x) + self.shortcut(x))


class BottleneckBlock(nn.Module):
    def __init__(self, cfg: ResNetVdConfig, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        eps, mid = BATCH_NORM_EPS, out_ch // 4
        project = in_ch != out_ch or stride != 1
        if stride == 2:
            self.shortcut: nn.Module = pooled_shortcut(ConvNorm(in_ch, out_ch, 1, 1, eps) if project else nn.Identity())
        else:
            self.shortcut = ConvNorm(in_ch, out_ch, 1, stride, eps) if project else nn.Identity()
        first_stride, mid_stride = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
        self.layer = nn.Sequential(ConvNorm(in_ch, mid, 1, first_stride, eps, act=BLOCK_CONV_ACT),
                                   ConvNorm(mid, mid, 3, mid_stride, eps, act=BLOCK_CONV_ACT),
                                   ConvNorm(mid, out_ch, 1, 1, eps))
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.layer(x) + self.shortcut(x))


class Stage(nn.Module):
    def __init__(self, cfg: ResNetVdConfig, in_ch: int, out_ch: int, stride: int, depth: int):
        super().__init__()
        if cfg.layer_type == "bottleneck":
            blocks = [BottleneckBlock(cfg, in_ch, out_ch, stride)]
            blocks += [BottleneckBlock(cfg, out_ch, out_ch, 1) for _ in range(depth - 1)]
        else:
            blocks = [BasicBlock(cfg, in_ch, out_ch, stride, first=True)]
            blocks += [BasicBlock(cfg, out_ch, out_ch, 1, first=False) for _ in range(depth - 1)]
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Stem(nn.Module):
    def __init__(self, cfg: ResNetVdConfig):
        super().__init__()
        e, act, eps = cfg.embedding_size, cfg.hidden_act, BATCH_NORM_EPS
        self.embedder = nn.Sequential(ConvNorm(cfg.num_channels, e // 2, 3, 2, eps, act=act),
                                      ConvNorm(e // 2, e // 2, 3, 1, eps, act=act),
                                      ConvNorm(e // 2, e, 3, 1, eps, act=act))
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(x))


class Stages(nn.Module):
    def __init__(self, cfg: ResNetVdConfig):
        super().__init__()
        ins = (cfg.embedding_size, *cfg.hidden_sizes[:-1])
        strides = [2 if i > 0 or cfg.downsample_in_first_stage else 1 for i in range(len(cfg.depths))]
        self.stages = nn.ModuleList(Stage(cfg, i, o, s, d)
                                    for i, o, s, d in zip(ins, cfg.hidden_sizes, strides, cfg.depths))


class ResNetVd(nn.Module):
    def __init__(self, cfg: ResNetVdConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = Stem(cfg)
        # Stages past the last output never run; they exist so the checkpoint loads strictly.
        self.encoder = Stages(cfg)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, H, W] -> the maps at cfg.out_indices (0: stem, i: stage i)."""
        x = self.embedder(pixel_values)
        maps = [x]
        for stage in self.encoder.stages[:self.cfg.out_indices[-1]]:
            x = stage(x)
            maps.append(x)
        return [maps[i] for i in self.cfg.out_indices]


def checkpoint_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (`...convolution.weight`, `...normalization.running_mean`)."""
    return re.sub(r"(^|\.)norm\.", r"\1normalization.", re.sub(r"(^|\.)conv\.", r"\1convolution.", name))
