"""DEIMv2 feature path: DINOv3 ViT + spatial tuning adapter, fusion projections, hybrid (AIFI + FPN/PAN) or
lite encoder. Module and parameter names follow transformers' Deimv2 state dict so loading is by exact name."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.deimv2_config import ACTIVATION_NAMES, Deimv2Config
from runtime.models.dinov3 import DINOv3ViT

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def activation(name: str | None) -> nn.Module:
    return nn.Identity() if name is None else ACTIVATIONS[name]()


class BatchNorm(nn.Module):
    """Eval-mode BatchNorm2d without the training-only `num_batches_tracked` counter."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map this norm applies, in float64 for folding."""
        scale = self.weight.double() / torch.sqrt(self.running_var.double() + self.eps)
        return scale, self.bias.double() - self.running_mean.double() * scale


class ConvNorm(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional activation; `fold()` merges the norm into the conv after loading."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, eps: float, groups: int = 1,
                 padding: int | None = None, act: str | None = None):
        super().__init__()
        padding = (kernel - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=padding, groups=groups, bias=False)
        self.norm: nn.Module = BatchNorm(out_ch, eps)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (weight, bias) of the conv with the norm applied."""
        if isinstance(self.norm, nn.Identity):
            return self.conv.weight.double(), self.conv.bias.double()
        scale, shift = self.norm.scale_shift()
        return self.conv.weight.double() * scale[:, None, None, None], shift

    @torch.no_grad()
    def set_folded(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
                         bias=True, device=c.weight.device, dtype=c.weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.conv, self.norm = conv, nn.Identity()

    def fold(self) -> None:
        if not isinstance(self.norm, nn.Identity):
            self.set_folded(*self.folded())


class MLP(nn.Module):
    """Linear stack with `act` between layers (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else self.act(layer(x))
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention; the position embedding is added to queries and keys, not values."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        assert hidden % num_heads == 0
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qk_in = x if pos is None else x + pos
        q = self.q_proj(qk_in).view(b, n, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(qk_in).view(b, n, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, c))


class SpatialTuningAdapter(nn.Module):
    """Small conv stem on the pixels giving detail maps at strides 8, 16, 32."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        p, eps = cfg.spatial_tuning_adapter_inplanes, cfg.batch_norm_eps
        self.stem_conv = ConvNorm(3, p, 3, 2, eps, act="gelu")
        self.stem_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv2 = ConvNorm(p, 2 * p, 3, 2, eps)
        self.conv3 = ConvNorm(2 * p, 4 * p, 3, 2, eps)
        self.conv4 = ConvNorm(4 * p, 4 * p, 3, 2, eps)
        self.act = nn.GELU()

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        s8 = self.conv2(self.stem_pool(self.stem_conv(pixel_values)))
        s16 = self.conv3(self.act(s8))
        s32 = self.conv4(self.act(s16))
        return [s8, s16, s32]


class DINOv3ConvEncoder(nn.Module):
    """DINOv3 ViT + spatial tuning adapter -> three fused maps at strides 8, 16, 32 (`Deimv2DINOv3ConvEncoder`)."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.cfg = cfg
        p, c, eps = cfg.spatial_tuning_adapter_inplanes, cfg.backbone_hidden_size, cfg.batch_norm_eps
        self.backbone = DINOv3ViT(cfg.backbone)
        self.spatial_tuning_adapter = SpatialTuningAdapter(cfg)
        self.fusion_proj = nn.ModuleList(
            ConvNorm(c + p * mult, cfg.encoder_hidden_dim, 1, 1, eps) for mult in (2, 4, 4))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        _, hidden_states = self.backbone(pixel_values, hidden_layers=self.cfg.backbone_out_indices)
        return self.forward_from_hidden(pixel_values, hidden_states)

    def forward_from_hidden(self, pixel_values: torch.Tensor, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """`hidden_states`: raw (un-normed) ViT sequences [B, prefix + patches, C] after each out_indices layer."""
        cfg = self.cfg
        if len(hidden_states) != len(cfg.backbone_out_indices):
            raise ValueError(f"expected {len(cfg.backbone_out_indices)} hidden states (layers "
                             f"{cfg.backbone_out_indices}), got {len(hidden_states)}")
        b, _, h, w = pixel_values.shape
        grid_h, grid_w = h // cfg.backbone_patch_size, w // cfg.backbone_patch_size
        details = self.spatial_tuning_adapter(pixel_values.to(self.fusion_proj[0].conv.weight.dtype))
        n = len(hidden_states)
        out = []
        for i, (layer, hidden, detail) in enumerate(zip(cfg.backbone_out_indices, hidden_states, details)):
            # The backbone always norms its last stage; earlier ones only with apply_layernorm.
            if cfg.backbone_apply_layernorm or layer == cfg.backbone_num_layers:
                hidden = self.backbone.norm(hidden.to(self.backbone.norm.weight.dtype))
            patches = hidden[:, cfg.backbone_num_prefix_tokens:]
            fmap = patches.reshape(b, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
            size = (int(grid_h * 2 ** (n - 2 - i)), int(grid_w * 2 ** (n - 2 - i)))
            if size != (grid_h, grid_w):  # same-size bilinear resampling is the identity
                fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
            if fmap.shape[-2:] != detail.shape[-2:]:
                raise ValueError(
                    f"input {h}x{w}: ViT map {tuple(fmap.shape[-2:])} and adapter map {tuple(detail.shape[-2:])} "
                    f"differ at level {i}; height and width must be multiples of {2 * cfg.backbone_patch_size}")
            out.append(self.fusion_proj[i](torch.cat([fmap.to(detail.dtype), detail], dim=1)))
        return out


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> None:
    """Merge every eval-mode BatchNorm under `model` into its conv, and RepVGG branches into one 3x3 conv. Changes
    only rounding (folding is done in float64)."""
    for module in list(model.modules()):
        if isinstance(module, RepVggBlock):
            module.fold()
    for module in list(model.modules()):
        if isinstance(module, ConvNorm):
            module.fold()


def sine_position_embedding(h: int, w: int, dim: int, temperature: float, device: torch.device,
                            dtype: torch.dtype) -> torch.Tensor:
    """[1, h*w, dim] as [sin_h | cos_h | sin_w | cos_w], row-major, computed in float64 like the reference."""
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float64, device=device) / pos_dim)
    grid_h, grid_w = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                    torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    emb_h, emb_w = grid_h.flatten().outer(omega), grid_w.flatten().outer(omega)
    return torch.cat([emb_h.sin(), emb_h.cos(), emb_w.sin(), emb_w.cos()], dim=1).to(dtype)[None]


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        d = cfg.encoder_hidden_dim
        self.normalize_before = cfg.normalize_before
        self.self_attn = SelfAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.encoder_ffn_dim, d, 2, cfg.encoder_activation_function)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        if self.normalize_before:
            x = x + self.self_attn(self.self_attn_layer_norm(x), pos)
            x = self.final_layer_norm(x)  # the reference's MLP residual is the normed input
            return x + self.mlp(x)
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos))
        return self.final_layer_norm(x + self.mlp(x))


class AIFILayer(nn.Module):
    """Transformer layers over one flattened feature map."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        # transformers drops the position embedding in eval mode whenever eval_size is set; match it.
        if self.cfg.eval_size is not None:
            return None
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sine_position_embedding(
                h, w, self.cfg.encoder_hidden_dim, self.cfg.positional_encoding_temperature, device, dtype)
        return self._pos_cache[key]

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c, h, w = fmap.shape
        x = fmap.flatten(2).transpose(1, 2)
        pos = self.position(h, w, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, pos)
        return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


class RepVggBlock(nn.Module):
    """act(conv3x3(x) + conv1x1(x)); `fold()` re-parameterises both branches into one 3x3 conv."""

    def __init__(self, channels: int, eps: float, act: str):
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, 3, 1, eps, padding=1)
        self.conv2: ConvNorm | None = ConvNorm(channels, channels, 1, 1, eps, padding=0)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv2 is None:
            return self.act(self.conv1(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def fold(self) -> None:
        if self.conv2 is None:
            return
        w3, b3 = self.conv1.folded()
        w1, b1 = self.conv2.folded()
        w3 = w3.clone()
        w3[:, :, 1, 1] += w1[:, :, 0, 0]
        self.conv1.set_folded(w3, b3 + b1)
        self.conv2 = None


class CSPRepLayer(nn.Module):
    def __init__(self, cfg: Deimv2Config, in_ch: int, out_ch: int, num_blocks: int):
        super().__init__()
        eps, act = cfg.batch_norm_eps, cfg.activation_function
        self.conv1 = ConvNorm(in_ch, out_ch * 2, 1, 1, eps, act=act)
        self.bottlenecks = nn.ModuleList(RepVggBlock(out_ch, eps, act) for _ in range(num_blocks))
        self.conv2 = ConvNorm(out_ch, out_ch, 3, 1, eps, act=act) if cfg.encoder_has_trailing_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual, x = self.conv1(x).chunk(2, dim=1)
        for block in self.bottlenecks:
            x = block(x)
        return self.conv2(residual + x)


class RepNCSPELAN5(nn.Module):
    """Split -> two chained CSP branches -> 4-way concat -> 1x1 conv."""

    def __init__(self, cfg: Deimv2Config, num_blocks: int):
        super().__init__()
        d, eps, act = cfg.encoder_hidden_dim, cfg.batch_norm_eps, cfg.activation_function
        csp = round(cfg.hidden_expansion * d // 2)
        self.conv1 = ConvNorm(d, 2 * d, 1, 1, eps, act=act)
        self.csp_rep1 = CSPRepLayer(cfg, d, csp, num_blocks)
        self.csp_rep2 = CSPRepLayer(cfg, csp, csp, num_blocks)
        self.conv2 = ConvNorm(2 * d + 2 * csp, d, 1, 1, eps, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv1(x).chunk(2, dim=1)
        x3 = self.csp_rep1(x2)
        x4 = self.csp_rep2(x3)
        return self.conv2(torch.cat([x1, x2, x3, x4], dim=1))


class SCDown(nn.Module):
    """1x1 conv then depthwise 3x3 stride-2 conv."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        d, eps = cfg.encoder_hidden_dim, cfg.batch_norm_eps
        self.conv1 = ConvNorm(d, d, 1, 1, eps)
        self.conv2 = ConvNorm(d, d, 3, 2, eps, groups=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class HybridEncoder(nn.Module):
    """AIFI on the configured levels, top-down FPN and bottom-up PAN. DEIMv2 fuses two maps by sum into
    RepNCSPELAN5 blocks; D-FINE passes `block` (its RepNCSPELAN4) and `concat=True`; RT-DETR also its CSP block,
    activated lateral convs (`lateral_act`) and plain stride-2 conv downsampling (`downsample`)."""

    def __init__(self, cfg: Deimv2Config, block: Callable[..., nn.Module] | None = None, concat: bool = False,
                 downsample: Callable[..., nn.Module] | None = None, lateral_act: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.concat = concat
        block = block or RepNCSPELAN5
        downsample = downsample or SCDown
        d, eps = cfg.encoder_hidden_dim, cfg.batch_norm_eps
        stages = len(cfg.encoder_in_channels) - 1
        blocks = round(3 * cfg.depth_mult)
        self.aifi = nn.ModuleList(AIFILayer(cfg) for _ in cfg.encode_proj_layers)
        self.lateral_convs = nn.ModuleList(ConvNorm(d, d, 1, 1, eps, act=lateral_act) for _ in range(stages))
        self.fpn_blocks = nn.ModuleList(block(cfg, blocks) for _ in range(stages))
        self.downsample_convs = nn.ModuleList(downsample(cfg) for _ in range(stages))
        self.pan_blocks = nn.ModuleList(block(cfg, blocks) for _ in range(stages))

    def fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1) if self.concat else a + b

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(maps)
        if self.cfg.encoder_layers > 0:
            for aifi, level in zip(self.aifi, self.cfg.encode_proj_layers):
                maps[level] = aifi(maps[level])
        stages = len(maps) - 1
        fpn = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            top = lateral(fpn[-1])
            fpn[-1] = top
            up = F.interpolate(top, scale_factor=2.0, mode="nearest")
            fpn.append(block(self.fuse(up, maps[stages - i - 1])))
        fpn.reverse()
        pan = [fpn[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            pan.append(block(self.fuse(down(pan[-1]), fpn[i + 1])))
        return pan


class LiteEncoder(nn.Module):
    """Two-level encoder: input projections, pooled down-path, one FPN and one PAN block."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        d, eps, act = cfg.encoder_hidden_dim, cfg.batch_norm_eps, cfg.activation_function
        self.input_proj = nn.ModuleList(ConvNorm(c, d, 1, 1, eps) for c in cfg.encoder_in_channels)
        self.down_pool1 = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.down_conv1 = ConvNorm(d, d, 1, 1, eps, act=act)
        self.down_pool2 = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.down_conv2 = ConvNorm(d, d, 1, 1, eps, act=act)
        self.bi_fusion_conv = ConvNorm(d, d, 1, 1, eps, act=act)
        blocks = round(3 * cfg.depth_mult)
        self.fpn_block = RepNCSPELAN5(cfg, blocks)
        self.pan_block = RepNCSPELAN5(cfg, blocks)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # Only the first two projected levels reach the outputs; with a single input the second one is the
        # pooled + globally fused extra level (with more inputs that extra level is computed and dropped).
        feats = [proj(x) for proj, x in zip(self.input_proj[:2], maps[:2])]
        if len(feats) == 1:
            extra = self.down_conv1(self.down_pool1(feats[0]))
            feats.append(self.bi_fusion_conv(extra + F.adaptive_avg_pool2d(extra, 1)))
        out0 = self.fpn_block(feats[0] + F.interpolate(feats[1], scale_factor=2.0, mode="nearest"))
        out1 = self.pan_block(feats[1] + self.down_conv2(self.down_pool2(out0)))
        return [out0, out1]
