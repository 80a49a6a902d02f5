"""Server-sent events for /v1/predict/stream: event framing over an aiohttp StreamResponse, and one
Engine.explain_stream request seen from the event loop (outputs through a queue, cancelled when left early), and
the result it explains."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from aiohttp import web

from runtime.cascade.results import TokenCounts, add_tokens
from server.errors import ApiError
from server.logs import REQUEST_ID

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine

log = logging.getLogger(__name__)


class EventStream:
    """text/event-stream: `event: <name>` and one line of JSON `data:` per event. Headers go out on open(); a
    client that has gone away makes send() raise ConnectionResetError."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        # no-cache and X-Accel-Buffering: proxies (nginx) must pass each event on as it comes, not buffer them.
        # X-Request-ID here: the middleware cannot add it once the stream's headers are sent.
        self.response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                    "X-Request-ID": REQUEST_ID.get()})
        self.response.content_type = "text/event-stream"

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, event: str, data: dict) -> None:
        await self.response.write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    async def close(self) -> None:
        await self.response.write_eof()


class Explanation:
    """`async with Explanation(engine, image, roadwork, idle_s) as e: async for out in e: ...` streams one
    explanation of an image the cascade labelled roadwork (True) or none; its first text is that forced answer.

    Engine.explain_stream and Engine.cancel block until the VLM loop thread takes the command, so both run on an
    executor thread. Leaving the block before the last output (client gone, error, timeout) cancels the request
    and waits until the runtime has freed its KV blocks."""

    def __init__(self, engine: Engine, image: np.ndarray, roadwork: bool, idle_s: float) -> None:
        self.engine = engine
        self.image = image
        self.roadwork = roadwork
        self.idle_s = idle_s
        self.final: Any | None = None  # the output with finished=True, once it came
        self._loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._started: asyncio.Future | None = None

    def _on_output(self, output: Any) -> None:
        """Called on the VLM loop thread."""
        self._loop.call_soon_threadsafe(self._outputs.put_nowait, output)

    async def __aenter__(self) -> Explanation:
        self._started = self._loop.run_in_executor(None, self.engine.explain_stream, self.image, self.roadwork,
                                                   self._on_output)
        try:
            await asyncio.shield(self._started)  # a cancel here must still learn the request id, to cancel it
        except asyncio.CancelledError:
            await self._cancel()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.final is None:
            await self._cancel()

    def __aiter__(self) -> Explanation:
        return self

    async def __anext__(self) -> Any:
        """The next output; TimeoutError when the runtime sends nothing for idle_s."""
        if self.final is not None:
            raise StopAsyncIteration
        output = await asyncio.wait_for(self._outputs.get(), self.idle_s)
        if output.finished:
            self.final = output
        return output

    async def _cancel(self) -> None:
        assert self._started is not None
        try:
            request_id = await self._started
        except Exception:
            return  # explain_stream itself failed: there is no request to cancel
        cancelled = await self._loop.run_in_executor(None, self.engine.cancel, request_id)
        log.debug("explanation request %d cancelled (%s)", request_id, "freed" if cancelled else "already done")


async def explain_result(engine: Engine, image: np.ndarray, result: Any, idle_s: float,
                         events: EventStream | None = None) -> Any:
    """Engine.explain_stream's text (as token events, given `events`, each within `idle_s`); the result with its
    explanation and all of its tokens. Asked for after the cascade decided: the explanation opens with the result's
    label (the yes or no token), the first token event included, so it cannot contradict the answer it comes with."""
    pieces: list[str] = []
    try:
        async with Explanation(engine, image, result.label == "roadwork", idle_s) as explanation:
            async for output in explanation:
                if output.text:
                    pieces.append(output.text)
                    if events is not None:
                        await events.send("token", {"text": output.text})
    except TimeoutError:
        raise ApiError(504, "explanation_timeout", f"the explanation produced nothing for {idle_s:g} s") from None
    except (ApiError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request %s: explanation failed", REQUEST_ID.get())
        raise ApiError(500, "explanation_failed", f"the vlm stage failed to explain this image; request id "
                                                  f"{REQUEST_ID.get()}") from None
    final = explanation.final
    if final.finish_reason == "error":
        raise ApiError(500, "explanation_failed",
                       "the vlm stage failed while explaining this image; see the server log")
    if final.finish_reason == "cancelled":  # not by us: the engine was closed under the stream
        raise ApiError(503, "shutting_down", "the vlm stage stopped before the explanation finished")
    # The VLM may have scored this image too: both requests' tokens count.
    counts = add_tokens(result.tokens, TokenCounts(prompt=final.prompt_tokens, cached=final.cached_tokens,
                                                   generated=final.generated_tokens))
    return dataclasses.replace(result, explanation="".join(pieces), tokens=counts)
