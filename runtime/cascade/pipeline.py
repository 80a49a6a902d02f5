"""The stage pipeline: classifier for every image, detectors + vote for the images the classifier left undecided,
a VLM (runtime/cascade/vlm_stage.py) for the images still undecided.

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

Backbone sharing: a detector reads the classifier's backbone when both are DINOv3 with equal configs, their
loaded backbone tensors hash equal, both preprocess images identically (so the input sizes agree: DEIMv2's
adapter also reads the pixels) and both run on one device. The detector then holds no backbone of its own."""
from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graphs.runner import BucketGraphs, GraphRunner, default_buckets
from kernels.preprocess import PreprocessSpec, preprocess_into
from kernels.route import route
from kernels.vote import vote
from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import Bundle, ClassifierStageSpec, DetectorSpec, DetectorStageSpec, VLMStageSpec
from runtime.models.classifier import Classifier, load_classifier
from runtime.config import read_json
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.dinov3 import DINOv3ViT
from runtime.errors import InputError, ModelLoadError
from runtime.models.quant import quantize_int8
from runtime.cascade.vlm_stage import VLMStage

log = logging.getLogger(__name__)

DETECTOR_MODEL_TYPES = ("deimv2",)


@dataclass
class Box:
    detector: str
    label: str  # the roadwork class
    score: float
    xyxy: tuple[float, float, float, float]  # pixels of the original image


@dataclass
class ImageResult:
    prediction: float  # P(roadwork) in [0, 1]
    label: str  # "roadwork" if prediction > 0.5 else "none"
    stage: str  # the stage that decided
    scores: dict[str, float] = field(default_factory=dict)  # each stage's P(roadwork)
    degraded: bool = False  # a later stage failed and an earlier stage's answer stands
    detector_scores: dict[str, float] = field(default_factory=dict)  # each detector's roadwork confidence
    boxes: list[Box] | None = None  # roadwork boxes above threshold, when asked for and the detectors ran
    tokens: dict[str, int] | None = None  # VLM {"prompt", "cached", "generated"} tokens; None if it did not see it
    explanation: str | None = None  # the VLM's explanation, when asked for or above the stage's explain_above


@dataclass
class StageAnswer:
    prediction: float
    detector_scores: dict[str, float] = field(default_factory=dict)
    boxes: list[Box] | None = None
    tokens: dict[str, int] | None = None


OnStage = Callable[[int, str, float, bool], None]  # (image index, stage name, p, decided here)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a decoded image. Decoded arrays are read-only and are never written through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(image))


def read_preprocess(model_dir: Path) -> PreprocessSpec:
    path = model_dir / "preprocessor_config.json"
    try:
        return PreprocessSpec.from_preprocessor_config(read_json(path))
    except ValueError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: {e}") from e


def backbone_digest(backbone: torch.nn.Module) -> str:
    """sha256 over the loaded backbone tensors (name, dtype, shape, bytes). The mask token is training-only."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name == "embeddings.mask_token":
            continue
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def to_image_xyxy(cxcywh: torch.Tensor, spec: PreprocessSpec, height: int, width: int) -> torch.Tensor:
    """Normalized (cx, cy, w, h) boxes on the model input -> (x0, y0, x1, y1) pixels of the original image."""
    resized_h, resized_w = spec.resized_size(height, width)
    top, left = spec.crop_offsets(resized_h, resized_w)
    cx, cy, w, h = cxcywh.double().unbind(-1)
    xs = [((cx + s * w / 2) * spec.width + left) * width / resized_w for s in (-1, 1)]
    ys = [((cy + s * h / 2) * spec.height + top) * height / resized_h for s in (-1, 1)]
    return torch.stack([xs[0], ys[0], xs[1], ys[1]], dim=-1)


class ClassifierStage:
    """Stage 1, segment 1: backbone + head over the static pixel batch, then the route kernel."""

    def __init__(self, spec: ClassifierStageSpec, model: Classifier, preprocess: PreprocessSpec,
                 device: torch.device, dtype: torch.dtype, max_batch: int, routes: bool,
                 keep_layers: tuple[int, ...] = ()):
        self.spec, self.name, self.model, self.preprocess = spec, spec.name, model, preprocess
        self.device, self.routes, self.keep_layers = device, routes, keep_layers
        self.runner = GraphRunner(self.segment, (3, preprocess.height, preprocess.width), dtype, device,
                                  default_buckets(max_batch))
        self.prob = torch.zeros(max_batch, dtype=torch.float32, device=device)
        backbone = model.backbone
        tokens = backbone.num_prefix_tokens + (preprocess.height // backbone.cfg.patch_size[0]) * (
            preprocess.width // backbone.cfg.patch_size[1])
        self.hidden = [torch.zeros(max_batch, tokens, backbone.cfg.block.hidden_size, dtype=dtype, device=device)
                       for _ in keep_layers]
        # count and index list in one buffer, so the host reads both in one transfer.
        self.route_buf = torch.zeros(1 + max_batch, dtype=torch.int32, device=device)
        self.count, self.index = self.route_buf[:1], self.route_buf[1:]
        self.exits = torch.zeros(max_batch, dtype=torch.int8, device=device)

    def segment(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        seq, hidden = self.model.backbone(x, hidden_layers=self.keep_layers)
        self.prob[:b].copy_(self.model.probability(self.model.classifier(self.model.head_features(seq))))
        for buf, h in zip(self.hidden, hidden):
            buf[:b].copy_(h)
        if self.routes:
            route(self.prob[:b], self.runner.rows, self.spec.exit_below, self.spec.exit_above, self.exits[:b],
                  self.index, self.count)
        return (self.prob[:b],)

    def load(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Preprocess into the static batch; returns the images on the device for stages that preprocess again.
        Slots past len(images) keep stale pixels: rows never interact, so padding needs no clearing."""
        on_device = [image_tensor(image).to(self.device, non_blocking=True) for image in images]
        for slot, image in enumerate(on_device):
            preprocess_into(self.runner.input, slot, image, self.preprocess)
        return on_device

    def run(self, n: int) -> list[int]:
        """Run segment 1 on the first n slots; returns the rows that go on (the one host read)."""
        self.runner.run(n)
        if not self.routes:
            return []
        head = self.route_buf[:1 + self.runner.bucket_for(n)].tolist()
        return head[1:1 + head[0]]


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
    """Segment 2: gather the routed rows, run every detector, vote. Guarded by a breaker."""

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
        vote(torch.cat(scores, dim=1), self.offsets, self.thresholds, self.weights,
             self.stage1_prob.index_select(0, idx), self.spec.classifier_weight, self.spec.majority,
             self.conf[:c], self.fraction[:c], self.prob[:c])
        return (self.prob[:c],)

    def run(self, routed: list[int], images: list[torch.Tensor], want_boxes: bool) -> list[StageAnswer]:
        """Answers for the `routed` rows of the chunk, in order; `images` are the chunk's images."""
        if self.fault_hook is not None:
            self.fault_hook()
        c = len(routed)
        if not self.local:
            self.index[:c].copy_(torch.tensor(routed, dtype=torch.int32))
            self.stage1_prob.copy_(self.first.prob)
        for spec, pixels in self.own_pixels.items():
            for slot, i in enumerate(routed):
                preprocess_into(pixels, slot, images[i].to(self.device, non_blocking=True), spec)
        self.graphs.replay(self.graphs.bucket_for(c))
        probs, conf = self.prob[:c].tolist(), self.conf[:c].tolist()
        boxes = self.boxes(routed, images) if want_boxes else [None] * c
        return [StageAnswer(p, {d.spec.name: s for d, s in zip(self.detectors, row)}, b)
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


def load_detector(spec: DetectorSpec, where: str, dtype: torch.dtype, device: torch.device) -> LoadedDetector:
    cfg = read_json(spec.model / "config.json")
    if cfg.get("model_type") not in DETECTOR_MODEL_TYPES:
        raise ModelLoadError(f"{where}: model_type {cfg.get('model_type')!r} of {spec.model} is not supported as "
                             f"a detector (supported: {', '.join(DETECTOR_MODEL_TYPES)})")
    model = Deimv2Detector.from_pretrained(spec.model, dtype, device)
    labels = model.cfg.id2label
    class_ids = []
    for c in spec.roadwork_classes:
        if isinstance(c, int):
            if c not in labels:
                raise ModelLoadError(f"{where}: roadwork class id {c} is outside 0..{len(labels) - 1}")
            class_ids.append(c)
        else:
            ids = [i for i, name in labels.items() if name == c]
            if not ids:
                raise ModelLoadError(f"{where}: roadwork class '{c}' is not a label of {spec.model} "
                                     f"(id2label: {[labels[i] for i in sorted(labels)]})")
            class_ids.append(ids[0])
    if len(set(class_ids)) != len(class_ids):
        raise ModelLoadError(f"{where}: roadwork_classes name the same class twice: {list(spec.roadwork_classes)}")
    preprocess = read_preprocess(spec.model)
    step = 2 * model.cfg.backbone_patch_size  # the adapter's stride-32 map must match the ViT's
    if preprocess.height % step or preprocess.width % step:
        raise ModelLoadError(f"{where}: input size {preprocess.height}x{preprocess.width} from "
                             f"{spec.model / 'preprocessor_config.json'} must be a multiple of {step} for DEIMv2")
    return LoadedDetector(spec, model, preprocess, tuple(class_ids), shared=False)


def share_backbone(detector: LoadedDetector, classifier: Classifier, classifier_pre: PreprocessSpec,
                   classifier_digest: str | None, same_device: bool, classifier_quantize: str | None) -> str | None:
    """Point the detector at the classifier's backbone when that is exact; returns why not, or None."""
    own = detector.model.model.conv_encoder.backbone
    if not isinstance(classifier.backbone, DINOv3ViT):
        return "the classifier is not a DINOv3 model"
    if not same_device:
        return "the stages run on different devices"
    if detector.spec.quantize != classifier_quantize:
        return "their quantize settings differ"
    if own.cfg != classifier.backbone.cfg:
        return "the backbone configs differ"
    if detector.preprocess != classifier_pre:
        return "the preprocessing (input size, resize or normalization) differs"
    if backbone_digest(own) != classifier_digest:
        return "the backbone weights differ"
    detector.model.model.conv_encoder.backbone = classifier.backbone
    detector.shared = True
    return None


class Cascade:
    def __init__(self, bundle: Bundle, devices: list[torch.device], dtype: torch.dtype, max_batch: int):
        assert len(devices) == len(bundle.stages)
        self.bundle = bundle
        first_spec, *later_specs = bundle.stages
        assert isinstance(first_spec, ClassifierStageSpec)
        toml = bundle.root / "cascade.toml"
        classifier = load_classifier(first_spec.model, dtype, devices[0])
        preprocess = read_preprocess(first_spec.model)
        detector_specs = [(i, s) for i, s in enumerate(later_specs, start=1) if isinstance(s, DetectorStageSpec)]
        digest = backbone_digest(classifier.backbone) if detector_specs else None
        loaded: list[list[LoadedDetector]] = []
        for i, spec in detector_specs:
            group = []
            for j, det in enumerate(spec.detectors, start=1):
                where = f"{toml} stage {i + 1} ('{spec.name}') detector {j} ('{det.name}')"
                d = load_detector(det, where, dtype, devices[i])
                why_not = share_backbone(d, classifier, preprocess, digest, devices[i] == devices[0],
                                         first_spec.quantize)
                log.info("detector '%s': %s", det.name, "shares the classifier's backbone" if why_not is None
                         else f"runs its own backbone ({why_not})")
                if det.quantize == "int8" and not d.shared:
                    quantize_int8(d.model.model.conv_encoder.backbone, exclude=())
                group.append(d)
            loaded.append(group)
        if first_spec.quantize == "int8":  # after sharing: a shared backbone is converted once, here
            quantize_int8(classifier)
        keep = tuple(sorted({layer for group in loaded for d in group if d.shared for layer in d.model.hidden_layers}))
        self.first = ClassifierStage(first_spec, classifier, preprocess, devices[0], dtype, max_batch,
                                     routes=bool(later_specs), keep_layers=keep)
        self.later: list[DetectorStage | VLMStage] = [
            DetectorStage(spec, group, self.first, devices[i], dtype, max_batch)
            for (i, spec), group in zip(detector_specs, loaded)]
        self.vlm: VLMStage | None = None
        if later_specs and isinstance(later_specs[-1], VLMStageSpec):
            # Last, so that its memory check sees what the vision stages already hold on a shared device.
            i, spec = len(later_specs), later_specs[-1]
            self.vlm = VLMStage(spec, f"{toml} stage {i + 1} ('{spec.name}')", devices[i], dtype)
            self.later.append(self.vlm)

    def warmup(self) -> None:
        """Every bucket of every segment once; on CUDA the captures of one device share a memory pool, which is
        safe in any replay order because segments keep everything they hand on in static buffers. Then the VLM."""
        pools: dict[torch.device, tuple] = {}
        segments = [self.first.runner] + [stage.graphs for stage in self.later if isinstance(stage, DetectorStage)]
        for segment in segments:
            if segment.use_cuda_graphs and segment.device not in pools:
                with segment.on_device():
                    pools[segment.device] = torch.cuda.graph_pool_handle()
            segment.warmup(pools.get(segment.device))
        if self.vlm is not None:
            self.vlm.warmup()

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return self.first.runner.chunks(n)

    def run(self, images: list[np.ndarray], want_boxes: bool = False, explain: list[bool] | None = None,
            on_stage: OnStage | None = None) -> list[ImageResult]:
        """One chunk (at most max_batch images) through every stage. `explain`: per image, ask the VLM for an
        explanation; `on_stage` is called once per image per stage it reached, as soon as that stage answered."""
        n = len(images)
        on_device = self.first.load(images)
        pending = self.first.run(n)
        probs = self.first.prob[:n].tolist()
        if on_stage is not None:
            going = set(pending)
            for i, p in enumerate(probs):
                on_stage(i, self.first.name, p, i not in going)
        answers: dict[int, list[tuple[str, StageAnswer]]] = {i: [] for i in pending}
        degraded: set[int] = set()
        for stage in self.later:
            if not pending:
                break
            got = self.call(stage, pending, on_device, want_boxes)
            if got is None:
                degraded.update(pending)
                break
            going_on = {i for i, answer in zip(pending, got) if stage_goes_on(stage, answer.prediction)}
            for i, answer in zip(pending, got):
                answers[i].append((stage.name, answer))
                if on_stage is not None:
                    on_stage(i, stage.name, answer.prediction, i not in going_on)
            pending = [i for i in pending if i in going_on]
        results = []
        for i, p in enumerate(probs):
            scores = {self.first.name: p}
            result = ImageResult(p, "", self.first.name, scores, i in degraded)
            for name, answer in answers.get(i, []):
                scores[name] = answer.prediction
                result.stage, result.prediction = name, answer.prediction
                result.detector_scores.update(answer.detector_scores)
                result.boxes = answer.boxes if answer.boxes is not None else result.boxes
                result.tokens = answer.tokens if answer.tokens is not None else result.tokens
            result.label = "roadwork" if result.prediction > 0.5 else "none"
            results.append(result)
        if self.vlm is not None:
            self.explain(results, images, explain)
        return results

    def explain(self, results: list[ImageResult], images: list[np.ndarray], explain: list[bool] | None) -> None:
        """Explanations of the images asked for and of those whose final p > explain_above, under the VLM's
        breaker (no time budget: decoding takes longer than scoring). A failure leaves explanation None."""
        vlm = self.vlm
        wanted = [i for i, r in enumerate(results)
                  if (explain is not None and explain[i]) or r.prediction > vlm.spec.explain_above]
        if not wanted or not vlm.breaker.allow():
            return
        try:
            answers = vlm.explain([image_tensor(images[i]) for i in wanted])
        except Exception:
            log.exception("stage '%s' failed to explain %d image(s); they go without an explanation", vlm.name,
                          len(wanted))
            vlm.breaker.record_failure()
            return
        vlm.breaker.record_success()
        for i, answer in zip(wanted, answers):
            r = results[i]
            r.explanation = answer.text
            before = r.tokens or dict.fromkeys(answer.tokens, 0)
            r.tokens = {k: before[k] + v for k, v in answer.tokens.items()}

    @staticmethod
    def call(stage: DetectorStage | VLMStage, pending: list[int], images: list[torch.Tensor],
             want_boxes: bool) -> list[StageAnswer] | None:
        """Run a later stage on the `pending` rows of the chunk (`images`: the chunk's images on the first stage's
        device) under its breaker and time budget; None when its answers cannot be used."""
        if not stage.breaker.allow():
            return None
        start = time.perf_counter()
        try:
            if isinstance(stage, VLMStage):  # it moves the images to its own device as it preprocesses them
                answers = [StageAnswer(a.p, tokens=a.tokens) for a in stage.score([images[i] for i in pending])]
            else:
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
        return {stage.name: stage.breaker.state for stage in self.later}

    def close(self) -> None:
        if self.vlm is not None:
            self.vlm.close()

    def describe(self) -> list[dict]:
        labels = self.first.model.labels
        spec = self.first.spec
        first = {"name": self.first.name, "kind": "classifier", "model_type": self.first.model.model_type,
                 "model": str(spec.model), "labels": list(labels.names),
                 "roadwork_label": labels.names[labels.roadwork_index], "device": str(self.first.device),
                 "input_size": [self.first.preprocess.height, self.first.preprocess.width],
                 "quantize": spec.quantize or "none"}
        if self.later:
            first.update(exit_below=spec.exit_below, exit_above=spec.exit_above)
        return [first] + [stage.describe() for stage in self.later]


def stage_goes_on(stage: DetectorStage | VLMStage, p: float) -> bool:
    """Does an image this stage answered go on to the next stage? The VLM decides every image it gets."""
    return isinstance(stage, DetectorStage) and stage.goes_on(p)
