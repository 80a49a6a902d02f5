"""The detectors stage's members: each format and family loaded behind one interface.

Every member's model maps its input to DetectorOutput(logits [B, Q, C] before sigmoid, pred_boxes [B, Q, 4]
normalized cxcywh), so the vote (kernels/vote.py) and the box listing read every family the same way:
  format "safetensors"  a family we hand-build (HAND_BUILT): a torch module with static shapes, captured per batch
                        bucket as a CUDA graph, its input filled by the preprocessing kernel;
  format "onnx"         a YOLO-style export on ONNX Runtime (runtime/models/onnx_detector.py), fed by the same
                        kernel (plain resize, 1/255), run on the host each call;
  format "transformers" transformers' own model and processor on the decoded images (runtime/models/hf_detector.py;
                        SAM 3: sam3_detector.py), eager and slower: for families we do not hand-build
                        (open-vocabulary detectors)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kernels.preprocess import BILINEAR, PreprocessSpec
from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import DetectorSpec
from runtime.cascade.results import StageTiming
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.models.deimv2 import Deimv2Detector
from runtime.models.dfine import DFineDetector
from runtime.models.preprocessor import read_preprocess
from runtime.models.rfdetr import RfDetrDetector
from runtime.models.rtdetr import RTDetrDetector

log = logging.getLogger(__name__)

# config.json model_type -> the hand-built class. Each has from_pretrained(dir, dtype, device), .cfg (id2label,
# num_labels, num_queries) and input_multiple (its input sides must divide by it: the strides of its feature maps).
HAND_BUILT: dict[str, type] = {
    "deimv2": Deimv2Detector,
    "d_fine": DFineDetector,
    "rf_detr": RfDetrDetector,
    "rt_detr": RTDetrDetector,
    "rt_detr_v2": RTDetrDetector,
}


@dataclass(eq=False)  # compared by identity: the stage asks which members answered
class LoadedDetector:
    spec: DetectorSpec
    model: torch.nn.Module  # or an OnnxDetector / TransformersDetector: called the same way, not captured
    family: str  # a HAND_BUILT model_type, "onnx" or "transformers"
    preprocess: PreprocessSpec | None  # None: the model preprocesses the decoded images itself (transformers)
    class_ids: tuple[int, ...]
    device: torch.device
    breaker: Breaker
    shared: bool = False  # reads the classifier's backbone layers ...
    layer_pos: tuple[int, ...] = ()  # ... these entries of the kept-layer list, in its hidden_layers order
    timing: StageTiming = field(default_factory=StageTiming)  # this member's calls, since load
    wall_s: float = 0.0  # host wall time of its last call (CPU and eager members)
    events: tuple | None = None  # CUDA: (start, end) events of its last replay on its stream

    @property
    def graphed(self) -> bool:
        """A torch module with static shapes: captured per batch bucket on CUDA."""
        return self.family in HAND_BUILT

    @property
    def class_names(self) -> list[str]:
        return [self.model.cfg.id2label[i] for i in self.class_ids]

    @property
    def num_queries(self) -> int:
        return self.model.cfg.num_queries

    @property
    def num_labels(self) -> int:
        return self.model.cfg.num_labels


def onnx_preprocess(height: int, width: int) -> PreprocessSpec:
    """What `yolo export` models expect, less the letterbox: the image resized to the input, scaled to [0, 1]."""
    return PreprocessSpec(height=height, width=width, resize_to=(height, width), shortest_edge=None,
                          center_crop=False, resample=BILINEAR, resize_in_float=False, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=False, image_mean=(0.0, 0.0, 0.0),
                          image_std=(1.0, 1.0, 1.0))


def load_model(spec: DetectorSpec, where: str, dtype: torch.dtype, device: torch.device
               ) -> tuple[object, str, PreprocessSpec | None]:
    """(model, family, preprocessing) of one member; its loader's errors name the member."""
    try:
        return load_format(spec, where, dtype, device)
    except ModelLoadError as e:
        if str(e).startswith(where):
            raise
        raise ModelLoadError(f"{where}: {e}") from e


def load_format(spec: DetectorSpec, where: str, dtype: torch.dtype, device: torch.device
                ) -> tuple[object, str, PreprocessSpec | None]:
    if spec.format == "onnx":
        from runtime.models.onnx_detector import OnnxDetector
        model = OnnxDetector.from_onnx(spec.model, device, labels=spec.labels, iou_threshold=spec.iou_threshold,
                                       max_det=spec.max_det)
        return model, "onnx", onnx_preprocess(model.cfg.height, model.cfg.width)
    if spec.format == "transformers":
        from runtime.models.hf_detector import TransformersDetector
        from runtime.models.sam3_detector import MODEL_TYPES as SAM3_TYPES, Sam3Detector
        log.info("%s: runs through transformers, eagerly and without CUDA graphs (slower than a hand-built "
                 "family)", where)
        loader = Sam3Detector if read_json(spec.model / "config.json").get("model_type") in SAM3_TYPES \
            else TransformersDetector
        model = loader.from_pretrained(spec.model, device, prompt=spec.prompt, dtype=dtype, max_det=spec.max_det)
        return model, "transformers", None
    model_type = read_json(spec.model / "config.json").get("model_type")
    if model_type not in HAND_BUILT:
        raise ModelLoadError(f"{where}: model_type {model_type!r} of {spec.model} is not a hand-built detector "
                             f"family (supported: {', '.join(HAND_BUILT)}); format = \"transformers\" runs any "
                             f"transformers detection checkpoint")
    return HAND_BUILT[model_type].from_pretrained(spec.model, dtype, device), model_type, read_preprocess(spec.model)


def roadwork_class_ids(spec: DetectorSpec, labels: dict[int, str], where: str) -> tuple[int, ...]:
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
    return tuple(class_ids)


def check_input_size(model: object, family: str, preprocess: PreprocessSpec, spec: DetectorSpec, where: str) -> None:
    step = model.input_multiple
    if preprocess.height % step or preprocess.width % step:
        raise ModelLoadError(f"{where}: input size {preprocess.height}x{preprocess.width} from "
                             f"{spec.model / 'preprocessor_config.json'} must be a multiple of {step} for {family}")


def load_detector(spec: DetectorSpec, where: str, dtype: torch.dtype, device: torch.device, stage_name: str,
                  failure_threshold: int, cooldown_s: float) -> LoadedDetector:
    """One member on `device`, its breaker named 'stage/member' with the stage's breaker settings."""
    model, family, preprocess = load_model(spec, where, dtype, device)
    class_ids = roadwork_class_ids(spec, model.cfg.id2label, where)
    if family in HAND_BUILT:
        check_input_size(model, family, preprocess, spec, where)
    breaker = Breaker(f"{stage_name}/{spec.name}", failure_threshold, cooldown_s)
    return LoadedDetector(spec, model, family, preprocess, class_ids, device, breaker)
