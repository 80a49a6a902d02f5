"""NMS kernel (compiled on CUDA, else under TRITON_INTERPRET=1) equal to nms_reference, and nms_reference equal to a
plain per-class greedy NMS written here with Python loops."""
from __future__ import annotations

import math

import pytest
import torch

from fixtures.triton_mode import KERNEL_DEVICE
from kernels.nms import batched_nms, nms_reference
from kernels.nms_triton import nms_triton

NAN = float("nan")


def random_boxes(g: torch.Generator, batch: int, n: int, extent: float = 100.0, size: float = 30.0) -> torch.Tensor:
    corner = torch.rand(batch, n, 2, generator=g) * extent
    return torch.cat([corner, corner + torch.rand(batch, n, 2, generator=g) * size], dim=-1)


def random_case(g: torch.Generator, batch: int, n: int, classes: int):
    scores = torch.rand(batch, n, generator=g)
    labels = torch.randint(0, classes, (batch, n), generator=g)
    return random_boxes(g, batch, n), scores, labels


def check(boxes, scores, classes, iou_threshold, score_threshold, max_det):
    """The kernel's output equals the reference's exactly; returns the reference's."""
    keep, kept_scores = nms_reference(boxes, scores, classes, iou_threshold, score_threshold, max_det)
    dev = KERNEL_DEVICE
    out_keep, out_scores = nms_triton(boxes.to(dev), scores.to(dev), classes.to(dev), iou_threshold,
                                      score_threshold, max_det)
    assert torch.equal(out_keep.cpu(), keep), (out_keep.cpu(), keep)
    assert torch.equal(out_scores.cpu(), kept_scores)
    assert keep.shape == kept_scores.shape == (boxes.shape[0], max_det)
    assert keep.dtype == torch.int64 and kept_scores.dtype == torch.float32
    return keep, kept_scores


def plain_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes; 0 where the union is empty."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0) + max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) - inter
    return inter / union if union > 0 else 0.0


def plain_nms(boxes: list, scores: list, classes: list, iou_threshold: float, score_threshold: float,
              max_det: int) -> list[int]:
    """Greedy NMS per class in float64, merged in descending score order (ties by index)."""
    candidates = sorted((i for i, s in enumerate(scores) if s > score_threshold), key=lambda i: (-scores[i], i))
    kept_by_class: dict[int, list[int]] = {}
    for i in candidates:
        own = kept_by_class.setdefault(classes[i], [])
        if all(plain_iou(boxes[j], boxes[i]) <= iou_threshold for j in own):
            own.append(i)
    merged = sorted((i for own in kept_by_class.values() for i in own), key=lambda i: (-scores[i], i))
    return merged[:max_det]


# --- kernel == reference -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,n,classes,max_det", [
    (1, 1, 1, 1), (1, 2, 1, 300), (2, 7, 2, 3), (3, 64, 3, 300), (4, 129, 2, 16), (1, 300, 5, 300),
    (2, 500, 1, 10), (2, 1000, 4, 100), (1, 2500, 8, 300), (4, 257, 80, 64),
], ids=lambda v: str(v))
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_random_matches_reference(batch, n, classes, max_det, iou_threshold):
    g = torch.Generator().manual_seed(batch * 10_000 + n + classes)
    boxes, scores, labels = random_case(g, batch, n, classes)
    keep, _ = check(boxes, scores, labels, iou_threshold, 0.25, max_det)
    assert (keep >= 0).any()


@pytest.mark.parametrize("max_det", [1, 5, 40, 1000])
def test_max_det_below_and_above_the_survivors(max_det):
    g = torch.Generator().manual_seed(max_det)
    boxes, scores, labels = random_case(g, 2, 400, 3)
    keep, kept_scores = check(boxes, scores, labels, 0.5, 0.0, max_det)
    survivors = (nms_reference(boxes, scores, labels, 0.5, 0.0, 2000)[0] >= 0).sum(dim=1)
    assert survivors.min() > 5 and survivors.max() < 1000
    assert torch.equal((keep >= 0).sum(dim=1), survivors.clamp(max=max_det))
    assert torch.equal(kept_scores[keep < 0], torch.zeros((keep < 0).sum().item()))


@pytest.mark.parametrize("n", [1, 5, 300])
def test_identical_boxes(n):
    boxes = torch.tensor([10.0, 20.0, 30.0, 50.0]).expand(2, n, 4).contiguous()
    scores = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) * 0.5 + 0.5
    one_class = torch.zeros(2, n, dtype=torch.int64)
    keep, _ = check(boxes, scores, one_class, 0.7, 0.25, 300)
    assert torch.equal(keep[:, 0], scores.argmax(dim=1)) and (keep[:, 1:] == -1).all()
    two_classes = torch.arange(n).remainder(2).expand(2, n).contiguous()
    keep, _ = check(boxes, scores, two_classes, 0.7, 0.25, 300)
    assert ((keep >= 0).sum(dim=1) == min(n, 2)).all()


def test_degenerate_boxes_overlap_nothing():
    # zero-area points and lines, an inverted box (x1 < x0), and two identical ones of each
    one = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 3.0, 10.0, 3.0], [0.0, 3.0, 10.0, 3.0],
                        [8.0, 8.0, 2.0, 2.0], [8.0, 8.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, 10.0]])
    boxes = one.expand(3, -1, -1).contiguous()
    scores = torch.linspace(0.9, 0.3, 8).expand(3, -1).contiguous()
    classes = torch.zeros(3, 8, dtype=torch.int64)
    for iou_threshold in (0.0, 0.5, 1.0):
        keep, _ = check(boxes, scores, classes, iou_threshold, 0.1, 10)
        assert torch.equal(keep[0, :8], torch.arange(8))  # nothing has an area in common with anything


def test_nan_scores_are_never_candidates():
    g = torch.Generator().manual_seed(3)
    boxes, scores, labels = random_case(g, 3, 200, 2)
    scores[0, ::3] = NAN
    scores[1] = NAN
    keep, kept_scores = check(boxes, scores, labels, 0.6, 0.2, 300)
    assert not torch.isnan(scores[0, keep[0][keep[0] >= 0]]).any()
    assert (keep[1] == -1).all() and (kept_scores[1] == 0).all()
    assert not torch.isnan(kept_scores).any()


def test_ties_in_score_go_by_index():
    g = torch.Generator().manual_seed(4)
    boxes, _, labels = random_case(g, 2, 300, 3)
    scores = (torch.randint(0, 4, (2, 300), generator=g).float() + 1) / 5  # four distinct values
    keep, _ = check(boxes, scores, labels, 0.5, 0.0, 300)
    for b in range(2):
        k = keep[b][keep[b] >= 0].tolist()
        assert sorted(k, key=lambda i: (-scores[b, i].item(), i)) == k
    apart = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10.0, 10.0] for i in range(6)])[None]
    keep, _ = check(apart, torch.full((1, 6), 0.5), torch.zeros(1, 6, dtype=torch.int64), 0.5, 0.1, 6)
    assert keep[0].tolist() == list(range(6))


def test_nothing_above_the_threshold():
    g = torch.Generator().manual_seed(5)
    boxes, scores, labels = random_case(g, 2, 100, 2)
    keep, kept_scores = check(boxes, scores * 0.5, labels, 0.5, 0.5, 300)
    assert (keep == -1).all() and (kept_scores == 0).all()
    keep, _ = check(boxes, torch.full_like(scores, 0.5), labels, 0.5, 0.5, 300)  # the floor is strict
    assert (keep == -1).all()


@pytest.mark.parametrize("iou_threshold", [0.0, 1.0])
def test_iou_threshold_extremes(iou_threshold):
    g = torch.Generator().manual_seed(6)
    boxes, scores, labels = random_case(g, 2, 300, 2)
    boxes[:, :20] = boxes[:, :1]  # identical boxes: IoU exactly 1, never > 1
    keep, _ = check(boxes, scores, labels, iou_threshold, 0.0, 300)
    kept = (keep >= 0).sum(dim=1)
    if iou_threshold == 1.0:
        assert (kept == 300).all()  # nothing suppresses at 1
    else:
        for b in range(2):  # any overlap at all suppresses at 0: no two kept boxes of a class share an area
            k = keep[b][keep[b] >= 0].tolist()
            assert not any(labels[b, i] == labels[b, j] and plain_iou(boxes[b, i].tolist(), boxes[b, j].tolist()) > 0
                           for i in k for j in k if i < j)
        assert (kept < 300).all()


def test_classes_never_suppress_each_other():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(1, 6, 4).contiguous()
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    classes = torch.tensor([[0, 1, 0, 2, 1, 2]], dtype=torch.int32)
    keep, kept_scores = check(boxes, scores, classes, 0.5, 0.1, 10)
    assert keep[0, :3].tolist() == [0, 1, 3] and (keep[0, 3:] == -1).all()
    assert kept_scores[0, :3].tolist() == pytest.approx([0.9, 0.8, 0.6])


def test_empty_batch_and_dispatch():
    empty = torch.zeros(0, 5, 4), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.int64)
    for fn in (nms_reference, nms_triton):
        keep, kept_scores = fn(*empty, 0.5, 0.1, 7)
        assert keep.shape == kept_scores.shape == (0, 7)
    g = torch.Generator().manual_seed(7)
    args = random_case(g, 2, 50, 2)
    assert all(torch.equal(a, b) for a, b in zip(batched_nms(*args, 0.5, 0.2, 20),
                                                  nms_reference(*args, 0.5, 0.2, 20)))


@pytest.mark.slow
def test_many_survivors_in_a_chain():
    """A same-class chain where each box suppresses only the next: the in-tile fixed point needs a round per box,
    and half of N survive, far past max_det or not."""
    n = 3000
    x = torch.arange(n, dtype=torch.float32) * 0.3
    boxes = torch.stack([x, torch.zeros(n), x + 1, torch.ones(n)], dim=-1)[None]
    scores = torch.linspace(1.0, 0.5, n)[None]
    classes = torch.zeros(1, n, dtype=torch.int64)
    for max_det in (300, 2000):
        keep, _ = check(boxes, scores, classes, 0.3, 0.1, max_det)
        assert keep[0, :min(max_det, 1500)].tolist() == list(range(0, 2 * min(max_det, 1500), 2))


@pytest.mark.slow
@pytest.mark.parametrize("batch,n,classes", [(4, 4000, 3), (2, 8400, 80)])
def test_large_random_matches_reference(batch, n, classes):
    g = torch.Generator().manual_seed(n)
    boxes, scores, labels = random_case(g, batch, n, classes)
    check(boxes, scores, labels, 0.7, 0.25, 300)


# --- reference == plain greedy NMS -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_plain_greedy_nms(seed):
    g = torch.Generator().manual_seed(100 + seed)
    batch, n, classes = 1 + seed % 3, (5, 40, 200, 700)[seed % 4], 1 + seed % 4  # 700: several of its blocks
    # small extent: plenty of overlap; scores in steps of 1/8 (ties) in half the cases
    boxes = random_boxes(g, batch, n, extent=50.0, size=25.0)
    scores = torch.rand(batch, n, generator=g)
    if seed % 2:
        scores = (scores * 8).floor() / 8
    labels = torch.randint(0, classes, (batch, n), generator=g)
    iou_threshold, max_det = (0.3, 0.5, 0.7, 0.0, 1.0)[seed % 5], (3, 50, 300, 1000)[seed % 3 + seed // 9]
    keep, kept_scores = nms_reference(boxes, scores, labels, iou_threshold, 0.2, max_det)
    for b in range(batch):
        want = plain_nms(boxes[b].double().tolist(), scores[b].tolist(), labels[b].tolist(), iou_threshold, 0.2,
                         max_det)
        assert keep[b, :len(want)].tolist() == want and (keep[b, len(want):] == -1).all()
        assert kept_scores[b, :len(want)].tolist() == [scores[b, i].item() for i in want]


def test_plain_iou_sanity():
    assert plain_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    assert plain_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert math.isclose(plain_iou([0, 0, 1, 1], [0, 0, 1, 1]), 1.0)
