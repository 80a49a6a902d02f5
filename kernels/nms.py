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

Layout: reference first (what the CPU runtime runs; numpy, in blocks), then dispatch; the Triton kernel is in
kernels/nms_triton.py, imported only where it launches. The kernel's wrapper sorts with torch (stable, capturable)
and the kernel walks the sorted candidates, one program per image, in tiles: a tile is first checked against every
box kept so far (held in registers, at most max_det), then resolved within itself by iterating keep = candidate &
not suppressed by an earlier kept box of the tile until nothing changes. That fixed point is the greedy answer (each
box's value depends only on earlier boxes, so after k rounds the first k are final: at most TILE + 1 rounds, and the
fixed point is unique)."""
from __future__ import annotations

import numpy as np
import torch



def check_args(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
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
    check_args(boxes, scores, classes, iou_threshold, max_det)
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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float,
                score_threshold: float, max_det: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (capturable), the torch reference on CPU."""
    if boxes.is_cuda:
        from kernels.nms_triton import nms_triton
        return nms_triton(boxes, scores, classes, iou_threshold, score_threshold, max_det)
    return nms_reference(boxes, scores, classes, iou_threshold, score_threshold, max_det)
