"""Start the VLM's vision tower from a trained DINOv3 ViT: `python -m train.vlm --vision-from DIR`.

From scratch, the tiny Qwen3-VL does not learn to see roadwork within a CPU budget (its yes/no loss stays near
ln 2), while the cascade's DINOv3 backbone already does. The two towers are the same pre-norm transformer up
to parametrisation, so the trained one is copied over:
- patch embedding: Conv2d(3, C, p) becomes the Conv3d over Qwen's two identical frames, half the kernel each;
- positions: DINOv3 has no learned position table (Qwen's is zeroed) and rotates q/k with 2D RoPE at angles
  2*pi * (2*(i + 0.5)/H - 1) * theta^(-4j/d), Qwen3-VL at i * theta^(-4j/d). With the same theta the relative
  angles differ by the constant factor 4*pi/H (0.90 at H = 14), which a config cannot express: fine-tuning
  absorbs it, or it stays as a small perturbation when the tower is frozen;
- blocks: q/k/v fuse into qkv (no key bias in DINOv3: zeros); layer scale folds into attn.proj and linear_fc2;
- DINOv3's final LayerNorm becomes the merger's LayerNorm (both act per patch before the 2x2 merge);
- CLS and register tokens have no counterpart and are dropped.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runtime.config import read_json
from runtime.models.dinov3 import DINOv3Config, DINOv3ViT
from runtime.models.weights import read_safetensors

def read_backbone(source: Path) -> tuple[DINOv3Config, dict, dict[str, torch.Tensor]]:
    """(config, preprocessor config, float32 backbone tensors by their on-disk names: embeddings.*, layer.N.*,
    norm.*) of a DINOv3 directory, a bare backbone or a classifier (whose head is not used), loaded strictly by
    the runtime's own DINOv3 loader."""
    raw = read_json(source / "config.json")
    if raw.get("model_type") != "dinov3_vit":
        raise ValueError(f"{source}/config.json: model_type {raw.get('model_type')!r}, expected 'dinov3_vit'")
    cfg = DINOv3Config.from_dict(raw, f"{source}/config.json")
    if cfg.block.gated_mlp:
        raise ValueError(f"{source}: a gated (SwiGLU) MLP has no Qwen3-VL vision counterpart")
    backbone = DINOv3ViT(cfg)
    backbone.load_weights(read_safetensors(source), torch.float32, source=str(source))
    return cfg, read_json(source / "preprocessor_config.json"), backbone.state_dict()


def architecture_overrides(cfg: DINOv3Config, preprocessor: dict) -> dict:
    """The train.vlm.Architecture fields that must follow the DINOv3 backbone."""
    if cfg.patch_size[0] != cfg.patch_size[1]:
        raise ValueError(f"patch_size {cfg.patch_size}: the Qwen3-VL tower needs square patches")
    return dict(patch_size=cfg.patch_size[0], vision_hidden=cfg.block.hidden_size, vision_depth=cfg.num_layers,
                vision_heads=cfg.block.num_heads, vision_intermediate=cfg.block.intermediate_size,
                vision_act=cfg.block.hidden_act, vision_rope_theta=cfg.rope_theta,
                image_mean=tuple(preprocessor["image_mean"]), image_std=tuple(preprocessor["image_std"]))


@torch.no_grad()
def copy_backbone(visual: nn.Module, cfg: DINOv3Config, backbone: dict[str, torch.Tensor]) -> None:
    """Write the DINOv3 weights into transformers' Qwen3-VL vision tower (`model.model.visual`), in place."""
    c = cfg.block.hidden_size
    proj = visual.patch_embed.proj
    assert proj.weight.shape[2] == 2 and proj.weight.shape[1:2] + proj.weight.shape[3:] == \
        backbone["embeddings.patch_embeddings.weight"].shape[1:], "patch embedding shapes differ"
    proj.weight.copy_(backbone["embeddings.patch_embeddings.weight"][:, :, None].expand_as(proj.weight) / 2)
    proj.bias.copy_(backbone["embeddings.patch_embeddings.bias"])
    visual.pos_embed.weight.zero_()
    for i, block in enumerate(visual.blocks):
        w = {k[len(f"layer.{i}."):]: v for k, v in backbone.items() if k.startswith(f"layer.{i}.")}
        zeros = torch.zeros(c)
        block.attn.qkv.weight.copy_(torch.cat([w[f"attention.{n}_proj.weight"] for n in "qkv"]))
        block.attn.qkv.bias.copy_(torch.cat([w.get(f"attention.{n}_proj.bias", zeros) for n in "qkv"]))
        scale1, scale2 = w["layer_scale1.lambda1"], w["layer_scale2.lambda1"]
        block.attn.proj.weight.copy_(w["attention.o_proj.weight"] * scale1[:, None])
        block.attn.proj.bias.copy_(w.get("attention.o_proj.bias", zeros) * scale1)
        block.mlp.linear_fc1.weight.copy_(w["mlp.up_proj.weight"])
        block.mlp.linear_fc1.bias.copy_(w.get("mlp.up_proj.bias", torch.zeros(cfg.block.intermediate_size)))
        block.mlp.linear_fc2.weight.copy_(w["mlp.down_proj.weight"] * scale2[:, None])
        block.mlp.linear_fc2.bias.copy_(w.get("mlp.down_proj.bias", zeros) * scale2)
        for norm in ("norm1", "norm2"):
            getattr(block, norm).weight.copy_(w[f"{norm}.weight"])
            getattr(block, norm).bias.copy_(w[f"{norm}.bias"])
    visual.merger.norm.weight.copy_(backbone["norm.weight"])
    visual.merger.norm.bias.copy_(backbone["norm.bias"])


def freeze_backbone(visual: nn.Module) -> int:
    """Stop gradients into the copied parts (patch embedding, position table, blocks); mergers keep training.
    Returns the number of frozen parameters."""
    frozen = [p for part in (visual.patch_embed, visual.pos_embed, visual.blocks) for p in part.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)
