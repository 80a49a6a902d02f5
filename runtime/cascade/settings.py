"""The engine flags, defined once for every front end that loads an Engine (python -m server, tools.eval, tools.score,
tools.tune, python -m miner, bench.load, bench.score): --model, --device, --dtype, --quantize, --max-batch,
--precision-cache and --backend, with one set of choices, defaults, help and checks, parsed into one EngineSettings."""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.options import BACKEND_MODES, DTYPE_MODES, MAX_BATCH, QUANTIZE_MODES, default_max_batch
from runtime.models.precision_cache import default_path as default_precision_cache

if TYPE_CHECKING:  # the engine pulls in torch; --help and argument errors answer without it
    from runtime.cascade.engine import Engine

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "bundles" / "default"
ENV_PREFIX = "ROADWORK_"


def flag(name: str) -> str:
    """A settings field's command-line flag: errors name what the user types (max_batch -> --max-batch)."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True)
class EngineSettings:
    model: Path = DEFAULT_MODEL_DIR
    device: str = "cpu"
    dtype: str = "auto"                   # "auto": measured at startup (runtime/models/auto_precision.py)
    quantize: str = "auto"                # "auto": models cascade.toml leaves unset are measured; else every one
    max_batch: int | None = None          # images per Engine.predict call; None: the device's (batch_size)
    precision_cache: str = "default"      # auto's measurements across starts: "default", "off" or a file
    backend: str = "auto"                 # the classifier's; "auto": cascade.toml's `backend` (torch where unset)

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch <= 0:
            raise ValueError(f"--max-batch must be > 0, got {self.max_batch}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPE_MODES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_MODES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.backend not in BACKEND_MODES:
            raise ValueError(f"--backend must be one of {', '.join(BACKEND_MODES)}, got {self.backend!r}")

    @property
    def batch_size(self) -> int:
        """max_batch, else the device's default (runtime/options.py)."""
        return self.max_batch if self.max_batch is not None else default_max_batch(self.device)

    @property
    def precision_cache_path(self) -> Path | None:
        if self.precision_cache == "off":
            return None
        return default_precision_cache() if self.precision_cache == "default" else Path(self.precision_cache)

    def load(self) -> Engine:
        from runtime.cascade.engine import Engine

        return Engine.load(self.model, self.device, self.dtype, self.batch_size, self.quantize,
                           self.precision_cache_path, self.backend)

    def argv(self) -> list[str]:
        """The flags that give these settings, for a front end started as another process (bench.load's server)."""
        return [arg for f in fields(EngineSettings) if getattr(self, f.name) is not None
                for arg in (flag(f.name), str(getattr(self, f.name)))]


# "%(default)s": the default in force (the server's may come from ROADWORK_<OPTION>); its presence also keeps the
# miner's ArgumentDefaultsHelpFormatter from adding a second one (max_batch's "%(default).0s" prints nothing).
ENGINE_HELP = {
    "model": "bundle directory (cascade.toml) or Hugging Face classifier directory",
    "device": "cpu, cuda or cuda:N (default %(default)s)",
    "dtype": "auto, float32, bfloat16 or float16 (default %(default)s); auto measures the candidates on this CPU at "
             "startup and picks the fastest whose drift against fp32 is within bounds (never slower than fp32; on "
             "CUDA: bf16, else fp16). An explicit slower-than-fp32 choice is kept with a warning",
    "quantize": "auto, none, int8 (torch._int_mm), int8-fbgemm or int8-onednn for every classifier and detector, "
                "over cascade.toml's per-model 'quantize' (default %(default)s); auto: measured with --dtype, for the "
                "models cascade.toml leaves unset",
    "precision_cache": "JSON file keeping auto's measurements across starts, keyed by the model's bytes, the CPU, "
                       "the library versions and the settings: a start that finds its key runs the same "
                       "precision without measuring; 'off' measures every start; 'default' is "
                       "$XDG_CACHE_HOME/roadwork-cascade/precision.json, else ~/.cache/... (default %(default)s)",
    "backend": "auto, torch, onnxruntime or tensorrt: what runs the classifier, over cascade.toml's 'backend' "
               "(default %(default)s); onnxruntime runs the graph python -m tools.export wrote, named by the "
               "classifier's 'onnx' key (the onnx extra), tensorrt builds it into a cached TensorRT engine (CUDA, "
               "the tensorrt extra); auto: cascade.toml's, torch where unset",
    "max_batch": f"largest batch per model call (default {MAX_BATCH['cpu']} on cpu, {MAX_BATCH['cuda']} on "
                 f"cuda)%(default).0s",
}


def env_default(parser: argparse.ArgumentParser, environ: Mapping[str, str], name: str, kind: type, default):
    """ROADWORK_<NAME> from `environ` as `kind`, else `default`; a value `kind` rejects is a usage error."""
    env = env_name(name)
    if env not in environ:
        return default
    try:
        return kind(environ[env])
    except ValueError:
        parser.error(f"environment variable {env}={environ[env]!r} is not a valid {kind.__name__}")


def add_engine_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None,
                     model: bool = True) -> None:
    """The engine flags, as their own group. `environ`: take defaults from ROADWORK_<OPTION> there (the server).
    `model=False`: the front end takes the model its own way (tools.eval's positional, the miner's --model that
    is one of two sources) with ENGINE_HELP["model"]."""
    group = parser.add_argument_group("engine")
    defaults = EngineSettings()
    for f in fields(EngineSettings):
        if f.name == "model" and not model:
            continue
        kind = {"model": Path, "max_batch": int}.get(f.name, str)
        default, help_text = getattr(defaults, f.name), ENGINE_HELP[f.name]
        if f.name == "model":
            help_text += " (default %(default)s)"
        if environ is not None:
            default = env_default(parser, environ, f.name, kind, default)
            help_text += f" [{env_name(f.name)}]"
        choices = {"dtype": DTYPE_MODES, "quantize": QUANTIZE_MODES, "backend": BACKEND_MODES}.get(f.name)
        group.add_argument(flag(f.name), type=kind, default=default, choices=choices, help=help_text)


def engine_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineSettings:
    """The engine flags' values as one EngineSettings; a bad one is a usage error naming its flag."""
    try:
        return EngineSettings(**{f.name: getattr(args, f.name) for f in fields(EngineSettings)})
    except ValueError as e:
        parser.error(str(e))
