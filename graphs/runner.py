"""Run batched model code over fixed batch buckets with static buffers.

`BucketGraphs` runs a segment function fn(bucket) that reads and writes static max-batch buffers. On CUDA each
bucket is captured once as a CUDA graph (largest first, in one memory pool that several segments may share) and
replayed; on CPU the same function runs eagerly, so shapes stay few and per-shape caches stay warm.
`GraphRunner` is the common case: one static input batch, fn(input[:bucket]) -> outputs.

Every capture on a device uses that device's one capture stream (capture_stream): torch.cuda.graph without
`stream=` falls back to a single process-wide stream created on whichever device was current at the first capture,
so with the VLM's graphs captured first on cuda:1, a later capture on cuda:0 would record nothing (or fail in
cudaMalloc). An empty capture raises instead of leaving a graph whose replay returns stale outputs."""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Callable

import torch

from graphs.nvtx import nvtx_range

log = logging.getLogger(__name__)

EMPTY_GRAPH_WARNING = "The CUDA Graph is empty"  # what torch's CUDAGraph::capture_end warns with

_capture_streams: dict[torch.device, torch.cuda.Stream] = {}
_capture_streams_lock = threading.Lock()

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


def capture_stream(device: torch.device | str) -> torch.cuda.Stream:
    """The side stream every graph capture on `device` runs on (one per device, shared by the segments of the
    device's memory pool)."""
    device = cuda_device(device)
    with _capture_streams_lock:
        stream = _capture_streams.get(device)
        if stream is None:
            stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


def capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device,
            pool: tuple | None, what: str) -> tuple[torch.Tensor, ...]:
    """fn() captured into `graph` on `device`'s capture stream; raises if the capture recorded no work."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph, pool=pool, stream=capture_stream(device)):
            outputs = fn()
    for w in caught:
        if EMPTY_GRAPH_WARNING in str(w.message):
            raise RuntimeError(f"CUDA graph capture of {what} on {device} recorded no work: the kernels ran on "
                               f"another device or stream, so replaying it would leave stale outputs")
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

    @torch.inference_mode()
    def warmup(self, pool: tuple | None = None) -> None:
        """Run every bucket once; on CUDA also capture one graph per bucket, largest first, in `pool` (a
        torch.cuda.graph_pool_handle() shared with other segments of the same device, or a new one). All of it
        with this segment's device current, so kernels launch where their tensors are."""
        with self.on_device():
            for b in reversed(self.buckets):
                self.fn(b)
            if not self.use_cuda_graphs:
                return
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            stream = capture_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # let lazy init (cuBLAS workspaces, autotuning) happen outside capture
                    self.fn(self.max_batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                self.outputs[b] = capture(graph, lambda: self.fn(b), self.device, pool, f"bucket {b}")
                self.graphs[b] = graph
            torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for buckets %s on %s", self.buckets, self.device)

    @torch.inference_mode()
    def replay(self, b: int) -> tuple[torch.Tensor, ...]:
        """Run bucket b. On CUDA the returned tensors are static buffers: read them before the next replay."""
        assert b in self.buckets, (b, self.buckets)
        with self.on_device(), nvtx_range(self.range_names[b]):
            if b not in self.graphs:
                return self.fn(b)
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
