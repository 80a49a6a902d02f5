"""The machine's limit: measured matrix-multiply throughput for every precision `auto` chooses among, in one run.

    python -m bench.peak [--size 2048] [--rounds 5]

fp32, bf16 and fp16: torch.mm of two n x n matrices; int8: torch._int_mm (int8 x int8 -> int32, the product
runtime/models/int8_dynamic.py's "int8" kernel runs); int8-fbgemm / int8-onednn: quantized::linear_dynamic on packed
weights, float32 in and out (activation quantization and dequantization included), as quant.PackedInt8Linear. Each figure is the median over `rounds` calls taken round-robin, so a
burst of background load hits all alike and the ratios stay fair. A dtype over 20x slower than fp32 on a
256 x 256 probe is reported at the probe's size (its `size` column says so). The peak is what the BLAS reaches on
a large square product; a model's own (tall, narrow) products can reach less."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from bench.common import print_table, time_interleaved, write_json
from runtime.options import INT8_BACKENDS

PEAK_DTYPES = ("fp32", "bf16", "fp16", *INT8_BACKENDS)
PROBE_SIZE = 256
PROBE_SLOWER = 20


def matmul_fn(dtype_name: str, size: int, device: str = "cpu") -> tuple[Callable[[], object], int]:
    """(a call of one size x size product in `dtype_name`, its FLOPs = 2 n^3)."""
    g = torch.Generator().manual_seed(0)
    if dtype_name == "int8":
        a = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g).to(device)
        b = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g).to(device)
        product = lambda: torch._int_mm(a, b)  # noqa: E731
    elif dtype_name.startswith("int8-"):
        from runtime.models.int8_dynamic import PackedInt8Linear

        assert device == "cpu", f"{dtype_name} runs on CPU"
        layer = PackedInt8Linear(torch.nn.Linear(size, size, bias=False), dtype_name)
        x = torch.randn(size, size, generator=g)
        product = lambda: layer(x)  # noqa: E731
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        a = torch.randn(size, size, generator=g).to(device, dtype)
        b = torch.randn(size, size, generator=g).to(device, dtype)
        product = lambda: torch.mm(a, b)  # noqa: E731
    if device.startswith("cuda"):
        def call():
            product()
            torch.cuda.synchronize(device)
        return call, 2 * size**3
    return product, 2 * size**3


def measure_peaks(dtypes: tuple[str, ...] = PEAK_DTYPES, size: int = 2048, rounds: int = 5,
                  device: str = "cpu") -> tuple[dict[str, float], dict[str, int]]:
    """(GFLOP/s (GOP/s for int8), product size) per dtype, measured interleaved. A dtype over PROBE_SLOWER x slower
    than fp32 at PROBE_SIZE (fp16 without native support: ~1 GFLOP/s, a minute per 2048 product) keeps its probe
    figure."""
    probe = {}
    for name in dtypes:
        call, flops = matmul_fn(name, min(size, PROBE_SIZE), device)
        probe[name] = flops / time_interleaved({name: call}, 2)[name] / 1e9
    full = [name for name in dtypes if "fp32" not in probe or probe[name] * PROBE_SLOWER >= probe["fp32"]]
    calls, flops = {}, {}
    for name in full:
        calls[name], flops[name] = matmul_fn(name, size, device)
    seconds = time_interleaved(calls, rounds)
    peaks = {name: flops[name] / seconds[name] / 1e9 if name in full else probe[name] for name in dtypes}
    return peaks, {name: size if name in full else min(size, PROBE_SIZE) for name in dtypes}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="n of the n x n x n products")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per dtype (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    dtypes = PEAK_DTYPES if args.device == "cpu" else tuple(d for d in PEAK_DTYPES if not d.startswith("int8-"))
    peaks, sizes = measure_peaks(dtypes, args.size, args.rounds, args.device)
    rows = [{"dtype": name, "size": sizes[name], "gflop_s": peaks[name], "vs_fp32": peaks[name] / peaks["fp32"],
             "vs_bf16": peaks[name] / peaks["bf16"]} for name in dtypes]
    print_table(rows, ["dtype", "size", "gflop_s", "vs_fp32", "vs_bf16"])
    fastest = max(rows, key=lambda r: r["gflop_s"])
    print(f"fastest product here: {fastest['dtype']} (x{fastest['vs_fp32']:.2f} fp32); `auto` also checks accuracy "
          f"and the model's own shapes: python -m bench.mfu --dtypes fp32,auto")
    write_json(args.json, {"benchmark": "peak", "device": args.device, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
