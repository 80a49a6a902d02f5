"""Connection-level limits aiohttp does not have: a cap on open connections, in all and per client address, and a
byte budget for request bodies being read at once. Refusals are cheap: a fixed 503 written on the socket, which
is then closed, so nothing of the request is read."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger(__name__)


def _refusal(message: str) -> bytes:
    body = orjson.dumps({"error": {"code": "too_many_connections", "message": message}})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class ConnectionCap:
    def __init__(self, max_total: int, max_per_ip: int) -> None:
        assert max_total > 0 and max_per_ip > 0
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.per_ip: Counter[str] = Counter()
        self.total = 0
        self.refused = 0

    def open(self, ip: str) -> str | None:
        """Count a new connection from `ip`; returns why it is refused instead (not counted then)."""
        if self.total >= self.max_total:
            return f"the server has {self.total} connections open, its limit"
        if self.per_ip[ip] >= self.max_per_ip:
            return f"{self.per_ip[ip]} connections from your address are open, the limit per address"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def close(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
        assert self.total >= 0


class CappedHandler(RequestHandler):
    """aiohttp's per-connection protocol, counted against the server's ConnectionCap."""

    cap: ConnectionCap
    ip: str | None = None  # set once counted

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        why = self.cap.open(ip)
        if why is not None:
            self.cap.refused += 1
            log.debug("refused a connection from %s: %s", ip, why)
            transport.write(_refusal(why))
            transport.close()  # connection_lost follows; the handler never started, so it is a no-op
            return
        self.ip = ip
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.ip is not None:
            self.cap.close(self.ip)
            self.ip = None
        super().connection_lost(exc)


class CappedServer(Server):
    cap: ConnectionCap

    def __call__(self) -> RequestHandler:
        handler = CappedHandler(self, loop=self._loop, **self._kwargs)
        handler.cap = self.cap
        return handler


class CappedRunner(web.AppRunner):
    """An AppRunner whose connections are counted against `cap`."""

    def __init__(self, app: web.Application, cap: ConnectionCap, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.cap = cap

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        assert type(server) is Server, type(server)
        server.__class__ = CappedServer  # the same object with one method more: aiohttp builds it with the app
        server.cap = self.cap
        return server


class ByteBudget:
    """Bytes of request bodies being read and parsed at once, so that many large bodies cannot add up."""

    def __init__(self, limit: int) -> None:
        assert limit > 0
        self.limit = limit
        self.held = 0

    def take(self, nbytes: int) -> bool:
        if self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
        assert self.held >= 0, self.held
