"""Server settings: one dataclass, filled from the command line with environment-variable defaults."""
from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from runtime.cascade.settings import ENV_PREFIX, EngineSettings, add_engine_flags, env_default, env_name, flag
from runtime.options import REQUEST_DEADLINE_S

log = logging.getLogger(__name__)

LOG_FORMATS = ("text", "json")
# ROADWORK_* variables that are not server options but are read in this environment: graphs/nvtx.py's switch, and
# deploy/'s pm2 and compose settings (pm2 hands its environment on to every replica).
OTHER_ENV = ("ROADWORK_NVTX", "ROADWORK_REPLICAS", "ROADWORK_BASE_PORT", "ROADWORK_DEVICES", "ROADWORK_PYTHON",
             "ROADWORK_LOG_DIR", "ROADWORK_BUILD_DEVICE", "ROADWORK_IMAGE")


@dataclass(frozen=True)
class ServerConfig(EngineSettings):
    """The engine flags (runtime/cascade/settings.py) and the server's own."""
    host: str = "127.0.0.1"
    port: int = 8080
    max_delay_ms: float = 5.0             # longest an image waits for its batch to fill
    queue_size: int = 1024                # images being decoded or waiting for a batch; beyond this: 503
    timeout_s: float = REQUEST_DEADLINE_S  # per-request deadline (the validator's timeout)
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
    log_format: str = "text"              # "json": one JSON object per log line (server/logs.py)
    hardcases: Path | None = None         # capture hard cases into this directory (off when None)
    hardcases_rules: Path | None = None   # TOML with the capture rates and caps (imagesets/hardcase_capture.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        # Errors name the flags: parse_config shows them as usage errors.
        positive = ("queue_size", "timeout_s", "max_body_mb", "max_pixels", "max_batch_images",
                    "decode_threads", "body_memory_mb", "max_jpeg_scans", "decode_memory_mb", "max_explanations",
                    "keepalive_timeout_s", "max_connections", "max_connections_per_ip",
                    "redis_ttl_s", "redis_timeout_ms")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("max_delay_ms", "cache_entries", "cache_mb", "cache_ttl_s", "shutdown_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be text or json, got {self.log_format!r}")
        if self.redis_url is not None and not re.match(r"(redis|rediss|unix)://", self.redis_url):
            raise ValueError(f"--redis-url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"--max-aspect-ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.body_memory_mb < self.max_body_mb:
            raise ValueError(f"--body-memory-mb ({self.body_memory_mb}) must be >= --max-body-mb ({self.max_body_mb}): "
                             f"the largest allowed body must fit")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.hardcases_rules is not None and self.hardcases is None:
            raise ValueError("--hardcases-rules needs --hardcases (the directory to capture into)")

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
    "host": "address to bind (default 127.0.0.1)",
    "port": "TCP port; 0 picks a free one (default 8080)",
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
    "log_format": "text, or json: one JSON object a line (time, level, logger, message; request_id on every line "
                  "about a request) for log collectors (default text)",
    "hardcases": "capture hard cases (near the threshold, stages disagreeing, degraded, VLM-decided, ?capture=1) "
                 "into this directory as a FiftyOne dataset (default: off)",
    "hardcases_rules": "TOML file with the capture rates per rule and the caps (default: built-in rates and caps)",
}


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
    add_engine_flags(parser, environ)
    engine = {f.name for f in fields(EngineSettings)}
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        if f.name in engine:
            continue
        env = env_name(f.name)
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} [{env}]"
        if f.name == "access_log":
            if env in environ:
                try:
                    default = _parse_bool(environ[env])
                except ValueError as e:
                    parser.error(f"environment variable {env}: {e}")
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = {"hardcases": Path, "hardcases_rules": Path, "redis_url": str}.get(f.name, type(default))
        choices = {"log_level": ["debug", "info", "warning", "error"], "log_format": list(LOG_FORMATS)}.get(f.name)
        default = env_default(parser, environ, f.name, kind, default)
        parser.add_argument(flag(f.name), type=kind, default=default, choices=choices, help=help_text)
    return parser


def warn_unknown_env(environ: Mapping[str, str]) -> None:
    """One warning per ROADWORK_* variable that nothing reads, naming the closest one that is read: a misspelt
    setting would otherwise be ignored without a word."""
    known = [env_name(f.name) for f in fields(ServerConfig)] + list(OTHER_ENV)
    options = [k.removeprefix(ENV_PREFIX) for k in known]  # compared without the prefix every name shares
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), options, n=1)
        log.warning("environment variable %s is not a setting%s; it is ignored", name,
                    f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else "")


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Command line over environment over defaults; exits with a usage error on a bad value. Warns once about
    ROADWORK_* variables that are no setting."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    warn_unknown_env(environ)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))
