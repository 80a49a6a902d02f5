"""Building a cascade from a bundle: load the models, share the classifier's backbone with detectors where that is
exact, quantize, then construct the stages in order (every stage is fully built when constructed).

Backbone sharing: a detector reads the classifier's backbone when both are DINOv3 with equal configs, their
loaded backbone tensors hash equal, both preprocess images identically (so the input sizes agree: DEIMv2's
adapter also reads the pixels) and both run on one device. The detector then holds no backbone of its own."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.preprocess import PreprocessSpec
from runtime.cascade.bundle import Bundle, ClassifierStageSpec, DetectorSpec, DetectorStageSpec, StageSpec, VLMStageSpec
from runtime.cascade.classifier_stage import ClassifierStage
from runtime.cascade.detector_stage import DetectorStage, LoadedDetector
from runtime.cascade.pipeline import Cascade
from runtime.cascade.stage import Stage
from runtime.cascade.vlm_stage import VLMStage, run_dtype
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.models.classifier import Classifier, load_classifier
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.dinov3 import DINOv3ViT
from runtime.models.precision import PrecisionChoice
from runtime.models.preprocessor import read_preprocess
from runtime.models.quant import quantize_int8

log = logging.getLogger(__name__)

DETECTOR_MODEL_TYPES = ("deimv2",)


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


@dataclass
class StageContext:
    """What building a later stage may use: where it is named in cascade.toml, its device, the run dtype, the
    batch size, the first stage, the detectors loaded for it (detector stages only), and the engine's startup
    precision measurement (None where nothing was measured)."""
    where: str
    device: torch.device
    dtype: torch.dtype
    max_batch: int
    first: ClassifierStage
    detectors: list[LoadedDetector]
    precision: PrecisionChoice | None = None


def build_detector_stage(spec: DetectorStageSpec, ctx: StageContext) -> DetectorStage:
    return DetectorStage(spec, ctx.detectors, ctx.first, ctx.device, ctx.dtype, ctx.max_batch)


def build_vlm_stage(spec: VLMStageSpec, ctx: StageContext) -> VLMStage:
    return VLMStage(spec, ctx.where, ctx.device, run_dtype(spec, ctx.where, ctx.device, ctx.dtype, ctx.precision))


# The stage kinds after the classifier: spec type -> builder.
LATER_STAGES: dict[type, Callable[[StageSpec, StageContext], Stage]] = {
    DetectorStageSpec: build_detector_stage,
    VLMStageSpec: build_vlm_stage,
}


def build_cascade(bundle: Bundle, devices: list[torch.device], dtype: torch.dtype, max_batch: int,
                  precision: PrecisionChoice | None = None) -> Cascade:
    assert len(devices) == len(bundle.stages)
    first_spec, *later_specs = bundle.stages
    assert isinstance(first_spec, ClassifierStageSpec)
    toml = bundle.root / "cascade.toml"
    where = [f"{toml} stage {i + 1} ('{spec.name}')" for i, spec in enumerate(bundle.stages)]
    classifier = load_classifier(first_spec.model, dtype, devices[0])
    preprocess = read_preprocess(first_spec.model)
    detector_stages = [i for i, s in enumerate(bundle.stages) if isinstance(s, DetectorStageSpec)]
    digest = backbone_digest(classifier.backbone) if detector_stages else None
    loaded: dict[int, list[LoadedDetector]] = {}
    for i in detector_stages:
        group = loaded.setdefault(i, [])
        for j, det in enumerate(bundle.stages[i].detectors, start=1):
            d = load_detector(det, f"{where[i]} detector {j} ('{det.name}')", dtype, devices[i])
            why_not = share_backbone(d, classifier, preprocess, digest, devices[i] == devices[0], first_spec.quantize)
            log.info("detector '%s': %s", det.name, "shares the classifier's backbone" if why_not is None
                     else f"runs its own backbone ({why_not})")
            if det.quantize is not None and not d.shared:
                quantize_int8(d.model.model.conv_encoder.backbone, exclude=(), backend=det.quantize)
            group.append(d)
    if first_spec.quantize is not None:  # after sharing: a shared backbone is converted once, here
        quantize_int8(classifier, backend=first_spec.quantize)
    keep = tuple(sorted({layer for group in loaded.values() for d in group if d.shared
                         for layer in d.model.hidden_layers}))
    first = ClassifierStage(first_spec, classifier, preprocess, devices[0], dtype, max_batch,
                            routes=bool(later_specs), keep_layers=keep)
    # In bundle order; a VLM comes last, so its memory check sees what the vision stages already hold on a device.
    later = [LATER_STAGES[type(spec)](spec, StageContext(where[i], devices[i], dtype, max_batch, first,
                                                         loaded.get(i, []), precision))
             for i, spec in enumerate(bundle.stages) if i > 0]
    vlm = next((stage for stage in later if isinstance(stage, VLMStage)), None)
    return Cascade(first, later, vlm)
