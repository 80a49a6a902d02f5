"""Detector member of format "transformers" for SAM 3 (`Sam3Model`; config.json model_type "sam3", or "sam3_video" as
facebook/sam3 ships it, whose tracker is not loaded): text-prompted detection by transformers' own model, each
'.'-separated phrase of the member's prompt a label.

transformers' Sam3 image processor needs torchvision, which does not import beside the CPU torch, so two of its
steps are ours:
  * pixels: our preprocessing (kernels/preprocess.py) from the image processor's settings (preprocessor_config.json,
    or processor_config.json's "image_processor"): Sam3ImageProcessor's uint8 antialiased resize to a fixed size,
    rescale and normalize;
  * tokens: the checkpoint's own tokenizer, padded to 32 as Sam3Processor pads them.
SAM 3 grounds one concept per forward: the image features are computed once per batch (`get_vision_features`) and
each phrase runs the DETR encoder, decoder and heads over them. A phrase's evidence is what Sam3's instance
post-processing (`post_process_instance_segmentation`) returns at threshold 0, less the masks: every query, scored
sigmoid(pred_logits) * sigmoid(presence_logits), its xyxy pred_box scaled to the original image. All phrases'
detections of an image compete for its `max_det` rows (hf_detector.detector_output)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kernels.preprocess import PreprocessSpec, preprocess_reference
from runtime.config import ConfigReader, read_json
from runtime.errors import ModelLoadError
from runtime.models.detect_postprocess import DetectorOutput
from runtime.models.hf_detector import (TransformersDetectorConfig, check_member_dir, detector_output,
                                        import_transformers, prompt_phrases, rgb_array)
from runtime.models.preprocessor import preprocess_spec

log = logging.getLogger(__name__)

MODEL_TYPES = ("sam3", "sam3_video")
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to this many tokens
# Settings of Sam3ImageProcessor's segmentation maps (training labels), never of the pixels.
MASK_KEYS = ("mask_size", "mask_pad_size")


def image_processor_settings(model_dir: Path) -> tuple[dict, str]:
    """The image processor's settings: preprocessor_config.json, or the "image_processor" entry of
    processor_config.json (where transformers 5 saves a processor's parts together)."""
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = model_dir / name
        if path.is_file():
            cfg = read_json(path)
            if entry is not None:
                cfg = ConfigReader(cfg, str(path)).get(entry, dict)
            return cfg, str(path) + (f" [{entry!r}]" if entry else "")
    raise ModelLoadError(f"{model_dir}: no preprocessor_config.json or processor_config.json (the image "
                         f"processor's settings)")


def read_sam3_preprocess(model_dir: Path) -> PreprocessSpec:
    cfg, source = image_processor_settings(model_dir)
    kind = cfg.get("image_processor_type")
    ConfigReader(cfg, source).check(isinstance(kind, str) and kind.startswith("Sam3"),
                                    f"image_processor_type={kind!r}: a SAM 3 checkpoint's is Sam3ImageProcessor")
    return preprocess_spec({k: v for k, v in cfg.items() if k not in MASK_KEYS}, source)


@dataclass(frozen=True)
class PhraseTokens:
    input_ids: torch.Tensor  # [P, TEXT_LENGTH]
    attention_mask: torch.Tensor  # [P, TEXT_LENGTH]


def phrase_tokens(tokenizer, phrases: tuple[str, ...], source: str) -> PhraseTokens:
    for phrase in phrases:
        length = len(tokenizer(phrase)["input_ids"])
        if length > TEXT_LENGTH:
            raise ModelLoadError(f"{source}: key 'prompt': phrase {phrase!r} is {length} tokens, over SAM 3's "
                                 f"{TEXT_LENGTH}")
    tokens = tokenizer(list(phrases), padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
    return PhraseTokens(tokens["input_ids"], tokens["attention_mask"])


class Sam3Detector(nn.Module):
    def __init__(self, cfg: TransformersDetectorConfig, model: nn.Module, spec: PreprocessSpec, tokens: PhraseTokens,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.model, self.spec, self.tokens = cfg, model, spec, tokens
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, model_dir, device, prompt: str | None, dtype: torch.dtype = torch.float32,
                        max_det: int = 300) -> Sam3Detector:
        transformers = import_transformers()
        model_dir = Path(model_dir)
        reader = ConfigReader(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
        model_type = reader.get("model_type", str)
        reader.check(model_type in MODEL_TYPES, f"model_type {model_type!r} is not SAM 3 ({', '.join(MODEL_TYPES)})")
        if prompt is None:
            raise ModelLoadError(f"{model_dir}: key 'prompt' is required: SAM 3 detects the '.'-separated phrases "
                                 f"it is given, e.g. \"traffic cone. road barrier.\"")
        check_member_dir(model_dir, max_det)
        phrases = prompt_phrases(prompt, str(model_dir))
        spec = read_sam3_preprocess(model_dir)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                                   trust_remote_code=False)
            model = transformers.Sam3Model.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                           use_safetensors=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{model_dir}: transformers cannot load it: {' '.join(str(e).split())}") from e
        tokens = phrase_tokens(tokenizer, phrases, str(model_dir))
        model = model.to(device).eval().requires_grad_(False)
        cfg = TransformersDetectorConfig(model_type, dict(enumerate(phrases)), max_det, zero_shot=True)
        log.info("%s: transformers sam3 (text-prompted), %d phrases, %dx%d input, max_det %d", model_dir,
                 cfg.num_labels, spec.height, spec.width, max_det)
        return cls(cfg, model, spec, PhraseTokens(tokens.input_ids.to(device), tokens.attention_mask.to(device)),
                   torch.device(device), dtype)

    def pixel_values(self, arrays: list) -> torch.Tensor:
        pixels = torch.empty(len(arrays), 3, self.spec.height, self.spec.width)
        for image, out in zip(arrays, pixels):
            preprocess_reference(torch.from_numpy(image), self.spec, out)
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, images: list) -> DetectorOutput:
        """images: HxWx3 uint8 RGB (tensors or numpy arrays), any sizes."""
        arrays = [rgb_array(im) for im in images]
        sizes = [im.shape[:2] for im in arrays]
        batch = len(arrays)
        vision = self.model.get_vision_features(pixel_values=self.pixel_values(arrays))
        scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=self.device)
        scores, labels, boxes = [], [], []
        for phrase in range(self.cfg.num_labels):
            out = self.model(vision_embeds=vision,
                             input_ids=self.tokens.input_ids[phrase].expand(batch, -1),
                             attention_mask=self.tokens.attention_mask[phrase].expand(batch, -1))
            scores.append(out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid())
            labels.append(torch.full(out.pred_logits.shape, phrase, dtype=torch.int64, device=self.device))
            boxes.append(out.pred_boxes.float() * scale[:, None])
        scores, labels, boxes = torch.cat(scores, 1), torch.cat(labels, 1), torch.cat(boxes, 1)
        found = [(scores[b], labels[b], boxes[b]) for b in range(batch)]
        return detector_output(found, sizes, self.cfg, self.device)
