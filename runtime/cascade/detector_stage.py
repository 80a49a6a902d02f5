"""Segment 2: gather the routed rows, run every detector, vote. Guarded by a breaker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from graphs.nvtx import nvtx_range
from graphs.runner import BucketGraphs, default_buckets
from kernels.preprocess import PreprocessSpec, preprocess_into
from kernels.vote import vote
from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import DetectorSpec, DetectorStageSpec
from runtime.cascade.classifier_stage import ClassifierStage
from runtime.cascade.results import Box, StageAnswer
from runtime.cascade.stage import ChunkImages, GraphPools, warm_segment
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.detect_postprocess import to_image_xyxy
from runtime.transfer import to_device


@dataclass
class LoadedDetector:
    spec: DetectorSpec
    model: Deimv2Detector
    preprocess: PreprocessSpec
    class_ids: tuple[int, ...]
    shared: bool  # reads the classifier's backbone layers ...
    layer_pos: tuple[int, ...] = ()  # ... these entries of the kept-layer list, in its hidden_layers order
    logits: torch.Tensor | None = None  # static [max_batch, queries, labels], for boxes
    boxes: torch.Tensor | None = None  # static [max_batch, queries, 4]

    @property
    def class_names(self) -> list[str]:
        return [self.model.cfg.id2label[i] for i in self.class_ids]


class DetectorStage:
    def __init__(self, spec: DetectorStageSpec, detectors: list[LoadedDetector], first: ClassifierStage,
                 device: torch.device, dtype: torch.dtype, max_batch: int):
        self.spec, self.name, self.detectors, self.first, self.device = spec, spec.name, detectors, first, device
        self.routes = spec.exit_below is not None  # a VLM follows
        self.breaker = Breaker(spec.name, spec.failure_threshold, spec.cooldown_s)
        self.time_budget_s = None if spec.time_budget_ms is None else spec.time_budget_ms / 1000
        self.fault_hook: Callable[[], None] | None = None  # tests: raise here to make the stage fail
        # Right after the classifier on its device, the route kernel's index list and the probabilities are
        # already where segment 2 reads them; on another device they are copied over.
        self.local = device == first.device
        self.index = first.index if self.local else torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.stage1_prob = first.prob if self.local else torch.zeros(max_batch, dtype=torch.float32, device=device)
        for d in detectors:
            if d.shared:
                d.layer_pos = tuple(first.keep_layers.index(layer) for layer in d.model.hidden_layers)
        self.any_shared = any(d.shared for d in detectors)
        self.own_pixels = {d.preprocess: torch.zeros(max_batch, 3, d.preprocess.height, d.preprocess.width,
                                                     dtype=dtype, device=device) for d in detectors if not d.shared}
        for d in detectors:
            cfg = d.model.cfg
            d.logits = torch.zeros(max_batch, cfg.num_queries, cfg.num_labels, dtype=dtype, device=device)
            d.boxes = torch.zeros(max_batch, cfg.num_queries, 4, dtype=dtype, device=device)
        self.class_index = [torch.tensor(d.class_ids, dtype=torch.int64, device=device) for d in detectors]
        offsets = np.cumsum([0] + [len(d.class_ids) * d.model.cfg.num_queries for d in detectors])
        self.offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.thresholds = torch.tensor([d.spec.box_threshold for d in detectors], dtype=torch.float32, device=device)
        self.weights = torch.tensor([d.spec.weight for d in detectors], dtype=torch.float32, device=device)
        self.conf = torch.zeros(max_batch, len(detectors), dtype=torch.float32, device=device)
        self.fraction = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.prob = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.graphs = BucketGraphs(self.segment, default_buckets(max_batch), device)

    def segment(self, c: int) -> tuple[torch.Tensor, ...]:
        idx = self.index[:c].clamp(min=0)  # bucket padding holds -1: it reads row 0 and its answer is ignored
        pixels, hidden = None, []
        if self.any_shared:
            pixels = self.first.runner.input.index_select(0, idx)
            hidden = [h.index_select(0, idx) for h in self.first.hidden]
        scores = []
        for d, class_index in zip(self.detectors, self.class_index):
            if d.shared:
                out = d.model.forward_from_backbone(pixels, [hidden[i] for i in d.layer_pos])
            else:
                out = d.model(self.own_pixels[d.preprocess][:c])
            d.logits[:c].copy_(out.logits)
            d.boxes[:c].copy_(out.pred_boxes)
            scores.append(out.logits.index_select(2, class_index).float().flatten(1))
        with nvtx_range("vote"):
            vote(torch.cat(scores, dim=1), self.offsets, self.thresholds, self.weights,
                 self.stage1_prob.index_select(0, idx), self.spec.classifier_weight, self.spec.majority,
                 self.conf[:c], self.fraction[:c], self.prob[:c])
        return (self.prob[:c],)

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        if self.fault_hook is not None:
            self.fault_hook()
        c = len(pending)
        if not self.local:
            self.index[:c].copy_(torch.tensor(pending, dtype=torch.int32))
            self.stage1_prob.copy_(self.first.prob)
        for spec, pixels in self.own_pixels.items():
            for slot, i in enumerate(pending):
                preprocess_into(pixels, slot, to_device(images.device[i], self.device), spec)
        self.graphs.replay(self.graphs.bucket_for(c))
        probs, conf = self.prob[:c].tolist(), self.conf[:c].tolist()
        boxes = self.boxes(pending, images.host) if want_boxes else [None] * c
        return [StageAnswer(p, self.goes_on(p), {d.spec.name: s for d, s in zip(self.detectors, row)}, b)
                for p, row, b in zip(probs, conf, boxes)]

    def goes_on(self, p: float) -> bool:
        """Strict comparisons, as the route kernel's: a p equal to a threshold, or NaN, goes on."""
        return self.routes and not (p < self.spec.exit_below or p > self.spec.exit_above)

    def boxes(self, routed: list[int], images: list[torch.Tensor]) -> list[list[Box]]:
        out: list[list[Box]] = [[] for _ in routed]
        c = len(routed)
        for d, class_index in zip(self.detectors, self.class_index):
            scores = torch.sigmoid(d.logits[:c].index_select(2, class_index).float()).cpu()  # [c, Q, R]
            pred = d.boxes[:c].cpu()
            names = d.class_names
            for slot, i in enumerate(routed):
                queries, classes = (scores[slot] > d.spec.box_threshold).nonzero(as_tuple=True)
                height, width = images[i].shape[:2]
                xyxy = to_image_xyxy(pred[slot][queries], d.preprocess, height, width)
                for q, r, xy in zip(queries.tolist(), classes.tolist(), xyxy.tolist()):
                    out[slot].append(Box(d.spec.name, names[r], scores[slot, q, r].item(), tuple(xy)))
        for found in out:
            found.sort(key=lambda box: -box.score)
        return out

    def warmup(self, pools: GraphPools) -> None:
        warm_segment(self.graphs, pools)

    def describe(self) -> dict:
        out = {
            "name": self.name, "kind": "detectors", "device": str(self.device), "majority": self.spec.majority,
            "classifier_weight": self.spec.classifier_weight, "time_budget_ms": self.spec.time_budget_ms,
            "breaker": self.breaker.state,
            "detectors": [{"name": d.spec.name, "model": str(d.spec.model), "model_type": "deimv2",
                           "roadwork_classes": d.class_names, "weight": d.spec.weight,
                           "box_threshold": d.spec.box_threshold, "shared_backbone": d.shared,
                           "quantize": d.spec.quantize or "none",
                           "input_size": [d.preprocess.height, d.preprocess.width]} for d in self.detectors],
        }
        if self.routes:
            out.update(exit_below=self.spec.exit_below, exit_above=self.spec.exit_above)
        return out
