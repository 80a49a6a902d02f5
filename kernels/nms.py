"""Batched, class-aware greedy non-maximum suppression with a static output size.

Per image b, over its N boxes (x0, y0, x1, y1), scores and integer classes:

    candidates = the boxes with score > score_threshold (strict; a NaN score is never one), in descending score
                 order, ties by ascending index
    walk the candidates in that order: a candidate is kept unless a kept box of its own class overlaps it with
    IoU > iou_threshold (strict); stop once max_det are kept

    keep[b]        = the kept indices in that order, then -1 up to max_det        [B, max_det] int64
    kept_scores[b] = their scores, then 0                                         [B, max_det] fp32

Boxes of different classes never suppress each other, so this is torchvision's batched_nms (greedy NMS per class)
merged in score order. IoU is computed as `inter > iou_threshold * union` in fp32, with negative widths and heights
clamped to 0: degenerate boxes (union 0) overlap nothing and no division can make a NaN. Boxes must be finite (NaN
min/max differ between numpy and the GPU): callers drop the candidates whose box is not.

Layout: reference first (what the CPU runtime runs; numpy, in blocks), then the Triton kernel, then dispatch. The
kernel's wrapper sorts with torch (stable, capturable) and the kernel walks the sorted candidates, one program per
image, in tiles: a tile is first checked against every box kept so far (held in registers, at most max_det), then
resolved within itself by iterating keep = candidate & not suppressed by an earlier kept box of the tile until
nothing changes. That fixed point is the greedy answer (each box's value depends only on earlier boxes, so after k
rounds the first k are final: at most TILE + 1 rounds, and the fixed point is unique)."""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.launch import launch_device


def _check(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
           max_det: int) -> None:
    assert boxes.dim() == 3 and boxes.shape[2] == 4 and boxes.dtype == torch.float32, (boxes.shape, boxes.dtype)
    assert scores.shape == boxes.shape[:2] and scores.dtype == torch.float32, (scores.shape, scores.dtype)
    assert classes.shape == boxes.shape[:2] and classes.dtype in (torch.int32, torch.int64), classes.dtype
    assert boxes.device == scores.device == classes.device
    assert max_det >= 1 and 0.0 <= iou_threshold <= 1.0, (max_det, iou_threshold)


def iou_exceeds(a: np.ndarray, b: np.ndarray, iou_threshold: float) -> np.ndarray:
    """IoU(a, b) > iou_threshold for broadcastable [..., 4] fp32 xyxy boxes, in the kernel's operation order."""
    ax0, ay0, ax1, ay1 = np.moveaxis(a, -1, 0)
    bx0, by0, bx1, by1 = np.moveaxis(b, -1, 0)
    inter = (np.maximum(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0)
             * np.maximum(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0))
    area_a = np.maximum(ax1 - ax0, 0) * np.maximum(ay1 - ay0, 0)
    area_b = np.maximum(bx1 - bx0, 0) * np.maximum(by1 - by0, 0)
    return inter > np.float32(iou_threshold) * (area_a + area_b - inter)


def candidate_order(scores: torch.Tensor, score_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [B, N] int64: every index, candidates first by descending score then index; count [B] int32)."""
    passes = scores > score_threshold
    masked = torch.where(passes, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    return order, passes.sum(dim=1, dtype=torch.int32)


def greedy_kept(boxes: np.ndarray, classes: np.ndarray, iou_threshold: float, max_det: int,
                block: int = 256) -> list[int]:
    """Positions of the kept boxes among candidates already in walk order (boxes [n, 4] fp32, classes [n]). Blocks
    of candidates are checked against the boxes kept so far at once, then walked one by one against their block's
    pairwise matrix: a handful of array operations per block rather than per kept box."""
    kept: list[int] = []
    for start in range(0, len(boxes), block):
        blk, cls = boxes[start:start + block], classes[start:start + block]
        alive = np.ones(len(blk), dtype=bool)
        if kept:
            alive &= ~(iou_exceeds(blk[:, None], boxes[kept][None], iou_threshold)
                       & (cls[:, None] == classes[kept][None])).any(axis=1)
        suppress = iou_exceeds(blk[:, None], blk[None], iou_threshold) & (cls[:, None] == cls[None])
        for i in range(len(blk)):
            if alive[i]:
                kept.append(start + i)
                if len(kept) == max_det:
                    return kept
                alive[i + 1:] &= ~suppress[i, i + 1:]
    return kept


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                  score_threshold: float, max_det: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, max_det] int64, kept_scores [B, max_det] fp32) as the module docstring defines them."""
    _check(boxes, scores, classes, iou_threshold, max_det)
    batch = boxes.shape[0]
    keep = torch.full((batch, max_det), -1, dtype=torch.int64, device=boxes.device)
    kept_scores = torch.zeros(batch, max_det, dtype=torch.float32, device=boxes.device)
    order, count = candidate_order(scores, score_threshold)
    for b, n in enumerate(count.tolist()):
        idx = order[b, :n]
        kept = greedy_kept(boxes[b, idx].cpu().numpy(), classes[b, idx].cpu().numpy(), iou_threshold, max_det)
        kept_idx = idx[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]
        keep[b, :len(kept)] = kept_idx
        kept_scores[b, :len(kept)] = scores[b, kept_idx]
    return keep, kept_scores


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
    _check(boxes, scores, classes, iou_threshold, max_det)
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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                score_threshold: float, max_det: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (capturable), the torch reference on CPU."""
    fn = nms_triton if boxes.is_cuda else nms_reference
    return fn(boxes, scores, classes, iou_threshold, score_threshold, max_det)
