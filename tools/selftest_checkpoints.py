"""Random-weight checkpoints for the self-test, written with our own model code and safetensors (no transformers):
a model is built from a config.json derived from the bundled one, its weights perturbed, and saved under the names
its loader reads, so loading them back goes through the same path as a real checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from runtime.models.classifier import Classifier, Labels, build_backbone
from runtime.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from tools.selftest_context import BUNDLE

# DINOv3 classifiers users deploy, and a tiny one for the CPU.
CLASSIFIERS = {
    "dinov3-vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                          image_size=224),
    "dinov3-vitb16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32),
}
# Qwen3-VL-2B's head size, MRoPE sections and DeepStack taps with fewer and narrower layers; the bundled VLM's
# vocabulary and tokenizer.
QWEN3_VL_2B_SHAPED = dict(
    text_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=128,
                     rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=18, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                       deepstack_visual_indexes=[5, 11, 17]),
)


def perturb_(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random init leaves biases at 0 and norms at 1: make every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def write_classifier(path: Path, preset: str, seed: int = 0) -> Path:
    """A DINOv3 classifier directory (config.json, model.safetensors, preprocessor_config.json) of `preset`."""
    path.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((BUNDLE / "classifier" / "config.json").read_text()), **CLASSIFIERS[preset]}
    source = str(path / "config.json")
    torch.manual_seed(seed)
    model = Classifier(config["model_type"], build_backbone(config, source), 2, Labels.from_config(config, source))
    perturb_(model, seed, 0.1)
    # The loader's names: the backbone's tensors unprefixed (transformers' DINOv3ViTModel), then the head.
    head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    save_tensors({**model.backbone.state_dict(), **head}, path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    size = {"height": config["image_size"], "width": config["image_size"]}
    preprocessor = json.loads((BUNDLE / "classifier" / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "size": size}))
    return path


def write_vlm(path: Path, shape: dict, seed: int = 0) -> Path:
    """A Qwen3-VL directory with the bundled VLM's tokenizer, preprocessor and generation config, and `shape`'s
    text_config / vision_config fields over its config.json."""
    path.mkdir(parents=True, exist_ok=True)
    source = BUNDLE / "vlm"
    config = json.loads((source / "config.json").read_text())
    for part in ("text_config", "vision_config"):
        config[part] = {**config[part], **shape.get(part, {})}
    torch.manual_seed(seed)
    model = Qwen3VL(Qwen3VLConfig.from_dict(config))
    perturb_(model, seed)
    tensors = {**{f"model.visual.{k}": v for k, v in model.visual.state_dict().items()},
               **{f"model.language_model.{k}": v for k, v in model.language_model.state_dict().items()}}
    if model.lm_head is not None:
        tensors.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()})
    save_tensors(tensors, path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"):
        shutil.copy(source / name, path / name)
    return path
