"""The classifier on ONNX Runtime (cascade.toml `backend = "onnxruntime"`, or --backend): the classifier.onnx that
python -m tools.export wrote, pixel_values [B, 3, H, W] -> p_roadwork [B], logits [B, num_labels], called as
runtime/models/classifier.Classifier is (P(roadwork) fp32 and the logits, on the stage's device).

The pixels stay ours: the stage preprocesses with its kernel from the model directory's preprocessor_config.json,
and the export.json beside the file must record that same spec; a graph made for other pixels is refused at load.
Labels come from the model directory's config.json, as for the torch backend.

Sessions run with all graph optimizations. On CPU: the CPU execution provider with torch's intra-op thread count.
On CUDA: the TensorRT and CUDA execution providers this onnxruntime build has (onnx_detector.session_providers;
TensorRT with one optimization profile over batch 1..max_batch), the CPU's otherwise, with a warning. Pixels and
outputs pass through host memory, so no CUDA graph is captured.
onnxruntime is an optional dependency (the `onnx` extra), imported only when this backend loads."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kernels.preprocess import PreprocessSpec
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.models.classifier import Labels
from runtime.models.onnx_detector import EXTRA, session_providers

log = logging.getLogger(__name__)

MANIFEST = "export.json"
INPUT, OUTPUTS = "pixel_values", ("p_roadwork", "logits")
TENSORRT = "TensorrtExecutionProvider"
ACCELERATED = (TENSORRT, "CUDAExecutionProvider")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelLoadError(f"backend 'onnxruntime' needs the onnxruntime package ({e}); {EXTRA}") from e
    return onnxruntime


def export_entry(path: Path) -> dict:
    """The file's entry in the export.json tools.export wrote beside it."""
    manifest = path.parent / MANIFEST
    try:
        exported = json.loads(manifest.read_text())["exported"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: needs the {MANIFEST} python -m tools.export wrote beside it, with its "
                             f"preprocessing; {manifest} cannot be read ({type(e).__name__}: {e})") from e
    entry = next((f for f in exported if isinstance(f, dict) and f.get("file") == path.name), None)
    if entry is None or not isinstance(entry.get("preprocess"), dict):
        raise ModelLoadError(f"{path}: {manifest} has no entry for '{path.name}' with its preprocessing")
    return entry


def check_preprocess(path: Path, entry: dict, spec: PreprocessSpec, model_dir: Path) -> None:
    """The graph was exported for the pixels the stage makes from the model directory's preprocessor_config.json."""
    ours = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples as JSON lists, as export.json has them
    theirs = entry["preprocess"]
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise ModelLoadError(f"{path}: exported for other pixels than {model_dir / 'preprocessor_config.json'} "
                             f"makes ({path.parent / MANIFEST}: {detail}); export this classifier again")


def providers_for(device: torch.device, available: list[str], preprocess: PreprocessSpec, max_batch: int) -> list:
    """session_providers, TensorRT's with an explicit profile for every batch the stage runs: without one it builds
    its engine again for each batch shape outside those it has seen (warmup runs every bucket)."""
    shape = f"3x{preprocess.height}x{preprocess.width}"
    profile = {"trt_profile_min_shapes": f"{INPUT}:1x{shape}", "trt_profile_opt_shapes": f"{INPUT}:{max_batch}x{shape}",
               "trt_profile_max_shapes": f"{INPUT}:{max_batch}x{shape}"}
    return [(p[0], {**p[1], **profile}) if isinstance(p, tuple) and p[0] == TENSORRT else p
            for p in session_providers(device, available)]


class OnnxClassifier:
    """Called like Classifier: pixel_values [B, 3, H, W] -> (P(roadwork) [B] fp32, logits [B, num_labels])."""
    backend = "onnxruntime"

    def __init__(self, session, model_type: str, labels: Labels, device: torch.device):
        self.session, self.model_type, self.labels, self.device = session, model_type, labels, device

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @classmethod
    def load(cls, path: Path, model_dir: Path, preprocess: PreprocessSpec, device: torch.device, max_batch: int
             ) -> OnnxClassifier:
        ort = import_onnxruntime()
        path, model_dir, device = Path(path), Path(model_dir), torch.device(device)
        check_preprocess(path, export_entry(path), preprocess, model_dir)
        config = model_dir / "config.json"
        cfg = read_json(config)
        labels = Labels.from_config(cfg, str(config))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        available = ort.get_available_providers()
        try:
            session = ort.InferenceSession(str(path), sess_options=options,
                                           providers=providers_for(device, available, preprocess, max_batch))
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {' '.join(str(e).split())}") from e
        if device.type == "cuda" and not set(ACCELERATED) & set(session.get_providers()):
            log.warning("%s: this onnxruntime build runs no CUDA or TensorRT execution provider (it has %s); the "
                        "classifier runs on the CPU execution provider", path, available)
        check_signature(session, path, preprocess, len(labels.names))
        log.info("%s: classifier on onnxruntime %s, providers %s, %d intra-op threads", path, ort.__version__,
                 session.get_providers(), options.intra_op_num_threads)
        return cls(session, cfg.get("model_type"), labels, device)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        prob, logits = self.session.run(list(OUTPUTS), {INPUT: images})
        return (torch.from_numpy(np.ascontiguousarray(prob, np.float32)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(logits, np.float32)).to(self.device))


def check_signature(session, path: Path, preprocess: PreprocessSpec, num_labels: int) -> None:
    """One float pixel_values input at the preprocessing's size; p_roadwork and logits over the config's labels."""
    inputs, outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    want = [3, preprocess.height, preprocess.width]
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(float)" or \
            list(inputs[0].shape[1:]) != want:
        raise ModelLoadError(f"{path}: a classifier graph takes one float input '{INPUT}' [batch, {want[0]}, "
                             f"{want[1]}, {want[2]}], this takes {[(i.name, i.type, i.shape) for i in inputs]}")
    missing = [name for name in OUTPUTS if name not in outputs]
    if missing:
        raise ModelLoadError(f"{path}: no output {missing} (outputs: {list(outputs)}); python -m tools.export "
                             f"writes {', '.join(OUTPUTS)}")
    labels = outputs["logits"].shape[-1]
    if labels != num_labels:
        raise ModelLoadError(f"{path}: output 'logits' has {labels} labels, the classifier's config.json "
                             f"{num_labels}")
