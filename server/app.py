"""The aiohttp application: its routes (server/routes.py, server/kserve.py, server/openapi.py), the middleware that
gives every request an id, metrics and JSON errors, and the site that serves it."""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid
from typing import TYPE_CHECKING, Callable

import orjson
from aiohttp import web

from server.config import ServerConfig
from server.errors import ApiError, error_response_for, from_http_exception
from server.guard import CappedRunner
from server.kserve import add_kserve_routes
from server.logs import ACCESS_LOG_FORMAT, REQUEST_ID
from server.openapi import add_openapi_route
from server.routes import add_routes
from server.service import SERVICE, Service

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine

log = logging.getLogger(__name__)
request_log = logging.getLogger("server.requests")


# A client's own X-Request-ID is kept (echoed, and in our log lines) when it is short and plain: it goes into logs
# and headers, so no control characters, spaces or quotes. Anything else gets a new id.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


@web.middleware
async def observe(request: web.Request, handler: Callable) -> web.StreamResponse:
    """JSON errors for every failure, plus per-request metrics and a structured debug line."""
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    request_id = request_id_of(request)
    REQUEST_ID.set(request_id)  # this task's context: the handler and what it awaits
    try:
        try:
            response = await handler(request)
        except ApiError as e:
            response = error_response_for(request.path)(e, request_id if e.status >= 500 else None)
        except web.HTTPException as e:
            response = error_response_for(request.path)(from_http_exception(e))
        except asyncio.CancelledError:
            status = 499  # client closed the connection before the answer
            raise
        except Exception:
            log.exception("request %s: unhandled error on %s %s", request_id, request.method, request.path)
            response = error_response_for(request.path)(ApiError(500, "internal_error", "internal server error"),
                                                        request_id)
        if not response.prepared:
            response.headers["X-Request-ID"] = request_id
        status = response.status
        return response
    finally:
        took = time.perf_counter() - start
        server_metrics = request.app[SERVICE].metrics
        server_metrics.requests.labels(route, str(status)).inc()
        server_metrics.request_latency.labels(route).observe(took)
        if request_log.isEnabledFor(logging.DEBUG):
            request_log.debug(orjson.dumps({"request_id": request_id, "method": request.method, "route": route,
                                            "status": status, "ms": round(took * 1e3, 3),
                                            "bytes_in": request.content_length, "remote": request.remote}).decode())


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port), not yet listening: taken before the model loads, so a busy
    port fails the start at once, and connections are refused, not left waiting, until the server listens."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own sites do
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def start_site(app: web.Application, host: str, port: int, access_log: bool = False,
                     shutdown_timeout_s: float = 30.0, sock: socket.socket | None = None
                     ) -> tuple[web.AppRunner, str, int]:
    """Start serving app on host:port (0 picks a free port), or on `sock` (bind_socket's) when given; returns the
    runner and the bound address.

    Slow clients: aiohttp's keep-alive timer runs from the moment a connection opens until a request's headers are
    complete, so keepalive_timeout_s bounds silent sockets, trickled headers and idle keep-alive alike; bodies must
    arrive within the request deadline (_body); connections are capped in all and per address (server/guard.py)."""
    service = app[SERVICE]
    config = service.config
    runner = CappedRunner(app, service.connections,
                          handler_cancellation=True,  # a client that hangs up cancels its handler
                          access_log=logging.getLogger("aiohttp.access") if access_log else None,
                          access_log_format=ACCESS_LOG_FORMAT,
                          shutdown_timeout=shutdown_timeout_s, keepalive_timeout=config.keepalive_timeout_s)
    await runner.setup()
    try:
        await (web.TCPSite(runner, host, port) if sock is None else web.SockSite(runner, sock)).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, bound_host, bound_port


def create_app(engine: Engine, config: ServerConfig) -> web.Application:
    """One app serving one loaded Engine; warmup starts with the app and /readyz turns 200 when it ends."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[observe])
    service = Service(engine, config)
    app[SERVICE] = service
    add_routes(app)
    add_openapi_route(app)
    add_kserve_routes(app, service)

    async def on_startup(_: web.Application) -> None:
        await service.start()

    async def on_shutdown(_: web.Application) -> None:
        service.ready = False  # load balancers stop routing here while in-flight requests finish
        service.metrics.ready.set(0)
        service.batcher.drain()  # nothing waits for a batch to fill any more

    async def on_cleanup(_: web.Application) -> None:
        await service.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
