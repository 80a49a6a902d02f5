"""One request's state in the VLM engine: tokens, images, multimodal positions, blocks, sampling, accounting."""
from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (holds no blocks)
    RUNNING = "running"  # holds blocks; keys/values of all tokens but the last are in the cache
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    ignore_eos: bool = False  # keep going past the stop tokens (benchmarks, parity tests)
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-turn / eos tokens

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def image_digest(image: np.ndarray | torch.Tensor) -> int:
    """64-bit content hash of an (H, W, 3) uint8 image: equal pixels give equal digests."""
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(array.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(h.digest(), "little")


def image_key(digest: int) -> int:
    """Prefix-cache key of an image's placeholder tokens: negative, so it never equals a token id."""
    return -1 - (digest & ((1 << 62) - 1))


@dataclass
class ImageInput:
    """A preprocessed image placed in a prompt: its vision-tower rows and where its placeholder tokens are."""

    pixel_rows: torch.Tensor  # (patches, C*T*P*P) on the model's device
    grid: tuple[int, int, int]  # (t, h, w) patches
    digest: int
    start: int  # index of its first placeholder token
    num_tokens: int  # placeholder tokens (merged patches)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class Sequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    prompt_keys: list[int]  # prefix-cache keys of the prompt: token ids, image placeholders keyed by content
    images: list[ImageInput]
    positions: torch.Tensor  # (3, prompt tokens) multimodal RoPE positions, on the CPU
    rope_delta: int  # position of token i >= prompt is i + rope_delta
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    score_token_ids: tuple[int, int] | None = None  # (yes, no): one prefill, P(yes), no generation
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens taken from the prefix cache at the latest admission
    num_hashed_blocks: int = 0  # leading full blocks already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of leading full blocks (memo)
    first_cached_tokens: int | None = None  # num_cached_tokens at the first admission (for accounting)
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length", "scored", "cancelled"
    p_yes: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def keys(self, start: int, end: int) -> list[int]:
        """Prefix-cache keys of tokens [start, end): generated tokens are keyed by their ids."""
        n = self.num_prompt_tokens
        return self.prompt_keys[start:min(end, n)] + self.token_ids[max(start, n):end]

    def position_ids(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) positions of tokens [start, end)."""
        n = self.num_prompt_tokens
        prompt = self.positions[:, start:min(end, n)]
        if end <= n:
            return prompt
        after = torch.arange(max(start, n), end) + self.rope_delta
        return torch.cat([prompt, after.expand(3, -1)], dim=1)
