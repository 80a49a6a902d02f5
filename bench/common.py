"""Shared pieces of the benchmarks: model presets, random-weight checkpoints, timing, tables, JSON."""
from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

# Real architectures with random weights (no downloads): what users deploy.
PRESETS = {
    "dinov3-vits16": ("dinov3_vit", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                         num_attention_heads=6, num_register_tokens=4, image_size=224, patch_size=16)),
    "dinov3-vitb16": ("dinov3_vit", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, num_register_tokens=4, image_size=224, patch_size=16)),
    "vit-b16": ("vit", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16)),
    "tiny": ("dinov3_vit", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_register_tokens=4, image_size=32, patch_size=16)),
    "tiny-vit": ("vit", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=16)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preset_config(preset: str) -> dict:
    """The config.json fields of `preset` that the FLOP count reads (two labels, as the subnet's models)."""
    kind, cfg = PRESETS[preset]
    return {"model_type": kind, **cfg, "num_labels": 2}


def require_transformers() -> None:
    """The benchmarks build their checkpoints and baselines with transformers, which only the test extra installs:
    say so instead of a bare ModuleNotFoundError."""
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "transformers":
            raise
        raise SystemExit("this benchmark needs transformers (random-weight checkpoints, the baselines): "
                         "pip install -e '.[test]'") from None


def make_checkpoint(preset: str, path: Path):
    """Write a random-weight checkpoint of `preset`; returns transformers' model on the same weights."""
    require_transformers()
    from fixtures.checkpoints import make_dinov3, make_vit  # transformers: a benchmark/test dependency only

    kind, cfg = PRESETS[preset]
    return make_dinov3(path, **cfg) if kind == "dinov3_vit" else make_vit(path, **cfg)


def jpeg_images(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Smooth random images saved as quality-75 JPEGs, as the subnet's validators send them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def time_call(fn: Callable[[], object], min_time: float = 1.0, min_iters: int = 3, warmup: int = 1) -> float:
    """Median seconds per call over at least `min_iters` calls and `min_time` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, called round-robin: on a shared machine every function sees
    the same background load, so ratios between them hold even when absolute figures drift."""
    assert rounds >= 1
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclass
class Row:
    values: dict

    def cell(self, key: str) -> str:
        v = self.values[key]
        return f"{v:.3g}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(Row(r).cell(c)) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(Row(r).cell(c).rjust(widths[c]) for c in columns))


# The ISA features that decide which precisions are fast here (bf16 and int8 matmuls are 40-100x slower without them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def machine() -> dict:
    cpu, family, model, flags = platform.processor(), "?", "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                cpu = value
            elif key == "cpu family":
                family = value
            elif key == "model":
                model = value
            elif key == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]  # other processes' work shares the cores: absolute figures drift with it
    except OSError:
        load = float("nan")
    return {"cpu": cpu, "cpu_family_model": f"{family}/{model}", "capability": torch.backends.cpu.get_cpu_capability(),
            "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_avg_1min": load, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"machine": machine(), **payload}, indent=2))
