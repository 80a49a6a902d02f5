"""Image classifier = backbone + linear head, reduced to one number: P(roadwork).

Heads follow Hugging Face conventions: ViT applies `classifier` to the final-norm CLS token; DINOv3 (which has
no classification class in transformers) follows Dinov2ForImageClassification: `classifier.weight` is
[num_labels, 2*hidden] over concat(final-norm CLS, mean of final-norm patch tokens, registers excluded)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.models.dinov3 import DINOv3Config, DINOv3ViT
from runtime.errors import ModelLoadError
from runtime.models.vit import ViT, ViTConfig
from runtime.models.weights import check_all_used, load_into, read_safetensors, skip_random_init

SUPPORTED_MODEL_TYPES = ("vit", "dinov3_vit")


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    roadwork_index: int

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> Labels:
        id2label = cfg.get("id2label") or {}
        try:
            names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{source}: id2label keys must be integers, got {list(id2label)}") from e
        if not names:
            num = cfg.get("num_labels", 2)
            names = tuple(f"LABEL_{i}" for i in range(num))
        chosen = cfg.get("roadwork_label")
        if isinstance(chosen, int) and not isinstance(chosen, bool):
            if not 0 <= chosen < len(names):
                raise ModelLoadError(f"{source}: roadwork_label {chosen} is outside 0..{len(names) - 1}")
            return cls(names, chosen)
        if isinstance(chosen, str):
            if chosen not in names:
                raise ModelLoadError(f"{source}: roadwork_label '{chosen}' is not one of id2label {list(names)}")
            return cls(names, names.index(chosen))
        if chosen is not None:
            raise ModelLoadError(f"{source}: roadwork_label must be a label index or name, got {chosen!r}")
        if len(names) == 1:
            return cls(names, 0)  # a single logit is read as P(roadwork) through a sigmoid
        hits = [i for i, n in enumerate(names) if "roadwork" in re.sub(r"[^a-z]", "", n.lower())]
        if len(hits) != 1:
            raise ModelLoadError(f"{source}: cannot tell which label means roadwork from id2label {list(names)}; "
                                 f"set \"roadwork_label\" (index or name) in config.json")
        return cls(names, hits[0])


class Classifier(nn.Module):
    def __init__(self, model_type: str, backbone: ViT | DINOv3ViT, num_labels: int, labels: Labels):
        super().__init__()
        self.model_type = model_type
        self.backbone = backbone
        self.labels = labels
        hidden = backbone.cfg.block.hidden_size
        self.pool_patches = model_type == "dinov3_vit"
        self.classifier = nn.Linear(hidden * (2 if self.pool_patches else 1), num_labels)

    def head_features(self, seq: torch.Tensor) -> torch.Tensor:
        if not self.pool_patches:
            return seq[:, 0]
        return torch.cat([seq[:, 0], seq[:, self.backbone.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, self.labels.roadwork_index]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(roadwork) [B] fp32, logits [B, num_labels])."""
        seq, _ = self.backbone(pixel_values)
        logits = self.classifier(self.head_features(seq))
        return self.probability(logits), logits


def build_backbone(cfg: dict, source: str) -> ViT | DINOv3ViT:
    model_type = cfg.get("model_type")
    if model_type == "vit":
        return ViT(ViTConfig.from_dict(cfg, source))
    if model_type == "dinov3_vit":
        return DINOv3ViT(DINOv3Config.from_dict(cfg, source))
    raise ModelLoadError(f"{source}: model_type '{model_type}' is not supported as a classifier "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def load_classifier(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> Classifier:
    """Build and strictly load a classifier from a Hugging Face directory (config.json + safetensors)."""
    model_dir = Path(model_dir)
    source = str(model_dir / "config.json")
    cfg = read_json(model_dir / "config.json")
    labels = Labels.from_config(cfg, source)
    with skip_random_init():  # every persistent tensor is assigned below
        model = Classifier(cfg.get("model_type"), build_backbone(cfg, source), len(labels.names), labels)
    tensors = read_safetensors(model_dir)
    where = str(model_dir)
    if model.model_type == "vit":
        used = model.backbone.load_weights(tensors, dtype, prefix="vit.", source=where)
    else:
        used = model.backbone.load_weights(tensors, dtype, prefix="", source=where)
    used |= load_into(model.classifier, tensors, dtype, prefix="classifier.", source=where)
    check_all_used(tensors, used, where)
    return model.to(device).eval()
