"""NVTX ranges that name the cascade's work in an Nsight Systems timeline (decode, preprocess, each stage, graph
replay, VLM prefill/decode steps, the vote).

Off unless ROADWORK_NVTX=1 (or set_enabled(True)): then a range is torch.cuda.nvtx.range_push/range_pop around the
block. Off, nvtx_range returns one shared no-op context, so an unprofiled server pays a global read per range.
Ranges are host-side markers: work inside a replayed CUDA graph shows up under the replay's range, not its own."""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Iterator

import torch

_OFF = contextlib.nullcontext()
_enabled = os.environ.get("ROADWORK_NVTX", "") == "1"


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


@contextlib.contextmanager
def _pushed(name: str) -> Iterator[None]:
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str) -> ContextManager[None]:
    """`with nvtx_range("classifier"): ...` marks the block when NVTX is on; a no-op otherwise."""
    return _pushed(name) if _enabled else _OFF
