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

from runtime.cascade.bundle import (BUNDLE_FILE, Bundle, load_bundle, quantize_settings,
                                    resolved_quantize, with_quantize, with_unset_quantize)
from runtime.cascade.build import build_cascade
from runtime.cascade.bundle_digest import bundle_digest
from runtime.cascade.classifier_stage import image_tensor
from runtime.cascade.results import Box, ImageResult, OnStage, StageTiming
from runtime.errors import ModelLoadError
from runtime.cascade.vlm_stage import VLMOutput, VLMStage
from runtime.models import precision
from runtime.models.precision import Candidate, PrecisionChoice
from runtime.models.precision_cache import PrecisionCache
from runtime.models.preprocessor import read_preprocess

log = logging.getLogger(__name__)

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


CHOICES: dict[tuple, PrecisionChoice] = {}  # one measurement per model and setting per process (tests load often)


def settle_precision(bundle: Bundle, device: torch.device, dtype: str | torch.dtype | None, quantize: str | None,
                     max_batch: int, cache: PrecisionCache | None = None
                     ) -> tuple[Bundle, torch.dtype, PrecisionChoice | None]:
    """(bundle with quantize resolved for Cascade, dtype, the measurement or None) for Engine.load's settings.

    dtype "auto" / any model's quantize "auto" (the server's defaults; quantize "auto" fills the models that
    cascade.toml leaves unset): the first stage's classifier is measured (runtime/models/precision.py) and the
    choice applies to the engine's dtype and every "auto" model. An explicit non-fp32 setting is measured against
    fp32 for a warning. dtype None / quantize None: the library defaults (the device's dtype, unset = "none").
    `cache`: where measurements persist across starts (runtime/models/precision_cache.py); None: measured here."""
    if quantize == "auto" or quantize is None:
        bundle = with_unset_quantize(bundle, quantize or "none")
    else:
        bundle = with_quantize(bundle, quantize)
    first = bundle.stages[0]
    assert first.kind == "classifier"
    quantize_auto = "auto" in quantize_settings(bundle)
    dtype_auto = dtype == "auto"
    fixed_dtype = None if dtype_auto else resolve_dtype(dtype, device)
    if device.type != "cpu":
        chosen = Candidate(resolve_dtype(None, device) if dtype_auto else fixed_dtype, "none")
        choice = PrecisionChoice(chosen, "cuda default") if dtype_auto or quantize_auto else None
    else:
        fixed_quantize = None if quantize_auto else first.quantize
        explicit = Candidate(fixed_dtype, fixed_quantize) if not (dtype_auto or quantize_auto) else None
        if explicit is not None and (dtype is None or explicit == precision.FP32):
            choice = None  # the library default or plain fp32: nothing to choose or warn about
        else:
            config = first.model / "config.json"
            key = (str(first.model.resolve()), config.stat().st_mtime_ns, max_batch, fixed_dtype, fixed_quantize,
                   None if cache is None else str(cache.path))
            if key not in CHOICES:
                CHOICES[key] = precision.choose_cached(first.model, device, read_preprocess(first.model), max_batch,
                                                       fixed_dtype, fixed_quantize, cache)
            choice = CHOICES[key]
            if explicit is None:
                log.info("precision auto chose %s for this engine", choice.candidate.name)
        chosen = choice.candidate if choice is not None else Candidate(fixed_dtype, first.quantize)
    return resolved_quantize(bundle, chosen.quantize), chosen.dtype if dtype_auto else fixed_dtype, choice


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

    def __init__(self, bundle: Bundle, device: torch.device, dtype: torch.dtype, max_batch: int,
                 precision: PrecisionChoice | None = None):
        self.model_dir = bundle.root
        self.precision = precision
        self.bundle = bundle
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        devices = [device if stage.device is None else stage_device(bundle, stage.name, stage.device)
                   for stage in bundle.stages]
        self.cascade = build_cascade(bundle, devices, dtype, max_batch, precision)
        first = self.cascade.first
        self.classifier, self.spec, self.runner = first.model, first.preprocess, first.runner
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             max_batch: int = 32, quantize: str | None = None, precision_cache: str | Path | None = None) -> Engine:
        """`model_dir`: a bundle directory with cascade.toml, or one Hugging Face classifier directory.
        `dtype`: a DTYPES name, "auto" (measured, runtime/models/precision.py) or None (bf16 where the CPU has it).
        `quantize`: a bundle QUANTIZE_MODES name for every classifier and detector, over what cascade.toml says;
        "auto": for those cascade.toml leaves unset; None: unset means "none". See settle_precision.
        `precision_cache`: a JSON file keeping `auto`'s measurements across starts; None: measure every start."""
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise ModelLoadError(f"model directory '{model_dir}' does not exist")
        if not model_dir.is_dir():
            raise ModelLoadError(f"'{model_dir}' is a file; --model takes a directory: a bundle (with cascade.toml) "
                                 f"or a Hugging Face classifier (with config.json)")
        if not (model_dir / BUNDLE_FILE).is_file() and not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"'{model_dir}' has neither {BUNDLE_FILE} (a bundle) nor config.json (a Hugging Face "
                                 f"classifier); --model takes one of those directories, e.g. bundles/default")
        if max_batch < 1:
            raise ModelLoadError(f"max_batch must be >= 1, got {max_batch}")
        device = resolve_device(device)
        try:
            cache = None if precision_cache is None else PrecisionCache(Path(precision_cache))
            bundle, dtype, choice = settle_precision(load_bundle(model_dir), device, dtype, quantize, max_batch,
                                                     cache)
            return cls(bundle, device, dtype, max_batch, choice)
        except ModelLoadError:
            raise
        except ValueError as e:  # config values a model or the preprocessing spec rejects
            raise ModelLoadError(f"{model_dir}: {e}") from e

    def warmup(self) -> None:
        with self.lock:
            self.cascade.warmup()

    def predict(self, images: list[np.ndarray], boxes: bool = False, explain: Sequence[bool] | None = None,
                on_stage: OnStage | None = None, auto_explain: bool = True) -> list[ImageResult]:
        """Decoded RGB uint8 images (H, W, 3), any sizes and count; results in the same order.

        `boxes`: also return the roadwork boxes of images the detectors scored. `explain`: per image, have the VLM
        explain it (ignored without a VLM stage). `auto_explain`: also explain the images the bundle's
        explain_above rule names (the server turns it off and explains on the VLM's loop thread instead, so
        decoding never holds the inference worker). `on_stage(index, stage, p, decided)`: called on this thread
        once per image per stage it reached, as soon as the stage answered its chunk and before later stages
        run."""
        if explain is not None and len(explain) != len(images):
            raise ValueError(f"explain has {len(explain)} entries for {len(images)} images")
        results: list[ImageResult] = []
        with self.lock:
            for start, count in self.cascade.chunks(len(images)):
                shifted = None if on_stage is None else partial(on_chunk_stage, on_stage, start)
                results.extend(self.cascade.run(images[start:start + count], boxes,
                                                None if explain is None else list(explain[start:start + count]),
                                                shifted, auto_explain))
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
            "precision": None if self.precision is None else self.precision.describe(),
        }


def on_chunk_stage(on_stage: OnStage, start: int, index: int, stage: str, p: float, decided: bool) -> None:
    """A chunk's image index -> the index in the predict() call."""
    on_stage(start + index, stage, p, decided)


def stage_device(bundle: Bundle, stage: str, device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ModelLoadError as e:
        raise ModelLoadError(f"{bundle.root / 'cascade.toml'} stage '{stage}': {e}") from e
