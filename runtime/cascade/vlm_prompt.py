"""A VLM stage's prompts as engine requests, on the vlm loop thread: one request per image, scoring (P(yes) of the
first answer token) or explaining (greedy text forced to open with the cascade's decision, the yes or no token, so
it never contradicts the label), and their outputs turned into the stage's answers."""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.cascade.results import TokenCounts
from runtime.cascade.vlm_loop import VLMLoop
from runtime.vlm.engine import RequestOutput, VLMEngine
from runtime.vlm.sequence import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLMOutput:
    """One step of an explanation stream, handed to its consumer on the vlm loop thread."""
    text: str  # new text since the previous output
    finished: bool
    finish_reason: str | None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class VLMAnswer:
    p: float | None  # P(yes) / (P(yes) + P(no)) for a scoring request, None for an explanation
    text: str  # the explanation ("" for a scoring request)
    tokens: TokenCounts


def answer_prefix(engine: VLMEngine, roadwork: bool) -> tuple[int, ...]:
    """What an explanation is forced to open with: the yes token for a roadwork decision, else the no token.
    The bundled VLM was trained to open its explanations so ("Yes: ..." / "No roadwork: ...", train/vlm.py),
    and continues from the forced token: decision first, then the words that go with it."""
    assert engine.score_token_ids is not None, "a vlm stage scores, so its model has a tokenizer"
    yes, no = engine.score_token_ids
    return (yes if roadwork else no,)


def submit(loop: VLMLoop, prompt: str, images: list[torch.Tensor], sampling: SamplingParams | None,
           digests: list[int], prefixes: list[tuple[int, ...]] | None = None) -> Future:
    """Queue one request per image (sampling None: scoring; else each answer opens with its `prefixes` entry);
    the future resolves to their VLMAnswers when all have finished. Its request_ids are the requests queued."""
    done: Future = Future()
    done.request_ids = []
    if not images:
        done.set_result([])
        return done
    finals: dict[int, RequestOutput] = {}
    texts: dict[int, list[str]] = {}
    ids: list[int] = []

    def collect(out: RequestOutput) -> None:
        loop.account(out)
        texts.setdefault(out.request_id, []).append(out.text)
        if not out.finished or done.done():
            return
        finals[out.request_id] = out
        if out.finish_reason == "cancelled":
            done.set_exception(RuntimeError(loop.abort[1] if loop.abort else "request cancelled"))
        elif len(finals) == len(ids):
            done.set_result([VLMAnswer(finals[i].p_yes, "".join(texts[i]), tokens_of(finals[i])) for i in ids])

    try:
        for image, digest, prefix in zip(images, digests, prefixes or [()] * len(images)):
            ids.append(loop.engine.add_request(prompt, [image], sampling=sampling, score=sampling is None,
                                               on_output=collect, digests=[digest], answer_prefix=prefix))
        done.request_ids = ids
    except Exception as e:
        done.set_exception(e)  # first: the cancellations below must not resolve it otherwise
        for request_id in ids:
            loop.engine.cancel(request_id)
    return done


def start_stream(loop: VLMLoop, prompt: str, image: torch.Tensor, digest: int, sampling: SamplingParams,
                 prefix: tuple[int, ...], on_output: Callable[[VLMOutput], None]) -> int:
    """Queue one explanation whose outputs go to `on_output` as they come; returns its request id. If on_output
    raises, the request is cancelled after the step."""
    def forward(out: RequestOutput) -> None:
        loop.account(out)
        if out.finished:
            loop.streams.discard(out.request_id)
        reason = loop.abort[0] if loop.abort and out.finish_reason == "cancelled" else out.finish_reason
        try:
            on_output(VLMOutput(out.text, out.finished, reason, out.num_prompt_tokens, out.num_cached_tokens,
                                out.num_generated_tokens))
        except Exception:
            log.exception("vlm stage '%s': the consumer of stream %d raised; cancelling it", loop.name,
                          out.request_id)
            if not out.finished:
                loop.to_cancel.append(out.request_id)

    request_id = loop.engine.add_request(prompt, [image], sampling=sampling, on_output=forward, digests=[digest],
                                         answer_prefix=prefix)
    loop.streams.add(request_id)
    return request_id


def tokens_of(out: RequestOutput) -> TokenCounts:
    return TokenCounts(prompt=out.num_prompt_tokens, cached=out.num_cached_tokens, generated=out.num_generated_tokens)
