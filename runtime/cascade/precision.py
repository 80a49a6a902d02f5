"""The engine's precision, resolved once before any stage is built.

The walk: --dtype/--quantize (names in runtime/options.py, checked by runtime/cascade/settings.py) ->
Engine.load -> resolve() here -> a Precision -> build.py. resolve() asks runtime/models/auto_precision.py to
measure when a setting is "auto". In the Precision it returns each field has one meaning: the engine's torch dtype,
and the bundle with every classifier's and detector's quantize either "none" or an int8 backend name, and every VLM
stage's dtype a torch dtype name (vlm_run_dtype)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from runtime.cascade.bundle import Bundle, VLMStageSpec, map_quantize, quantize_mode, quantize_settings
from runtime.cascade.vlm_memory import read_config
from runtime.errors import ModelLoadError
from runtime.models import auto_precision
from runtime.models.auto_precision import Candidate, PrecisionChoice
from runtime.models.precision_cache import PrecisionCache
from runtime.models.preprocessor import read_preprocess
from runtime.models.qwen3_vl_text import TextConfig
from runtime.options import DTYPES

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
CHOICES: dict[tuple, PrecisionChoice] = {}  # one measurement per model and setting per process (tests load often)
VLM_DTYPE_BUDGET_S = 0.1  # timing rounds of fp32 and bf16 at the VLM's decode products, when its dtype is auto


@dataclass(frozen=True)
class Precision:
    bundle: Bundle  # every classifier's and detector's quantize: "none" or an INT8_BACKENDS name; every VLM's dtype
    # a DTYPES name (vlm_run_dtype)
    dtype: torch.dtype  # the classifier's and detectors'
    choice: PrecisionChoice | None = None  # the measurement behind it; None: nothing was measured


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~3x faster than fp32 there, and are slow emulation elsewhere."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A DTYPES name or torch dtype as given; None: the device's fast one (bf16 where the CPU has it)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype '{dtype}' is not supported (choose from {', '.join(DTYPES)})")
    return getattr(torch, dtype)


def with_quantize(bundle: Bundle, mode: str) -> Bundle:
    """The bundle with every classifier and detector set to `mode` (QUANTIZE_MODES): a command-line override."""
    value = quantize_mode(mode, "quantize")
    return map_quantize(bundle, lambda _: value)


def with_unset_quantize(bundle: Bundle, mode: str) -> Bundle:
    """The models whose cascade.toml entry has no quantize key set to `mode`; the others keep theirs."""
    value = quantize_mode(mode, "quantize")
    return map_quantize(bundle, lambda q: value if q is None else q)


def resolve(bundle: Bundle, devices: list[torch.device], dtype: str | torch.dtype | None, quantize: str | None,
            max_batch: int, cache: PrecisionCache | None = None) -> Precision:
    """Engine.load's settings as one Precision; `devices`: each stage's, the engine's first.

    dtype "auto" / any model's quantize "auto" (the server's defaults; quantize "auto" fills the models that
    cascade.toml leaves unset): the first stage's classifier is measured (runtime/models/auto_precision.py) and the
    choice applies to the engine's dtype and every "auto" model. An explicit non-fp32 setting is measured against
    fp32 for a warning. dtype None / quantize None: the library defaults (the device's dtype, unset = "none").
    `cache`: where measurements persist across starts (runtime/models/precision_cache.py); None: measured here."""
    if quantize == "auto" or quantize is None:
        bundle = with_unset_quantize(bundle, quantize or "none")
    else:
        bundle = with_quantize(bundle, quantize)
    first, device = bundle.stages[0], devices[0]
    assert first.kind == "classifier" and len(devices) == len(bundle.stages)
    quantize_auto = "auto" in quantize_settings(bundle)
    dtype_auto = dtype == "auto"
    fixed_dtype = None if dtype_auto else resolve_dtype(dtype, device)
    if device.type != "cpu":
        chosen = Candidate(resolve_dtype(None, device) if dtype_auto else fixed_dtype, "none")
        choice = PrecisionChoice(chosen, "cuda default") if dtype_auto or quantize_auto else None
    else:
        fixed_quantize = None if quantize_auto else first.quantize
        explicit = Candidate(fixed_dtype, fixed_quantize) if not (dtype_auto or quantize_auto) else None
        if explicit is not None and (dtype is None or explicit == auto_precision.FP32):
            choice = None  # the library default or plain fp32: nothing to choose or warn about
        else:
            config = first.model / "config.json"
            key = (str(first.model.resolve()), config.stat().st_mtime_ns, max_batch, fixed_dtype, fixed_quantize,
                   None if cache is None else str(cache.path))
            if key not in CHOICES:
                CHOICES[key] = auto_precision.choose_cached(first.model, device, read_preprocess(first.model),
                                                            max_batch, fixed_dtype, fixed_quantize, cache)
            choice = CHOICES[key]
            if explicit is None:
                log.info("precision auto chose %s for this engine", choice.candidate.name)
        chosen = choice.candidate if choice is not None else Candidate(fixed_dtype, first.quantize)
    engine_dtype = chosen.dtype if dtype_auto else fixed_dtype
    stages = tuple(replace(stage, dtype=auto_precision.dtype_name(vlm_run_dtype(
        stage, bundle.where(i), devices[i], engine_dtype, choice))) if stage.kind == "vlm" else stage
        for i, stage in enumerate(bundle.stages))
    resolved = map_quantize(replace(bundle, stages=stages), lambda q: chosen.quantize if q == "auto" else q)
    return Precision(resolved, engine_dtype, choice)


def vlm_run_dtype(spec: VLMStageSpec, where: str, device: torch.device, engine_dtype: torch.dtype,
                  choice: PrecisionChoice | None) -> torch.dtype:
    """The VLM's dtype: cascade.toml's `dtype`, or for "auto" the engine's dtype, except where that came from
    precision auto on a CPU: then bf16 if it measures faster than fp32 at the VLM's own decode products (its text
    layers at max_num_seqs rows). The classifier's choice can be fp32 for an int8 kernel, for its drift or for its
    narrow shapes, while a VLM is published in bf16 and decodes ~1.6x faster in it where bf16 is native
    (BENCHMARKS.md section 8)."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)  # a torch dtype name (bundle.py checked it)
    if device.type != "cpu" or choice is None or choice.how != "auto" or engine_dtype == torch.bfloat16:
        return engine_dtype
    bf16 = Candidate(torch.bfloat16)
    speeds = auto_precision.measure_speed([auto_precision.FP32, bf16], decode_linears(read_config(spec, where).text),
                                          spec.max_num_seqs, VLM_DTYPE_BUDGET_S)
    speedup = None if speeds[bf16] is None else speeds[auto_precision.FP32] / speeds[bf16]
    chosen = torch.bfloat16 if speedup is not None and speedup >= auto_precision.MIN_SPEEDUP else engine_dtype
    log.info("%s: the VLM runs in %s (bf16 %s fp32 at its decode products)", where, chosen,
             f"over {auto_precision.PROBE_SLOWER:g}x slower than" if speedup is None else f"x{speedup:.2f}")
    return chosen


def decode_linears(text: TextConfig) -> list[tuple[nn.Linear, int]]:
    """The text model's Linear layers (random weights), one per kind, with how many of them one decode step runs."""
    h, q, kv = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    i, n = text.intermediate_size, text.num_layers
    return [(nn.Linear(k, out, bias=False), count)
            for k, out, count in ((h, q, n), (h, kv, 2 * n), (q, h, n), (h, i, 2 * n), (i, h, n))]
