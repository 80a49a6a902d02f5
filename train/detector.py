"""Train a small detector for the cascade's detectors stage; save a transformers checkpoint.

    python -m train.detector --data data/train --classifier out/classifier --val data/val --out out/detector
    python -m train.detector --family dfine ...    a D-FINE with its own HGNetV2 backbone, from scratch

--family deimv2 (default): transformers' Deimv2ForObjectDetection (its DEIM losses train it) with the classifier's
backbone copied in and frozen: the cascade then runs that backbone once per image for both stages (docs/bundle.md,
"Backbone sharing"). --family dfine: DFineForObjectDetection, every part trained (its backbone's BatchNorms too), a
second architecture whose errors need not be DEIMv2's. Both use the classifier's preprocessing. Targets are the COCO
boxes of annotations.json, all nine scene classes (roadwork and the look-alikes: car, person, ordinary sign).
Output: config.json + model.safetensors as save_pretrained writes them, and the classifier's
preprocessor_config.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from runtime.config import read_json
from runtime.models.preprocessor import read_preprocess
from imagesets.confusion import Confusion
from runtime.models.weights import read_safetensors
from train.data import LabeledFolder, list_folder, load_pixels
from train.loop import Loop, run
from train.optim import adamw, warmup_cosine
from train.scenes import CLASSES, ROADWORK_CLASSES

log = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Backbone fields copied from the classifier's config.json: equal configs are a condition for sharing.
BACKBONE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                   "image_size", "num_channels", "num_register_tokens", "hidden_act", "layer_norm_eps", "rope_theta",
                   "query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp",
                   "layerscale_value")


@dataclass(frozen=True)
class HeadArchitecture:
    """Everything after the ViT. Small: the CPU trains it in minutes and the cascade runs it on few images."""
    hidden: int = 96              # encoder_hidden_dim = d_model
    ffn: int = 256
    heads: int = 4
    decoder_layers: int = 3
    num_queries: int = 50
    adapter_planes: int = 16      # spatial tuning adapter width
    num_denoising: int = 50


def out_indices(num_layers: int) -> list[int]:
    """Three ViT layers feeding the stride 8/16/32 maps: a third, two thirds, and the last."""
    picks = sorted({max(1, round(num_layers / 3)), max(2, round(2 * num_layers / 3)), num_layers})
    assert len(picks) == 3, f"a DEIMv2 head needs a backbone of at least 3 layers, got {num_layers}"
    return picks


def deimv2_config(classifier_cfg: dict, head: HeadArchitecture):
    from transformers import Deimv2Config, DINOv3ViTConfig

    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in classifier_cfg]
    if classifier_cfg.get("model_type") != "dinov3_vit" or missing:
        raise ValueError(f"the classifier must be a dinov3_vit model with {missing or 'a full config'}")
    fields = {k: classifier_cfg[k] for k in BACKBONE_FIELDS if k in classifier_cfg}
    backbone = DINOv3ViTConfig(**fields, out_indices=out_indices(fields["num_hidden_layers"]),
                               apply_layernorm=False, pos_embed_rescale=None)
    h = head.hidden
    return Deimv2Config(
        backbone_config=backbone, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
        encoder_hidden_dim=h, encoder_in_channels=[h] * 3, encoder_ffn_dim=head.ffn, encoder_attention_heads=head.heads,
        d_model=h, decoder_in_channels=[h] * 3, decoder_ffn_dim=head.ffn, decoder_layers=head.decoder_layers,
        decoder_attention_heads=head.heads, decoder_n_points=[3, 6, 3], num_queries=head.num_queries,
        num_denoising=head.num_denoising, depth_mult=0.34, hidden_expansion=0.5, encoder_has_trailing_conv=False,
        spatial_tuning_adapter_inplanes=head.adapter_planes, activation_function="silu",
        decoder_activation_function="silu", lqe_hidden_dim=32)


# HGNetV2 at about half of B0's widths (its block layout): small enough to train from scratch on a CPU.
HGNETV2_SMALL = dict(stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128], stage_mid_channels=[16, 32, 32, 64],
                     stage_out_channels=[32, 64, 128, 256], hidden_sizes=[32, 64, 128, 256],
                     stage_num_blocks=[1, 1, 2, 1], stage_numb_of_layers=[3, 3, 3, 3], use_learnable_affine_block=True,
                     out_indices=[2, 3, 4])


def dfine_config(head: HeadArchitecture):
    from transformers import DFineConfig, HGNetV2Config

    h = head.hidden
    return DFineConfig(
        backbone_config=HGNetV2Config(**HGNETV2_SMALL), freeze_backbone_batch_norms=False,
        id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
        encoder_hidden_dim=h, encoder_in_channels=HGNETV2_SMALL["stage_out_channels"][1:], encoder_ffn_dim=head.ffn,
        encoder_attention_heads=head.heads, d_model=h, decoder_in_channels=[h] * 3, decoder_ffn_dim=head.ffn,
        decoder_layers=head.decoder_layers, decoder_attention_heads=head.heads, decoder_n_points=[3, 6, 3],
        num_queries=head.num_queries, num_denoising=head.num_denoising, depth_mult=0.34, hidden_expansion=0.5,
        lqe_hidden_dim=32)


def build_dfine(head: HeadArchitecture, seed: int):
    """A fresh DFineForObjectDetection, every tensor trainable."""
    from transformers import DFineForObjectDetection

    torch.manual_seed(seed)
    return DFineForObjectDetection(dfine_config(head))


def build_detector(classifier_dir: Path, head: HeadArchitecture, seed: int):
    """A fresh Deimv2ForObjectDetection whose backbone is the classifier's, frozen."""
    from transformers import Deimv2ForObjectDetection

    torch.manual_seed(seed)
    model = Deimv2ForObjectDetection(deimv2_config(read_json(classifier_dir / "config.json"), head))
    backbone = model.model.conv_encoder.backbone
    tensors = {k: v for k, v in read_safetensors(classifier_dir).items() if not k.startswith("classifier.")}
    # transformers nests the ViT layers under `model.` in its backbone class; on disk they are `layer.N.`.
    state = {("model." + k if k.startswith("layer.") else k): v.float() for k, v in tensors.items()}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rope_embeddings.")]
    if missing or unexpected:
        raise ValueError(f"{classifier_dir}: backbone tensors do not fit the detector's backbone "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    backbone.requires_grad_(False)
    return model


def targets(folder: LabeledFolder) -> list[dict[str, torch.Tensor]]:
    """transformers' detection labels: class ids and normalized (cx, cy, w, h) boxes per image."""
    assert folder.boxes is not None and folder.box_classes is not None, f"{folder.root} has no annotations.json"
    out = []
    for boxes, classes in zip(folder.boxes, folder.box_classes):
        b = torch.from_numpy(boxes).clamp(0, 1)
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        out.append({"class_labels": torch.tensor([CLASSES.index(c) for c in classes], dtype=torch.int64),
                    "boxes": cxcywh.float()})
    return out


def flip_target(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    boxes = t["boxes"].clone()
    boxes[:, 0] = 1 - boxes[:, 0]
    return {"class_labels": t["class_labels"], "boxes": boxes}


@dataclass
class TrainConfig:
    epochs: float = 4.0
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: float = 0.05
    clip: float = 0.1
    hflip: bool = True
    bf16: bool = False
    seed: int = 0


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, total, cfg.lr, max(int(total * cfg.warmup), 1))


ROADWORK_IDS = [CLASSES.index(c) for c in ROADWORK_CLASSES]


@torch.no_grad()
def roadwork_confidence(model, pixels: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, list]:
    """(c per image = max sigmoid over queries and roadwork classes, as the cascade's vote reads it;
    per image (scores [Q, R], cxcywh boxes [Q, 4]) for box metrics)."""
    model.eval()
    conf, raw = [], []
    for start in range(0, len(pixels), batch_size):
        out = model(pixel_values=pixels[start:start + batch_size].float())
        scores = torch.sigmoid(out.logits[:, :, ROADWORK_IDS].float())
        conf.append(scores.flatten(1).max(1).values)
        raw += list(zip(scores, out.pred_boxes.float()))
    return torch.cat(conf).numpy(), raw


def box_recall(raw: list, folder: LabeledFolder, score: float = 0.3, iou: float = 0.5) -> float:
    """Share of ground-truth roadwork boxes matched (IoU >= iou) by a roadwork prediction scoring > score."""
    hits = total = 0
    for (scores, boxes), gt, classes in zip(raw, folder.boxes, folder.box_classes):
        gt = gt[[c in ROADWORK_CLASSES for c in classes]]
        total += len(gt)
        keep = scores.max(1).values > score
        if not len(gt) or not keep.any():
            continue
        b = boxes[keep]
        pred = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
        g = torch.from_numpy(gt)
        lt = torch.maximum(pred[:, None, :2], g[None, :, :2])
        rb = torch.minimum(pred[:, None, 2:], g[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = (pred[:, 2:] - pred[:, :2]).prod(-1)[:, None] + (g[:, 2:] - g[:, :2]).prod(-1)[None] - inter
        hits += int(((inter / union.clamp(min=1e-9)) >= iou).any(0).sum())
    return hits / total if total else 0.0


def evaluate(model, pixels: torch.Tensor, folder: LabeledFolder) -> dict:
    conf, raw = roadwork_confidence(model, pixels)
    best = max((Confusion.of(folder.labels, conf > t).mcc, t) for t in np.arange(0.05, 0.96, 0.05))
    return {"val_mcc_at_0.5": round(Confusion.of(folder.labels, conf).mcc, 4), "val_best_mcc": round(best[0], 4),
            "val_best_threshold": round(float(best[1]), 2), "val_box_recall": round(box_recall(raw, folder), 4)}


def frozen_backbone(model) -> torch.nn.Module | None:
    """DEIMv2's shared backbone (kept in eval mode while training); None where every part trains."""
    encoder = getattr(model.model, "conv_encoder", None)
    return None if encoder is None else encoder.backbone


def train(model, pixels: torch.Tensor, labels: list[dict], cfg: TrainConfig,
          val: tuple[torch.Tensor, LabeledFolder] | None = None) -> list[dict]:
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    backbone = frozen_backbone(model)

    def losses(idx: torch.Tensor, order: torch.Generator) -> dict[str, torch.Tensor]:
        x = pixels[idx].float()
        y = [labels[i] for i in idx.tolist()]
        if cfg.hflip:
            flip = (torch.rand(len(idx), generator=order) < 0.5).tolist()
            for k, f in enumerate(flip):
                if f:
                    x[k] = x[k].flip(2)
                    y[k] = flip_target(y[k])
        if backbone is not None:
            backbone.eval()  # frozen: no RoPE jitter, features exactly as at inference
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            return {"loss": model(pixel_values=x, labels=y).loss}

    loop = Loop("train detector", cfg.seed, cfg.batch_size, cfg.epochs, clip=cfg.clip)
    history, _ = run(model, opt, len(pixels), loop, lambda step, total: lr_at(step, total, cfg), losses,
                     (lambda: evaluate(model, *val)) if val is not None else None)
    return history


def save_detector(model, classifier_dir: Path, out: Path, dtype: torch.dtype, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    model.float()
    shutil.copyfile(classifier_dir / "preprocessor_config.json", out / "preprocessor_config.json")
    if extra:
        (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.detector", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="labeled folder with annotations.json")
    ap.add_argument("--family", choices=("deimv2", "dfine"), default="deimv2",
                    help="deimv2: on the classifier's frozen backbone; dfine: its own HGNetV2, trained from scratch")
    ap.add_argument("--classifier", type=Path, required=True,
                    help="DINOv3 classifier dir: its preprocessing, and for deimv2 its backbone")
    ap.add_argument("--val", type=Path, help="labeled folder with annotations.json, scored after every epoch")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--hidden", type=int, default=HeadArchitecture.hidden)
    ap.add_argument("--decoder-layers", type=int, default=HeadArchitecture.decoder_layers)
    ap.add_argument("--queries", type=int, default=HeadArchitecture.num_queries)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with AVX-512 BF16)")
    ap.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float32",
                    help="must match the classifier's stored dtype for the cascade to share the backbone")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine extra threads spin and slow everything)")
    ap.add_argument("--no-cache", action="store_true", help="do not keep preprocessed pixels next to the data")
    ap.add_argument("--limit", type=int, help="use N images of --data drawn at random with --seed (quick runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.time()
    head = HeadArchitecture(hidden=args.hidden, decoder_layers=args.decoder_layers, num_queries=args.queries)
    model = (build_detector(args.classifier, head, args.seed) if args.family == "deimv2"
             else build_dfine(head, args.seed))
    spec = read_preprocess(args.classifier)
    if spec.height % 32 or spec.width % 32:
        ap.error(f"the classifier's input {spec.height}x{spec.width} must be a multiple of 32 for {args.family}")
    data = list_folder(args.data)
    if args.limit:
        data = data.subset(np.sort(np.random.default_rng(args.seed).permutation(len(data))[:args.limit]))
    pixels = load_pixels(data, spec, cache=not args.no_cache)
    val = None
    if args.val:
        val_folder = list_folder(args.val)
        val = (load_pixels(val_folder, spec, cache=not args.no_cache), val_folder)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, bf16=args.bf16, seed=args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s on %d images at %dx%d: %.2fM trainable parameters%s", args.family, len(data),
             spec.height, spec.width, trainable / 1e6, " (backbone frozen)" if frozen_backbone(model) else "")
    history = train(model, pixels, targets(data), cfg, val)
    minutes = (time.time() - started) / 60
    extra = {"family": args.family, "data": str(args.data), "classifier": str(args.classifier), "images": len(data), "seed": args.seed,
             "minutes": round(minutes, 1), "head": asdict(head), "train": asdict(cfg), "history": history}
    save_detector(model, args.classifier, args.out, SAVE_DTYPES[args.save_dtype], extra)
    log.info("saved %s in %.1f min", args.out, minutes)


if __name__ == "__main__":
    main()
