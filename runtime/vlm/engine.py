"""In-process Qwen3-VL engine: requests in, tokens and scores out, with continuous batching over a paged KV cache
and prefix caching (images included, keyed by content).

    engine = VLMEngine.load(model_dir, kv_cache_bytes=...)
    engine.score(images, "Is there roadwork in this image? Answer Yes or No.")   # -> [ScoreResult(p_yes, ...)]
    for out in engine.stream("Why?", [image]): ...                                # token by token
    rid = engine.add_request(...); engine.step(); engine.cancel(rid)            # the loop a server thread drives
    engine.add_request("Why?", [image], answer_prefix=(engine.score_token_ids[0],))  # the answer opens with "Yes"

Not thread-safe: one thread calls add_request / step / cancel (the other methods drive step themselves)."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kernels.vlm_preprocess import VisionPreprocessSpec, vision_input
from runtime.config import read_json
from runtime.errors import InputError, ModelLoadError
from runtime.options import KV_CACHE_DTYPES
from runtime.models.preprocessor import read_vision_preprocess
from runtime.vlm.block_manager import BlockManager, KVCacheSpec
from runtime.models.qwen3_vl import Qwen3VL, load_qwen3_vl, mrope_positions
from runtime.vlm.scheduler import Scheduler
from runtime.vlm.sequence import ImageInput, SamplingParams, Sequence, image_digest, image_key
from runtime.vlm.tokenizer import ChatTokenizer, IncrementalDetokenizer
from runtime.vlm.runner import ModelRunner

log = logging.getLogger(__name__)

Image = np.ndarray | torch.Tensor  # (H, W, 3) uint8 RGB
Prompt = str | list[dict] | list[int]


@dataclass(frozen=True)
class VLMEngineConfig:
    kv_cache_bytes: int = 1 << 30  # memory for the paged KV cache; must hold one max_model_len sequence
    max_model_len: int = 4096  # prompt + generated tokens of one sequence
    max_num_seqs: int = 32  # sequences in one step
    max_num_batched_tokens: int = 8192  # tokens in one step (decodes + uncached prefill tokens)
    block_size: int = 16  # tokens per KV block (a power of two)
    kv_cache_dtype: str = "auto"  # "auto": the run dtype; "int8": int8 values + per-block-per-head scales
    vision_cache_entries: int = 16  # vision-tower outputs kept by image content
    yes_token: str = "Yes"  # the answers score() compares; each must be a single token
    no_token: str = "No"
    seed: int = 0  # for temperature sampling
    # Decode-only steps padded to batch buckets and captured as CUDA graphs; None: on for CUDA, off elsewhere
    # (True off CUDA runs the padded buckets eagerly).
    decode_graphs: bool | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has finished=True."""

    request_id: int
    new_token_ids: list[int]
    text: str  # decoded text of new_token_ids (may lag by a partial UTF-8 character)
    finished: bool
    finish_reason: str | None  # "stop", "length", "scored", "cancelled"
    p_yes: float | None  # score requests: P(yes) over {yes, no}
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_generated_tokens: int


@dataclass(frozen=True)
class ScoreResult:
    p_yes: float
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int


def _stop_ids(model_dir: Path, tokenizer: ChatTokenizer | None) -> frozenset[int]:
    ids: set[int] = set()
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = read_json(path).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and "eos_token" in tokenizer.special_tokens:
        ids.add(tokenizer.token_id(tokenizer.special_tokens["eos_token"]))
    return frozenset(ids)


class VLMEngine:
    def __init__(self, model: Qwen3VL, image_spec: VisionPreprocessSpec, tokenizer: ChatTokenizer | None,
                 config: VLMEngineConfig, device: torch.device, stop_token_ids: frozenset[int] = frozenset()):
        vision = model.cfg.vision
        if (image_spec.patch_size, image_spec.merge_size, image_spec.temporal_patch_size) != (
                vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size):
            raise ModelLoadError(
                f"preprocessor_config.json patch_size/merge_size/temporal_patch_size "
                f"{image_spec.patch_size}/{image_spec.merge_size}/{image_spec.temporal_patch_size} differ from "
                f"config.json vision_config {vision.patch_size}/{vision.spatial_merge_size}/"
                f"{vision.temporal_patch_size}")
        text = model.cfg.text
        if config.max_model_len > text.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{text.max_position_embeddings}")
        self.model = model
        self.image_spec = image_spec
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = model.language_model.embed_tokens.weight.dtype
        self.stop_token_ids = stop_token_ids
        assert config.kv_cache_dtype in KV_CACHE_DTYPES, (config.kv_cache_dtype, KV_CACHE_DTYPES)
        kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else self.dtype
        spec = KVCacheSpec(text.num_layers, text.num_kv_heads, text.head_dim, config.block_size, kv_dtype)
        kv_cache = spec.allocate(config.kv_cache_bytes, config.max_model_len, self.device)
        self.block_manager = BlockManager(kv_cache.shape[2], config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, torch.Generator(self.device).manual_seed(config.seed))
        decode_graphs = self.device.type == "cuda" if config.decode_graphs is None else config.decode_graphs
        self.runner = ModelRunner(model, kv_cache, config.block_size, config.vision_cache_entries,
                                  max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                                  decode_graphs=decode_graphs)
        self.score_token_ids: tuple[int, int] | None = None
        if tokenizer is not None:
            self.score_token_ids = (tokenizer.single_token_id(config.yes_token),
                                    tokenizer.single_token_id(config.no_token))
        self.requests: dict[int, Sequence] = {}
        self._callbacks: dict[int, Callable[[RequestOutput], None]] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._next_id = 0

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             config: VLMEngineConfig | None = None) -> VLMEngine:
        """A Hugging Face Qwen3-VL directory: config.json, safetensors, preprocessor_config.json, and (for text
        prompts, streaming text and score()) tokenizer.json + tokenizer_config.json."""
        model_dir = Path(model_dir)
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        image_spec = read_vision_preprocess(model_dir)
        tokenizer = ChatTokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        model = load_qwen3_vl(model_dir, dtype, device)
        return cls(model, image_spec, tokenizer, config or VLMEngineConfig(), device, _stop_ids(model_dir, tokenizer))

    # ------------------------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt, num_images: int) -> list[int]:
        """Token ids with one image placeholder per image. A str is one user turn (images first, then the text)
        through the chat template; a list of dicts is a chat; a list of ints is used as is."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json: pass the prompt as token ids")
        if isinstance(prompt, str):
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
            prompt = [{"role": "user", "content": content}]
        return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)

    def add_request(self, prompt: Prompt, images: list[Image] = (), *, sampling: SamplingParams | None = None,
                    score: bool = False, on_output: Callable[[RequestOutput], None] | None = None,
                    digests: list[int] | None = None, answer_prefix: tuple[int, ...] = ()) -> int:
        """Queue a request; returns its id. score=True: one prefill, then P(yes) (no tokens are generated).
        digests: image_digest of each image, computed by the caller from its host copy (hashing a CUDA tensor
        here would copy the full image back to the host on the VLM loop). answer_prefix: tokens the answer is
        forced to open with (e.g. the decided yes/no token); they follow the prompt as prompt tokens (prefilled,
        counted in num_prompt_tokens) and their text opens the request's first output text."""
        assert digests is None or len(digests) == len(images), (len(images), digests)
        assert not (score and answer_prefix), "a score request reads the first answer token; it cannot be forced"
        sampling = sampling or SamplingParams()
        image_token = self.model.cfg.image_token_id
        ids = self.prompt_ids(prompt, len(images)) + list(answer_prefix)
        if ids.count(image_token) != len(images):
            raise ValueError(f"prompt has {ids.count(image_token)} image placeholders (token {image_token}) for "
                             f"{len(images)} images")
        if score and self.score_token_ids is None:
            raise ValueError("score requests need a tokenizer to find the yes/no answer tokens")
        tokens: list[int] = []
        keys: list[int] = []
        placed: list[ImageInput] = []
        image_iter = iter(images)
        digest_iter = iter(digests) if digests is not None else None
        for token in ids:
            if token != image_token:
                tokens.append(token)
                keys.append(token)
                continue
            image = next(image_iter)
            try:
                rows, grid = vision_input(image, self.image_spec, self.dtype, self.device)
            except ValueError as e:  # a shape the vision tower cannot take (aspect ratio): this image's fault
                raise InputError(str(e)) from e
            n = grid[0] * grid[1] * grid[2] // self.image_spec.merge_size ** 2
            digest = next(digest_iter) if digest_iter is not None else image_digest(image)
            placed.append(ImageInput(rows, grid, digest, start=len(tokens), num_tokens=n))
            tokens.extend([image_token] * n)
            keys.extend([image_key(digest)] * n)
        positions, delta = mrope_positions(len(tokens), [(im.start, im.grid) for im in placed],
                                           self.image_spec.merge_size)
        request_id = self._next_id
        self._next_id += 1
        seq = Sequence(seq_id=request_id, token_ids=tokens, num_prompt_tokens=len(tokens), prompt_keys=keys,
                       images=placed, positions=positions, rope_delta=delta, sampling=sampling,
                       stop_token_ids=frozenset(sampling.stop_token_ids) if sampling.stop_token_ids is not None
                       else self.stop_token_ids,
                       score_token_ids=self.score_token_ids if score else None)
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        if on_output is not None:
            self._callbacks[request_id] = on_output
        if self.tokenizer is not None and not score:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, answer_prefix)
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, "cancelled")
        self._emit(seq, [])
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch (prefills + decodes); returns an output for every request it advanced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.run(batch)
        new_tokens = self.scheduler.postprocess(batch.seqs, logits)
        return [self._emit(seq, new) for seq, new in zip(batch.seqs, new_tokens)]

    def _emit(self, seq: Sequence, new: list[int]) -> RequestOutput:
        finished = seq.finish_reason is not None
        detok = self._detokenizers.get(seq.seq_id)
        text = ""
        if detok is not None:
            text = "".join(detok.push(t) for t in new) + (detok.flush() if finished else "")
        out = RequestOutput(request_id=seq.seq_id, new_token_ids=new, text=text, finished=finished,
                            finish_reason=seq.finish_reason, p_yes=seq.p_yes, num_prompt_tokens=seq.num_prompt_tokens,
                            num_cached_tokens=seq.first_cached_tokens or 0,
                            num_generated_tokens=seq.num_generated_tokens)
        callback = self._callbacks.get(seq.seq_id)
        if finished:
            self.requests.pop(seq.seq_id, None)
            self._callbacks.pop(seq.seq_id, None)
            self._detokenizers.pop(seq.seq_id, None)
        if callback is not None:
            callback(out)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Convenience: run requests to completion
    # ------------------------------------------------------------------------------------------------------------

    def score(self, images: list[Image], prompt: Prompt) -> list[ScoreResult]:
        """P(yes) for each image with the same prompt, batched; blocks until all are scored."""
        results: dict[int, RequestOutput] = {}
        ids = [self.add_request(prompt, [image], score=True, on_output=lambda o: results.__setitem__(o.request_id, o))
               for image in images]
        while any(i not in results for i in ids):
            self.step()
        return [ScoreResult(results[i].p_yes, results[i].num_prompt_tokens, results[i].num_cached_tokens)
                for i in ids]

    def generate(self, prompts: list[Prompt], images: list[list[Image]] | None = None,
                 sampling: SamplingParams | None = None) -> list[GenerationResult]:
        """Generate for every prompt (with its images), batched; blocks until all finish."""
        images = images or [[] for _ in prompts]
        assert len(images) == len(prompts), (len(images), len(prompts))
        tokens: dict[int, list[int]] = {}
        texts: dict[int, list[str]] = {}
        final: dict[int, RequestOutput] = {}

        def collect(out: RequestOutput) -> None:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            texts.setdefault(out.request_id, []).append(out.text)
            if out.finished:
                final[out.request_id] = out

        ids = [self.add_request(p, im, sampling=sampling, on_output=collect) for p, im in zip(prompts, images)]
        while any(i not in final for i in ids):
            self.step()
        return [GenerationResult(i, tokens.get(i, []), "".join(texts.get(i, [])), final[i].finish_reason,
                                 final[i].num_prompt_tokens, final[i].num_cached_tokens) for i in ids]

    def stream(self, prompt: Prompt, images: list[Image] = (), sampling: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield this request's outputs as they come (other queued requests advance too). Closing the generator
        early cancels the request and frees its blocks."""
        events: deque[RequestOutput] = deque()
        request_id = self.add_request(prompt, images, sampling=sampling, on_output=events.append)
        finished = False
        try:
            while not finished:
                while not events:
                    self.step()
                out = events.popleft()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.cancel(request_id)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_blocks": len(bm.blocks), "free_blocks": bm.num_free_blocks, "cached_blocks": len(bm.cached),
            "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
            "preemptions": self.scheduler.num_preemptions,
            "prefill_tokens": self.scheduler.num_prefill_tokens,
            "cached_prefill_tokens": self.scheduler.num_cached_prefill_tokens,
            "vision_cache_hits": self.runner.vision_cache.hits, "vision_cache_misses": self.runner.vision_cache.misses,
        }
