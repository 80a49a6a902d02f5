"""Where the miner's forward gets its prediction: the roadwork server over HTTP, or an Engine in this process.
Both answer a float in [0, 1] or raise Failure; neither waits past the deadline given."""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

if TYPE_CHECKING:
    from runtime.cascade.settings import EngineSettings

log = logging.getLogger(__name__)


class Failure(Exception):
    """No prediction: `status` goes back to the caller as the synapse's status code, `reason` labels the metric."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _prediction(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise Failure(502, "bad_answer", f"{source} answered prediction={value!r}, not a number in [0, 1]")
    return float(value)


class ServerBackend:
    """POSTs the synapse's base64 image to `{url}/v1/predict` over one keep-alive session (made on the Axon's event
    loop at first use). A request past its deadline is dropped, which cancels it on the server."""

    def __init__(self, url: str, connections: int = 64) -> None:
        self.url = url.rstrip("/")
        self.endpoint = self.url + "/v1/predict"
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.loop = asyncio.get_running_loop()
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.connections))
        assert self.loop is asyncio.get_running_loop(), "one session, one event loop"
        return self.session

    async def predict(self, image_b64: str, timeout_s: float) -> float:
        if timeout_s <= 0:
            raise Failure(504, "timeout", "no time left before the caller's deadline")
        try:
            async with self._session().post(self.endpoint, data=orjson.dumps({"image": image_b64}),
                                            headers={"Content-Type": "application/json"},
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                status, body = response.status, await response.read()
        except asyncio.TimeoutError:
            raise Failure(504, "timeout", f"the server at {self.url} did not answer within {timeout_s:.2f} s") from None
        except aiohttp.ClientError as e:
            raise Failure(503, "server_unreachable", f"cannot reach the server at {self.url}: {e}") from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise Failure(502, "server_error", f"the server answered {status} with a body that is not a JSON object")
        if status == 200:
            return _prediction(answer.get("prediction"), "the server")
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        message = f"the server answered {status} {error.get('code', '')}: {error.get('message', '')}".rstrip(": ")
        if status in (400, 413, 422):
            raise Failure(400, "bad_image", message)
        if status == 504:
            raise Failure(504, "timeout", message)
        raise Failure(502, "server_error", message)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class EngineBackend:
    """An Engine loaded in this process, one image at a time on one worker thread. For batching across callers and
    the result cache, run the server and use ServerBackend instead."""

    def __init__(self, settings: EngineSettings) -> None:
        # The engine's modules are imported here only: `python -m miner --server-url` never loads torch.
        from runtime.image_decode import ImageDecodeError, decode_image
        from server.payload import decode_base64_image
        from server.errors import ApiError

        self._decode_image, self._decode_error = decode_image, ImageDecodeError
        self._decode_base64, self._api_error = decode_base64_image, ApiError
        self.engine = settings.load()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="miner-engine")
        self.url = f"engine:{settings.model}"

    def warmup(self) -> None:
        self.worker.submit(self.engine.warmup).result()

    def _predict(self, image_b64: str) -> float:
        try:
            image = self._decode_image(self._decode_base64(image_b64, "image"))
        except self._api_error as e:
            raise Failure(400, "bad_image", e.message) from None
        except self._decode_error as e:
            raise Failure(400, "bad_image", str(e)) from None
        try:
            [result] = self.engine.predict([image])
        except Exception as e:
            log.exception("engine prediction failed")
            raise Failure(500, "inference_failed", f"the engine failed on this image: {e}") from None
        return _prediction(result.prediction, "the engine")

    async def predict(self, image_b64: str, timeout_s: float) -> float:
        if timeout_s <= 0:
            raise Failure(504, "timeout", "no time left before the caller's deadline")
        work = asyncio.get_running_loop().run_in_executor(self.worker, self._predict, image_b64)
        try:
            return await asyncio.wait_for(work, timeout_s)
        except TimeoutError:
            raise Failure(504, "timeout", f"the engine did not answer within {timeout_s:.2f} s") from None

    async def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
