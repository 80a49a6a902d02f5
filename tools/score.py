"""Score images in bulk: files, folders (recursive), globs and tar archives, into jsonl, csv or parquet.

    python -m tools.score PATH... --out results.jsonl [--model bundles/default] [--detail] [--explain]
                          [--hardcases DIR [--hardcases-rules FILE]] [--decode-threads 4] [--summary s.json]

Decode threads read and decode ahead while the engine runs full batches (--max-batch images per Engine.predict,
the server's default). Rows are written as each batch finishes; a rerun with the same --out skips every image
already there (resume), so an interrupted run loses at most the batch in flight. A file that cannot be read or
decoded becomes a row with `error` set; the run goes on. At the end: counts per label and per deciding stage,
errors, and throughput. Parquet needs pyarrow (`pip install -e '.[parquet]'`): rows go to
OUT.partial.jsonl as they come and OUT is written from them at the end."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from runtime.image_decode import ImageDecodeError, decode_image
from runtime.cascade.settings import add_engine_flags, engine_settings
from server.hardcase_store import cut_torn_tail

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COLUMNS = ("id", "prediction", "label", "stage", "degraded", "error", "scores")
DETAIL_COLUMNS = ("detector_scores", "boxes", "tokens")
PARQUET_EXTRA = "pip install -e '.[parquet]'"  # as README.md says it


@dataclass(frozen=True)
class Item:
    id: str                     # the file path, or ARCHIVE::MEMBER
    path: Path                  # the file, or the archive
    member: str | None = None   # the archive member


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def tar_items(path: Path) -> list[Item]:
    with tarfile.open(path) as archive:
        return [Item(f"{path}::{m.name}", path, m.name) for m in archive.getmembers()
                if m.isfile() and is_image_name(m.name)]


def collect(inputs: Sequence[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items to score, in input order (folders and archives sorted inside), each once; and (input, problem) for
    inputs that name nothing."""
    items: list[Item] = []
    problems: list[tuple[str, str]] = []

    def add(path: Path) -> None:
        if path.is_dir():
            items.extend(Item(str(p), p) for p in sorted(path.rglob("*")) if p.is_file() and is_image_name(p.name))
        elif path.is_file() and is_tar(path):
            try:
                items.extend(tar_items(path))
            except (tarfile.TarError, OSError) as e:
                problems.append((str(path), f"unreadable tar archive: {e}"))
        elif path.is_file():
            items.append(Item(str(path), path))  # named explicitly: scored whatever its suffix
        else:
            problems.append((str(path), "no such file or directory"))

    for text in inputs:
        if not Path(text).exists() and glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                problems.append((text, "the pattern matches nothing"))
            for match in matches:
                add(Path(match))
        else:
            add(Path(text))
    seen: set[str] = set()
    unique = [i for i in items if not (i.id in seen or seen.add(i.id))]
    return unique, problems


# --- output --------------------------------------------------------------------------------------------------

def row_of(item_id: str, result: Any, detail: bool) -> dict:
    row = {"id": item_id, "prediction": result.prediction, "label": result.label, "stage": result.stage,
           "degraded": result.degraded, "error": None, "scores": dict(result.scores)}
    if detail:
        row["detector_scores"] = dict(result.detector_scores)
        row["boxes"] = None if result.boxes is None else [
            {"detector": b.detector, "label": b.label, "score": b.score, "xyxy": list(b.xyxy)} for b in result.boxes]
        row["tokens"] = result.tokens
    if result.explanation is not None:
        row["explanation"] = result.explanation
    return row


def error_row(item_id: str, error: str) -> dict:
    return {"id": item_id, "prediction": None, "label": None, "stage": None, "degraded": None, "error": error,
            "scores": None}


def read_jsonl_ids(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    return rows


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        cut_torn_tail(path)
        self.done = {row["id"] for row in read_jsonl_ids(path)}
        self.file = open(path, "a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CsvWriter:
    """Nested values (scores, boxes) as JSON text; newlines in an explanation become spaces (one line per row)."""

    def __init__(self, path: Path, detail: bool) -> None:
        cut_torn_tail(path)
        self.done: set[str] = set()
        self.columns = list(COLUMNS) + (list(DETAIL_COLUMNS) if detail else []) + ["explanation"]
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.columns:
                    raise ValueError(f"{path} has columns {reader.fieldnames}, this run writes {self.columns} (was "
                                     f"it written with a different --detail?)")
                self.done = {row["id"] for row in reader}
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, self.columns)
        if fresh:
            self.writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            cells = {}
            for column in self.columns:
                value = row.get(column)
                if isinstance(value, (dict, list)):
                    value = json.dumps(value)
                elif isinstance(value, str):
                    value = value.replace("\r", " ").replace("\n", " ")
                cells[column] = "" if value is None else value
            self.writer.writerow(cells)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ParquetWriter:
    """Rows to OUT.partial.jsonl as they come; close() writes OUT with every row (earlier runs' included)."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet  # noqa: F401  (fail before scoring when the extra is missing)

        self.path = path
        self.partial = path.with_name(path.name + ".partial.jsonl")
        self.earlier = self._read_parquet() if path.exists() else []
        self.jsonl = JsonlWriter(self.partial)
        self.done = self.jsonl.done | {row["id"] for row in self.earlier}

    def _read_parquet(self) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(self.path).to_pylist()

    def write(self, rows: list[dict]) -> None:
        self.jsonl.write(rows)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.jsonl.close()
        rows = self.earlier + [flatten(row) for row in read_jsonl_ids(self.partial)]
        table = pa.Table.from_pylist(rows, schema=parquet_schema(rows))
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        self.partial.unlink()


def flatten(row: dict) -> dict:
    """Nested values as JSON text: one flat schema however many stages or boxes a row has."""
    return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}


def parquet_schema(rows: list[dict]):
    import pyarrow as pa

    types = {"prediction": pa.float64(), "degraded": pa.bool_()}
    names = list(dict.fromkeys(k for row in rows for k in row)) or list(COLUMNS)
    return pa.schema([(name, types.get(name, pa.string())) for name in names])


def open_writer(path: Path, detail: bool):
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"--out {path}: the suffix must be one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return CsvWriter(path, detail)
    if fmt == "parquet":
        try:
            return ParquetWriter(path)
        except ImportError:
            raise ValueError(f"--out *.parquet needs pyarrow: {PARQUET_EXTRA}") from None
    return JsonlWriter(path)


# --- scoring -------------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    item: Item
    image: Any = None           # decoded RGB array
    data: bytes | None = None   # the encoded bytes, kept for the hard-case capture
    error: str | None = None


def load(item: Item, data: bytes | None, max_pixels: int, keep_bytes: bool) -> Loaded:
    """Decode-thread work: read (files; archive members arrive read) and decode."""
    try:
        if data is None:
            data = item.path.read_bytes()
        image = decode_image(data, max_pixels)
    except ImageDecodeError as e:
        return Loaded(item, error=f"{e.code}: {e}")
    except OSError as e:
        return Loaded(item, error=f"unreadable: {e.strerror or e}")
    return Loaded(item, image, data if keep_bytes else None)


def read_ahead(items: list[Item], pool: ThreadPoolExecutor, ahead: int, max_pixels: int,
               keep_bytes: bool) -> Iterator[Loaded]:
    """Loaded items in order, with up to `ahead` reads/decodes in flight. Archive members are read here, in
    archive order (a tarfile is not thread-safe; compressed ones only read forward)."""
    pending: deque[Future] = deque()
    archives: dict[Path, tarfile.TarFile] = {}
    try:
        for item in items:
            data = None
            if item.member is not None:
                try:
                    archive = archives.get(item.path) or archives.setdefault(item.path, tarfile.open(item.path))
                    data = archive.extractfile(item.member).read()
                except (tarfile.TarError, OSError, AttributeError) as e:
                    pending.append(done_future(Loaded(item, error=f"unreadable archive member: {e}")))
                    continue
            pending.append(pool.submit(load, item, data, max_pixels, keep_bytes))
            while len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for archive in archives.values():
            archive.close()


def done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


@dataclass
class Summary:
    inputs: int = 0             # items found
    skipped: int = 0            # already in --out (resume)
    scored: int = 0
    errors: int = 0
    degraded: int = 0
    seconds: float = 0.0        # wall time of the scoring loop
    labels: Counter = None
    stages: Counter = None
    hardcases: dict | None = None

    def __post_init__(self) -> None:
        self.labels, self.stages = Counter(), Counter()

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "skipped_already_scored": self.skipped, "scored": self.scored,
                "errors": self.errors, "degraded": self.degraded, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.scored / self.seconds, 2) if self.seconds else 0.0,
                "labels": dict(self.labels), "stages": dict(self.stages),
                **({"hardcases": self.hardcases} if self.hardcases is not None else {})}


def format_summary(s: dict) -> str:
    lines = [f"scored {s['scored']} images in {s['seconds']:.2f} s ({s['images_per_s']:.1f} images/s); "
             f"{s['errors']} errors, {s['skipped_already_scored']} already in the output, {s['degraded']} degraded",
             "  labels: " + (", ".join(f"{k} {v}" for k, v in sorted(s["labels"].items())) or "-"),
             "  stages: " + (", ".join(f"{k} {v}" for k, v in sorted(s["stages"].items())) or "-")]
    if "hardcases" in s:
        h = s["hardcases"]
        lines.append(f"  hard cases captured: {h['captured'] or '-'}; dropped: {h['dropped'] or '-'}")
    return "\n".join(lines)


def score(engine: Any, inputs: Sequence[str], out: Path, detail: bool = False, explain: bool = False,
          decode_threads: int = 4, capture: Any = None, max_pixels: int = 40_000_000,
          progress: bool = True) -> dict:
    """Score `inputs` into `out` (resuming it); returns the summary. `capture`: a started HardCaseCapture."""
    from tqdm import tqdm

    items, problems = collect(inputs)
    writer = open_writer(out, detail)
    summary = Summary(inputs=len(items) + len(problems))
    try:
        todo = [i for i in items if i.id not in writer.done]
        fresh_problems = [error_row(text, problem) for text, problem in problems if text not in writer.done]
        summary.skipped = len(items) - len(todo) + len(problems) - len(fresh_problems)
        if fresh_problems:
            writer.write(fresh_problems)
            summary.errors += len(fresh_problems)
        batch_size = engine.max_batch
        bar = tqdm(total=len(todo), unit="img", desc="score", file=sys.stderr, disable=not progress,
                   smoothing=0.1)
        start = time.perf_counter()
        with ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as pool:
            batch: list[Loaded] = []
            failed: list[dict] = []
            # Two batches decoding ahead keep the decode threads busy while the engine runs one.
            for loaded in read_ahead(todo, pool, 2 * batch_size + decode_threads, max_pixels, capture is not None):
                if loaded.error is not None:
                    failed.append(error_row(loaded.item.id, loaded.error))
                else:
                    batch.append(loaded)
                if len(batch) == batch_size:
                    run_batch(engine, batch, failed, writer, summary, detail, explain, capture, bar)
                    batch, failed = [], []
            run_batch(engine, batch, failed, writer, summary, detail, explain, capture, bar)
        summary.seconds = time.perf_counter() - start
        bar.close()
    finally:
        writer.close()
    if capture is not None:
        capture.close()
        summary.hardcases = capture.summary()
    return summary.as_dict()


def run_batch(engine: Any, batch: list[Loaded], failed: list[dict], writer: Any, summary: Summary, detail: bool,
              explain: bool, capture: Any, bar: Any) -> None:
    rows = list(failed)
    summary.errors += len(failed)
    if batch:
        results = engine.predict([b.image for b in batch], boxes=detail or capture is not None,
                                 explain=[True] * len(batch) if explain else None)
        for loaded, result in zip(batch, results):
            rows.append(row_of(loaded.item.id, result, detail))
            summary.scored += 1
            summary.labels[result.label] += 1
            summary.stages[result.stage] += 1
            summary.degraded += result.degraded
            if capture is not None:
                capture.offer(loaded.data, result, source=loaded.item.id)
    if rows:
        writer.write(rows)
    bar.update(len(batch) + len(failed))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.score", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("paths", nargs="+", help="image files, folders (recursive), glob patterns, tar archives")
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
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import functools

    import torch

    from runtime.errors import ModelLoadError
    from server.hardcase_capture import CaptureConfig, HardCaseCapture, engine_digest, vlm_stage_name

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
            summary = score(engine, args.paths, args.out, args.detail, args.explain, args.decode_threads, capture,
                            args.max_pixels, progress=not args.no_progress)
        except ValueError as e:
            if capture is not None:
                capture.close()
            ap.error(str(e))
    finally:
        engine.close()
    print(format_summary(summary), file=sys.stderr)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
