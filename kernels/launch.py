"""Where a Triton kernel launches. Triton launches on the current CUDA device, not on its tensors' device, and the
threads that call our dispatchers (the inference worker, the VLM loop) do not all set one: every launch runs under
launch_device(tensor.device)."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def launch_device(device: torch.device) -> ContextManager:
    """That CUDA device made current for the block; nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
