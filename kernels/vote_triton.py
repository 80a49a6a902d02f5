"""The Triton kernel of kernels/vote.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.vote import ABOVE_HALF, BELOW_HALF, CLASSIFIER_THRESHOLD, TINY, check_args


@triton.jit
def vote_kernel(scores_ptr, score_stride, offsets_ptr, thresholds_ptr, weights_ptr, cls_prob_ptr,
                conf_ptr, fraction_ptr, prob_ptr, num_detectors, cls_weight, majority,
                CLS_THRESHOLD: tl.constexpr, TINY_: tl.constexpr, ABOVE: tl.constexpr, BELOW: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    p0 = tl.load(cls_prob_ptr + row)
    says = p0 > CLS_THRESHOLD
    yes_w = tl.where(says, cls_weight, 0.0)
    no_w = tl.where(says, 0.0, cls_weight)
    yes_log = tl.where(says, cls_weight * tl.log(p0), 0.0)
    no_log = tl.where(says, 0.0, cls_weight * tl.log(1.0 - p0))
    row_scores = scores_ptr + row.to(tl.int64) * score_stride
    for k in range(num_detectors):
        start = tl.load(offsets_ptr + k)
        end = tl.load(offsets_ptr + k + 1)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for s in range(start, end, BLOCK):
            cols = s + tl.arange(0, BLOCK)
            best = tl.maximum(best, tl.load(row_scores + cols, mask=cols < end, other=float("-inf")))
        c = tl.sigmoid(tl.max(best, axis=0))
        tl.store(conf_ptr + row * num_detectors + k, c)
        w = tl.load(weights_ptr + k)
        says = c > tl.load(thresholds_ptr + k)
        yes_w += tl.where(says, w, 0.0)
        no_w += tl.where(says, 0.0, w)
        yes_log += tl.where(says, w * tl.log(c), 0.0)
        no_log += tl.where(says, 0.0, w * tl.log(1.0 - c))
    frac = yes_w / tl.maximum(yes_w + no_w, TINY_)
    g_yes = tl.exp(yes_log / tl.maximum(yes_w, TINY_))
    g_no = tl.exp(no_log / tl.maximum(no_w, TINY_))
    p = tl.where(frac >= majority, tl.maximum(0.5 + 0.5 * g_yes, ABOVE), tl.minimum(0.5 - 0.5 * g_no, BELOW))
    tl.store(fraction_ptr + row, frac)
    tl.store(prob_ptr + row, p)


def vote_triton(scores: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor,
                cls_prob: torch.Tensor, cls_weight: float, majority: float, conf: torch.Tensor,
                fraction: torch.Tensor, prob: torch.Tensor) -> None:
    """Same contract as vote_reference, computed by the Triton kernel (one program per image)."""
    check_args(scores, offsets, thresholds, weights, cls_prob, conf, fraction, prob)
    assert scores.stride(1) == 1 and conf.is_contiguous(), "rows of scores and conf must be contiguous"
    rows = scores.shape[0]
    if rows == 0:
        return
    # GPU: a register-sized tile. Interpreter (CPU tensors, tests): one big tile, since it pays per op.
    block = 256 if scores.is_cuda else 1024
    with launch_device(scores.device):
        vote_kernel[(rows,)](scores, scores.stride(0), offsets, thresholds, weights, cls_prob, conf, fraction, prob,
                             thresholds.shape[0], float(cls_weight), float(majority),
                             CLS_THRESHOLD=CLASSIFIER_THRESHOLD, TINY_=TINY, ABOVE=ABOVE_HALF, BELOW=BELOW_HALF,
                             BLOCK=block)
