"""The Triton kernel of kernels/route.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.route import check_args


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
    check_args(prob, rows, exits, index, count)
    assert prob.is_contiguous() and index.is_contiguous() and exits.is_contiguous()
    batch = prob.shape[0]
    with launch_device(prob.device):
        route_kernel[(1,)](prob, rows, exits, index, count, batch, float(exit_below), float(exit_above),
                           BLOCK=triton.next_power_of_2(max(batch, 2)))
