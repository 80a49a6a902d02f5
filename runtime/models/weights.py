"""Read Hugging Face safetensors checkpoints (single file or sharded) and load them into modules by name."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from runtime.errors import WeightError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class skip_random_init(TorchFunctionMode):
    """Build modules without their random initialisation (`with skip_random_init(): model = Model(cfg)`).

    Filling a ViT-B's 86 M weights with random numbers takes longer than reading its checkpoint, and load_into
    then assigns every persistent tensor anyway (strictly: a missing one is an error). Only random fills are
    skipped, so buffers computed in __init__ (RoPE frequencies, constants) are still right. A torch function
    mode is per thread: other threads building modules meanwhile are unaffected."""

    SKIPPED = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                         "xavier_uniform_", "xavier_normal_", "orthogonal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, else model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pth")):
        raise WeightError(f"{model_dir}: only pickle checkpoints found; convert them to safetensors "
                          f"(pickled weights are never loaded)")
    raise WeightError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by name, on CPU in their stored dtype."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in tensors:
                        raise WeightError(f"tensor '{name}' appears in more than one shard ({path.name})")
                    tensors[name] = f.get_tensor(name)
        except WeightError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise WeightError(f"{path}: cannot read safetensors file: {e}") from e
    log.debug("read %d tensors from %s", len(tensors), model_dir)
    return tensors


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "",
              source: str = "checkpoint", key_of: Callable[[str], str] | None = None) -> set[str]:
    """Assign every persistent parameter/buffer of `module` from the checkpoint, cast to `dtype`.

    A module tensor `name` is read from `key_of(name)` (default `prefix + name`); each must exist with the
    exact shape. Returns the checkpoint keys consumed, for `check_all_used`."""
    key_of = key_of or (lambda name: prefix + name)
    state = {}
    for name, target in module.state_dict().items():
        key = key_of(name)
        if key not in tensors:
            raise WeightError(f"{source}: missing tensor '{key}' (expected shape {tuple(target.shape)})")
        src = tensors[key]
        if tuple(src.shape) != tuple(target.shape):
            raise WeightError(f"{source}: tensor '{key}' has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
        if not src.is_floating_point():
            raise WeightError(f"{source}: tensor '{key}' has dtype {src.dtype}, expected a floating-point tensor")
        state[name] = src.to(dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return {key_of(name) for name in state}


def check_all_used(tensors: dict[str, torch.Tensor], used: set[str], source: str,
                   ignore: tuple[str, ...] = ()) -> None:
    """Reject checkpoints with tensors no module consumed: they mean the config and weights disagree."""
    extra = sorted(k for k in tensors if k not in used and not k.startswith(ignore))
    if extra:
        shown = ", ".join(f"'{k}'" for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise WeightError(f"{source}: unexpected tensor {shown}{more} (not used by the configured model)")
