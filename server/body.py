"""Reading a request body only once the server would take the request, within its deadline and the global body
byte budget: shared by every route that takes a body (server/routes.py, server/kserve.py)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from aiohttp import web

from server.errors import RETRY_AFTER_S, ApiError

if TYPE_CHECKING:
    from server.service import Service


@contextlib.asynccontextmanager
async def read_body(request: web.Request, service: Service, deadline: float):
    """The request body, read only once the server would take the request, within its deadline and the global body
    byte budget (held while the caller parses it). Refusals close the connection, leaving the body unread."""
    length, limit = request.content_length, service.config.max_body_bytes
    if length is not None and length > limit:
        raise ApiError(413, "body_too_large", f"body of {length} bytes exceeds the {limit}-byte limit "
                                              f"(--max-body-mb)", close=True)
    await service.refuse_early(deadline, length)
    need = limit if length is None else length  # chunked: the most it may grow to
    if not service.bodies.take(need):
        raise ApiError(503, "busy_reading", f"the server is reading {service.bodies.held} bytes of request bodies, "
                                            f"its limit; retry", {"Retry-After": RETRY_AFTER_S}, close=True)
    try:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                body = await request.read()
        except TimeoutError:
            raise ApiError(408, "body_timeout", "the request body did not arrive within the request deadline",
                           close=True) from None
        yield body
    finally:
        service.bodies.give(need)
