"""The classifier as a TensorRT engine (cascade.toml `backend = "tensorrt"`, or --backend): built with TensorRT 10's
Python API from the classifier.onnx python -m tools.export wrote, cached on disk, called as
runtime/models/classifier.Classifier is (pixel_values [B, 3, H, W] -> P(roadwork) [B] fp32, logits [B, num_labels]).

As on onnxruntime (runtime/models/onnx_classifier.py) the pixels stay ours (the export.json beside the file must
record the model directory's preprocessing) and labels come from the model directory's config.json.

The engine: one optimization profile over batch 1..max_batch, fp16 kernels (TensorRT falls back to fp32 per layer)
unless the run dtype is float32, fp32 inputs and outputs as the graph has them. It runs on torch's current stream,
reading the stage's CUDA input tensor in place and writing outputs torch allocated; no CUDA graph is captured.

The cache: one file per EngineKey (the ONNX file's sha256, the GPU and its compute capability, the TensorRT version,
the builder flags, max_batch) in $XDG_CACHE_HOME/roadwork-cascade/tensorrt (else ~/.cache/...), each file a header
with its key and the engine's sha256, then the serialized engine; written to a temporary file renamed into place.
A file that does not read back whole, or holds another key, or that TensorRT cannot deserialize, is built again with
a warning. Replicas that start together build once: the others wait on a lock beside the file, then read it.
tensorrt is an optional dependency (the `tensorrt` extra, TensorRT 10.x), imported only when this backend loads."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kernels.preprocess import PreprocessSpec
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.models.classifier import Labels
from runtime.models.onnx_classifier import INPUT, OUTPUTS, check_preprocess, export_entry
from runtime.models.precision_cache import PrecisionCache, default_path, entry_key, file_sha256, now

log = logging.getLogger(__name__)

EXTRA = "pip install 'roadwork-cascade[tensorrt]'"
MAGIC = b"roadwork-cascade tensorrt engine 1\n"  # then one JSON header line, then the serialized engine
# 11.x removed the builder's precision flags (BuilderFlag.FP16): its ONNX graphs must carry their own types.
# https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html
TENSORRT_MAJOR = 10


def default_cache_dir() -> Path:
    return default_path().parent / "tensorrt"


def missing_for_tensorrt(device: torch.device) -> list[str]:
    """What this machine lacks to run the backend, each as the error names it; empty: nothing."""
    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA device (the classifier's device is {device})")
    elif not torch.cuda.is_available():
        missing.append(f"CUDA (torch {torch.__version__} sees no CUDA device)")
    try:
        import tensorrt
    except ImportError as e:
        missing.append(f"the tensorrt package ({e})")
    else:
        major = int(tensorrt.__version__.split(".")[0])
        if major != TENSORRT_MAJOR:
            missing.append(f"TensorRT {TENSORRT_MAJOR}.x (this is {tensorrt.__version__}; 11.x removed the "
                           f"fp16 builder flag this backend sets)")
    return missing


def import_tensorrt(device: torch.device):
    missing = missing_for_tensorrt(device)
    if missing:
        raise ModelLoadError(f"backend 'tensorrt' needs {' and '.join(missing)}; {EXTRA} on a machine with an "
                             f"NVIDIA GPU and a CUDA build of torch")
    import tensorrt
    return tensorrt


def builder_flags(dtype: torch.dtype) -> tuple[str, ...]:
    """trt.BuilderFlag names for the run dtype. Half dtypes build fp16: TensorRT picks fp16 or fp32 per layer, and fp16
    keeps more mantissa than bf16 for the same speed; float32 builds fp32 (TF32 where TensorRT takes it)."""
    return () if dtype == torch.float32 else ("FP16",)


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine is valid for: engines are tied to the GPU model and the TensorRT version."""
    onnx_sha256: str
    gpu: str
    capability: str  # "sm_90"
    tensorrt: str
    flags: tuple[str, ...]
    max_batch: int

    def digest(self) -> str:
        return entry_key(asdict(self))

    def header(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as JSON lists, as a file's header reads back


@dataclass
class EngineCache:
    root: Path

    def path(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}.engine"

    def read(self, key: EngineKey) -> bytes | None:
        """The serialized engine for `key`, or None (absent; unreadable, torn or another key's: with a warning)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("TensorRT engine cache %s is unreadable (%s): building the engine again", path, e)
            return None
        why = stored_engine_problem(data, key)
        if why is None:
            return data[data.index(b"\n", len(MAGIC)) + 1:]
        log.warning("TensorRT engine cache %s %s: building the engine again", path, why)
        return None

    def write(self, key: EngineKey, engine: bytes) -> None:
        path = self.path(key)
        header = {"key": key.header(), "engine_sha256": hashlib.sha256(engine).hexdigest(), "built": now()}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + engine)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("TensorRT engine cache %s cannot be written (%s): the next start builds again", path, e)

    def load(self, key: EngineKey, build: Callable[[], bytes], deserialize: Callable[[bytes], object | None]
             ) -> tuple[object, bool]:
        """(the deserialized engine, whether it came from the cache). `build` returns a serialized engine;
        `deserialize` returns None for bytes it cannot use."""
        with PrecisionCache(self.path(key)).measuring():  # its lock file: one replica builds, the others read
            stored = self.read(key)
            if stored is not None:
                engine = deserialize(stored)
                if engine is not None:
                    return engine, True
                log.warning("TensorRT engine cache %s does not deserialize on this GPU: building the engine again",
                            self.path(key))
            serialized = build()
            engine = deserialize(serialized)
            if engine is None:
                raise ModelLoadError(f"TensorRT cannot deserialize the engine it just built for key {key}")
            self.write(key, serialized)
            return engine, False


def stored_engine_problem(data: bytes, key: EngineKey) -> str | None:
    """Why a cache file's bytes are not `key`'s engine, or None."""
    end = data.find(b"\n", len(MAGIC))
    if not data.startswith(MAGIC) or end < 0:
        return "is not an engine file this version wrote"
    try:
        header = json.loads(data[len(MAGIC):end])
        stored_key, digest = header["key"], header["engine_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return f"has a header that does not read ({type(e).__name__}: {e})"
    if stored_key != key.header():
        return f"holds the engine of another key ({stored_key})"
    if hashlib.sha256(data[end + 1:]).hexdigest() != digest:
        return "is torn (its engine bytes do not match their sha256)"
    return None


def engine_key(path: Path, device: torch.device, trt_version: str, flags: tuple[str, ...], max_batch: int
               ) -> EngineKey:
    props = torch.cuda.get_device_properties(device)
    return EngineKey(file_sha256(path), props.name, f"sm_{props.major}{props.minor}", trt_version, flags, max_batch)


def build_engine(trt, logger, path: Path, preprocess: PreprocessSpec, flags: tuple[str, ...], max_batch: int
                 ) -> bytes:
    """classifier.onnx -> a serialized engine with one profile over batch 1..max_batch."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # 10.x networks are explicit-batch; EXPLICIT_BATCH is ignored there
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"{path}: TensorRT's ONNX parser rejects it: {' '.join(errors.split())}")
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    image = (3, preprocess.height, preprocess.width)
    profile.set_shape(INPUT, (1, *image), (max_batch, *image), (max_batch, *image))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)  # None on failure, the reason in the log
    if serialized is None:
        raise ModelLoadError(f"{path}: TensorRT could not build an engine (flags {list(flags)}, batch 1.."
                             f"{max_batch}); its log above says why")
    log.info("%s: built a TensorRT engine in %.1f s (flags %s, batch 1..%d)", path, time.perf_counter() - start,
             list(flags), max_batch)
    return bytes(serialized)


def tensorrt_logger(trt):
    """TensorRT's messages into our logging, at their severity. TensorRT calls it from its own threads."""
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # the binding's base class must be initialized explicitly

        def log(self, level, msg):
            log.log(levels.get(level, logging.INFO), "TensorRT: %s", msg)

    return Logger()


@dataclass
class LoadedEngine:
    """Held together: TensorRT's logger must outlive every object made through it, the runtime its engines."""
    logger: object
    runtime: object
    engine: object


class TensorRTClassifier:
    """Called like Classifier: pixel_values [B, 3, H, W] -> (P(roadwork) [B] fp32, logits [B, num_labels]).
    The outputs are views of buffers the next call overwrites (the stage copies them out at once)."""
    backend = "tensorrt"

    def __init__(self, trt, loaded: LoadedEngine, model_type: str, labels: Labels, device: torch.device,
                 max_batch: int, flags: tuple[str, ...], engine_path: Path, cached: bool,
                 image: tuple[int, int, int]):
        self.loaded, engine = loaded, loaded.engine
        self.model_type, self.labels, self.device = model_type, labels, device
        self.max_batch, self.flags, self.engine_path, self.cached = max_batch, flags, engine_path, cached
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT] or not set(OUTPUTS) <= set(outputs):
            raise ModelLoadError(f"{engine_path}: a classifier engine takes '{INPUT}' and gives {list(OUTPUTS)}; "
                                 f"this takes {inputs} and gives {outputs}")
        dtypes = {getattr(trt, n): getattr(torch, n) for n in ("float32", "float16", "bfloat16", "int32", "int64",
                                                                 "int8", "bool")}
        self.input_dtype = dtypes[engine.get_tensor_dtype(INPUT)]
        self.context.set_input_shape(INPUT, (max_batch, *image))  # output shapes at the largest batch
        self.outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)),
                                       dtype=dtypes[engine.get_tensor_dtype(n)], device=device) for n in outputs}
        num_labels = self.outputs["logits"].shape[-1]
        if num_labels != len(labels.names):
            raise ModelLoadError(f"{engine_path}: output 'logits' has {num_labels} labels, the classifier's "
                                 f"config.json {len(labels.names)}")

    @property
    def precision(self) -> str:
        return "fp16" if "FP16" in self.flags else "fp32"

    @classmethod
    def load(cls, path: Path, model_dir: Path, preprocess: PreprocessSpec, device: torch.device, max_batch: int,
             dtype: torch.dtype = torch.float16, cache_dir: Path | None = None) -> TensorRTClassifier:
        path, model_dir, device = Path(path), Path(model_dir), torch.device(device)
        trt = import_tensorrt(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        check_preprocess(path, export_entry(path), preprocess, model_dir)
        config = model_dir / "config.json"
        cfg = read_json(config)
        labels = Labels.from_config(cfg, str(config))
        flags = builder_flags(dtype)
        key = engine_key(path, device, trt.__version__, flags, max_batch)
        cache = EngineCache(cache_dir or default_cache_dir())
        logger = tensorrt_logger(trt)
        with torch.cuda.device(device):  # TensorRT builds and deserializes on the current CUDA device
            runtime = trt.Runtime(logger)
            engine, cached = cache.load(key, lambda: build_engine(trt, logger, path, preprocess, flags, max_batch),
                                        runtime.deserialize_cuda_engine)
            model = cls(trt, LoadedEngine(logger, runtime, engine), cfg.get("model_type"), labels, device,
                        max_batch, flags, cache.path(key), cached, (3, preprocess.height, preprocess.width))
        log.info("%s: classifier on TensorRT %s, %s engine %s (%s), batch 1..%d", path, trt.__version__,
                 model.precision, cache.path(key), "cached" if cached else "built", max_batch)
        return model

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixel_values.to(self.device, self.input_dtype).contiguous()
        b = x.shape[0]
        assert 1 <= b <= self.max_batch, f"batch {b} outside the engine's profile 1..{self.max_batch}"
        self.context.set_input_shape(INPUT, tuple(x.shape))
        self.context.set_tensor_address(INPUT, x.data_ptr())
        for name, buffer in self.outputs.items():  # outputs at batch b fill each buffer's first b rows
            self.context.set_tensor_address(name, buffer.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.engine_path}: TensorRT failed to enqueue batch {b}; its log says why")
        return self.outputs["p_roadwork"][:b].float(), self.outputs["logits"][:b]
