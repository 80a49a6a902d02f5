"""The VLM stage: a Qwen3-VL answers the bundle's prompt for the images earlier stages left undecided, and writes
explanations (runtime/vlm/engine.py does the model work). An explanation is asked for once the cascade has decided,
and its answer is forced to open with that decision (the yes or no token), so it never contradicts the label.

One "vlm loop" thread owns the VLMEngine and alone calls add_request / step / cancel; every other thread posts a
command to its queue and waits on a future. So the cascade's scoring calls (the worker thread) and the server's
explanation streams interleave in the engine's continuous batches. Before anything is allocated, the weights and
the KV pool are checked against the device's free memory, so a bundle that does not fit fails at startup.

On CUDA the loop runs on its own stream, so the vision worker's kernels and host reads never queue behind the
VLM's (or the other way round); an image tensor another thread hands over on CUDA is waited for with an event
and recorded on the loop's stream. Images are hashed (the prefix-cache key) on the caller's thread, from the host
copy the cascade holds anyway."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from runtime.cascade.breaker import Breaker
from runtime.cascade.bundle import VLMStageSpec
from runtime.cascade.results import StageAnswer, TokenCounts
from runtime.cascade.stage import ChunkImages, GraphPools
from runtime.config import read_json
from runtime.errors import ModelLoadError
from runtime.vlm.kv_cache import KVCacheSpec
from runtime.models.qwen3_vl import MODEL_TYPE, Qwen3VLConfig
from runtime.models.qwen3_vl_text import TextConfig
from graphs.runner import default_buckets
from runtime.vlm.attention import FLASHINFER_WORKSPACE_BYTES, choose_decode_backend, flashinfer_module
from runtime.vlm.sequence import SamplingParams, image_digest
from runtime.vlm.engine import RequestOutput, VLMEngine, VLMEngineConfig
from runtime.models import precision
from runtime.models.precision import Candidate, PrecisionChoice
from runtime.models.quantized_linear import loaded_weight_bytes

log = logging.getLogger(__name__)

GIB = 2 ** 30
MAX_MODEL_LEN = 4096  # prompt + explanation tokens of one sequence (at most the model's max_position_embeddings)
WARMUP_IMAGE = (224, 224)  # the validators' image size
SCORE_TIMEOUT_S = 9.0  # the validators' timeout: the longest scoring may block the inference worker
DTYPE_BUDGET_S = 0.1  # timing rounds of fp32 and bf16 at the VLM's decode products, when its dtype is auto


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


class StageClosed(RuntimeError):
    """The stage was closed (Engine.close): it takes no more requests."""


@dataclass
class Command:
    run: Callable[[], Any]
    future: Future


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: CUDA's free bytes, or MemAvailable for the CPU (None where it is not known)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_config(spec: VLMStageSpec, where: str) -> Qwen3VLConfig:
    try:
        return Qwen3VLConfig.from_dict(read_json(spec.model / "config.json"))
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {spec.model}: {e} (a vlm stage needs a '{MODEL_TYPE}' model)") from e


def engine_config(spec: VLMStageSpec, where: str, device: torch.device, dtype: torch.dtype) -> VLMEngineConfig:
    """The engine's config, after checking that weights + KV pool fit the device (nothing allocated yet)."""
    cfg = read_config(spec, where)
    text = cfg.text
    config = VLMEngineConfig(kv_cache_bytes=int(spec.kv_cache_gb * GIB),
                             max_model_len=min(MAX_MODEL_LEN, text.max_position_embeddings),
                             max_num_seqs=spec.max_num_seqs, yes_token=spec.yes_token, no_token=spec.no_token,
                             kv_cache_dtype=spec.kv_cache_dtype)
    kv_dtype = torch.int8 if spec.kv_cache_dtype == "int8" else dtype
    kv = KVCacheSpec(text.num_layers, text.num_kv_heads, text.head_dim, config.block_size, kv_dtype)
    one_seq = -(-config.max_model_len // config.block_size) * kv.bytes_per_block
    if config.kv_cache_bytes < one_seq:
        raise ModelLoadError(f"{where}: key 'kv_cache_gb' = {spec.kv_cache_gb} is less than one "
                             f"{config.max_model_len}-token sequence needs ({one_seq / GIB:.4g} GiB of {kv_dtype} keys "
                             f"and values); raise it")
    pool = kv.num_blocks(config.kv_cache_bytes, config.max_model_len) * kv.bytes_per_block
    weights = loaded_weight_bytes(spec.model, dtype, cfg.tie_word_embeddings, device)
    extra = runtime_bytes(cfg, config, device, dtype)
    free = free_bytes(device)
    if free is None:
        log.warning("%s: free memory on %s is unknown; not checking that the VLM fits", where, device)
    elif weights + pool + extra > free:
        raise ModelLoadError(
            f"{where}: the VLM does not fit on {device}: weights {weights / GIB:.3g} GiB ({dtype}) + KV cache "
            f"{pool / GIB:.3g} GiB (key 'kv_cache_gb' = {spec.kv_cache_gb})"
            + (f" + decode workspace and graph outputs {extra / GIB:.3g} GiB" if extra else "")
            + f" = {(weights + pool + extra) / GIB:.3g} GiB, but only {free / GIB:.3g} GiB is free; lower "
            f"kv_cache_gb (one {config.max_model_len}-token sequence needs {one_seq / GIB:.3g} GiB), or put the stage "
            f"on another device (key 'device')")
    log.info("%s: weights %.3g GiB + KV cache %.3g GiB + decode workspace and graph outputs %.3g GiB on %s (%s GiB "
             "free)", where, weights / GIB, pool / GIB, extra / GIB, device,
             "unknown" if free is None else f"{free / GIB:.3g}")
    return config


def runtime_bytes(cfg: Qwen3VLConfig, config: VLMEngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Device memory the engine holds besides weights and KV cache: flashinfer's float workspace when it will be
    chosen, and on CUDA the decode graphs' logits (each bucket keeps its float32 (bucket, vocab) output; the
    largest bucket's model-dtype logits are the biggest temporary in their shared pool). Other graph temporaries
    are per-token activations, small next to these, and not counted."""
    if device.type != "cuda":
        return 0
    text = cfg.text
    total = 0
    if choose_decode_backend(device, dtype, text.head_dim, flashinfer_module() is not None,
                             text.num_heads // text.num_kv_heads) == "flashinfer":
        total += FLASHINFER_WORKSPACE_BYTES
    buckets = default_buckets(config.max_num_seqs)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return total + text.vocab_size * (4 * sum(buckets) + itemsize * buckets[-1])


def run_dtype(spec: VLMStageSpec, where: str, device: torch.device, engine_dtype: torch.dtype,
              choice: PrecisionChoice | None) -> torch.dtype:
    """The VLM's dtype: cascade.toml's `dtype`, or for "auto" the engine's dtype, except where that came from
    precision auto on a CPU: then bf16 if it measures faster than fp32 at the VLM's own decode products (its text
    layers at max_num_seqs rows). The classifier's choice can be fp32 for an int8 kernel, for its drift or for its
    narrow shapes, while a VLM is published in bf16 and decodes ~1.6x faster in it where bf16 is native
    (BENCHMARKS.md section 8)."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)  # a torch dtype name (bundle.py checked it)
    if device.type != "cpu" or choice is None or choice.how != "auto" or engine_dtype == torch.bfloat16:
        return engine_dtype
    bf16 = Candidate(torch.bfloat16)
    speeds = precision.measure_speed([precision.FP32, bf16], decode_linears(read_config(spec, where).text),
                                     spec.max_num_seqs, DTYPE_BUDGET_S)
    speedup = None if speeds[bf16] is None else speeds[precision.FP32] / speeds[bf16]
    chosen = torch.bfloat16 if speedup is not None and speedup >= precision.MIN_SPEEDUP else engine_dtype
    log.info("%s: the VLM runs in %s (bf16 %s fp32 at its decode products)", where, chosen,
             f"over {precision.PROBE_SLOWER:g}x slower than" if speedup is None else f"x{speedup:.2f}")
    return chosen


def decode_linears(text: TextConfig) -> list[tuple[nn.Linear, int]]:
    """The text model's Linear layers (random weights), one per kind, with how many of them one decode step runs."""
    h, q, kv = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    i, n = text.intermediate_size, text.num_layers
    return [(nn.Linear(k, out, bias=False), count)
            for k, out, count in ((h, q, n), (h, kv, 2 * n), (q, h, n), (h, i, 2 * n), (i, h, n))]


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
        # Everything below is touched by the loop thread only, except `closed` and the queue (under `lock`).
        self.commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()  # None: stop
        self.lock = threading.Lock()
        self.closed = False
        self.streams: set[int] = set()  # explain_stream requests: the ones cancel() may end
        self.to_cancel: list[int] = []  # streams whose consumer raised; cancelled after the step
        self.started: set[int] = set()  # requests whose prefill ran (their prompt tokens are counted)
        self.counters = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        self.abort: tuple[str, str] | None = None  # (finish_reason, why) while in-flight requests are being ended
        self.final_stats: dict | None = None
        # The loop's own stream; it first waits for the loading and graph capture queued on this thread's stream.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.thread = threading.Thread(target=self._loop, name=f"vlm loop ({spec.name})", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------------------------
    # Any thread
    # ------------------------------------------------------------------------------------------------------------

    def run(self, pending: list[int], images: ChunkImages, want_boxes: bool) -> list[StageAnswer]:
        """The VLM decides every image it gets. It takes the host images (hashed here once, on the worker thread)
        and copies them to its own device as it preprocesses them."""
        host = [images.host[i] for i in pending]
        return [StageAnswer(a.p, tokens=a.tokens) for a in self.score(host, [image_digest(x) for x in host])]

    def score(self, images: list[torch.Tensor], digests: list[int] | None = None) -> list[VLMAnswer]:
        """P(roadwork) of each (H, W, 3) uint8 image, with its token counts; blocks until all are scored, at most
        the stage's time budget (else SCORE_TIMEOUT_S): past it the requests are cancelled and TimeoutError
        raised, so a VLM swamped by explanations cannot hold the inference worker. digests: their image_digest,
        if the caller has them (else they are computed here, on this thread)."""
        digests = digests or [image_digest(image) for image in images]
        ready = handover(images)
        done = self._call(lambda: self._submit(self.spec.prompt, self._adopt(images, ready), None, digests))
        try:
            return done.result(timeout=self.time_budget_s or SCORE_TIMEOUT_S)
        except TimeoutError:
            self._call(lambda: [self.engine.cancel(i) for i in done.request_ids])
            raise TimeoutError(f"vlm stage '{self.name}': scoring {len(images)} image(s) took over "
                               f"{self.time_budget_s or SCORE_TIMEOUT_S:g} s") from None

    def explain(self, images: list[torch.Tensor], roadwork: list[bool], sampling: SamplingParams | None = None,
                digests: list[int] | None = None) -> list[VLMAnswer]:
        """The explain prompt's greedy answer for each image (up to max_explain_tokens), opening with the
        cascade's decision about it (`roadwork`, per image); blocks until done."""
        assert len(roadwork) == len(images), (len(roadwork), len(images))
        sampling = sampling or self.explain_sampling
        digests = digests or [image_digest(image) for image in images]
        ready = handover(images)
        prefixes = [self.answer_prefix(r) for r in roadwork]
        return self._call(lambda: self._submit(self.spec.explain_prompt, self._adopt(images, ready), sampling,
                                               digests, prefixes)).result()

    def answer_prefix(self, roadwork: bool) -> tuple[int, ...]:
        """What an explanation is forced to open with: the yes token for a roadwork decision, else the no token.
        The bundled VLM was trained to open its explanations so ("Yes: ..." / "No roadwork: ...", train/vlm.py),
        and continues from the forced token: decision first, then the words that go with it."""
        assert self.engine.score_token_ids is not None, "a vlm stage scores, so its model has a tokenizer"
        yes, no = self.engine.score_token_ids
        return (yes if roadwork else no,)

    def explain_stream(self, image: torch.Tensor, roadwork: bool, on_output: Callable[[VLMOutput], None]) -> int:
        """Start explaining one image the cascade decided `roadwork` about (the answer opens with that decision);
        returns its request id. `on_output` runs on the vlm loop thread; if it raises, the request is cancelled."""
        def forward(out: RequestOutput) -> None:
            self._account(out)
            if out.finished:
                self.streams.discard(out.request_id)
            reason = self.abort[0] if self.abort and out.finish_reason == "cancelled" else out.finish_reason
            try:
                on_output(VLMOutput(out.text, out.finished, reason, out.num_prompt_tokens, out.num_cached_tokens,
                                    out.num_generated_tokens))
            except Exception:
                log.exception("vlm stage '%s': the consumer of stream %d raised; cancelling it", self.name,
                              out.request_id)
                if not out.finished:
                    self.to_cancel.append(out.request_id)

        digest, ready = image_digest(image), handover([image])

        def add() -> int:
            request_id = self.engine.add_request(self.spec.explain_prompt, self._adopt([image], ready),
                                                 sampling=self.explain_sampling, on_output=forward, digests=[digest],
                                                 answer_prefix=self.answer_prefix(roadwork))
            self.streams.add(request_id)
            return request_id

        return self._call(add)

    def cancel(self, request_id: int) -> bool:
        """End an explain_stream request and free its KV blocks before returning; False if it is unknown or done."""
        try:
            return self._call(lambda: request_id in self.streams and self.engine.cancel(request_id))
        except StageClosed:  # closing ended every request
            return False

    def stats(self) -> dict:
        """KV blocks, sequences, and token counters (cumulative since warmup), as of now."""
        try:
            return self._call(self._stats)
        except StageClosed:
            self.thread.join()  # final_stats is written before the thread ends
            return dict(self.final_stats or {})

    def warmup(self, pools: GraphPools | None = None) -> None:
        """Score and explain one image, so the first real request finds every kernel compiled (its decode graphs
        keep a pool of their own); the token counters start after it."""
        image = torch.full((*WARMUP_IMAGE, 3), 128, dtype=torch.uint8)
        self.score([image])
        self.explain([image], [True], SamplingParams(max_new_tokens=2, ignore_eos=True))
        self._call(lambda: self.counters.update(dict.fromkeys(self.counters, 0)))

    def close(self) -> None:
        """Stop the loop thread; requests in flight end (streams with finish_reason "cancelled"). Then release the
        decode graphs, which only that thread replays."""
        assert threading.current_thread() is not self.thread, "close() from the vlm loop thread would deadlock"
        with self.lock:
            if not self.closed:
                self.closed = True
                self.commands.put(None)
        self.thread.join()
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

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self.thread:  # e.g. Engine.cancel inside on_output: would wait forever
            raise RuntimeError(f"vlm stage '{self.name}': called from its own loop thread (inside an on_output "
                               f"callback); raise from on_output to cancel that stream instead")
        future: Future = Future()
        with self.lock:
            if self.closed:
                raise StageClosed(f"vlm stage '{self.name}' is closed")
            self.commands.put(Command(fn, future))
        return future.result()

    # ------------------------------------------------------------------------------------------------------------
    # The loop thread
    # ------------------------------------------------------------------------------------------------------------

    def _adopt(self, images: list[torch.Tensor], ready: list[torch.cuda.Event | None]) -> list[torch.Tensor]:
        """On the loop thread: make its stream wait for CUDA images another thread's stream produced, and tell the
        caching allocator they are in use on it."""
        for image, event in zip(images, ready):
            if event is not None and self.stream is not None:
                self.stream.wait_event(event)
                image.record_stream(self.stream)
        return images

    def _loop(self) -> None:
        with loop_scope(self.device, self.stream):
            try:
                while self._serve_commands(block=not self.engine.has_unfinished()):
                    if self.engine.has_unfinished():
                        self._step()
            finally:
                self._shutdown()

    def _serve_commands(self, block: bool) -> bool:
        """Run every queued command (waiting for one if `block`); False once told to stop."""
        try:
            command = self.commands.get(block=block)
        except queue.Empty:
            return True
        while command is not None:
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.run())
                except Exception as e:
                    command.future.set_exception(e)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:
            log.exception("vlm stage '%s': engine step failed; ending its %d request(s)", self.name,
                          len(self.engine.requests))
            self._end_all("error", f"vlm stage '{self.name}': engine step failed: {e!r}")
        while self.to_cancel:
            self.engine.cancel(self.to_cancel.pop())

    def _end_all(self, finish_reason: str, why: str) -> None:
        """Cancel every request in flight: blocks freed, waiting callers get RuntimeError(why)."""
        self.abort = (finish_reason, why)
        try:
            for request_id in list(self.engine.requests):
                self.engine.cancel(request_id)
        finally:
            self.abort = None

    def _shutdown(self) -> None:
        with self.lock:
            self.closed = True
        try:
            self._end_all("cancelled", f"vlm stage '{self.name}' is closed")
            self.final_stats = self._stats()
        finally:
            while True:  # commands posted before `closed` was set: fail them rather than leave callers waiting
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if command is not None and command.future.set_running_or_notify_cancel():
                    command.future.set_exception(StageClosed(f"vlm stage '{self.name}' is closed"))

    def _submit(self, prompt: str, images: list[torch.Tensor], sampling: SamplingParams | None,
                digests: list[int], prefixes: list[tuple[int, ...]] | None = None) -> Future:
        """Queue one request per image (sampling None: scoring; else each answer opens with its `prefixes` entry);
        the future resolves when all have finished."""
        done: Future = Future()
        done.request_ids = []  # score() cancels these when it stops waiting
        if not images:
            done.set_result([])
            return done
        finals: dict[int, RequestOutput] = {}
        texts: dict[int, list[str]] = {}
        ids: list[int] = []

        def collect(out: RequestOutput) -> None:
            self._account(out)
            texts.setdefault(out.request_id, []).append(out.text)
            if not out.finished or done.done():
                return
            finals[out.request_id] = out
            if out.finish_reason == "cancelled":
                done.set_exception(RuntimeError(self.abort[1] if self.abort else "request cancelled"))
            elif len(finals) == len(ids):
                done.set_result([VLMAnswer(finals[i].p_yes, "".join(texts[i]), tokens_of(finals[i])) for i in ids])

        try:
            for image, digest, prefix in zip(images, digests, prefixes or [()] * len(images)):
                ids.append(self.engine.add_request(prompt, [image], sampling=sampling, score=sampling is None,
                                                   on_output=collect, digests=[digest], answer_prefix=prefix))
            done.request_ids = ids
        except Exception as e:
            done.set_exception(e)  # first: the cancellations below must not resolve it otherwise
            for request_id in ids:
                self.engine.cancel(request_id)
        return done

    def _account(self, out: RequestOutput) -> None:
        # A request's first output follows its prefill, unless it was cancelled before one ran.
        if out.request_id not in self.started and out.finish_reason != "cancelled":
            self.started.add(out.request_id)
            self.counters["prompt_tokens"] += out.num_prompt_tokens
            self.counters["cached_tokens"] += out.num_cached_tokens
        self.counters["generated_tokens"] += len(out.new_token_ids)
        if out.finished:
            self.started.discard(out.request_id)

    def _stats(self) -> dict:
        s = self.engine.stats()
        return {"kv_blocks_total": s["num_blocks"], "kv_blocks_free": s["free_blocks"],
                "kv_blocks_used": s["num_blocks"] - s["free_blocks"], **self.counters,
                "running": s["running"], "waiting": s["waiting"], "preemptions": s["preemptions"]}


def handover(images: list[torch.Tensor]) -> list[torch.cuda.Event | None]:
    """On the calling thread: an event after the work its stream has queued for each CUDA image (None for host
    images), for the loop thread to wait on."""
    ready: list[torch.cuda.Event | None] = []
    for image in images:
        event = None
        if isinstance(image, torch.Tensor) and image.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(image.device))
        ready.append(event)
    return ready


def loop_scope(device: torch.device, stream: torch.cuda.Stream | None) -> contextlib.ExitStack:
    """What the loop thread runs under: its device current and its own stream (nothing on the CPU)."""
    scope = contextlib.ExitStack()
    if device.type == "cuda":
        scope.enter_context(torch.cuda.device(device))
        scope.enter_context(torch.cuda.stream(stream))
    return scope


def tokens_of(out: RequestOutput) -> TokenCounts:
    return TokenCounts(prompt=out.num_prompt_tokens, cached=out.num_cached_tokens, generated=out.num_generated_tokens)
