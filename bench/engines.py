"""Engines and precisions for the classifier, side by side: this runtime, ONNX Runtime and transformers, on the same
random weights, images/s at each batch size and drift against fp32 on fixed inputs.

    python -m bench.engines [--preset vit-b16] [--batches 1,8,32] [--rounds 3] [--engines NAME,...]

Engines (all fp32 activations unless named):
  transformers            transformers' eager model (its default attention, SDPA)
  runtime                 this runtime's classifier (runtime/models/classifier.py)
  runtime+int8-fbgemm, runtime+int8-onednn
                          the runtime's int8 kernels (runtime/models/int8_dynamic.py), as `--quantize` builds them
  runtime+int8, runtime-bf16
                          torch._int_mm int8 and bf16: not defaults, 40-100x slower than fp32 without VNNI or
                          AVX-512 BF16 (name them with --engines where the CPU has them)
  ort                     ONNX Runtime (CPU provider, every graph optimization) on tools.export's classifier.onnx
  runtime-onnxruntime     the same classifier.onnx as this runtime's classifier stage runs it on backend onnxruntime
                          (Engine.load with --backend onnxruntime): the stage's static batch and model call, timed
                          after preprocessing as the other rows are
  ort+int8-dynamic        onnxruntime.quantization.quantize_dynamic (QInt8 weights, dynamic uint8 activations)
  ort+int8-static         quantize_static, QDQ, per-channel QInt8 weights, QInt8 activations calibrated on the 16
                          images runtime/models/auto_precision.py calibrates on (not the drift inputs)
The model calls are timed round-robin (bench.common.time_interleaved, median of `--rounds` calls each), so a busy
machine slows all alike. Drift: max |P - P_fp32| over `--inputs` synthetic street images (another seed than the
calibration's) against the runtime's fp32, and the decisions (P > 0.5) that flip. Needs onnxruntime and onnx
for the ort engines (the test extra has them) and transformers for the baseline."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.common import PRESETS, make_checkpoint, machine, print_table, time_interleaved, write_json
from runtime.models import auto_precision
from runtime.models.classifier import load_classifier
from runtime.models.preprocessor import read_preprocess
from runtime.models.int8_dynamic import backend_available

DEFAULT_ENGINES = ("transformers", "runtime", "runtime+int8-fbgemm", "runtime+int8-onednn", "ort",
                   "runtime-onnxruntime", "ort+int8-dynamic", "ort+int8-static")
OPTIONAL_ENGINES = ("runtime-bf16", "runtime+int8")  # 40-100x slower than fp32 without AVX-512 BF16 / VNNI
DRIFT_SEED = 27
Predict = Callable[[torch.Tensor], torch.Tensor]  # pixels -> P(roadwork) [B] fp32


def ort_session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(path: Path) -> Predict:
    session = ort_session(path)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["p_roadwork"], {"pixel_values": x.numpy()})[0])
    return predict


def export_classifier(model_dir: Path, out: Path) -> Path:
    """classifier.onnx and the export.json the runtime's onnxruntime backend reads beside it, as tools.export writes."""
    from tools.export import Graph, export_one
    model = load_classifier(model_dir, torch.float32)
    entry = export_one(Graph("classifier.onnx", model, read_preprocess(model_dir), ["p_roadwork", "logits"]), out, 17)
    (out / "export.json").write_text(json.dumps({"bundle": str(model_dir), "exported": [entry], "not_exported": []}))
    return out / "classifier.onnx"


def stage_predict(model_dir: Path, fp32: Path, work: Path, max_batch: int) -> Predict:
    """The classifier stage of an Engine on backend onnxruntime, its static batch filled with the given pixels (what
    Engine.predict runs after preprocessing)."""
    from runtime.cascade.engine import Engine
    bundle = work / "bundle"
    bundle.mkdir()
    (bundle / "cascade.toml").write_text(f'[[stage]]\nkind = "classifier"\nmodel = "{model_dir}"\n'
                                         f'backend = "onnxruntime"\nonnx = "{fp32}"\n')
    stage = Engine.load(bundle, "cpu", "float32", max_batch, quantize="none").cascade.first  # its runner's segment
    # holds the stage weakly: the closure keeps it

    def predict(x: torch.Tensor) -> torch.Tensor:
        probs = []
        for start, count in stage.runner.chunks(len(x)):
            stage.runner.input[:count].copy_(x[start:start + count])
            probs.append(stage.runner.run(count)[0].clone())
        return torch.cat(probs)
    return predict


def static_int8(fp32: Path, out: Path, calibration: torch.Tensor) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(calibration.split(1))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"pixel_values": row.numpy()}

    prepared = out / "classifier.pre.onnx"
    quant_pre_process(str(fp32), str(prepared))
    path = out / "classifier.int8-static.onnx"
    quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return path


def dynamic_int8(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    path = out / "classifier.int8-dynamic.onnx"
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


def build(name: str, model_dir: Path, hf_model, work: Path, calibration: torch.Tensor, max_batch: int
          ) -> Predict | str:
    """The engine's predict, or why it does not run here."""
    if name == "transformers":
        hf_model = hf_model.eval()
        return lambda x: torch.softmax(hf_model(pixel_values=x).logits.float(), -1)[:, 1]
    if name.startswith("runtime") and name != "runtime-onnxruntime":
        quantize = name.split("+", 1)[1] if "+" in name else "none"
        if quantize != "none" and not backend_available(quantize):
            return f"{quantize} is not available in this torch build"
        dtype = torch.bfloat16 if name == "runtime-bf16" else torch.float32
        model = auto_precision.in_precision(load_classifier(model_dir, torch.float32), auto_precision.Candidate(dtype, quantize))
        return lambda x: model(x.to(dtype))[0].float()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"needs onnx and onnxruntime ({e})"
    fp32 = work / "classifier.onnx"
    if not fp32.exists():
        export_classifier(model_dir, work)
    if name == "ort":
        return ort_predict(fp32)
    if name == "runtime-onnxruntime":
        return stage_predict(model_dir, fp32, work, max_batch)
    if name == "ort+int8-dynamic":
        return ort_predict(dynamic_int8(fp32, work))
    if name == "ort+int8-static":
        return ort_predict(static_int8(fp32, work, calibration))
    raise ValueError(f"unknown engine {name!r}")


def pixels_of(model_dir: Path, images: list[np.ndarray]) -> torch.Tensor:
    from kernels.preprocess import preprocess_into
    spec = read_preprocess(model_dir)
    out = torch.zeros(len(images), 3, spec.height, spec.width)
    for slot, image in enumerate(images):
        preprocess_into(out, slot, torch.from_numpy(image), spec)
    return out


@torch.inference_mode()
def run(preset: str, engines: list[str], batches: list[int], rounds: int, inputs: int) -> tuple[list[dict], list]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, work = Path(tmp) / "model", Path(tmp) / "onnx"
        work.mkdir()
        hf_model = make_checkpoint(preset, model_dir)
        drift_pixels = pixels_of(model_dir, auto_precision.calibration_images(inputs, seed=DRIFT_SEED))
        calibration = pixels_of(model_dir, auto_precision.calibration_images())
        built = {name: build(name, model_dir, hf_model, work, calibration, max(batches)) for name in engines}
        skipped = [(name, why) for name, why in built.items() if isinstance(why, str)]
        live = {name: fn for name, fn in built.items() if not isinstance(fn, str)}
        reference = live["runtime"](drift_pixels) if "runtime" in live else None
        rows = {name: {"engine": name} for name in live}
        for b in batches:
            x = drift_pixels[:b]
            seconds = time_interleaved({name: (lambda fn=fn: fn(x)) for name, fn in live.items()}, rounds)
            for name, s in seconds.items():
                rows[name][f"b{b}_img_s"] = b / s
        for name, fn in live.items():
            if reference is not None:
                p = fn(drift_pixels)
                rows[name]["max_dP"] = float((p - reference).abs().max())
                rows[name]["flips"] = int(((p > 0.5) != (reference > 0.5)).sum())
        if "transformers" in rows:
            for row in rows.values():
                for b in batches:
                    row[f"b{b}_vs_transformers"] = row[f"b{b}_img_s"] / rows["transformers"][f"b{b}_img_s"]
    return list(rows.values()), skipped


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=64, help="drift inputs (at least the largest batch)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma-separated, of {', '.join(DEFAULT_ENGINES + OPTIONAL_ENGINES)}")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    unknown = set(engines) - set(DEFAULT_ENGINES + OPTIONAL_ENGINES)
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    if "runtime" not in engines:
        parser.error("the engines must include 'runtime' (the fp32 reference of the drift)")
    if args.inputs < max(batches):
        parser.error(f"--inputs {args.inputs} is smaller than the largest batch {max(batches)}")
    print(machine())
    rows, skipped = run(args.preset, engines, batches, args.rounds, args.inputs)
    columns = ["engine", *[f"b{b}_img_s" for b in batches], *([f"b{b}_vs_transformers" for b in batches]
                                                               if "transformers" in engines else []),
               "max_dP", "flips"]
    print_table(rows, columns)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    write_json(args.json, {"benchmark": "engines", "preset": args.preset, "rows": rows,
                           "skipped": [list(s) for s in skipped]})
    return rows


if __name__ == "__main__":
    main()
