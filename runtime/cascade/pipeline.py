"""The cascade run: every stage through the Stage interface (stage.py), in order, on the images still pending.

Per chunk of at most max_batch images (CUDA: each segment is one captured graph per batch bucket):

  host      preprocess every image into the classifier's static batch
  segment 1 backbone -> classifier head -> P(roadwork) -> route kernel (exit mask, index list, count);
            the raw backbone layers that sharing detectors need are kept in static max-batch buffers
  host      one small read: count + index list of the images that go on
  host      detectors with their own backbone: preprocess the routed images into their own static batch
  segment 2 gather routed rows by the index list -> each detector (shared backbone: from the kept layers and
            the classifier's pixels; else its own backbone) -> roadwork logits -> vote kernel
  host      read the answers; with a VLM after the detectors, the detectors' exit thresholds pick the images
            that go on
  vlm       the VLM's loop thread scores the images that reached it (one prefill each, continuous batching),
            then explains the images asked for or above explain_above
  host      a later stage that raised, overran its time budget, or whose breaker is open leaves its images with
            the previous stage's answer, marked degraded

Stages are built by build.py; the classes are classifier_stage.py, detector_stage.py and vlm_stage.py."""
from __future__ import annotations

import logging
import time

import numpy as np

from graphs.nvtx import nvtx_range
from runtime.cascade.classifier_stage import ClassifierStage, image_tensor
from runtime.cascade.results import ImageResult, OnStage, StageAnswer, StageTiming, add_tokens, fold_answers
from runtime.cascade.stage import ChunkImages, GraphPools, Stage
from runtime.errors import InputError
from runtime.cascade.vlm_stage import VLMStage

log = logging.getLogger(__name__)


class Cascade:
    def __init__(self, first: ClassifierStage, later: list[Stage], vlm: VLMStage | None):
        assert vlm is None or later[-1] is vlm, "the VLM is the last stage"
        self.first, self.later, self.vlm = first, later, vlm
        self.stages: list[Stage] = [first, *later]
        self.timings = {stage.name: StageTiming() for stage in self.stages}  # written by the worker thread only

    def warmup(self) -> None:
        """Every bucket of every segment once; on CUDA the captures of one device share a memory pool, which is
        safe in any replay order because segments keep everything they hand on in static buffers."""
        pools: GraphPools = {}
        for stage in self.stages:
            stage.warmup(pools)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return self.first.runner.chunks(n)

    def run(self, images: list[np.ndarray], want_boxes: bool = False, explain: list[bool] | None = None,
            on_stage: OnStage | None = None, auto_explain: bool = True, deadline: float | None = None
            ) -> list[ImageResult]:
        """One chunk (at most max_batch images) through every stage. `explain`: per image, ask the VLM for an
        explanation; `on_stage` is called once per image per stage it reached, as soon as that stage answered;
        `deadline` (time.monotonic()): when the requests stop waiting, the longest the VLM may score."""
        began = time.perf_counter()
        with nvtx_range("preprocess"):
            chunk = self.first.load(images)
        chunk.deadline = deadline
        preprocess_s = time.perf_counter() - began  # counted as the first stage's time
        pending = list(range(len(images)))
        answers: list[list[tuple[str, StageAnswer]]] = [[] for _ in images]
        degraded: set[int] = set()
        for stage in self.stages:
            if not pending:
                break
            began = time.perf_counter()
            with nvtx_range(stage.name):
                got = self.call(stage, pending, chunk, want_boxes)
            timing = self.timings[stage.name]
            timing.seconds += time.perf_counter() - began + (preprocess_s if stage is self.first else 0.0)
            timing.calls += 1
            timing.images += len(pending)
            if got is None:
                degraded.update(pending)
                break
            for i, answer in zip(pending, got):
                answers[i].append((stage.name, answer))
                if on_stage is not None:
                    on_stage(i, stage.name, answer.prediction, not answer.goes_on)
            pending = [i for i, answer in zip(pending, got) if answer.goes_on]
        results = [fold_answers(reached, i in degraded) for i, reached in enumerate(answers)]
        if self.vlm is not None:
            self.explain(results, images, explain, auto_explain)
        return results

    def explain(self, results: list[ImageResult], images: list[np.ndarray], explain: list[bool] | None,
                auto_explain: bool) -> None:
        """Explanations of the images asked for and (with auto_explain) of those whose final p > explain_above,
        under the VLM's breaker (no time budget: decoding takes longer than scoring). A failure leaves explanation
        None."""
        vlm = self.vlm
        wanted = [i for i, r in enumerate(results)
                  if (explain is not None and explain[i]) or (auto_explain and r.prediction > vlm.spec.explain_above)]
        if not wanted or not vlm.breaker.allow():
            return
        try:
            answers = vlm.explain([image_tensor(images[i]) for i in wanted],
                                  [results[i].label == "roadwork" for i in wanted])
        except Exception:
            log.exception("stage '%s' failed to explain %d image(s); they go without an explanation", vlm.name,
                          len(wanted))
            vlm.breaker.record_failure()
            return
        vlm.breaker.record_success()
        for i, answer in zip(wanted, answers):
            results[i].explanation = answer.text
            results[i].tokens = add_tokens(results[i].tokens, answer.tokens)

    @staticmethod
    def call(stage: Stage, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer] | None:
        """Run a stage on the `pending` rows of the chunk under its breaker and time budget; None when its answers
        cannot be used. A stage without a breaker (the first) raises instead."""
        if stage.breaker is None:
            return stage.run(pending, images, want_boxes)
        if not stage.breaker.allow():
            return None
        start = time.perf_counter()
        try:
            answers = stage.run(pending, images, want_boxes)
        except InputError:
            raise  # the image's fault, not the stage's: no breaker count; the server isolates that image
        except Exception:
            log.exception("stage '%s' failed on %d image(s); they keep the previous stage's answer",
                          stage.name, len(pending))
            stage.breaker.record_failure()
            return None
        took = time.perf_counter() - start
        if stage.time_budget_s is not None and took > stage.time_budget_s:
            log.warning("stage '%s' took %.1f ms on %d image(s), over its %.1f ms budget; they keep the previous "
                        "stage's answer", stage.name, took * 1e3, len(pending), stage.time_budget_s * 1e3)
            stage.breaker.record_failure()
            return None
        stage.breaker.record_success()
        assert len(answers) == len(pending), (stage.name, len(answers), len(pending))
        return answers

    def stage_states(self) -> dict[str, str]:
        return {stage.name: stage.breaker.state for stage in self.stages if stage.breaker is not None}

    def close(self) -> None:
        """Every stage, the last first: a stage's graphs read buffers of the stages before it."""
        for stage in reversed(self.stages):
            stage.close()

    def describe(self) -> list[dict]:
        return [stage.describe() for stage in self.stages]
