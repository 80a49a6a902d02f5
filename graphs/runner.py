"""Run batched model code over fixed batch buckets with static buffers.

`BucketGraphs` runs a segment function fn(bucket) that reads and writes static max-batch buffers. On CUDA each
bucket is captured once as a CUDA graph (largest first, in one memory pool that several segments may share) and
replayed; on CPU the same function runs eagerly, so shapes stay few and per-shape caches stay warm.
`GraphRunner` is the common case: one static input batch, fn(input[:bucket]) -> outputs."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

GraphFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
SegmentFn = Callable[[int], tuple[torch.Tensor, ...]]


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, plus max_batch itself."""
    assert max_batch >= 1
    buckets = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch}
    return tuple(sorted(buckets))


class BucketGraphs:
    def __init__(self, fn: SegmentFn, buckets: tuple[int, ...], device: torch.device | str,
                 use_cuda_graphs: bool | None = None):
        assert buckets and list(buckets) == sorted(set(buckets)) and buckets[0] >= 1, f"bad buckets {buckets}"
        self.fn = fn
        self.buckets = buckets
        self.max_batch = buckets[-1]
        self.device = torch.device(device)
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def bucket_for(self, n: int) -> int:
        assert 1 <= n <= self.max_batch, f"batch of {n} does not fit buckets {self.buckets}"
        return next(b for b in self.buckets if b >= n)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, count) pieces of a batch of n, each fitting the largest bucket."""
        return [(s, min(self.max_batch, n - s)) for s in range(0, n, self.max_batch)]

    def on_device(self):
        """Graphs of a stage on another GPU are captured and replayed with that GPU current."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def warmup(self, pool: tuple | None = None) -> None:
        """Run every bucket once; on CUDA also capture one graph per bucket, largest first, in `pool` (a
        torch.cuda.graph_pool_handle() shared with other segments of the same device, or a new one)."""
        for b in reversed(self.buckets):
            self.fn(b)
        if not self.use_cuda_graphs:
            return
        with self.on_device():
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # let lazy init (cuBLAS workspaces, autotuning) happen outside capture
                    self.fn(self.max_batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.fn(b)
                self.graphs[b] = graph
            torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for buckets %s on %s", self.buckets, self.device)

    @torch.inference_mode()
    def replay(self, b: int) -> tuple[torch.Tensor, ...]:
        """Run bucket b. On CUDA the returned tensors are static buffers: read them before the next replay."""
        assert b in self.buckets, (b, self.buckets)
        if b not in self.graphs:
            return self.fn(b)
        with self.on_device():
            self.graphs[b].replay()
        return self.outputs[b]


class GraphRunner(BucketGraphs):
    def __init__(self, fn: GraphFn, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 buckets: tuple[int, ...], use_cuda_graphs: bool | None = None):
        super().__init__(lambda b: fn(self.input[:b]), buckets, device, use_cuda_graphs)
        # One input buffer; smaller buckets are leading views of it.
        self.input = torch.zeros((self.max_batch, *sample_shape), dtype=dtype, device=self.device)
        # Rows in use (the rest of the bucket is padding), for code that must tell them apart on the device.
        self.rows = torch.zeros(1, dtype=torch.int32, device=self.device)

    def run(self, n: int) -> tuple[torch.Tensor, ...]:
        """Compute the first n rows of the static input, padded to their bucket. The returned tensors are
        views of static buffers on CUDA: copy them before the next run."""
        b = self.bucket_for(n)
        with self.on_device():
            self.rows.fill_(n)
        return tuple(o[:n] for o in self.replay(b))
