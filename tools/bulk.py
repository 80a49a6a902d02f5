"""Bulk scoring's parts that the local path (tools/score.py) and the Ray path (tools/score_ray.py) share: the input
listing, reading and decoding, scoring one batch into rows, the writers (jsonl, csv, parquet; resume), the summary,
and the loop that writes each batch's rows as it comes. Both paths list, score, write and count through these, so
their outputs are the same."""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

from imagesets.durable import cut_torn_tail
from runtime.image_decode import ImageDecodeError, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
LIST_SUFFIXES = (".txt", ".parquet")  # file lists: a path per line; a table with a `path` column
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


def listed_paths(path: Path) -> list[Path]:
    """The images a file list names: a .txt of one path per line (blank lines and '#' comments skipped), or a
    .parquet table's `path` column; relative paths are relative to the list's folder."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"a parquet input needs pyarrow: {PARQUET_EXTRA}") from None
        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise ValueError(f"no 'path' column (columns: {', '.join(table.column_names)})")
        names = [str(v) for v in table.column("path").to_pylist() if v is not None]
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        names = [line for line in lines if line and not line.startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, names)]


def collect(inputs: Sequence[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items to score, in input order (folders and archives sorted inside, file lists in their order), each once;
    and (input, problem) for inputs that name nothing. A listed file that does not read is an error row."""
    items: list[Item] = []
    problems: list[tuple[str, str]] = []

    def add(path: Path) -> None:
        if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            try:
                items.extend(Item(str(p), p) for p in listed_paths(path))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                problems.append((str(path), f"unreadable file list: {e}"))
        elif path.is_dir():
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

    def count(self, rows: list[dict]) -> None:
        for row in rows:
            if row["error"] is not None:
                self.errors += 1
                continue
            self.scored += 1
            self.labels[row["label"]] += 1
            self.stages[row["stage"]] += 1
            self.degraded += row["degraded"]

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


def batch_rows(engine: Any, batch: list[Loaded], detail: bool, explain: bool, capture: Any = None) -> list[dict]:
    """The rows of `batch` in its order: the decoded images scored in one Engine.predict, the rest error rows.
    `capture`: a started HardCaseCapture offered every result (its items need their bytes kept)."""
    good = [b for b in batch if b.error is None]
    results = iter(engine.predict([b.image for b in good], boxes=detail or capture is not None,
                                  explain=[True] * len(good) if explain else None) if good else [])
    rows = []
    for loaded in batch:
        if loaded.error is not None:
            rows.append(error_row(loaded.item.id, loaded.error))
            continue
        result = next(results)
        rows.append(row_of(loaded.item.id, result, detail))
        if capture is not None:
            capture.offer(loaded.data, result, source=loaded.item.id)
    return rows


def write_scores(writer: Any, inputs: Sequence[str],
                 score_items: Callable[[list[Item]], Generator[list[dict], None, None]], progress: bool) -> Summary:
    """List `inputs`, skip what `writer` already holds (resume), write a row for each input that names nothing,
    then the rows of every batch `score_items(todo)` yields, as it yields them; closes `writer`."""
    from tqdm import tqdm

    try:
        items, problems = collect(inputs)
        summary = Summary(inputs=len(items) + len(problems))
        todo = [i for i in items if i.id not in writer.done]
        fresh_problems = [error_row(text, problem) for text, problem in problems if text not in writer.done]
        summary.skipped = len(items) - len(todo) + len(problems) - len(fresh_problems)
        if fresh_problems:
            writer.write(fresh_problems)
            summary.count(fresh_problems)
        bar = tqdm(total=len(todo), unit="img", desc="score", file=sys.stderr, disable=not progress,
                   smoothing=0.1)
        start = time.perf_counter()
        with contextlib.closing(score_items(todo)) as batches:  # on an interruption too: decode pool, Ray actors
            for rows in batches:
                writer.write(rows)
                summary.count(rows)
                bar.update(len(rows))
        summary.seconds = time.perf_counter() - start
        bar.close()
    finally:
        writer.close()
    return summary
