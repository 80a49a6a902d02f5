"""Tiny random-weight checkpoints written by transformers, in the formats users bring."""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch as st
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel, ViTConfig, ViTForImageClassification

LABELS = {"id2label": {0: "None", 1: "Roadwork"}, "label2id": {"None": 0, "Roadwork": 1}}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

TINY_DINOV3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_register_tokens=4, image_size=32, patch_size=16)
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=16)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves biases at 0 and layer scales at 1; make every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mask_token" in name:
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def write_preprocessor(path: Path, kind: str, size: tuple[int, int]) -> None:
    h, w = size
    if kind == "dinov3":
        cfg = {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "resample": 2,
               "size": {"height": h, "width": w}, "do_rescale": True, "rescale_factor": 1 / 255,
               "do_normalize": True, **IMAGENET}
    else:
        cfg = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,
               "size": {"height": h, "width": w}, "do_rescale": True, "rescale_factor": 1 / 255,
               "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (path / "preprocessor_config.json").write_text(json.dumps(cfg))


def make_dinov3(path: Path, seed: int = 0, num_labels: int = 2, input_size: tuple[int, int] | None = None,
                **overrides) -> DINOv3ViTModel:
    """A DINOv3 backbone saved by transformers, plus our Dinov2-style classifier head in the same file."""
    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(**{**TINY_DINOV3, **overrides})
    model = DINOv3ViTModel(cfg).eval()
    perturb_(model, seed)
    labels = LABELS if num_labels == 2 else {"id2label": {i: f"class_{i}" for i in range(num_labels)}}
    model.config.update(labels)
    model.save_pretrained(path)
    tensors = st.load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    tensors["classifier.weight"] = torch.randn(num_labels, 2 * cfg.hidden_size, generator=g) * 0.2
    tensors["classifier.bias"] = torch.randn(num_labels, generator=g) * 0.2
    st.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    image_size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
    write_preprocessor(path, "dinov3", input_size or tuple(image_size))
    return model


def make_vit(path: Path, seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(**{**TINY_VIT, **overrides, **LABELS})
    model = ViTForImageClassification(cfg).eval()
    perturb_(model, seed)
    model.save_pretrained(path)
    write_preprocessor(path, "vit", (cfg.image_size, cfg.image_size))
    return model


def dinov3_reference(model: DINOv3ViTModel, pixel_values: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' backbone + the head computed by hand: (last_hidden_state, logits)."""
    tensors = st.load_file(path / "model.safetensors")
    seq = model(pixel_values=pixel_values).last_hidden_state
    prefix = 1 + model.config.num_register_tokens
    feats = torch.cat([seq[:, 0], seq[:, prefix:].mean(dim=1)], dim=-1)
    w, b = tensors["classifier.weight"].to(feats.dtype), tensors["classifier.bias"].to(feats.dtype)
    return seq, feats @ w.T + b
