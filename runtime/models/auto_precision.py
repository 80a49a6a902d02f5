"""Precision `auto`: at startup, the fastest (dtype, int8 kernel) that stays accurate on this CPU.

CPUs differ by two orders of magnitude on the same path: bf16 matmuls are 2-3x fp32 with AVX-512 BF16 and ~100x
slower without it; torch._int_mm is fast with VNNI and ~70x slower than fp32 on AVX2 (issue 14). So nothing is
assumed from CPU flags; each candidate is measured:

1. speed: the model's own Linear layers, one per distinct shape weighted by how many share it, on random
   activations of min(max_batch x tokens, MAX_ROWS) rows. A probe at PROBE_ROWS drops candidates more than
   PROBE_SLOWER x slower than fp32 there without running them at full size (bf16 without native support would
   take seconds per call). The rest run in interleaved rounds for about SPEED_BUDGET_S; each keeps its best round
   (the least disturbed by other processes). A candidate over DROP_SLOWER x slower than fp32 in its first
   timed full-size call (after one untimed call that creates its kernels), or in a round, runs no more.
2. accuracy: from the fastest down, only candidates faster than fp32 by MIN_SPEEDUP: the first stage's model,
   loaded once in fp32 and cast and quantized in memory as a load in the candidate's precision would be, scores
   a fixed calibration set (CALIBRATION_IMAGES synthetic street images, seeded) in CALIBRATION_CHUNKS; it passes
   when max |P - P_fp32| <= CHOOSE_DRIFT and no decision (P > 0.5) flips. CHOOSE_DRIFT is half the bound the
   choice promises (MAX_DRIFT): a maximum over a few images understates the maximum over the images served
   (issue 27 measured 0.0075 on 4 calibration images against 0.035 on 64 others), and a candidate measured near
   the bound would pass on one start and fail on the next. The maximum only grows, so a candidate is rejected at
   the first chunk that fails, and fp32's reference is computed only as far as some candidate gets.
The first that passes is chosen, else fp32: `auto` is never slower than fp32 at the measured shapes.
With a PrecisionCache (runtime/models/precision_cache.py; the server keeps one by default) the measurement is made
once per model, machine and library versions, and later starts read it: the same choice every start, in
milliseconds. A first measurement over STARTUP_BUDGET_S is logged as a warning.

An explicit setting is kept; it is measured against fp32 (speed only) and a warning is logged when slower.
On CUDA `auto` is the engine's previous default (bf16 where supported, else fp16; no int8): not measured here.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from kernels.preprocess import PreprocessSpec, preprocess_into
from runtime.models import precision_cache
from runtime.models.precision_cache import PrecisionCache
from runtime.models.int8_dynamic import Int8Linear, PackedInt8Linear, backend_available, quantize_int8
from runtime.options import INT8_BACKENDS

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_ROWS = 512  # GEMM rows measured: enough for the kernels' steady rate, few enough for many rounds
PROBE_ROWS = 8
PROBE_SLOWER = 4.0
DROP_SLOWER = 2.0  # at full size: a candidate this much slower than fp32 is timed no further
MIN_SPEEDUP = 1.05  # timing noise margin: a candidate must beat fp32 by this much to be considered
MAX_DRIFT = 0.02  # what a chosen candidate promises: max |P - P_fp32| on images it was not calibrated on
CHOOSE_DRIFT = MAX_DRIFT / 2  # what it must show on the calibration images
CALIBRATION_IMAGES = 16
CALIBRATION_CHUNKS = (1, 3, 12)  # images per step of the drift check: most rejections cost one image
MAX_ROUNDS = 20
SPEED_BUDGET_S = 0.2
STARTUP_BUDGET_S = 10.0  # a longer first measurement is logged as a warning
# Changes whenever the rules above do, so a cached choice is one these rules would make.
MEASUREMENT = (f"drift<={CHOOSE_DRIFT} on {CALIBRATION_IMAGES} images, speedup>={MIN_SPEEDUP} at <={MAX_ROWS} rows, "
               "kernels created untimed")


@dataclass(frozen=True)
class Candidate:
    dtype: torch.dtype
    quantize: str = "none"  # "none" or a runtime.options.INT8_BACKENDS name

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype] + ("" if self.quantize == "none" else f"+{self.quantize}")


FP32 = Candidate(torch.float32)
LoadModel = Callable[[Candidate], nn.Module]


@dataclass
class Trial:
    candidate: Candidate
    seconds: float | None = None  # best time of the model's GEMMs once at the measured rows; None: not timed
    speedup: float | None = None  # fp32 seconds / seconds
    max_drift: float | None = None  # max |P - P_fp32| on the calibration set; None: not checked
    flips: int | None = None  # calibration decisions that differ from fp32's
    verdict: str = ""

    def describe(self) -> dict:
        return {"candidate": self.candidate.name, "gemm_ms": None if self.seconds is None else self.seconds * 1e3,
                "speedup_vs_fp32": self.speedup, "max_drift": self.max_drift, "flips": self.flips,
                "verdict": self.verdict}


@dataclass
class PrecisionChoice:
    candidate: Candidate
    how: str  # "auto", "explicit" or "cuda default"
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0  # time the measurement took (a cached choice: the time to read it)
    rows: int = 0
    cached_at: str | None = None  # when the measurement read from the cache was made; None: measured now

    def trial(self, candidate: Candidate) -> Trial | None:
        return next((t for t in self.trials if t.candidate == candidate), None)

    def describe(self) -> dict:
        chosen = self.trial(self.candidate)
        return {"chosen": self.candidate.name, "dtype": str(self.candidate.dtype).removeprefix("torch."),
                "quantize": self.candidate.quantize, "how": self.how,
                "speedup_vs_fp32": None if chosen is None else chosen.speedup,
                "max_drift": None if chosen is None else chosen.max_drift,
                "measured_rows": self.rows, "measure_seconds": round(self.seconds, 3), "cached_at": self.cached_at,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "trials": [t.describe() for t in self.trials]}


def candidates_for(dtype: torch.dtype | None, quantize: str | None) -> list[Candidate]:
    """What `auto` chooses among; None = auto. int8 kernels are paired with fp32 when the dtype is auto (the
    fbgemm/oneDNN kernels compute in fp32; the rest of the model then needs no casts)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if dtype is None else [dtype]
    backends = [b for b in INT8_BACKENDS if backend_available(b)]
    modes = ["none", *backends] if quantize is None else [quantize]
    out = [Candidate(d, m) for d in dtypes for m in modes if m == "none" or dtype is not None or d == torch.float32]
    return out


def distinct_linears(model: nn.Module, exclude: tuple[str, ...] = ("classifier",)) -> list[tuple[nn.Linear, int]]:
    """One Linear layer per distinct (in, out) shape that quantize_int8 would convert, with how many share it."""
    layers: dict[tuple[int, int], list] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith(exclude):
            layers.setdefault((module.in_features, module.out_features), [module, 0])[1] += 1
    return [(layer, count) for layer, count in layers.values()]


class GemmSet:
    """The model's Linear shapes in a candidate's precision; run(rows) times each layer once at that many rows,
    weighted by its count."""

    def __init__(self, candidate: Candidate, linears: Sequence[tuple[nn.Linear, int]], rows: Sequence[int]):
        g = torch.Generator().manual_seed(1)
        self.layers = []
        for linear, count in linears:
            layer = copy.deepcopy(linear).to(candidate.dtype)
            if candidate.quantize == "int8":
                layer = Int8Linear(layer)
            elif candidate.quantize != "none":
                layer = PackedInt8Linear(layer, candidate.quantize)
            inputs = {r: torch.randn(r, linear.in_features, generator=g).to(candidate.dtype) for r in rows}
            self.layers.append((layer, inputs, count))

    @torch.inference_mode()
    def run(self, rows: int) -> float:
        total = 0.0
        for layer, inputs, count in self.layers:
            t0 = time.perf_counter()
            layer(inputs[rows])
            total += (time.perf_counter() - t0) * count
        return total


def measure_speed(candidates: Sequence[Candidate], linears: Sequence[tuple[nn.Linear, int]], rows: int,
                  budget_s: float) -> dict[Candidate, float | None]:
    """Best seconds per candidate for the model's Linear layers once (distinct_linears: a layer per shape and its
    count; None: dropped as too slow); FP32 must be listed."""
    assert FP32 in candidates
    probe_rows = min(rows, PROBE_ROWS)
    sets = {c: GemmSet(c, linears, sorted({probe_rows, rows})) for c in candidates}
    probe = {}
    for c, gemms in sets.items():
        gemms.run(probe_rows)  # first call: kernel selection, primitive creation
        probe[c] = min(gemms.run(probe_rows), gemms.run(probe_rows))
    sets = {c: g for c, g in sets.items() if c == FP32 or probe[c] <= PROBE_SLOWER * probe[FP32]}
    for gemms in sets.values():
        # The first call at a new size creates its kernels (oneDNN JIT-compiles bf16/AMX ones: hundreds of ms,
        # measured on a Xeon with AMX), which must not drop a candidate that is faster once they exist.
        gemms.run(rows)
    best: dict[Candidate, float | None] = {c: None for c in candidates}
    best.update({c: gemms.run(rows) for c, gemms in sets.items()})  # the first timed call, replaced below
    start = time.perf_counter()
    for round_ in range(MAX_ROUNDS):
        # a candidate this much slower than fp32 cannot be chosen: the rounds go to the rest
        sets = {c: g for c, g in sets.items() if c == FP32 or best[c] <= DROP_SLOWER * best[FP32]}
        for c, gemms in sets.items():
            t = gemms.run(rows)
            best[c] = t if round_ == 0 else min(best[c], t)
        if round_ >= 1 and time.perf_counter() - start >= budget_s:
            break
    return best


def calibration_images(n: int = CALIBRATION_IMAGES, size: int = 224, seed: int = 14) -> list[np.ndarray]:
    """Fixed synthetic street-like images: sky-to-road gradient, coloured boxes (cones, signs, cars), noise."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    images = []
    for _ in range(n):
        sky, road = rng.uniform(120, 230, 3), rng.uniform(40, 120, 3)
        image = (sky * (1 - rows) + road * rows) * np.ones((1, size, 1))
        for _ in range(rng.integers(2, 8)):
            h, w = rng.integers(8, size // 3, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            image[y:y + h, x:x + w] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


@torch.inference_mode()
def probabilities(model: nn.Module, preprocess: PreprocessSpec, images: Sequence[np.ndarray],
                  dtype: torch.dtype) -> torch.Tensor:
    """P(roadwork) of a Classifier (runtime/models/classifier.py) for decoded images, in float32."""
    batch = torch.zeros(len(images), 3, preprocess.height, preprocess.width, dtype=dtype)
    for slot, image in enumerate(images):
        preprocess_into(batch, slot, torch.from_numpy(image), preprocess)
    p, _ = model(batch)
    return p.float()


def drift(reference: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """(max |P - P_fp32|, decisions that flip at 0.5)."""
    return float((p - reference).abs().max()), int(((p > 0.5) != (reference > 0.5)).sum())


class Calibration:
    """The drift check of `pick`: candidates score the calibration images in CALIBRATION_CHUNKS against fp32's
    probabilities, computed once per chunk and only when some candidate reaches it."""

    def __init__(self, load: LoadModel, preprocess: PreprocessSpec, reference_model: nn.Module):
        self.load, self.preprocess, self.reference_model = load, preprocess, reference_model
        images = calibration_images()
        assert sum(CALIBRATION_CHUNKS) == len(images)
        ends = np.cumsum(CALIBRATION_CHUNKS)
        self.chunks = [images[end - size:end] for size, end in zip(CALIBRATION_CHUNKS, ends)]
        self.references: list[torch.Tensor] = []
        self.images_checked: dict[Candidate, int] = {}

    def reference(self, index: int) -> torch.Tensor:
        while len(self.references) <= index:
            chunk = self.chunks[len(self.references)]
            self.references.append(probabilities(self.reference_model, self.preprocess, chunk, torch.float32))
        return self.references[index]

    def __call__(self, candidate: Candidate) -> tuple[float, int]:
        model = self.load(candidate)
        worst, flips, checked = 0.0, 0, 0
        for index, chunk in enumerate(self.chunks):
            chunk_drift, chunk_flips = drift(self.reference(index),
                                             probabilities(model, self.preprocess, chunk, candidate.dtype))
            worst, flips, checked = max(worst, chunk_drift), flips + chunk_flips, checked + len(chunk)
            if worst > CHOOSE_DRIFT or flips:
                break
        self.images_checked[candidate] = checked
        return worst, flips


def pick(speeds: dict[Candidate, float | None], check: Callable[[Candidate], tuple[float, int]],
         eligible: Sequence[Candidate]) -> tuple[Candidate, list[Trial]]:
    """The fastest eligible candidate faster than fp32 whose drift passes, else fp32; one Trial per candidate.
    `check` (candidate -> (max drift, flips)) runs only where needed, fastest first."""
    base = speeds[FP32]
    assert base is not None
    trials = {c: Trial(c, s, None if s is None else base / s) for c, s in speeds.items()}
    for c, t in trials.items():
        if c == FP32:
            t.verdict = "baseline"
        elif t.seconds is None:
            t.verdict = f"slower than fp32 by over {PROBE_SLOWER:g}x at {PROBE_ROWS} rows (not timed further)"
        elif t.speedup < MIN_SPEEDUP:
            t.verdict = f"not faster than fp32 (x{t.speedup:.2f} < x{MIN_SPEEDUP})"
        elif c not in eligible:
            t.verdict = "not allowed by the explicit settings"
    chosen = FP32 if FP32 in eligible else None
    ranked = sorted((t for t in trials.values() if not t.verdict), key=lambda t: t.seconds)
    for t in ranked:
        if chosen is not None and chosen != FP32:
            t.verdict = "not checked (a faster candidate passed)"
            continue
        t.max_drift, t.flips = check(t.candidate)
        if t.max_drift > CHOOSE_DRIFT or t.flips:
            t.verdict = (f"too inaccurate (max |dP| {t.max_drift:.4f} over the {CHOOSE_DRIFT:g} that keeps "
                         f"{MAX_DRIFT:g} on unseen images, {t.flips} flipped decisions)")
        else:
            t.verdict = "chosen"
            chosen = t.candidate
    if chosen is None:  # fp32 is refused by the explicit setting and nothing faster passed: its plainest form
        chosen = eligible[0]
        trials.setdefault(chosen, Trial(chosen)).verdict = "chosen (the explicit setting's plainest form)"
    elif chosen == FP32:
        trials[FP32].verdict = "chosen (nothing faster passed)"
    return chosen, list(trials.values())


def tokens_of(model: nn.Module, preprocess: PreprocessSpec) -> int:
    """Sequence length of a ViT-family Classifier at the preprocessed input size."""
    backbone = model.backbone
    patch = backbone.cfg.patch_size
    return backbone.num_prefix_tokens + (preprocess.height // patch[0]) * (preprocess.width // patch[1])


def choose(load: LoadModel, preprocess: PreprocessSpec, max_batch: int, dtype: torch.dtype | None,
           quantize: str | None, budget_s: float = SPEED_BUDGET_S) -> PrecisionChoice:
    """`auto` for the model `load(candidate)` builds (a Classifier, in that candidate's precision); dtype/quantize
    None = auto, else the explicit setting (then only measured against fp32, for the warning)."""
    start = time.perf_counter()
    reference_model = load(FP32)
    rows = min(max_batch * tokens_of(reference_model, preprocess), MAX_ROWS)
    eligible = candidates_for(dtype, quantize)
    measured = list(dict.fromkeys([FP32, *eligible]))
    speeds = measure_speed(measured, distinct_linears(reference_model), rows, budget_s)
    explicit = dtype is not None and quantize is not None
    if explicit:
        candidate = eligible[0]
        chosen, trials = candidate, [Trial(c, s, None if s is None else speeds[FP32] / s, verdict="measured")
                                     for c, s in speeds.items()]
    else:
        calibration = Calibration(load, preprocess, reference_model)
        chosen, trials = pick(speeds, calibration, eligible)
        for t in trials:
            checked = calibration.images_checked.get(t.candidate, CALIBRATION_IMAGES)
            if checked < CALIBRATION_IMAGES:
                t.verdict += f" on {checked} of {CALIBRATION_IMAGES} calibration images"
    choice = PrecisionChoice(chosen, "explicit" if explicit else "auto", trials, time.perf_counter() - start, rows)
    report(choice)
    return choice


def report(choice: PrecisionChoice) -> None:
    rates = ", ".join(f"{t.candidate.name} {'-' if t.seconds is None else f'{t.seconds * 1e3:.1f} ms'}"
                      + ("" if t.max_drift is None else f" (max |dP| {t.max_drift:.4f}, {t.flips} flips)")
                      for t in choice.trials)
    when = (f"measured in {choice.seconds:.2f} s" if choice.cached_at is None
            else f"measured {choice.cached_at}, read from the precision cache in {choice.seconds * 1e3:.0f} ms")
    # Each rate is the model's GEMMs once at `rows` rows (a slow candidate's is extrapolated from one call per
    # layer shape), not time the measurement spent.
    log.info("precision %s: %s (%s on %s; the model's GEMMs once at %d rows: %s)", choice.how,
             choice.candidate.name, when, torch.backends.cpu.get_cpu_capability(), choice.rows, rates)
    chosen = choice.trial(choice.candidate)
    for t in choice.trials:  # why each faster candidate was not taken
        if t.candidate != choice.candidate and t.seconds is not None and (
                chosen is None or chosen.seconds is None or t.seconds < chosen.seconds):
            log.info("precision %s: not %s: %s", choice.how, t.candidate.name, t.verdict)
    if choice.cached_at is None and choice.seconds > STARTUP_BUDGET_S:
        log.warning("precision %s: the measurement took %.2f s, over its %.1f s budget (a busy CPU, or a model "
                    "larger than ViT-B/16)", choice.how, choice.seconds, STARTUP_BUDGET_S)
    if choice.how == "explicit" and chosen is not None and choice.candidate != FP32:
        if chosen.seconds is None or chosen.speedup < 1.0:
            log.warning("precision %s was set explicitly but is measured slower than fp32 on this CPU (%s): "
                        "`auto` would not pick it", choice.candidate.name,
                        "over %gx slower" % PROBE_SLOWER if chosen.seconds is None else f"x{chosen.speedup:.2f}")


def in_precision(model: nn.Module, candidate: Candidate) -> nn.Module:
    """A copy of the fp32 `model` as loading it in `candidate`'s precision gives: every persistent tensor cast as
    weights.load_into casts it (non-persistent buffers such as RoPE frequencies stay as built), then quantized."""
    shared = itertools.chain(model.parameters(), model.buffers())  # copy the modules, not the weights
    model = copy.deepcopy(model, memo={id(t): t for t in shared})
    if candidate.dtype != torch.float32:
        state = {name: t.to(candidate.dtype) for name, t in model.state_dict().items()}
        model.load_state_dict(state, strict=True, assign=True)
    if candidate.quantize != "none":
        quantize_int8(model, backend=candidate.quantize)
    return model.eval()


def load_in(model_dir: Path, device: torch.device) -> LoadModel:
    """A loader of the classifier in `model_dir` in a candidate's precision: read from disk once, in fp32."""
    from runtime.models.classifier import load_classifier
    fp32: list[nn.Module] = []

    def load(candidate: Candidate) -> nn.Module:
        if not fp32:
            fp32.append(load_classifier(model_dir, torch.float32, device))
        return fp32[0] if candidate == FP32 else in_precision(fp32[0], candidate)

    return load


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def candidate_of(entry: dict) -> Candidate:
    dtype = getattr(torch, entry["dtype"])
    if dtype not in DTYPE_NAMES or entry["quantize"] not in ("none", *INT8_BACKENDS):
        raise ValueError(f"not a candidate: {entry}")
    return Candidate(dtype, entry["quantize"])


def to_entry(choice: PrecisionChoice) -> dict:
    def one(c: Candidate) -> dict:
        return {"dtype": dtype_name(c.dtype), "quantize": c.quantize}
    return {"chosen": one(choice.candidate), "how": choice.how, "rows": choice.rows, "seconds": choice.seconds,
            "trials": [{**one(t.candidate), "seconds": t.seconds, "speedup": t.speedup, "max_drift": t.max_drift,
                        "flips": t.flips, "verdict": t.verdict} for t in choice.trials]}


def from_entry(entry: dict, measured_at: str, read_seconds: float) -> PrecisionChoice:
    trials = [Trial(candidate_of(t), t["seconds"], t["speedup"], t["max_drift"], t["flips"], t["verdict"])
              for t in entry["trials"]]
    return PrecisionChoice(candidate_of(entry["chosen"]), entry["how"], trials, read_seconds, int(entry["rows"]),
                           cached_at=measured_at)


def choose_cached(model_dir: Path, device: torch.device, preprocess: PreprocessSpec, max_batch: int,
                  dtype: torch.dtype | None, quantize: str | None, cache: PrecisionCache | None) -> PrecisionChoice:
    """choose() on the classifier in `model_dir`, through `cache` when given: a start whose key is cached (the same
    model bytes, machine, library versions and settings) reads the choice; otherwise it measures and stores it."""
    if cache is None:
        return choose(load_in(model_dir, device), preprocess, max_batch, dtype, quantize)
    start = time.perf_counter()
    data = cache.read()
    fields = {"model": cache.model_digest(model_dir, data), "machine": precision_cache.machine(),
              "max_batch": max_batch, "dtype": dtype_name(dtype), "quantize": quantize, "measurement": MEASUREMENT}
    key = precision_cache.entry_key(fields)
    choice = cached_choice(cache, data, key, start)
    if choice is not None:
        return choice
    with cache.measuring():
        latest = cache.read()  # a replica that held the lock before us may have measured it
        choice = cached_choice(cache, latest, key, start)
        if choice is not None:
            return choice
        choice = choose(load_in(model_dir, device), preprocess, max_batch, dtype, quantize)
        latest["files"].update(data["files"])
        latest["entries"][key] = {"fields": fields, "measured_at": precision_cache.now(), "choice": to_entry(choice)}
        cache.write(latest)
    return choice


def cached_choice(cache: PrecisionCache, data: dict, key: str, start: float) -> PrecisionChoice | None:
    entry = data["entries"].get(key)
    if entry is None:
        return None
    try:
        choice = from_entry(entry["choice"], str(entry["measured_at"]), time.perf_counter() - start)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("precision cache %s: entry %s is malformed (%s): measuring again", cache.path, key[:12], e)
        return None
    report(choice)
    return choice
