"""Does torch.compile (inductor) of the vision model pay on CPU? Eager vs compiled, same weights, same run.

    python -m bench.compile [--preset dinov3-vits16] [--batch 8] [--rounds 5] [--int8 pt2e-dynamic,pt2e-static]

Reports each compiled model's startup (export, quantization and the first compiled call, which the server would
pay per batch bucket) and images/s of all, timed round-robin after warm-up (median of `rounds`).

--int8 also compiles the fp32 model through torchao's PT2E X86 inductor quantizer (`pip install torchao`): int8
weights per output channel, activations per tensor, dynamic or static (observed on one calibration batch: the
timed one), lowered by inductor with weight freezing so that the int8 products and their dequantization fuse
(oneDNN qlinear). Its drift is max |P - P_fp32 eager| on the timed batch (random pixels). The runtime's own int8
kernels are measured by `python -m bench.mfu`."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import PRESETS, machine, make_checkpoint, preset_config, print_table, time_interleaved, write_json
from bench.mfu import load_model, model_call

PT2E_MODES = ("pt2e-dynamic", "pt2e-static")


class Probability(nn.Module):
    """The classifier's P(roadwork) alone: one tensor out, as torch.export takes it."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels)[0]


def pt2e_int8(model: nn.Module, pixels: torch.Tensor, mode: str) -> nn.Module:
    """The fp32 `model` quantized by torchao's X86InductorQuantizer and compiled with freezing (the documented
    PT2E flow: export -> prepare_pt2e -> calibrate -> convert_pt2e -> torch.compile)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise SystemExit(f"--int8 {mode} needs torchao (pip install torchao): {e}") from e
    with torch.no_grad():
        exported = torch.export.export(Probability(model), (pixels,)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=mode == "pt2e-dynamic"))
        prepared = prepare_pt2e(exported, quantizer)
        prepared(pixels)  # calibration: observes the activation ranges (static) or just runs the observers
        compiled = torch.compile(convert_pt2e(prepared))
        with torch._inductor.config.patch(freezing=True):  # weights become constants: prepacked int8 qlinear
            compiled(pixels)
    return compiled


def no_grad_call(model: nn.Module, pixels: torch.Tensor):
    def call():
        with torch.no_grad():  # as it was compiled: a grad-enabled call would recompile for autograd
            return model(pixels)
    return call


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov3-vits16", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--int8", default="", help=f"comma-separated, from {','.join(PT2E_MODES)} (fp32 only)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    modes = [m for m in args.int8.split(",") if m]
    if set(modes) - set(PT2E_MODES) or (modes and args.dtype != "fp32"):
        ap.error(f"--int8: choose from {','.join(PT2E_MODES)}, with --dtype fp32")
    size = preset_config(args.preset)["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(args.preset, Path(tmp))
        eager = load_model(Path(tmp), args.dtype)
    calls = {"eager": model_call(eager, args.batch, size, "cpu")}
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    startup_s, drift = {}, {}
    t0 = time.perf_counter()
    compiled = torch.compile(eager)
    calls["compiled"] = model_call(compiled, args.batch, size, "cpu")
    calls["compiled"]()
    startup_s["compiled"] = time.perf_counter() - t0
    with torch.inference_mode():
        reference = eager(pixels.to(eager.classifier.weight.dtype))[0].float()
    for mode in modes:
        t0 = time.perf_counter()
        quantized = pt2e_int8(eager, pixels, mode)
        startup_s[mode] = time.perf_counter() - t0
        calls[mode] = no_grad_call(quantized, pixels)
        with torch.no_grad():
            drift[mode] = float((quantized(pixels) - reference).abs().max())
    seconds = time_interleaved(calls, args.rounds)
    rows = [{"model": name, "img_s": args.batch / seconds[name], "vs_eager": seconds["eager"] / seconds[name],
             "startup_s": startup_s.get(name, 0.0), "max_drift": drift.get(name, 0.0)} for name in calls]
    print(f"{args.preset} {args.dtype} batch {args.batch}, {machine()}")
    print_table(rows, ["model", "img_s", "vs_eager", "startup_s", "max_drift"])
    result = {"benchmark": "compile", "preset": args.preset, "machine": machine(), "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
