"""Qwen3-VL (`model_type: qwen3_vl`): config, the vision tower + language model + LM head, multimodal RoPE
positions of a prompt, and loading from a Hugging Face directory (config.json + sharded safetensors).

Checkpoint names: model.visual.*, model.language_model.*, lm_head.weight (absent when tie_word_embeddings)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.config import ConfigReader, read_json
from runtime.errors import ModelLoadError
from runtime.models.qwen3_vl_text import AttentionMetadata, TextConfig, TextModel
from runtime.models.qwen3_vl_vision import VisionConfig, VisionTower
from runtime.models.quantized_checkpoint_layers import load_quantized_linears
from runtime.models.quantized_checkpoint_formats import read_quant_format
from runtime.models.weights import check_all_used, load_into, read_safetensors

log = logging.getLogger(__name__)

MODEL_TYPE = "qwen3_vl"


@dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, cfg: dict) -> Qwen3VLConfig:
        if cfg.get("model_type") != MODEL_TYPE:
            raise ModelLoadError(f"config.json: model_type {cfg.get('model_type')!r} is not {MODEL_TYPE!r}")
        r = ConfigReader(cfg, "config.json")
        text = r.get("text_config", dict)
        vision = r.get("vision_config", dict)
        out = cls(text=TextConfig.from_dict(text), vision=VisionConfig.from_dict(vision),
                  image_token_id=cfg.get("image_token_id", 151655),
                  vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                  vision_end_token_id=cfg.get("vision_end_token_id", 151653),
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))
        if out.vision.out_hidden_size != out.text.hidden_size:
            raise ModelLoadError(f"config.json: vision_config.out_hidden_size {out.vision.out_hidden_size} differs "
                                 f"from text_config.hidden_size {out.text.hidden_size}")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(out, name) < out.text.vocab_size:
                raise ModelLoadError(f"config.json: {name} {getattr(out, name)} is outside the vocabulary "
                                     f"(vocab_size {out.text.vocab_size})")
        return out


def mrope_positions(num_tokens: int, images: list[tuple[int, tuple[int, int, int]]], merge_size: int
                    ) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) (t, h, w) positions of a prompt and its rope delta.

    `images`: (first placeholder index, (t, h, w) patch grid) per image, in order. Text advances all three axes
    together; an image's tokens take t = start and (h, w) = start + their merged-grid row / column, and the text
    after it resumes at start + max(merged h, merged w). Tokens after the prompt sit at index + delta."""
    pieces = []
    cursor = 0  # next position
    index = 0  # next token
    for start, (t, h, w) in images:
        assert start >= index, f"image placeholders overlap at token {start}"
        text = torch.arange(start - index) + cursor
        pieces.append(text.expand(3, -1))
        cursor += start - index
        gh, gw = h // merge_size, w // merge_size
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + cursor)
        cursor += max(gh, gw)
        index = start + t * gh * gw
    assert index <= num_tokens, f"image placeholders run past the prompt ({index} > {num_tokens})"
    pieces.append((torch.arange(num_tokens - index) + cursor).expand(3, -1))
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - num_tokens if num_tokens else 0


class Qwen3VL(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.language_model = TextModel(cfg.text)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size,
                                                                      bias=False)

    def encode_images(self, pixel_rows: torch.Tensor, grids: list[tuple[int, int, int]]
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Vision tower over the images of `grids`: (merged tokens, hidden) and the DeepStack features."""
        return self.visual(pixel_rows, grids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, image_rows: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, deepstack: list[torch.Tensor] = ()) -> torch.Tensor:
        """Final hidden states (tokens, hidden). Image features replace the embeddings at `image_rows`."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_rows is not None:
            embeds = embeds.index_copy(0, image_rows, image_embeds.to(embeds.dtype))
        return self.language_model(embeds, positions, meta, kv_cache, image_rows, deepstack)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.T

    def load_weights(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> None:
        used = load_into(self.visual, tensors, dtype, prefix="model.visual.", source=source)
        used |= load_into(self.language_model, tensors, dtype, prefix="model.language_model.", source=source)
        if self.lm_head is not None:
            used |= load_into(self.lm_head, tensors, dtype, prefix="lm_head.", source=source)
        elif "lm_head.weight" in tensors:
            # Some tied checkpoints store the head too; it must be the embedding itself.
            head = tensors["lm_head.weight"].to(dtype)
            if not torch.equal(head, self.language_model.embed_tokens.weight.data):
                raise ModelLoadError(f"{source}: tie_word_embeddings is true but 'lm_head.weight' differs from "
                                     "'model.language_model.embed_tokens.weight'")
            used.add("lm_head.weight")
        check_all_used(tensors, used, source)


def load_qwen3_vl(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                  ) -> Qwen3VL:
    model_dir = Path(model_dir)
    raw = read_json(model_dir / "config.json")
    cfg = Qwen3VLConfig.from_dict(raw)
    quant = read_quant_format(raw)
    with torch.device("meta"):  # no random init: every parameter is assigned from the checkpoint
        model = Qwen3VL(cfg)
    tensors = read_safetensors(model_dir)
    if quant is not None:  # quantized checkpoints: Linear layers computing from them, or dequantized once here
        tensors = load_quantized_linears(model, tensors, quant, dtype, torch.device(device), str(model_dir))
    model.load_weights(tensors, dtype, source=str(model_dir))
    log.info("loaded Qwen3-VL from %s (%d text layers, %d vision blocks, %s)", model_dir, cfg.text.num_layers,
             cfg.vision.depth, dtype)
    return model.to(device).eval()
