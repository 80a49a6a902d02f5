"""Tiny random-weight Qwen3-VL checkpoints written by transformers, with a small byte-level BPE tokenizer that has
Qwen's special tokens and a Qwen-style chat template."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(len(SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = [
    "Is there roadwork in this image? Answer Yes or No.",
    "Yes", "No", "Yes, there are traffic cones and a barrier.", "No, the street is clear.",
    "Describe the street scene: cars, cones, workers, signs, excavators and barriers.",
    "The road is closed for construction work ahead.", "A worker in an orange vest holds a stop sign.",
] * 4

VOCAB_SIZE = 512  # model rows; the tokenizer uses fewer

TINY = dict(
    text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                       num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
)
# Qwen3-VL-2B's head sizes, GQA ratio, MRoPE sections and DeepStack indexes, with fewer and narrower layers.
QWEN3_VL_2B_SHAPED = dict(
    text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                     rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                          mrope_interleaved=True)),
    vision_config=dict(depth=18, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=16,
                       out_hidden_size=256, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    tie_word_embeddings=True,
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def write_tokenizer(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tokenizer_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 4096}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def image_processor(patch_size: int, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_qwen3_vl(path: Path, cfg: dict = TINY, seed: int = 0, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> Qwen3VLForConditionalGeneration:
    """transformers' model with perturbed random weights, saved with tokenizer, preprocessor and generation config."""
    torch.manual_seed(seed)
    config = Qwen3VLConfig(**cfg, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = Qwen3VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init leaves biases 0 and norms 1: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.generation_config.eos_token_id = IM_END
    model.generation_config.pad_token_id = ENDOFTEXT
    model.save_pretrained(path)
    write_tokenizer(path)
    factor = config.vision_config.patch_size * 2
    image_processor(config.vision_config.patch_size, min_pixels or (4 * factor) ** 2,
                    max_pixels or (8 * factor) ** 2).save_pretrained(path)
    return model


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def hf_inputs(path: Path, token_ids: list[int], images: list[np.ndarray]) -> dict:
    """transformers' model inputs for our expanded prompt: pixel values from transformers' own image processor."""
    inputs = {"input_ids": torch.tensor([token_ids]),
              "mm_token_type_ids": torch.tensor([[int(t == IMAGE_PAD) for t in token_ids]])}
    if images:
        processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        out = processor(images=images, return_tensors="pt")
        inputs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    return inputs
