"""Does torch.compile (inductor) of the vision model pay on CPU? Eager vs compiled, same weights, same run.

    python -m bench.compile [--preset dinov3-vits16] [--batch 8] [--rounds 5]

Reports the compile time (the first compiled call, which the startup would pay) and images/s of both, timed
round-robin after warm-up (median of `rounds`)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PRESETS, machine, make_checkpoint, preset_config, print_table, time_interleaved, write_json
from bench.mfu import load_model, model_call


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov3-vits16", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    size = preset_config(args.preset)["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(args.preset, Path(tmp))
        eager = load_model(Path(tmp), args.dtype)
    compiled = torch.compile(eager)
    calls = {"eager": model_call(eager, args.batch, size, "cpu"), "compiled": model_call(compiled, args.batch, size, "cpu")}
    t0 = time.perf_counter()
    calls["compiled"]()
    compile_s = time.perf_counter() - t0
    calls["eager"]()
    seconds = time_interleaved(calls, args.rounds)
    rows = [{"model": name, "img_s": args.batch / seconds[name], "vs_eager": seconds["eager"] / seconds[name]}
            for name in calls]
    print(f"{args.preset} {args.dtype} batch {args.batch}, {machine()}; compile (first call) {compile_s:.1f} s")
    print_table(rows, ["model", "img_s", "vs_eager"])
    result = {"benchmark": "compile", "preset": args.preset, "compile_s": compile_s, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
