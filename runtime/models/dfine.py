"""D-FINE object detector (transformers' `DFineForObjectDetection` with an HGNetV2 backbone), inference only.

pixels -> HGNetV2 maps at out_indices -> 1x1 conv + BN input projections -> hybrid encoder (AIFI, FPN/PAN fusing by
concatenation into RepNCSPELAN4 blocks) -> top-k encoder proposals -> FDR/LQE decoder in D-FINE style ->
(logits [B, Q, labels], cxcywh boxes [B, Q, 4]). The head and decoder are DEIMv2's (DEIMv2 grew out of D-FINE)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.errors import WeightError
from runtime.models import hgnetv2
from runtime.models.deimv2 import QueryHead
from runtime.models.deimv2_decoder import DFINE_STYLE, Decoder
from runtime.models.deimv2_encoder import ConvNorm, HybridEncoder, RepVggBlock, fold_batchnorms
from runtime.models.detect_postprocess import DetectorOutput
from runtime.models.dfine_config import DFineConfig
from runtime.models.hgnetv2 import HGNetV2
from runtime.models.weights import check_all_used, load_into, read_safetensors, skip_random_init

log = logging.getLogger(__name__)

# Checkpoint tensors inference never reads: the denoising label embedding (training queries), BatchNorm step
# counters, and the top-level head copies transformers ties to model.decoder.{class,bbox}_embed.
TRAINING_ONLY_PREFIXES = ("model.denoising_class_embed.", "class_embed.", "bbox_embed.")
TRAINING_ONLY_SUFFIX = ".num_batches_tracked"
# transformers saves D-FINE under its pre-5.0 names and renames them when loading (conversion_mapping.py, "d_fine");
# do the same, so files written by either version load.
LEGACY_NAMES = [(re.compile(p), r) for p, r in [
    (r"out_proj", "o_proj"),
    (r"layers\.(\d+)\.fc1", r"layers.\1.mlp.layers.0"),
    (r"layers\.(\d+)\.fc2", r"layers.\1.mlp.layers.1"),
    (r"encoder\.encoder\.(\d+)\.layers", r"encoder.aifi.\1.layers"),
]]
# transformers holds these projections as nn.Sequential(conv, batchnorm); we hold ConvNorm(conv, norm).
SEQUENTIAL_CONV_NORM = re.compile(r"^(encoder_input_proj|decoder_input_proj)\.(\d+)\.(conv|norm)\.(.+)$")


class CSPRepLayer(nn.Module):
    """Two 1x1 branches of the input, RepVGG blocks on one, summed (its expansion is 1: no output conv)."""

    def __init__(self, cfg: DFineConfig, in_ch: int, out_ch: int, num_blocks: int):
        super().__init__()
        eps, act = cfg.batch_norm_eps, cfg.activation_function
        self.conv1 = ConvNorm(in_ch, out_ch, 1, 1, eps, act=act)
        self.conv2 = ConvNorm(in_ch, out_ch, 1, 1, eps, act=act)
        self.bottlenecks = nn.ModuleList(RepVggBlock(out_ch, eps, act) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        for block in self.bottlenecks:
            y = block(y)
        return y + self.conv2(x)


class RepNCSPELAN4(nn.Module):
    """Concatenated pair of maps -> split -> two chained CSP + 3x3 conv branches -> 4-way concat -> 1x1 conv.
    Its own convs are SiLU whatever activation_function says (as in transformers)."""

    def __init__(self, cfg: DFineConfig, num_blocks: int):
        super().__init__()
        d, eps = cfg.encoder_hidden_dim, cfg.batch_norm_eps
        csp = round(cfg.hidden_expansion * d // 2)
        self.conv1 = ConvNorm(2 * d, 2 * d, 1, 1, eps, act="silu")
        self.csp_rep1 = CSPRepLayer(cfg, d, csp, num_blocks)
        self.conv2 = ConvNorm(csp, csp, 3, 1, eps, act="silu")
        self.csp_rep2 = CSPRepLayer(cfg, csp, csp, num_blocks)
        self.conv3 = ConvNorm(csp, csp, 3, 1, eps, act="silu")
        self.conv4 = ConvNorm(2 * d + 2 * csp, d, 1, 1, eps, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv1(x).chunk(2, dim=1)
        x3 = self.conv2(self.csp_rep1(x2))
        x4 = self.conv3(self.csp_rep2(x3))
        return self.conv4(torch.cat([x1, x2, x3, x4], dim=1))


class DFineModel(QueryHead):
    """Everything of `DFineForObjectDetection.model` that inference runs."""

    def __init__(self, cfg: DFineConfig):
        super().__init__(cfg, HybridEncoder(cfg, block=RepNCSPELAN4, concat=True), Decoder(cfg, DFINE_STYLE))
        self.backbone = HGNetV2(cfg.backbone)
        # transformers builds these BatchNorms with the default epsilon, not batch_norm_eps.
        self.encoder_input_proj = nn.ModuleList(
            ConvNorm(c, cfg.encoder_hidden_dim, 1, 1, 1e-5) for c in cfg.backbone.out_channels)

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
    """Our DFineModel parameter name -> its key in a transformers DFineForObjectDetection checkpoint."""
    if name.startswith("backbone."):
        return "model.backbone.model." + hgnetv2.checkpoint_name(name[len("backbone."):])
    m = SEQUENTIAL_CONV_NORM.match(name)
    if m:
        return f"model.{m[1]}.{m[2]}.{0 if m[3] == 'conv' else 1}.{m[4]}"
    return "model." + name


class DFineDetector(nn.Module):
    def __init__(self, cfg: DFineConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DFineModel(cfg)

    @property
    def input_multiple(self) -> int:
        """Input sides must divide by this (the coarsest backbone map's stride), or the FPN's upsampled maps would
        not match the finer ones."""
        return self.cfg.backbone.out_strides[-1]

    def forward(self, pixel_values: torch.Tensor) -> DetectorOutput:
        h, w = pixel_values.shape[-2:]
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(f"input {h}x{w}: height and width must be multiples of {m}")
        logits, boxes = self.model(pixel_values)
        return DetectorOutput(logits, boxes)

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
                     fold_batchnorm: bool = True) -> None:
        """Strictly load a transformers DFineForObjectDetection state dict (errors name tensors by their current
        transformers names, e.g. `self_attn.o_proj` for a file's `self_attn.out_proj`). Loaded in fp32 so BatchNorm
        folding happens at full precision, then cast to `dtype`."""
        tensors = current_names({k: v for k, v in tensors.items() if not k.endswith(TRAINING_ONLY_SUFFIX)}, source)
        used = load_into(self.model, tensors, torch.float32, source=source, key_of=checkpoint_key)
        check_all_used(tensors, used, source, ignore=TRAINING_ONLY_PREFIXES)
        if fold_batchnorm:
            fold_batchnorms(self)
        self.to(dtype)
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", fold_batchnorm: bool = True) -> DFineDetector:
        """Build from a transformers DFineForObjectDetection directory (config.json + safetensors)."""
        model_dir = Path(model_dir)
        cfg = DFineConfig.from_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        with skip_random_init():  # load_weights assigns every persistent tensor
            detector = cls(cfg)
        detector.load_weights(read_safetensors(model_dir), dtype, source=str(model_dir), fold_batchnorm=fold_batchnorm)
        log.info("loaded D-FINE detector from %s: %d labels, %d queries, HGNetV2 outputs %s", model_dir,
                 cfg.num_labels, cfg.num_queries, cfg.backbone.out_indices)
        return detector.to(device).eval()
