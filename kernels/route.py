"""Routing after the first stage: which images exit with the classifier's answer, which go on.

For the first `rows` entries of a batch of stage-1 probabilities p (the rest are padding of a batch bucket):

    exits[i] = 1  if p[i] < exit_below or p[i] > exit_above     (strict: p equal to a threshold goes on)
    exits[i] = 0  otherwise, and for padding rows
    index    = ascending list of the rows that go on, then -1 up to the batch size
    count    = number of rows that go on

NaN never compares true, so a NaN probability goes on. Everything stays on the device: `rows` is read from a
device scalar and `count` written to one, so the kernel can sit inside a captured CUDA graph and the host reads
the count (and index list) once, after the graph.

Layout: reference first (what the CPU runtime runs), then dispatch; the Triton kernel is in
kernels/route_triton.py, imported only where it launches."""
from __future__ import annotations

import torch



def check_args(prob: torch.Tensor, rows: torch.Tensor, exits: torch.Tensor, index: torch.Tensor,
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
    check_args(prob, rows, exits, index, count)
    batch = prob.shape[0]
    valid = torch.arange(batch, device=prob.device) < rows.reshape(())
    # Comparing with a Python float rounds the threshold to fp32, as the kernel's fp32 argument does.
    leave = valid & ((prob < exit_below) | (prob > exit_above))
    go = (valid & ~leave).nonzero().flatten().to(torch.int32)
    exits.copy_(leave.to(torch.int8))
    index[:batch].fill_(-1)
    index[:go.numel()] = go
    count.fill_(go.numel())


def route(prob: torch.Tensor, rows: torch.Tensor, exit_below: float, exit_above: float,
          exits: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> None:
    """Triton on CUDA (no host sync, capturable), the torch reference on CPU."""
    if prob.is_cuda:
        from kernels.route_triton import route_triton
        route_triton(prob, rows, exit_below, exit_above, exits, index, count)
        return
    route_reference(prob, rows, exit_below, exit_above, exits, index, count)
