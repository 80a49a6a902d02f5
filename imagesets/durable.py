"""Crash-safe file writes: a reader sees a whole old or a whole new file, and an append-only log never keeps half a
line (kill -9 or power loss after fsync)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Readers see the old file or the whole new one, never part of it; durable once this returns."""
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{time.monotonic_ns()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def cut_torn_tail(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline: cut it (durably), so the next append starts on a
    line of its own and no reader sees half a record."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        content = f.read()
        end = content.rfind(b"\n") + 1
        if end != len(content):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
