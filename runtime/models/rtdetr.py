"""RT-DETR and RT-DETRv2 object detectors with ResNet-vd backbones (transformers' `RTDetrForObjectDetection` and
`RTDetrV2ForObjectDetection`, inference only).

pixels -> ResNet-vd maps (strides 8/16/32) -> 1x1 input projections -> hybrid encoder (AIFI on the last level,
concat-fused CSP FPN/PAN) -> top-k encoder proposals on fixed anchors -> deformable decoder refining boxes layer by
layer -> (logits [B, Q, labels], cxcywh boxes [B, Q, 4]). The encoder and the two-stage head are the ones DEIMv2 and
D-FINE share; only the CSP block, the decoder and the backbone are RT-DETR's own."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.errors import WeightError
from runtime.models import resnet_vd
from runtime.models.deimv2 import QueryHead
from runtime.models.deimv2_encoder import ConvNorm, HybridEncoder, fold_batchnorms
from runtime.models.detect_postprocess import DetectorOutput
from runtime.models.dfine import CSPRepLayer as SummedCSPLayer
from runtime.models.resnet_vd import ResNetVd
from runtime.models.rtdetr_config import RTDetrConfig
from runtime.models.rtdetr_decoder import Decoder
from runtime.models.weights import check_all_used, load_into, read_safetensors, skip_random_init

log = logging.getLogger(__name__)

# Checkpoint tensors inference never reads: the denoising label embedding (training queries) and BatchNorm step
# counters. Top-level class_embed/bbox_embed are the copies transformers ties to model.decoder's (see _untie_heads).
TRAINING_ONLY_PREFIXES = ("model.denoising_class_embed.", "class_embed.", "bbox_embed.")
TRAINING_ONLY_SUFFIX = ".num_batches_tracked"
INPUT_PROJ_BN_EPS = 1e-5  # encoder_input_proj's BatchNorm has torch's default eps, not batch_norm_eps
# transformers saves RT-DETR under its pre-5.0 names and renames them when loading (conversion_mapping.py,
# "rt_detr"); do the same, so files written by either version load.
LEGACY_NAMES = [(re.compile(p), r) for p, r in [
    (r"out_proj", "o_proj"),
    (r"layers\.(\d+)\.fc1", r"layers.\1.mlp.fc1"),
    (r"layers\.(\d+)\.fc2", r"layers.\1.mlp.fc2"),
    (r"encoder\.encoder\.(\d+)\.layers", r"encoder.aifi.\1.layers"),
]]
# Our shared modules' names -> transformers' current ones (its projections are nn.Sequential(conv, batchnorm)).
OUR_NAMES = [(re.compile(p), r) for p, r in [
    (r"\.mlp\.layers\.(\d)\.", lambda m: f".mlp.fc{int(m[1]) + 1}."),
    (r"\.encoder_attn\.num_points_scale$", ".encoder_attn.n_points_scale"),
    (r"^(encoder_input_proj|decoder_input_proj)\.(\d+)\.conv\.", r"\1.\2.0."),
    (r"^(encoder_input_proj|decoder_input_proj)\.(\d+)\.norm\.", r"\1.\2.1."),
]]


class CSPRepLayer(SummedCSPLayer):
    """D-FINE's CSP block (two 1x1 branches of the concatenated maps, RepVGG blocks on one, summed) with RT-DETR's
    1x1 output conv where hidden_expansion shrinks the branches."""

    def __init__(self, cfg: RTDetrConfig, num_blocks: int):
        d = cfg.encoder_hidden_dim
        hidden = int(d * cfg.hidden_expansion)
        super().__init__(cfg, 2 * d, hidden, num_blocks)
        self.conv3 = ConvNorm(hidden, d, 1, 1, cfg.batch_norm_eps, act=cfg.activation_function) \
            if hidden != d else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(super().forward(x))


def downsample_conv(cfg: RTDetrConfig) -> ConvNorm:
    d = cfg.encoder_hidden_dim
    return ConvNorm(d, d, 3, 2, cfg.batch_norm_eps, act=cfg.activation_function)


def decoder_input_proj(cfg: RTDetrConfig) -> nn.ModuleList:
    """Conv + BatchNorm per decoder level (never skipped); the extra coarse levels are 3x3 stride-2 convs, the first
    on the last encoder map's channels, later ones on d_model (transformers feeds them all the last encoder map)."""
    d, eps, n_in = cfg.d_model, cfg.batch_norm_eps, len(cfg.decoder_in_channels)
    extra_in = [cfg.decoder_in_channels[-1]] + [d] * (cfg.num_feature_levels - n_in - 1)
    return nn.ModuleList([ConvNorm(c, d, 1, 1, eps) for c in cfg.decoder_in_channels]
                         + [ConvNorm(c, d, 3, 2, eps) for c in extra_in[:cfg.num_feature_levels - n_in]])


class RTDetrModel(QueryHead):
    """Everything of `RTDetrForObjectDetection.model` that inference runs."""

    def __init__(self, cfg: RTDetrConfig):
        encoder = HybridEncoder(cfg, block=CSPRepLayer, concat=True, downsample=downsample_conv,
                                lateral_act=cfg.activation_function)
        super().__init__(cfg, encoder, Decoder(cfg), decoder_input_proj(cfg))
        self.backbone = ResNetVd(cfg.backbone)
        self.encoder_input_proj = nn.ModuleList(ConvNorm(c, cfg.encoder_hidden_dim, 1, 1, INPUT_PROJ_BN_EPS)
                                                for c in cfg.backbone.out_channels)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.backbone(pixel_values)
        return self.detect([proj(m) for proj, m in zip(self.encoder_input_proj, maps)])


def current_names(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint with legacy tensor names replaced by the ones transformers' modules use."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key
        for pattern, replacement in LEGACY_NAMES:
            name = pattern.sub(replacement, name, count=1)
        if name in out:
            raise WeightError(f"{source}: tensor '{key}' and another one both name '{name}'")
        out[name] = value
    return out


def checkpoint_key(name: str) -> str:
    """Our RTDetrModel parameter name -> its key in a transformers RTDetr(V2)ForObjectDetection state dict."""
    if name.startswith("backbone."):
        return "model.backbone.model." + resnet_vd.checkpoint_name(name[len("backbone."):])
    for pattern, replacement in OUR_NAMES:
        name = pattern.sub(replacement, name)
    return "model." + name


class RTDetrDetector(nn.Module):
    """RT-DETR (model_type "rt_detr") and RT-DETRv2 ("rt_detr_v2") with a ResNet-vd backbone."""

    def __init__(self, cfg: RTDetrConfig):
        super().__init__()
        self.cfg = cfg
        self.model = RTDetrModel(cfg)

    @property
    def input_multiple(self) -> int:
        """Input sides must divide by this (the coarsest backbone map's stride), or the FPN's upsampled maps would
        not match the finer ones."""
        return self.cfg.backbone.stage_strides[self.cfg.backbone.out_indices[-1]]

    def forward(self, pixel_values: torch.Tensor) -> DetectorOutput:
        h, w = pixel_values.shape[-2:]
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(f"input {h}x{w}: height and width must be multiples of {m}")
        logits, boxes = self.model(pixel_values.to(self.model.enc_score_head.weight.dtype))
        return DetectorOutput(logits, boxes)

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
                     fold_batchnorm: bool = True) -> None:
        """Strictly load a transformers RTDetr(V2)ForObjectDetection state dict (errors name tensors by their
        current transformers names, e.g. `self_attn.o_proj` for a file's `self_attn.out_proj`). Loaded in fp32 so
        BatchNorm folding happens at full precision, then cast to `dtype`."""
        tensors = {k: v for k, v in tensors.items() if not k.endswith(TRAINING_ONLY_SUFFIX)}
        tensors = untie_heads(current_names(tensors, source))
        used = load_into(self.model, tensors, torch.float32, source=source, key_of=checkpoint_key)
        check_all_used(tensors, used, source, ignore=TRAINING_ONLY_PREFIXES)
        if fold_batchnorm:
            fold_batchnorms(self)
        self.to(dtype)
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", fold_batchnorm: bool = True) -> RTDetrDetector:
        """Build from a transformers RT-DETR or RT-DETRv2 directory (config.json + safetensors)."""
        model_dir = Path(model_dir)
        cfg = RTDetrConfig.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        with skip_random_init():  # load_weights assigns every persistent tensor
            detector = cls(cfg)
        detector.load_weights(read_safetensors(model_dir), dtype, source=str(model_dir), fold_batchnorm=fold_batchnorm)
        log.info("loaded %s detector from %s: %d labels, %d queries, %s ResNet-vd depths %s", cfg.model_type,
                 model_dir, cfg.num_labels, cfg.num_queries, cfg.backbone.layer_type, list(cfg.backbone.depths))
        return detector.to(device).eval()


def untie_heads(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ties the top-level heads to model.decoder's and may save only the top-level copy; use it where
    the decoder's is absent."""
    out = dict(tensors)
    for key, value in tensors.items():
        if key.startswith(("class_embed.", "bbox_embed.")):
            out.setdefault("model.decoder." + key, value)
    return out
