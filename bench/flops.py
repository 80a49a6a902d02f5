"""Analytic FLOPs of the vision classifiers, from their config.json (one multiply-add = 2 FLOPs).

    python -m bench.flops [--preset dinov3-vits16] [--image-size 224]

Per image, with patch p, grid P = (H/p)(W/p) patches, T = P + prefix tokens (CLS, plus registers for DINOv3),
width C, MLP width I, L layers, head input C_h (C for ViT's CLS token, 2C for DINOv3's CLS + patch mean):

    patch embedding   2 * P * (3 p^2) * C
    projections       L * 4 * 2 T C^2          q, k, v, o
    MLP               L * 2 * 2 T C I          up, down (gated SwiGLU: 3 * 2 T C I)
    attention         L * 2 * 2 T^2 C          Q K^T and softmax(.) V, over all heads
    head              2 * C_h * num_labels

Norms, GELU, softmax, RoPE and residual adds are left out: they are not matrix products, and model FLOPs
utilization counts matrix FLOPs against a matrix-multiply peak. DINOv3 ViT-S/16 at 224: 9.40 GFLOP;
ViT-B/16: 35.1 GFLOP. tests/test_bench.py checks the formula against torch's FlopCounterMode."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from bench.common import PRESETS, preset_config, print_table


@dataclass(frozen=True)
class Flops:
    """FLOPs per image, by where they are spent."""

    patch_embed: int
    projections: int  # q, k, v, o linears
    mlp: int  # MLP linears
    attention: int  # QK^T and AV
    head: int

    @property
    def linear(self) -> int:
        """The encoder's nn.Linear layers: the part an int8 path runs on integer units."""
        return self.projections + self.mlp

    @property
    def total(self) -> int:
        return self.patch_embed + self.linear + self.attention + self.head


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def vision_flops(cfg: dict, image_size: int | tuple[int, int] | None = None) -> Flops:
    """FLOPs per image of a `vit` or `dinov3_vit` classifier described by a config.json dict.

    image_size overrides the config's input size (DINOv3's RoPE accepts any multiple of the patch)."""
    model_type = cfg.get("model_type")
    if model_type not in ("vit", "dinov3_vit"):
        raise ValueError(f"config model_type {model_type!r}: FLOPs are known for 'vit' and 'dinov3_vit' only")
    height, width = _pair(image_size if image_size is not None else cfg.get("image_size", 224))
    ph, pw = _pair(cfg.get("patch_size", 16))
    if height % ph or width % pw:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    c, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    channels = cfg.get("num_channels", 3)
    patches = (height // ph) * (width // pw)
    dinov3 = model_type == "dinov3_vit"
    tokens = patches + 1 + (cfg.get("num_register_tokens", 0) if dinov3 else 0)
    mlp_mats = 3 if dinov3 and cfg.get("use_gated_mlp", False) else 2
    num_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    head_in = 2 * c if dinov3 else c
    return Flops(
        patch_embed=2 * patches * channels * ph * pw * c,
        projections=layers * 4 * 2 * tokens * c * c,
        mlp=layers * mlp_mats * 2 * tokens * c * inter,
        attention=layers * 2 * 2 * tokens * tokens * c,
        head=2 * head_in * num_labels,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="repeatable; default: every real-size preset")
    ap.add_argument("--image-size", type=int, help="input side in pixels (default: the preset's)")
    args = ap.parse_args(argv)
    rows = []
    for preset in args.preset or [p for p in PRESETS if not p.startswith("tiny")]:
        f = vision_flops(preset_config(preset), args.image_size)
        rows.append({"preset": preset, **{k: v / 1e9 for k, v in asdict(f).items()}, "total_gflop": f.total / 1e9})
    print("GFLOP per image")
    print_table(rows, ["preset", "patch_embed", "projections", "mlp", "attention", "head", "total_gflop"])
    return rows


if __name__ == "__main__":
    main()
