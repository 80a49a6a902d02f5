"""DEIMv2 object detector, DINOv3-backbone variant (transformers' `Deimv2ForObjectDetection`, inference only).

pixels -> DINOv3 ViT hidden states at out_indices -> stride 8/16/32 maps fused with a conv adapter -> hybrid or
lite encoder -> top-k encoder proposals -> D-FINE style decoder -> (logits [B, Q, labels], cxcywh boxes [B, Q, 4]).
The ViT can be shared: `hidden_layers` says which raw hidden states `forward_from_backbone` needs."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.models.deimv2_config import Deimv2Config
from runtime.models.deimv2_decoder import Decoder
from runtime.models.detect_postprocess import DetectorOutput
from runtime.models.deimv2_encoder import MLP, ConvNorm, DINOv3ConvEncoder, HybridEncoder, LiteEncoder, \
    fold_batchnorms
from runtime.errors import WeightError
from runtime.models.weights import check_all_used, load_into, read_safetensors, skip_random_init

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "model.conv_encoder.backbone."
# Checkpoint tensors inference never reads: the denoising label embedding (training queries), BatchNorm step
# counters, and the top-level head copies transformers ties to model.decoder.{class,bbox}_embed.
TRAINING_ONLY_PREFIXES = ("model.denoising_class_embed.", "class_embed.", "bbox_embed.")
TRAINING_ONLY_SUFFIX = ".num_batches_tracked"


class QueryHead(nn.Module):
    """Encoder maps -> encoder -> decoder input projections -> top-k encoder proposals on anchors -> decoder. The
    two-stage head DEIMv2, D-FINE and RT-DETR share; attribute names are the checkpoint's under `model.`."""

    def __init__(self, cfg: Deimv2Config, encoder: nn.Module, decoder: nn.Module,
                 decoder_input_proj: nn.ModuleList | None = None):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.d_model, cfg.batch_norm_eps
        self.encoder = encoder
        in_ch = cfg.decoder_in_channels[-1]
        identity = d == in_ch
        n_in = len(cfg.decoder_in_channels)
        # One projection per decoder level; DEIMv2 and D-FINE skip them where the channels already match.
        self.decoder_input_proj = decoder_input_proj if decoder_input_proj is not None else nn.ModuleList(
            [nn.Identity() if identity else ConvNorm(in_ch, d, 1, 1, eps) for _ in range(n_in)]
            + [nn.Identity() if identity else ConvNorm(in_ch, d, 3, 2, eps)
               for _ in range(cfg.num_feature_levels - n_in)])
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.enc_score_head = nn.Linear(d, cfg.num_labels)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.decoder = decoder
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


class Deimv2Model(QueryHead):
    """Everything of `Deimv2ForObjectDetection.model` that inference runs."""

    def __init__(self, cfg: Deimv2Config):
        super().__init__(cfg, LiteEncoder(cfg) if cfg.encoder_type == "lite" else HybridEncoder(cfg), Decoder(cfg))
        self.conv_encoder = DINOv3ConvEncoder(cfg)


class Deimv2Detector(nn.Module):
    def __init__(self, cfg: Deimv2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Deimv2Model(cfg)

    @property
    def input_multiple(self) -> int:
        """Input sides must divide by this: the adapter's stride-32 map must match the ViT's patch grid."""
        return 2 * self.cfg.backbone_patch_size

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """1-based ViT layers whose raw outputs `forward_from_backbone` needs, in order."""
        return self.cfg.backbone_out_indices

    def forward(self, pixel_values: torch.Tensor) -> DetectorOutput:
        logits, boxes = self.model.detect(self.model.conv_encoder(pixel_values))
        return DetectorOutput(logits, boxes)

    def forward_from_backbone(self, pixel_values: torch.Tensor, hidden_states: list[torch.Tensor]) -> DetectorOutput:
        """Everything after the ViT. `hidden_states[i]`: raw (pre-final-norm) sequence after layer
        `hidden_layers[i]`, as `DINOv3ViT.forward(pixel_values, hidden_layers)` returns them. Exact only when that
        ViT holds this checkpoint's backbone weights (DEIMv2 fine-tunes its backbone)."""
        maps = self.model.conv_encoder.forward_from_hidden(pixel_values, hidden_states)
        logits, boxes = self.model.detect(maps)
        return DetectorOutput(logits, boxes)

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
            fold_batchnorms(self)
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

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", fold_batchnorm: bool = True) -> Deimv2Detector:
        """Build from a transformers Deimv2ForObjectDetection directory (config.json + safetensors)."""
        model_dir = Path(model_dir)
        cfg = Deimv2Config.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        with skip_random_init():  # load_weights assigns every persistent tensor
            detector = cls(cfg)
        detector.load_weights(read_safetensors(model_dir), dtype, source=str(model_dir), fold_batchnorm=fold_batchnorm)
        log.info("loaded DEIMv2 detector from %s: %d labels, %d queries, ViT layers %s", model_dir,
                 cfg.num_labels, cfg.num_queries, cfg.backbone_out_indices)
        return detector.to(device).eval()
