"""The Triton kernel of kernels/nms.py; imported only where it launches (CUDA tensors, or the interpreter
in tests), so a CPU install runs without triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import launch_device
from kernels.nms import check_args, candidate_order


@triton.jit
def _exceeds(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1, iou_threshold):
    inter = (tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
             * tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0))
    area_a = tl.maximum(ax1 - ax0, 0.0) * tl.maximum(ay1 - ay0, 0.0)
    area_b = tl.maximum(bx1 - bx0, 0.0) * tl.maximum(by1 - by0, 0.0)
    return inter > iou_threshold * (area_a + area_b - inter)


@triton.jit
def nms_kernel(boxes_ptr, scores_ptr, classes_ptr, order_ptr, count_ptr, keep_ptr, kept_scores_ptr,
               n, max_det, iou_threshold, TILE: tl.constexpr, KEPT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + b)
    row = b * n
    t = tl.arange(0, TILE)
    k = tl.arange(0, KEPT)
    # The boxes kept so far, slot k of each (slots >= n_kept hold nothing; kc = -1 never equals a class).
    kx0 = tl.zeros([KEPT], tl.float32)
    ky0 = tl.zeros([KEPT], tl.float32)
    kx1 = tl.zeros([KEPT], tl.float32)
    ky1 = tl.zeros([KEPT], tl.float32)
    kc = tl.full([KEPT], -1, tl.int64)
    n_kept = count * 0
    start = count * 0
    while (start < count) & (n_kept < max_det):
        pos = start + t
        valid = pos < count
        idx = tl.load(order_ptr + row + pos, mask=valid, other=0)
        box = boxes_ptr + (row + idx) * 4
        x0 = tl.load(box, mask=valid, other=0.0)
        y0 = tl.load(box + 1, mask=valid, other=0.0)
        x1 = tl.load(box + 2, mask=valid, other=0.0)
        y1 = tl.load(box + 3, mask=valid, other=0.0)
        cls = tl.load(classes_ptr + row + idx, mask=valid, other=-2).to(tl.int64)
        # Against the boxes kept by earlier tiles.
        hit = (_exceeds(x0[:, None], y0[:, None], x1[:, None], y1[:, None],
                        kx0[None, :], ky0[None, :], kx1[None, :], ky1[None, :], iou_threshold)
               & (cls[:, None] == kc[None, :]))
        cand = valid & (tl.max(hit.to(tl.int32), axis=1) == 0)
        # Within the tile: suppress[i, j] = box i, if kept, suppresses the later box j.
        suppress = (_exceeds(x0[:, None], y0[:, None], x1[:, None], y1[:, None],
                             x0[None, :], y0[None, :], x1[None, :], y1[None, :], iou_threshold)
                    & (cls[:, None] == cls[None, :]) & (t[:, None] < t[None, :]))
        kept = cand.to(tl.int32)
        changed = tl.sum(kept, axis=0) > 0
        while changed:
            hit_by_kept = tl.max((suppress & (kept[:, None] == 1)).to(tl.int32), axis=0)
            new = (cand & (hit_by_kept == 0)).to(tl.int32)
            changed = tl.sum((new != kept).to(tl.int32), axis=0) > 0
            kept = new
        slot = n_kept + tl.cumsum(kept, axis=0) - 1
        stored = (kept == 1) & (slot < max_det)
        tl.store(keep_ptr + b * max_det + slot, idx, mask=stored)
        tl.store(kept_scores_ptr + b * max_det + slot, tl.load(scores_ptr + row + idx, mask=stored, other=0.0),
                 mask=stored)
        # Append this tile's kept boxes to the register slots: slot s takes the one tile box stored there.
        lands = stored[:, None] & (slot[:, None] == k[None, :])
        filled = tl.max(lands.to(tl.int32), axis=0) == 1
        kx0 = tl.where(filled, tl.sum(tl.where(lands, x0[:, None], 0.0), axis=0), kx0)
        ky0 = tl.where(filled, tl.sum(tl.where(lands, y0[:, None], 0.0), axis=0), ky0)
        kx1 = tl.where(filled, tl.sum(tl.where(lands, x1[:, None], 0.0), axis=0), kx1)
        ky1 = tl.where(filled, tl.sum(tl.where(lands, y1[:, None], 0.0), axis=0), ky1)
        kc = tl.where(filled, tl.sum(tl.where(lands, cls[:, None], 0), axis=0), kc)
        n_kept = tl.minimum(n_kept + tl.sum(kept, axis=0), max_det)
        start += TILE
    empty = (k >= n_kept) & (k < max_det)
    tl.store(keep_ptr + b * max_det + k, tl.full([KEPT], -1, tl.int64), mask=empty)
    tl.store(kept_scores_ptr + b * max_det + k, tl.zeros([KEPT], tl.float32), mask=empty)


def nms_triton(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
               score_threshold: float, max_det: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as nms_reference, computed by the Triton kernel; no host sync."""
    check_args(boxes, scores, classes, iou_threshold, max_det)
    batch, n = scores.shape
    keep = torch.empty(batch, max_det, dtype=torch.int64, device=boxes.device)
    kept_scores = torch.empty(batch, max_det, dtype=torch.float32, device=boxes.device)
    if batch == 0:
        return keep, kept_scores
    order, count = candidate_order(scores, score_threshold)
    # GPU: small tiles, since a tile meets every kept slot in registers. Interpreter: big ones (it pays per op).
    tile = 16 if boxes.is_cuda else 128
    with launch_device(boxes.device):
        nms_kernel[(batch,)](boxes.contiguous(), scores.contiguous(), classes.contiguous(), order, count, keep,
                             kept_scores, n, max_det, float(iou_threshold), TILE=tile,
                             KEPT=triton.next_power_of_2(max_det),
                             enable_fp_fusion=False)  # no FMA: the IoU test rounds as the reference's does
    return keep, kept_scores
