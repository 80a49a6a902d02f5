"""Routing after the first stage: which images exit with the classifier's answer, which go on.

For the first `rows` entries of a batch of stage-1 probabilities p (the rest are padding of a batch bucket):

    exits[i] = 1  if p[i] < exit_below or p[i] > exit_above     (strict: p equal to a threshold goes on)
    exits[i] = 0  otherwise, and for padding rows
    index    = ascending list of the rows that go on, then -1 up to the batch size
    count    = number of rows that go on

NaN never compares true, so a NaN probability goes on. Everything stays on the device: `rows` is read from a
device scalar and `count` written to one, so the kernel can sit inside a captured CUDA graph and the host reads
the count (and index list) once, after the graph.

Layout: reference first (what the CPU runtime runs), then the Triton kernel, then dispatch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device


def _check(prob: torch.Tensor, rows: torch.Tensor, exits: torch.Tensor, index: torch.Tensor,
           count: torch.Tensor) -> None:
    batch = prob.shape[0]
    assert prob.dim() == 1 and prob.dtype == torch.float32, (prob.shape, prob.dtype)
    assert rows.numel() == 1 and rows.dtype == torch.int32, (rows.shape, rows.dtype)
    assert exits.shape == (batch,) and exits.dtype == torch.int8, (exits.shape, exits.dtype)
    assert index.shape[0] >= batch and index.dtype == torch.int32, (index.shape, index.dtype)
    assert count.numel() == 1 and count.dtype == torch.int32, (count.shape, count.dtype)


def route_reference(prob: torch.Tensor, rows: torch.Tensor, exit_below: float, exit_above: float,
                    exits: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> None:
    """Write exits[:B], index[:B] and count for prob [B] fp32; rows: int32 device scalar (<= B)."""
    _check(prob, rows, exits, index, count)
    batch = prob.shape[0]
    valid = torch.arange(batch, device=prob.device) < rows.reshape(())
    # Comparing with a Python float rounds the threshold to fp32, as the kernel's fp32 argument does.
    leave = valid & ((prob < exit_below) | (prob > exit_above))
    go = (valid & ~leave).nonzero().flatten().to(torch.int32)
    exits.copy_(leave.to(torch.int8))
    index[:batch].fill_(-1)
    index[:go.numel()] = go
    count.fill_(go.numel())


@triton.jit
def route_kernel(prob_ptr, rows_ptr, exits_ptr, index_ptr, count_ptr, batch, exit_below, exit_above,
                 BLOCK: tl.constexpr):
    # One program holds the whole batch (batches are at most a few hundred rows), so the compaction is one scan.
    offs = tl.arange(0, BLOCK)
    in_batch = offs < batch
    valid = in_batch & (offs < tl.load(rows_ptr))
    p = tl.load(prob_ptr + offs, mask=valid, other=0.5)
    leave = valid & ((p < exit_below) | (p > exit_above))
    go = (valid & (leave == 0)).to(tl.int32)
    slot = tl.cumsum(go, axis=0) - 1
    count = tl.sum(go, axis=0)
    tl.store(index_ptr + slot, offs, mask=go == 1)
    tl.store(index_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=in_batch & (offs >= count))
    tl.store(exits_ptr + offs, leave.to(tl.int8), mask=in_batch)
    tl.store(count_ptr, count)


def route_triton(prob: torch.Tensor, rows: torch.Tensor, exit_below: float, exit_above: float,
                 exits: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> None:
    """Same contract as route_reference, computed by the Triton kernel."""
    _check(prob, rows, exits, index, count)
    assert prob.is_contiguous() and index.is_contiguous() and exits.is_contiguous()
    batch = prob.shape[0]
    with launch_device(prob.device):
        route_kernel[(1,)](prob, rows, exits, index, count, batch, float(exit_below), float(exit_above),
                           BLOCK=triton.next_power_of_2(max(batch, 2)))


def route(prob: torch.Tensor, rows: torch.Tensor, exit_below: float, exit_above: float,
          exits: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> None:
    """Triton on CUDA (no host sync, capturable), the torch reference on CPU."""
    fn = route_triton if prob.is_cuda else route_reference
    fn(prob, rows, exit_below, exit_above, exits, index, count)
