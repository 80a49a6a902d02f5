"""The vision path as one object: decoded images in, P(roadwork) per image out.

images -> preprocess kernel into the static batch buffer -> graph runner (backbone -> head) -> results."""
from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from graphs.runner import GraphRunner, default_buckets
from kernels.preprocess import PreprocessSpec, preprocess_into
from runtime.classifier import load_classifier
from runtime.config import read_json
from runtime.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ImageResult:
    prediction: float  # P(roadwork) in [0, 1]
    label: str  # "roadwork" if prediction > 0.5 else "none"
    stage: str  # the stage that decided
    scores: dict[str, float] = field(default_factory=dict)  # each stage's P(roadwork)
    degraded: bool = False  # a later stage failed and an earlier stage's answer stands


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~3x faster than fp32 there, and are slow emulation elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype '{dtype}' is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device '{device}' is not a valid torch device") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device '{device}' is not supported (cpu or cuda[:N])")
    return device


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a decoded image. Decoded arrays are read-only and are never written through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(image))


class Engine:
    """Not safe for concurrent callers: one worker thread calls predict (a lock enforces it)."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype, max_batch: int):
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.classifier = load_classifier(model_dir, dtype, device)
        self.spec = PreprocessSpec.from_preprocessor_config(read_json(model_dir / "preprocessor_config.json"))
        self.runner = GraphRunner(self.classifier, (3, self.spec.height, self.spec.width), dtype, device,
                                  default_buckets(max_batch))
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             max_batch: int = 32) -> Engine:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory '{model_dir}' does not exist")
        if max_batch < 1:
            raise ModelLoadError(f"max_batch must be >= 1, got {max_batch}")
        device = resolve_device(device)
        try:
            return cls(model_dir, device, resolve_dtype(dtype, device), max_batch)
        except ModelLoadError:
            raise
        except ValueError as e:  # config values the preprocessing spec rejects
            raise ModelLoadError(f"{model_dir}: {e}") from e

    def warmup(self) -> None:
        with self.lock:
            self.runner.warmup()

    def predict(self, images: list[np.ndarray]) -> list[ImageResult]:
        """Decoded RGB uint8 images (H, W, 3), any sizes and count; results in the same order."""
        results: list[ImageResult] = []
        with self.lock:
            for start, count in self.runner.chunks(len(images)):
                # Slots past `count` keep stale pixels: rows never interact, so padding needs no clearing.
                for slot in range(count):
                    image = image_tensor(images[start + slot]).to(self.device, non_blocking=True)
                    preprocess_into(self.runner.input, slot, image, self.spec)
                probs, _ = self.runner.run(count)
                results.extend(self.result(p) for p in probs.cpu().tolist())
        return results

    @staticmethod
    def result(p: float) -> ImageResult:
        return ImageResult(prediction=p, label="roadwork" if p > 0.5 else "none", stage="classifier",
                           scores={"classifier": p})

    def describe(self) -> dict:
        labels = self.classifier.labels
        return {
            "model_dir": str(self.model_dir),
            "stages": [{"name": "classifier", "model_type": self.classifier.model_type,
                        "labels": list(labels.names), "roadwork_label": labels.names[labels.roadwork_index]}],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "input_size": [self.spec.height, self.spec.width],
            "batch_buckets": list(self.runner.buckets),
            "cuda_graphs": bool(self.runner.graphs),
        }
