"""Routing kernel (compiled on CUDA, else under TRITON_INTERPRET=1) against its torch reference, and the reference against the rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.triton_mode import KERNEL_DEVICE
from kernels.route import route, route_reference
from kernels.route_triton import route_triton


def run(fn, prob: torch.Tensor, rows: int, below: float, above: float, index_len: int | None = None):
    """fn's outputs on the CPU; the Triton kernel runs on KERNEL_DEVICE."""
    dev = KERNEL_DEVICE if fn is route_triton else torch.device("cpu")
    batch = prob.shape[0]
    exits = torch.full((batch,), 7, dtype=torch.int8, device=dev)
    index = torch.full((index_len or batch,), 99, dtype=torch.int32, device=dev)
    count = torch.full((1,), 99, dtype=torch.int32, device=dev)
    fn(prob.to(dev), torch.tensor([rows], dtype=torch.int32, device=dev), below, above, exits, index, count)
    return exits.cpu(), index.cpu(), count.cpu()


def expected(prob: list[float], rows: int, below: float, above: float):
    """The rule, element by element, in fp32."""
    lo, hi = np.float32(below), np.float32(above)
    exits = [int(i < rows and (np.float32(p) < lo or np.float32(p) > hi)) for i, p in enumerate(prob)]
    go = [i for i in range(rows) if not exits[i]]
    return exits, go + [-1] * (len(prob) - len(go)), len(go)


def check(prob: torch.Tensor, rows: int, below: float, above: float):
    ref = run(route_reference, prob, rows, below, above)
    out = run(route_triton, prob, rows, below, above)
    for r, o in zip(ref, out):
        assert torch.equal(r, o), (r, o)
    exits, index, count = expected(prob.tolist(), rows, below, above)
    assert ref[0].tolist() == exits and ref[1].tolist() == index and ref[2].item() == count
    return ref


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 17, 64, 100])
def test_random_batches_match_reference(batch):
    g = torch.Generator().manual_seed(batch)
    for trial in range(4):
        prob = torch.rand(batch, generator=g)
        rows = int(torch.randint(1, batch + 1, (1,), generator=g))
        below, above = sorted(torch.rand(2, generator=g).tolist())
        check(prob, rows, below, above)


def test_all_exit_and_none_exit():
    prob = torch.tensor([0.01, 0.99, 0.0, 1.0, 0.02])
    exits, index, count = check(prob, 5, 0.1, 0.9)
    assert count.item() == 0 and exits.tolist() == [1] * 5 and index.tolist() == [-1] * 5
    # Strict comparisons: with thresholds 0 and 1 no probability can leave, not even exactly 0 or 1.
    exits, index, count = check(prob, 5, 0.0, 1.0)
    assert count.item() == 5 and exits.tolist() == [0] * 5 and index.tolist() == [0, 1, 2, 3, 4]


def test_ties_at_thresholds_go_on():
    prob = torch.tensor([0.25, 0.75, 0.2499, 0.7501, 0.5])
    exits, index, count = check(prob, 5, 0.25, 0.75)
    assert exits.tolist() == [0, 0, 1, 1, 0] and index.tolist()[:3] == [0, 1, 4] and count.item() == 3
    exits, _, count = check(torch.tensor([0.5, 0.5, 0.4]), 3, 0.5, 0.5)  # equal thresholds: only exact 0.5 stays
    assert exits.tolist() == [0, 0, 1] and count.item() == 2


def test_padding_rows_neither_exit_nor_go():
    prob = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5])
    exits, index, count = check(prob, 3, 0.1, 0.9)
    assert exits.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert index.tolist() == [0, 2, -1, -1, -1, -1, -1, -1] and count.item() == 2


def test_nan_probability_goes_on():
    prob = torch.tensor([float("nan"), 0.0, float("nan")])
    exits, index, count = check(prob, 3, 0.1, 0.9)
    assert exits.tolist() == [0, 1, 0] and index.tolist() == [0, 2, -1] and count.item() == 2


def test_index_buffer_longer_than_batch_keeps_its_tail():
    """The runtime's index list is max-batch long; a smaller bucket writes only its own prefix."""
    prob = torch.tensor([0.5, 0.0, 0.5])
    for fn in (route_reference, route_triton):
        _, index, _ = run(fn, prob, 3, 0.1, 0.9, index_len=6)
        assert index.tolist() == [0, 2, -1, 99, 99, 99]


def test_dispatch_uses_reference_on_cpu():
    prob = torch.tensor([0.5, 0.0])
    assert [t.tolist() for t in run(route, prob, 2, 0.1, 0.9)] == [[0, 1], [0, -1], [1]]
