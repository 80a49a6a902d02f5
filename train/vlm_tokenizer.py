"""The text side of the small roadwork VLM: prompts, answers, explanation sentences made from an image's COCO
classes, and a byte-level BPE tokenizer trained on them with `tokenizers`, saved with a Qwen-style chat template.

The tokenizer keeps Qwen's special tokens (first, ids 0..6) so a Qwen3-VL config can name them, and its
vocabulary comes only from this corpus: any other text still encodes (byte-level), just in more tokens."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.scenes import CLASSES, ROADWORK_CLASSES

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
PAD, IM_END, IMAGE_PAD = "<|endoftext|>", "<|im_end|>", "<|image_pad|>"

SCORE_PROMPT = "Is there roadwork in this image? Answer Yes or No."
EXPLAIN_PROMPT = "Describe the roadwork you see, briefly."
YES, NO = "Yes", "No"

# Qwen's layout: <|im_start|>role\n ... <|im_end|>\n per message; an image part is vision_start, one image_pad
# (the runtime expands it to the image's merged-token count), vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# COCO class -> (one, several) as the explanation says it.
PHRASES = {
    "cone": ("a traffic cone", "traffic cones"), "barrier": ("a barrier", "barriers"),
    "barrel": ("a barrel", "barrels"), "roadwork_sign": ("a road-work sign", "road-work signs"),
    "worker": ("a worker", "workers"), "machinery": ("construction machinery", "construction machinery"),
    "car": ("a car", "cars"), "person": ("a pedestrian", "pedestrians"), "sign": ("a sign", "signs"),
}
assert set(PHRASES) == set(CLASSES), "every scene class needs a phrase"
MAX_LISTED = 3  # classes named in one explanation


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def explanation(label: int, classes: list[str]) -> str:
    """The explanation target: the answer, then the most frequent relevant classes in the image, e.g.
    "Yes: traffic cones, a barrier and a worker." or "No roadwork: cars and a sign."."""
    relevant = [c for c in classes if (c in ROADWORK_CLASSES) == bool(label)]
    counts = Counter(relevant)
    named = sorted(counts, key=lambda c: (-counts[c], CLASSES.index(c)))[:MAX_LISTED]
    phrases = [PHRASES[c][counts[c] > 1] for c in named]
    if label:
        return f"{YES}: {_join(phrases)}." if phrases else f"{YES}: roadwork ahead."
    return f"{NO} roadwork: {_join(phrases)}." if phrases else f"{NO} roadwork: an open road."


def corpus(explanations: list[str]) -> list[str]:
    """Text the tokenizer learns from: the prompts, answers and role names as they appear, and the explanations."""
    turns = [f"user\n{SCORE_PROMPT}", f"user\n{EXPLAIN_PROMPT}", "assistant\nYes", "assistant\nNo", "system\n"]
    return turns * 100 + [YES, NO] * 100 + list(explanations)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen's special tokens first; asserts the answer words are single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    for word in (YES, NO):
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        assert len(ids) == 1, f"{word!r} encodes to {ids}: the corpus must make it one token"
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, eos <|im_end|>, pad <|endoftext|>), as
    transformers' PreTrainedTokenizerFast and runtime/vlm/tokenizer.py read them."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE, "eos_token": IM_END,
              "pad_token": PAD, "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
