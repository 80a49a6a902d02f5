"""HGNetV2 backbone (transformers' `HGNetV2Backbone`, the D-FINE backbones B0..B5), inference only.

pixels -> stem (two 2x2-conv branches, one max-pooled, concatenated) -> stages of HG blocks (a chain of convs or
light 1x1 + depthwise convs whose outputs are all concatenated, squeezed and excited by 1x1 convs) -> the maps at
out_indices. BatchNorm is folded into the convs after loading (ConvNorm.fold); learnable affine blocks (LAB, one
scale and bias after an activation) stay as they are, since an activation sits between them and their conv."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ConfigReader
from runtime.models.deimv2_config import ACTIVATION_NAMES
from runtime.models.deimv2_encoder import ConvNorm

# transformers replaces the backbone's BatchNorm with a frozen copy whose epsilon is fixed at 1e-5 (the default of
# the BatchNorm2d it replaces, so both loading paths agree).
BATCH_NORM_EPS = 1e-5


@dataclass(frozen=True)
class HGNetV2Config:
    """The inference-relevant fields of a transformers HGNetV2Config."""
    hidden_act: str
    stem_channels: tuple[int, int, int]
    stem_strides: tuple[int, ...]
    stage_in_channels: tuple[int, ...]
    stage_mid_channels: tuple[int, ...]
    stage_out_channels: tuple[int, ...]
    stage_num_blocks: tuple[int, ...]
    stage_downsample: tuple[bool, ...]
    stage_downsample_strides: tuple[int, ...]
    stage_light_block: tuple[bool, ...]
    stage_kernel_size: tuple[int, ...]
    stage_numb_of_layers: tuple[int, ...]
    use_learnable_affine_block: bool
    out_indices: tuple[int, ...]  # 0 is the stem, i the output of stage i

    @property
    def num_stages(self) -> int:
        return len(self.stage_in_channels)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stem_channels[2] if i == 0 else self.stage_out_channels[i - 1] for i in self.out_indices)

    @property
    def out_strides(self) -> tuple[int, ...]:
        """Stride of each output map (for inputs whose sides divide by the last one)."""
        strides = [math.prod(self.stem_strides)]
        for down, s in zip(self.stage_downsample, self.stage_downsample_strides):
            strides.append(strides[-1] * (s if down else 1))
        return tuple(strides[i] for i in self.out_indices)

    @classmethod
    def from_dict(cls, bb: dict, source: str) -> HGNetV2Config:
        r = ConfigReader(bb, source)
        r.check(bb.get("model_type") == "hgnet_v2", f"model_type must be 'hgnet_v2', got {bb.get('model_type')!r}")

        def bools(key: str, default: list[bool]) -> tuple[bool, ...]:
            value = bb.get(key, default)
            r.check(isinstance(value, list) and all(isinstance(v, bool) for v in value),
                    f"field '{key}' must be a list of booleans, got {value!r}")
            return tuple(value)

        def ints(key: str, default: list[int]) -> tuple[int, ...]:
            value = bb.get(key, default)
            r.check(isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
                    f"field '{key}' must be a list of ints (per-axis strides and kernels are not supported), "
                    f"got {value!r}")
            return tuple(value)

        stages = len(ints("stage_in_channels", [48, 128, 512, 1024]))
        depths = ints("depths", [3, 4, 6, 3])
        r.check(len(depths) == stages,
                f"depths has {len(depths)} entries but there are {stages} stages (transformers names the outputs "
                f"'stem', 'stage1'.. from depths)")
        if "out_indices" in bb:
            out_indices = r.int_list("out_indices")
        else:
            names = bb.get("out_features") or [f"stage{stages}"]
            r.check(all(isinstance(n, str) and (n == "stem" or (n.startswith("stage") and n[5:].isdigit()))
                        for n in names), f"out_features must be 'stem' or stage names like 'stage4', got {names!r}")
            out_indices = tuple(0 if n == "stem" else int(n[5:]) for n in names)
        r.check(len(out_indices) > 0 and list(out_indices) == sorted(set(out_indices))
                and 0 <= out_indices[0] and out_indices[-1] <= stages,
                f"out_indices must be increasing in 0..{stages}, got {list(out_indices)}")
        out = cls(
            hidden_act=r.choice("hidden_act", "relu", ACTIVATION_NAMES),
            stem_channels=ints("stem_channels", [3, 32, 48]),
            stem_strides=ints("stem_strides", [2, 1, 1, 2, 1]),
            stage_in_channels=ints("stage_in_channels", [48, 128, 512, 1024]),
            stage_mid_channels=ints("stage_mid_channels", [48, 96, 192, 384]),
            stage_out_channels=ints("stage_out_channels", [128, 512, 1024, 2048]),
            stage_num_blocks=ints("stage_num_blocks", [1, 1, 3, 1]),
            stage_downsample=bools("stage_downsample", [False, True, True, True]),
            stage_downsample_strides=ints("stage_downsample_strides", [2, 2, 2, 2]),
            stage_light_block=bools("stage_light_block", [False, False, True, True]),
            stage_kernel_size=ints("stage_kernel_size", [3, 3, 5, 5]),
            stage_numb_of_layers=ints("stage_numb_of_layers", [6, 6, 6, 6]),
            use_learnable_affine_block=r.get("use_learnable_affine_block", bool, False),
            out_indices=out_indices,
        )
        out._validate(r, bb)
        return out

    def _validate(self, r: ConfigReader, bb: dict) -> None:
        per_stage = ("stage_mid_channels", "stage_out_channels", "stage_num_blocks", "stage_downsample",
                     "stage_downsample_strides", "stage_light_block", "stage_kernel_size", "stage_numb_of_layers")
        for key in per_stage:
            r.check(len(getattr(self, key)) == self.num_stages,
                    f"{key} has {len(getattr(self, key))} entries, stage_in_channels {self.num_stages}")
        r.check(len(self.stem_channels) == 3 and self.stem_channels[0] == 3 and r.get("num_channels", int, 3) == 3,
                f"stem_channels must be [3, mid, out] for RGB input, got {list(self.stem_channels)}")
        r.check(len(self.stem_strides) == 5, f"stem_strides must have 5 entries, got {list(self.stem_strides)}")
        ins = (self.stem_channels[2],) + self.stage_out_channels[:-1]
        r.check(self.stage_in_channels == ins,
                f"stage_in_channels {list(self.stage_in_channels)} must be the stem's then each stage's output "
                f"channels {list(ins)}")
        # transformers sizes the detector's input projections by embedding_size / hidden_sizes, the maps by
        # stem_channels / stage_out_channels: they must agree.
        declared = [r.get("embedding_size", int, 64)] + list(ConfigReader(bb, r.source).int_list(
            "hidden_sizes", [256, 512, 1024, 2048]))
        for i, channels in zip(self.out_indices, self.out_channels):
            r.check(i < len(declared) and declared[i] == channels,
                    f"output {i} has {channels} channels but {'embedding_size' if i == 0 else 'hidden_sizes'} "
                    f"declares {declared[i] if i < len(declared) else 'none'}")


class LearnableAffine(nn.Module):
    """y = scale * x + bias with one scalar each (LAB)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvLayer(ConvNorm):
    """Conv -> BatchNorm -> activation -> LAB (only after an activation, and only where the config asks)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: str | None = "relu", lab: bool = False):
        super().__init__(in_ch, out_ch, kernel, stride, BATCH_NORM_EPS, groups=groups, act=act)
        self.lab = LearnableAffine() if act is not None and lab else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(super().forward(x))


class LightConv(nn.Module):
    """1x1 conv without activation, then a depthwise kxk conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, lab: bool):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, out_ch, 1, act=None, lab=lab)
        self.conv2 = ConvLayer(out_ch, out_ch, kernel, groups=out_ch, lab=lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class HGBlock(nn.Module):
    """`layers` chained convs; the input and every output concatenated, squeezed to out/2 and excited to out."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, num_layers: int, kernel: int, residual: bool,
                 light: bool, lab: bool):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            LightConv(in_ch if i == 0 else mid_ch, mid_ch, kernel, lab) if light
            else ConvLayer(in_ch if i == 0 else mid_ch, mid_ch, kernel, lab=lab) for i in range(num_layers))
        self.aggregation = nn.Sequential(ConvLayer(in_ch + num_layers * mid_ch, out_ch // 2, 1, lab=lab),
                                         ConvLayer(out_ch // 2, out_ch, 1, lab=lab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        y = self.aggregation(torch.cat(outs, dim=1))
        return y + x if self.residual else y


class Stage(nn.Module):
    def __init__(self, cfg: HGNetV2Config, i: int):
        super().__init__()
        in_ch, mid_ch, out_ch = cfg.stage_in_channels[i], cfg.stage_mid_channels[i], cfg.stage_out_channels[i]
        # The depthwise downsampling conv has no activation, hence never a LAB.
        self.downsample = ConvLayer(in_ch, in_ch, 3, cfg.stage_downsample_strides[i], groups=in_ch, act=None) \
            if cfg.stage_downsample[i] else nn.Identity()
        self.blocks = nn.ModuleList(
            HGBlock(in_ch if b == 0 else out_ch, mid_ch, out_ch, cfg.stage_numb_of_layers[i], cfg.stage_kernel_size[i],
                    residual=b != 0, light=cfg.stage_light_block[i], lab=cfg.use_learnable_affine_block)
            for b in range(cfg.stage_num_blocks[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nn.Module):
    def __init__(self, cfg: HGNetV2Config):
        super().__init__()
        _, mid, out = cfg.stem_channels
        s, act, lab = cfg.stem_strides, cfg.hidden_act, cfg.use_learnable_affine_block
        self.stem1 = ConvLayer(3, mid, 3, s[0], act=act, lab=lab)
        self.stem2a = ConvLayer(mid, mid // 2, 2, s[1], act=act, lab=lab)
        self.stem2b = ConvLayer(mid // 2, mid, 2, s[2], act=act, lab=lab)
        self.stem3 = ConvLayer(2 * mid, mid, 3, s[3], act=act, lab=lab)
        self.stem4 = ConvLayer(mid, out, 1, s[4], act=act, lab=lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The 2x2 convs and the pool see the map padded by one on the right and bottom: same-size outputs.
        x = F.pad(self.stem1(pixel_values), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        return self.stem4(self.stem3(torch.cat([self.pool(x), branch], dim=1)))


class Stages(nn.Module):
    def __init__(self, cfg: HGNetV2Config):
        super().__init__()
        self.stages = nn.ModuleList(Stage(cfg, i) for i in range(cfg.num_stages))


class HGNetV2(nn.Module):
    """`embedder` and `encoder.stages` as transformers names them (see `checkpoint_name`)."""

    def __init__(self, cfg: HGNetV2Config):
        super().__init__()
        self.cfg = cfg
        self.embedder = Stem(cfg)
        self.encoder = Stages(cfg)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embedder(pixel_values)
        maps = [x]
        for stage in self.encoder.stages[:self.cfg.out_indices[-1]]:
            x = stage(x)
            maps.append(x)
        return [maps[i] for i in self.cfg.out_indices]


def checkpoint_name(name: str) -> str:
    """Our parameter name -> transformers' HGNetV2 name (its conv layers call conv/norm convolution/normalization)."""
    renamed = {"conv": "convolution", "norm": "normalization"}
    return ".".join(renamed.get(part, part) for part in name.split("."))
