"""cascade.toml: the stages of a cascade, in order, and the models each one uses (docs/bundle.md lists every key).

Parsing only checks the file itself (known keys, types, ranges, model directories present, stage order); the
cascade checks what needs the models (label names, input sizes, memory). Every error names the file, the stage and
the key."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, ClassVar, Union

from runtime.config import REQUIRED, ConfigReader
from runtime.errors import ModelLoadError
from runtime.options import BACKENDS, DTYPE_MODES, EXPORTED_BACKENDS, KV_CACHE_DTYPES, QUANTIZE_MODES

BUNDLE_FILE = "cascade.toml"
DETECTOR_FORMATS = ("safetensors", "onnx", "transformers")
EXPORTED_PRECISION = {"onnxruntime": "fp32 graph", "tensorrt": "graph as a TensorRT engine"}  # neither takes int8


@dataclass(frozen=True)
class ClassifierStageSpec:
    """Stage 1: a Hugging Face image classifier that scores every image and lets the confident ones exit."""
    kind: ClassVar[str] = "classifier"
    name: str
    model: Path
    device: str | None = None  # None: the device Engine.load was given
    exit_below: float | None = None  # p < exit_below or p > exit_above: the image exits here (set iff a later
    exit_above: float | None = None  # stage exists)
    quantize: str | None = None  # a QUANTIZE_MODES name; None: unset (the engine's setting). Resolved
    # (runtime/cascade/precision.py): "none" or an int8 backend, whose kernel computes the encoder's Linear layers
    backend: str = "torch"  # BACKENDS: our modules, or `onnx` on ONNX Runtime (runtime/models/onnx_classifier.py)
    # or as a TensorRT engine (runtime/models/tensorrt_classifier.py)
    onnx: Path | None = None  # the classifier.onnx python -m tools.export wrote (its export.json beside it)

    def model_dirs(self) -> list[Path]:
        return [self.model] + ([self.onnx] if self.onnx is not None else [])

    def quantize_modes(self) -> list[str | None]:
        """The quantize setting of each model the stage quantizes (none for a VLM)."""
        return [self.quantize]

    def map_quantize(self, change: Callable[[str | None], str | None]) -> ClassifierStageSpec:
        return replace(self, quantize=change(self.quantize))


@dataclass(frozen=True)
class DetectorSpec:
    """One ensemble member. format "safetensors": a Hugging Face detector directory of a family we hand-build
    (runtime/cascade/members.py); "onnx": a YOLO-style ONNX export run on ONNX Runtime; "transformers": any
    transformers detection checkpoint, run eagerly through transformers itself."""
    name: str
    model: Path  # the model directory; for format "onnx" the .onnx file
    roadwork_classes: tuple[str | int, ...]  # id2label names or class ids that count as roadwork evidence
    weight: float = 1.0
    box_threshold: float = 0.5  # a roadwork box must score above this to count as a "roadwork" vote
    quantize: str | None = None  # as ClassifierStageSpec.quantize, for its ViT backbone
    format: str = "safetensors"  # DETECTOR_FORMATS
    device: str | None = None  # None: the stage's device
    prompt: str | None = None  # zero-shot transformers detectors: the phrases to ground, '.'-separated
    labels: tuple[str, ...] | None = None  # onnx: class names, when the export's metadata has none
    iou_threshold: float = 0.7  # onnx: class-aware NMS
    max_det: int = 300  # onnx and transformers: detections kept per image


@dataclass(frozen=True)
class DetectorStageSpec:
    """Object detectors that vote on the images the classifier did not decide (kernels/vote.py)."""
    kind: ClassVar[str] = "detectors"
    name: str
    detectors: tuple[DetectorSpec, ...]
    device: str | None = None
    majority: float = 2 / 3
    classifier_weight: float = 0.0  # the classifier's weight as a voter; 0: only the detectors vote
    time_budget_ms: float | None = None  # a call slower than this counts as a failure; None: no budget
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    exit_below: float | None = None  # voted p < exit_below or p > exit_above: decided here; else on to the VLM
    exit_above: float | None = None  # (set iff a vlm stage follows)

    def model_dirs(self) -> list[Path]:
        return [d.model for d in self.detectors]

    def quantize_modes(self) -> list[str | None]:
        return [d.quantize for d in self.detectors]

    def map_quantize(self, change: Callable[[str | None], str | None]) -> DetectorStageSpec:
        return replace(self, detectors=tuple(replace(d, quantize=change(d.quantize)) for d in self.detectors))


@dataclass(frozen=True)
class VLMStageSpec:
    """Last stage: a Qwen3-VL answers the prompt for the images still undecided; P(roadwork) is
    P(yes) / (P(yes) + P(no)) of its next token. It also writes explanations (runtime/cascade/vlm_stage.py)."""
    kind: ClassVar[str] = "vlm"
    name: str
    model: Path
    prompt: str = "Is there roadwork in this image? Answer Yes or No."
    yes_token: str = "Yes"  # single tokens of the model's tokenizer
    no_token: str = "No"
    explain_prompt: str = "Describe the roadwork you see, briefly."
    explain_above: float = 1.0  # explain every image whose final p > this; 1.0: only images asked for
    max_explain_tokens: int = 48
    device: str | None = None
    kv_cache_gb: float = 1.0  # GiB for the paged KV cache
    max_num_seqs: int = 32  # sequences in one engine step
    time_budget_ms: float | None = None  # as for the detectors stage, per scoring call
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    kv_cache_dtype: str = "auto"  # "auto": the run dtype; "int8": int8 keys/values with per-block-per-head scales
    dtype: str = "auto"  # the VLM's own dtype, a DTYPE_MODES name; resolved (runtime/cascade/precision.py): DTYPES

    def model_dirs(self) -> list[Path]:
        return [self.model]

    def quantize_modes(self) -> list[str | None]:
        return []  # its weights' own format decides (quantization_config), not a quantize key

    def map_quantize(self, change: Callable[[str | None], str | None]) -> VLMStageSpec:
        return self


StageSpec = Union[ClassifierStageSpec, DetectorStageSpec, VLMStageSpec]
KIND_ORDER = ("classifier", "detectors", "vlm")  # a cascade is these kinds in this order, each at most once


@dataclass(frozen=True)
class Bundle:
    root: Path  # the bundle directory, or the classifier directory of a one-stage cascade
    stages: tuple[StageSpec, ...]
    from_toml: bool

    def where(self, index: int) -> str:
        """How errors and logs name stage `index` (0-based)."""
        return f"{self.root / BUNDLE_FILE} stage {index + 1} ('{self.stages[index].name}')"


def keys_of(spec: type, renamed: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A table's keys are its dataclass's field names (a TOML array of tables is singular: [[stage.detector]])."""
    renamed = renamed or {}
    return tuple(renamed.get(f.name, f.name) for f in fields(spec)) + extra


def toml_table(data: dict, where: str, known: tuple[str, ...]) -> ConfigReader:
    """One TOML table being read: unknown keys are rejected up front, then typed lookups."""
    return ConfigReader(data, where, known, word="key")


def model_dir(root: Path, table: ConfigReader) -> Path:
    value = table.get("model", str)
    path = (root / value).resolve()
    if not path.is_dir():
        table.fail(f"model directory '{value}' ({path}) does not exist")
    if not (path / "config.json").is_file():
        table.fail(f"model directory '{value}' has no config.json")
    return path


def exit_thresholds(table: ConfigReader, has_next: bool) -> tuple[float | None, float | None]:
    below = table.number("exit_below", None if not has_next else REQUIRED, 0.0, 1.0)
    above = table.number("exit_above", None if not has_next else REQUIRED, 0.0, 1.0)
    if not has_next and (below is not None or above is not None):
        table.fail("exit_below/exit_above route images to a later stage, "
                   "but this is the last stage")
    if has_next and below > above:
        table.fail(f"exit_below ({below}) must not exceed exit_above ({above})")
    return below, above


def positive_int(table: ConfigReader, key: str, default: int) -> int:
    value = table.get(key, int, default)
    if value < 1:
        table.fail(f"key '{key}' must be >= 1, got {value}")
    return value


def breaker_keys(table: ConfigReader) -> tuple[float | None, int, float]:
    """time_budget_ms, failure_threshold, cooldown_s: the same keys and meaning on every guarded stage."""
    budget = table.number("time_budget_ms", None, 0.0, float("inf"))
    threshold = positive_int(table, "failure_threshold", 3)
    cooldown = table.number("cooldown_s", 30.0, 0.0, float("inf"))
    return budget, threshold, cooldown


def parse_classifier_stage(root: Path, table: ConfigReader, has_next: bool) -> ClassifierStageSpec:
    name = table.get("name", str, "classifier")
    model = model_dir(root, table)
    device = table.get("device", str, None)
    below, above = exit_thresholds(table, has_next)
    quantize = quantize_of(table)
    backend = table.choice("backend", "torch", BACKENDS)
    onnx = classifier_onnx(root, table)
    problem = exported_backend_problem(backend, onnx, quantize, f"backend '{backend}'")
    if problem is not None:
        table.fail(problem)
    return ClassifierStageSpec(name, model, device, below, above, quantize, backend, onnx)


def exported_backend_problem(backend: str, onnx: Path | None, quantize: str | None, what: str) -> str | None:
    """Why a classifier cannot run on `backend` (`what` names how it was asked for), or None."""
    if backend not in EXPORTED_BACKENDS:
        return None
    if onnx is None:
        return f"{what} needs key 'onnx' (the classifier.onnx python -m tools.export wrote)"
    if quantize not in (None, "none"):
        return (f"key 'quantize' ({quantize!r}) is for backend 'torch': {what} runs the exported "
                f"{EXPORTED_PRECISION[backend]}")
    return None


def classifier_onnx(root: Path, table: ConfigReader) -> Path | None:
    value = table.get("onnx", str, None)
    if value is None:
        return None
    path = (root / value).resolve()
    if not path.is_file() or path.suffix != ".onnx":
        table.fail(f"key 'onnx' must be an .onnx file; '{value}' ({path}) is not one")
    return path


def with_backend(bundle: Bundle, backend: str) -> Bundle:
    """The bundle with its classifier on `backend` (BACKENDS): the --backend override of cascade.toml."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    first = bundle.stages[0]
    if backend in EXPORTED_BACKENDS and not bundle.from_toml:
        raise ModelLoadError(f"{bundle.root}: --backend {backend} needs a bundle (cascade.toml) whose "
                             f"classifier stage names its exported graph in key 'onnx'")
    problem = exported_backend_problem(backend, first.onnx, first.quantize, f"--backend {backend}")
    if problem is not None:
        raise ModelLoadError(f"{bundle.where(0)}: {problem}")
    return replace(bundle, stages=(replace(first, backend=backend), *bundle.stages[1:]))


def quantize_mode(mode: str, what: str) -> str:
    """A QUANTIZE_MODES name, checked; `what` names the setting in the error."""
    if mode not in QUANTIZE_MODES:
        raise ModelLoadError(f"{what} must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    return mode


def quantize_of(table: ConfigReader) -> str | None:
    mode = table.get("quantize", str, None)
    return None if mode is None else quantize_mode(mode, f"{table.source}: key 'quantize'")


def onnx_file(root: Path, table: ConfigReader) -> Path:
    value = table.get("model", str)
    path = (root / value).resolve()
    if not path.is_file() or path.suffix != ".onnx":
        table.fail(f"format 'onnx' needs 'model' to be an .onnx file; '{value}' ({path}) is not one")
    return path


def parse_detector(root: Path, table: ConfigReader) -> DetectorSpec:
    fmt = table.choice("format", "safetensors", DETECTOR_FORMATS)
    model = onnx_file(root, table) if fmt == "onnx" else model_dir(root, table)
    name = table.get("name", str, model.stem if fmt == "onnx" else model.name)
    classes = table.get("roadwork_classes", list)
    if not classes or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes):
        table.fail(f"key 'roadwork_classes' must be a non-empty list of class names "
                   f"or ids, got {classes!r}")
    if len(set(classes)) != len(classes):
        table.fail(f"key 'roadwork_classes' lists a class twice: {classes!r}")
    weight = table.number("weight", 1.0, 0.0, float("inf"))
    # Below 1 so that a detector that found nothing has 1 - c > 0 (the "no" side's geometric mean is defined).
    box_threshold = table.number("box_threshold", 0.5, 0.0, 1.0, high_open=True)
    quantize = quantize_of(table)
    if fmt != "safetensors" and quantize is not None:
        table.fail(f"key 'quantize' applies to hand-built (format 'safetensors') detectors, not format '{fmt}'")
    prompt = table.get("prompt", str, None)
    if prompt is not None and (fmt != "transformers" or not prompt.strip(" .")):
        table.fail("key 'prompt' must be non-empty and is for format 'transformers' (zero-shot detectors) only")
    labels = table.get("labels", list, None)
    if labels is not None and (fmt != "onnx" or not labels or not all(isinstance(x, str) for x in labels)):
        table.fail("key 'labels' must be a non-empty list of class names and is for format 'onnx' only")
    if fmt != "onnx" and "iou_threshold" in table.data:
        table.fail("key 'iou_threshold' is for format 'onnx' only (its NMS)")
    if fmt == "safetensors" and "max_det" in table.data:
        table.fail("key 'max_det' is for formats 'onnx' and 'transformers' only")
    iou = table.number("iou_threshold", 0.7, 0.0, 1.0, low_open=True)
    max_det = positive_int(table, "max_det", 300)
    return DetectorSpec(name, model, tuple(classes), weight, box_threshold, quantize, fmt,
                        table.get("device", str, None), prompt, None if labels is None else tuple(labels), iou,
                        max_det)


def parse_detector_stage(root: Path, table: ConfigReader, has_next: bool) -> DetectorStageSpec:
    name = table.get("name", str, "detectors")
    device = table.get("device", str, None)
    majority = table.number("majority", 2 / 3, 0.0, 1.0, low_open=True)
    classifier_weight = table.number("classifier_weight", 0.0, 0.0, float("inf"))
    budget, threshold, cooldown = breaker_keys(table)
    below, above = exit_thresholds(table, has_next)
    entries = table.get("detector", list)
    if not entries or not all(isinstance(e, dict) for e in entries):
        table.fail("needs at least one [[stage.detector]] table")
    detectors = []
    for i, entry in enumerate(entries):
        entry_table = toml_table(entry, f"{table.source} detector {i + 1}", keys_of(DetectorSpec))
        detectors.append(parse_detector(root, entry_table))
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        table.fail(f"detector names must be unique, got {names}")
    if classifier_weight + sum(d.weight for d in detectors) <= 0:
        table.fail("every voter has weight 0 (classifier_weight and all detector "
                   "weights); at least one must be positive")
    return DetectorStageSpec(name, tuple(detectors), device, majority, classifier_weight, budget, threshold, cooldown,
                             below, above)


def nonempty_str(table: ConfigReader, key: str, default: str) -> str:
    value = table.get(key, str, default)
    if not value.strip():
        table.fail(f"key '{key}' must not be empty")
    return value


def parse_vlm_stage(root: Path, table: ConfigReader, has_next: bool) -> VLMStageSpec:
    assert not has_next, "read_bundle keeps the vlm stage last"
    defaults = VLMStageSpec("", Path())
    name = table.get("name", str, "vlm")
    model = model_dir(root, table)
    prompt = nonempty_str(table, "prompt", defaults.prompt)
    yes_token = nonempty_str(table, "yes_token", defaults.yes_token)
    no_token = nonempty_str(table, "no_token", defaults.no_token)
    if yes_token == no_token:
        table.fail(f"keys 'yes_token' and 'no_token' must differ, both are {yes_token!r}")
    explain_prompt = nonempty_str(table, "explain_prompt", defaults.explain_prompt)
    explain_above = table.number("explain_above", defaults.explain_above, 0.0, 1.0)
    max_explain_tokens = positive_int(table, "max_explain_tokens", defaults.max_explain_tokens)
    device = table.get("device", str, None)
    kv_cache_gb = table.number("kv_cache_gb", defaults.kv_cache_gb, 0.0, float("inf"), low_open=True,
                               high_open=True)
    max_num_seqs = positive_int(table, "max_num_seqs", defaults.max_num_seqs)
    budget, threshold, cooldown = breaker_keys(table)
    kv_cache_dtype = table.choice("kv_cache_dtype", defaults.kv_cache_dtype, KV_CACHE_DTYPES)
    dtype = table.choice("dtype", defaults.dtype, DTYPE_MODES)
    return VLMStageSpec(name, model, prompt, yes_token, no_token, explain_prompt, explain_above, max_explain_tokens,
                        device, kv_cache_gb, max_num_seqs, budget, threshold, cooldown, kv_cache_dtype, dtype)


# kind -> (parser, keys). A new stage kind is one more spec dataclass, parser and entry here.
STAGE_KINDS = {
    "classifier": (parse_classifier_stage, keys_of(ClassifierStageSpec, extra=("kind",))),
    "detectors": (parse_detector_stage, keys_of(DetectorStageSpec, {"detectors": "detector"}, ("kind",))),
    "vlm": (parse_vlm_stage, keys_of(VLMStageSpec, extra=("kind",))),
}
assert tuple(STAGE_KINDS) == KIND_ORDER


def check_order(path: Path, raw_stages: list[dict]) -> None:
    """Classifier first (and only first), then optionally detectors, then optionally the VLM, which is last."""
    kinds = []
    for i, raw in enumerate(raw_stages):
        where = f"{path} stage {i + 1}"
        kind = toml_table(raw, where, tuple(raw)).get("kind", str)
        if kind not in STAGE_KINDS:
            raise ModelLoadError(f"{where}: kind '{kind}' is not supported (supported: {', '.join(STAGE_KINDS)})")
        kinds.append(kind)
    for i, kind in enumerate(kinds):
        if (i == 0) != (kind == "classifier"):
            raise ModelLoadError(f"{path} stage {i + 1}: kind '{kind}' here, but the first stage, and only it, must "
                                 f"be a classifier")
        if i and KIND_ORDER.index(kind) <= KIND_ORDER.index(kinds[i - 1]):
            before = kinds[i - 1]
            rule = "must be the last stage" if before == "vlm" else "must be the last stage or followed by a vlm stage"
            raise ModelLoadError(f"{path} stage {i} ('{raw_stages[i - 1].get('name', before)}'): a {before} stage "
                                 f"{rule}, but stage {i + 1} is kind '{kind}'")


def read_bundle(root: str | Path) -> Bundle:
    root = Path(root)
    path = root / BUNDLE_FILE
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ModelLoadError(f"{path}: not valid TOML ({e})") from e
    raw_stages = toml_table(data, str(path), ("stage",)).get("stage", list)
    if not raw_stages or not all(isinstance(s, dict) for s in raw_stages):
        raise ModelLoadError(f"{path}: needs at least one [[stage]] table")
    check_order(path, raw_stages)
    stages: list[StageSpec] = []
    for i, raw in enumerate(raw_stages):
        kind = raw["kind"]
        parse, known = STAGE_KINDS[kind]
        table = toml_table(raw, f"{path} stage {i + 1} ('{raw.get('name', kind)}')", known)
        stages.append(parse(root, table, has_next=i + 1 < len(raw_stages)))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{path}: stage names must be unique, got {names}")
    return Bundle(root, tuple(stages), from_toml=True)


def single_classifier_bundle(model_dir: str | Path) -> Bundle:
    """A plain Hugging Face classifier directory as a one-stage cascade."""
    model_dir = Path(model_dir)
    return Bundle(model_dir, (ClassifierStageSpec("classifier", model_dir),), from_toml=False)


def map_quantize(bundle: Bundle, change) -> Bundle:
    """The bundle with every classifier's and detector's quantize replaced by change(quantize)."""
    return replace(bundle, stages=tuple(stage.map_quantize(change) for stage in bundle.stages))


def quantize_settings(bundle: Bundle) -> list[str | None]:
    return [mode for stage in bundle.stages for mode in stage.quantize_modes()]


def load_bundle(path: str | Path) -> Bundle:
    """A bundle directory (has cascade.toml) or a single classifier directory."""
    path = Path(path)
    return read_bundle(path) if (path / BUNDLE_FILE).is_file() else single_classifier_bundle(path)
