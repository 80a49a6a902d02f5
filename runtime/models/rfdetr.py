"""RF-DETR object detector (transformers' `RfDetrForObjectDetection`, inference only).

pixels -> windowed DINOv2 ViT maps at out_indices -> C2f projector -> one stride-`patch_size` map -> two-stage
query selection (every map cell is a proposal; the top num_queries by class score refine the learned reference
boxes) -> LW-DETR decoder (self-attention, deformable cross-attention; the reference boxes stay fixed across
layers) -> (logits [B, Q, labels], cxcywh boxes [B, Q, 4]). Post-processing is RT-DETR's (sigmoid, top-k over
queries x classes): runtime.models.detect_postprocess.post_process_object_detection.

Checkpoints are read in the layout transformers' save_pretrained writes for this family, which is the original
Roboflow one (backbone.0.encoder.*, backbone.0.projector.stages.*, transformer.*, refpoint_embed, fused
self-attention in_proj); `disk_name` maps our parameter names onto it."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import read_json
from runtime.errors import WeightError
from runtime.models.deimv2_decoder import DeformableAttention
from runtime.models.deimv2_encoder import MLP
from runtime.models.detect_postprocess import DetectorOutput
from runtime.models.rfdetr_backbone import Projector, WindowedDinov2
from runtime.models.rfdetr_config import RfDetrConfig
from runtime.models.weights import check_all_used, load_into, read_safetensors, skip_random_init

log = logging.getLogger(__name__)

# Our top-level module -> its checkpoint prefix. The two-stage heads exist once per Group-DETR group; inference
# uses group 0 (the others are training-only, see `training_only_prefixes`).
PART_PREFIXES = {"backbone.": "backbone.0.encoder.encoder.", "projector.": "backbone.0.projector.",
                 "decoder.": "transformer.decoder.", "enc_output.": "transformer.enc_output.0.",
                 "enc_output_norm.": "transformer.enc_output_norm.0.",
                 "enc_out_class_embed.": "transformer.enc_out_class_embed.0.",
                 "enc_out_bbox_embed.": "transformer.enc_out_bbox_embed.0."}
GROUPED_HEADS = ("enc_output", "enc_output_norm", "enc_out_class_embed", "enc_out_bbox_embed")
GROUPED_QUERIES = ("refpoint_embed.weight", "query_feat.weight")  # [num_queries * group_detr, ...]


def refine_boxes(ref: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """LW-DETR's box reparametrization: centers move by delta * ref size, sizes scale by exp(delta)."""
    return torch.cat([delta[..., :2] * ref[..., 2:] + ref[..., :2], delta[..., 2:].exp() * ref[..., 2:]], -1)


def box_sine_embedding(boxes: torch.Tensor, feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """[..., 4] cxcywh -> [..., 4 * feats]: per coordinate interleaved sin/cos at `feats` frequencies, ordered
    (y, x, w, h) as DETR does. Computed in fp32."""
    dim_t = temperature ** (2 * (torch.arange(feats, device=boxes.device) // 2) / feats)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # [..., 4, feats]
    emb = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([emb[..., 1, :], emb[..., 0, :], emb[..., 2:, :].flatten(-2)], -1).to(boxes.dtype)


class QueryPosSelfAttention(nn.Module):
    """Multi-head self-attention in nn.MultiheadAttention's layout (in_proj_weight [3C, C], out_proj), as the
    checkpoint stores it; queries and keys see x + pos (one fused product), values x."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        w, bias = self.in_proj_weight, self.in_proj_bias
        q, k = F.linear(x + pos, w[:2 * c], bias[:2 * c]).view(b, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        v = F.linear(x, w[2 * c:], bias[2 * c:]).view(b, n, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


@dataclass(frozen=True)
class SamplingConfig:
    """The fields DeformableAttention reads: one level, Deformable-DETR's 0.5 offset scale, bilinear sampling."""
    d_model: int
    decoder_attention_heads: int
    points_per_level: tuple[int, ...]
    decoder_offset_scale: float = 0.5
    decoder_method: str = "default"


class DeformableCrossAttention(DeformableAttention):
    """The shared deformable sampling between a value projection of the memory and an output projection."""

    def __init__(self, dim: int, num_heads: int, points: int):
        super().__init__(SamplingConfig(dim, num_heads, (points,)))
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.register_buffer("num_points_scale", self.num_points_scale, persistent=False)  # constant, not stored

    def forward(self, query: torch.Tensor, ref_boxes: torch.Tensor, memory: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        """query [B, Q, C]; ref_boxes [B, Q, 4] cxcywh; memory [B, H*W, C] of the one map of `shape`."""
        b, s, c = memory.shape
        heads = self.num_heads
        value = self.value_proj(memory).view(b, s, heads, c // heads).permute(0, 2, 3, 1)
        return self.output_proj(super().forward(query, ref_boxes, [value.reshape(b * heads, c // heads, *shape)]))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention, deformable cross-attention, MLP (LayerNorms at torch's default eps)."""

    def __init__(self, cfg: RfDetrConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = QueryPosSelfAttention(d, cfg.decoder_self_attention_heads)
        self.norm1 = nn.LayerNorm(d)
        self.cross_attn = DeformableCrossAttention(d, cfg.decoder_cross_attention_heads, cfg.decoder_n_points)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = MLP(d, cfg.decoder_ffn_dim, d, 2, cfg.decoder_activation_function)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref_boxes: torch.Tensor, memory: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, pos))
        x = self.norm2(x + self.cross_attn(x + pos, ref_boxes, memory, shape))
        return self.norm3(x + self.ffn(x))


class Decoder(nn.Module):
    def __init__(self, cfg: RfDetrConfig):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)

    @staticmethod
    def disk_name(name: str) -> str:
        return re.sub(r"\.ffn\.layers\.([01])\.", lambda m: f".linear{int(m[1]) + 1}.", name)

    def forward(self, queries: torch.Tensor, ref_boxes: torch.Tensor, memory: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        """The last layer's normed output [B, Q, C]; every layer samples around the same `ref_boxes`."""
        pos = self.ref_point_head(box_sine_embedding(ref_boxes, queries.shape[-1] // 2))
        x = queries
        for layer in self.layers:
            x = layer(x, pos, ref_boxes, memory, shape)
        return self.norm(x)


class RfDetrDetector(nn.Module):
    def __init__(self, cfg: RfDetrConfig):
        super().__init__()
        self.cfg = cfg
        d, q = cfg.d_model, cfg.num_queries
        self.backbone = WindowedDinov2(cfg.backbone)
        self.projector = Projector(cfg)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_class_embed = nn.Linear(d, cfg.num_labels)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)
        self.refpoint_embed = nn.Embedding(q, 4)
        self.query_feat = nn.Embedding(q, d)
        self.decoder = Decoder(cfg)
        self.class_embed = nn.Linear(d, cfg.num_labels)
        self.bbox_embed = MLP(d, d, 4, 3)
        self._proposal_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def input_multiple(self) -> int:
        """Input sides must divide by this (patch_size x num_windows)."""
        return self.backbone.input_multiple

    def proposals(self, shape: tuple[int, int], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cxcywh proposals [1, H*W, 4], one per map cell, 0 where invalid; valid mask [1, H*W, 1]): cells whose
        box leaves (0.01, 0.99) are never selected. A shape-only constant, cached."""
        key = (shape, device, dtype)
        if key not in self._proposal_cache:
            h, w = shape
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            centers = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], -1).reshape(1, h * w, 2)
            boxes = torch.cat([centers, torch.full_like(centers, 0.05)], -1)
            valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
            self._proposal_cache[key] = (boxes.masked_fill(~valid, 0).to(device=device, dtype=dtype),
                                         valid.to(device))
        return self._proposal_cache[key]

    def forward(self, pixel_values: torch.Tensor) -> DetectorOutput:
        cfg = self.cfg
        features = self.projector(self.backbone(pixel_values))
        b, d, h, w = features.shape
        if cfg.num_queries > h * w:
            raise ValueError(f"num_queries={cfg.num_queries} exceeds the {h * w} cells of the {h}x{w} feature map; "
                             f"use a larger input")
        memory = features.flatten(2).transpose(1, 2)
        proposals, valid = self.proposals((h, w), memory.device, memory.dtype)
        cells = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0)))
        scores = self.enc_out_class_embed(cells).masked_fill(~valid, float("-inf"))
        top = torch.topk(scores.max(-1).values, cfg.num_queries, dim=1).indices.unsqueeze(-1)  # [B, Q, 1]
        # The box head is row-wise, so running it on the selected cells only gives the same boxes.
        selected = cells.gather(1, top.expand(-1, -1, d))
        enc_boxes = refine_boxes(proposals.expand(b, -1, -1).gather(1, top.expand(-1, -1, 4)),
                                 self.enc_out_bbox_embed(selected))
        ref_boxes = refine_boxes(enc_boxes, self.refpoint_embed.weight.unsqueeze(0))
        x = self.decoder(self.query_feat.weight.unsqueeze(0).expand(b, -1, -1), ref_boxes, memory, (h, w))
        return DetectorOutput(self.class_embed(x), refine_boxes(ref_boxes, self.bbox_embed(x)))

    def disk_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's."""
        for part, prefix in PART_PREFIXES.items():
            if name.startswith(part):
                inner = name[len(part):]
                if part == "backbone.":
                    inner = self.backbone.disk_name(inner)
                elif part == "projector.":
                    inner = Projector.disk_name(inner)
                elif part == "decoder.":
                    inner = Decoder.disk_name("." + inner)[1:]
                return prefix + inner
        return name

    def training_only_prefixes(self) -> tuple[str, ...]:
        """The two-stage heads of Group-DETR groups 1.. (training-only)."""
        return tuple(f"transformer.{head}.{g}." for head in GROUPED_HEADS for g in range(1, self.cfg.group_detr))

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint") -> None:
        """Strictly load an RfDetrForObjectDetection checkpoint (save_pretrained's layout)."""
        cfg = self.cfg
        if any(k.startswith("model.") for k in tensors):
            raise WeightError(f"{source}: tensors are named 'model.*' (transformers' in-memory names); RF-DETR "
                              f"checkpoints are read in save_pretrained's layout (backbone.0.*, transformer.*)")
        tensors = dict(tensors)
        for key in GROUPED_QUERIES:  # group 0's queries are the first num_queries rows
            if key not in tensors:
                continue  # load_into names it as missing
            expected = (cfg.num_queries * cfg.group_detr, 4 if key.startswith("refpoint") else cfg.d_model)
            if tuple(tensors[key].shape) != expected:
                raise WeightError(f"{source}: tensor '{key}' has shape {tuple(tensors[key].shape)}, expected "
                                  f"{expected} (num_queries x group_detr rows)")
            tensors[key] = tensors[key][:cfg.num_queries]
        used = load_into(self, tensors, dtype, source=source, key_of=self.disk_name)
        check_all_used(tensors, used, source, ignore=self.training_only_prefixes())
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> RfDetrDetector:
        """Build from a transformers RfDetrForObjectDetection directory (config.json + safetensors)."""
        model_dir = Path(model_dir)
        cfg = RfDetrConfig.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        with skip_random_init():  # load_weights assigns every persistent tensor
            detector = cls(cfg)
        detector.load_weights(read_safetensors(model_dir), dtype, source=str(model_dir))
        log.info("loaded RF-DETR detector from %s: %d labels, %d queries, ViT stages %s, %d windows", model_dir,
                 cfg.num_labels, cfg.num_queries, cfg.backbone.out_indices, cfg.backbone.num_windows)
        return detector.to(device).eval()
