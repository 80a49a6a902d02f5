"""Read a Hugging Face model directory's config.json into plain dicts with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import ModelLoadError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(cfg: dict, key: str, kind: type | tuple[type, ...], source: str = "config.json"):
    if key not in cfg:
        raise ModelLoadError(f"{source}: missing required field '{key}'")
    value = cfg[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelLoadError(f"{source}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def pair(value, key: str, source: str = "config.json") -> tuple[int, int]:
    """An int or a 2-sequence of ints (image_size, patch_size) as (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ModelLoadError(f"{source}: field '{key}' must be an int or [height, width], got {value!r}")
