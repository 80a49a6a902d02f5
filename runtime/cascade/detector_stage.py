"""Segment 2: every ensemble member scores the routed rows, then the weighted vote. Guarded by a breaker, and each
member by its own: a member that raised, or whose breaker is open, leaves the vote (weight 0 for that call) while
the others decide; only when no member answers does the stage fail.

On CUDA each hand-built member is its own set of CUDA graphs (one per batch bucket, in a memory pool of its own) replayed
on its own stream, on the device cascade.toml puts it on; the vote waits on the members' events, not on the host.
ONNX and transformers members run on the host meanwhile. On CPU the members run in turn."""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable

import numpy as np
import torch

from graphs.nvtx import nvtx_range
from graphs.runner import BucketGraphs, default_buckets, weak_method
from kernels.preprocess import preprocess_into
from kernels.vote import vote
from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import DetectorStageSpec
from runtime.cascade.classifier_stage import ClassifierStage
from runtime.cascade.detector_members import LoadedDetector
from runtime.cascade.results import Box, StageAnswer, StageTiming
from runtime.cascade.stage import ChunkImages, GraphPools, warm_segment
from runtime.errors import InputError
from runtime.models.detect_postprocess import DetectorOutput, center_to_corners, to_image_xyxy
from runtime.transfer import to_device

log = logging.getLogger(__name__)

ABSENT_LOGIT = -1e4  # a member out of the vote: every score sigmoid(-1e4) = 0, and its weight is 0 anyway


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
            assert not d.shared or d.device == first.device, d.spec.name
            if d.shared:
                d.layer_pos = tuple(first.keep_layers.index(layer) for layer in d.model.hidden_layers)
        # One pixel buffer per distinct (preprocessing, device, dtype); ONNX Runtime takes float32.
        self.pixel_keys = {d.spec.name: (d.preprocess, d.device, dtype if d.graphed else torch.float32)
                           for d in detectors if d.preprocess is not None and not d.shared}
        self.own_pixels = {key: torch.zeros(max_batch, 3, key[0].height, key[0].width, dtype=key[2], device=key[1])
                           for key in set(self.pixel_keys.values())}
        out_dtype = {d.spec.name: dtype if d.graphed else torch.float32 for d in detectors}
        self.logits = {d.spec.name: torch.zeros(max_batch, d.num_queries, d.num_labels, dtype=out_dtype[d.spec.name],
                                                device=d.device) for d in detectors}
        self.boxes_out = {d.spec.name: torch.zeros(max_batch, d.num_queries, 4, dtype=out_dtype[d.spec.name],
                                                   device=d.device) for d in detectors}
        self.class_index = {d.spec.name: torch.tensor(d.class_ids, dtype=torch.int64, device=d.device)
                            for d in detectors}
        offsets = np.cumsum([0] + [len(d.class_ids) * d.num_queries for d in detectors])
        self.columns = {d.spec.name: (int(offsets[k]), int(offsets[k + 1])) for k, d in enumerate(detectors)}
        # Each member's roadwork-class logits, on its own device; the vote reads them gathered here.
        self.member_scores = {d.spec.name: torch.zeros(max_batch, int(offsets[k + 1] - offsets[k]),
                                                       dtype=torch.float32, device=d.device)
                              for k, d in enumerate(detectors)}
        self.scores = torch.zeros(max_batch, int(offsets[-1]), dtype=torch.float32, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.thresholds = torch.tensor([d.spec.box_threshold for d in detectors], dtype=torch.float32, device=device)
        self.weights = [d.spec.weight for d in detectors]
        self.live_weights = torch.tensor(self.weights, dtype=torch.float32, device=device)  # 0 for absent members
        self.conf = torch.zeros(max_batch, len(detectors), dtype=torch.float32, device=device)
        self.fraction = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.prob = torch.zeros(max_batch, dtype=torch.float32, device=device)
        buckets = default_buckets(max_batch)
        self.member_graphs = {d.spec.name: BucketGraphs(partial(weak_method(self.member_segment), d), buckets,
                                                        d.device) for d in detectors if d.graphed}
        self.streams = {name: torch.cuda.Stream(g.device) for name, g in self.member_graphs.items()
                        if g.use_cuda_graphs}
        self.graphs = BucketGraphs(weak_method(self.vote_segment), buckets, device)

    # --- the device work -----------------------------------------------------------------------------------------

    def member_segment(self, d: LoadedDetector, c: int) -> tuple[torch.Tensor, ...]:
        """One hand-built member on the first c rows: its input, its model, its roadwork-class logits."""
        if d.shared:
            idx = self.index[:c].clamp(min=0)  # bucket padding holds -1: it reads row 0, its answer is ignored
            pixels = self.first.runner.input.index_select(0, idx)
            out = d.model.forward_from_backbone(pixels, [self.first.hidden[i].index_select(0, idx)
                                                         for i in d.layer_pos])
        else:
            out = d.model(self.own_pixels[self.pixel_keys[d.spec.name]][:c])
        return self.keep(d, c, out)

    def keep(self, d: LoadedDetector, c: int, out: DetectorOutput) -> tuple[torch.Tensor, ...]:
        """A member's output into its static buffers (boxes for ?detail=1, roadwork logits for the vote)."""
        name = d.spec.name
        self.logits[name][:c].copy_(out.logits)
        self.boxes_out[name][:c].copy_(out.pred_boxes)
        scores = self.member_scores[name][:c]
        scores.copy_(out.logits.index_select(2, self.class_index[name]).flatten(1))
        return (scores,)

    def vote_segment(self, c: int) -> tuple[torch.Tensor, ...]:
        idx = self.index[:c].clamp(min=0)
        with nvtx_range("vote"):
            vote(self.scores[:c], self.offsets, self.thresholds, self.live_weights,
                 self.stage1_prob.index_select(0, idx), self.spec.classifier_weight, self.spec.majority,
                 self.conf[:c], self.fraction[:c], self.prob[:c])
        return (self.prob[:c],)

    # --- one call --------------------------------------------------------------------------------------------------

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        if self.fault_hook is not None:
            self.fault_hook()
        c = len(pending)
        bucket = self.graphs.bucket_for(c)
        if not self.local:
            self.index[:c].copy_(torch.tensor(pending, dtype=torch.int32))
            self.stage1_prob.copy_(self.first.prob)
        for key, pixels in self.own_pixels.items():
            spec, device, _ = key
            for slot, i in enumerate(pending):
                preprocess_into(pixels, slot, to_device(images.device[i], device), spec)
        live = [d for d in self.detectors if d.breaker.allow()]
        answered = [d for d in live if d.graphed and self.launch(d, c, bucket)]  # on CUDA: async, a stream each
        answered += [d for d in live if not d.graphed and self.run_eager(d, c, pending, images)]
        if not answered:
            raise RuntimeError(f"stage '{self.name}': no detector answered (breakers: "
                               f"{ {d.spec.name: d.breaker.state for d in self.detectors} })")
        for d in self.detectors:
            a, b = self.columns[d.spec.name]
            if d in answered:
                self.scores[:c, a:b].copy_(self.member_scores[d.spec.name][:c], non_blocking=True)
            else:
                self.scores[:c, a:b].fill_(ABSENT_LOGIT)
        self.live_weights.copy_(torch.tensor([w if d in answered else 0.0 for d, w in
                                              zip(self.detectors, self.weights)], dtype=torch.float32))
        self.wait_for_members(answered)
        self.graphs.replay(bucket)
        probs, conf = self.prob[:c].tolist(), self.conf[:c].tolist()  # the host sync
        member_ms = self.record_times(answered, c)
        boxes = self.list_boxes(answered, pending, images.host) if want_boxes else [None] * c
        return [StageAnswer(p, self.goes_on(p), {d.spec.name: row[k] for k, d in enumerate(self.detectors)
                                                 if d in answered}, b, detector_ms=member_ms)
                for p, row, b in zip(probs, conf, boxes)]

    def launch(self, d: LoadedDetector, c: int, bucket: int) -> bool:
        """Replay a hand-built member's bucket graph (on CUDA on its stream, after the work its inputs came
        from); True if it ran. A CUDA member's failure surfaces at the next sync, as the stage's."""
        graphs, stream = self.member_graphs[d.spec.name], self.streams.get(d.spec.name)
        if stream is None:
            return self.guarded(d, lambda: graphs.replay(bucket), c)
        stream.wait_stream(torch.cuda.current_stream(self.first.device))
        stream.wait_stream(torch.cuda.current_stream(d.device))
        with torch.cuda.stream(stream):
            d.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            d.events[0].record(stream)
            graphs.replay(bucket)
            d.events[1].record(stream)
        return True

    def run_eager(self, d: LoadedDetector, c: int, pending: list[int], images: ChunkImages) -> bool:
        """An ONNX Runtime or transformers member, on the host; True if it answered."""
        def call():
            if d.preprocess is None:
                out = d.model([images.host[i] for i in pending])
            else:
                out = d.model(self.own_pixels[self.pixel_keys[d.spec.name]][:c])
            self.keep(d, c, DetectorOutput(out.logits.to(d.device), out.pred_boxes.to(d.device)))
        return self.guarded(d, call, c)

    def guarded(self, d: LoadedDetector, call: Callable[[], object], c: int) -> bool:
        """Run a member under its breaker; its wall time counts toward its timing."""
        began = time.perf_counter()
        try:
            with nvtx_range(d.spec.name):
                call()
        except InputError:
            raise  # the image's fault: the server isolates that image
        except Exception:
            log.exception("detector '%s' failed on %d image(s); it leaves this vote", d.spec.name, c)
            d.breaker.record_failure()
            return False
        d.breaker.record_success()
        d.wall_s = time.perf_counter() - began
        return True

    def wait_for_members(self, answered: list[LoadedDetector]) -> None:
        """On CUDA the vote's stream waits on each member's last event (no host sync)."""
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for d in answered:
            if d.spec.name in self.streams:
                main.wait_event(d.events[1])
                d.breaker.record_success()

    def record_times(self, answered: list[LoadedDetector], c: int) -> dict[str, float]:
        """Each answering member's time on this call in ms (CUDA: its events, read after the sync)."""
        out = {}
        for d in answered:
            seconds = (d.events[0].elapsed_time(d.events[1]) / 1e3 if d.spec.name in self.streams else d.wall_s)
            d.timing.seconds += seconds
            d.timing.calls += 1
            d.timing.images += c
            out[d.spec.name] = round(seconds * 1e3, 3)
        log.debug("stage '%s' members on %d image(s): %s ms", self.name, c, out)
        return out

    def goes_on(self, p: float) -> bool:
        """Strict comparisons, as the route kernel's: a p equal to a threshold, or NaN, goes on."""
        return self.routes and not (p < self.spec.exit_below or p > self.spec.exit_above)

    def list_boxes(self, answered: list[LoadedDetector], routed: list[int], images: list[torch.Tensor]
                   ) -> list[list[Box]]:
        out: list[list[Box]] = [[] for _ in routed]
        c = len(routed)
        for d in answered:
            name = d.spec.name
            scores = torch.sigmoid(self.logits[name][:c].index_select(2, self.class_index[name]).float()).cpu()
            pred = self.boxes_out[name][:c].cpu()
            names = d.class_names
            for slot, i in enumerate(routed):
                queries, classes = (scores[slot] > d.spec.box_threshold).nonzero(as_tuple=True)
                height, width = images[i].shape[:2]
                if d.preprocess is None:  # transformers members' boxes are relative to the original image
                    xyxy = center_to_corners(pred[slot][queries].double()) * torch.tensor(
                        [width, height, width, height], dtype=torch.float64)
                else:
                    xyxy = to_image_xyxy(pred[slot][queries], d.preprocess, height, width)
                for q, r, xy in zip(queries.tolist(), classes.tolist(), xyxy.tolist()):
                    out[slot].append(Box(name, names[r], scores[slot, q, r].item(), tuple(xy)))
        for found in out:
            found.sort(key=lambda box: -box.score)
        return out

    def warmup(self, pools: GraphPools) -> None:
        """Every member's buckets, each in a memory pool of its own (graphs that share a pool must never replay
        at the same time, and the members' do), then the vote in the device's shared pool. Eager members run
        once on zero pixels (ONNX) or are warmed by the engine's warm-up request (transformers)."""
        for d in self.detectors:
            if d.graphed:
                self.member_graphs[d.spec.name].warmup(None)
            elif d.preprocess is not None:
                d.model(self.own_pixels[self.pixel_keys[d.spec.name]][:1])
        warm_segment(self.graphs, pools)

    def close(self) -> None:
        for graphs in (self.graphs, *self.member_graphs.values()):
            graphs.close()

    def member_timings(self) -> dict[str, StageTiming]:
        return {d.spec.name: d.timing for d in self.detectors}

    def describe(self) -> dict:
        out = {
            "name": self.name, "kind": "detectors", "device": str(self.device), "majority": self.spec.majority,
            "classifier_weight": self.spec.classifier_weight, "time_budget_ms": self.spec.time_budget_ms,
            "breaker": self.breaker.state,
            "detectors": [{"name": d.spec.name, "model": str(d.spec.model), "format": d.spec.format,
                           "model_type": d.family, "device": str(d.device),
                           "cuda_graphs": d.graphed and self.member_graphs[d.spec.name].use_cuda_graphs,
                           "roadwork_classes": d.class_names, "weight": d.spec.weight,
                           "box_threshold": d.spec.box_threshold, "shared_backbone": d.shared,
                           "quantize": d.spec.quantize, "breaker": d.breaker.state,
                           "input_size": None if d.preprocess is None else [d.preprocess.height, d.preprocess.width]}
                          for d in self.detectors],
        }
        if self.routes:
            out.update(exit_below=self.spec.exit_below, exit_above=self.spec.exit_above)
        return out
