"""Detector member of format "transformers": any transformers detection checkpoint, run eagerly by transformers
itself. Closed-set `AutoModelForObjectDetection` families (YOLOS, DETR and its descendants, RT-DETR, ...) score
config.json's id2label; open-vocabulary `AutoModelForZeroShotObjectDetection` ones (Grounding DINO,
MM-Grounding-DINO, OmDet-Turbo, OWL-ViT, OWLv2) ground the member's '.'-separated prompt, each phrase a label.
SAM 3 has a module of its own (runtime/models/sam3_detector.py): its processor needs torchvision.

Images go through the checkpoint's own processor (PIL backend) and model, and the model's outputs through the
processor's own documented post-processing with a zero score threshold, so every candidate it can return is kept;
the best `max_det` are re-encoded as a DetectorOutput the detectors stage reads unchanged: row q of image b is its
q-th best detection, whose label column holds logit(score) and every other column NO_DETECTION (so sigmoid gives
the score back and 0 elsewhere); rows past the last detection are all NO_DETECTION. Boxes are normalized
(cx, cy, w, h) of the ORIGINAL image (the post-processing already undid resizing and padding): pixel corners are
center_to_corners(box) * (width, height, width, height).

transformers is an optional dependency, imported only when a member of this format loads."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from runtime.config import ConfigReader, read_json
from runtime.errors import ModelLoadError
from runtime.models.detect_postprocess import DetectorOutput

log = logging.getLogger(__name__)

EXTRA = "pip install 'roadwork-cascade[transformers]'"
NO_DETECTION = -1e4  # sigmoid(-1e4) == 0 in fp32; finite, and within fp16's range
# Zero-shot families by what their post-processing names a box with: the prompt text it grounds to (decoded
# tokens), or the index of its query phrase.
TEXT_LABELLED = ("grounding-dino", "mm-grounding-dino")
INDEX_LABELLED = ("owlv2", "owlvit", "omdet-turbo")


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError(f"format 'transformers' needs the transformers package ({e}); {EXTRA}") from e
    return transformers


def prompt_phrases(prompt: str, source: str) -> tuple[str, ...]:
    """The prompt's '.'-separated phrases, whitespace collapsed, in order: the labels of a zero-shot member."""
    phrases = tuple(" ".join(p.split()) for p in prompt.split("."))
    phrases = tuple(p for p in phrases if p)
    if not phrases:
        raise ModelLoadError(f"{source}: key 'prompt' holds no phrase: {prompt!r}")
    lowered = [p.lower() for p in phrases]
    if len(set(lowered)) != len(lowered):
        raise ModelLoadError(f"{source}: key 'prompt' names a phrase twice: {prompt!r}")
    return phrases


@dataclass(frozen=True)
class PromptGrounding:
    """Maps the text label Grounding DINO's post-processing gives a box back to a prompt phrase.

    That label is the decoded prompt tokens whose probability for the box exceeds `text_threshold`, in prompt
    order: a phrase ("traffic cone"), part of one ("cone"), or pieces of several ("traffic. road barrier",
    "traffic roadwork [SEP]"). The rule: '.' and special tokens cut the label into pieces; each piece is split,
    left to right, into the longest word runs that occur contiguously in a phrase (the earliest such phrase),
    skipping words of no phrase; the box goes to the phrase of its longest run, the earliest on a tie. Phrase
    words are the phrase as the tokenizer decodes it back (lowercased, word pieces joined), which is what labels
    are made of. A label with no run (no token above text_threshold, or only separators) names no phrase: that
    box is not kept."""
    phrase_words: tuple[tuple[str, ...], ...]
    separators: frozenset[str]

    @classmethod
    def from_tokenizer(cls, tokenizer, phrases: tuple[str, ...]) -> PromptGrounding:
        words = tuple(tuple(tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"]).split())
                      for p in phrases)
        return cls(words, frozenset(tokenizer.all_special_tokens) - {tokenizer.unk_token})

    def runs(self, words: list[str]) -> list[tuple[int, int]]:
        """(phrase, length) of each longest run, left to right."""
        found, start = [], 0
        while start < len(words):
            best = None
            for phrase, pw in enumerate(self.phrase_words):
                for offset in range(len(pw)):
                    length = 0
                    while (start + length < len(words) and offset + length < len(pw)
                           and words[start + length] == pw[offset + length]):
                        length += 1
                    if length and (best is None or length > best[1]):
                        best = (phrase, length)
            if best is None:
                start += 1
            else:
                found.append(best)
                start += best[1]
        return found

    def phrase_of(self, label: str) -> int | None:
        text = label
        for token in self.separators:
            text = text.replace(token, ".")
        runs = [run for piece in text.split(".") for run in self.runs(piece.split())]
        if not runs:
            return None
        return min(runs, key=lambda run: (-run[1], run[0]))[0]


@dataclass(frozen=True)
class TransformersDetectorConfig:
    model_type: str
    id2label: dict[int, str]
    max_det: int
    zero_shot: bool

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_queries(self) -> int:
        return self.max_det


def closed_set_labels(reader: ConfigReader) -> dict[int, str]:
    id2label = reader.get("id2label", dict)
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        reader.fail(f"id2label keys must be integers, got {list(id2label)}")
    reader.check(bool(labels) and sorted(labels) == list(range(len(labels))),
                 f"id2label must number its labels 0..n-1, got ids {sorted(labels)}")
    return labels


def rgb_array(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be HxWx3 uint8, got shape {array.shape} dtype {array.dtype}")
    return np.ascontiguousarray(array)


def to_pil(image) -> Image.Image:
    return Image.fromarray(rgb_array(image))


def score_logits(scores: torch.Tensor) -> torch.Tensor:
    """logit(score) in fp32, finite: sigmoid of it is the score again (1.0 and 0.0 exactly)."""
    return torch.logit(scores.double()).clamp(NO_DETECTION, -NO_DETECTION).float()


def check_member_dir(model_dir: Path, max_det: int) -> None:
    if max_det < 1:
        raise ModelLoadError(f"{model_dir}: key 'max_det' must be >= 1, got {max_det}")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelLoadError(f"{model_dir}: no model.safetensors (format 'transformers' loads safetensors only)")


class TransformersDetector(nn.Module):
    def __init__(self, cfg: TransformersDetectorConfig, model: nn.Module, processor, phrases: tuple[str, ...],
                 grounding: PromptGrounding | None, text_threshold: float, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.model, self.processor = cfg, model, processor
        self.phrases, self.grounding, self.text_threshold = phrases, grounding, text_threshold
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, model_dir, device, prompt: str | None, dtype: torch.dtype = torch.float32,
                        max_det: int = 300, text_threshold: float = 0.25) -> TransformersDetector:
        """`prompt`: the phrases a zero-shot model grounds (required there, refused for a closed-set model).
        `text_threshold`: Grounding DINO's, for the text labels (PromptGrounding); its documented default."""
        transformers = import_transformers()
        from transformers.models.auto.modeling_auto import (MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
                                                            MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES)
        model_dir = Path(model_dir)
        source = str(model_dir / "config.json")
        reader = ConfigReader(read_json(model_dir / "config.json"), source)
        model_type = reader.get("model_type", str)
        zero_shot = model_type in MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES
        if not zero_shot and model_type not in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
            reader.fail(f"model_type {model_type!r} is not a transformers detection model (object detection: "
                        f"{', '.join(MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES)}; zero-shot: "
                        f"{', '.join(MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES)})")
        if zero_shot and model_type not in TEXT_LABELLED + INDEX_LABELLED:
            reader.fail(f"zero-shot model_type {model_type!r} has no known post-processing here "
                        f"(supported: {', '.join(TEXT_LABELLED + INDEX_LABELLED)})")
        if zero_shot and prompt is None:
            raise ModelLoadError(f"{model_dir}: key 'prompt' is required: {model_type} is a zero-shot detector "
                                 f"that grounds '.'-separated phrases, e.g. \"traffic cone. road barrier.\"")
        if not zero_shot and prompt is not None:
            raise ModelLoadError(f"{model_dir}: key 'prompt' is for zero-shot detectors; {model_type} is closed-set "
                                 f"(its labels are config.json's id2label)")
        check_member_dir(model_dir, max_det)
        phrases = prompt_phrases(prompt, str(model_dir)) if zero_shot else ()
        id2label = dict(enumerate(phrases)) if zero_shot else closed_set_labels(reader)

        auto_model = (transformers.AutoModelForZeroShotObjectDetection if zero_shot
                      else transformers.AutoModelForObjectDetection)
        auto_processor = transformers.AutoProcessor if zero_shot else transformers.AutoImageProcessor
        # ImportError: a processor needing a missing backend (OmDet-Turbo's needs torchvision for its NMS).
        try:
            processor = auto_processor.from_pretrained(model_dir, backend="pil", local_files_only=True,
                                                       trust_remote_code=False)
            model = auto_model.from_pretrained(model_dir, dtype=dtype, local_files_only=True, use_safetensors=True,
                                               trust_remote_code=False)
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(f"{model_dir}: transformers cannot load it: {' '.join(str(e).split())}") from e
        model = model.to(device).eval().requires_grad_(False)

        grounding = None
        if model_type in TEXT_LABELLED:
            grounding = PromptGrounding.from_tokenizer(processor.tokenizer, phrases)
            merged = ". ".join(p.lower() for p in phrases) + "."
            length = len(processor.tokenizer(merged)["input_ids"])
            if length > model.config.max_text_len:
                raise ModelLoadError(f"{model_dir}: key 'prompt' is {length} tokens, over the model's "
                                     f"max_text_len {model.config.max_text_len}")
        elif model_type in ("owlv2", "owlvit"):
            limit = processor.tokenizer.model_max_length
            for phrase in phrases:
                if len(processor.tokenizer(phrase)["input_ids"]) > limit:
                    raise ModelLoadError(f"{model_dir}: key 'prompt': phrase {phrase!r} is over the tokenizer's "
                                         f"{limit} tokens")
        cfg = TransformersDetectorConfig(model_type, id2label, max_det, zero_shot)
        log.info("%s: transformers %s (%s), %d labels, max_det %d", model_dir, model_type,
                 "zero-shot" if zero_shot else "closed-set", cfg.num_labels, max_det)
        return cls(cfg, model, processor, phrases, grounding, text_threshold, torch.device(device), dtype)

    def post_process(self, outputs, inputs, sizes: list[tuple[int, int]]) -> list[tuple]:
        """The processor's own post-processing -> per image (scores [N], label ids [N], pixel xyxy boxes [N, 4])."""
        cfg, proc, batch = self.cfg, self.processor, len(sizes)
        if not cfg.zero_shot:
            post = proc.post_process_object_detection
            extra = {"top_k": cfg.max_det} if "top_k" in inspect.signature(post).parameters else {}
            found = post(outputs, threshold=0.0, target_sizes=sizes, **extra)
            return [(f["scores"], f["labels"], f["boxes"]) for f in found]
        text_labels = [list(self.phrases)] * batch
        if cfg.model_type in TEXT_LABELLED:
            found = proc.post_process_grounded_object_detection(
                outputs, input_ids=inputs["input_ids"], threshold=0.0, text_threshold=self.text_threshold,
                target_sizes=sizes)
            out = []
            for f in found:
                named = [(i, self.grounding.phrase_of(t)) for i, t in enumerate(f["text_labels"])]
                keep = torch.tensor([i for i, p in named if p is not None], dtype=torch.int64)
                labels = torch.tensor([p for _, p in named if p is not None], dtype=torch.int64)
                out.append((f["scores"][keep.to(f["scores"].device)], labels, f["boxes"][keep.to(f["boxes"].device)]))
            return out
        if cfg.model_type == "omdet-turbo":
            candidates = outputs.decoder_class_logits.shape[1] * outputs.decoder_class_logits.shape[2]
            found = proc.post_process_grounded_object_detection(
                outputs, text_labels=text_labels, threshold=0.0, target_sizes=sizes,
                max_num_det=min(cfg.max_det, candidates))
        else:
            found = proc.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                                text_labels=text_labels)
        return [(f["scores"], f["labels"], f["boxes"]) for f in found]

    @torch.inference_mode()
    def forward(self, images: list) -> DetectorOutput:
        """images: HxWx3 uint8 RGB (tensors or numpy arrays), any sizes."""
        pil = [to_pil(im) for im in images]
        sizes = [(im.height, im.width) for im in pil]
        if self.cfg.zero_shot:
            inputs = self.processor(images=pil, text=[list(self.phrases)] * len(pil), return_tensors="pt")
        else:
            inputs = self.processor(images=pil, return_tensors="pt")
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        outputs = self.model(**inputs)
        return detector_output(self.post_process(outputs, inputs, sizes), sizes, self.cfg, self.device)


def detector_output(found: list[tuple], sizes: list[tuple[int, int]], cfg: TransformersDetectorConfig,
                    device: torch.device) -> DetectorOutput:
    """Per image (scores [N], label ids [N], pixel xyxy boxes [N, 4]) -> the DetectorOutput of the module doc."""
    logits = torch.full((len(sizes), cfg.max_det, cfg.num_labels), NO_DETECTION, device=device)
    boxes = torch.zeros(len(sizes), cfg.max_det, 4, device=device)
    for b, ((scores, labels, xyxy), (height, width)) in enumerate(zip(found, sizes)):
        labels = torch.as_tensor(labels, dtype=torch.int64, device=device)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < cfg.num_labels:
            raise ValueError(f"{cfg.model_type} post-processing gave label ids {labels.unique().tolist()}, "
                             f"outside the {cfg.num_labels} labels of id2label")
        order = torch.argsort(scores.float(), descending=True, stable=True)[:cfg.max_det].to(device)
        rows = torch.arange(order.numel(), device=device)
        logits[b, rows, labels[order]] = score_logits(scores.to(device)[order])
        scale = torch.tensor([width, height, width, height], dtype=torch.float64, device=device)
        x0, y0, x1, y1 = (xyxy.to(device)[order].double() / scale).unbind(-1)
        boxes[b, rows] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1).float()
    return DetectorOutput(logits, boxes)
