"""`python -m server`: load the model, listen, warm up, serve until SIGTERM/SIGINT, then drain and exit 0."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from server.app import bind_socket, create_app, start_site
from server.service import SERVICE
from server.config import ServerConfig, parse_config
from server.logs import configure_logging

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine

log = logging.getLogger("server")


class Shutdown:
    """When SIGTERM/SIGINT came: --shutdown-timeout-s counts from there, over everything that follows."""
    started: float | None = None

    @classmethod
    def left_s(cls, config: ServerConfig) -> float:
        return config.shutdown_timeout_s - (time.monotonic() - (cls.started or time.monotonic()))


async def serve(config: ServerConfig, engine: Engine, sock: socket.socket) -> int:
    app = create_app(engine, config)
    try:
        runner, host, port = await start_site(app, config.host, config.port, config.access_log,
                                              config.shutdown_timeout_s, sock)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e.strerror or e)
        return 1
    precision = engine.describe().get("precision")
    log.info("listening on http://%s:%d (model %s, device %s, precision %s)", host, port, config.model, config.device,
             f"{config.dtype}, quantize {config.quantize} (as set)" if precision is None
             else f"{precision['chosen']} ({precision['how']})")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = loop.create_task(stop.wait())
    warmup = app[SERVICE].warmup_task
    assert warmup is not None
    await asyncio.wait({stopped, warmup}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if warmup.done() and not warmup.cancelled() and warmup.exception() is not None:
        code = 1  # never serve half-ready: a model that cannot warm up cannot answer either
    else:
        await stopped
    Shutdown.started = time.monotonic()
    log.info("shutting down: no new connections, finishing in-flight requests")
    try:
        async with asyncio.timeout(config.shutdown_timeout_s):
            await runner.cleanup()
    except TimeoutError:
        log.error("shutdown overran --shutdown-timeout-s (%g s); exiting without waiting for the rest",
                  config.shutdown_timeout_s)
        return code
    log.info("stopped")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        sock = bind_socket(config.host, config.port)  # before the model: a busy port fails in milliseconds
    except OSError as e:
        log.error("cannot listen on %s:%d: %s (--host/--port; another server there?)", config.host, config.port,
                  e.strerror or e)
        return 1
    from runtime.errors import ModelLoadError  # here: `--help` and argument errors answer without torch

    try:
        engine = config.load()
    except ModelLoadError as e:
        log.error("cannot load model from %s: %s", config.model, e)
        sock.close()
        return 1
    code = 1
    try:
        code = uvloop.run(serve(config, engine, sock))
    finally:
        # Stops the VLM loop thread, if the bundle has a VLM; within what is left of the shutdown timeout.
        closer = threading.Thread(target=engine.close, name="engine close", daemon=True)
        closer.start()
        closer.join(max(0.0, Shutdown.left_s(config)))
    if closer.is_alive() or threading.active_count() > 1:
        # A decode or a batch still running would hold the interpreter's exit (it joins pool threads): the
        # timeout bounds the whole shutdown, so leave without them.
        log.warning("exiting with %d thread(s) still running", threading.active_count() - 1)
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
