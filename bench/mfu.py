"""Model FLOPs utilization: each model's achieved FLOP/s against the matmul peak measured in the same run.

    python -m bench.mfu [--preset dinov3-vits16 --preset vit-b16] [--dtypes fp32,bf16,int8,auto] [--batch 32]

Per preset, the model in every dtype and the matmul peak of every dtype are timed round-robin (median of
`rounds` calls each), so background load on a shared machine moves model and peak together. The model call is
the runtime's model-only path: the classifier (backbone + head) on a static preprocessed batch, as the graph
runner calls it on CPU. FLOPs come from bench/flops.py (matrix products only).

int8 is the bf16 model with its encoder Linear layers converted by runtime.models.int8_dynamic.quantize_int8; its
utilization is taken against the int8 (torch._int_mm) peak although attention and the patch embedding still
run in bf16, so it understates how busy the integer units are. speedup_vs_bf16 compares with the bf16 row.
int8-fbgemm / int8-onednn: the fp32 model on those int8 kernels (runtime/models/int8_dynamic.py), against their peaks.
auto: runtime.models.auto_precision.choose on the checkpoint (its choice, measure time and speedup are printed), then
the chosen model, against the fp32 peak; speedup_vs_fp32 compares with the fp32 row."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import PRESETS, make_checkpoint, preset_config, print_table, time_interleaved, write_json
from bench.flops import vision_flops
from bench.peak import matmul_fn
from runtime.models.classifier import load_classifier
from runtime.models import auto_precision
from runtime.models.int8_dynamic import quantize_int8

MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
                "int8-fbgemm": torch.float32, "int8-onednn": torch.float32, "auto": None}


def load_model(path: Path, dtype_name: str, device: str = "cpu") -> torch.nn.Module:
    model = load_classifier(path, MODEL_DTYPES[dtype_name], device)
    if dtype_name.startswith("int8"):
        quantize_int8(model, backend=dtype_name)
    return model


def auto_model(path: Path, batch: int, device: str) -> tuple[torch.nn.Module, auto_precision.PrecisionChoice]:
    from runtime.models.preprocessor import read_preprocess

    load = auto_precision.load_in(path, torch.device(device))
    choice = auto_precision.choose(load, read_preprocess(path), batch, None, None)
    return load(choice.candidate), choice


def model_call(model: torch.nn.Module, batch: int, image_size: int, device: str):
    dtype = model.classifier.weight.dtype
    pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, dtype)

    def call():
        with torch.inference_mode():
            out = model(pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return out

    return call


def run(preset: str, dtypes: list[str], batch: int, rounds: int, peak_size: int, device: str = "cpu") -> list[dict]:
    cfg = preset_config(preset)
    flops = vision_flops(cfg).total
    image_size = cfg["image_size"]
    peak_of = {name: "fp32" if name == "auto" else name for name in dtypes}
    peak_dtypes = sorted(set(peak_of.values()) | ({"bf16"} if "int8" in dtypes else set()))
    calls, peak_flops, choice = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(preset, Path(tmp))
        for name in dtypes:
            if name == "auto":
                model, choice = auto_model(Path(tmp), batch, device)
            else:
                model = load_model(Path(tmp), name, device)
            calls[f"model_{name}"] = model_call(model, batch, image_size, device)
    for name in peak_dtypes:
        calls[f"peak_{name}"], peak_flops[name] = matmul_fn(name, peak_size, device)
    seconds = time_interleaved(calls, rounds)
    peaks = {name: peak_flops[name] / seconds[f"peak_{name}"] / 1e9 for name in peak_dtypes}
    rows = []
    for name in dtypes:
        t = seconds[f"model_{name}"]
        achieved = flops * batch / t / 1e9
        row = {"preset": preset, "dtype": name, "batch": batch, "img_s": batch / t, "gflop_s": achieved,
               "peak_gflop_s": peaks[peak_of[name]], "mfu": achieved / peaks[peak_of[name]]}
        if name == "auto":
            row.update(chosen=choice.candidate.name, auto_measure_s=choice.seconds)
        if "bf16" in dtypes:
            row["speedup_vs_bf16"] = seconds["model_bf16"] / t
        if "fp32" in dtypes:
            row["speedup_vs_fp32"] = seconds["model_fp32"] / t
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="repeatable (default: dinov3-vits16 and vit-b16)")
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int8-fbgemm,int8-onednn,auto",
                    help=f"comma-separated, from {','.join(MODEL_DTYPES)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed calls of each model and each peak (median)")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the n x n x n peak products")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(MODEL_DTYPES)
    if unknown:
        ap.error(f"--dtypes: unknown {sorted(unknown)}; choose from {sorted(MODEL_DTYPES)}")
    rows = []
    for preset in args.preset or ["dinov3-vits16", "vit-b16"]:
        rows += run(preset, dtypes, args.batch, args.rounds, args.peak_size, args.device)
    columns = ["preset", "dtype", "batch", "img_s", "gflop_s", "peak_gflop_s", "mfu"]
    print_table(rows, columns + (["speedup_vs_bf16"] if "bf16" in dtypes else [])
                + (["speedup_vs_fp32"] if "fp32" in dtypes else []))
    for row in rows:
        if row["dtype"] == "auto":
            print(f"auto on {row['preset']}: {row['chosen']} (measured in {row['auto_measure_s']:.2f} s at startup)")
    for row in rows:
        if row["dtype"] == "bf16" and row["batch"] >= 32:
            verdict = "met" if row["mfu"] >= 0.6 else "not met"
            print(f"target: {row['preset']} bf16 batch {row['batch']} at >= 60% of the bf16 matmul peak: "
                  f"{row['mfu']:.0%} ({verdict})")
    write_json(args.json, {"benchmark": "mfu", "device": args.device, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
