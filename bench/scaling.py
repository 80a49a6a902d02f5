"""Cost growth: throughput and latency against batch size and image size; peak RSS against batch size and
result-cache size.

    python -m bench.scaling [--preset dinov3-vits16 --dtype bf16] [--batches 1,4,16,32] [--sides 224,640,1280]
                            [--resolutions 224,320] [--cache-entries 0,10000,100000]

batch: one call's latency and images/s, model-only (classifier on a static preprocessed batch) and end-to-end
  (JPEG bytes -> decode -> Engine.predict), for each batch size.
image side: end-to-end at batch 8 for square JPEGs of each side: decode and Engine.predict (preprocess +
  model) per image, so the point where the resize outgrows the model shows.
resolution (DINOv3 only; its RoPE takes any multiple of the patch): model-only at batch 8 for each input
  resolution: tokens, GFLOP per image, images/s and achieved GFLOP/s, which falls as attention (quadratic in
  tokens) takes a larger share.
memory: each point in a fresh process. Batch: RSS after loading, and the peak RSS while running one batch
  (the peak is reset after loading via /proc/self/clear_refs, so the load's own spike does not mask it).
  Cache: server.cache.ResultCache filled with N one-stage results; RSS growth per entry against the cache's
  own byte estimate (the estimate is what its --cache-mb bound counts)."""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import DTYPES, PRESETS, jpeg_images, make_checkpoint, preset_config, print_table, time_call, \
    write_json
from bench.flops import vision_flops

REPO = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def batch_sweep(path: Path, dtype: torch.dtype, batches: list[int], min_time: float) -> list[dict]:
    from runtime.models.classifier import load_classifier
    from runtime.image_decode import decode_image
    from runtime.cascade.engine import Engine

    model = load_classifier(path, dtype)
    engine = Engine.load(path, "cpu", dtype, max_batch=max(batches))
    size = engine.spec.height
    rows = []
    for b in batches:
        pixels = torch.randn(b, 3, size, size).to(dtype)
        jpegs = jpeg_images(b, size)
        with torch.inference_mode():
            model_s = time_call(lambda: model(pixels), min_time)
            e2e_s = time_call(lambda: engine.predict([decode_image(j) for j in jpegs]), min_time)
        rows.append({"batch": b, "model_ms": model_s * 1e3, "model_img_s": b / model_s,
                     "e2e_ms": e2e_s * 1e3, "e2e_img_s": b / e2e_s})
    return rows


def side_sweep(path: Path, dtype: torch.dtype, sides: list[int], batch: int, min_time: float) -> list[dict]:
    from runtime.image_decode import decode_image
    from runtime.cascade.engine import Engine

    engine = Engine.load(path, "cpu", dtype, max_batch=batch)
    rows = []
    for side in sides:
        jpegs = jpeg_images(batch, side)
        decoded = [decode_image(j) for j in jpegs]
        with torch.inference_mode():
            decode_s = time_call(lambda: [decode_image(j) for j in jpegs], min_time)
            predict_s = time_call(lambda: engine.predict(decoded), min_time)
        rows.append({"side": side, "jpeg_kb": sum(map(len, jpegs)) / batch / 1024,
                     "decode_ms_per_img": decode_s * 1e3 / batch, "predict_ms_per_img": predict_s * 1e3 / batch,
                     "e2e_img_s": batch / (decode_s + predict_s)})
    return rows


def resolution_sweep(path: Path, cfg: dict, dtype: torch.dtype, resolutions: list[int], batch: int,
                     min_time: float) -> list[dict]:
    from runtime.models.classifier import load_classifier

    model = load_classifier(path, dtype)
    patch = cfg["patch_size"]
    rows = []
    for res in resolutions:
        pixels = torch.randn(batch, 3, res, res).to(dtype)
        with torch.inference_mode():
            seconds = time_call(lambda: model(pixels), min_time)
        flops = vision_flops(cfg, res).total
        rows.append({"resolution": res, "tokens": (res // patch) ** 2 + 1 + cfg.get("num_register_tokens", 0),
                     "gflop_per_img": flops / 1e9, "img_s": batch / seconds,
                     "gflop_s": flops * batch / seconds / 1e9})
    return rows


# --- memory: one fresh process per point -------------------------------------------------------------------

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_batch(path: Path, dtype: torch.dtype, batch: int) -> dict:
    from runtime.image_decode import decode_image
    from runtime.cascade.engine import Engine

    engine = Engine.load(path, "cpu", dtype, max_batch=batch)
    images = [decode_image(j) for j in jpeg_images(batch, engine.spec.height)]
    gc.collect()
    loaded = _rss_mb()
    reset = _reset_peak()
    engine.predict(images)
    return {"rss_after_load_mb": loaded, "peak_rss_mb": _peak_mb(), "peak_reset": reset}


def child_cache(entries: int) -> dict:
    from runtime.cascade.engine import ImageResult
    from server.cache import ResultCache, image_key

    cache = ResultCache(max_entries=max(entries, 1), max_bytes=1 << 40, ttl_s=3600)
    gc.collect()
    before = _rss_mb()
    for i in range(entries):
        p = (i % 1000) / 1000
        cache.put(image_key(i.to_bytes(8, "little")),
                  ImageResult(prediction=p, label="roadwork" if p > 0.5 else "none", stage="classifier",
                              scores={"classifier": p}))
    gc.collect()
    grown = _rss_mb() - before
    return {"rss_growth_mb": grown, "estimate_mb": cache.bytes / 2**20,
            "measured_bytes_per_entry": grown * 2**20 / entries if entries else 0.0,
            "estimated_bytes_per_entry": cache.bytes / entries if entries else 0.0}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.scaling", "--child", *args], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_batches(path: Path, dtype_name: str, batches: list[int]) -> list[dict]:
    return [{"batch": b, **run_child(["batch", str(path), dtype_name, str(b)])} for b in batches]


def memory_cache(sizes: list[int]) -> list[dict]:
    return [{"entries": n, **run_child(["cache", str(n)])} for n in sizes]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov3-vits16", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--batches", default="1,4,16,32", help="batch sizes for the batch and memory sweeps")
    ap.add_argument("--sides", default="224,640,1280", help="JPEG sides for the image-size sweep")
    ap.add_argument("--side-batch", type=int, default=8)
    ap.add_argument("--resolutions", default="224,320", help="DINOv3 input resolutions (empty to skip)")
    ap.add_argument("--cache-entries", default="0,10000,100000", help="result-cache sizes for the memory sweep")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds to time each measurement")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = child_batch(Path(rest[0]), DTYPES[rest[1]], int(rest[2])) if kind == "batch" else \
            child_cache(int(rest[0]))
        print(json.dumps(result))
        return result

    dtype = DTYPES[args.dtype]
    cfg = preset_config(args.preset)
    batches = _ints(args.batches)
    report: dict = {"preset": args.preset, "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        make_checkpoint(args.preset, path)
        report["batch"] = batch_sweep(path, dtype, batches, args.min_time)
        print(f"\n{args.preset} {args.dtype}: against batch size")
        print_table(report["batch"], ["batch", "model_ms", "model_img_s", "e2e_ms", "e2e_img_s"])
        report["side"] = side_sweep(path, dtype, _ints(args.sides), args.side_batch, args.min_time)
        print(f"\nend-to-end against JPEG side (batch {args.side_batch})")
        print_table(report["side"], ["side", "jpeg_kb", "decode_ms_per_img", "predict_ms_per_img", "e2e_img_s"])
        resolutions = _ints(args.resolutions)
        if resolutions and cfg["model_type"] == "dinov3_vit":
            report["resolution"] = resolution_sweep(path, cfg, dtype, resolutions, args.side_batch, args.min_time)
            print(f"\nmodel-only against input resolution (batch {args.side_batch})")
            print_table(report["resolution"], ["resolution", "tokens", "gflop_per_img", "img_s", "gflop_s"])
        report["memory_batch"] = memory_batches(path, args.dtype, batches)
        print("\nmemory against batch size (fresh process each)")
        print_table(report["memory_batch"], ["batch", "rss_after_load_mb", "peak_rss_mb"])
    report["memory_cache"] = memory_cache(_ints(args.cache_entries))
    print("\nmemory against result-cache entries (fresh process each)")
    print_table(report["memory_cache"], ["entries", "rss_growth_mb", "estimate_mb", "measured_bytes_per_entry",
                                         "estimated_bytes_per_entry"])
    write_json(args.json, {"benchmark": "scaling", **report})
    return report


if __name__ == "__main__":
    main()
