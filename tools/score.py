"""Score images in bulk: files, folders (recursive), globs, tar archives and file lists (a .txt of one path per
line, or a .parquet with a `path` column; relative to the list), into jsonl, csv or parquet.

    python -m tools.score PATH... --out results.jsonl [--model bundles/default] [--detail] [--explain]
                          [--hardcases DIR [--hardcases-rules FILE]] [--decode-threads 4] [--summary s.json]
    python -m tools.score PATH... --out results.jsonl --ray [ADDRESS] [--ray-actors N]

Decode threads read and decode ahead while the engine runs full batches (--max-batch images per Engine.predict,
the server's default). Rows are written as each batch finishes; a rerun with the same --out skips every image
already there (resume), so an interrupted run loses at most the batch in flight. A file that cannot be read or
decoded becomes a row with `error` set; the run goes on. At the end: counts per label and per deciding stage,
errors, and throughput. Parquet needs pyarrow (`pip install -e '.[parquet]'`): rows go to
OUT.partial.jsonl as they come and OUT is written from them at the end.

--ray scores on Ray Data (tools/score_ray.py; `pip install -e '.[ray]'`): a local Ray it starts, or with ADDRESS
("auto", host:port, ray://...) the cluster there; a pool of actors each holding one Engine (one GPU each with
--device cuda), the same rows, summary and resume. Write --ray after the paths, or --ray=ADDRESS."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from runtime.cascade.settings import EngineSettings, add_engine_flags, engine_settings
from tools.bulk import FORMATS, Item, batch_rows, format_summary, open_writer, read_ahead, write_scores

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install -e '.[ray]'"


def score(engine: Any, inputs: Sequence[str], out: Path, detail: bool = False, explain: bool = False,
          decode_threads: int = 4, capture: Any = None, max_pixels: int = 40_000_000,
          progress: bool = True) -> dict:
    """Score `inputs` into `out` (resuming it) in this process; returns the summary. `capture`: a started
    HardCaseCapture."""

    def batches(todo: list[Item]) -> Iterator[list[dict]]:
        with ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as pool:
            batch, decoded = [], 0
            # Two batches decoding ahead keep the decode threads busy while the engine runs one; a batch is full
            # when it holds max_batch decoded images (the ones that failed ride along as error rows).
            for loaded in read_ahead(todo, pool, 2 * engine.max_batch + decode_threads, max_pixels,
                                     capture is not None):
                batch.append(loaded)
                decoded += loaded.error is None
                if decoded == engine.max_batch:
                    yield batch_rows(engine, batch, detail, explain, capture)
                    batch, decoded = [], 0
            if batch:
                yield batch_rows(engine, batch, detail, explain, capture)

    summary = write_scores(open_writer(out, detail), inputs, batches, progress)
    if capture is not None:
        capture.close()
        summary.hardcases = capture.summary()
    return summary.as_dict()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.score", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("paths", nargs="+", help="image files, folders (recursive), glob patterns, tar archives, file lists (.txt: a path per line; "
                         ".parquet: a 'path' column)")
    ap.add_argument("--out", type=Path, required=True, help="results file: .jsonl, .csv or .parquet")
    add_engine_flags(ap)
    ap.add_argument("--decode-threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--max-pixels", type=int, default=40_000_000, help="larger decoded images become error rows")
    ap.add_argument("--detail", action="store_true", help="also write detector scores, boxes and VLM tokens")
    ap.add_argument("--explain", action="store_true", help="have the VLM stage explain every image (slow)")
    ap.add_argument("--hardcases", type=Path, help="capture hard cases into this directory (the server's rules)")
    ap.add_argument("--hardcases-rules", type=Path, help="TOML with capture rates and caps")
    ap.add_argument("--summary", type=Path, help="also write the summary here as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="score on Ray Data: a local Ray this starts, or the cluster at ADDRESS ('auto', host:port, "
                         f"ray://...); write it after the paths or as --ray=ADDRESS ({RAY_EXTRA})")
    ap.add_argument("--ray-actors", type=int, help="with --ray: actors, each one Engine (default: one per GPU with "
                                                   "--device cuda, else one per --threads CPUs of the cluster)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    settings = engine_settings(ap, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.hardcases_rules and not args.hardcases:
        ap.error("--hardcases-rules needs --hardcases")
    if args.decode_threads < 1:
        ap.error(f"--decode-threads must be >= 1, got {args.decode_threads}")
    if args.out.suffix.lower() not in FORMATS:
        ap.error(f"--out {args.out}: the suffix must be one of {', '.join(FORMATS)}")
    summary = score_ray_cli(ap, args, settings) if args.ray is not None else score_cli(ap, args, settings)
    print(format_summary(summary), file=sys.stderr)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def score_cli(ap: argparse.ArgumentParser, args: argparse.Namespace, settings: EngineSettings) -> dict:
    import functools

    import torch

    from runtime.errors import ModelLoadError
    from imagesets.hardcase_capture import CaptureConfig, HardCaseCapture, engine_digest, vlm_stage_name

    if args.ray_actors is not None:
        ap.error("--ray-actors needs --ray")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rules = CaptureConfig.from_toml(args.hardcases_rules) if args.hardcases_rules else CaptureConfig()
        engine = settings.load()
    except (ModelLoadError, ValueError) as e:
        ap.error(str(e))
    try:
        if args.explain and engine.vlm_stats() is None:
            ap.error(f"--explain needs a vlm stage; {args.model} has none")
        engine.warmup()
        capture = None
        if args.hardcases:
            capture = HardCaseCapture(args.hardcases, rules, functools.partial(engine_digest, engine),
                                      vlm_stage_name(engine))
            capture.start()
        try:
            return score(engine, args.paths, args.out, args.detail, args.explain, args.decode_threads, capture,
                         args.max_pixels, progress=not args.no_progress)
        except ValueError as e:
            if capture is not None:
                capture.close()
            ap.error(str(e))
    finally:
        engine.close()


def score_ray_cli(ap: argparse.ArgumentParser, args: argparse.Namespace, settings: EngineSettings) -> dict:
    if args.hardcases:
        ap.error("--hardcases captures in this process, not on Ray: run without --ray")
    if Path(args.ray).exists():
        ap.error(f"--ray {args.ray}: that is an input path; write --ray after the paths, or --ray=ADDRESS")
    if args.ray_actors is not None and args.ray_actors < 1:
        ap.error(f"--ray-actors must be >= 1, got {args.ray_actors}")
    try:
        from tools.score_ray import score_on_ray
    except ImportError as e:  # no ray: say which extra, not a traceback
        sys.exit(f"python -m tools.score --ray: {e}; install the extra: {RAY_EXTRA}")
    try:
        return score_on_ray(settings, args.paths, args.out, args.ray, args.ray_actors, args.detail, args.explain,
                            args.decode_threads, args.max_pixels, args.threads, progress=not args.no_progress)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
