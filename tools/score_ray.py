"""python -m tools.score --ray: the same bulk scoring on Ray Data. The driver lists the inputs, resumes and writes
exactly as the local path does (tools/bulk.py); Ray Data carries the listing (id, path, archive member) to a pool
of actors, each holding one Engine, which read, decode and score a batch with the local path's code and hand back
its rows as JSON text. Rows come back in input order (preserve_order), so the output matches the local path's.

Ray Data's actor pools restart a dead actor and retry its batches (max_restarts and max_task_retries default to
-1 there); a batch whose rows never reached the driver is scored again on a rerun, as locally. Every node reads
the inputs and the model at the driver's absolute paths (a shared filesystem) and needs this project installed.
Archive members are read per batch, so a large compressed tar is better unpacked first."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import ray
import ray.data

from runtime.cascade.bundle import VLMStageSpec, load_bundle
from runtime.cascade.settings import EngineSettings
from tools.bulk import Item, batch_rows, open_writer, read_ahead, write_scores


class Scorer:
    """A Ray Data actor: one Engine; a batch of listed items in, their rows (JSON text, input order) out."""

    def __init__(self, settings: EngineSettings, detail: bool, explain: bool, decode_threads: int, max_pixels: int,
                 threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.engine = settings.load()
        self.engine.warmup()
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self.detail, self.explain, self.max_pixels = detail, explain, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item(str(i), Path(p), str(m) or None) for i, p, m in zip(batch["id"], batch["path"], batch["member"])]
        loaded = list(read_ahead(items, self.pool, len(items), self.max_pixels, keep_bytes=False))
        rows = batch_rows(self.engine, loaded, self.detail, self.explain)
        return {"row": np.array([json.dumps(row) for row in rows], dtype=object)}


@contextlib.contextmanager
def cluster(address: str) -> Iterator[None]:
    """Ray as this process finds it (a test's ray.init), else "local" (start one) or the cluster at `address`,
    shut down after."""
    if ray.is_initialized():
        yield
        return
    local = address == "local"
    ray.init(address=address, logging_level=logging.WARNING, **({"include_dashboard": False} if local else {}))
    try:
        yield
    finally:
        ray.shutdown()


def actor_settings(settings: EngineSettings) -> EngineSettings:
    """What an actor loads: the model at its absolute path; on CUDA the one GPU Ray gives the actor (it sets
    CUDA_VISIBLE_DEVICES, so that GPU is cuda)."""
    device = "cuda" if settings.device.startswith("cuda") else settings.device
    return replace(settings, model=Path(os.path.abspath(settings.model)), device=device)


def pool_size(settings: EngineSettings, actors: int | None, cpus: int) -> int:
    """`actors`, else as many as the cluster holds: one per GPU on CUDA, one per `cpus` CPUs on CPU."""
    if actors is not None:
        assert actors >= 1, actors
        return actors
    resources = ray.cluster_resources()
    if settings.device.startswith("cuda"):
        if not resources.get("GPU"):
            raise ValueError(f"--device {settings.device}: the Ray cluster has no GPU")
        return int(resources["GPU"])
    return max(1, int(resources.get("CPU", 1) // cpus))


def score_on_ray(settings: EngineSettings, inputs: Sequence[str], out: Path, address: str = "local",
                 actors: int | None = None, detail: bool = False, explain: bool = False, decode_threads: int = 4,
                 max_pixels: int = 40_000_000, threads: int | None = None, progress: bool = True,
                 scorer: type = Scorer) -> dict:
    """Score `inputs` into `out` (resuming it) on Ray; returns the summary, as tools.score.score does. Each actor
    reserves `threads` CPUs (default 1) and runs that many torch threads; on CUDA also one GPU. `scorer`: the
    actor class (tests wrap it)."""
    if explain and not any(isinstance(s, VLMStageSpec) for s in load_bundle(settings.model).stages):
        raise ValueError(f"--explain needs a vlm stage; {settings.model} has none")
    cpus = threads or 1

    def batches(todo: list[Item]) -> Iterator[list[dict]]:
        if not todo:
            return
        listing = [{"id": i.id, "path": os.path.abspath(i.path), "member": i.member or ""} for i in todo]
        batch_size = settings.batch_size
        # One block per batch: each batch's rows reach the driver (and the output) as soon as it is scored.
        blocks = -(-len(listing) // batch_size)
        dataset = ray.data.from_items(listing, override_num_blocks=blocks)
        dataset = dataset.map_batches(
            scorer, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(blocks, pool_size(settings, actors, cpus))),
            num_cpus=cpus, num_gpus=1 if settings.device.startswith("cuda") else 0,
            fn_constructor_kwargs={"settings": actor_settings(settings), "detail": detail, "explain": explain,
                                   "decode_threads": decode_threads, "max_pixels": max_pixels, "threads": cpus})
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False  # tools.bulk's bar counts the rows written
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(text) for text in batch["row"]]

    with cluster(address):
        return write_scores(open_writer(out, detail), inputs, batches, progress).as_dict()
