"""The interface every stage kind implements; the cascade (pipeline.py) runs stages through it alone.

Adding a stage kind: a spec dataclass and its parser entry (bundle.py), a class implementing Stage, and its line
in build.py's LATER_STAGES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from graphs.runner import BucketGraphs
from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import StageSpec
from runtime.cascade.results import StageAnswer


@dataclass
class ChunkImages:
    """The images of one chunk, as every stage may want them."""
    host: list[torch.Tensor]  # (H, W, 3) uint8 views of the decoded arrays (zero-copy, CPU)
    device: list[torch.Tensor]  # the same on the first stage's device
    deadline: float | None = None  # time.monotonic() after which nobody wants the chunk's answers; None: not given


GraphPools = dict[torch.device, tuple]  # one CUDA graph memory pool per device, shared by its captured segments


def warm_segment(segment: BucketGraphs, pools: GraphPools) -> None:
    """Warm a BucketGraphs segment; on CUDA its captures share the pool of its device."""
    if segment.use_cuda_graphs and segment.device not in pools:
        with segment.on_device():
            pools[segment.device] = torch.cuda.graph_pool_handle()
    segment.warmup(pools.get(segment.device))


class Stage(Protocol):
    name: str
    spec: StageSpec  # its cascade.toml entry; spec.kind says which kind of stage it is
    breaker: Breaker | None  # None: the stage cannot be skipped (the first stage: nothing earlier answered)
    time_budget_s: float | None  # a call slower than this counts as a failure; None: no budget

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        """Answers for the `pending` rows of the chunk, in order (each with its goes_on decision)."""
        ...

    def warmup(self, pools: GraphPools) -> None:
        """Run every shape once (on CUDA: capture graphs into the device's pool in `pools`)."""
        ...

    def describe(self) -> dict:
        ...
