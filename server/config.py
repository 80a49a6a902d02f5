"""Server settings: one dataclass, filled from the command line with environment-variable defaults."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from runtime.cascade.bundle import QUANTIZE_MODES
from runtime.models.precision_cache import default_path as default_precision_cache

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "bundles" / "default"
ENV_PREFIX = "ROADWORK_"


CPU_BATCH, CUDA_BATCH = 8, 32  # default max_batch per device
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServerConfig:
    model: Path = DEFAULT_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "cpu"
    dtype: str = "auto"                   # "auto": measured at startup (runtime/models/precision.py)
    quantize: str = "auto"                # "auto": models cascade.toml leaves unset are measured; else every one
    precision_cache: str = "default"      # auto's measurements across starts: "default", "off" or a file
    max_batch: int | None = None          # images per Engine.predict call; None: the device's (batch_size)
    max_delay_ms: float = 5.0             # longest an image waits for its batch to fill
    queue_size: int = 1024                # images being decoded or waiting for a batch; beyond this: 503
    timeout_s: float = 9.0                # per-request deadline (the validator's timeout)
    max_body_mb: float = 32.0
    body_memory_mb: float = 256.0         # request bodies being read and parsed at once; beyond: 503
    max_pixels: int = 16_777_216          # decoded width*height limit (422 above; big JPEGs decode reduced)
    max_aspect_ratio: float = 20.0        # longer side / shorter side (422 above)
    max_jpeg_scans: int = 64              # scans in one JPEG (422 above)
    decode_memory_mb: float = 1024.0      # decodes' estimated peaks + queued images' arrays; beyond: 503
    max_batch_images: int = 256           # images in one /v1/predict/batch request (413 above)
    decode_threads: int = 4
    max_explanations: int = 4             # explanations being decoded at once; beyond: 503
    keepalive_timeout_s: float = 5.0      # idle connections, and requests whose headers do not arrive, close
    max_connections: int = 1024           # open connections in all; beyond, new ones get 503 and are closed
    max_connections_per_ip: int = 128     # open connections from one client address
    cache_entries: int = 100_000          # 0 disables the result cache
    cache_mb: float = 64.0
    cache_ttl_s: float = 3600.0
    shutdown_timeout_s: float = 30.0      # how long SIGTERM waits for in-flight requests
    redis_url: str | None = None          # the shared result cache (server/redis_cache.py); None: in-process only
    redis_ttl_s: float = 3600.0
    redis_timeout_ms: float = 5.0         # deadline of every Redis call; slower counts as a failure
    access_log: bool = False
    log_level: str = "info"
    hardcases: Path | None = None         # capture hard cases into this directory (off when None)
    hardcases_rules: Path | None = None   # TOML with the capture rates and caps (server/hardcase_capture.py)

    def __post_init__(self) -> None:
        positive = ("max_batch", "queue_size", "timeout_s", "max_body_mb", "max_pixels", "max_batch_images",
                    "decode_threads", "body_memory_mb", "max_jpeg_scans", "decode_memory_mb", "max_explanations",
                    "keepalive_timeout_s", "max_connections", "max_connections_per_ip",
                    "redis_ttl_s", "redis_timeout_ms")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_delay_ms", "cache_entries", "cache_mb", "cache_ttl_s", "shutdown_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.redis_url is not None and not re.match(r"(redis|rediss|unix)://", self.redis_url):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.body_memory_mb < self.max_body_mb:
            raise ValueError(f"body_memory_mb ({self.body_memory_mb}) must be >= max_body_mb ({self.max_body_mb}): "
                             f"the largest allowed body must fit")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.hardcases_rules is not None and self.hardcases is None:
            raise ValueError("hardcases_rules needs hardcases (the directory to capture into)")

    @property
    def batch_size(self) -> int:
        """max_batch, else 8 on CPU and 32 on CUDA: on CPU, ViT-B/16 runs slower per image at batch 32 than at 8
        (BENCHMARKS.md, sections 3 and 5)."""
        if self.max_batch is not None:
            return self.max_batch
        return CPU_BATCH if self.device == "cpu" else CUDA_BATCH

    @property
    def precision_cache_path(self) -> Path | None:
        if self.precision_cache == "off":
            return None
        return default_precision_cache() if self.precision_cache == "default" else Path(self.precision_cache)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def body_memory_bytes(self) -> int:
        return int(self.body_memory_mb * 2**20)

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * 2**20)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 2**20)


_HELP = {
    "model": "bundle directory (cascade.toml) or Hugging Face classifier directory; default: bundles/default",
    "host": "address to bind (default 127.0.0.1)",
    "port": "TCP port; 0 picks a free one (default 8080)",
    "device": "cpu, cuda or cuda:N (default cpu)",
    "dtype": "auto, float32, bfloat16 or float16; auto (default) measures the candidates on this CPU at startup "
             "and picks the fastest whose drift against fp32 is within bounds (never slower than fp32; on CUDA: "
             "bf16, else fp16). An explicit slower-than-fp32 choice is kept with a warning",
    "quantize": "auto, none, int8 (torch._int_mm), int8-fbgemm or int8-onednn for every classifier and detector, "
                "over cascade.toml's per-model 'quantize'; auto (default): measured with --dtype, for the models "
                "cascade.toml leaves unset",
    "precision_cache": "JSON file keeping auto's measurements across starts, keyed by the model's bytes, the CPU, "
                       "the library versions and the settings: a start that finds its key serves the same "
                       "precision without measuring; 'off' measures every start (default: 'default', "
                       "$XDG_CACHE_HOME/roadwork-cascade/precision.json, else ~/.cache/...)",
    "max_batch": f"largest batch per model call (default {CPU_BATCH} on cpu, {CUDA_BATCH} on cuda)",
    "max_delay_ms": "longest a request waits for its batch to fill, in ms; 0 runs whatever is queued as soon as "
                    "the model is free (default 5)",
    "queue_size": "images admitted at once (being decoded or waiting for a batch); beyond it requests get 503 "
                  "with Retry-After at once (default 1024)",
    "timeout_s": "per-request deadline in seconds; work not started by then is dropped with 504 (default 9)",
    "max_body_mb": "largest request body in MiB; larger answers 413 before it is read (default 32)",
    "body_memory_mb": "request bodies being read and parsed at once, in MiB (Content-Length, or max-body-mb when "
                      "chunked); beyond it requests get 503 with Retry-After before their body is read (default 256)",
    "max_pixels": "largest decoded image, width*height; JPEGs above it decode at 1/2, 1/4 or 1/8 scale when that "
                  "fits, others answer 422 (default 16777216: phones' 12 MP fit)",
    "max_aspect_ratio": "largest longer-side/shorter-side ratio of an image; above it answers 422 (default 20)",
    "max_jpeg_scans": "most scans in one JPEG (each is a pass over the whole image); more answers 422 (default 64)",
    "decode_memory_mb": "images admitted at once, in MiB: each decode's peak estimated from its header, then its "
                        "decoded array until its batch is done; beyond it requests get 503 (default 1024)",
    "max_batch_images": "most images in one /v1/predict/batch request; more answers 413 (default 256)",
    "decode_threads": "threads decoding images (default 4)",
    "max_explanations": "explanations (explain=1, /v1/predict/stream) decoding at once; more get 503 with "
                        "Retry-After (default 4)",
    "keepalive_timeout_s": "seconds an idle connection stays open, and the longest a request's headers may take to "
                           "arrive; the body must arrive within the request deadline (default 5)",
    "max_connections": "open connections in all; new ones beyond it get 503 and are closed (default 1024)",
    "max_connections_per_ip": "open connections from one client address; beyond it 503 and closed (default 128)",
    "cache_entries": "result cache entries; 0 disables the cache (default 100000)",
    "cache_mb": "result cache size bound in MiB (default 64)",
    "cache_ttl_s": "seconds a cached result stays valid (default 3600)",
    "shutdown_timeout_s": "seconds SIGTERM may take in all: in-flight requests, then the decode and inference "
                          "threads; past it the process exits anyway (default 30)",
    "redis_url": "shared result cache behind the in-process one, e.g. redis://127.0.0.1:6379/0; answers are "
                 "keyed by the bundle's content digest, so every replica of one bundle shares them (default: none)",
    "redis_ttl_s": "seconds a shared (Redis) result stays valid (default 3600)",
    "redis_timeout_ms": "deadline of every Redis call in ms; a slower call is a miss, counted as an error "
                        "(default 5)",
    "access_log": "log one aiohttp access line per request",
    "log_level": "debug, info, warning or error (default info); debug adds one structured line per request",
    "hardcases": "capture hard cases (near the threshold, stages disagreeing, degraded, VLM-decided, ?capture=1) "
                 "into this directory as a FiftyOne dataset (default: off)",
    "hardcases_rules": "TOML file with the capture rates per rule and the caps (default: built-in rates and caps)",
}


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def package_version() -> str:
    try:
        return importlib.metadata.version("roadwork-cascade")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree without pip install)"


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve roadwork predictions over HTTP. Every option can also be set with the environment "
                    f"variable named in brackets ({ENV_PREFIX}<OPTION>); the command line wins.",
    )
    parser.add_argument("--version", action="version", version=f"roadwork-cascade {package_version()}")
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = _env_name(f.name)
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} [{env}]"
        if f.name == "access_log":
            if env in environ:
                try:
                    default = _parse_bool(environ[env])
                except ValueError as e:
                    parser.error(f"environment variable {env}: {e}")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = {"model": Path, "dtype": str, "quantize": str, "max_batch": int, "hardcases": Path,
                "hardcases_rules": Path, "redis_url": str}.get(f.name, type(default))
        choices = {"dtype": list(DTYPE_CHOICES), "quantize": list(QUANTIZE_MODES),
                   "log_level": ["debug", "info", "warning", "error"]}.get(f.name)
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.error(f"environment variable {env}={environ[env]!r} is not a valid {kind.__name__}")
        parser.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Command line over environment over defaults; exits with a usage error on a bad value."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))
