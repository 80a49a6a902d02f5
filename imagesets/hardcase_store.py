"""A hard-case dataset on disk: captured images with the cascade's answers, written so that a crash at any moment
(kill -9, power loss after fsync) leaves a loadable dataset.

    DIR/data/<id>.<ext>    the image bytes as received; id = the first 32 hex digits of their sha256
    DIR/index.jsonl        append-only, one Sample per line: the source of truth (a torn last line is ignored)
    DIR/labels.json        FiftyOneImageClassificationDataset labels, rebuilt from the index (compaction)
    DIR/detections.json    COCO detection labels of the samples the detectors saw (their roadwork boxes)
    DIR/.tmp/              files being written; moved into place with os.replace once fsynced

An image is durable in data/ before its index line is written, and labels.json/detections.json are replaced
whole, so every file a labels file names exists. One writer per directory (an flock on DIR/.lock); readers need
no lock. No runtime imports: the server, tools.score and tools.hardcases all use it."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

from PIL import Image

from imagesets.durable import cut_torn_tail, write_atomic

log = logging.getLogger(__name__)

INDEX, LABELS, DETECTIONS = "index.jsonl", "labels.json", "detections.json"
CLASSES = ("none", "roadwork")  # the FiftyOne class list; a sample's target is its predicted label's index
ID_HEX = 32
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class Sample:
    id: str                                  # sha256(image)[:32]: equal images share it across replicas
    file: str                                # path under the dataset directory, "data/<id>.<ext>"
    captured_at: float                       # unix time
    rules: list[str]                         # every capture rule the image matched
    captured_by: str                         # the rule whose sampling draw captured it
    prediction: float                        # final P(roadwork)
    label: str                               # "roadwork" if prediction > 0.5 else "none"
    stage: str                               # the stage that decided
    width: int
    height: int
    model_digest: str
    source: str                              # "server", or the path tools.score read it from
    scores: dict[str, float] = field(default_factory=dict)           # each stage's P(roadwork)
    detector_scores: dict[str, float] = field(default_factory=dict)
    degraded: bool = False
    boxes: list[dict] | None = None          # {"detector", "label", "score", "xyxy"}; None: detectors did not run
    explanation: str | None = None

    @classmethod
    def from_dict(cls, row: dict) -> Sample:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.captured_at))


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:ID_HEX]


def image_format(data: bytes) -> tuple[str, int, int]:
    """(file extension, width, height) from the image header; raises ValueError for what PIL cannot identify."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return EXTENSIONS.get(im.format or "", (im.format or "img").lower()), im.width, im.height
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not an image PIL can identify: {e}") from None


def read_index(root: str | Path) -> list[Sample]:
    """Every complete line of DIR/index.jsonl, first capture of each id only. A line without its newline is a
    write that a crash cut short: skipped."""
    path = Path(root) / INDEX
    if not path.is_file():
        return []
    samples, seen = [], set()
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                log.warning("%s:%d: incomplete last line (a crash mid-write); ignored", path, number)
                break
            try:
                sample = Sample.from_dict(json.loads(line))
            except (ValueError, TypeError) as e:
                log.warning("%s:%d: unreadable line ignored: %s", path, number, e)
                continue
            if sample.id not in seen:
                seen.add(sample.id)
                samples.append(sample)
    return samples


def fiftyone_labels(samples: Iterable[Sample]) -> dict:
    """FiftyOneImageClassificationDataset labels.json: {"classes", "labels": {uuid: {"label", "confidence",
    "attributes"}}}, uuid = the file name under data/ without extension. The label is the cascade's answer (what a
    reviewer corrects); attributes hold the per-sample metadata as flat fields FiftyOne stores on the label."""
    labels = {}
    for s in samples:
        attributes = {"p_roadwork": s.prediction, "stage": s.stage, "rules": list(s.rules),
                      "captured_by": s.captured_by, "captured_at": s.captured_at, "day": s.day,
                      "model_digest": s.model_digest, "source": s.source, "degraded": s.degraded,
                      "sha256_32": s.id}
        attributes.update({f"score_{stage}": p for stage, p in s.scores.items()})
        attributes.update({f"detector_{name}": p for name, p in s.detector_scores.items()})
        if s.explanation is not None:
            attributes["explanation"] = s.explanation
        labels[Path(s.file).stem] = {"label": CLASSES.index(s.label),
                                     "confidence": s.prediction if s.label == "roadwork" else 1.0 - s.prediction,
                                     "attributes": attributes}
    return {"classes": list(CLASSES), "labels": labels}


def coco_labels(samples: Iterable[Sample]) -> dict:
    """COCO detection labels of the samples the detectors saw: images (file_name relative to data/), one category
    per box label, annotations with bbox [x, y, w, h] in pixels and the detector's score. An image the detectors
    saw without finding a box is listed with no annotations (a reviewed negative is data too)."""
    seen = [s for s in samples if s.boxes is not None]
    names = sorted({box["label"] for s in seen for box in s.boxes})
    category = {name: i for i, name in enumerate(names, start=1)}
    images, annotations = [], []
    for image_number, s in enumerate(seen, start=1):
        images.append({"id": image_number, "file_name": Path(s.file).name, "width": s.width, "height": s.height,
                       "sha256_32": s.id, "p_roadwork": s.prediction, "stage": s.stage})
        for box in s.boxes:
            x0, y0, x1, y1 = box["xyxy"]
            w, h = max(0.0, x1 - x0), max(0.0, y1 - y0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_number,
                                "category_id": category[box["label"]], "bbox": [x0, y0, w, h], "area": w * h,
                                "iscrowd": 0, "score": box["score"], "detector": box["detector"]})
    return {"info": {"description": "roadwork-cascade hard cases: detector boxes", "version": "1.0"},
            "licenses": [], "categories": [{"id": i, "name": n, "supercategory": "roadwork"}
                                           for n, i in category.items()],
            "images": images, "annotations": annotations}


def dumps(payload: dict) -> bytes:
    return json.dumps(payload, indent=1, sort_keys=False).encode() + b"\n"


class HardCaseStore:
    """The single writer of one dataset directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.data, self.tmp = self.root / "data", self.root / ".tmp"
        for d in (self.root, self.data, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{self.root} is being written by another process (its .lock is held); give each "
                               f"replica a directory of its own and merge them with `python -m tools.hardcases "
                               f"merge`") from None
        for leftover in self.tmp.iterdir():  # a crash between write and rename
            leftover.unlink()
        cut_torn_tail(self.root / INDEX)
        self.samples = read_index(self.root)
        self.ids = {s.id for s in self.samples}
        known = {Path(s.file).name for s in self.samples}
        for orphan in self.data.iterdir():  # durable image whose index line a crash prevented
            if orphan.name not in known:
                orphan.unlink()
        self.bytes = sum(p.stat().st_size for p in self.data.iterdir()) + self._index_size()
        self._index = open(self.root / INDEX, "ab")
        self.compacted = len(self.samples)
        if not (self.root / LABELS).exists() or not (self.root / DETECTIONS).exists():
            self.compact()

    def _index_size(self) -> int:
        path = self.root / INDEX
        return path.stat().st_size if path.exists() else 0

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.ids

    def add(self, data: bytes, sample: Sample) -> None:
        """Image durable in data/, then its index line durable. sample.id/file must come from image_id/format."""
        assert sample.id not in self.ids and sample.file.startswith("data/"), sample.id
        write_atomic(self.root / sample.file, data, self.tmp)
        line = json.dumps(asdict(sample), separators=(",", ":")).encode() + b"\n"
        self._index.write(line)
        self._index.flush()
        os.fsync(self._index.fileno())
        self.samples.append(sample)
        self.ids.add(sample.id)
        self.bytes += len(data) + len(line)

    def add_image(self, data: bytes, **meta) -> Sample | None:
        """Identify, name and add an image; None if the store has it already. Raises ValueError for non-images."""
        sample_id = image_id(data)
        if sample_id in self.ids:
            return None
        ext, width, height = image_format(data)
        sample = Sample(id=sample_id, file=f"data/{sample_id}.{ext}", width=width, height=height, **meta)
        self.add(data, sample)
        return sample

    @property
    def dirty(self) -> bool:
        return self.compacted != len(self.samples)

    def compact(self) -> None:
        """Rewrite labels.json and detections.json from the index (each atomically)."""
        write_atomic(self.root / LABELS, dumps(fiftyone_labels(self.samples)), self.tmp)
        write_atomic(self.root / DETECTIONS, dumps(coco_labels(self.samples)), self.tmp)
        self.compacted = len(self.samples)

    def close(self) -> None:
        if self._index.closed:
            return
        if self.dirty:
            self.compact()
        self._index.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def __enter__(self) -> HardCaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export(samples: list[Sample], source: Path, out: Path, fmt: str) -> int:
    """Copy the samples' images to OUT/data and write OUT/labels.json in `fmt` ("fiftyone" or "coco"); returns the
    number of images written. COCO keeps only the samples the detectors saw."""
    assert fmt in ("fiftyone", "coco"), fmt
    if fmt == "coco":
        samples = [s for s in samples if s.boxes is not None]
    (out / "data").mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp"
    tmp.mkdir(exist_ok=True)
    for s in samples:
        target = out / "data" / Path(s.file).name
        if not target.exists():
            write_atomic(target, (source / s.file).read_bytes(), tmp)
    labels = fiftyone_labels(samples) if fmt == "fiftyone" else coco_labels(samples)
    write_atomic(out / LABELS, dumps(labels), tmp)
    with contextlib.suppress(OSError):
        tmp.rmdir()
    return len(samples)


def merge(sources: list[Path], out: Path) -> tuple[int, int]:
    """Add every sample of `sources` (oldest capture first) to the store at `out`, once per image hash; returns
    (added, duplicates skipped)."""
    rows = sorted(((s, src) for src in sources for s in read_index(src)), key=lambda row: row[0].captured_at)
    added = duplicates = 0
    with HardCaseStore(out) as store:
        for sample, src in rows:
            if sample.id in store:
                duplicates += 1
                continue
            store.add((src / sample.file).read_bytes(), sample)
            added += 1
    return added, duplicates
