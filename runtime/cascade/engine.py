"""The runtime object a server calls: decoded images in, P(roadwork) per image out.

Engine.load takes a bundle directory (cascade.toml: classifier, then detectors that vote on what the classifier
left undecided, then a VLM for what is still undecided; docs/bundle.md) or a single Hugging Face classifier
directory (a one-stage cascade), and runs it through runtime/cascade/pipeline.py."""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from runtime.cascade.bundle import BUNDLE_FILE, Bundle, load_bundle, with_backend
from runtime.cascade.build import build_cascade
from runtime.cascade.bundle_digest import bundle_digest
from runtime.cascade.classifier_stage import image_tensor
from runtime.cascade.results import Box, ImageResult, OnStage, StageTiming
from runtime.errors import ModelLoadError
from runtime.cascade.vlm_prompt import VLMOutput
from runtime.cascade.vlm_stage import VLMStage
from runtime.cascade import precision
from runtime.cascade.precision import Precision
from runtime.models.precision_cache import PrecisionCache
from runtime.options import default_max_batch

log = logging.getLogger(__name__)

__all__ = ["Box", "Engine", "ImageResult", "VLMOutput", "image_tensor", "resolve_device"]


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

    def __init__(self, resolved: Precision, device: torch.device, max_batch: int):
        bundle = resolved.bundle
        self.model_dir = bundle.root
        self.precision = resolved
        self.bundle = bundle
        self.device = device
        self.dtype = resolved.dtype
        self.max_batch = max_batch
        self.cascade = build_cascade(resolved, stage_devices(bundle, device), max_batch)
        first = self.cascade.first
        self.classifier, self.spec, self.runner = first.model, first.preprocess, first.runner
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             max_batch: int | None = None, quantize: str | None = None, precision_cache: str | Path | None = None,
             backend: str | None = None) -> Engine:
        """`model_dir`: a bundle directory with cascade.toml, or one Hugging Face classifier directory.
        `dtype`: a DTYPES name, "auto" (measured, runtime/models/auto_precision.py) or None (bf16 where the CPU has it).
        `quantize`: a QUANTIZE_MODES name for every classifier and detector, over what cascade.toml says;
        "auto": for those cascade.toml leaves unset; None: unset means "none". See runtime/cascade/precision.py.
        `max_batch`: images per model call; None: the device's default (runtime/options.py).
        `precision_cache`: a JSON file keeping `auto`'s measurements across starts; None: measure every start.
        `backend`: a BACKENDS name for the classifier, over cascade.toml's `backend`; None or "auto": cascade.toml's."""
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise ModelLoadError(f"model directory '{model_dir}' does not exist")
        if not model_dir.is_dir():
            raise ModelLoadError(f"'{model_dir}' is a file; --model takes a directory: a bundle (with cascade.toml) "
                                 f"or a Hugging Face classifier (with config.json)")
        if not (model_dir / BUNDLE_FILE).is_file() and not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"'{model_dir}' has neither {BUNDLE_FILE} (a bundle) nor config.json (a Hugging Face "
                                 f"classifier); --model takes one of those directories, e.g. bundles/default")
        device = resolve_device(device)
        max_batch = default_max_batch(device.type) if max_batch is None else max_batch
        if max_batch < 1:
            raise ModelLoadError(f"max_batch must be >= 1, got {max_batch}")
        try:
            cache = None if precision_cache is None else PrecisionCache(Path(precision_cache))
            bundle = load_bundle(model_dir)
            if backend not in (None, "auto"):
                bundle = with_backend(bundle, backend)
            resolved = precision.resolve(bundle, stage_devices(bundle, device), dtype, quantize, max_batch, cache)
            return cls(resolved, device, max_batch)
        except ModelLoadError:
            raise
        except ValueError as e:  # config values a model or the preprocessing spec rejects
            raise ModelLoadError(f"{model_dir}: {e}") from e

    def warmup(self) -> None:
        with self.lock:
            self.cascade.warmup()

    def predict(self, images: list[np.ndarray], boxes: bool = False, explain: Sequence[bool] | None = None,
                on_stage: OnStage | None = None, auto_explain: bool = True,
                deadline: float | None = None) -> list[ImageResult]:
        """Decoded RGB uint8 images (H, W, 3), any sizes and count; results in the same order.

        `boxes`: also return the roadwork boxes of images the detectors scored. `explain`: per image, have the VLM
        explain it (ignored without a VLM stage). `auto_explain`: also explain the images the bundle's
        explain_above rule names (the server turns it off and explains on the VLM's loop thread instead, so
        decoding never holds the inference worker). `on_stage(index, stage, p, decided)`: called on this thread
        once per image per stage it reached, as soon as the stage answered its chunk and before later stages
        run. `deadline` (time.monotonic()): when the caller stops waiting, the longest VLM scoring may wait
        (without one: runtime/options.py REQUEST_DEADLINE_S)."""
        if explain is not None and len(explain) != len(images):
            raise ValueError(f"explain has {len(explain)} entries for {len(images)} images")
        results: list[ImageResult] = []
        with self.lock:
            for start, count in self.cascade.chunks(len(images)):
                shifted = None if on_stage is None else partial(on_chunk_stage, on_stage, start)
                results.extend(self.cascade.run(images[start:start + count], boxes,
                                                None if explain is None else list(explain[start:start + count]),
                                                shifted, auto_explain, deadline))
        return results

    def explain_stream(self, image: np.ndarray, roadwork: bool, on_output: Callable[[VLMOutput], None]) -> int:
        """Start explaining one decoded image that predict() labelled roadwork (True) or none (False); the
        explanation opens with that answer. Returns the request id. `on_output` is called on the VLM loop thread
        with each VLMOutput (text chunk, ..., the last with finished=True)."""
        return self._vlm().explain_stream(image_tensor(image), roadwork, on_output)

    def cancel(self, request_id: int) -> bool:
        """End an explain_stream request; its KV blocks are free when this returns. False if unknown or done."""
        return self._vlm().cancel(request_id)

    @functools.cached_property
    def content_digest(self) -> str:
        """sha256 (hex) of the bundle as written on disk (runtime/cascade/bundle_digest.py): replicas of one bundle
        agree on it whatever precision each one's `auto` measured, so they share cached answers (auto keeps every
        precision within 0.02 of fp32). Reads every model file once, on first use."""
        return bundle_digest(load_bundle(self.model_dir))

    @property
    def explain_above(self) -> float | None:
        """The bundle's explain_above: results with a higher final P(roadwork) get an explanation; None without a
        VLM stage."""
        return None if self.cascade.vlm is None else self.cascade.vlm.spec.explain_above

    def vlm_stats(self) -> dict | None:
        """KV blocks (total/free/used), cumulative prompt/cached/generated tokens, running/waiting sequences and
        preemptions of the VLM stage; None without one."""
        return None if self.cascade.vlm is None else self.cascade.vlm.stats()

    def close(self) -> None:
        """Stop the VLM loop thread (requests in flight end), then release every stage's graphs once no predict
        runs; idempotent."""
        if self.cascade.vlm is not None:
            self.cascade.vlm.close()  # first: a predict waiting on the VLM ends, and frees the lock
        with self.lock:
            self.cascade.close()

    def _vlm(self) -> VLMStage:
        if self.cascade.vlm is None:
            raise RuntimeError("this bundle has no vlm stage")
        return self.cascade.vlm

    def stage_timings(self) -> dict[str, StageTiming]:
        """Cumulative wall time, calls and images of every stage since load (the first stage's time includes
        preprocessing); a copy, safe to read from any thread."""
        return {name: dataclasses.replace(t) for name, t in self.cascade.timings.items()}

    def member_timings(self) -> dict[str, dict[str, StageTiming]]:
        """Per detectors stage, each member's cumulative time, calls and images since load (a copy)."""
        return {stage.name: {name: dataclasses.replace(t) for name, t in stage.member_timings().items()}
                for stage in self.cascade.later if stage.spec.kind == "detectors"}

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
            "precision": None if self.precision.choice is None else self.precision.choice.describe(),
        }


def on_chunk_stage(on_stage: OnStage, start: int, index: int, stage: str, p: float, decided: bool) -> None:
    """A chunk's image index -> the index in the predict() call."""
    on_stage(start + index, stage, p, decided)


def stage_devices(bundle: Bundle, device: torch.device) -> list[torch.device]:
    """Each stage's device: its cascade.toml `device`, else the engine's."""
    return [device if stage.device is None else stage_device(bundle, stage.name, stage.device)
            for stage in bundle.stages]


def stage_device(bundle: Bundle, stage: str, device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ModelLoadError as e:
        raise ModelLoadError(f"{bundle.root / 'cascade.toml'} stage '{stage}': {e}") from e
