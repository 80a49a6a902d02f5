"""DEIMv2 object detector, DINOv3-backbone variant (transformers' `Deimv2ForObjectDetection`, inference only).

pixels -> DINOv3 ViT hidden states at out_indices -> stride 8/16/32 maps fused with a conv adapter -> hybrid or
lite encoder -> top-k encoder proposals -> D-FINE style decoder -> (logits [B, Q, labels], cxcywh boxes [B, Q, 4]).
The ViT can be shared: `hidden_layers` says which raw hidden states `forward_from_backbone` needs."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.models.deimv2_decoder import Decoder
from runtime.models.deimv2_encoder import ACTIVATIONS, MLP, ConvNorm, DINOv3ConvEncoder, HybridEncoder, LiteEncoder, \
    RepVggBlock
from runtime.models.dinov3 import DINOv3Config
from runtime.errors import ModelLoadError, WeightError
from runtime.models.weights import check_all_used, load_into, read_safetensors

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "model.conv_encoder.backbone."
# Checkpoint tensors inference never reads: the denoising label embedding (training queries), BatchNorm step
# counters, and the top-level head copies transformers ties to model.decoder.{class,bbox}_embed.
TRAINING_ONLY_PREFIXES = ("model.denoising_class_embed.", "class_embed.", "bbox_embed.")
TRAINING_ONLY_SUFFIX = ".num_batches_tracked"


def _field(cfg: dict, key: str, kind: type, default, source: str):
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelLoadError(f"{source}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _int_list(cfg: dict, key: str, default: list[int], source: str) -> tuple[int, ...]:
    value = cfg.get(key, default)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise ModelLoadError(f"{source}: field '{key}' must be a list of ints, got {value!r}")
    return tuple(value)


def _choice(cfg: dict, key: str, default: str, allowed: tuple[str, ...], source: str, why: str = "") -> str:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ModelLoadError(f"{source}: {key}={value!r} is not supported (supported: {', '.join(allowed)}){why}")
    return value


def _check(ok: bool, source: str, message: str) -> None:
    if not ok:
        raise ModelLoadError(f"{source}: {message}")


@dataclass(frozen=True)
class Deimv2Config:
    """The inference-relevant fields of a transformers Deimv2Config (DINOv3 backbone). Defaults equal
    transformers' defaults for fields missing from config.json."""
    backbone: DINOv3Config
    backbone_hidden_size: int
    backbone_patch_size: int
    backbone_num_layers: int
    backbone_num_prefix_tokens: int
    backbone_out_indices: tuple[int, ...]
    backbone_apply_layernorm: bool
    id2label: dict[int, str]
    layer_norm_eps: float
    batch_norm_eps: float
    spatial_tuning_adapter_inplanes: int
    encoder_type: str
    encoder_hidden_dim: int
    encoder_in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    encoder_layers: int
    encoder_ffn_dim: int
    encoder_attention_heads: int
    encode_proj_layers: tuple[int, ...]
    positional_encoding_temperature: float
    encoder_activation_function: str
    activation_function: str
    eval_size: tuple[int, ...] | None
    normalize_before: bool
    hidden_expansion: float
    depth_mult: float
    encoder_has_trailing_conv: bool
    d_model: int
    num_queries: int
    decoder_in_channels: tuple[int, ...]
    decoder_ffn_dim: int
    num_feature_levels: int
    points_per_level: tuple[int, ...]
    decoder_layers: int
    decoder_attention_heads: int
    decoder_activation_function: str
    decoder_offset_scale: float
    decoder_method: str
    anchor_image_size: tuple[int, int] | None
    max_num_bins: int
    reg_scale: float
    up: float
    top_prob_values: int
    lqe_hidden_dim: int
    lqe_layers: int
    use_gateway: bool
    share_bbox_head: bool

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_encoder_outputs(self) -> int:
        return 2 if self.encoder_type == "lite" else len(self.encoder_in_channels)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> Deimv2Config:
        _check(cfg.get("model_type") == "deimv2", source,
               f"model_type must be 'deimv2', got {cfg.get('model_type')!r}")
        bb = cfg.get("backbone_config")
        _check(isinstance(bb, dict), source, "backbone_config must be an object (the DINOv3 ViT config)")
        bb_type = bb.get("model_type")
        _check(bb_type == "dinov3_vit", source,
               f"backbone_config.model_type {bb_type!r} is not supported: only the DINOv3 backbone variant "
               f"('dinov3_vit') is implemented (HGNetV2 DEIMv2 models are not)")
        bb_source = f"{source} backbone_config"
        backbone = DINOv3Config.from_dict(bb, bb_source)
        num_layers = backbone.num_layers
        _check(backbone.patch_size[0] == backbone.patch_size[1], bb_source,
               f"patch_size must be square, got {backbone.patch_size}")
        if "out_indices" in bb:
            out_indices = _int_list(bb, "out_indices", [], bb_source)
        else:
            names = bb.get("out_features") or [f"stage{num_layers}"]
            _check(all(isinstance(n, str) and n.startswith("stage") and n[5:].isdigit() for n in names), bb_source,
                   f"out_features must be stage names like 'stage6', got {names!r}")
            out_indices = tuple(int(n[5:]) for n in names)
        _check(len(out_indices) == 3, bb_source,
               f"out_indices must name 3 layers (one per stride 8/16/32 map), got {list(out_indices)}")
        _check(list(out_indices) == sorted(set(out_indices)) and 1 <= out_indices[0]
               and out_indices[-1] <= num_layers, bb_source,
               f"out_indices must be increasing layer numbers in 1..{num_layers}, got {list(out_indices)}")

        id2label = cfg.get("id2label")
        if id2label:
            try:
                labels = {int(k): str(v) for k, v in id2label.items()}
            except (ValueError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{source}: id2label must map integer ids to names, got {id2label!r}") from e
            _check(sorted(labels) == list(range(len(labels))), source,
                   f"id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)}")
        else:
            labels = {i: f"LABEL_{i}" for i in range(_field(cfg, "num_labels", int, 2, source))}

        acts = tuple(ACTIVATIONS)
        _check(not cfg.get("learn_initial_query", False), source,
               "learn_initial_query=true is not supported (transformers' own inference path fails with it)")
        _choice(cfg, "encoder_fuse_op", "sum", ("sum",), source,
                "; DEIMv2's CSP blocks take encoder_hidden_dim channels, which only sum fusion produces")
        decoder_layers = _field(cfg, "decoder_layers", int, 6, source)
        eval_idx = _field(cfg, "eval_idx", int, -1, source)
        _check(eval_idx in (-1, decoder_layers - 1), source,
               f"eval_idx={eval_idx} is not supported: only the last decoder layer (-1 or {decoder_layers - 1}) "
               f"can be evaluated (transformers fails on other values too)")
        num_levels = _field(cfg, "num_feature_levels", int, 3, source)
        points = cfg.get("decoder_n_points", 4)
        if isinstance(points, int) and not isinstance(points, bool):
            points = [points] * num_levels
        points = _int_list({"decoder_n_points": points}, "decoder_n_points", [], source)
        _check(len(points) == num_levels and min(points) > 0, source,
               f"decoder_n_points must be a positive int or one per level ({num_levels}), got {list(points)}")
        eval_size = cfg.get("eval_size")
        anchor = cfg.get("anchor_image_size")
        _check(anchor is None or (isinstance(anchor, list) and len(anchor) == 2), source,
               f"anchor_image_size must be null or [height, width], got {anchor!r}")

        out = cls(
            backbone=backbone,
            backbone_hidden_size=backbone.block.hidden_size,
            backbone_patch_size=backbone.patch_size[0],
            backbone_num_layers=num_layers,
            backbone_num_prefix_tokens=1 + backbone.num_register_tokens,
            backbone_out_indices=out_indices,
            backbone_apply_layernorm=_field(bb, "apply_layernorm", bool, True, bb_source),
            id2label=labels,
            layer_norm_eps=_field(cfg, "layer_norm_eps", float, 1e-5, source),
            batch_norm_eps=_field(cfg, "batch_norm_eps", float, 1e-5, source),
            spatial_tuning_adapter_inplanes=_field(cfg, "spatial_tuning_adapter_inplanes", int, 16, source),
            encoder_type=_choice(cfg, "encoder_type", "hybrid", ("hybrid", "lite"), source),
            encoder_hidden_dim=_field(cfg, "encoder_hidden_dim", int, 256, source),
            encoder_in_channels=_int_list(cfg, "encoder_in_channels", [512, 1024, 2048], source),
            feat_strides=_int_list(cfg, "feat_strides", [8, 16, 32], source),
            encoder_layers=_field(cfg, "encoder_layers", int, 1, source),
            encoder_ffn_dim=_field(cfg, "encoder_ffn_dim", int, 1024, source),
            encoder_attention_heads=_field(cfg, "encoder_attention_heads", int, 8, source),
            encode_proj_layers=_int_list(cfg, "encode_proj_layers", [2], source),
            positional_encoding_temperature=_field(cfg, "positional_encoding_temperature", float, 10000.0, source),
            encoder_activation_function=_choice(cfg, "encoder_activation_function", "gelu", acts, source),
            activation_function=_choice(cfg, "activation_function", "silu", acts, source),
            eval_size=None if eval_size is None else _int_list(cfg, "eval_size", [], source),
            normalize_before=_field(cfg, "normalize_before", bool, False, source),
            hidden_expansion=_field(cfg, "hidden_expansion", float, 1.0, source),
            depth_mult=_field(cfg, "depth_mult", float, 1.0, source),
            encoder_has_trailing_conv=_field(cfg, "encoder_has_trailing_conv", bool, True, source),
            d_model=_field(cfg, "d_model", int, 256, source),
            num_queries=_field(cfg, "num_queries", int, 300, source),
            decoder_in_channels=_int_list(cfg, "decoder_in_channels", [256, 256, 256], source),
            decoder_ffn_dim=_field(cfg, "decoder_ffn_dim", int, 1024, source),
            num_feature_levels=num_levels,
            points_per_level=points,
            decoder_layers=decoder_layers,
            decoder_attention_heads=_field(cfg, "decoder_attention_heads", int, 8, source),
            decoder_activation_function=_choice(cfg, "decoder_activation_function", "relu", acts, source),
            decoder_offset_scale=_field(cfg, "decoder_offset_scale", float, 0.5, source),
            decoder_method=_choice(cfg, "decoder_method", "default", ("default", "discrete"), source),
            anchor_image_size=None if anchor is None else _int_list(cfg, "anchor_image_size", [], source),
            max_num_bins=_field(cfg, "max_num_bins", int, 32, source),
            reg_scale=_field(cfg, "reg_scale", float, 4.0, source),
            up=_field(cfg, "up", float, 0.5, source),
            top_prob_values=_field(cfg, "top_prob_values", int, 4, source),
            lqe_hidden_dim=_field(cfg, "lqe_hidden_dim", int, 64, source),
            lqe_layers=_field(cfg, "lqe_layers", int, 2, source),
            use_gateway=_field(cfg, "use_gateway", bool, True, source),
            share_bbox_head=_field(cfg, "share_bbox_head", bool, False, source),
        )
        out._validate(source)
        return out

    def _validate(self, source: str) -> None:
        _check(len(self.encoder_in_channels) == 3, source,
               f"encoder_in_channels must have 3 entries (the DINOv3 encoder yields 3 maps), "
               f"got {list(self.encoder_in_channels)}")
        _check(all(0 <= i < 3 for i in self.encode_proj_layers), source,
               f"encode_proj_layers must index the 3 encoder levels, got {list(self.encode_proj_layers)}")
        _check(self.num_feature_levels >= self.num_encoder_outputs, source,
               f"num_feature_levels={self.num_feature_levels} is below the {self.num_encoder_outputs} levels the "
               f"{self.encoder_type} encoder produces")
        _check(self.decoder_in_channels[-1] == self.encoder_hidden_dim, source,
               f"decoder_in_channels[-1]={self.decoder_in_channels[-1]} must equal encoder_hidden_dim="
               f"{self.encoder_hidden_dim}")
        _check(self.d_model % self.decoder_attention_heads == 0, source,
               f"d_model={self.d_model} is not divisible by decoder_attention_heads={self.decoder_attention_heads}")
        _check(self.encoder_hidden_dim % self.encoder_attention_heads == 0, source,
               f"encoder_hidden_dim={self.encoder_hidden_dim} is not divisible by "
               f"encoder_attention_heads={self.encoder_attention_heads}")
        _check(self.encoder_hidden_dim % 4 == 0, source,
               f"encoder_hidden_dim={self.encoder_hidden_dim} must be divisible by 4 (2D sine position embedding)")
        _check(self.max_num_bins > 2 and self.max_num_bins % 2 == 0, source,
               f"max_num_bins must be an even number above 2, got {self.max_num_bins}")
        _check(0 < self.top_prob_values <= self.max_num_bins + 1, source,
               f"top_prob_values must be in 1..{self.max_num_bins + 1}, got {self.top_prob_values}")
        _check(self.num_queries > 0, source, f"num_queries must be positive, got {self.num_queries}")
        _check(self.anchor_image_size is None or len(self.feat_strides) == self.num_feature_levels, source,
               f"anchor_image_size needs one feat_strides entry per level ({self.num_feature_levels}), "
               f"got {list(self.feat_strides)}")


@dataclass
class Deimv2Output:
    logits: torch.Tensor      # [B, num_queries, num_labels], sigmoid gives per-class scores
    pred_boxes: torch.Tensor  # [B, num_queries, 4] normalized (cx, cy, w, h)


class Deimv2Model(nn.Module):
    """Everything of `Deimv2ForObjectDetection.model` that inference runs."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.d_model, cfg.batch_norm_eps
        self.conv_encoder = DINOv3ConvEncoder(cfg)
        self.encoder = LiteEncoder(cfg) if cfg.encoder_type == "lite" else HybridEncoder(cfg)
        in_ch = cfg.decoder_in_channels[-1]
        identity = d == in_ch
        n_in = len(cfg.decoder_in_channels)
        self.decoder_input_proj = nn.ModuleList(
            [nn.Identity() if identity else ConvNorm(in_ch, d, 1, 1, eps) for _ in range(n_in)]
            + [nn.Identity() if identity else ConvNorm(in_ch, d, 3, 2, eps)
               for _ in range(cfg.num_feature_levels - n_in)])
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.enc_score_head = nn.Linear(d, cfg.num_labels)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.decoder = Decoder(cfg)
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(self, shapes: list[tuple[int, int]], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit-space anchors [1, S, 4], valid mask [1, S, 1]); invalid anchors are set to the dtype max."""
        cfg = self.cfg
        if cfg.anchor_image_size is not None:
            fixed = [(int(cfg.anchor_image_size[0] / s), int(cfg.anchor_image_size[1] / s)) for s in cfg.feat_strides]
            if fixed != shapes:
                raise ValueError(f"anchor_image_size {list(cfg.anchor_image_size)} gives level shapes {fixed}, "
                                 f"but this input gives {shapes}")
        key = (tuple(shapes), device, dtype)
        if key not in self._anchor_cache:
            levels = []
            for level, (h, w) in enumerate(shapes):
                gy, gx = torch.meshgrid(torch.arange(h, device=device).to(dtype),
                                        torch.arange(w, device=device).to(dtype), indexing="ij")
                xy = torch.stack([gx, gy], -1).unsqueeze(0) + 0.5
                xy[..., 0] /= w
                xy[..., 1] /= h
                wh = torch.ones_like(xy) * 0.05 * (2.0 ** level)
                levels.append(torch.cat([xy, wh], -1).reshape(-1, h * w, 4))
            anchors = torch.cat(levels, 1)
            valid = ((anchors > 1e-2) * (anchors < 1 - 1e-2)).all(-1, keepdim=True)
            anchors = torch.log(anchors / (1 - anchors))
            anchors = torch.where(valid, anchors, torch.full((), torch.finfo(dtype).max, dtype=dtype, device=device))
            self._anchor_cache[key] = (anchors, valid)
        return self._anchor_cache[key]

    def detect(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input maps -> (logits, cxcywh boxes)."""
        cfg = self.cfg
        feats = self.encoder(maps)
        sources = [proj(f) for proj, f in zip(self.decoder_input_proj, feats)]
        # Extra coarse levels all come from the last encoder map.
        sources += [self.decoder_input_proj[i](feats[-1]) for i in range(len(sources), cfg.num_feature_levels)]
        shapes = [(s.shape[2], s.shape[3]) for s in sources]
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], dim=1)
        b, total, c = memory.shape
        if cfg.num_queries > total:
            raise ValueError(f"num_queries={cfg.num_queries} exceeds the {total} encoder tokens of level shapes "
                             f"{shapes}; use a larger input")
        anchors, valid = self.anchors(shapes, memory.device, memory.dtype)
        proposals = self.enc_output(valid.to(memory.dtype) * memory)
        scores = self.enc_score_head(proposals)
        top = torch.topk(scores.max(-1).values, cfg.num_queries, dim=1).indices  # [B, Q]
        queries = proposals.gather(1, top.unsqueeze(-1).expand(-1, -1, c))
        # The box head is row-wise, so running it on the selected proposals only gives the same boxes.
        ref_logits = self.enc_bbox_head(queries) + anchors[0][top]
        return self.decoder(queries, ref_logits, memory, shapes)


class Deimv2Detector(nn.Module):
    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Deimv2Model(cfg)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """1-based ViT layers whose raw outputs `forward_from_backbone` needs, in order."""
        return self.cfg.backbone_out_indices

    def forward(self, pixel_values: torch.Tensor) -> Deimv2Output:
        logits, boxes = self.model.detect(self.model.conv_encoder(pixel_values))
        return Deimv2Output(logits, boxes)

    def forward_from_backbone(self, pixel_values: torch.Tensor, hidden_states: list[torch.Tensor]) -> Deimv2Output:
        """Everything after the ViT. `hidden_states[i]`: raw (pre-final-norm) sequence after layer
        `hidden_layers[i]`, as `DINOv3ViT.forward(pixel_values, hidden_layers)` returns them. Exact only when that
        ViT holds this checkpoint's backbone weights (DEIMv2 fine-tunes its backbone)."""
        maps = self.model.conv_encoder.forward_from_hidden(pixel_values, hidden_states)
        logits, boxes = self.model.detect(maps)
        return Deimv2Output(logits, boxes)

    def head_modules(self) -> list[tuple[str, nn.Module]]:
        """(checkpoint prefix, module) for every part except the ViT."""
        conv = self.model.conv_encoder
        parts = [("model.conv_encoder.spatial_tuning_adapter.", conv.spatial_tuning_adapter),
                 ("model.conv_encoder.fusion_proj.", conv.fusion_proj)]
        parts += [(f"model.{name}.", child) for name, child in self.model.named_children() if name != "conv_encoder"]
        return parts

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
                     fold_batchnorm: bool = True) -> None:
        """Strictly load a transformers Deimv2ForObjectDetection state dict. The head is loaded in fp32 so
        BatchNorm folding happens at full precision, then cast to `dtype`."""
        tensors = {k: v for k, v in tensors.items() if not k.endswith(TRAINING_ONLY_SUFFIX)}
        if self.cfg.share_bbox_head:
            tensors = self._rename_shared_box_head(tensors, source)
        used = self.model.conv_encoder.backbone.load_weights(tensors, dtype, prefix=BACKBONE_PREFIX, source=source)
        for prefix, module in self.head_modules():
            used |= load_into(module, tensors, torch.float32, prefix=prefix, source=source)
        check_all_used(tensors, used, source, ignore=TRAINING_ONLY_PREFIXES)
        if fold_batchnorm:
            self.fold_batchnorm()
        for _, module in self.head_modules():
            module.to(dtype)
        self.requires_grad_(False)

    def _rename_shared_box_head(self, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        # transformers writes one copy of a shared box head under a single layer index; we hold it as index 0.
        head = "model.decoder.bbox_embed."
        indices = sorted({k[len(head):].split(".", 1)[0] for k in tensors if k.startswith(head)})
        if len(indices) != 1:
            raise WeightError(f"{source}: share_bbox_head=true expects one '{head}N.*' copy, found indices {indices}")
        old = f"{head}{indices[0]}."
        return {(f"{head}0." + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}

    def fold_batchnorm(self) -> None:
        """Merge every eval-mode BatchNorm into its conv and RepVGG branches into one 3x3 conv. Changes only
        rounding (folding is done in float64)."""
        with torch.no_grad():
            for module in list(self.modules()):
                if isinstance(module, RepVggBlock):
                    module.fold()
            for module in list(self.modules()):
                if isinstance(module, ConvNorm):
                    module.fold()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", fold_batchnorm: bool = True) -> Deimv2Detector:
        """Build from a transformers Deimv2ForObjectDetection directory (config.json + safetensors)."""
        model_dir = Path(model_dir)
        cfg = Deimv2Config.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        detector = cls(cfg)
        detector.load_weights(read_safetensors(model_dir), dtype, source=str(model_dir), fold_batchnorm=fold_batchnorm)
        log.info("loaded DEIMv2 detector from %s: %d labels, %d queries, ViT layers %s", model_dir,
                 cfg.num_labels, cfg.num_queries, cfg.backbone_out_indices)
        return detector.to(device).eval()
