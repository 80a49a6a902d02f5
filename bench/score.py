"""Bulk scoring (python -m tools.score) against the engine's offline batch throughput, on one folder, in one run.

    python -m bench.score [--model bundles/default] [--images 256] [--rounds 3] [--json out.json]
    python -m bench.score --tiny        # seconds; what the test runs

A folder of distinct 224x224 quality-75 JPEGs (what the validators send) is written once. Each round measures,
back to back on the same warmed Engine: (1) offline: Engine.predict over the folder's images, already decoded,
in full batches (bench.load's ceiling for the server, on this folder's images so the cascade routes the same
share to each stage); (2) tools.score over the folder into a fresh jsonl: listing, reading, decoding on its
threads, the same full batches, writing rows. The two alternate which goes first; medians over the rounds, of
images per wall second and per process CPU second (which holds better when other processes share the cores).
tools.score keeps up when its ratio is >= 1.

    python -m bench.score --ray [ADDRESS] [--ray-actors N]

adds, in the same run on the same folder, tools.score in this process against tools.score --ray (a local Ray it
starts, or the cluster at ADDRESS), alternating which goes first: images/s of each from settings to summary
(engine load and warmup included: the Ray path loads one Engine per actor in every run) and of the scoring loop
alone for the local path, and the ratios."""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import jpeg_images, machine, write_json
from runtime.cascade.engine import Engine
from runtime.image_decode import decode_image
from runtime.cascade.settings import EngineSettings, add_engine_flags, engine_settings
from tools.score import score

log = logging.getLogger("bench.score")


def cpu_flags() -> list[str]:
    """The vector and matrix extensions torch's CPU kernels pick from."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                                 "amx_int8", "amx_tile"))


def offline_images_per_s(engine: Engine, images: list) -> tuple[float, float]:
    """(images per wall second, images per process CPU second) of Engine.predict in full batches."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), engine.max_batch):
        engine.predict(images[i:i + engine.max_batch])
    return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


def score_images_per_s(engine: Engine, folder: Path, out: Path, n_images: int,
                       decode_threads: int) -> tuple[float, float, dict]:
    """The same for tools.score over the folder (its own wall-clock figure), and its summary."""
    cpu = time.process_time()
    summary = score(engine, [str(folder)], out, decode_threads=decode_threads, progress=False)
    cpu = time.process_time() - cpu
    assert summary["scored"] == n_images and summary["errors"] == 0, summary
    return summary["images_per_s"], n_images / cpu, summary


def write_folder(tmp: str, n_images: int) -> Path:
    folder = Path(tmp) / "images"
    folder.mkdir()
    for i, data in enumerate(jpeg_images(n_images, 224, seed=7)):
        (folder / f"{i:06d}.jpg").write_bytes(data)
    return folder


def run(settings: EngineSettings, n_images: int, rounds: int, decode_threads: int) -> dict:
    engine = settings.load()
    max_batch = engine.max_batch
    try:
        engine.warmup()
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_folder(tmp, n_images)
            decoded = [decode_image(p.read_bytes()) for p in sorted(folder.iterdir())]
            engine.predict(decoded[:max_batch])
            offline, bulk, offline_cpu, bulk_cpu = [], [], [], []
            for r in range(rounds):  # alternating which goes first: neither always follows the other
                for which in ("offline", "score") if r % 2 == 0 else ("score", "offline"):
                    if which == "offline":
                        wall, cpu = offline_images_per_s(engine, decoded)
                        offline.append(wall)
                        offline_cpu.append(cpu)
                    else:
                        wall, cpu, summary = score_images_per_s(engine, folder, Path(tmp) / f"round{r}.jsonl",
                                                                n_images, decode_threads)
                        bulk.append(wall)
                        bulk_cpu.append(cpu)
                log.info("round %d: offline %.1f images/s (%.1f per CPU s), tools.score %.1f images/s (%.1f per "
                         "CPU s)", r, offline[-1], offline_cpu[-1], bulk[-1], bulk_cpu[-1])
            stages = summary["stages"]
        description = engine.describe()
    finally:
        engine.close()
    off, sc = statistics.median(offline), statistics.median(bulk)
    return {"model": str(settings.model), "images": n_images, "rounds": rounds, "max_batch": max_batch,
            "decode_threads": decode_threads, "dtype": description["dtype"], "device": description["device"],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(),
            "stages_decided": stages,
            "offline_images_per_s": round(off, 2), "score_images_per_s": round(sc, 2),
            "score_vs_offline": round(sc / off, 3), "offline_rounds": [round(x, 2) for x in offline],
            "score_rounds": [round(x, 2) for x in bulk],
            # CPU-time figures hold better than wall time when other processes share the cores
            "offline_images_per_cpu_s": round(statistics.median(offline_cpu), 2),
            "score_images_per_cpu_s": round(statistics.median(bulk_cpu), 2),
            "score_vs_offline_cpu": round(statistics.median(bulk_cpu) / statistics.median(offline_cpu), 3)}


def ray_vs_local(settings: EngineSettings, n_images: int, rounds: int, decode_threads: int, address: str,
                 actors: int | None) -> dict:
    """Median images/s over `rounds` of tools.score in this process and on Ray, on one folder, alternating."""
    try:
        from tools import score_ray
    except ImportError as e:
        sys.exit(f"python -m bench.score --ray: {e}; install the extra: pip install -e '.[ray]'")
    import ray

    local, local_loop, on_ray = [], [], []
    with tempfile.TemporaryDirectory() as tmp, score_ray.cluster(address):
        folder = write_folder(tmp, n_images)
        pool = score_ray.pool_size(settings, actors, 1)
        for r in range(rounds):
            for which in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                out = Path(tmp) / f"{which}{r}.jsonl"
                start = time.perf_counter()
                if which == "local":
                    engine = settings.load()
                    try:
                        engine.warmup()
                        summary = score(engine, [str(folder)], out, decode_threads=decode_threads, progress=False)
                    finally:
                        engine.close()
                    local_loop.append(summary["images_per_s"])
                else:
                    summary = score_ray.score_on_ray(settings, [str(folder)], out, actors=pool,
                                                     decode_threads=decode_threads, progress=False)
                seconds = time.perf_counter() - start
                assert summary["scored"] == n_images and summary["errors"] == 0, summary
                (local if which == "local" else on_ray).append(n_images / seconds)
            log.info("round %d: local %.1f images/s (loop %.1f), ray %.1f images/s with %d actors", r, local[-1],
                     local_loop[-1], on_ray[-1], pool)
        cluster_cpus = ray.cluster_resources().get("CPU")
    loc, loop, ray_rate = (statistics.median(x) for x in (local, local_loop, on_ray))
    return {"ray_actors": pool, "ray_cluster_cpus": cluster_cpus, "local_images_per_s": round(loc, 2),
            "local_loop_images_per_s": round(loop, 2), "ray_images_per_s": round(ray_rate, 2),
            "ray_vs_local": round(ray_rate / loc, 3), "ray_vs_local_loop": round(ray_rate / loop, 3),
            "local_rounds": [round(x, 2) for x in local], "ray_rounds": [round(x, 2) for x in on_ray]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.score", description=__doc__.split("\n\n")[0])
    add_engine_flags(ap)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="16 images, 1 round")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="also tools.score in this process against tools.score --ray (a local Ray, or ADDRESS's)")
    ap.add_argument("--ray-actors", type=int, help="with --ray: actors (default: one per CPU of the cluster)")
    args = ap.parse_args(argv)
    settings = engine_settings(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tiny:
        args.images, args.rounds = 16, 1
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        ap.error(f"--ray-actors needs --ray and must be >= 1, got {args.ray_actors}")
    result = run(settings, args.images, args.rounds, args.decode_threads)
    if args.ray is not None:
        result["ray"] = ray_vs_local(settings, args.images, args.rounds, args.decode_threads, args.ray,
                                     args.ray_actors)
    info = machine()
    print(json.dumps({"machine": info, **result}, indent=2))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
