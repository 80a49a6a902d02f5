"""RT-DETR / RT-DETRv2 decoder: post-norm layers of query self-attention, multiscale deformable cross-attention
(with value and output projections) and an MLP; each layer refines the reference boxes by its own box head."""
from __future__ import annotations

import torch
from torch import nn

from runtime.models.deimv2_decoder import DeformableAttention, inverse_sigmoid
from runtime.models.deimv2_encoder import MLP, SelfAttention
from runtime.models.rtdetr_config import RTDetrConfig


class DeformableCrossAttention(DeformableAttention):
    """The shared sampling core between a value projection of the memory and an output projection. v1 and v2 differ
    only in config (v1: a fixed 0.5 offset scale, bilinear sampling) and in v2 storing the per-point scale."""

    def __init__(self, cfg: RTDetrConfig):
        super().__init__(cfg)
        self.value_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.output_proj = nn.Linear(cfg.d_model, cfg.d_model)
        if not cfg.is_v2:  # v1 checkpoints do not hold the (constant) per-point scale
            self.register_buffer("num_points_scale", self.num_points_scale, persistent=False)

    def forward(self, query: torch.Tensor, ref_boxes: torch.Tensor, memory: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [B, Q, C]; ref_boxes [B, Q, 4] cxcywh in [0, 1]; memory [B, S, C] over the levels of `shapes`."""
        b, s, c = memory.shape
        heads = self.num_heads
        value = self.value_proj(memory).view(b, s, heads, c // heads).permute(0, 2, 3, 1).flatten(0, 1)
        values = [v.reshape(b * heads, c // heads, h, w)
                  for v, (h, w) in zip(value.split([h * w for h, w in shapes], dim=-1), shapes)]
        return self.output_proj(super().forward(query, ref_boxes, values))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RTDetrConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.self_attn = SelfAttention(d, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = DeformableCrossAttention(cfg)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, cfg.decoder_ffn_dim, d, 2, cfg.decoder_activation_function)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref_boxes: torch.Tensor, memory: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x + pos, ref_boxes, memory, shapes))
        return self.final_layer_norm(x + self.mlp(x))


class Decoder(nn.Module):
    def __init__(self, cfg: RTDetrConfig):
        super().__init__()
        d, n = cfg.d_model, cfg.decoder_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(n))
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        # Every layer's box head refines the boxes; only the last class head is read at inference, the others
        # exist for strict loading.
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_labels) for _ in range(n))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(n))

    def forward(self, queries: torch.Tensor, ref_logits: torch.Tensor, memory: torch.Tensor,
                shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, C], ref_logits [B, Q, 4] (pre-sigmoid), memory [B, S, C] -> (logits, cxcywh boxes)."""
        x, ref = queries, torch.sigmoid(ref_logits)
        for layer, box_head in zip(self.layers, self.bbox_embed):
            x = layer(x, self.query_pos_head(ref), ref, memory, shapes)
            ref = torch.sigmoid(box_head(x) + inverse_sigmoid(ref))
        return self.class_embed[-1](x), ref
