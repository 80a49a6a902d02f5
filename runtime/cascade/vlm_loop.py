"""The "vlm loop" thread of a VLM stage: it alone owns the VLMEngine and calls add_request / step / cancel; every
other thread posts a command to its queue and waits on a future. So the cascade's scoring calls (the worker
thread) and the server's explanation streams interleave in the engine's continuous batches.

On CUDA the loop runs on its own stream, so the vision worker's kernels and host reads never queue behind the
VLM's (or the other way round); an image tensor another thread hands over on CUDA is waited for with an event
and recorded on the loop's stream."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from runtime.vlm.engine import RequestOutput, VLMEngine

log = logging.getLogger(__name__)


class StageClosed(RuntimeError):
    """The stage was closed (Engine.close): it takes no more requests."""


@dataclass
class Command:
    run: Callable[[], Any]
    future: Future


class VLMLoop:
    def __init__(self, engine: VLMEngine, name: str, device: torch.device):
        self.engine, self.name, self.device = engine, name, device
        # Everything below is touched by the loop thread only, except `closed` and the queue (under `lock`).
        self.commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()  # None: stop
        self.lock = threading.Lock()
        self.closed = False
        self.streams: set[int] = set()  # explain_stream requests: the ones cancel_stream() may end
        self.to_cancel: list[int] = []  # streams whose consumer raised; cancelled after the step
        self.started: set[int] = set()  # requests whose prefill ran (their prompt tokens are counted)
        self.counters = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        self.abort: tuple[str, str] | None = None  # (finish_reason, why) while in-flight requests are being ended
        self.final_stats: dict | None = None
        # The loop's own stream; it first waits for the loading and graph capture queued on this thread's stream.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.thread = threading.Thread(target=self._loop, name=f"vlm loop ({name})", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------------------------
    # Any thread
    # ------------------------------------------------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
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

    def cancel_stream(self, request_id: int) -> bool:
        """End a stream request and free its KV blocks before returning; False if it is unknown or done."""
        try:
            return self.call(lambda: request_id in self.streams and self.engine.cancel(request_id))
        except StageClosed:  # closing ended every request
            return False

    def stats(self) -> dict:
        """KV blocks, sequences, and token counters, as of now."""
        try:
            return self.call(self._stats)
        except StageClosed:
            self.thread.join()  # final_stats is written before the thread ends
            return dict(self.final_stats or {})

    def reset_counters(self) -> None:
        self.call(lambda: self.counters.update(dict.fromkeys(self.counters, 0)))

    def close(self) -> None:
        """Stop the thread; requests in flight end (streams with finish_reason "cancelled")."""
        assert threading.current_thread() is not self.thread, "close() from the vlm loop thread would deadlock"
        with self.lock:
            if not self.closed:
                self.closed = True
                self.commands.put(None)
        self.thread.join()

    # ------------------------------------------------------------------------------------------------------------
    # The loop thread
    # ------------------------------------------------------------------------------------------------------------

    def adopt(self, images: list[torch.Tensor], ready: list[torch.cuda.Event | None]) -> list[torch.Tensor]:
        """Make the loop's stream wait for CUDA images another thread's stream produced, and tell the caching
        allocator they are in use on it."""
        for image, event in zip(images, ready):
            if event is not None and self.stream is not None:
                self.stream.wait_event(event)
                image.record_stream(self.stream)
        return images

    def account(self, out: RequestOutput) -> None:
        # A request's first output follows its prefill, unless it was cancelled before one ran.
        if out.request_id not in self.started and out.finish_reason != "cancelled":
            self.started.add(out.request_id)
            self.counters["prompt_tokens"] += out.num_prompt_tokens
            self.counters["cached_tokens"] += out.num_cached_tokens
        self.counters["generated_tokens"] += len(out.new_token_ids)
        if out.finished:
            self.started.discard(out.request_id)

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
