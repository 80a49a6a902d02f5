"""Reading config files (config.json, preprocessor_config.json, cascade.toml): typed lookups whose errors name the
file and the key, raised as ModelLoadError."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from runtime.errors import ModelLoadError

REQUIRED = object()  # the default of a key that must be present


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigReader:
    """One config object (a JSON object or a TOML table) being read. `source` names it in every error (the file,
    and the stage or sub-object); `word` is what its entries are called there ("field" in JSON, "key" in TOML).
    With `known`, keys outside it are rejected up front."""

    def __init__(self, data: dict, source: str, known: tuple[str, ...] | None = None, word: str = "field"):
        self.data, self.source, self.word = data, source, word
        if known is not None and self.unknown(known):
            self.fail(f"unknown {word} '{self.unknown(known)[0]}' (known {word}s: {', '.join(known)})")

    def fail(self, message: str) -> NoReturn:
        raise ModelLoadError(f"{self.source}: {message}")

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    def unknown(self, known) -> list[str]:
        return sorted(set(self.data) - set(known))

    def get(self, key: str, kind: type | tuple[type, ...], default=REQUIRED):
        """The value of `key` as `kind` (an int is accepted as a float; a bool is never a number); `default` when
        the key is absent."""
        if key not in self.data:
            if default is REQUIRED:
                self.fail(f"missing required {self.word} '{key}'")
            return default
        value = self.data[key]
        if (kind is float or (isinstance(kind, tuple) and float in kind)) and _is_int(value):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(f"{self.word} '{key}' must be {name}, got {value!r}")
        return value

    def number(self, key: str, default, low: float = float("-inf"), high: float = float("inf"),
               low_open: bool = False, high_open: bool = False) -> float | None:
        """A float in the interval [low, high] (either end open); a None default passes through."""
        value = self.get(key, float, default)
        if value is None:
            return None
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            self.fail(f"{self.word} '{key}' must be in {interval}, got {value}")
        return value

    def int_list(self, key: str, default=REQUIRED) -> tuple[int, ...]:
        if default is REQUIRED and key not in self.data:
            self.fail(f"missing required {self.word} '{key}'")
        value = self.data.get(key, default)
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            self.fail(f"{self.word} '{key}' must be a list of ints, got {value!r}")
        return tuple(value)

    def choice(self, key: str, default: str, allowed: tuple[str, ...], why: str = "") -> str:
        value = self.data.get(key, default)
        if value not in allowed:
            self.fail(f"{key}={value!r} is not supported (supported: {', '.join(allowed)}){why}")
        return value

    def pair(self, key: str, default) -> tuple[int, int]:
        """An int or a 2-sequence of ints (image_size, patch_size) as (height, width)."""
        value = self.data.get(key, default)
        if _is_int(value):
            return value, value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
            return int(value[0]), int(value[1])
        self.fail(f"{self.word} '{key}' must be an int or [height, width], got {value!r}")

    def id2label(self) -> dict[int, str]:
        """A transformers config's labels: `id2label` with ids 0..n-1, else LABEL_i for `num_labels` (default 2),
        as transformers names them."""
        id2label = self.data.get("id2label")
        if not id2label:
            return {i: f"LABEL_{i}" for i in range(self.get("num_labels", int, 2))}
        try:
            labels = {int(k): str(v) for k, v in id2label.items()}
        except (ValueError, TypeError, AttributeError):
            self.fail(f"id2label must map integer ids to names, got {id2label!r}")
        self.check(sorted(labels) == list(range(len(labels))),
                   f"id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)}")
        return labels

    def table(self, key: str, known: tuple[str, ...] | None = None) -> ConfigReader:
        """The object under `key`, read with the same rules; errors name it as `source key`."""
        return ConfigReader(self.get(key, dict), f"{self.source} {key}", known, self.word)
