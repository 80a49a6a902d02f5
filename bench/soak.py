"""Soak: mixed good, bad, hostile, slow and oversized traffic at a steady rate against `python -m server`, then an
overload phase; reports goodput over time, p99, RSS and open file descriptors over time, and anything lost.

    python -m bench.soak --minutes 30 [--rate 20] [--window-s 60] [--model DIR] [--json F] [--no-overload]

Traffic (open loop, Poisson arrivals, each request on its own schedule): 70 % validator-sized JPEGs (/v1/predict,
JSON body), 10 % bad requests (garbage bytes, bad base64, truncated JPEG), 10 % hostile images (a lossless WebP
declaring 6300x6300, a 1x400000 PNG, a 1500-scan JPEG, a PNG header claiming 20000x20000), 5 % /v1/predict/batch
of four images, 5 % slow clients (a body trickled over ~2 s, which must still be answered); plus idle sockets
opened every second that the server must close. A request is "lost" when it got no HTTP answer at all. Goodput
counts good images answered 200 within 9 s (the validators' timeout). RSS growth compares the last window with
the first one after warm-up. The overload phase: `--overload-clients` closed-loop clients that resend at once
after a 503, for `--overload-s`; its goodput is compared with Engine.predict's offline throughput measured here.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench.load import make_jpegs, offline_throughput, start_listening, wait_ready
from fixtures.hostile import flat_webp, png_header_only, scan_bomb, strip_png
from runtime.cascade.settings import EngineSettings
from runtime.options import default_max_batch

log = logging.getLogger("bench.soak")
REPO = Path(__file__).resolve().parents[1]
GOOD_WITHIN_S = 9.0
KINDS = (("good", 0.70), ("bad", 0.10), ("hostile", 0.10), ("batch", 0.05), ("slow", 0.05))


@dataclass
class Window:
    start_s: float
    sent: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    good_latency_ms: list[float] = field(default_factory=list)
    goodput: int = 0
    lost: int = 0
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def summary(self, seconds: float) -> dict:
        lat = self.good_latency_ms or [float("nan")]
        return {"t_s": round(self.start_s), "sent": self.sent, "statuses": self.statuses,
                "goodput_per_s": round(self.goodput / seconds, 2), "good_p99_ms": round(float(np.percentile(lat, 99)), 1),
                "lost": self.lost, "rss_mb": round(max(self.rss_mb or [0]), 1), "open_fds": max(self.fds or [0])}


class Traffic:
    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        self.good = [json.dumps({"image": base64.b64encode(im).decode()}).encode() for im in images]
        self.hostile = [flat_webp(6300), strip_png(400_000), scan_bomb(1500, (512, 512)), png_header_only(20000, 20000)]
        self.bad = [(b"\x00garbage" * 50, "image/jpeg"), (b'{"image": "@@@not base64@@@"}', "application/json"),
                    (images[0][: len(images[0]) // 3], "image/jpeg")]
        self.batch = [json.dumps({"images": [base64.b64encode(im).decode() for im in images[i:i + 4]]}).encode()
                      for i in range(0, len(images) - 4, 4)]

    def request(self, kind: str, i: int) -> tuple[str, bytes, str]:
        if kind == "good" or kind == "slow":
            return "/v1/predict", self.good[i % len(self.good)], "application/json"
        if kind == "bad":
            body, content_type = self.bad[i % len(self.bad)]
            return "/v1/predict", body, content_type
        if kind == "hostile":
            return "/v1/predict", self.hostile[i % len(self.hostile)], "application/octet-stream"
        return "/v1/predict/batch", self.batch[i % len(self.batch)], "application/json"


async def trickle(body: bytes, seconds: float):
    pieces = 10
    step = -(-len(body) // pieces)
    for k in range(pieces):
        yield body[k * step:(k + 1) * step]
        await asyncio.sleep(seconds / pieces)


async def one(client: aiohttp.ClientSession, url: str, traffic: Traffic, kind: str, i: int) -> tuple[str, float]:
    path, body, content_type = traffic.request(kind, i)
    data = trickle(body, 2.0) if kind == "slow" else body
    start = time.monotonic()
    try:
        async with client.post(url + path, data=data, headers={"Content-Type": content_type}) as r:
            await r.read()
            return str(r.status), time.monotonic() - start
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "lost", time.monotonic() - start


def proc_stats(pid: int) -> tuple[float, int]:
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def idle_socket(port: int) -> None:
    """A connection that never sends anything; the server must close it (keep-alive timeout)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await asyncio.wait_for(loop.sock_recv(sock, 1), 60)
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        sock.close()


async def soak(url: str, pid: int, traffic: Traffic, args: argparse.Namespace) -> list[dict]:
    duration = args.minutes * 60
    rng = random.Random(0)
    windows: list[Window] = []
    port = int(url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        start = time.monotonic()

        last = max(0, int(-(-duration // args.window_s)) - 1)

        def window() -> Window:  # answers arriving after the end count in the last window
            index = min(last, int((time.monotonic() - start) // args.window_s))
            while len(windows) <= index:
                windows.append(Window(len(windows) * args.window_s))
            return windows[index]

        async def send(kind: str, i: int) -> None:
            w = window()
            w.sent[kind] = w.sent.get(kind, 0) + 1
            status, took = await one(client, url, traffic, kind, i)
            by_kind = w.statuses.setdefault(kind, {})
            by_kind[status] = by_kind.get(status, 0) + 1
            if status == "lost":
                w.lost += 1
            if kind == "good" and status == "200":
                w.good_latency_ms.append(took * 1e3)
                if took <= GOOD_WITHIN_S:
                    w.goodput += 1

        async def sample() -> None:
            last_idle = 0.0
            while time.monotonic() - start < duration:
                rss, fds = proc_stats(pid)
                w = window()
                w.rss_mb.append(rss)
                w.fds.append(fds)
                if time.monotonic() - last_idle >= 1.0:
                    tasks.append(asyncio.create_task(idle_socket(port)))
                    last_idle = time.monotonic()
                await asyncio.sleep(0.5)

        tasks: list[asyncio.Task] = []
        sampler = asyncio.create_task(sample())
        names, weights = zip(*KINDS)
        i = 0
        next_at = start
        while (now := time.monotonic()) - start < duration:
            next_at += rng.expovariate(args.rate)
            if next_at > now:
                await asyncio.sleep(next_at - now)
            tasks.append(asyncio.create_task(send(rng.choices(names, weights)[0], i)))
            i += 1
            if len(tasks) > 2000:
                tasks = [t for t in tasks if not t.done()]
        await sampler
        await asyncio.gather(*tasks)
    return [w.summary(args.window_s) for w in windows]


async def overload(url: str, traffic: Traffic, clients: int, seconds: float) -> dict:
    """Closed loop: each client resends at once after a 503; goodput = answers 200 within 9 s per second."""
    counts: dict[str, int] = {}
    good = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        start = time.monotonic()

        async def worker(k: int) -> None:
            nonlocal good
            i = k
            while time.monotonic() - start < seconds:
                status, took = await one(client, url, traffic, "good", i)
                counts[status] = counts.get(status, 0) + 1
                if status == "200" and took <= GOOD_WITHIN_S:
                    good += 1
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
        took = time.monotonic() - start
    return {"clients": clients, "seconds": round(took, 1), "statuses": counts, "goodput_per_s": round(good / took, 2)}


def offline(args: argparse.Namespace, traffic: Traffic) -> float:
    """Images/s of Engine.predict on full batches in this process (bench.load's measure)."""
    settings = EngineSettings(args.model, max_batch=args.max_batch)  # the server's defaults, as it gets them
    images_per_s = offline_throughput(settings, args.offline_batches, traffic.images)["images_per_s"]
    log.info("offline Engine.predict: %.1f images/s", images_per_s)
    return images_per_s


async def start_server(args: argparse.Namespace) -> tuple[asyncio.subprocess.Process, str]:
    command = [sys.executable, "-m", "server", "--model", str(args.model), "--host", "127.0.0.1", "--port", "0",
               "--cache-entries", "0", "--log-level", "info", "--max-batch", str(args.max_batch),
               "--keepalive-timeout-s", "5", "--queue-size", str(args.queue_size)]
    return await start_listening(command, 300)


async def run(args: argparse.Namespace, traffic: Traffic) -> dict:
    proc, url = await start_server(args)
    try:
        async with aiohttp.ClientSession() as client:
            await wait_ready(client, url)
        windows = await soak(url, proc.pid, traffic, args)
        over = None
        if not args.no_overload:
            over = await overload(url, traffic, args.overload_clients, args.overload_s)
            over["offline_after"] = await asyncio.get_running_loop().run_in_executor(None, offline, args, traffic)
        rss, fds = proc_stats(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(proc.wait(), 120)
    return {"windows": windows, "overload": over, "final_rss_mb": round(rss, 1), "final_open_fds": fds,
            "server_exit_code": exit_code}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0, help="mean requests/s of the mixed traffic")
    parser.add_argument("--window-s", type=float, default=60.0, help="reporting window")
    parser.add_argument("--model", type=Path, default=REPO / "bundles" / "default")
    parser.add_argument("--max-batch", type=int, default=default_max_batch("cpu"))
    parser.add_argument("--queue-size", type=int, default=1024, help="the server's; small makes overload refuse")
    parser.add_argument("--overload-clients", type=int, default=32)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--no-overload", action="store_true")
    parser.add_argument("--offline-batches", type=int, default=20)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    images = make_jpegs(64, 224)
    traffic = Traffic(images)
    offline_before = None if args.no_overload else offline(args, traffic)
    report = asyncio.run(run(args, traffic))
    windows = report["windows"]
    warm = windows[1] if len(windows) > 2 else windows[0]
    report["rss_growth_after_warmup"] = round(windows[-1]["rss_mb"] / warm["rss_mb"] - 1, 4)
    report["lost"] = sum(w["lost"] for w in windows)
    if report["overload"] is not None:
        # Offline right before the soak and right after the overload phase: the machine's load moves meanwhile.
        after = report["overload"].pop("offline_after")
        report["offline_images_per_s"] = {"before": offline_before, "after": after}
        report["overload_goodput_vs_offline"] = round(report["overload"]["goodput_per_s"] / ((offline_before + after) / 2), 3)
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for w in windows:
        log.info("t=%5ds goodput %6.2f/s  p99 %8.1f ms  rss %7.1f MB  fds %4d  lost %d", w["t_s"], w["goodput_per_s"],
                 w["good_p99_ms"], w["rss_mb"], w["open_fds"], w["lost"])
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text + "\n")
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
