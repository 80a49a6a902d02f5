"""The runtime object a server calls: decoded images in, P(roadwork) per image out.

Engine.load takes a bundle directory (cascade.toml: classifier, then detectors that vote on what the classifier
left undecided, then a VLM for what is still undecided; docs/bundle.md) or a single Hugging Face classifier
directory (a one-stage cascade), and runs it through runtime/cascade/pipeline.py."""
from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from runtime.cascade.bundle import Bundle, load_bundle, with_quantize
from runtime.cascade.build import build_cascade
from runtime.cascade.classifier_stage import image_tensor
from runtime.cascade.results import Box, ImageResult, OnStage
from runtime.errors import ModelLoadError
from runtime.cascade.vlm_stage import VLMOutput, VLMStage

__all__ = ["Box", "Engine", "ImageResult", "VLMOutput", "cpu_has_bf16", "image_tensor", "resolve_device",
           "resolve_dtype"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~3x faster than fp32 there, and are slow emulation elsewhere."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
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
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must compare equal across stages
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Engine:
    """One worker thread calls predict (a lock enforces it). explain_stream, cancel and vlm_stats may be called from
    any thread: they go through the VLM stage's loop thread. close() stops that thread."""

    def __init__(self, bundle: Bundle, device: torch.device, dtype: torch.dtype, max_batch: int):
        self.model_dir = bundle.root
        self.bundle = bundle
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        devices = [device if stage.device is None else stage_device(bundle, stage.name, stage.device)
                   for stage in bundle.stages]
        self.cascade = build_cascade(bundle, devices, dtype, max_batch)
        first = self.cascade.first
        self.classifier, self.spec, self.runner = first.model, first.preprocess, first.runner
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             max_batch: int = 32, quantize: str | None = None) -> Engine:
        """`model_dir`: a bundle directory with cascade.toml, or one Hugging Face classifier directory.
        `quantize`: "int8" or "none" for every classifier and detector, over what cascade.toml says."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory '{model_dir}' does not exist")
        if max_batch < 1:
            raise ModelLoadError(f"max_batch must be >= 1, got {max_batch}")
        device = resolve_device(device)
        try:
            bundle = load_bundle(model_dir)
            if quantize is not None:
                bundle = with_quantize(bundle, quantize)
            return cls(bundle, device, resolve_dtype(dtype, device), max_batch)
        except ModelLoadError:
            raise
        except ValueError as e:  # config values a model or the preprocessing spec rejects
            raise ModelLoadError(f"{model_dir}: {e}") from e

    def warmup(self) -> None:
        with self.lock:
            self.cascade.warmup()

    def predict(self, images: list[np.ndarray], boxes: bool = False, explain: Sequence[bool] | None = None,
                on_stage: OnStage | None = None) -> list[ImageResult]:
        """Decoded RGB uint8 images (H, W, 3), any sizes and count; results in the same order.

        `boxes`: also return the roadwork boxes of images the detectors scored. `explain`: per image, have the VLM
        explain it (besides the bundle's explain_above rule; ignored without a VLM stage). `on_stage(index, stage,
        p, decided)`: called on this thread once per image per stage it reached, as soon as the stage answered
        its chunk and before later stages run."""
        if explain is not None and len(explain) != len(images):
            raise ValueError(f"explain has {len(explain)} entries for {len(images)} images")
        results: list[ImageResult] = []
        with self.lock:
            for start, count in self.cascade.chunks(len(images)):
                shifted = None if on_stage is None else partial(on_chunk_stage, on_stage, start)
                results.extend(self.cascade.run(images[start:start + count], boxes,
                                                None if explain is None else list(explain[start:start + count]),
                                                shifted))
        return results

    def explain_stream(self, image: np.ndarray, on_output: Callable[[VLMOutput], None]) -> int:
        """Start explaining one decoded image; returns the request id. `on_output` is called on the VLM loop
        thread with each VLMOutput (text chunk, ..., the last with finished=True)."""
        return self._vlm().explain_stream(image_tensor(image), on_output)

    def cancel(self, request_id: int) -> bool:
        """End an explain_stream request; its KV blocks are free when this returns. False if unknown or done."""
        return self._vlm().cancel(request_id)

    def vlm_stats(self) -> dict | None:
        """KV blocks (total/free/used), cumulative prompt/cached/generated tokens, running/waiting sequences and
        preemptions of the VLM stage; None without one."""
        return None if self.cascade.vlm is None else self.cascade.vlm.stats()

    def close(self) -> None:
        """Stop the VLM loop thread (requests in flight end); idempotent."""
        self.cascade.close()

    def _vlm(self) -> VLMStage:
        if self.cascade.vlm is None:
            raise RuntimeError("this bundle has no vlm stage")
        return self.cascade.vlm

    def stage_states(self) -> dict[str, str]:
        """Breaker state ("closed", "open", "half_open") of every stage after the first."""
        return self.cascade.stage_states()

    def describe(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "bundle": self.bundle.from_toml,
            "stages": self.cascade.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "input_size": [self.spec.height, self.spec.width],
            "batch_buckets": list(self.runner.buckets),
            "cuda_graphs": bool(self.runner.graphs),
        }


def on_chunk_stage(on_stage: OnStage, start: int, index: int, stage: str, p: float, decided: bool) -> None:
    """A chunk's image index -> the index in the predict() call."""
    on_stage(start + index, stage, p, decided)


def stage_device(bundle: Bundle, stage: str, device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ModelLoadError as e:
        raise ModelLoadError(f"{bundle.root / 'cascade.toml'} stage '{stage}': {e}") from e
