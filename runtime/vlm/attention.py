"""Decode attention over the paged KV cache behind one seam: the runner plans a decode batch once per step from
host-side block tables and context lengths, then every layer calls the planned backend.

  flashinfer: flashinfer's BatchDecodeWithPagedKVCacheWrapper (plan() on the host, run() per layer); CUDA with
              fp16/bf16, a head_dim and GQA group size flashinfer ships kernels for, when flashinfer imports and
              a one-row plan + run at startup works (flashinfer_unusable: its kernels JIT-compile on first use,
              which needs nvcc or the prebuilt flashinfer-cubin / flashinfer-jit-cache packages)
  triton:     kernels.paged_attention_triton.paged_decode_triton (the rest of CUDA)
  cpu:        runtime.vlm.cpu_attention.CpuDecodeAttention (CPU: planned once per step, equal to the reference)
  reference:  kernels.paged_attention.paged_decode_reference

Our cache per layer is (num_blocks, block_size, num_kv_heads, head_dim): flashinfer's "NHD" page layout
(max_num_pages, page_size, num_kv_heads, head_dim) as it is, so pages are handed over without a copy
(check_nhd_layout asserts it); block-table rows become flashinfer's CSR page table (csr_page_table)."""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Protocol

import torch

from kernels.launch import launch_device
from kernels.paged_attention import paged_decode_reference
from runtime.vlm.cpu_attention import CpuDecodeAttention

log = logging.getLogger(__name__)

FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)
FLASHINFER_PROBE_TOLERANCE = 5e-2  # bf16/fp16 attention of a random row vs the float32 reference
FLASHINFER_WORKSPACE_BYTES = 128 << 20  # the float workspace size flashinfer's documentation recommends
BACKENDS = ("flashinfer", "triton", "cpu", "reference")


@dataclass(frozen=True)
class DecodeAttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    scale: float


class DecodeAttention(Protocol):
    name: str

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        """Prepare for the next forward: (rows, max blocks) int32 block tables (-1 padded) and (rows,) int32
        context lengths (0 for padding rows), both on the CPU. Never called inside a CUDA graph capture."""

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """paged_decode_reference's contract; rows of padding may hold anything."""


@functools.cache
def flashinfer_module() -> ModuleType | None:
    try:
        import flashinfer
    except Exception as e:  # an ABI or driver mismatch raises RuntimeError or OSError, not ImportError
        # not installed is routine (info); installed but broken is worth a warning
        log.log(logging.INFO if isinstance(e, ModuleNotFoundError) else logging.WARNING,
                "flashinfer does not import (%s: %s): CUDA decode attention uses the Triton paged-attention kernel",
                type(e).__name__, e)
        return None
    return flashinfer


def group_sizes_of(version: str) -> tuple[int, ...]:
    """Query heads per kv head that flashinfer `version`'s decode kernels dispatch (DISPATCH_GQA_GROUP_SIZE in its
    include/flashinfer/utils.cuh): 6 from 0.6.18 on; before, 6 raises "Unsupported group_size"."""
    release = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    return (1, 2, 3, 4, 6, 8) if release >= (0, 6, 18) else (1, 2, 3, 4, 8)


def flashinfer_group_sizes() -> tuple[int, ...]:
    """Those of the flashinfer that imports (the gpu extra pins 0.6.13: the newest whose flashinfer-cubin and
    flashinfer-jit-cache the project's index has; a newer install brings GQA 6 onto flashinfer)."""
    return group_sizes_of(getattr(flashinfer_module(), "__version__", "0"))


def choose_decode_backend(device: torch.device, dtype: torch.dtype, head_dim: int, have_flashinfer: bool,
                          group: int = 1) -> str:
    if device.type != "cuda":
        return "cpu"
    if (have_flashinfer and dtype in FLASHINFER_DTYPES and head_dim in FLASHINFER_HEAD_DIMS
            and group in flashinfer_group_sizes()):
        return "flashinfer"
    return "triton"


def flashinfer_unusable(spec: DecodeAttentionSpec, workspace: torch.Tensor) -> str | None:
    """Why flashinfer cannot serve this decode attention on the workspace's device, or None. Plans and runs one
    row of two pages (the first use compiles or loads its kernel) and compares it with the reference."""
    group = spec.num_heads // spec.num_kv_heads
    if group not in flashinfer_group_sizes():
        return f"GQA group size {group} is not one of flashinfer's {flashinfer_group_sizes()}"
    device = workspace.device
    try:
        g = torch.Generator().manual_seed(0)
        pages = torch.randn(2, 2, spec.block_size, spec.num_kv_heads, spec.head_dim, generator=g)
        q = torch.randn(1, spec.num_heads, spec.head_dim, generator=g)
        tables = torch.tensor([[0, 1]], dtype=torch.int32)
        lens = torch.tensor([spec.block_size + 1], dtype=torch.int32)
        want = paged_decode_reference(q, pages[0], pages[1], tables, lens, spec.scale)
        with launch_device(device):
            attention = FlashInferDecodeAttention(spec, workspace)
            attention.plan(tables, lens)
            k, v = (p.to(device, spec.dtype) for p in pages)
            got = attention(q.to(device, spec.dtype), k, v, tables.to(device), lens.to(device), spec.scale)
            error = (got.float().cpu() - want).abs().max().item()
    except Exception as e:  # flashinfer raises its own types for a missing nvcc, cubin or architecture
        return f"its one-row probe failed: {type(e).__name__}: {e}"
    if not error <= FLASHINFER_PROBE_TOLERANCE:
        return f"its one-row probe differs from the reference by {error:.3g}"
    return None


@dataclass(frozen=True)
class KernelDecodeAttention:
    """Our kernels read the device block tables and context lengths directly: nothing to plan."""

    name: str  # "triton" or "reference"
    kernel: Callable[..., torch.Tensor]

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        pass

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        return self.kernel(q, k_cache, v_cache, block_tables, context_lens, scale)


@dataclass(frozen=True)
class PageTable:
    """flashinfer's CSR page table: row r's pages are indices[indptr[r]:indptr[r + 1]], the last one holding
    last_page_len[r] tokens (1..page_size)."""

    indptr: torch.Tensor  # (rows + 1,) int32
    indices: torch.Tensor  # (indptr[-1],) int32
    last_page_len: torch.Tensor  # (rows,) int32


def csr_page_table(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> PageTable:
    """Our block tables as flashinfer's page table. Padding rows (context 0) get one token of page 0: a batch of
    fixed size keeps every row, and a real page keeps their reads in bounds (their outputs are discarded)."""
    rows, width = block_tables.shape
    assert context_lens.shape == (rows,), (tuple(block_tables.shape), tuple(context_lens.shape))
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    lens = context_lens.long()
    padding = lens == 0
    pages = torch.where(padding, 1, (lens + block_size - 1) // block_size)
    assert bool((pages <= width).all()), f"a context needs more than the {width} blocks of its block table"
    tables = torch.where(padding[:, None], 0, block_tables)
    indices = tables[torch.arange(width)[None, :] < pages[:, None]]  # row-major: row 0's pages, then row 1's, ...
    assert bool((indices >= 0).all()), "a block table row has -1 within its context"
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = pages.cumsum(0)
    last_page_len = torch.where(padding, 1, lens - (pages - 1) * block_size)
    return PageTable(indptr, indices.to(torch.int32), last_page_len.to(torch.int32))


def check_nhd_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, spec: DecodeAttentionSpec) -> None:
    """Our per-layer caches must be flashinfer's NHD pages (pages, page_size, kv_heads, head_dim), dense."""
    page = (spec.block_size, spec.num_kv_heads, spec.head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert cache.dim() == 4 and tuple(cache.shape[1:]) == page, (
            f"{name} {tuple(cache.shape)} is not NHD (pages, page_size, kv_heads, head_dim) with those = {page}")
        assert cache.is_contiguous(), f"{name} strides {cache.stride()} are not dense NHD pages"
        assert cache.dtype == spec.dtype, f"{name} is {cache.dtype}, planned for {spec.dtype}"


class FlashInferDecodeAttention:
    """One flashinfer decode wrapper. fixed_batch: a wrapper for CUDA graphs (use_cuda_graph=True), whose page
    table lives in its own device buffers and whose batch size never changes: one per captured bucket."""

    name = "flashinfer"

    def __init__(self, spec: DecodeAttentionSpec, workspace: torch.Tensor, fixed_batch: int | None = None,
                 max_pages: int = 0):
        flashinfer = flashinfer_module()
        assert flashinfer is not None, "flashinfer does not import"
        assert spec.dtype in FLASHINFER_DTYPES and spec.head_dim in FLASHINFER_HEAD_DIMS, spec
        self.spec = spec
        self.fixed_batch = fixed_batch
        if fixed_batch is None:
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
        else:
            assert fixed_batch >= 1 and max_pages >= fixed_batch, (fixed_batch, max_pages)
            dev = workspace.device
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, kv_layout="NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(fixed_batch + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(fixed_batch, dtype=torch.int32, device=dev))
        self.planned_rows: int | None = None

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        # Host tensors: plan() reads the page table on the host; device ones would cost a sync per step.
        assert block_tables.device.type == "cpu" and context_lens.device.type == "cpu"
        rows = block_tables.shape[0]
        assert self.fixed_batch is None or rows == self.fixed_batch, (rows, self.fixed_batch)
        s = self.spec
        table = csr_page_table(block_tables, context_lens, s.block_size)
        self.wrapper.plan(table.indptr, table.indices, table.last_page_len, s.num_heads, s.num_kv_heads, s.head_dim,
                          s.block_size, q_data_type=s.dtype, kv_data_type=s.dtype, sm_scale=s.scale)
        self.planned_rows = rows

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        s = self.spec
        assert scale == s.scale, f"attention scale {scale} differs from the planned {s.scale}"
        assert q.shape == (self.planned_rows, s.num_heads, s.head_dim), (
            f"q {tuple(q.shape)} does not match the plan: {self.planned_rows} rows x {s.num_heads} heads x "
            f"{s.head_dim}")
        check_nhd_layout(k_cache, v_cache, s)
        return self.wrapper.run(q, (k_cache, v_cache))


def make_decode_attention(backend: str, spec: DecodeAttentionSpec, workspace: torch.Tensor | None = None,
                          fixed_batch: int | None = None, max_pages: int = 0) -> DecodeAttention:
    """A backend by name (BACKENDS); flashinfer needs the shared float workspace."""
    assert backend in BACKENDS, f"decode attention backend {backend!r} is not one of {BACKENDS}"
    if backend == "flashinfer":
        assert workspace is not None, "flashinfer needs a float workspace buffer"
        return FlashInferDecodeAttention(spec, workspace, fixed_batch, max_pages)
    if backend == "cpu":
        return CpuDecodeAttention(spec.block_size)
    if backend == "triton":
        from kernels.paged_attention_triton import paged_decode_triton  # triton imports only where it launches
        return KernelDecodeAttention(backend, paged_decode_triton)
    return KernelDecodeAttention(backend, paged_decode_reference)
