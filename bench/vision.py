"""Vision path: our runtime vs transformers' model on the same random weights, same dtype.

  python -m bench.vision --preset dinov3-vits16 --dtype bf16 --batches 1,8,32

model-only: a preprocessed batch through the model (ours: the graph runner's static batch; baseline:
transformers' model plus the same head). end-to-end: JPEG bytes -> P(roadwork) (ours: decode + preprocess
kernel reference + model; baseline: PIL decode + transformers' PIL-backed image processor + model; DINOv3's own
processor needs torchvision, so its baseline uses the PIL processor with DINOv3's size/mean/std)."""
from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from bench.common import DTYPES, PRESETS, jpeg_images, make_checkpoint, print_table, time_call, write_json
from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine


def baseline(path: Path, hf_model, kind: str, dtype: torch.dtype):
    """transformers' way: (preprocess(list of JPEG bytes) -> pixel tensor, model(pixel tensor) -> P(roadwork))."""
    from transformers import ViTImageProcessorPil

    pre = json.loads((path / "preprocessor_config.json").read_text())
    processor = ViTImageProcessorPil(size=pre["size"], image_mean=pre["image_mean"], image_std=pre["image_std"])
    hf_model = hf_model.to(dtype)
    if kind == "dinov3_vit":
        from safetensors.torch import load_file

        head = load_file(path / "model.safetensors")
        w, b = head["classifier.weight"].to(dtype), head["classifier.bias"].to(dtype)
        prefix = 1 + hf_model.config.num_register_tokens

        def model(x):
            seq = hf_model(pixel_values=x).last_hidden_state
            logits = torch.cat([seq[:, 0], seq[:, prefix:].mean(1)], -1) @ w.T + b
            return torch.softmax(logits.float(), -1)[:, 1]
    else:
        def model(x):
            return torch.softmax(hf_model(pixel_values=x).logits.float(), -1)[:, 1]

    def preprocess(jpegs):
        images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
        return processor(images, return_tensors="pt")["pixel_values"].to(dtype)

    return preprocess, model


def run(preset: str, dtype_name: str, batches: list[int], min_time: float) -> list[dict]:
    kind, _ = PRESETS[preset]
    dtype = DTYPES[dtype_name]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        hf_model = make_checkpoint(preset, path)
        engine = Engine.load(path, "cpu", dtype, max_batch=max(batches))
        engine.warmup()
        preprocess, hf = baseline(path, hf_model, kind, dtype)
        for b in batches:
            jpegs = jpeg_images(b)
            pixels = preprocess(jpegs)
            with torch.inference_mode():
                engine.runner.input[:b].copy_(pixels)
                ours_model = time_call(lambda: engine.runner.run(b), min_time)
                hf_model_t = time_call(lambda: hf(pixels), min_time)
                ours_e2e = time_call(lambda: engine.predict([decode_image(j) for j in jpegs]), min_time)
                hf_e2e = time_call(lambda: hf(preprocess(jpegs)), min_time)
            rows.append({"preset": preset, "dtype": dtype_name, "batch": b,
                         "ours_model_img_s": b / ours_model, "hf_model_img_s": b / hf_model_t,
                         "model_ratio": hf_model_t / ours_model,
                         "ours_e2e_img_s": b / ours_e2e, "hf_e2e_img_s": b / hf_e2e, "e2e_ratio": hf_e2e / ours_e2e})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov3-vits16", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds to time each measurement")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    rows = run(args.preset, args.dtype, [int(b) for b in args.batches.split(",")], args.min_time)
    print_table(rows, ["preset", "dtype", "batch", "ours_model_img_s", "hf_model_img_s", "model_ratio",
                       "ours_e2e_img_s", "hf_e2e_img_s", "e2e_ratio"])
    write_json(args.json, {"benchmark": "vision", "rows": rows})
    return rows


if __name__ == "__main__":
    main()
