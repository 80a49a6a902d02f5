"""Building a cascade from a bundle: load the models, share the classifier's backbone with detectors where that is
exact, quantize, then construct the stages in order (every stage is fully built when constructed).

Backbone sharing: a detector reads the classifier's backbone when both are DINOv3 with equal configs, their
loaded backbone tensors hash equal, both preprocess images identically (so the input sizes agree: DEIMv2's
adapter also reads the pixels) and both run on one device. The detector then holds no backbone of its own.
A classifier on onnxruntime or TensorRT has no backbone to share: every detector loads its own."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.preprocess import PreprocessSpec
from runtime.cascade.bundle import ClassifierStageSpec, DetectorStageSpec, StageSpec, VLMStageSpec
from runtime.cascade.classifier_stage import ClassifierStage
from runtime.cascade.detector_members import LoadedDetector, load_detector
from runtime.cascade.detector_stage import DetectorStage
from runtime.cascade.pipeline import Cascade
from runtime.cascade.precision import Precision
from runtime.cascade.stage import Stage
from runtime.cascade.vlm_stage import VLMStage
from runtime.models.classifier import Classifier, load_classifier
from runtime.models.dinov3 import DINOv3ViT
from runtime.models.preprocessor import read_preprocess
from runtime.models.int8_dynamic import quantize_int8
from runtime.models.onnx_classifier import OnnxClassifier
from runtime.models.tensorrt_classifier import TensorRTClassifier

log = logging.getLogger(__name__)


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


def share_backbone(detector: LoadedDetector, classifier: Classifier | OnnxClassifier | TensorRTClassifier,
                   classifier_pre: PreprocessSpec, classifier_digest: str | None, same_device: bool,
                   classifier_quantize: str) -> str | None:
    """Point the detector at the classifier's backbone when that is exact; returns why not, or None."""
    if detector.family != "deimv2":
        return "only DEIMv2 reads a DINOv3 classifier's backbone"
    if not isinstance(classifier, Classifier):
        return f"the classifier runs on {classifier.backend}"
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


def load_first_classifier(spec: ClassifierStageSpec, preprocess: PreprocessSpec, dtype: torch.dtype,
                          device: torch.device, max_batch: int) -> Classifier | OnnxClassifier | TensorRTClassifier:
    if spec.backend == "torch":
        return load_classifier(spec.model, dtype, device)
    if spec.quantize != "none":  # set by --quantize or `auto`: bundle.py refuses it in the classifier's own table
        log.info("classifier '%s' runs on %s: the exported graph, not quantize %r", spec.name, spec.backend,
                 spec.quantize)
    if spec.backend == "tensorrt":  # an fp16 engine; fp32 at run dtype float32
        return TensorRTClassifier.load(spec.onnx, spec.model, preprocess, device, max_batch, dtype)
    return OnnxClassifier.load(spec.onnx, spec.model, preprocess, device, max_batch)


@dataclass
class StageContext:
    """What building a later stage may use: where it is named in cascade.toml, its device, the run dtype, the
    batch size, the first stage, and the detectors loaded for it (detector stages only)."""
    where: str
    device: torch.device
    dtype: torch.dtype
    max_batch: int
    first: ClassifierStage
    detectors: list[LoadedDetector]


def build_detector_stage(spec: DetectorStageSpec, ctx: StageContext) -> DetectorStage:
    return DetectorStage(spec, ctx.detectors, ctx.first, ctx.device, ctx.dtype, ctx.max_batch)


def build_vlm_stage(spec: VLMStageSpec, ctx: StageContext) -> VLMStage:
    return VLMStage(spec, ctx.where, ctx.device, getattr(torch, spec.dtype))  # resolved by precision.resolve


# The stage kinds after the classifier: spec type -> builder.
LATER_STAGES: dict[type, Callable[[StageSpec, StageContext], Stage]] = {
    DetectorStageSpec: build_detector_stage,
    VLMStageSpec: build_vlm_stage,
}


def build_cascade(resolved: Precision, devices: list[torch.device], max_batch: int) -> Cascade:
    bundle, dtype = resolved.bundle, resolved.dtype
    assert len(devices) == len(bundle.stages)
    first_spec, *later_specs = bundle.stages
    assert first_spec.kind == "classifier"
    where = [bundle.where(i) for i in range(len(bundle.stages))]
    preprocess = read_preprocess(first_spec.model)
    classifier = load_first_classifier(first_spec, preprocess, dtype, devices[0], max_batch)
    detector_stages = [i for i, s in enumerate(bundle.stages) if s.kind == "detectors"]
    on_torch = first_spec.backend == "torch"
    digest = backbone_digest(classifier.backbone) if detector_stages and on_torch else None
    loaded: dict[int, list[LoadedDetector]] = {}
    for i in detector_stages:
        group = loaded.setdefault(i, [])
        for j, det in enumerate(bundle.stages[i].detectors, start=1):
            stage = bundle.stages[i]
            device = devices[i] if det.device is None else torch.device(det.device)
            d = load_detector(det, f"{where[i]} detector {j} ('{det.name}')", dtype, device, stage.name,
                              stage.failure_threshold, stage.cooldown_s)
            why_not = share_backbone(d, classifier, preprocess, digest, device == devices[0], first_spec.quantize)
            log.info("detector '%s' (%s, %s on %s): %s", det.name, det.format, d.family, device,
                     "shares the classifier's backbone" if why_not is None else f"runs its own model ({why_not})")
            if det.quantize != "none" and not d.shared:
                quantize_int8(d.model.model.conv_encoder.backbone if d.family == "deimv2" else d.model,
                              exclude=(), backend=det.quantize)
            group.append(d)
    if first_spec.quantize != "none" and on_torch:  # after sharing: a shared backbone is converted once, here
        quantize_int8(classifier, backend=first_spec.quantize)
    keep = tuple(sorted({layer for group in loaded.values() for d in group if d.shared
                         for layer in d.model.hidden_layers}))
    first = ClassifierStage(first_spec, classifier, preprocess, devices[0], dtype, max_batch,
                            routes=bool(later_specs), keep_layers=keep)
    # In bundle order; a VLM comes last, so its memory check sees what the vision stages already hold on a device.
    later = [LATER_STAGES[type(spec)](spec, StageContext(where[i], devices[i], dtype, max_batch, first,
                                                         loaded.get(i, [])))
             for i, spec in enumerate(bundle.stages) if i > 0]
    vlm = next((stage for spec, stage in zip(later_specs, later) if spec.kind == "vlm"), None)
    return Cascade(first, later, vlm)
