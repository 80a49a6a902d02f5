"""The VLM stage: a Qwen3-VL answers the bundle's prompt for the images earlier stages left undecided, and writes
explanations (runtime/vlm/engine.py does the model work). An explanation is asked for once the cascade has decided,
and its answer is forced to open with that decision (vlm_prompt.py), so it never contradicts the label.

The stage is the Stage adapter over three parts: vlm_memory.py sizes it before anything is allocated (a bundle
that does not fit fails at startup), vlm_loop.py's thread alone drives the engine, and vlm_prompt.py turns prompts
and images into engine requests on that thread. Images are hashed (the prefix-cache key) on the caller's thread,
from the host copy the cascade holds anyway."""
from __future__ import annotations

import time
from typing import Callable

import torch

from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import VLMStageSpec
from runtime.cascade.results import StageAnswer
from runtime.cascade.stage import ChunkImages, GraphPools
from runtime.cascade.vlm_loop import VLMLoop, handover
from runtime.cascade.vlm_memory import engine_config
from runtime.cascade.vlm_prompt import VLMAnswer, VLMOutput, answer_prefix, start_stream, submit
from runtime.errors import ModelLoadError
from runtime.options import REQUEST_DEADLINE_S
from runtime.models.qwen3_vl import MODEL_TYPE
from runtime.vlm.engine import VLMEngine
from runtime.vlm.sequence import SamplingParams, image_digest

WARMUP_IMAGE = (224, 224)  # the validators' image size


class VLMStage:
    def __init__(self, spec: VLMStageSpec, where: str, device: torch.device, dtype: torch.dtype):
        self.spec, self.name, self.device, self.dtype = spec, spec.name, device, dtype
        config = engine_config(spec, where, device, dtype)
        try:
            self.engine = VLMEngine.load(spec.model, device, dtype, config)
        except ValueError as e:  # ModelLoadError included: the engine's messages do not name the stage
            raise ModelLoadError(f"{where}: {e}") from e
        self.kv_blocks = len(self.engine.block_manager.blocks)
        self.breaker = Breaker(spec.name, spec.failure_threshold, spec.cooldown_s)
        self.time_budget_s = None if spec.time_budget_ms is None else spec.time_budget_ms / 1000
        self.explain_sampling = SamplingParams(max_new_tokens=spec.max_explain_tokens)  # greedy
        self.loop = VLMLoop(self.engine, spec.name, device)

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        """The VLM decides every image it gets, by the chunk's deadline. It takes the host images (hashed here
        once, on the worker thread) and copies them to its own device as it preprocesses them."""
        host = [images.host[i] for i in pending]
        answers = self.score(host, [image_digest(x) for x in host], images.deadline)
        return [StageAnswer(a.p, tokens=a.tokens) for a in answers]

    def score(self, images: list[torch.Tensor], digests: list[int] | None = None,
              deadline: float | None = None) -> list[VLMAnswer]:
        """P(roadwork) of each (H, W, 3) uint8 image, with its token counts; blocks until all are scored, at most
        until `deadline` (time.monotonic(); REQUEST_DEADLINE_S from now where None) and the stage's time budget: past
        it the requests are cancelled and TimeoutError raised, so a VLM swamped by explanations cannot hold the
        inference worker. digests: their image_digest, if the caller has them (else computed on this thread)."""
        timeout = self.score_timeout(deadline)
        if timeout <= 0 and images:  # nobody waits for these answers any more: queue nothing
            raise TimeoutError(f"vlm stage '{self.name}': no time left to score {len(images)} image(s)")
        digests = digests or [image_digest(image) for image in images]
        ready = handover(images)
        done = self.loop.call(lambda: submit(self.loop, self.spec.prompt, self.loop.adopt(images, ready), None,
                                             digests))
        try:
            return done.result(timeout=timeout)
        except TimeoutError:
            self.loop.call(lambda: [self.engine.cancel(i) for i in done.request_ids])
            raise TimeoutError(f"vlm stage '{self.name}': scoring {len(images)} image(s) took over {timeout:g} s"
                               ) from None

    def score_timeout(self, deadline: float | None) -> float:
        """Seconds scoring may wait: what is left before the deadline, within the stage's time budget."""
        left = REQUEST_DEADLINE_S if deadline is None else max(0.0, deadline - time.monotonic())
        return left if self.time_budget_s is None else min(left, self.time_budget_s)

    def explain(self, images: list[torch.Tensor], roadwork: list[bool], sampling: SamplingParams | None = None,
                digests: list[int] | None = None) -> list[VLMAnswer]:
        """The explain prompt's greedy answer for each image (up to max_explain_tokens), opening with the
        cascade's decision about it (`roadwork`, per image); blocks until done."""
        assert len(roadwork) == len(images), (len(roadwork), len(images))
        sampling = sampling or self.explain_sampling
        digests = digests or [image_digest(image) for image in images]
        ready = handover(images)
        prefixes = [answer_prefix(self.engine, r) for r in roadwork]
        return self.loop.call(lambda: submit(self.loop, self.spec.explain_prompt, self.loop.adopt(images, ready),
                                             sampling, digests, prefixes)).result()

    def explain_stream(self, image: torch.Tensor, roadwork: bool, on_output: Callable[[VLMOutput], None]) -> int:
        """Start explaining one image the cascade decided `roadwork` about (the answer opens with that decision);
        returns its request id. `on_output` runs on the vlm loop thread; if it raises, the request is cancelled."""
        digest, ready, prefix = image_digest(image), handover([image]), answer_prefix(self.engine, roadwork)

        def start() -> int:
            [adopted] = self.loop.adopt([image], ready)
            return start_stream(self.loop, self.spec.explain_prompt, adopted, digest, self.explain_sampling, prefix,
                                on_output)

        return self.loop.call(start)

    def cancel(self, request_id: int) -> bool:
        """End an explain_stream request and free its KV blocks before returning; False if it is unknown or done."""
        return self.loop.cancel_stream(request_id)

    def stats(self) -> dict:
        """KV blocks, sequences, and token counters (cumulative since warmup), as of now."""
        return self.loop.stats()

    def warmup(self, pools: GraphPools | None = None) -> None:
        """Score and explain one image, so the first real request finds every kernel compiled (its decode graphs
        keep a pool of their own); the token counters start after it."""
        image = torch.full((*WARMUP_IMAGE, 3), 128, dtype=torch.uint8)
        self.score([image])
        self.explain([image], [True], SamplingParams(max_new_tokens=2, ignore_eos=True))
        self.loop.reset_counters()

    def close(self) -> None:
        """Stop the loop thread; requests in flight end (streams with finish_reason "cancelled"). Then release the
        decode graphs, which only that thread replays."""
        self.loop.close()
        if self.engine.runner.decode_graphs is not None:
            self.engine.runner.decode_graphs.close()

    def describe(self) -> dict:
        s = self.spec
        return {"name": self.name, "kind": "vlm", "model": str(s.model), "model_type": MODEL_TYPE,
                "device": str(self.device), "prompt": s.prompt, "yes_token": s.yes_token, "no_token": s.no_token,
                "explain_prompt": s.explain_prompt, "explain_above": s.explain_above,
                "max_explain_tokens": s.max_explain_tokens, "kv_cache_gb": s.kv_cache_gb,
                "dtype": str(self.dtype).removeprefix("torch."), "kv_cache_dtype": s.kv_cache_dtype,
                "kv_blocks": self.kv_blocks,
                "block_size": self.engine.config.block_size, "max_num_seqs": s.max_num_seqs,
                "time_budget_ms": s.time_budget_ms, "breaker": self.breaker.state,
                "decode_attention": self.engine.runner.attention_backend,
                "decode_attention_note": self.engine.runner.attention_note}
