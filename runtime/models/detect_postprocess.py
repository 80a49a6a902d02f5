"""Detector outputs -> detections: transformers' RT-DETR family post_process_object_detection (sigmoid / focal-loss
scoring: top-k over queries x classes, score threshold, cxcywh -> pixel xyxy; no NMS), and the mapping of model-input
boxes back to the original image that the detectors stage serves `?detail=1` boxes with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.preprocess import PreprocessSpec


@dataclass
class DetectorOutput:
    """What every detector family's forward returns (the detectors stage's contract)."""
    logits: torch.Tensor      # [B, num_queries, num_labels] before sigmoid
    pred_boxes: torch.Tensor  # [B, num_queries, 4] normalized (cx, cy, w, h)


@dataclass
class Detections:
    scores: torch.Tensor  # [N] sigmoid scores, descending
    labels: torch.Tensor  # [N] int64 class ids
    boxes: torch.Tensor   # [N, 4] (x0, y0, x1, y1), pixels of the target size (normalized without one)


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def post_process_object_detection(logits: torch.Tensor, pred_boxes: torch.Tensor, threshold: float = 0.5,
                                  target_sizes: torch.Tensor | list[tuple[int, int]] | None = None
                                  ) -> list[Detections]:
    """logits [B, Q, C], pred_boxes [B, Q, 4] normalized cxcywh; target_sizes [B, 2] as (height, width).

    Keeps, per image, the best Q (query, class) pairs whose score is strictly above `threshold`."""
    assert logits.dim() == 3 and pred_boxes.shape == (*logits.shape[:2], 4), (logits.shape, pred_boxes.shape)
    batch, num_queries, num_classes = logits.shape
    boxes = center_to_corners(pred_boxes)
    if target_sizes is not None:
        sizes = torch.as_tensor(target_sizes)
        if sizes.shape != (batch, 2):
            raise ValueError(f"target_sizes must be {batch} (height, width) pairs, got shape {tuple(sizes.shape)}")
        img_h, img_w = sizes.unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.device)[:, None, :]
    scores, index = torch.topk(torch.sigmoid(logits).flatten(1), num_queries, dim=-1)
    labels = index % num_classes
    boxes = boxes.gather(1, (index // num_classes).unsqueeze(-1).expand(-1, -1, 4))
    keep = scores > threshold
    return [Detections(s[k], l[k], b[k]) for s, l, b, k in zip(scores, labels, boxes, keep)]


def to_image_xyxy(cxcywh: torch.Tensor, spec: PreprocessSpec, height: int, width: int) -> torch.Tensor:
    """Normalized (cx, cy, w, h) boxes on the model input -> (x0, y0, x1, y1) pixels of the original
    height x width image, undoing the preprocessing's resize and center crop (in float64)."""
    resized_h, resized_w = spec.resized_size(height, width)
    top, left = spec.crop_offsets(resized_h, resized_w)
    x0, y0, x1, y1 = center_to_corners(cxcywh.double()).unbind(-1)
    xs = [(x * spec.width + left) * width / resized_w for x in (x0, x1)]
    ys = [(y * spec.height + top) * height / resized_h for y in (y0, y1)]
    return torch.stack([xs[0], ys[0], xs[1], ys[1]], dim=-1)
