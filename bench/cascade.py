"""Cascade throughput at several early-exit rates vs running every stage on every image, in one run.

  python -m bench.cascade --dtype bf16 --images 64 --batch 16
  python -m bench.cascade --tiny            # seconds; what the test runs

Random-weight models (no downloads): a DINOv3 classifier and a DEIMv2 detector that share its backbone (the
"small" preset: ViT-S/16 at 224 with a DEIMv2-S-sized head; --no-share gives the detector its own backbone).
Exit thresholds are placed between the classifier's sorted probabilities on the benchmark images so that the
requested fraction exits. The baseline runs the same models, classifier + detector + vote, on every image with
no routing, through the same graph runner (CUDA graphs on GPU). classifier_only is the upper bound: what the
cascade approaches as the exit rate goes to 1."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import DTYPES, jpeg_images, print_table, time_call, write_json
from graphs.runner import GraphRunner, default_buckets
from kernels.preprocess import preprocess_into
from kernels.vote import vote
from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine, image_tensor

EXIT_RATES = (0.0, 0.5, 0.9)

# (backbone, detector head, input size): DINOv3 ViT configs as transformers' DINOv3ViTConfig kwargs.
PRESETS = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, patch_size=16,
                  num_register_tokens=2, out_indices=[2, 3, 4], apply_layernorm=False, image_size=64),
             dict(encoder_hidden_dim=32, encoder_in_channels=[32, 32, 32], encoder_ffn_dim=64,
                  encoder_attention_heads=2, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                  decoder_layers=3, decoder_attention_heads=4, num_queries=30, decoder_n_points=[3, 6, 3],
                  num_labels=5, encoder_has_trailing_conv=False, spatial_tuning_adapter_inplanes=8,
                  depth_mult=0.34, hidden_expansion=0.5, lqe_hidden_dim=16),
             64),
    # DINOv3 ViT-S/16 (4 registers) with DEIMv2-S's head sizes, reading layers 6/9/12 at 224x224.
    "small": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                   patch_size=16, num_register_tokens=4, out_indices=[6, 9, 12], apply_layernorm=False,
                   image_size=224),
              dict(encoder_hidden_dim=192, encoder_in_channels=[192, 192, 192], encoder_ffn_dim=512,
                   encoder_attention_heads=8, depth_mult=0.67, hidden_expansion=0.34, d_model=192,
                   decoder_in_channels=[192, 192, 192], decoder_ffn_dim=512, decoder_layers=4,
                   decoder_attention_heads=8, decoder_n_points=[3, 6, 3], num_queries=300, num_labels=80,
                   encoder_has_trailing_conv=False, spatial_tuning_adapter_inplanes=16),
              224),
}
ROADWORK_CLASSES = [1, 3]


def make_models(root: Path, preset: str, share: bool) -> None:
    """root/cls (classifier) and root/det (DEIMv2; shares the classifier's backbone when `share`)."""
    from fixtures.checkpoints import write_preprocessor  # transformers: a benchmark/test dependency only
    from fixtures.deimv2_checkpoints import classifier_sharing_backbone, make_deimv2

    backbone, head, size = PRESETS[preset]
    make_deimv2(root / "det", seed=0, backbone=backbone, **head)
    write_preprocessor(root / "det", "dinov3", (size, size))
    if share:
        classifier_sharing_backbone(root / "det", root / "cls", seed=1, input_size=size)
    else:  # the same architecture with other weights: the detector keeps its own backbone
        make_deimv2(root / "other", seed=2, backbone=backbone, **head)
        classifier_sharing_backbone(root / "other", root / "cls", seed=1, input_size=size)


def exit_thresholds(probs: list[float], rate: float) -> tuple[float, float]:
    """(exit_below, exit_above) letting round(rate * n) of `probs` exit, half at each end."""
    s = sorted(probs)
    n, k = len(s), round(rate * len(s))
    low_n, high_n = k // 2, k - k // 2
    low = (s[low_n - 1] + s[low_n]) / 2 if low_n else 0.0
    high = (s[n - high_n - 1] + s[n - high_n]) / 2 if high_n else 1.0
    return low, high


def write_bundle(path: Path, models: Path, low: float, high: float) -> Path:
    path.mkdir(parents=True)
    (path / "cascade.toml").write_text(f"""
[[stage]]
kind = "classifier"
model = "{models / 'cls'}"
exit_below = {low!r}
exit_above = {high!r}

[[stage]]
kind = "detectors"

[[stage.detector]]
name = "deimv2"
model = "{models / 'det'}"
roadwork_classes = {ROADWORK_CLASSES}
box_threshold = 0.5
""")
    return path


def all_stages(engine: Engine):
    """Every stage on every image, no routing: one graph-runner segment over the cascade's own models."""
    first, stage = engine.cascade.first, engine.cascade.later[0]
    (det,) = stage.detectors
    own = None if det.shared else torch.zeros_like(stage.own_pixels[stage.pixel_keys[det.spec.name]])
    class_index = stage.class_index[det.spec.name]
    conf = torch.zeros_like(stage.conf)
    fraction, prob = torch.zeros_like(stage.prob), torch.zeros_like(stage.prob)
    cls_prob = torch.zeros_like(first.prob)

    def segment(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        model = first.model
        seq, hidden = model.backbone(x, hidden_layers=det.model.hidden_layers if det.shared else ())
        cls_prob[:b].copy_(model.probability(model.classifier(model.head_features(seq))))
        out = det.model.forward_from_backbone(x, hidden) if det.shared else det.model(own[:b])
        scores = out.logits.index_select(2, class_index).float().flatten(1)
        vote(scores, stage.offsets, stage.thresholds, stage.live_weights, cls_prob[:b], stage.spec.classifier_weight,
             stage.spec.majority, conf[:b], fraction[:b], prob[:b])
        return (prob[:b],)

    runner = GraphRunner(segment, tuple(first.runner.input.shape[1:]), first.runner.input.dtype, first.device,
                         default_buckets(engine.max_batch))
    runner.warmup()

    def predict(images: list[np.ndarray]) -> list[float]:
        out = []
        for start, count in runner.chunks(len(images)):
            chunk = [image_tensor(im).to(first.device) for im in images[start:start + count]]
            for slot, image in enumerate(chunk):
                preprocess_into(runner.input, slot, image, first.preprocess)
                if own is not None:
                    preprocess_into(own, slot, image, det.preprocess)
            out.extend(runner.run(count)[0].tolist())
        return out

    return predict


def run(preset: str, dtype_name: str, device: str, n_images: int, batch: int, min_time: float,
        share: bool, iters: int = 3) -> list[dict]:
    dtype = DTYPES[dtype_name]
    size = PRESETS[preset][2]
    images = [decode_image(j) for j in jpeg_images(n_images, size=size)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_models(root / "models", preset, share)
        classifier = Engine.load(root / "models" / "cls", device, dtype, max_batch=batch)
        classifier.warmup()
        probs = [r.prediction for r in classifier.predict(images)]
        classifier_s = time_call(lambda: classifier.predict(images), min_time, iters)
        baseline_engine = Engine.load(write_bundle(root / "base", root / "models", 0.0, 1.0), device, dtype, batch)
        baseline = all_stages(baseline_engine)
        for rate in EXIT_RATES:
            engine = Engine.load(write_bundle(root / f"rate{rate}", root / "models", *exit_thresholds(probs, rate)),
                                 device, dtype, max_batch=batch)
            engine.warmup()
            results = engine.predict(images)
            cascade_s = time_call(lambda: engine.predict(images), min_time, iters)
            baseline_s = time_call(lambda: baseline(images), min_time, iters)  # right after: same machine conditions
            shared = engine.describe()["stages"][1]["detectors"][0]["shared_backbone"]
            rows.append({"preset": preset, "dtype": dtype_name, "device": device, "shared_backbone": shared,
                         "images": n_images, "batch": batch, "exit_rate": rate,
                         "measured_exit_rate": sum(r.stage == "classifier" for r in results) / n_images,
                         "cascade_img_s": n_images / cascade_s, "all_stages_img_s": n_images / baseline_s,
                         "speedup": baseline_s / cascade_s, "classifier_only_img_s": n_images / classifier_s})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models and images (seconds; for tests)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=64, help="images per predict call")
    ap.add_argument("--batch", type=int, default=16, help="the engine's max_batch")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds to time each measurement")
    ap.add_argument("--iters", type=int, default=3, help="at least this many timed calls per measurement")
    ap.add_argument("--no-share", action="store_true", help="the detector runs its own backbone")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run("tiny" if args.tiny else "small", args.dtype, args.device, args.images, args.batch, args.min_time,
               not args.no_share, args.iters)
    print_table(rows, ["preset", "dtype", "shared_backbone", "batch", "exit_rate", "measured_exit_rate",
                       "cascade_img_s", "all_stages_img_s", "speedup", "classifier_only_img_s"])
    write_json(args.json, {"benchmark": "cascade", "rows": rows})
    return rows


if __name__ == "__main__":
    main()
