"""A bundle's content digest: the same files give the same digest on every machine, so replicas that load copies of
one bundle share cached answers (server/redis_cache.py) and a changed model never reads an old model's answers."""
from __future__ import annotations

import hashlib
from pathlib import Path

from runtime.cascade.bundle import BUNDLE_FILE, Bundle

CHUNK_BYTES = 1 << 20


def model_dirs(bundle: Bundle) -> list[Path]:
    """Every model directory (or single model file: an .onnx) a bundle's stages read, in stage order."""
    return [directory for stage in bundle.stages for directory in stage.model_dirs()]


def bundle_digest(bundle: Bundle) -> str:
    """sha256 (hex) over cascade.toml and every file of every model directory (and every single model file), each
    named by its path relative to its directory (so a moved bundle keeps its digest), plus each stage's quantize
    mode (a command-line override changes answers without changing a file)."""
    h = hashlib.sha256()
    if bundle.from_toml:
        h.update(b"toml\0" + (bundle.root / BUNDLE_FILE).read_bytes())
    for directory in model_dirs(bundle):
        files = [directory] if directory.is_file() else sorted(p for p in directory.rglob("*") if p.is_file())
        for path in files:
            name = path.name if path == directory else path.relative_to(directory).as_posix()
            h.update(b"\0file\0" + name.encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    h.update(chunk)
    for stage in bundle.stages:
        modes = stage.quantize_modes() or [None]  # [None] for a VLM: digests stay what they were
        h.update(f"\0quantize\0{stage.name}={modes}".encode())
    return h.hexdigest()
