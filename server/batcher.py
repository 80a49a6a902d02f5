"""Dynamic batching: a bounded queue of decoded images in front of one inference worker thread per device.

An image waits until max_batch images are queued or the oldest has waited max_delay, then the batch runs in
Engine.predict on the worker thread while the event loop keeps accepting work. Images whose request gave up
(deadline passed, client gone) are dropped before they cost compute.

Admission counts images and bytes: an image holds its decode's estimated peak from admission until its decode
thread ends, and its decoded array's bytes from submit until its batch resolves. A batch that raises is split in
halves and retried, down to single images, so one image the model cannot take fails only itself.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from runtime.errors import InputError
from server.metrics import ServerMetrics

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine, ImageResult

log = logging.getLogger(__name__)


COST_SMOOTHING = 0.2  # weight of the newest batch in the per-image cost average: adapts within a few batches


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batcher loop stopped on a bug; requests will time out", exc_info=task.exception())


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class BatcherClosed(Exception):
    pass


class InferenceFailed(Exception):
    """The model failed on this image (`error`, for the log; clients see a generic message)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"model failed on this image: {error!r}")
        self.error = error


StageListener = Callable[[str, float, bool], None]  # (stage, p, decided), called on the event loop


@dataclass(eq=False)
class WorkItem:
    image: np.ndarray
    deadline: float                     # time.monotonic() after which nobody wants the answer
    enqueued_at: float
    future: asyncio.Future
    on_stage: StageListener | None = None  # hears each stage's decision as it happens (the stream endpoint)
    dropped: str | None = None          # why the requester gave up; written on the loop, read by the worker
    nbytes: int = 0                     # the decoded array's bytes, held against the admission budget
    stages_heard: set = field(default_factory=set)  # stages already relayed to on_stage (a retried batch repeats)


@dataclass
class Computed:
    result: ImageResult
    queue_wait_s: float
    compute_s: float
    batch_size: int


@dataclass
class _BatchRun:
    live: list[WorkItem]
    expired: list[WorkItem]             # deadline passed, requester still waiting: answer 504
    skipped: list[WorkItem]             # requester already gone
    started_at: float
    results: list[ImageResult | Exception] = field(default_factory=list)  # per live item: its result or error
    compute_s: float = 0.0
    retried: bool = False               # the whole batch raised and was split to isolate the failing images


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, max_delay_s: float, queue_size: int,
                 metrics: ServerMetrics, max_bytes: int = 1 << 40) -> None:
        assert max_batch > 0 and queue_size > 0 and max_delay_s >= 0 and max_bytes > 0
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.metrics = metrics
        self._queue: deque[WorkItem] = deque()
        self.max_bytes = max_bytes
        self._admitted = 0                  # images admitted but not yet queued (being decoded)
        self._bytes = 0                     # decodes' estimated peaks + queued and running images' arrays
        self._running = 0                   # images in the batch on the worker now
        self.image_cost_s: float | None = None  # moving average of compute seconds per image
        self._wakeup = asyncio.Event()
        # Engine.predict is not thread-safe: exactly one thread calls it (and warmup) for this device.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{engine.device}")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        assert self._task is None
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="batcher")
        self._task.add_done_callback(_log_crash)

    async def run_on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the inference thread, after whatever batches are already there (e.g. warmup)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def estimated_wait_s(self, count: int) -> float:
        """Seconds until `count` more images would be computed: everything ahead of them at the measured
        per-image cost (0 until the first batch is measured)."""
        backlog = len(self._queue) + self._admitted + self._running + count
        return backlog * (self.image_cost_s or 0.0)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def refusal(self, count: int, deadline: float, nbytes: int = 0) -> tuple[str, str] | None:
        """Why `count` images of `nbytes` would be refused now ((reason, message)), or None: asked before a body
        is read, so that overload is refused before it costs reading, parsing or decoding."""
        if self._closed:
            return "shutting_down", "server is shutting down"
        if len(self._queue) + self._admitted + count > self.queue_size:
            return "queue_full", (f"{len(self._queue)} images queued and {self._admitted} being decoded, of "
                                  f"{self.queue_size} allowed; {count} more do not fit")
        if nbytes and self._bytes + nbytes > self.max_bytes:
            return "memory_full", (f"{self._bytes / 2**20:.0f} MiB of images being decoded or queued, of "
                                   f"{self.max_bytes / 2**20:.0f} MiB allowed; {nbytes / 2**20:.1f} MiB more do not fit")
        wait_s, budget_s = self.estimated_wait_s(count), deadline - time.monotonic()
        # With nothing ahead, always try: that is also how an estimate inflated by one slow batch recovers.
        nothing_ahead = not (self._queue or self._admitted or self._running)
        if wait_s > budget_s and not nothing_ahead:
            return "deadline_unreachable", (f"estimated wait {wait_s:.2f} s exceeds the {budget_s:.2f} s left before "
                                            f"the deadline")
        return None

    def admit(self, count: int, deadline: float, nbytes: int = 0) -> None:
        """Reserve room for `count` images whose decodes may take `nbytes` at their peak, or raise: images being
        decoded count against the queue size like queued ones. Work that could not finish before its deadline is
        refused too: serving it would only make everyone late."""
        refused = self.refusal(count, deadline, nbytes)
        if refused is not None:
            reason, message = refused
            if reason == "shutting_down":
                raise BatcherClosed(message)
            self.metrics.queue_dropped.labels(reason).inc(count)
            raise QueueFull(message)
        self._admitted += count
        self._bytes += nbytes

    def release(self, count: int, nbytes: int = 0) -> None:
        """Give back admitted room once its decode thread has ended (the images are queued by then, or failed)."""
        self._admitted -= count
        self._bytes -= nbytes
        assert self._admitted >= 0 and self._bytes >= 0, (self._admitted, self._bytes)

    def submit(self, images: list[np.ndarray], deadline: float,
               on_stage: StageListener | None = None) -> list[WorkItem]:
        """Queue decoded images; they wait for a batch, their arrays' bytes held until it resolves. Images of
        different requests share batches, each keeping its own `on_stage`. The caller releases the images'
        admission when their decode threads end."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [WorkItem(image, deadline, now, loop.create_future(), on_stage, nbytes=image.nbytes)
                 for image in images]
        self._bytes += sum(item.nbytes for item in items)
        self._queue.extend(items)
        self._wakeup.set()
        return items

    def abandon(self, item: WorkItem, reason: str) -> None:
        """The requester stopped waiting: drop the item if still queued, else skip it if its batch not started."""
        if item.future.done() or item.dropped is not None:
            return
        item.dropped = reason
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already handed to the worker; it checks `dropped` right before computing
        self._bytes -= item.nbytes
        self.metrics.queue_dropped.labels(reason).inc()

    def drain(self) -> None:
        """Shutdown began: stop waiting for batches to fill, run what is queued at once."""
        self._draining = True
        self._wakeup.set()

    async def close(self) -> None:
        """Finish queued work, then stop the loop and the worker thread. The caller bounds how long this may take
        (--shutdown-timeout-s): the worker thread is not joined, so a batch still running cannot hold it up."""
        self._draining = True
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < self.max_batch and not self._draining:
                wait_s = self._queue[0].enqueued_at + self.max_delay_s - time.monotonic()
                if wait_s > 0:
                    self._wakeup.clear()
                    try:
                        async with asyncio.timeout(wait_s):
                            await self._wakeup.wait()
                    except TimeoutError:
                        pass
                    continue
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._running = len(batch)
            try:
                run = await asyncio.get_running_loop().run_in_executor(self._worker, self._compute, batch)
            finally:
                self._running = 0
            self._resolve(run)

    def _compute(self, batch: list[WorkItem]) -> _BatchRun:
        """Worker thread: skip what nobody waits for any more, then one Engine.predict call."""
        now = time.monotonic()
        run = _BatchRun([], [], [], now)
        for item in batch:  # `dropped` may change on the loop thread meanwhile: read it once per item
            if item.dropped is not None:
                run.skipped.append(item)
            elif item.deadline <= now:
                run.expired.append(item)
            else:
                run.live.append(item)
        if run.live:
            start = time.perf_counter()
            run.results = self._predict(run.live, run)
            run.compute_s = time.perf_counter() - start
        return run

    def _predict(self, live: list[WorkItem], run: _BatchRun) -> list[Any]:
        """One Engine.predict call; when it raises, each half again, down to single images: one ImageResult or
        exception per item, so an image the model cannot take fails alone, not its batch neighbours (whose
        requests may be other clients')."""
        listening = any(item.on_stage is not None for item in live)
        try:
            # Boxes cost only a post-processing step for detector-decided images; `?detail=1` shows them.
            # Explanations are decoded on the VLM's loop thread (server/service.py), never in the batch.
            return self.engine.predict([item.image for item in live], boxes=True,
                                       on_stage=self._stage_relay(live) if listening else None, auto_explain=False,
                                       deadline=max(item.deadline for item in live))
        except Exception as e:  # a model failure fails the failing image only; the server keeps serving
            if len(live) == 1:
                log.warning("Engine.predict failed on one image (%dx%d): %r", live[0].image.shape[1],
                            live[0].image.shape[0], e, exc_info=not isinstance(e, InputError))
                return [e]
            log.info("Engine.predict failed on a batch of %d images (%r); retrying in halves", len(live), e)
            run.retried = True
            half = len(live) // 2
            return self._predict(live[:half], run) + self._predict(live[half:], run)

    def _stage_relay(self, live: list[WorkItem]) -> Callable[[int, str, float, bool], None]:
        """Engine.predict reports stage decisions on the worker thread by batch index; each goes to its own
        request's listener on the event loop. call_soon_threadsafe keeps them ahead of the batch's resolution,
        which reaches the loop the same way but later."""
        loop = self._loop
        assert loop is not None

        def relay(index: int, stage: str, p: float, decided: bool) -> None:
            item = live[index]
            if item.on_stage is not None and stage not in item.stages_heard:
                item.stages_heard.add(stage)
                loop.call_soon_threadsafe(item.on_stage, stage, p, decided)

        return relay

    def _resolve(self, run: _BatchRun) -> None:
        m = self.metrics
        for item in run.skipped + run.expired + run.live:
            self._bytes -= item.nbytes
        for item in run.skipped:
            m.queue_dropped.labels(item.dropped).inc()
        for item in run.expired:
            m.queue_dropped.labels("deadline").inc()
            if not item.future.done() and item.dropped is None:
                item.future.set_exception(DeadlineExceeded("deadline passed before its batch started"))
        if not run.live:
            return
        assert len(run.results) == len(run.live), "Engine.predict must return one result per image"
        m.batch_size.observe(len(run.live))
        m.compute_latency.observe(run.compute_s)
        # Admission estimates what images cost to score. A batch that also decoded explanations took far longer,
        # and a retried one ran several times; counting them would refuse plain requests for a while after.
        computed = [r for r in run.results if not isinstance(r, BaseException)]
        if not run.retried and not any(result.explanation is not None for result in computed):
            per_image_s = run.compute_s / len(run.live)
            self.image_cost_s = per_image_s if self.image_cost_s is None else \
                self.image_cost_s + COST_SMOOTHING * (per_image_s - self.image_cost_s)
        for item, result in zip(run.live, run.results):
            wait_s = run.started_at - item.enqueued_at
            m.queue_wait.observe(wait_s)
            if item.future.done() or item.dropped is not None:
                continue
            if isinstance(result, InputError):
                item.future.set_exception(result)
            elif isinstance(result, BaseException):
                item.future.set_exception(InferenceFailed(result))
            else:
                m.stage_exits.labels(result.stage).inc()
                if result.degraded:
                    m.degraded.inc()
                item.future.set_result(Computed(result, wait_s, run.compute_s, len(run.live)))
