"""Load test of the HTTP server on loopback, against the runtime's own offline batch throughput.

    python -m bench.load --model DIR [--concurrency 32 --requests 2000] [--rate 200 --duration 10] [--tiny]

Order of work: (1) offline: Engine.predict on full batches of decoded images, in this process; (2) start
`python -m server` (cache off, so every request is computed) on 127.0.0.1 with a free port, or use --url of a
server already running on loopback; (3) closed loop: `concurrency` clients send back-to-back; (4) open loop:
Poisson arrivals at `rate` per second regardless of answers, latency counted from each scheduled arrival (no
coordinated omission). Both loops are bounded by a request count and a duration. The client shares the
machine with the server, so on few cores the ratio understates what the server alone could do.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import logging
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from PIL import Image

from deploy.load import ClosedLoop, LoadResult
from runtime.cascade.settings import EngineSettings, add_engine_flags, engine_settings

log = logging.getLogger("bench.load")

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def summary(phase: str, result: LoadResult) -> dict:
    seconds = result.elapsed_s
    return {"phase": phase, "sent": result.sent, "ok": result.ok, "errors": result.failed,
            "errors_by_status": {str(status): n for status, n in result.statuses.items() if status != 200},
            "seconds": round(seconds, 3), "throughput_per_s": round(result.ok / seconds, 2) if seconds else 0.0,
            **{f"p{q}_ms": round(result.percentile_ms(q), 2) for q in (50, 90, 99)}}


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Distinct smooth random street-sized images, JPEG quality 75 as the validators send them."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(1, size // 8), max(1, size // 8), 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(buffer, format="JPEG", quality=75)
        images.append(buffer.getvalue())
    return images


def offline_throughput(settings: EngineSettings, batches: int, images: list[bytes]) -> dict:
    """Images/s of Engine.predict on full batches of already-decoded images: the ceiling for the server."""
    from runtime.image_decode import decode_image

    engine = settings.load()
    engine.warmup()
    decoded = [decode_image(im) for im in images]
    batch = [decoded[i % len(decoded)] for i in range(engine.max_batch)]
    engine.predict(batch)
    start = time.perf_counter()
    for _ in range(batches):
        engine.predict(batch)
    seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    for im in images:
        decode_image(im)
    decode_ms = (time.perf_counter() - decode_start) / len(images) * 1e3
    return {"images_per_s": round(batches * engine.max_batch / seconds, 2), "batch": engine.max_batch,
            "batches": batches, "decode_ms_per_image": round(decode_ms, 3),
            "engine": engine.describe()}


async def start_listening(command: list[str], timeout_s: float = 120,
                          cwd: Path = REPO) -> tuple[asyncio.subprocess.Process, str]:
    """Start a server process (`command`) and return it with the URL it logs as "listening on URL"; its stderr is
    drained from then on. Raises RuntimeError when it exits first or says nothing within timeout_s."""
    proc = await asyncio.create_subprocess_exec(*command, cwd=cwd, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            line = (await asyncio.wait_for(proc.stderr.readline(), max(1.0, give_up - time.monotonic()))).decode()
        except asyncio.TimeoutError:
            proc.kill()
            raise RuntimeError(f"{command[2]} did not start listening within {timeout_s:.0f} s") from None
        if not line:
            raise RuntimeError(f"{command[2]} exited before listening:\n" + "".join(lines[-20:]))
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return proc, found.group(1)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def start_server(args: argparse.Namespace) -> tuple[asyncio.subprocess.Process, str]:
    command = [sys.executable, "-m", "server", *args.engine.argv(), "--host", "127.0.0.1", "--port", "0",
               "--max-delay-ms", str(args.max_delay_ms), "--cache-entries", "0", "--queue-size", str(args.queue_size),
               "--log-level", "info"]
    return await start_listening(command)


async def wait_ready(client: aiohttp.ClientSession, url: str, timeout_s: float = 300) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            async with client.get(url + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > give_up:
            raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, requests: int, duration_s: float) -> dict:
    """deploy/load.py's ClosedLoop, on worker threads while this event loop keeps draining the server's output."""
    counter = itertools.count()
    where = urlsplit(url)
    loop = ClosedLoop(where.hostname, where.port, lambda: bodies[next(counter) % len(bodies)], concurrency,
                      limit=requests, content_type="application/json").start()
    await asyncio.to_thread(loop.wait, duration_s)
    return summary(f"closed(concurrency={concurrency})", await asyncio.to_thread(loop.stop))


async def send(client: aiohttp.ClientSession, url: str, body: bytes) -> int | str:
    try:
        async with client.post(url + "/v1/predict", data=body, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "error"  # no answer, as ClosedLoop records it


async def open_loop(url: str, bodies: list[bytes], rate: float, requests: int, duration_s: float,
                    seed: int = 0) -> dict:
    """Poisson arrivals at `rate`, each latency counted from its scheduled arrival (no coordinated omission)."""
    result = LoadResult()
    gaps = np.random.default_rng(seed).exponential(1 / rate, size=requests)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals <= duration_s]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> None:
            status = await send(client, url, bodies[i % len(bodies)])
            result.record(status, time.perf_counter() - (start + at))

        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, float(at))))
        await asyncio.gather(*tasks)
        result.elapsed_s = time.perf_counter() - start
    return summary(f"open(rate={rate:g}/s)", result)


async def run_load(args: argparse.Namespace, images: list[bytes]) -> tuple[list[dict], int | None]:
    bodies = [json.dumps({"image": base64.b64encode(im).decode()}).encode() for im in images]
    proc, url = (None, args.url) if args.url else await start_server(args)
    try:
        async with aiohttp.ClientSession() as client:
            await wait_ready(client, url)
        phases = [await closed_loop(url, bodies, args.concurrency, args.requests, args.duration)]
        if args.rate > 0:
            phases.append(await open_loop(url, bodies, args.rate, args.requests, args.duration))
    finally:
        exit_code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            exit_code = await asyncio.wait_for(proc.wait(), 60)
    return phases, exit_code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    add_engine_flags(parser)  # the offline engine's, and the server's it starts
    parser.add_argument("--url", help="a server already running on loopback (default: start one)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--image-size", type=int, default=224, help="side of the square test JPEGs")
    parser.add_argument("--images", type=int, default=256, help="distinct images cycled through")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: clients in flight")
    parser.add_argument("--rate", type=float, default=100.0, help="open loop: mean arrivals/s (0 skips it)")
    parser.add_argument("--requests", type=int, default=2000, help="most requests per phase")
    parser.add_argument("--duration", type=float, default=20.0, help="most seconds per phase")
    parser.add_argument("--offline-batches", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a few seconds in all: for tests and smoke runs")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    settings = engine_settings(parser, args)
    if args.tiny:
        args.images, args.image_size, args.concurrency = min(args.images, 16), min(args.image_size, 64), 4
        args.requests, args.duration, args.rate, args.offline_batches = 48, 3.0, 40.0, 3
        settings = replace(settings, max_batch=min(settings.batch_size, 8))
    args.engine = settings
    if args.url and urlsplit(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must point at loopback ({', '.join(sorted(LOOPBACK))}), got {args.url}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    images = make_jpegs(args.images, args.image_size)
    offline = offline_throughput(args.engine, args.offline_batches, images)
    log.info("offline Engine.predict: %.1f images/s (batch %d); decode %.2f ms/image",
             offline["images_per_s"], offline["batch"], offline["decode_ms_per_image"])
    summaries, exit_code = asyncio.run(run_load(args, images))
    for s in summaries:
        log.info("%-24s sent %5d  ok %5d  errors %3d  %8.1f req/s  p50 %7.2f  p90 %7.2f  p99 %7.2f ms",
                 s["phase"], s["sent"], s["ok"], s["errors"], s["throughput_per_s"], s["p50_ms"], s["p90_ms"],
                 s["p99_ms"])
    closed = summaries[0]["throughput_per_s"]
    settings = {k: v for k, v in vars(args).items() if k != "engine"} | {"max_batch": args.engine.batch_size}
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
              "offline": offline, "phases": summaries,
              "server_vs_offline_throughput": round(closed / offline["images_per_s"], 3),
              "server_exit_code": exit_code}
    log.info("server closed-loop throughput / offline batch throughput = %.3f", report["server_vs_offline_throughput"])
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text + "\n")
    errors = sum(s["errors"] for s in summaries)
    return 0 if errors == 0 and exit_code in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
