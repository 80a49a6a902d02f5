"""Train a DINOv3-architecture roadwork classifier; save it in the Hugging Face layout the server loads.

    python -m train.classifier --data data/train --val data/val --out out/classifier --seed 0

From scratch (default) it builds a small DINOv3 ViT (--hidden/--layers/--heads/--registers/--patch at --size);
with --backbone DIR it starts from a DINOv3ViTModel checkpoint (e.g. a real pretrained one) and --freeze-backbone
trains the head only (a linear probe). Output: config.json (model_type dinov3_vit, id2label {0: none,
1: roadwork}), model.safetensors (DINOv3 on-disk names + classifier.weight [2, 2*hidden] / classifier.bias),
preprocessor_config.json (DINOv3 image processor at --size).

When the data has COCO boxes (annotations.json), an auxiliary linear head on the patch tokens regresses which
patches hold roadwork (1) and which do not (0): dense supervision that teaches a small from-scratch ViT where to
look, and, because the regression pins background patches near 0, makes the mean of that patch value, a linear
function of the mean patch token the saved head reads, count roadwork patches. The auxiliary head is dropped on
save. Finally the classifier head is refit on frozen features by logistic regression (--refit-head), so it
uses whatever the backbone learned; the saved model is backbone + classifier only.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.torch as st
import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.classifier import Classifier, Labels
from runtime.config import read_json
from runtime.models.dinov3 import DINOv3Config, DINOv3ViT
from runtime.models.preprocessor import preprocess_spec
from imagesets.confusion import Confusion
from runtime.models.weights import read_safetensors
from train.data import LabeledFolder, list_folder, load_pixels
from train.loop import Loop, run
from train.optim import adamw, warmup_cosine
from train.scenes import ROADWORK_CLASSES

log = logging.getLogger(__name__)

ID2LABEL = {0: "none", 1: "roadwork"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PATCH_MIN_OVERLAP = 0.25   # a patch is "roadwork" when a box covers this share of the smaller of patch and box


@dataclass(frozen=True)
class Architecture:
    """A small DINOv3 ViT; the defaults fit CPU training in minutes."""
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 3
    intermediate_size: int = 768
    num_register_tokens: int = 4
    patch_size: int = 16
    image_size: int = 128
    layerscale_value: float = 1.0

    def config(self) -> dict:
        """config.json as transformers' DINOv3ViTConfig reads it (unlisted fields take its defaults)."""
        return {
            "architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
            "num_register_tokens": self.num_register_tokens, "patch_size": self.patch_size,
            "image_size": self.image_size, "layerscale_value": self.layerscale_value, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "rope_theta": 100.0, "query_bias": True, "key_bias": False,
            "value_bias": True, "proj_bias": True, "mlp_bias": True, "use_gated_mlp": False,
            "num_channels": 3, "initializer_range": 0.02,
        }


def preprocessor_config(height: int, width: int) -> dict:
    """The DINOv3 image processor: rescale 1/255, antialiased bilinear resize in float, ImageNet mean/std."""
    return {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "resample": 2,
            "size": {"height": height, "width": width}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}


def init_weights_(backbone: DINOv3ViT, head: nn.Module, layerscale: float) -> None:
    """transformers' DINOv3 init: truncated normal 0.02 for projections and tokens, zero biases, unit norms.
    Register tokens must differ: identical ones would get identical gradients forever."""
    for module in list(backbone.modules()) + list(head.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    emb = backbone.embeddings
    nn.init.trunc_normal_(emb.cls_token, std=0.02)
    nn.init.trunc_normal_(emb.register_tokens, std=0.02)
    nn.init.zeros_(emb.mask_token)
    for block in backbone.layer:
        nn.init.constant_(block.layer_scale1.lambda1, layerscale)
        nn.init.constant_(block.layer_scale2.lambda1, layerscale)


class TrainingModel(nn.Module):
    """The runtime classifier plus the auxiliary per-patch roadwork head."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        self.patch_head = nn.Linear(classifier.backbone.cfg.block.hidden_size, 1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, 2], patch roadwork values [B, patches])."""
        seq, _ = self.classifier.backbone(pixels)
        logits = self.classifier.classifier(self.classifier.head_features(seq))
        patches = seq[:, self.classifier.backbone.num_prefix_tokens:]
        return logits, self.patch_head(patches).squeeze(-1)


def patch_targets(folder: LabeledFolder, grid_h: int, grid_w: int) -> torch.Tensor:
    """[N, grid_h * grid_w] float: 1 where a roadwork box covers enough of the patch (or the box lies in it)."""
    assert folder.boxes is not None and folder.box_classes is not None
    out = np.zeros((len(folder), grid_h, grid_w), np.float32)
    cell = np.array([grid_w, grid_h, grid_w, grid_h], np.float32)
    ys, xs = np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32)
    for i, (boxes, classes) in enumerate(zip(folder.boxes, folder.box_classes)):
        for box, cls in zip(boxes * cell, classes):
            if cls not in ROADWORK_CLASSES:
                continue
            w = np.clip(np.minimum(xs + 1, box[2]) - np.maximum(xs, box[0]), 0, None)
            h = np.clip(np.minimum(ys + 1, box[3]) - np.maximum(ys, box[1]), 0, None)
            area = min((box[2] - box[0]) * (box[3] - box[1]), 1.0)
            hit = np.outer(h, w) >= PATCH_MIN_OVERLAP * max(area, 1e-6)
            out[i] = np.maximum(out[i], hit)
    return torch.from_numpy(out.reshape(len(folder), -1))


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.05        # share of steps
    aux_weight: float = 4.0     # weight of the per-patch squared error (0 disables it)
    label_smoothing: float = 0.1
    hflip: bool = True
    bf16: bool = True
    compile: bool = False
    freeze_backbone: bool = False
    seed: int = 0


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to zero."""
    return warmup_cosine(step, total, cfg.lr, max(int(total * cfg.warmup), 1))


@torch.no_grad()
def predict(model: TrainingModel, pixels: torch.Tensor, bf16: bool, batch_size: int = 128) -> np.ndarray:
    """P(roadwork) per row of pixels."""
    model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(pixels[start:start + batch_size].float())
        out.append(model.classifier.probability(logits.float()))
    return torch.cat(out).numpy()


def train(model: TrainingModel, pixels: torch.Tensor, labels: torch.Tensor, patches: torch.Tensor | None,
          cfg: TrainConfig, val: tuple[torch.Tensor, np.ndarray] | None = None) -> list[dict]:
    """Train in place; returns one record per epoch (loss, and val accuracy/MCC when val is given)."""
    if cfg.freeze_backbone:
        model.classifier.backbone.requires_grad_(False)
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
    aux = patches is not None and cfg.aux_weight > 0
    patch_size = model.classifier.backbone.cfg.patch_size
    grid = (pixels.shape[2] // patch_size[0], pixels.shape[3] // patch_size[1])
    forward = torch.compile(model) if cfg.compile else model
    model.classifier.backbone.rope(*grid, torch.float32, pixels.device)

    def losses(idx: torch.Tensor, order: torch.Generator) -> dict[str, torch.Tensor]:
        x = pixels[idx].float()
        t = patches[idx] if aux else None
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=order) < 0.5
            x[flip] = x[flip].flip(3)
            if aux:
                t = t.clone()
                t[flip] = t[flip].view(-1, *grid).flip(2).reshape(int(flip.sum()), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, patch_logits = forward(x)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=cfg.label_smoothing)
        if aux:
            loss = loss + cfg.aux_weight * F.mse_loss(patch_logits.float(), t)
        return {"loss": loss}

    def evaluate() -> dict:
        conf = Confusion.of(val[1], predict(model, val[0], cfg.bf16))
        return {"val_accuracy": round(conf.accuracy, 4), "val_mcc": round(conf.mcc, 4)}

    loop = Loop("train classifier", cfg.seed, cfg.batch_size, cfg.epochs)
    history, _ = run(model, opt, len(pixels), loop, lambda step, total: lr_at(step, total, cfg), losses,
                     evaluate if val is not None else None)
    return history


@torch.no_grad()
def head_features(model: TrainingModel, pixels: torch.Tensor, bf16: bool, batch_size: int = 128) -> torch.Tensor:
    """[N, 2*hidden] float64: what the classifier head reads (final-norm CLS, mean final-norm patch token)."""
    model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            seq, _ = model.classifier.backbone(pixels[start:start + batch_size].float())
        out.append(model.classifier.head_features(seq.float()).double())
    return torch.cat(out)


def refit_head(model: TrainingModel, pixels: torch.Tensor, labels: torch.Tensor, bf16: bool,
               l2: float = 1e-3) -> None:
    """Replace the classifier head by the L2-regularized logistic regression on frozen head features
    (standardized for conditioning, folded back into one linear layer; logits +-z/2 give softmax = sigmoid(z))."""
    x = head_features(model, pixels, bf16)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    y = labels.double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / std
        bias = b - (weight * mean).sum()
        head = model.classifier.classifier
        head.weight.copy_(torch.stack([-weight, weight]).to(head.weight.dtype) / 2)
        head.bias.copy_(torch.stack([-bias, bias]).to(head.bias.dtype) / 2)


def new_model(arch: Architecture, seed: int) -> TrainingModel:
    torch.manual_seed(seed)
    backbone = DINOv3ViT(DINOv3Config.from_dict(arch.config()))
    classifier = Classifier("dinov3_vit", backbone, 2, Labels(("none", "roadwork"), 1))
    model = TrainingModel(classifier)
    init_weights_(backbone, nn.ModuleList([classifier.classifier, model.patch_head]), arch.layerscale_value)
    return model


def model_from_backbone(backbone_dir: Path, seed: int) -> tuple[TrainingModel, dict]:
    """Start from a DINOv3ViTModel checkpoint (config.json + safetensors); a fresh head. Returns (model, config)."""
    cfg = read_json(backbone_dir / "config.json")
    if cfg.get("model_type") != "dinov3_vit":
        raise ValueError(f"{backbone_dir}/config.json: model_type must be 'dinov3_vit', got {cfg.get('model_type')!r}")
    torch.manual_seed(seed)
    backbone = DINOv3ViT(DINOv3Config.from_dict(cfg, str(backbone_dir / "config.json")))
    tensors = {k: v for k, v in read_safetensors(backbone_dir).items() if not k.startswith("classifier.")}
    backbone.load_weights(tensors, torch.float32, source=str(backbone_dir))
    classifier = Classifier("dinov3_vit", backbone, 2, Labels(("none", "roadwork"), 1))
    model = TrainingModel(classifier)
    for head in (classifier.classifier, model.patch_head):
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    keep = {k: v for k, v in cfg.items() if k not in ("id2label", "label2id", "num_labels")}
    return model, keep


def save_classifier(model: TrainingModel, config: dict, out: Path, height: int, width: int,
                    dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """config.json + model.safetensors (backbone names as on disk, then classifier.*) + preprocessor_config.json,
    and training.json (how it was made) when `extra` is given."""
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.classifier.state_dict().items():
        key = name.removeprefix("backbone.")
        state[key] = tensor.detach().to(dtype).contiguous()
    st.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = {**config, "id2label": {str(k): v for k, v in ID2LABEL.items()},
              "label2id": {v: k for k, v in ID2LABEL.items()}, "torch_dtype": str(dtype).removeprefix("torch.")}
    if extra:
        (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(height, width), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.classifier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="labeled folder: DIR/roadwork/*, DIR/none/*")
    ap.add_argument("--val", type=Path, help="labeled folder scored after every epoch")
    ap.add_argument("--out", type=Path, required=True, help="output model directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    ap.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight,
                    help="weight of the per-patch roadwork loss (needs annotations.json; 0 disables)")
    ap.add_argument("--refit-head", action=argparse.BooleanOptionalAction, default=True,
                    help="refit the head by logistic regression on frozen features after training (default on)")
    ap.add_argument("--size", type=int, help="input side (default 128 from scratch, 224 with --backbone)")
    ap.add_argument("--hidden", type=int, default=Architecture.hidden_size)
    ap.add_argument("--layers", type=int, default=Architecture.num_hidden_layers)
    ap.add_argument("--heads", type=int, default=Architecture.num_attention_heads)
    ap.add_argument("--registers", type=int, default=Architecture.num_register_tokens)
    ap.add_argument("--patch", type=int, default=Architecture.patch_size)
    ap.add_argument("--backbone", type=Path, help="start from this DINOv3ViTModel directory instead of scratch")
    ap.add_argument("--freeze-backbone", action="store_true", help="train the head only (linear probe)")
    ap.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (~2x on CPU, minutes "
                                                           "to compile)")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine extra threads spin and slow everything)")
    ap.add_argument("--no-cache", action="store_true", help="do not keep preprocessed pixels next to the data")
    ap.add_argument("--limit", type=int, help="use N images of --data drawn at random with --seed (quick runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.freeze_backbone and not args.backbone:
        ap.error("--freeze-backbone needs --backbone (a random backbone would stay random)")
    started = time.time()
    torch.manual_seed(args.seed)
    if args.backbone:
        model, config = model_from_backbone(args.backbone, args.seed)
        size = args.size or 224
    else:
        size = args.size or Architecture.image_size
        arch = Architecture(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            intermediate_size=4 * args.hidden, num_register_tokens=args.registers,
                            patch_size=args.patch, image_size=size)
        model, config = new_model(arch, args.seed), arch.config()
    patch = model.classifier.backbone.cfg.patch_size
    if size % patch[0] or size % patch[1]:
        ap.error(f"--size {size} must be a multiple of the patch size {patch}")
    spec = preprocess_spec(preprocessor_config(size, size))
    data = list_folder(args.data)
    if args.limit:
        data = data.subset(np.sort(np.random.default_rng(args.seed).permutation(len(data))[:args.limit]))
    pixels = load_pixels(data, spec, cache=not args.no_cache)
    patches = None
    if data.boxes is not None and args.aux_weight > 0:
        patches = patch_targets(data, size // patch[0], size // patch[1])
    val = None
    if args.val:
        val_folder = list_folder(args.val)
        val = (load_pixels(val_folder, spec, cache=not args.no_cache), val_folder.labels)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      aux_weight=args.aux_weight, bf16=not args.no_bf16, compile=args.compile,
                      freeze_backbone=args.freeze_backbone, seed=args.seed)
    log.info("training on %d images (%d roadwork) at %dx%d, %.2fM parameters, aux patch loss %s", len(data),
             int(data.labels.sum()), size, size, sum(p.numel() for p in model.classifier.parameters()) / 1e6,
             "on" if patches is not None else "off")
    history = train(model, pixels, torch.from_numpy(data.labels), patches, cfg, val)
    if args.refit_head:
        refit_head(model, pixels, torch.from_numpy(data.labels), cfg.bf16)
        record = {"refit_head": True,
                  "train_mcc": round(Confusion.of(data.labels, predict(model, pixels, cfg.bf16)).mcc, 4)}
        if val is not None:
            conf = Confusion.of(val[1], predict(model, val[0], cfg.bf16))
            record.update(val_accuracy=round(conf.accuracy, 4), val_mcc=round(conf.mcc, 4))
        history.append(record)
        log.info("%s", json.dumps(record))
    minutes = (time.time() - started) / 60
    extra = {"data": str(args.data), "images": len(data), "seed": args.seed, "minutes": round(minutes, 1),
             "train": {k: v for k, v in asdict(cfg).items() if k != "compile"}, "history": history}
    save_classifier(model, config, args.out, size, size, SAVE_DTYPES[args.save_dtype], extra)
    log.info("saved %s in %.1f min", args.out, minutes)


if __name__ == "__main__":
    main()
