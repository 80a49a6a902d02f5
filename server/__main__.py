"""`python -m server`: load the model, listen, warm up, serve until SIGTERM/SIGINT, then drain and exit 0."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from server.app import SERVICE, create_app, start_site
from server.config import ServerConfig, parse_config

if TYPE_CHECKING:  # the engine pulls in torch and the models; --help stays fast without them
    from runtime.cascade.engine import Engine

log = logging.getLogger("server")


async def serve(config: ServerConfig, engine: Engine) -> int:
    app = create_app(engine, config)
    try:
        runner, host, port = await start_site(app, config.host, config.port, config.access_log,
                                              config.shutdown_timeout_s)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e.strerror or e)
        return 1
    precision = engine.describe().get("precision")
    log.info("listening on http://%s:%d (model %s, device %s, precision %s)", host, port, config.model, config.device,
             "library default" if precision is None else f"{precision['chosen']} ({precision['how']})")

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
    log.info("shutting down: no new connections, finishing in-flight requests")
    await runner.cleanup()
    log.info("stopped")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` and argument errors answer without loading torch.
    from runtime.cascade.engine import Engine
    from runtime.errors import ModelLoadError

    try:
        engine = Engine.load(config.model, device=config.device, dtype=config.dtype, max_batch=config.batch_size,
                             quantize=config.quantize)
    except ModelLoadError as e:
        log.error("cannot load model from %s: %s", config.model, e)
        return 1
    try:
        return uvloop.run(serve(config, engine))
    finally:
        engine.close()  # stops the VLM loop thread, if the bundle has a VLM


if __name__ == "__main__":
    sys.exit(main())
