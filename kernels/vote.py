"""Weighted vote of K detectors (and optionally the classifier) on each image that reached the detector stage.

Voters i = 0..K. Voter 0 is the classifier: confidence c_0 = p (its P(roadwork)), threshold t_0 = 0.5, weight
w_0 = classifier_weight (0 leaves it out). Voter k >= 1 is detector k with weight w_k and box threshold t_k:

    c_k = max over queries q and roadwork classes r of sigmoid(logit_k[q, r])   (= sigmoid of the max logit)
    v_i = 1 if c_i > t_i else 0                     (voter i says "roadwork": a box scored above its threshold)
    Y = sum_i w_i v_i,   N = sum_i w_i (1 - v_i),   F = Y / (Y + N)   (F = 0 when Y + N = 0)

    if F >= m:  P = 0.5 + 0.5 * exp( sum_{i: v_i=1} w_i ln c_i       / Y )
    else:       P = 0.5 - 0.5 * exp( sum_{i: v_i=0} w_i ln (1 - c_i) / N )

m is the majority fraction (default 2/3). Each exp(...) is a weighted geometric mean (weights w_i / Y resp.
w_i / N sum to 1) of numbers in (0, 1]: a "yes" voter has c_i > t_i >= 0, a "no" voter has c_i <= t_i < 1. So
it lies in (0, 1], the "yes" branch gives P in (0.5, 1] and the "no" branch P in [0, 0.5): P > 0.5 exactly when
the weighted vote reaches the majority, and how far P is from 0.5 is how sure the winning side is. (The plan's
exp(mean(log(c_i * w_i))) multiplies confidences by weights instead of weighting them and exceeds 1 for w > 1.)
In fp32, 0.5 + 0.5 * g rounds to 0.5 when g < 2^-24; P is clamped to 0.5 + 2^-24 resp. 0.5 - 2^-25 so that the
"exactly when" still holds there.

Inputs: `scores` [M, S] fp32 holds, for detector k, its roadwork-class logits flattened into columns
offsets[k]:offsets[k+1] (any number of detectors, K >= 1, segments of any length >= 1). Outputs per row:
conf [M, K] (the c_k), fraction [M] (F) and prob [M] (P).

Layout: reference first (what the CPU runtime runs), then dispatch; the Triton kernel is in
kernels/vote_triton.py, imported only where it launches."""
from __future__ import annotations

import torch


ABOVE_HALF = 0.5 + 2.0 ** -24  # the fp32 neighbours of 0.5
BELOW_HALF = 0.5 - 2.0 ** -25
TINY = 1e-30  # denominator floor: an empty side has a zero log-sum, and 0 / TINY = 0 (no NaN)
CLASSIFIER_THRESHOLD = 0.5


def check_args(scores, offsets, thresholds, weights, cls_prob, conf, fraction, prob) -> None:
    m, k = scores.shape[0], thresholds.shape[0]
    assert scores.dim() == 2 and scores.dtype == torch.float32, (scores.shape, scores.dtype)
    assert offsets.shape == (k + 1,) and offsets.dtype == torch.int32, (offsets.shape, offsets.dtype)
    assert k >= 1 and weights.shape == (k,), (thresholds.shape, weights.shape)
    assert thresholds.dtype == weights.dtype == cls_prob.dtype == torch.float32
    assert cls_prob.shape == (m,) and conf.shape == (m, k) and fraction.shape == (m,) and prob.shape == (m,)


def vote_reference(scores: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor,
                   cls_prob: torch.Tensor, cls_weight: float, majority: float, conf: torch.Tensor,
                   fraction: torch.Tensor, prob: torch.Tensor) -> None:
    """The formula above, accumulated over voters in the kernel's order (classifier, then detectors 1..K)."""
    check_args(scores, offsets, thresholds, weights, cls_prob, conf, fraction, prob)
    bounds = offsets.tolist()
    w0 = torch.tensor(cls_weight, dtype=torch.float32, device=scores.device)
    zero = torch.zeros((), dtype=torch.float32, device=scores.device)
    says = cls_prob > CLASSIFIER_THRESHOLD
    yes_w, no_w = torch.where(says, w0, zero), torch.where(says, zero, w0)
    # torch.where selects, so the discarded branch's log(0) = -inf (or 0 * -inf) never reaches a sum.
    yes_log = torch.where(says, w0 * torch.log(cls_prob), zero)
    no_log = torch.where(says, zero, w0 * torch.log(1 - cls_prob))
    for k in range(thresholds.shape[0]):
        best = scores[:, bounds[k]:bounds[k + 1]].max(dim=1).values
        c = torch.sigmoid(best)
        conf[:, k] = c
        w = weights[k]
        says = c > thresholds[k]
        yes_w = yes_w + torch.where(says, w, zero)
        no_w = no_w + torch.where(says, zero, w)
        yes_log = yes_log + torch.where(says, w * torch.log(c), zero)
        no_log = no_log + torch.where(says, zero, w * torch.log(1 - c))
    frac = yes_w / torch.clamp(yes_w + no_w, min=TINY)
    g_yes = torch.exp(yes_log / torch.clamp(yes_w, min=TINY))
    g_no = torch.exp(no_log / torch.clamp(no_w, min=TINY))
    fraction.copy_(frac)
    prob.copy_(torch.where(frac >= majority, torch.clamp(0.5 + 0.5 * g_yes, min=ABOVE_HALF),
                           torch.clamp(0.5 - 0.5 * g_no, max=BELOW_HALF)))


def vote(scores: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor,
         cls_prob: torch.Tensor, cls_weight: float, majority: float, conf: torch.Tensor,
         fraction: torch.Tensor, prob: torch.Tensor) -> None:
    """Triton on CUDA (capturable: offsets stay on the device), the torch reference on CPU."""
    if scores.is_cuda:
        from kernels.vote_triton import vote_triton
        vote_triton(scores, offsets, thresholds, weights, cls_prob, cls_weight, majority, conf, fraction, prob)
        return
    vote_reference(scores, offsets, thresholds, weights, cls_prob, cls_weight, majority, conf, fraction, prob)
