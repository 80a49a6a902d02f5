"""Export a bundle's vision stages to ONNX, each checked against the runtime on the same images.

    python -m tools.export BUNDLE --onnx DIR [--opset 17]

Writes, from the runtime's own fp32 modules (the engine loads the bundle as it serves it):
  classifier.onnx           pixel_values [batch, 3, H, W] -> p_roadwork [batch], logits [batch, num_labels]
  <member>.onnx             every hand-built detector member: pixel_values at its own input size -> logits
                            [batch, Q, C] (before sigmoid), pred_boxes [batch, Q, 4] (normalized cxcywh)
  classifier+shared.onnx    when members read the classifier's backbone (DEIMv2 sharing it): one graph from the
                            classifier's pixels to the classifier's outputs and those members' (<member>.logits,
                            <member>.pred_boxes), the backbone run once, as the runtime runs it
  export.json               per file: inputs and outputs with their shapes, the preprocessing spec its
                            pixel_values expect (runtime/models/preprocessor.py), the opset, and the check
The batch axis is dynamic. Each file passes onnx.checker (full check) and, run on ONNX Runtime's CPU provider at
batch 1 and 3 (the export traces at 2), matches the runtime within 1e-4 of the output's scale
(max |onnx - runtime| <= 1e-4 * max(1, max |runtime|)); a file that does not is an error. Members of format "onnx"
are ONNX already, and "transformers" members run transformers' own code: both are listed as not exported.

Needs onnx and onnxruntime (pip install 'roadwork-cascade[onnx]'). The exporter is torch's TorchScript-based one
(torch.onnx.export(dynamo=False)): the dynamo one needs onnxscript, which no extra installs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernels.preprocess import PreprocessSpec, preprocess_into
from runtime.errors import ModelLoadError

log = logging.getLogger(__name__)

OPSET = 17
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)
TOLERANCE = 1e-4  # of the output's scale


class DetectorGraph(nn.Module):
    """A hand-built member with its DetectorOutput as a tuple (what the exporter takes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values)
        return out.logits, out.pred_boxes


class SharedGraph(nn.Module):
    """The classifier and the members that read its backbone, the backbone run once (as detector_stage runs
    them: the classifier keeps the layers they read)."""

    def __init__(self, classifier: nn.Module, keep_layers: tuple[int, ...], members: list):
        super().__init__()
        self.classifier, self.keep_layers = classifier, keep_layers
        self.members = nn.ModuleList(d.model for d in members)
        self.layer_pos = [tuple(keep_layers.index(layer) for layer in d.model.hidden_layers) for d in members]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.classifier
        seq, hidden = c.backbone(pixel_values, hidden_layers=self.keep_layers)
        logits = c.classifier(c.head_features(seq))
        outputs = [c.probability(logits), logits]
        for model, positions in zip(self.members, self.layer_pos):
            out = model.forward_from_backbone(pixel_values, [hidden[i] for i in positions])
            outputs += [out.logits, out.pred_boxes]
        return tuple(outputs)


@dataclasses.dataclass
class Graph:
    file: str
    module: nn.Module
    preprocess: PreprocessSpec
    outputs: list[str]


def graphs_of(engine) -> tuple[list[Graph], list[str]]:
    """(what to export, members not exported with why) from a loaded fp32 CPU engine."""
    from runtime.cascade.detector_members import HAND_BUILT
    from runtime.cascade.detector_stage import DetectorStage

    first = engine.cascade.first
    graphs = [Graph("classifier.onnx", first.model, first.preprocess, ["p_roadwork", "logits"])]
    skipped, shared = [], []
    for stage in engine.cascade.later:
        if not isinstance(stage, DetectorStage):
            continue
        for d in stage.detectors:
            name = d.spec.name
            if d.family not in HAND_BUILT:
                skipped.append(f"{name}: format {d.spec.format!r} ({'already ONNX' if d.family == 'onnx' else 'run by transformers itself'})")
                continue
            graphs.append(Graph(f"{name}.onnx", DetectorGraph(d.model), d.preprocess, ["logits", "pred_boxes"]))
            if d.shared:
                shared.append(d)
    if shared:
        outputs = ["p_roadwork", "logits"] + [f"{d.spec.name}.{o}" for d in shared for o in ("logits", "pred_boxes")]
        graphs.append(Graph("classifier+shared.onnx", SharedGraph(first.model, first.keep_layers, shared),
                            first.preprocess, outputs))
    return graphs, skipped


def pixels(spec: PreprocessSpec, batch: int, seed: int) -> torch.Tensor:
    """Synthetic street images through the graph's own preprocessing."""
    from runtime.models.auto_precision import calibration_images
    out = torch.zeros(batch, 3, spec.height, spec.width)
    for slot, image in enumerate(calibration_images(batch, seed=seed)):
        preprocess_into(out, slot, torch.from_numpy(image), spec)
    return out


@torch.inference_mode()
def reference(module: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    return [t.float().numpy() for t in module(x)]


def export_one(graph: Graph, out_dir: Path, opset: int) -> dict:
    import onnx
    import onnxruntime as ort

    path = out_dir / graph.file
    module = graph.module.eval()
    traced_input = pixels(graph.preprocess, TRACE_BATCH, seed=0)
    reference(module, traced_input)  # fills shape-only caches (position embeddings, anchors) before tracing
    dynamic = {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in graph.outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (traced_input,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=graph.outputs, dynamic_axes=dynamic)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks = []
    for batch in CHECK_BATCHES:
        x = pixels(graph.preprocess, batch, seed=batch)
        got = session.run(graph.outputs, {"pixel_values": x.numpy()})
        for name, want, have in zip(graph.outputs, reference(module, x), got):
            if have.shape != want.shape:
                raise RuntimeError(f"{graph.file}: output {name} has shape {have.shape} at batch {batch}, the "
                                   f"runtime's {want.shape}")
            error, scale = float(np.abs(have - want).max()), max(1.0, float(np.abs(want).max()))
            checks.append({"batch": batch, "output": name, "max_abs_error": error, "scale": scale})
            if error > TOLERANCE * scale:
                raise RuntimeError(f"{graph.file}: output {name} is {error:.3g} off the runtime at batch {batch} "
                                   f"(bound {TOLERANCE:g} x scale {scale:.3g})")
    spec = graph.preprocess
    shapes = {"pixel_values": ["batch", 3, spec.height, spec.width]}
    outputs = {name: ["batch", *array.shape[1:]] for name, array in zip(graph.outputs, reference(module, x))}
    return {"file": graph.file, "opset": opset, "inputs": shapes, "outputs": outputs,
            "preprocess": dataclasses.asdict(spec), "checks": checks}


def export(bundle: Path, out_dir: Path, opset: int = OPSET) -> dict:
    from runtime.cascade.engine import Engine
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"--onnx needs onnx and onnxruntime ({e}); pip install 'roadwork-cascade[onnx]'") from e
    engine = Engine.load(bundle, "cpu", "float32", max_batch=max(CHECK_BATCHES), quantize="none", backend="torch")
    try:
        graphs, skipped = graphs_of(engine)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for graph in graphs:
            files.append(export_one(graph, out_dir, opset))
            worst = max(c["max_abs_error"] / c["scale"] for c in files[-1]["checks"])
            log.info("%s: checked at batch %s, max error %.2g of scale", graph.file,
                     "/".join(map(str, CHECK_BATCHES)), worst)
        manifest = {"bundle": str(bundle), "exported": files, "not_exported": skipped}
        (out_dir / "export.json").write_text(json.dumps(manifest, indent=1))
        return manifest
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="bundle directory (cascade.toml) or a classifier directory")
    parser.add_argument("--onnx", type=Path, required=True, metavar="DIR", help="write the ONNX files here")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, >= 17 (default {OPSET})")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset must be >= 17 (LayerNormalization), got {args.opset}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = export(args.bundle, args.onnx, args.opset)
    except (ModelLoadError, RuntimeError) as e:
        log.error("export failed: %s", " ".join(str(e).split()))
        return 1
    for f in manifest["exported"]:
        print(f"{args.onnx / f['file']}: {', '.join(f['outputs'])}")
    for line in manifest["not_exported"]:
        print(f"not exported: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
