"""Train a small Qwen3-VL on the synthetic scenes; save it in the Hugging Face layout runtime.vlm.engine loads.

    python -m train.vlm --data data/train --val data/val --out out/vlm --seed 0 [--minutes 20 | --epochs E | --steps S]

1. A byte-level BPE tokenizer (train/vlm_tokenizer.py) is trained on the prompts, answers and explanations.
2. A tiny Qwen3-VL (transformers' Qwen3VLForConditionalGeneration: vision tower with DeepStack taps, Qwen3 text
   model, tied LM head) is built from --seed, with a preprocessor config that keeps a 224x224 input at --size.
   --vision-from DIR copies a trained DINOv3 backbone into the vision tower (train/vlm_vision_init.py): from
   scratch the tower does not learn to see roadwork on CPU in minutes; from the cascade's backbone it does.
3. Training uses transformers' own causal-LM loss on two single-turn chats per image:
     user: <image> "Is there roadwork in this image? Answer Yes or No."   assistant: "Yes" | "No"
     user: <image> "Describe the roadwork you see, briefly."              assistant: e.g. "Yes: barriers and a worker."
   Each image gets one chat per step: the explanation chat for --explain-share of a batch, else the score chat.
   Both answers open with the yes/no decision; that token's loss is weighted by --score-weight (the score is
   the product), the other answer tokens weigh 1.
4. Output: config.json, model.safetensors (--save-dtype), tokenizer.json, tokenizer_config.json (chat template),
   preprocessor_config.json, generation_config.json (eos <|im_end|>), training.json (arguments, history, and the
   final val accuracy / MCC of P(Yes) computed by runtime.vlm.engine.VLMEngine.score on the saved files).

--minutes fixes the number of steps from the speed of the first steps, so that run is not bit-reproducible;
training.json records the step count, and --steps with it repeats the run exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from kernels.vlm_preprocess import VisionPreprocessSpec, vision_input_reference
from imagesets.confusion import Confusion
from runtime.models.preprocessor import vision_preprocess_spec
from runtime.vlm.sequence import SamplingParams
from runtime.vlm.tokenizer import ChatTokenizer
from runtime.vlm.engine import VLMEngine, VLMEngineConfig
from train.data import LabeledFolder, decode_file, list_folder
from train.loop import Loop, run
from train.optim import adamw, warmup_cosine
from train.vlm_vision_init import architecture_overrides, copy_backbone, freeze_backbone, read_backbone
from train.vlm_tokenizer import (EXPLAIN_PROMPT, IM_END, IMAGE_PAD, NO, PAD, SCORE_PROMPT, SPECIAL_TOKENS, YES,
                                 corpus, explanation, save_tokenizer, train_tokenizer)

log = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # Qwen3-VL's (--vision-from takes the DINOv3 backbone's)
MAX_MODEL_LEN = 4096
IGNORE = -100  # transformers' ignore_index


@dataclass(frozen=True)
class Architecture:
    """A tiny Qwen3-VL; defaults fit CPU training on one core in minutes."""
    size: int = 224  # model input side: a 224x224 image is resized to size x size
    patch_size: int = 16
    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    deepstack: tuple[int, ...] = (1, 2)  # vision blocks whose outputs are added to the first text layers
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    vision_intermediate: int | None = None  # None: 2 * vision_hidden
    vision_act: str = "gelu_pytorch_tanh"
    vision_rope_theta: float = 10000.0
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.size // self.patch_size

    def config(self, vocab_size: int) -> Qwen3VLConfig:
        head_dim = self.text_hidden // self.text_heads
        half = head_dim // 2  # MRoPE splits the rotary pairs over t/h/w, t the largest (interleaved)
        section = [half - 2 * (half // 3), half // 3, half // 3]
        ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        return Qwen3VLConfig(
            text_config=dict(vocab_size=vocab_size, hidden_size=self.text_hidden,
                             intermediate_size=self.text_intermediate, num_hidden_layers=self.text_layers,
                             num_attention_heads=self.text_heads, num_key_value_heads=self.text_kv_heads,
                             head_dim=head_dim, max_position_embeddings=MAX_MODEL_LEN,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section,
                                                  mrope_interleaved=True)),
            vision_config=dict(depth=self.vision_depth, hidden_size=self.vision_hidden,
                               intermediate_size=self.vision_intermediate or 2 * self.vision_hidden,
                               num_heads=self.vision_heads, hidden_act=self.vision_act,
                               rope_parameters=dict(rope_type="axial", rope_theta=self.vision_rope_theta),
                               patch_size=self.patch_size, out_hidden_size=self.text_hidden,
                               num_position_embeddings=self.grid ** 2,
                               deepstack_visual_indexes=list(self.deepstack)),
            tie_word_embeddings=True, image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])

    def preprocessor_config(self) -> dict:
        """Qwen2-VL image processor keys: min = max pixels = size^2, so a square image becomes size x size."""
        pixels = self.size * self.size
        return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
                "size": {"shortest_edge": pixels, "longest_edge": pixels}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_convert_rgb": True, "patch_size": self.patch_size,
                "temporal_patch_size": 2, "merge_size": 2}


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # None: from epochs (or fixed after calibration with minutes)
    epochs: float = 3.0
    minutes: float | None = None  # time budget of the training loop
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    vision_lr_scale: float = 1.0  # the vision tower's patch embedding and blocks train at lr x this
    warmup_steps: int = 50
    score_weight: float = 4.0
    explain_share: float = 0.25
    hflip: bool = True
    bf16: bool = True
    val_every: int | None = None  # steps between val evaluations; None: once per epoch
    seed: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # (S, L) right-padded
    mm_token_type_ids: torch.Tensor  # (S, L) 1 at image tokens
    pixel_values: torch.Tensor  # (S * patches, row) the vision-tower rows of each sequence's image, in order
    image_grid_thw: torch.Tensor  # (S, 3)
    score_labels: torch.Tensor  # (S, L) the yes/no decision token of each answer, else IGNORE
    text_labels: torch.Tensor  # (S, L) the rest of each answer, <|im_end|> included, else IGNORE

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "mm_token_type_ids": self.mm_token_type_ids,
                "pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


class Chats:
    """Token ids of the two chats per image, built with the runtime's tokenizer and chat template, with the image
    placeholder expanded to the image's merged-token count as the engine does."""

    def __init__(self, tokenizer: ChatTokenizer, image_tokens: int):
        self.pad = tokenizer.token_id(PAD)
        self.im_end = tokenizer.token_id(IM_END)
        self.image_pad = tokenizer.token_id(IMAGE_PAD)
        self.yes = tokenizer.single_token_id(YES)
        self.no = tokenizer.single_token_id(NO)
        self.tokenizer = tokenizer
        self.score_prompt = self.prompt(SCORE_PROMPT, image_tokens)
        self.explain_prompt = self.prompt(EXPLAIN_PROMPT, image_tokens)

    def prompt(self, text: str, image_tokens: int) -> list[int]:
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        ids = self.tokenizer.encode_chat(chat, add_generation_prompt=True)
        assert ids.count(self.image_pad) == 1, ids
        at = ids.index(self.image_pad)
        return ids[:at] + [self.image_pad] * image_tokens + ids[at + 1:]

    def answer(self, label: int) -> int:
        return self.yes if label else self.no


def vision_spec(arch: Architecture) -> VisionPreprocessSpec:
    spec = vision_preprocess_spec(arch.preprocessor_config())
    if spec.resized_size(224, 224) != (arch.size, arch.size):
        raise ValueError(f"--size {arch.size} is not reachable by smart resize: it must be a multiple of "
                         f"2 * --patch = {2 * arch.patch_size}")
    return spec


def load_images(folder: LabeledFolder, spec: VisionPreprocessSpec, progress: bool = True) -> torch.Tensor:
    """[N, h, w, 3] uint8: each image decoded as serving decodes it and resized by Pillow as the preprocessing
    does, so vision_input_reference on a row gives exactly the rows the engine computes from the original."""
    from tqdm import tqdm

    out = None
    for i, f in enumerate(tqdm(folder.files, desc=f"decode {folder.root.name}", unit="img", file=sys.stderr,
                               disable=not progress, leave=False)):
        image = decode_file(folder.root / f)
        h, w = spec.resized_size(*image.shape[:2])
        resized = image if (h, w) == image.shape[:2] else np.asarray(
            Image.fromarray(image).resize((w, h), resample=spec.resample))
        if out is None:
            out = torch.empty(len(folder), h, w, 3, dtype=torch.uint8)
            first = image
        if resized.shape != tuple(out.shape[1:]):
            raise ValueError(f"{folder.root / f}: {image.shape[1]}x{image.shape[0]} resizes to {w}x{h}, not "
                             f"{out.shape[2]}x{out.shape[1]} like the first image; all images must share a size")
        out[i] = torch.from_numpy(np.array(resized))  # a writable copy
    assert out is not None, f"{folder.root}: no images"
    direct, _ = vision_input_reference(torch.from_numpy(np.array(first)), spec)
    cached, _ = vision_input_reference(out[0], spec)
    assert torch.equal(direct, cached), "the resize cache must equal the serving preprocessing"
    return out


def pixel_rows(images: torch.Tensor, spec: VisionPreprocessSpec) -> torch.Tensor:
    """(len(images) * patches, row_size) float32 vision-tower rows of uint8 images, in order."""
    return torch.cat([vision_input_reference(image, spec)[0] for image in images])


def fast_patch_embed_(model: Qwen3VLForConditionalGeneration) -> None:
    """Training speed-up with the same math: the vision patch embedding (a Conv3d whose kernel equals its stride,
    i.e. a linear map of each row) as one matmul over a single frame. A still image's row repeats its frame over
    time, so the kernel summed over time gives the same output, and the same gradients (each time slice gets
    x^T g either way), at half the cost and without the slow Conv3d backward on CPU."""
    embed = model.model.visual.patch_embed
    conv = embed.proj
    channels, frames, patch = embed.in_channels, embed.temporal_patch_size, embed.patch_size

    def forward(rows: torch.Tensor) -> torch.Tensor:
        frame = rows.view(-1, channels, frames, patch * patch)[:, :, 0].reshape(-1, channels * patch * patch)
        weight = conv.weight.sum(2).reshape(conv.out_channels, -1)
        return nn.functional.linear(frame.to(weight.dtype), weight, conv.bias)

    rows = torch.randn(3, channels, 1, patch * patch).expand(-1, -1, frames, -1).reshape(3, -1)
    with torch.no_grad():
        expected = embed(rows)
        assert torch.allclose(forward(rows), expected, rtol=1e-4, atol=1e-5), "patch embedding rewrite differs"
    embed.forward = forward


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine to zero at `total`."""
    return warmup_cosine(step, total, cfg.lr, cfg.warmup_steps)


def make_batch(chats: Chats, images: torch.Tensor, labels: np.ndarray, explanations: list[list[int]],
               num_explain: int, spec: VisionPreprocessSpec) -> Batch:
    """One chat per image: the explanation chat for the first num_explain images, the score chat for the rest.
    score_labels hold the yes/no decision of both (an explanation opens with "Yes" or "No")."""
    seqs, starts = [], []
    for i, label in enumerate(labels):
        if i < num_explain:
            seqs.append(chats.explain_prompt + explanations[i] + [chats.im_end])
            starts.append(len(chats.explain_prompt))
        else:
            seqs.append(chats.score_prompt + [chats.answer(int(label)), chats.im_end])
            starts.append(len(chats.score_prompt))
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), chats.pad, dtype=torch.long)
    score_labels = torch.full_like(ids, IGNORE)
    text_labels = torch.full_like(ids, IGNORE)
    for row, (seq, start, label) in enumerate(zip(seqs, starts, labels)):
        ids[row, :len(seq)] = torch.tensor(seq)
        assert seq[start] == chats.answer(int(label)), "every answer opens with the yes/no decision"
        score_labels[row, start] = seq[start]
        text_labels[row, start + 1:len(seq)] = ids[row, start + 1:len(seq)]
    grid = spec.grid(images.shape[1], images.shape[2])
    return Batch(input_ids=ids, mm_token_type_ids=(ids == chats.image_pad).long(),
                 pixel_values=pixel_rows(images, spec), image_grid_thw=torch.tensor([grid] * len(seqs)),
                 score_labels=score_labels, text_labels=text_labels)


@torch.no_grad()
def p_yes(model: Qwen3VLForConditionalGeneration, chats: Chats, images: torch.Tensor, spec: VisionPreprocessSpec,
          bf16: bool, batch_size: int = 64) -> np.ndarray:
    """P(Yes) over {Yes, No} after the score prompt, from transformers' model (the in-training view)."""
    model.eval()
    out = []
    prompt = torch.tensor(chats.score_prompt)
    grid = spec.grid(images.shape[1], images.shape[2])
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        ids = prompt.expand(len(chunk), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, mm_token_type_ids=(ids == chats.image_pad).long(),
                           pixel_values=pixel_rows(chunk, spec), image_grid_thw=torch.tensor([grid] * len(chunk)),
                           logits_to_keep=1).logits[:, -1]
        out.append(torch.softmax(logits[:, [chats.yes, chats.no]].float(), dim=-1)[:, 0])
    return torch.cat(out).numpy()


def train(model: Qwen3VLForConditionalGeneration, chats: Chats, images: torch.Tensor, labels: np.ndarray,
          explanations: list[list[int]], spec: VisionPreprocessSpec, cfg: TrainConfig,
          val: tuple[torch.Tensor, np.ndarray] | None = None, progress: bool = True) -> tuple[list[dict], int]:
    """Train in place; returns (one record per evaluation, steps taken)."""
    visual = model.model.visual
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.98), scaled=(visual.patch_embed, visual.blocks),
                lr_scale=cfg.vision_lr_scale)
    num_explain = round(min(cfg.batch_size, len(images)) * cfg.explain_share)
    vocab = model.config.text_config.vocab_size

    def losses(index: torch.Tensor, order: torch.Generator) -> dict[str, torch.Tensor]:
        picked = images[index]  # a copy: flips stay in this batch
        if cfg.hflip:
            flip = torch.rand(len(index), generator=order) < 0.5
            picked[flip] = picked[flip].flip(2)
        b = make_batch(chats, picked, labels[index.numpy()], [explanations[i] for i in index.tolist()],
                       num_explain, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(**b.model_inputs()).logits
        score_loss = model.loss_function(logits=logits, labels=b.score_labels, vocab_size=vocab)
        text_loss = model.loss_function(logits=logits, labels=b.text_labels, vocab_size=vocab)
        return {"loss": cfg.score_weight * score_loss + text_loss, "score_loss": score_loss, "text_loss": text_loss}

    def evaluate() -> dict:
        conf = Confusion.of(val[1], p_yes(model, chats, val[0], spec, cfg.bf16))
        return {"val_accuracy": round(conf.accuracy, 4), "val_mcc": round(conf.mcc, 4)}

    loop = Loop("train vlm", cfg.seed, cfg.batch_size, cfg.epochs, cfg.steps, cfg.minutes,
                eval_every=cfg.val_every, progress=progress)
    return run(model, opt, len(images), loop, lambda step, total: lr_at(step, total, cfg), losses,
               evaluate if val is not None else None)


def build_tokenizer(data: LabeledFolder, vocab_size: int, out: Path) -> ChatTokenizer:
    """Train the tokenizer on this data's explanations, save it to `out`, and load it the way serving does."""
    assert data.box_classes is not None
    texts = [explanation(int(label), classes) for label, classes in zip(data.labels, data.box_classes)]
    save_tokenizer(train_tokenizer(corpus(texts), vocab_size), out, MAX_MODEL_LEN)
    return ChatTokenizer.load(out)


def new_model(arch: Architecture, vocab_size: int, chats: Chats, seed: int) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    # eager attention: on CPU its backward beats SDPA's at these tiny head sizes (~25% of a step)
    model = Qwen3VLForConditionalGeneration(arch.config(vocab_size))
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = chats.im_end
    model.generation_config.pad_token_id = chats.pad
    return model


def save_model(model: Qwen3VLForConditionalGeneration, arch: Architecture, out: Path, dtype: torch.dtype) -> None:
    """config.json + model.safetensors + generation_config.json (transformers' writer) + preprocessor_config.json."""
    for name, p in model.named_parameters():
        if dtype == torch.float16 and p.abs().max().item() >= torch.finfo(torch.float16).max:
            raise ValueError(f"{name} exceeds the float16 range; save with --save-dtype bfloat16 or float32")
    model.to(dtype).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(arch.preprocessor_config(), indent=2) + "\n")


def evaluate_saved(out: Path, folder: LabeledFolder, explain: int, progress: bool = True) -> dict:
    """Accuracy / MCC of P(Yes) from runtime.vlm.engine on the saved directory, per augmentation level too, and
    greedy explanations for the first `explain` images of each label (with how often they name the right answer)."""
    from tqdm import tqdm

    engine = VLMEngine.load(out, config=VLMEngineConfig(kv_cache_bytes=64 << 20, max_model_len=512,
                                                        max_num_seqs=64, max_num_batched_tokens=64 * 128))
    probabilities = []
    chunk = 64
    for start in tqdm(range(0, len(folder), chunk), desc="score val (runtime)", unit="batch", file=sys.stderr,
                      disable=not progress, leave=False):
        images = [np.array(decode_file(folder.root / f)) for f in folder.files[start:start + chunk]]  # writable
        probabilities += [r.p_yes for r in engine.score(images, SCORE_PROMPT)]
    p = np.array(probabilities)
    result = {"images": len(folder), **Confusion.of(folder.labels, p).as_dict(), "by_level": {}}
    for level in sorted(set(folder.levels.tolist()) - {-1}):
        pick = folder.levels == level
        conf = Confusion.of(folder.labels[pick], p[pick])
        result["by_level"][str(level)] = {"n": conf.n, "accuracy": round(conf.accuracy, 4), "mcc": round(conf.mcc, 4)}
    picked = [i for label in (1, 0) for i in np.flatnonzero(folder.labels == label)[:explain].tolist()]
    if picked:
        generated = engine.generate([EXPLAIN_PROMPT] * len(picked), [[np.array(decode_file(folder.root / folder.files[i]))]
                                                                    for i in picked], SamplingParams(max_new_tokens=32))
        examples = [{"file": folder.files[i], "label": int(folder.labels[i]), "explanation": g.text}
                    for i, g in zip(picked, generated)]
        right = sum(e["explanation"].startswith(YES if e["label"] else f"{NO} ") for e in examples)
        result["explanations"] = {"answer_agrees_with_label": round(right / len(examples), 4), "examples": examples}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.vlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="labeled folder with annotations.json (explanations)")
    ap.add_argument("--val", type=Path, help="labeled folder: P(Yes) accuracy/MCC during training and at the end")
    ap.add_argument("--out", type=Path, required=True, help="output model directory")
    ap.add_argument("--seed", type=int, default=0)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    length.add_argument("--steps", type=int, help="exact number of optimizer steps")
    length.add_argument("--minutes", type=float, help="time budget of the training loop (sets the step count "
                                                      "from the speed of the first steps)")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="images per step")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    ap.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    ap.add_argument("--score-weight", type=float, default=TrainConfig.score_weight,
                    help="weight of the yes/no answer token's loss (the explanation tokens weigh 1)")
    ap.add_argument("--explain-share", type=float, default=TrainConfig.explain_share,
                    help="share of a batch's images that also get the explanation chat")
    ap.add_argument("--val-every", type=int, help="steps between val evaluations (default: once per epoch)")
    ap.add_argument("--size", type=int, default=Architecture.size, help="model input side (multiple of 2*patch)")
    ap.add_argument("--patch", type=int, default=Architecture.patch_size)
    ap.add_argument("--vision-hidden", type=int, default=Architecture.vision_hidden)
    ap.add_argument("--vision-depth", type=int, default=Architecture.vision_depth)
    ap.add_argument("--vision-heads", type=int, default=Architecture.vision_heads)
    ap.add_argument("--deepstack", type=str, default=",".join(map(str, Architecture.deepstack)),
                    help="comma-separated vision block indexes tapped for DeepStack ('' for none)")
    ap.add_argument("--vision-from", type=Path, metavar="DIR",
                    help="start the vision tower from this trained DINOv3 checkpoint (e.g. the bundle's classifier; "
                         "train/vlm_vision_init.py): its widths, depth, patch, activation, RoPE theta and image "
                         "mean/std replace the --vision-*/--patch options")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="with --vision-from: keep the copied patch embedding and blocks fixed (mergers train)")
    ap.add_argument("--vision-lr-scale", type=float, default=TrainConfig.vision_lr_scale,
                    help="the vision tower's patch embedding and blocks train at --lr x this (e.g. 0.1 to fine-tune "
                         "a --vision-from tower gently)")
    ap.add_argument("--text-hidden", type=int, default=Architecture.text_hidden)
    ap.add_argument("--text-layers", type=int, default=Architecture.text_layers)
    ap.add_argument("--text-heads", type=int, default=Architecture.text_heads)
    ap.add_argument("--text-kv-heads", type=int, default=Architecture.text_kv_heads)
    ap.add_argument("--text-intermediate", type=int, default=Architecture.text_intermediate)
    ap.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary target (special tokens "
                                                               "included); the model rounds up to a multiple of 64")
    ap.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float16")
    ap.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine extra threads spin and slow everything)")
    ap.add_argument("--limit", type=int, help="use N images of --data drawn at random with --seed (quick runs)")
    ap.add_argument("--val-limit", type=int, help="use the first N images of each label in --val")
    ap.add_argument("--explain-examples", type=int, default=8,
                    help="val images per label whose greedy explanations go into training.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.time()
    try:
        deepstack = tuple(int(v) for v in args.deepstack.split(",") if v.strip())
    except ValueError:
        ap.error(f"--deepstack must be comma-separated integers, got {args.deepstack!r}")
    vision = dict(patch_size=args.patch, vision_hidden=args.vision_hidden, vision_depth=args.vision_depth,
                  vision_heads=args.vision_heads)
    if args.freeze_vision and not args.vision_from:
        ap.error("--freeze-vision needs --vision-from")
    if args.vision_from:
        try:
            backbone_cfg, preprocessor, backbone = read_backbone(args.vision_from)
            vision = architecture_overrides(backbone_cfg, preprocessor)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--vision-from {args.vision_from}: {e}")
    arch = Architecture(size=args.size, deepstack=deepstack, text_hidden=args.text_hidden,
                        text_layers=args.text_layers, text_heads=args.text_heads, text_kv_heads=args.text_kv_heads,
                        text_intermediate=args.text_intermediate, **vision)
    if any(not 0 <= i < arch.vision_depth for i in deepstack):
        ap.error(f"--deepstack {args.deepstack}: indexes must lie in [0, --vision-depth {arch.vision_depth})")
    if len(deepstack) > arch.text_layers:
        ap.error(f"--deepstack taps {len(deepstack)} blocks but there are only {arch.text_layers} text layers")
    try:
        spec = vision_spec(arch)
    except ValueError as e:
        ap.error(str(e))
    data = list_folder(args.data)
    if data.box_classes is None:
        ap.error(f"--data {args.data}: annotations.json is required (the explanations are made from its classes)")
    if args.limit:
        data = data.subset(np.sort(np.random.default_rng(args.seed).permutation(len(data))[:args.limit]))
    val_folder = None
    if args.val:
        val_folder = list_folder(args.val)
        if args.val_limit:
            val_folder = val_folder.subset(np.sort(np.concatenate(
                [np.flatnonzero(val_folder.labels == label)[:args.val_limit] for label in (0, 1)])))
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(data, args.vocab_size, args.out)
    vocab = math.ceil(tokenizer.vocab_size / 64) * 64
    image_tokens = spec.num_tokens(224, 224)
    chats = Chats(tokenizer, image_tokens)
    model = new_model(arch, vocab, chats, args.seed)
    if args.vision_from:
        copy_backbone(model.model.visual, backbone_cfg, backbone)
        log.info("vision tower copied from %s%s", args.vision_from, f" ({freeze_backbone(model.model.visual) / 1e6:.2f}M "
                 "parameters frozen)" if args.freeze_vision else "")
    progress = not args.no_progress
    images = load_images(data, spec, progress)
    explanations = [tokenizer.encode(explanation(int(label), classes))
                    for label, classes in zip(data.labels, data.box_classes)]
    val = None
    if val_folder is not None:
        val = (load_images(val_folder, spec, progress), val_folder.labels)
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, minutes=args.minutes, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, vision_lr_scale=args.vision_lr_scale,
                      warmup_steps=args.warmup_steps,
                      score_weight=args.score_weight, explain_share=args.explain_share, hflip=not args.no_hflip,
                      bf16=not args.no_bf16, val_every=args.val_every, seed=args.seed)
    log.info("training on %d images (%d roadwork) at %dx%d (%d image tokens), vocab %d (model %d), %.2fM parameters",
             len(data), int(data.labels.sum()), arch.size, arch.size, image_tokens, tokenizer.vocab_size, vocab,
             sum(p.numel() for p in model.parameters()) / 1e6)
    fast_patch_embed_(model)
    history, steps = train(model, chats, images, data.labels, explanations, spec, cfg, val, progress)
    train_minutes = (time.time() - started) / 60
    save_model(model, arch, args.out, SAVE_DTYPES[args.save_dtype])
    final = evaluate_saved(args.out, val_folder, args.explain_examples, progress) if val_folder is not None else None
    minutes = (time.time() - started) / 60
    record = {"data": str(args.data), "images": len(data), "val": str(args.val) if args.val else None,
              "seed": args.seed, "steps": steps, "minutes": round(minutes, 1),
              "train_minutes": round(train_minutes, 1), "threads": args.threads,
              "architecture": asdict(arch), "train": asdict(cfg),
              "vision_from": str(args.vision_from) if args.vision_from else None,
              "freeze_vision": args.freeze_vision, "history": history, "val_runtime": final,
              "size_bytes": (args.out / "model.safetensors").stat().st_size}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if final is not None:
        log.info("val (runtime VLMEngine.score on the saved model): accuracy %.4f, MCC %.4f on %d images",
                 final["accuracy"], final["mcc"], final["n"])
    log.info("saved %s (model.safetensors %.2f MB) in %.1f min", args.out, record["size_bytes"] / 1e6, minutes)


if __name__ == "__main__":
    main()
