"""Voting kernel (compiled on CUDA, else under TRITON_INTERPRET=1) against its torch reference, and both against the written formula."""
from __future__ import annotations

import math

import pytest
import torch

from fixtures.vote_formula import vote_formula
from fixtures.triton_mode import KERNEL_DEVICE
from kernels.vote import vote, vote_reference
from kernels.vote_triton import vote_triton

INF = float("inf")


def run(fn, scores, offsets, thresholds, weights, cls_prob, cls_weight, majority):
    """fn's outputs on the CPU; the Triton kernel runs on KERNEL_DEVICE."""
    dev = KERNEL_DEVICE if fn is vote_triton else torch.device("cpu")
    m, k = scores.shape[0], len(thresholds)
    conf, fraction, prob = (torch.full(shape, -5.0, device=dev) for shape in ((m, k), (m,), (m,)))
    fn(scores.to(dev), torch.tensor(offsets, dtype=torch.int32, device=dev),
       torch.tensor(thresholds, dtype=torch.float32, device=dev), torch.tensor(weights, dtype=torch.float32, device=dev),
       cls_prob.to(dev), cls_weight, majority, conf, fraction, prob)
    return conf.cpu(), fraction.cpu(), prob.cpu()


def check(scores, offsets, thresholds, weights, cls_prob, cls_weight=0.0, majority=2 / 3):
    args = (scores, offsets, thresholds, weights, cls_prob, cls_weight, majority)
    ref = run(vote_reference, *args)
    out = run(vote_triton, *args)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=2e-6, rtol=1e-5)
    conf, fraction, prob = ref
    assert torch.isfinite(conf).all() and torch.isfinite(fraction).all() and torch.isfinite(prob).all()
    assert ((prob >= 0) & (prob <= 1)).all()
    assert torch.equal(prob > 0.5, fraction >= torch.tensor(majority, dtype=torch.float32))
    assert torch.equal(out[2] > 0.5, prob > 0.5)  # the decision itself is bit-for-bit the reference's
    return ref


def random_case(g: torch.Generator, rows: int, lengths: list[int]):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    scores = torch.randn(rows, offsets[-1], generator=g) * 3 - 2
    k = len(lengths)
    thresholds = (torch.rand(k, generator=g) * 0.8 + 0.1).tolist()
    weights = (torch.rand(k, generator=g) * 2).tolist()
    return scores, offsets, thresholds, weights, torch.rand(rows, generator=g)


@pytest.mark.parametrize("lengths", [[1], [7], [300], [2000], [5, 1, 40], [900, 300, 30, 2]],
                         ids=["K1-len1", "K1-len7", "K1-len300", "K1-longer-than-block", "K3", "K4"])
@pytest.mark.parametrize("cls_weight", [0.0, 0.7])
def test_random_matches_reference_and_formula(lengths, cls_weight):
    g = torch.Generator().manual_seed(len(lengths) * 100 + sum(lengths))
    for rows in (1, 5):
        scores, offsets, thresholds, weights, cls_prob = random_case(g, rows, lengths)
        conf, fraction, prob = check(scores, offsets, thresholds, weights, cls_prob, cls_weight)
        for r in range(rows):
            per_det = [scores[r, offsets[k]:offsets[k + 1]].tolist() for k in range(len(lengths))]
            confs, f, p = vote_formula(per_det, thresholds, weights, cls_prob[r].item(), cls_weight, 2 / 3)
            assert conf[r].tolist() == pytest.approx(confs, abs=1e-6)
            assert fraction[r].item() == pytest.approx(f, abs=1e-6)
            assert prob[r].item() == pytest.approx(p, abs=1e-5)


def test_k1_hand_computed():
    # One detector, weight 2: logit ln(3) -> c = 0.75 > t = 0.5 says yes; F = 1; P = 0.5 + 0.5 * 0.75.
    scores = torch.tensor([[math.log(3.0), -1.0], [-math.log(3.0), -2.0]])
    conf, fraction, prob = check(scores, [0, 2], [0.5], [2.0], torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(conf[:, 0], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(fraction, torch.tensor([1.0, 0.0]))
    # Second image: c = 0.25 says no; P = 0.5 - 0.5 * (1 - 0.25).
    torch.testing.assert_close(prob, torch.tensor([0.875, 0.125]))


def test_weighted_geometric_mean_of_yes_voters():
    # Classifier (w 1, p 0.9) and two detectors (w 1 at c 0.8, w 2 at c 0.6) all say yes.
    logit = lambda c: math.log(c / (1 - c))  # noqa: E731
    scores = torch.tensor([[logit(0.8), logit(0.6)]])
    _, fraction, prob = check(scores, [0, 1, 2], [0.5, 0.5], [1.0, 2.0], torch.tensor([0.9]), cls_weight=1.0)
    g = math.exp((math.log(0.9) + math.log(0.8) + 2 * math.log(0.6)) / 4)
    assert fraction.item() == 1.0 and prob.item() == pytest.approx(0.5 + 0.5 * g, abs=1e-6)


def test_ties_and_exact_majorities():
    # logit 0 gives c = 0.5 exactly, which does not exceed a 0.5 threshold: a tie votes no.
    scores = torch.tensor([[0.0, 0.0, 0.0]])
    _, fraction, prob = check(scores, [0, 1, 2, 3], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], torch.tensor([0.5]))
    assert fraction.item() == 0.0 and prob.item() == 0.25
    # Two of three equal voters: F = 2/3 exactly reaches the default majority.
    scores = torch.tensor([[5.0, 5.0, -5.0]])
    _, fraction, prob = check(scores, [0, 1, 2, 3], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], torch.tensor([0.5]))
    assert fraction.item() == pytest.approx(2 / 3) and prob.item() > 0.5
    # Weight 1 yes against weight 1 no with the classifier (p 0.5 is not > 0.5) makes F = 1/2: not a majority
    # at 2/3, a majority at exactly 1/2.
    scores = torch.tensor([[5.0, -5.0]])
    for majority, wins in [(2 / 3, False), (0.5, True)]:
        _, fraction, prob = check(scores, [0, 1, 2], [0.5, 0.5], [1.0, 1.0], torch.tensor([0.5]),
                                  majority=majority)
        assert fraction.item() == 0.5 and (prob.item() > 0.5) == wins


# The interpreter evaluates both branches of tl.where in numpy, so the discarded log(0) warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_edge_values_stay_finite():
    # Infinite logits (c exactly 0 or 1), classifier at exactly 0 and 1, zero weights, extreme thresholds.
    scores = torch.tensor([[INF, -INF], [-INF, -INF], [INF, INF], [-INF, INF]])
    for cls_weight in (0.0, 1.0):
        for thresholds in ([0.0, 0.999], [0.5, 0.5]):
            for weights in ([1.0, 0.0], [0.0, 0.0], [3.0, 1.0]):
                check(scores, [0, 1, 2], thresholds, weights, torch.tensor([0.0, 1.0, 0.5, 1.0]), cls_weight)


def test_no_weight_at_all_is_a_no_at_zero():
    _, fraction, prob = check(torch.tensor([[9.0]]), [0, 1], [0.5], [0.0], torch.tensor([0.9]))
    assert fraction.item() == 0.0 and prob.item() == 0.0


def test_tiny_confidence_still_lands_above_half():
    # A yes voter barely above a tiny threshold: 0.5 + 0.5 * 1e-12 rounds to 0.5 in fp32, the clamp keeps > 0.5.
    scores = torch.tensor([[math.log(1e-12)]])
    _, _, prob = check(scores, [0, 1], [1e-13], [1.0], torch.tensor([0.5]))
    assert prob.item() > 0.5


def test_dispatch_uses_reference_on_cpu():
    args = (torch.tensor([[2.0]]), [0, 1], [0.5], [1.0], torch.tensor([0.2]), 0.0, 2 / 3)
    for a, b in zip(run(vote, *args), run(vote_reference, *args)):
        assert torch.equal(a, b)
