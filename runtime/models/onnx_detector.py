"""Detector member of format "onnx": a YOLO-style detector exported to ONNX (`yolo export format=onnx` and the like),
run on ONNX Runtime. Nothing of the exporting framework is imported: the file's graph, its image input's shape, its
one output's shape and its metadata say everything.

The input is one float image tensor [B, 3, H, W] with fixed H and W (B dynamic, or fixed: then calls run in chunks of
that size). The output's layout is decided at load:
  "raw"         [B, 4 + C, N]: per candidate cx, cy, w, h in input pixels, then C class scores already in [0, 1].
                Decoded as the usual YOLO post-processing does: each candidate takes its best class (one label per
                box), score floor (strict), class-aware greedy NMS (kernels/nms.py), at most max_det kept.
  "end_to_end"  [B, N, 6]: x0, y0, x1, y1 in input pixels, score, class id (NMS-free heads, e.g. YOLOv10): the
                score floor, then the best max_det rows. A row whose class id is not one of the C labels is dropped.
Anything else is refused at load (ModelLoadError naming the file, the output and its shape).

Detections are re-encoded as the DetectorOutput every family returns, so the detectors stage's vote and box listing
read them unchanged: row q of image b is its q-th best detection (descending score), whose own class column holds
logit(score) and every other column NO_DETECTION (sigmoid 0); rows past the last detection are all NO_DETECTION with
zero boxes. Boxes are normalized (cx, cy, w, h) of the model input, not clipped to it.

Class names come from the metadata key `names` (the exporter writes a Python dict's repr, {0: 'person', ...}; read
with ast.literal_eval) or from the caller's `labels`, which take precedence. onnxruntime is an optional dependency,
imported only when a member of this format loads."""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.nms import batched_nms
from runtime.errors import ModelLoadError
from runtime.models.detect_postprocess import DetectorOutput, center_to_corners
from runtime.models.hf_detector import NO_DETECTION, score_logits

log = logging.getLogger(__name__)

EXTRA = "pip install 'roadwork-cascade[onnx]'"
RAW, END_TO_END = "raw", "end_to_end"
INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
OUTPUT_TYPES = ("tensor(float)", "tensor(float16)")
# The usual YOLO post-processing defaults (ultralytics' predict mode: conf 0.25, iou 0.7, max_det 300).
SCORE_THRESHOLD, IOU_THRESHOLD, MAX_DET = 0.25, 0.7, 300


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelLoadError(f"format 'onnx' needs the onnxruntime package ({e}); {EXTRA}") from e
    return onnxruntime


@dataclass(frozen=True)
class OnnxDetectorConfig:
    id2label: dict[int, str]
    height: int  # the input's fixed size
    width: int
    layout: str  # RAW or END_TO_END
    batch: int | None  # the input's fixed batch size; None: dynamic
    max_det: int
    iou_threshold: float  # RAW only: the NMS's
    score_threshold: float

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_queries(self) -> int:
        return self.max_det


def fixed(dim) -> bool:
    """ONNX Runtime gives a fixed dimension as an int, a symbolic one as a str or None."""
    return isinstance(dim, int) and dim > 0


def session_providers(device: torch.device, available: list[str]) -> list:
    """Execution providers in precedence order: on CUDA, TensorRT then CUDA on that device where this onnxruntime
    build has them, always the CPU last (ONNX Runtime falls back to it for nodes the others do not take)."""
    providers: list = []
    if device.type == "cuda":
        options = {"device_id": device.index if device.index is not None else torch.cuda.current_device()}
        providers += [(name, dict(options)) for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                      if name in available]
    return providers + ["CPUExecutionProvider"]


def parse_names(text: str, source: str) -> dict[int, str]:
    """The metadata `names`: a dict {0: 'a', 1: 'b', ...} (ids 0..C-1) or a list of names, as a Python literal."""
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ModelLoadError(f"{source}: metadata 'names' is not a Python literal ({type(e).__name__}): "
                             f"{text[:200]!r}") from e
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise ModelLoadError(f"{source}: metadata 'names' must be a non-empty dict of class id -> name, got "
                             f"{text[:200]!r}")
    ids = list(names)
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(ids))):
        raise ModelLoadError(f"{source}: metadata 'names' must number its classes 0..n-1, got ids {ids[:20]}")
    if not all(isinstance(v, str) and v for v in names.values()):
        raise ModelLoadError(f"{source}: metadata 'names' must map every id to a non-empty string, got "
                             f"{text[:200]!r}")
    return {i: names[i] for i in range(len(names))}


def class_names(labels, metadata: dict[str, str], source: str) -> dict[int, str]:
    if labels is not None:
        labels = list(labels)
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise ModelLoadError(f"{source}: labels must be a non-empty list of class names, got {labels!r}")
        return dict(enumerate(labels))
    if "names" not in metadata:
        raise ModelLoadError(f"{source}: no class names: its metadata has no 'names' and no labels were given "
                             f"(key 'labels' of the member)")
    return parse_names(metadata["names"], source)


def decide_layout(shape: list, num_labels: int, where: str) -> str:
    """RAW for [B, 4 + C, N], END_TO_END for [B, N, 6]; anything else a ModelLoadError."""
    raw = len(shape) == 3 and shape[1] == 4 + num_labels
    end_to_end = len(shape) == 3 and shape[2] == 6
    if raw == end_to_end:
        raise ModelLoadError(f"{where} has shape {shape}: " + ("ambiguous between" if raw else "neither of")
                             + f" the detector layouts this runtime reads, [B, 4 + C, N] (cx, cy, w, h, then "
                             f"C = {num_labels} class scores: [B, {4 + num_labels}, N]) and [B, N, 6] (x0, y0, "
                             f"x1, y1, score, class)")
    return RAW if raw else END_TO_END


class OnnxDetector:
    """Called like a detector nn.Module: pixel_values [B, 3, H, W] float in [0, 1] -> DetectorOutput on `device`."""

    def __init__(self, cfg: OnnxDetectorConfig, session, input_name: str, input_dtype, output_name: str,
                 device: torch.device):
        self.cfg, self.session, self.device = cfg, session, device
        self.input_name, self.input_dtype, self.output_name = input_name, input_dtype, output_name

    @classmethod
    def from_onnx(cls, path, device, labels=None, iou_threshold: float = IOU_THRESHOLD,
                  score_threshold: float = SCORE_THRESHOLD, max_det: int = MAX_DET,
                  intra_op_threads: int = 0) -> OnnxDetector:
        """labels: class names in id order, used instead of the metadata's `names`. intra_op_threads: ONNX
        Runtime's intra-op thread count on the CPU (0: its default)."""
        ort = import_onnxruntime()
        path, device = Path(path), torch.device(device)
        source = str(path)
        if not path.is_file():
            raise ModelLoadError(f"{source}: no such ONNX file")
        if not 0.0 < iou_threshold <= 1.0:
            raise ModelLoadError(f"{source}: iou_threshold must be in (0, 1], got {iou_threshold}")
        if not 0.0 <= score_threshold < 1.0:
            raise ModelLoadError(f"{source}: score_threshold must be in [0, 1), got {score_threshold}")
        if type(max_det) is not int or max_det < 1:
            raise ModelLoadError(f"{source}: max_det must be >= 1, got {max_det}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        providers = session_providers(device, ort.get_available_providers())
        if device.type == "cuda" and len(providers) == 1:
            log.warning("%s: this onnxruntime build has no CUDA or TensorRT execution provider (has %s); it runs on "
                        "the CPU", source, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
            raise ModelLoadError(f"{source}: ONNX Runtime cannot load it: {' '.join(str(e).split())}") from e

        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{source}: a detector takes one image input, this has {len(inputs)}: "
                                 f"{[i.name for i in inputs]}")
        image = inputs[0]
        if (image.type not in INPUT_TYPES or len(image.shape) != 4 or image.shape[1] != 3
                or not fixed(image.shape[2]) or not fixed(image.shape[3])):
            raise ModelLoadError(f"{source}: input '{image.name}' is {image.type} {image.shape}: a detector's image "
                                 f"input is float [B, 3, H, W] with fixed H and W")
        if len(outputs) != 1:
            raise ModelLoadError(f"{source}: a detector has one output, this has {len(outputs)}: "
                                 f"{[o.name for o in outputs]} (segmentation and other tasks are not detectors)")
        out = outputs[0]
        where = f"{source}: output '{out.name}'"
        if out.type not in OUTPUT_TYPES:
            raise ModelLoadError(f"{where} is {out.type}, not a float tensor")
        metadata = session.get_modelmeta().custom_metadata_map
        task = metadata.get("task", "detect")
        if task != "detect":
            raise ModelLoadError(f"{source}: metadata 'task' is {task!r}, not 'detect'")
        id2label = class_names(labels, metadata, source)
        layout = decide_layout(list(out.shape), len(id2label), where)
        cfg = OnnxDetectorConfig(id2label, image.shape[2], image.shape[3], layout,
                                 image.shape[0] if fixed(image.shape[0]) else None, max_det, float(iou_threshold),
                                 float(score_threshold))
        log.info("%s: %s head %s, input %dx%d (batch %s), %d labels, providers %s", source, layout, out.shape,
                 cfg.height, cfg.width, cfg.batch or "dynamic", cfg.num_labels, session.get_providers())
        return cls(cfg, session, image.name, INPUT_TYPES[image.type], out.name, device)

    def run_session(self, images: np.ndarray) -> np.ndarray:
        """The raw output for images [B, 3, H, W]: one run, or one per chunk of a fixed batch size (zero-padded)."""
        step = self.cfg.batch
        if step is None:
            return self.session.run([self.output_name], {self.input_name: images})[0]
        chunks = []
        for start in range(0, images.shape[0], step):
            chunk = images[start:start + step]
            real = chunk.shape[0]
            if real < step:
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), chunk.dtype)])
            chunks.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:real])
        return np.concatenate(chunks)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> DetectorOutput:
        cfg = self.cfg
        if (pixel_values.dim() != 4 or pixel_values.shape[0] < 1
                or tuple(pixel_values.shape[1:]) != (3, cfg.height, cfg.width)):
            raise ValueError(f"pixel_values must be [B, 3, {cfg.height}, {cfg.width}], got "
                             f"{list(pixel_values.shape)}")
        images = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.input_dtype,
                                                                                          copy=False)
        raw = self.run_session(images)
        expected = 4 + cfg.num_labels if cfg.layout == RAW else 6
        if raw.ndim != 3 or raw.shape[0] != images.shape[0] or raw.shape[1 if cfg.layout == RAW else 2] != expected:
            raise ValueError(f"output '{self.output_name}' has shape {list(raw.shape)} for {images.shape[0]} "
                             f"image(s), not the {cfg.layout} layout it declared")
        pred = torch.from_numpy(raw).to(self.device, torch.float32)
        return self.decode_raw(pred) if cfg.layout == RAW else self.decode_end_to_end(pred)

    def scale(self) -> torch.Tensor:
        cfg = self.cfg
        return torch.tensor([cfg.width, cfg.height, cfg.width, cfg.height], dtype=torch.float32, device=self.device)

    def decode_raw(self, pred: torch.Tensor) -> DetectorOutput:
        """pred [B, 4 + C, N] -> each candidate's best class, NMS, the kept detections."""
        cxcywh = pred[:, :4].transpose(1, 2).contiguous()
        best, classes = pred[:, 4:].max(dim=1)
        # A candidate with a non-finite box is no detection (and NMS needs finite boxes): its score goes NaN.
        best = torch.where(torch.isfinite(cxcywh).all(dim=-1), best, torch.full_like(best, float("nan")))
        cfg = self.cfg
        keep, kept_scores = batched_nms(center_to_corners(cxcywh), best.contiguous(), classes, cfg.iou_threshold,
                                        cfg.score_threshold, cfg.max_det)
        idx = keep.clamp(min=0)
        boxes = cxcywh.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4)) / self.scale()
        return self.encode(kept_scores, classes.gather(1, idx), boxes, keep >= 0)

    def decode_end_to_end(self, pred: torch.Tensor) -> DetectorOutput:
        """pred [B, N, 6] -> the best max_det rows above the score floor whose class id is a label."""
        cfg = self.cfg
        x0, y0, x1, y1, scores, class_ids = pred.unbind(-1)
        class_ids = class_ids.round()
        valid = ((scores > cfg.score_threshold) & (class_ids >= 0) & (class_ids < cfg.num_labels)  # NaN: False
                 & torch.isfinite(pred[..., :4]).all(dim=-1))
        # Clamped before the cast: a NaN or out-of-range id is undefined as an integer (its row is invalid anyway).
        classes = class_ids.nan_to_num(0.0).clamp(0, cfg.num_labels - 1).long()
        masked = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :cfg.max_det]
        cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / self.scale()
        return self.encode(scores.gather(1, order), classes.gather(1, order),
                           cxcywh.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)), valid.gather(1, order))

    def encode(self, scores: torch.Tensor, classes: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor
               ) -> DetectorOutput:
        """K <= max_det detections per image (scores, classes [B, K], normalized cxcywh boxes [B, K, 4], valid
        [B, K]) as the first K query rows of a DetectorOutput with max_det rows."""
        cfg = self.cfg
        batch, k = scores.shape
        logits = torch.full((batch, cfg.max_det, cfg.num_labels), NO_DETECTION, device=self.device)
        pred_boxes = torch.zeros(batch, cfg.max_det, 4, device=self.device)
        row_logits = torch.where(valid, score_logits(scores), torch.full_like(scores, NO_DETECTION))
        logits[:, :k].scatter_(2, classes.unsqueeze(-1), row_logits.unsqueeze(-1))
        pred_boxes[:, :k] = torch.where(valid.unsqueeze(-1), boxes, torch.zeros_like(boxes))
        return DetectorOutput(logits, pred_boxes)
