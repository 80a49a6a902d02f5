"""Run a batched model function over fixed batch buckets with static input/output buffers.

On CUDA each bucket is captured once as a CUDA graph (largest first, all in one memory pool) and replayed
after the caller writes its images into the static input. On CPU the same interface runs the function
eagerly on the bucket-sized view of the static input, so shapes stay few and per-shape caches stay warm."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

GraphFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, plus max_batch itself."""
    assert max_batch >= 1
    buckets = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch}
    return tuple(sorted(buckets))


class GraphRunner:
    def __init__(self, fn: GraphFn, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 buckets: tuple[int, ...], use_cuda_graphs: bool | None = None):
        assert buckets and list(buckets) == sorted(set(buckets)) and buckets[0] >= 1, f"bad buckets {buckets}"
        self.fn = fn
        self.buckets = buckets
        self.max_batch = buckets[-1]
        self.device = torch.device(device)
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        # One input buffer; smaller buckets are leading views of it.
        self.input = torch.zeros((self.max_batch, *sample_shape), dtype=dtype, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def bucket_for(self, n: int) -> int:
        assert 1 <= n <= self.max_batch, f"batch of {n} does not fit buckets {self.buckets}"
        return next(b for b in self.buckets if b >= n)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, count) pieces of a batch of n, each fitting the largest bucket."""
        return [(s, min(self.max_batch, n - s)) for s in range(0, n, self.max_batch)]

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run every bucket once; on CUDA also capture one graph per bucket, largest first, in a shared pool."""
        for b in reversed(self.buckets):
            self.fn(self.input[:b])
        if not self.use_cuda_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # let lazy init (cuBLAS workspaces, autotuning) happen outside capture
                self.fn(self.input)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.fn(self.input[:b])
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for buckets %s", self.buckets)

    @torch.inference_mode()
    def run(self, n: int) -> tuple[torch.Tensor, ...]:
        """Compute the first n rows of the static input, padded to their bucket. The returned tensors are
        views of static buffers on CUDA: copy them before the next run."""
        b = self.bucket_for(n)
        if b in self.graphs:
            self.graphs[b].replay()
            outputs = self.outputs[b]
        else:
            outputs = self.fn(self.input[:b])
        return tuple(o[:n] for o in outputs)
