"""Run batched model code over fixed batch buckets with static buffers.

`BucketGraphs` runs a segment function fn(bucket) that reads and writes static max-batch buffers. On CUDA each
bucket is captured once as a CUDA graph (largest first, in one memory pool that several segments may share) and
replayed; on CPU the same function runs eagerly, so shapes stay few and per-shape caches stay warm.
`GraphRunner` is the common case: one static input batch, fn(input[:bucket]) -> outputs.

Each graph set (one BucketGraphs) captures on a stream of its own, made with it and kept as long as its graphs.
cuBLAS keys workspaces by (handle, stream) and handles are per thread, so sets captured on one thread and one stream
would share a workspace: replayed at once (worker and VLM loop streams) they corrupt each other, and on torch
builds where destroying a graph clears its capture stream's workspaces (pytorch#193402), freeing one set frees
memory the others' graphs still use. `stream=` is always passed: without it torch.cuda.graph falls back to one
process-wide stream of whichever device was current at the first capture. An empty capture raises instead of
leaving a graph whose replay returns stale outputs.

close() releases a set at a defined time, graphs first. Owners hand in their own methods through weak_method:
a set holding a strong reference back to its owner is a cycle that only the cyclic GC frees, at a random time."""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from functools import partial
from typing import Callable

import torch

from graphs.nvtx import nvtx_range

log = logging.getLogger(__name__)

EMPTY_GRAPH_WARNING = "The CUDA Graph is empty"  # what torch's CUDAGraph::capture_end warns with

GraphFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
SegmentFn = Callable[[int], tuple[torch.Tensor, ...]]


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, plus max_batch itself."""
    assert max_batch >= 1
    buckets = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch}
    return tuple(sorted(buckets))


def cuda_device(device: torch.device | str) -> torch.device:
    """A CUDA device with its index: "cuda" means the current device, and streams and pools are per index."""
    device = torch.device(device)
    assert device.type == "cuda", device
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def weak_method(method: Callable) -> Callable:
    """`method` without a strong reference to its object, for an object's segment stored on its own graph set."""
    ref = weakref.WeakMethod(method)
    return lambda *args: ref()(*args)


def capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], tuple[torch.Tensor, ...]], stream: torch.cuda.Stream,
            pool: tuple | None, what: str) -> tuple[torch.Tensor, ...]:
    """fn() captured into `graph` on `stream`; raises if the capture recorded no work."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = fn()
    for w in caught:
        if EMPTY_GRAPH_WARNING in str(w.message):
            raise RuntimeError(f"CUDA graph capture of {what} on {stream.device} recorded no work: the kernels ran "
                               f"on another device or stream, so replaying it would leave stale outputs")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return outputs


class BucketGraphs:
    def __init__(self, fn: SegmentFn, buckets: tuple[int, ...], device: torch.device | str,
                 use_cuda_graphs: bool | None = None):
        assert buckets and list(buckets) == sorted(set(buckets)) and buckets[0] >= 1, f"bad buckets {buckets}"
        self.fn = fn
        self.buckets = buckets
        self.max_batch = buckets[-1]
        self.device = cuda_device(device) if torch.device(device).type == "cuda" else torch.device(device)
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        # This set's own capture stream (module docstring); it must outlive the graphs.
        self.stream = torch.cuda.Stream(self.device) if self.use_cuda_graphs else None
        self.range_names = {b: f"bucket {b}" for b in buckets}  # NVTX, made once: replays stay allocation-free

    def bucket_for(self, n: int) -> int:
        assert 1 <= n <= self.max_batch, f"batch of {n} does not fit buckets {self.buckets}"
        return next(b for b in self.buckets if b >= n)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, count) pieces of a batch of n, each fitting the largest bucket."""
        return [(s, min(self.max_batch, n - s)) for s in range(0, n, self.max_batch)]

    def on_device(self):
        """Graphs of a stage on another GPU are captured and replayed with that GPU current."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def forward(self, b: int) -> tuple[torch.Tensor, ...]:
        """Bucket b, eagerly."""
        return self.fn(b)

    @torch.inference_mode()
    def warmup(self, pool: tuple | None = None) -> None:
        """Run every bucket once; on CUDA also capture one graph per bucket, largest first, in `pool` (a
        torch.cuda.graph_pool_handle() shared with other segments of the same device, or a new one). All of it
        with this segment's device current, so kernels launch where their tensors are."""
        with self.on_device():
            for b in reversed(self.buckets):
                self.forward(b)
            if not self.use_cuda_graphs:
                return
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for _ in range(2):  # let lazy init (cuBLAS workspaces, autotuning) happen outside capture
                    self.forward(self.max_batch)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                self.outputs[b] = capture(graph, partial(self.forward, b), self.stream, pool, f"bucket {b}")
                self.graphs[b] = graph
            torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for buckets %s on %s", self.buckets, self.device)

    @torch.inference_mode()
    def replay(self, b: int) -> tuple[torch.Tensor, ...]:
        """Run bucket b. On CUDA the returned tensors are static buffers: read them before the next replay."""
        assert b in self.buckets, (b, self.buckets)
        with self.on_device(), nvtx_range(self.range_names[b]):
            if b not in self.graphs:
                return self.forward(b)
            self.graphs[b].replay()
        return self.outputs[b]

    def close(self) -> None:
        """Release the graphs, then their outputs (memory of the pool), then the capture stream whose cuBLAS
        workspace the graphs read. Idempotent; later calls run eagerly (an engine predicts after close, with its
        VLM stage closed)."""
        if self.graphs:
            torch.cuda.synchronize(self.device)  # no replay still in flight
        self.graphs.clear()
        self.outputs.clear()
        self.stream = None
        self.use_cuda_graphs = False


class GraphRunner(BucketGraphs):
    def __init__(self, fn: GraphFn, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 buckets: tuple[int, ...], use_cuda_graphs: bool | None = None):
        super().__init__(fn, buckets, device, use_cuda_graphs)
        # One input buffer; smaller buckets are leading views of it.
        self.input = torch.zeros((self.max_batch, *sample_shape), dtype=dtype, device=self.device)
        # Rows in use (the rest of the bucket is padding), for code that must tell them apart on the device.
        self.rows = torch.zeros(1, dtype=torch.int32, device=self.device)

    def forward(self, b: int) -> tuple[torch.Tensor, ...]:
        return self.fn(self.input[:b])

    def run(self, n: int) -> tuple[torch.Tensor, ...]:
        """Compute the first n rows of the static input, padded to their bucket. The returned tensors are
        views of static buffers on CUDA: copy them before the next run."""
        b = self.bucket_for(n)
        with self.on_device():
            self.rows.fill_(n)
        return tuple(o[:n] for o in self.replay(b))
