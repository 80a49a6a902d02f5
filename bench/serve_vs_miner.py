"""Our server against the reference miner's way, same weights, same load, same concurrency levels, loopback only.

    python -m bench.serve_vs_miner [--preset vit-b16 | --model DIR] [--concurrency 1,8,32,128]
                                   [--duration 20] [--requests 400] [--servers baseline,server-auto,server]

1. A random-weight checkpoint of the preset (default ViT-B/16, the reference miner's architecture) is written
   to a temporary directory, or --model names one.
2. Offline: Engine.predict on full batches in this process (decoded images, and JPEG bytes -> decode ->
   predict): the runtime's throughput without HTTP, the ceiling the server is held to.
3. Each server in turn, alone on the machine: `python -m bench.miner_baseline` (BASELINE: transformers
   pipeline run synchronously in the async handler, fp32, one request at a time), and `python -m server` (result
   cache off, so every request is computed) with `--quantize` auto (server-auto: the server's defaults), none
   (server), int8 (server-int8), int8-fbgemm (server-fbgemm) or int8-onednn (server-onednn), each with its own
   offline figure. Each starts on 127.0.0.1 with a free port; once /readyz
   answers 200 one request is timed alone (first request after ready), then for each concurrency level a
   closed loop of that many clients POSTs ImageSynapse JSON ({"image": base64 JPEG, "prediction": -1.0, ...})
   back to back, bounded by --requests and --duration. Between levels the server is left to drain.
4. client_cpu: the share of the machine's cores the load generator (this process) used during a level.
5. A request succeeds on HTTP 200 with a prediction in [0, 1]; anything else, or no answer within --timeout
   (default 9 s, the validator's), is an error, as the validator scores it.
6. Issue 14's targets: capacity (the best successes per second over the levels) >= 0.8 x (the fastest matmul
   rate / the fp32 rate, bench.peak measured at the start of this run), and successes per second at
   concurrency 32 >= 5x the baseline's.

The load generator shares the cores with the server under test (both are on one machine), which costs both
servers alike. Environment variables set on this command (e.g. OMP_WAIT_POLICY=PASSIVE) reach both servers
and the offline measurement alike."""
from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench.common import PRESETS, jpeg_images, machine, make_checkpoint, print_table, write_json
from bench.load import start_listening
from bench.peak import measure_peaks
from deploy.load import ClosedLoop
from runtime.options import default_max_batch

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("baseline", "server-auto", "server", "server-int8", "server-fbgemm", "server-onednn")
CORES = len(os.sched_getaffinity(0))
OURS = {"server-auto": "auto", "server": "none", "server-int8": "int8", "server-fbgemm": "int8-fbgemm",
        "server-onednn": "int8-onednn"}  # our server kinds -> their --quantize


def synapse_bodies(jpegs: list[bytes], timeout_s: float) -> list[bytes]:
    """ImageSynapse JSON as the validator's dendrite sends it (the fields a miner reads, plus its envelope)."""
    return [orjson.dumps({"name": "ImageSynapse", "timeout": timeout_s, "image": base64.b64encode(j).decode(),
                          "prediction": -1.0, "testnet_label": -1}) for j in jpegs]


def judge_synapse(status: int, payload: bytes) -> int | str:
    """200 only for an answer whose `prediction` is a probability; else the status, or 'bad_prediction'."""
    if status != 200:
        return status
    try:
        prediction = orjson.loads(payload).get("prediction")
    except (orjson.JSONDecodeError, AttributeError):
        return "bad_prediction"
    return 200 if isinstance(prediction, (int, float)) and 0.0 <= prediction <= 1.0 else "bad_prediction"


async def closed_loop(server: str, url: str, bodies: list[bytes], concurrency: int, requests: int,
                      duration_s: float, timeout_s: float) -> dict:
    """One concurrency level on deploy/load.py's ClosedLoop, with the load generator's own CPU share."""
    load_avg = os.getloadavg()[0]  # at the start: background load drifts
    counter = itertools.count()
    where = urlsplit(url)
    cpu_start = time.process_time()
    loop = ClosedLoop(where.hostname, where.port, lambda: bodies[next(counter) % len(bodies)], concurrency,
                      path="/ImageSynapse", limit=requests, content_type="application/json", timeout_s=timeout_s,
                      judge=judge_synapse).start()
    await asyncio.to_thread(loop.wait, duration_s)
    result = await asyncio.to_thread(loop.stop)
    seconds, client_cpu_s = result.elapsed_s, time.process_time() - cpu_start
    return {"server": server, "concurrency": concurrency, "load_avg": load_avg, "ok": result.ok,
            "errors": result.failed,
            "errors_by_kind": {str(kind): n for kind, n in result.statuses.items() if kind != 200},
            "seconds": seconds, "req_s": result.ok / seconds if seconds else 0.0,
            "client_cpu": client_cpu_s / (seconds * CORES) if seconds else 0.0,
            "p50_ms": result.percentile_ms(50), "p99_ms": result.percentile_ms(99)}


async def wait_answering(url: str, path: str, timeout_s: float) -> None:
    """Until GET path answers 200: readiness, or (after a level) a drained request backlog."""
    give_up = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as client:
        while True:
            try:
                async with client.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > give_up:
                raise RuntimeError(f"{url}{path} did not answer 200 within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)


def server_command(name: str, model: Path, args: argparse.Namespace) -> list[str]:
    if name == "baseline":
        return [sys.executable, "-m", "bench.miner_baseline", "--model", str(model), "--port", "0"]
    return [sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
            "--cache-entries", "0", "--max-batch", str(args.max_batch), "--quantize", OURS[name], *args.server_arg]


async def measure_server(name: str, model: Path, bodies: list[bytes], args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    proc, url = await start_listening(server_command(name, model, args), args.start_timeout)
    try:
        await wait_answering(url, "/readyz", args.start_timeout)
        ready_s = time.perf_counter() - started
        first = await closed_loop(name, url, bodies, 1, 1, args.timeout, args.timeout)
        levels = []
        for concurrency in args.concurrency:
            levels.append(await closed_loop(name, url, bodies, concurrency, args.requests, args.duration,
                                            args.timeout))
            await wait_answering(url, "/healthz", args.drain_timeout)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    return {"server": name, "ready_after_s": ready_s, "first_request": first, "levels": levels,
            "exit_code": proc.returncode}


def offline(model: Path, jpegs: list[bytes], batch: int, batches: int, dtype: str | None, quantize: str) -> dict:
    """Images/s of Engine.predict in this process: on decoded images, and from JPEG bytes (decode included)."""
    import torch

    from runtime.image_decode import decode_image
    from runtime.cascade.engine import Engine

    engine = Engine.load(model, "cpu", dtype, max_batch=batch, quantize=quantize)
    chunk = [jpegs[i % len(jpegs)] for i in range(batch)]
    decoded = [decode_image(j) for j in chunk]
    engine.predict(decoded)
    times, e2e_times = [], []
    with torch.inference_mode():
        for _ in range(batches):  # alternate, so both see the same background load
            t0 = time.perf_counter()
            engine.predict(decoded)
            t1 = time.perf_counter()
            engine.predict([decode_image(j) for j in chunk])
            times.append(t1 - t0)
            e2e_times.append(time.perf_counter() - t1)
    result = {"batch": batch, "img_s": batch / statistics.median(times),
              "e2e_img_s": batch / statistics.median(e2e_times), "dtype": str(engine.dtype).removeprefix("torch."),
              "quantize": quantize, "quantized": engine.describe()["stages"][0]["quantize"],
              "precision": None if engine.precision.choice is None else engine.precision.choice.describe()["chosen"]}
    del engine
    gc.collect()
    return result


def report(results: list[dict], offline_results: dict[str, dict], peaks: dict[str, float]) -> dict:
    rows = [level for r in results for level in r["levels"]]
    by = {(row["server"], row["concurrency"]): row for row in rows}
    ratios = []
    for name in OURS:
        for concurrency in sorted({row["concurrency"] for row in rows}):
            base, ours = by.get(("baseline", concurrency)), by.get((name, concurrency))
            if base and ours:
                ratios.append({"server": name, "concurrency": concurrency, "server_req_s": ours["req_s"],
                               "baseline_req_s": base["req_s"],
                               "throughput_ratio": ours["req_s"] / base["req_s"] if base["req_s"] else float("inf"),
                               "server_errors": ours["errors"], "baseline_errors": base["errors"],
                               "p50_ratio": base["p50_ms"] / ours["p50_ms"]})
    print("\nper server and concurrency (closed loop)")
    print_table(rows, ["server", "concurrency", "load_avg", "ok", "errors", "seconds", "req_s", "p50_ms", "p99_ms",
                       "client_cpu"])
    if ratios:
        print("\nours / baseline")
        print_table(ratios, ["server", "concurrency", "server_req_s", "baseline_req_s", "throughput_ratio",
                             "server_errors", "baseline_errors", "p50_ratio"])
    checks = {name: server_checks(name, results, by, ratios, offline_results.get(name)) for name in OURS
              if any(r["server"] == name for r in results)}
    capacity = {r["server"]: max((row["req_s"] for row in r["levels"]), default=0.0) for r in results}
    fastest = max(peaks, key=peaks.get)
    capacity_target = 0.8 * peaks[fastest] / peaks["fp32"]
    print("\nmatmul peaks at the start of this run (GFLOP/s; GOP/s for int8): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f"; fastest {fastest} = {peaks[fastest] / peaks['fp32']:.2f}x fp32")
    for name, c in checks.items():
        c["capacity_req_s"] = capacity[name]
        if capacity.get("baseline"):
            c["capacity_ratio"] = capacity[name] / capacity["baseline"]
            c["capacity_target"] = capacity_target
    for name, offline_result in offline_results.items():
        print(f"\noffline Engine.predict for {name} (batch {offline_result['batch']}, {offline_result['dtype']}, "
              f"quantize {offline_result['quantize']} -> {offline_result['quantized']}): "
              f"{offline_result['img_s']:.2f} img/s decoded, "
              f"{offline_result['e2e_img_s']:.2f} img/s from JPEG")
    for name, c in checks.items():
        for key, target, text in [("c32_throughput_ratio", 5.0, "answers within the timeout per second >= 5x "
                                                                "baseline at concurrency 32"),
                                  ("capacity_ratio", c.get("capacity_target"), "capacity (best answers/s over the "
                                   "levels) >= 0.8 x fastest/fp32 matmul = x baseline's"),
                                  ("server_c32_vs_offline", 0.9, "at concurrency 32 >= 90% of offline img/s")]:
            if key in c:
                print(f"target ({name}): {text}{'' if key != 'capacity_ratio' else f' {target:.2f}'}: {c[key]:.2f} "
                      f"({'met' if c[key] >= target else 'not met'})")
        if "c32_server_errors" in c:
            print(f"target ({name}): zero errors at concurrency 32: {c['c32_server_errors']} "
                  f"({'met' if c['c32_server_errors'] == 0 else 'not met'})")
        if "first_vs_steady_p50" in c:
            verdict = "met" if c["first_vs_steady_p50"] <= 1.5 else "not met"
            print(f"target ({name}): first request after /readyz within 1.5x steady p50 (concurrency 1): "
                  f"{c['first_request_ms']:.0f} ms = {c['first_vs_steady_p50']:.2f}x ({verdict})")
    return {"levels": rows, "ratios": ratios, "checks": checks}


def server_checks(name: str, results: list[dict], by: dict, ratios: list[dict], offline_result: dict | None) -> dict:
    """The issue's targets for one of our servers."""
    ours = next(r for r in results if r["server"] == name)
    checks = {"first_request_ms": ours["first_request"]["p50_ms"]}
    steady = by.get((name, 1))
    if steady:
        checks["first_vs_steady_p50"] = checks["first_request_ms"] / steady["p50_ms"]
    at32 = by.get((name, 32))
    if at32 and offline_result:
        checks["server_c32_vs_offline"] = at32["req_s"] / offline_result["img_s"]
        checks["server_c32_vs_offline_with_decode"] = at32["req_s"] / offline_result["e2e_img_s"]
    ratio32 = next((r for r in ratios if r["server"] == name and r["concurrency"] == 32), None)
    if ratio32:
        checks["c32_throughput_ratio"] = ratio32["throughput_ratio"]
        checks["c32_server_errors"] = ratio32["server_errors"]
    return checks


async def run_servers(model: Path, jpegs: list[bytes], bodies: list[bytes],
                      args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    """Each server alone; each offline figure is taken right before its server runs, as background load drifts."""
    results, offline_results = [], {}
    for name in args.servers:
        if name in OURS:  # the server's --dtype, else its default
            dtype = next((a.split("=", 1)[1] for a in args.server_arg if a.startswith("--dtype=")), "auto")
            offline_results[name] = offline(model, jpegs, args.max_batch, args.offline_batches, dtype, OURS[name])
        results.append(await measure_server(name, model, bodies, args))
    return results, offline_results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-b16", choices=sorted(p for p, (k, _) in PRESETS.items() if k == "vit"),
                    help="random-weight ViT checkpoint to write (the baseline's pipeline needs a ViT classifier)")
    ap.add_argument("--model", type=Path, help="an existing ViTForImageClassification directory instead")
    ap.add_argument("--servers", default="baseline,server-auto,server",
                    help="comma-separated, from baseline,server,server-int8 (our server with --quantize int8)")
    ap.add_argument("--concurrency", default="1,8,32,128", help="closed-loop client counts")
    ap.add_argument("--requests", type=int, default=400, help="most requests per level")
    ap.add_argument("--duration", type=float, default=20.0, help="most seconds per level")
    ap.add_argument("--timeout", type=float, default=9.0, help="per-request client timeout (the validator's 9 s)")
    ap.add_argument("--images", type=int, default=64, help="distinct 224x224 JPEGs cycled through")
    cpu_batch = default_max_batch("cpu")
    ap.add_argument("--max-batch", type=int, default=cpu_batch,
                    help=f"the servers' --max-batch and the offline batch (default {cpu_batch}, the server's CPU "
                         "default)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for python -m server")
    ap.add_argument("--offline-batches", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for listening and ready")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="seconds a server may take to drain")
    ap.add_argument("--peak-size", type=int, default=1024, help="n of bench.peak's n x n x n products")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = args.servers.split(",")
    if set(args.servers) - set(SERVERS):
        ap.error(f"--servers: choose from {','.join(SERVERS)}")
    jpegs = jpeg_images(args.images, 224)
    bodies = synapse_bodies(jpegs, args.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or Path(tmp)
        if args.model is None:
            make_checkpoint(args.preset, model)
        peaks, _ = measure_peaks(size=args.peak_size)
        results, offline_results = asyncio.run(run_servers(model, jpegs, bodies, args))
    summary = report(results, offline_results, peaks)
    write_json(args.json, {"benchmark": "serve_vs_miner", "machine": machine(), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "peaks": peaks, "offline": offline_results, "servers": results, **summary})
    return summary


if __name__ == "__main__":
    main()
