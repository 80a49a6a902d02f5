"""DEIMv2 and D-FINE decoder (they differ only as DecoderStyle says): D-FINE style query refinement with multiscale
deformable cross-attention, fine-grained distribution refinement (FDR) of box edges, and the location quality
estimator (LQE) on the output scores."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.deimv2_config import Deimv2Config
from runtime.models.deimv2_encoder import MLP, SelfAttention


@dataclass(frozen=True)
class DecoderStyle:
    """Where D-FINE's decoder (the original) and DEIMv2's differ; the FDR/LQE refinement loop is the same."""
    rms_norm: bool               # RMSNorm everywhere (DEIMv2), else LayerNorm (layer_norm_eps; the gate's 1e-5)
    swiglu: bool                 # SwiGLU FFN (DEIMv2), else a 2-layer MLP with decoder_activation_function
    query_pos_deimv2: bool       # query_pos_head MLP(4, d, d, 3, decoder act) (DEIMv2), else MLP(4, 2d, d, 2, relu)
    clamp_before_final_norm: bool  # D-FINE clamps the FFN residual to the fp16 range


DEIMV2_STYLE = DecoderStyle(rms_norm=True, swiglu=True, query_pos_deimv2=True, clamp_before_final_norm=False)
DFINE_STYLE = DecoderStyle(rms_norm=False, swiglu=False, query_pos_deimv2=False, clamp_before_final_norm=True)
FP16_MAX = 65504.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim // 2)
        self.up_proj = nn.Linear(dim, ffn_dim // 2)
        self.down_proj = nn.Linear(ffn_dim // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid-gated mix of the residual and the cross-attention output, then a norm (RMSNorm by default)."""

    def __init__(self, dim: int, norm: nn.Module | None = None):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = RMSNorm(dim) if norm is None else norm

    def forward(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([residual, x], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * residual + g2 * x)


class DeformableAttention(nn.Module):
    """Queries sample `points_per_level` locations per head around their reference box on every level; no value
    or output projection (D-FINE variant)."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.num_heads = cfg.decoder_attention_heads
        self.points = cfg.points_per_level
        self.offset_scale = cfg.decoder_offset_scale
        self.discrete = cfg.decoder_method == "discrete"
        total = self.num_heads * sum(self.points)
        self.sampling_offsets = nn.Linear(cfg.d_model, total * 2)
        self.attention_weights = nn.Linear(cfg.d_model, total)
        self.register_buffer("num_points_scale", torch.tensor([1 / n for n in self.points for _ in range(n)]))

    def forward(self, query: torch.Tensor, ref_boxes: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """query [B, Q, C]; ref_boxes [B, Q, 4] cxcywh in [0, 1]; values[l] [B*heads, head_dim, H_l, W_l]."""
        b, q, _ = query.shape
        heads, p = self.num_heads, sum(self.points)
        offsets = self.sampling_offsets(query).view(b, q, heads, p, 2)
        weights = self.attention_weights(query).view(b, q, heads, p).softmax(-1)
        scale = self.num_points_scale.to(query.dtype).unsqueeze(-1)
        ref = ref_boxes[:, :, None, None]
        locations = ref[..., :2] + offsets * scale * ref[..., 2:] * self.offset_scale  # [B, Q, heads, P, 2]
        grids = locations if self.discrete else 2 * locations - 1
        grids = grids.permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.points, dim=-2)  # [B*heads, Q, P_l, 2]
        sampled = [self._sample(v, g) for v, g in zip(values, grids)]
        weights = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, q, p)
        out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # [B*heads, head_dim, Q]
        return out.view(b, -1, q).transpose(1, 2)

    def _sample(self, value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """[B*heads, head_dim, Q, P_l] values at the grid points."""
        if not self.discrete:
            # contiguous: torch 2.13's CPU bf16 grid_sample returns NaN for the channels-last strides a batch of
            # one gives the value maps here (tests/test_bundle_default.py::test_one_image_at_a_time_in_bf16)
            return F.grid_sample(value.contiguous(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        bh, dim, h, w = value.shape
        q, p = grid.shape[1], grid.shape[2]
        # Python-scalar scales: a tensor built from host values here would be a copy CUDA graph capture rejects.
        x = (grid[..., 0] * w + 0.5).to(torch.int64).clamp(0, w - 1)
        y = (grid[..., 1] * h + 0.5).to(torch.int64).clamp(0, h - 1)
        flat = y * w + x
        picked = value.flatten(2).gather(2, flat.reshape(bh, 1, q * p).expand(-1, dim, -1))
        return picked.view(bh, dim, q, p)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Deimv2Config, style: DecoderStyle = DEIMV2_STYLE):
        super().__init__()
        d = cfg.d_model
        norm = (lambda: RMSNorm(d)) if style.rms_norm else (lambda: nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.self_attn = SelfAttention(d, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = norm()
        self.encoder_attn = DeformableAttention(cfg)
        self.mlp = SwiGLU(d, cfg.decoder_ffn_dim) if style.swiglu else \
            MLP(d, cfg.decoder_ffn_dim, d, 2, cfg.decoder_activation_function)
        self.final_layer_norm = norm()
        if cfg.use_gateway:
            self.gateway = Gate(d, None if style.rms_norm else nn.LayerNorm(d))
        else:
            self.encoder_attn_layer_norm = norm()
        self.use_gateway = cfg.use_gateway
        self.clamp = style.clamp_before_final_norm

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref_boxes: torch.Tensor,
                values: list[torch.Tensor]) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos))
        cross = self.encoder_attn(x + pos, ref_boxes, values)
        x = self.gateway(x, cross) if self.use_gateway else self.encoder_attn_layer_norm(x + cross)
        x = x + self.mlp(x)
        return self.final_layer_norm(x.clamp(min=-FP16_MAX, max=FP16_MAX) if self.clamp else x)


class LQE(nn.Module):
    """Adds a quality score from the sharpness (top-k probabilities) of each edge distribution."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.top_k = cfg.top_prob_values
        self.bins = cfg.max_num_bins + 1
        self.reg_conf = MLP(4 * (self.top_k + 1), cfg.lqe_hidden_dim, 1, cfg.lqe_layers)

    def forward(self, scores: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        b, q, _ = corners.shape
        prob = corners.view(b, q, 4, self.bins).softmax(-1)
        top = prob.topk(self.top_k, dim=-1).values
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(b, q, -1))


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def distance_to_box(anchor: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """cxcywh box from an anchor box and four edge distances in units of anchor size / reg_scale."""
    s = reg_scale.abs()
    cx, cy, w, h = anchor.unbind(-1)
    d0, d1, d2, d3 = distance.unbind(-1)
    corners = torch.stack([cx - (0.5 * s + d0) * (w / s), cy - (0.5 * s + d1) * (h / s),
                           cx + (0.5 * s + d2) * (w / s), cy + (0.5 * s + d3) * (h / s)], dim=-1)
    return corners_to_center(corners)


def weighting_function(num_bins: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """The non-uniform bin positions W(n), [num_bins + 1]: dense near 0, reaching ±2*up*reg_scale at the ends."""
    bound1 = abs(up[0]) * abs(reg_scale)
    bound2 = abs(up[0]) * abs(reg_scale) * 2
    step = (bound1 + 1) ** (2 / (num_bins - 2))
    left = [-(step ** i) + 1 for i in range(num_bins // 2 - 1, 0, -1)]
    right = [step ** i - 1 for i in range(1, num_bins // 2)]
    return torch.cat([-bound2, *left, torch.zeros_like(up[0][None]), *right, bound2], 0)


class Decoder(nn.Module):
    def __init__(self, cfg: Deimv2Config, style: DecoderStyle = DEIMV2_STYLE):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.decoder_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, style) for _ in range(n))
        self.query_pos_head = MLP(4, d, d, 3, cfg.decoder_activation_function) if style.query_pos_deimv2 else \
            MLP(4, 2 * d, d, 2)
        self.pre_bbox_head = MLP(d, d, 4, 3)
        # Only the last layer's scores are read at inference; the other heads exist for strict loading.
        self.lqe_layers = nn.ModuleList(LQE(cfg) for _ in range(n))
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_labels) for _ in range(n))
        num_box_heads = 1 if cfg.share_bbox_head else n
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4 * (cfg.max_num_bins + 1), 3) for _ in range(num_box_heads))
        self.register_buffer("reg_scale", torch.tensor([cfg.reg_scale]))
        self.register_buffer("up", torch.tensor([cfg.up]))

    def forward(self, queries: torch.Tensor, ref_logits: torch.Tensor, memory: torch.Tensor,
                shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, C], ref_logits [B, Q, 4] (pre-sigmoid), memory [B, S, C] -> (logits, cxcywh boxes)."""
        cfg = self.cfg
        b, s, c = memory.shape
        heads = cfg.decoder_attention_heads
        # The memory is the same for every layer: split it into per-level [B*heads, head_dim, H, W] maps once.
        value = memory.view(b, s, heads, c // heads).permute(0, 2, 3, 1).flatten(0, 1)
        values = [v.reshape(b * heads, c // heads, h, w)
                  for v, (h, w) in zip(value.split([h * w for h, w in shapes], dim=-1), shapes)]
        project = weighting_function(cfg.max_num_bins, self.up, self.reg_scale).to(memory.dtype)
        bins = cfg.max_num_bins + 1

        x = queries
        ref = torch.sigmoid(ref_logits)
        prev_x: torch.Tensor | float = 0
        prev_corners: torch.Tensor | float = 0
        for i, layer in enumerate(self.layers):
            pos = self.query_pos_head(ref).clamp(min=-10, max=10)
            x = layer(x, pos, ref, values)
            if i == 0:
                anchor = torch.sigmoid(self.pre_bbox_head(x) + inverse_sigmoid(ref))
            corners = self.bbox_embed[0 if cfg.share_bbox_head else i](x + prev_x) + prev_corners
            distance = F.linear(corners.reshape(-1, bins).softmax(dim=1), project).reshape(b, -1, 4)
            ref = distance_to_box(anchor, distance, self.reg_scale)
            prev_x, prev_corners = x, corners
        last = len(self.layers) - 1
        logits = self.lqe_layers[last](self.class_embed[last](x), corners)
        return logits, ref
