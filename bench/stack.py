"""The production stack on this machine: throughput through nginx with 1..N replicas, and what a shared-cache
(Redis) hit costs against a model answer.

    python -m bench.stack                      # replicas 1,2,3; 20 s closed loop each; 8 clients
    python -m bench.stack --replicas 1,2 --seconds 10 --json out.json

Each replica count gets a fresh stack (deploy/stack.py: Redis, replicas, nginx; the bundled model), a warm-up, then
closed-loop load through nginx with images made unique per request (every request computes). The load generator
runs in this process, on the same cores. The cache part sends each image to replica 1 (the model answers), then to
replica 2 (a Redis hit), then to replica 2 again (an in-process hit), one request at a time."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.common import machine, print_table, write_json
from deploy.load import ClosedLoop, VariedImages, post_image
from deploy.stack import REPO_DIR, Stack, StackSpec, free_ports

SAMPLES = sorted((REPO_DIR / "samples").glob("*.jpg"))
WRITE_WAIT_S = 0.02


def spec(run_dir: Path, replicas: int, server_args: tuple[str, ...]) -> StackSpec:
    ports = free_ports(replicas + 2)
    return StackSpec(run_dir=run_dir, replicas=replicas, public_port=ports[0], replica_port=ports[1],
                     redis_port=ports[replicas + 1], prometheus_port=0, server_args=server_args,
                     env={"TRITON_INTERPRET": "0"})


def throughput(replicas: int, seconds: float, warmup_s: float, workers: int, server_args: tuple[str, ...],
               root: Path) -> dict:
    images = VariedImages(SAMPLES, seed=replicas)
    with Stack(spec(root / f"replicas-{replicas}", replicas, server_args)) as stack:
        host, port = stack.spec.host, stack.spec.public_port
        warm = ClosedLoop(host, port, images, workers=workers).start()
        time.sleep(warmup_s)
        warm.stop()
        loop = ClosedLoop(host, port, images, workers=workers).start()
        cpu_start = os.times()
        time.sleep(seconds)
        result = loop.stop()
        cpu = os.times()
        client_cpu = (cpu.user + cpu.system - cpu_start.user - cpu_start.system) / result.elapsed_s
        threads = stack.replicas[0].env["OMP_NUM_THREADS"]
    return {"replicas": replicas, "torch_threads_each": int(threads), "clients": workers, "ok": result.ok,
            "failed": result.failed, "req_per_s": result.ok / result.elapsed_s, "p50_ms": result.percentile_ms(50),
            "p99_ms": result.percentile_ms(99), "client_cpu": client_cpu}


def cache_latency(count: int, server_args: tuple[str, ...], root: Path) -> dict:
    """Per image: replica 1 computes it, then (after WRITE_WAIT_S, the background Redis write) replica 2 answers it
    from Redis, then again from its own memory. Answers are sorted by what they say they were: a Redis call that
    missed its deadline makes the second one a model answer, counted in `n` of that kind."""
    images = VariedImages(SAMPLES, seed=99)
    rows: dict[str, list[tuple[float, float]]] = {"model": [], "redis hit": [], "in-process hit": []}
    with Stack(spec(root / "cache", 2, server_args)) as stack:
        first, second = stack.replica_url(0), stack.replica_url(1)
        for i in range(count + 3):  # the first 3 warm connections and code paths
            body = images()
            redis_hits = metric(second, "roadwork_redis_hits_total")
            for kind, url in (("model", first), ("redis hit", second), ("in-process hit", second)):
                start = time.perf_counter()
                status, answer = post_image(f"{url}/v1/predict", body)
                took_ms = (time.perf_counter() - start) * 1e3
                assert status == 200, answer
                if kind == "redis hit":
                    kind = "redis hit" if metric(second, "roadwork_redis_hits_total") > redis_hits else "model"
                if i >= 3:
                    rows[kind].append((took_ms, answer["timings_ms"]["total"]))
                time.sleep(WRITE_WAIT_S)
    return {kind: {"client_p50_ms": statistics.median(c for c, _ in values) if values else float("nan"),
                   "server_p50_ms": statistics.median(s for _, s in values) if values else float("nan"),
                   "n": len(values)}
            for kind, values in rows.items()}


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def cpu_summary() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return {"flags": [f for f in wanted if f in flags], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure (default 1,2,3; '' for none)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load per replica count")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients through nginx")
    parser.add_argument("--cache-images", type=int, default=20, help="images for the cache latency part")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more `python -m server` argument for every replica")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    server_args = tuple(args.server_arg)
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as root:
        rows = [throughput(int(n), args.seconds, args.warmup_s, args.clients, server_args, Path(root))
                for n in args.replicas.split(",") if n]
        for row in rows:
            row["vs_first"] = row["req_per_s"] / rows[0]["req_per_s"]
        if rows:
            print_table(rows, ["replicas", "torch_threads_each", "clients", "ok", "failed", "req_per_s", "vs_first",
                               "p50_ms", "p99_ms", "client_cpu"])
        cache = cache_latency(args.cache_images, server_args, Path(root))
        print()
        print_table([{"answer": kind, **values} for kind, values in cache.items()],
                    ["answer", "n", "client_p50_ms", "server_p50_ms"])
    info = {**machine(), **cpu_summary()}
    print(f"\n{info}")
    write_json(args.json, {"cpu": info, "throughput": rows, "cache": cache, "args": vars(args)})


if __name__ == "__main__":
    main()
