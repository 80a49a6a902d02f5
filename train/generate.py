"""Write a reproducible synthetic roadwork dataset.

    python -m train.generate --out DIR --n N --seed S [--size 224] [--levels 0,1,2,3] [--workers 1]

Layout: DIR/roadwork/*.jpg and DIR/none/*.jpg (one folder per label, for image-folder loaders),
DIR/annotations.json (COCO detection boxes in the 224x224 augmented frame) and DIR/meta.jsonl (one line
per image: file, label, augmentation level and parameters, seed, index). Labels alternate, so any N gives
a 50/50 split (the extra one of an odd N is roadwork), like the subnet's challenges. Each image takes its
augmentation level uniformly from --levels, as the validator does.

Image i depends only on np.random.default_rng([seed, i]): make_sample(seed, i, size, levels) rebuilds it
alone, and the same arguments give byte-identical files (for the same Pillow / libjpeg build).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from train.augment import LEVELS, SIZE, AugmentParams, augment_with_boxes
from train.scenes import CLASSES, MIN_ROADWORK_SIDE, ROADWORK_CLASSES, render_scene

log = logging.getLogger(__name__)

LABEL_DIRS = ("none", "roadwork")
AUGMENT_TRIES = 10   # re-draws of a positive's augmentation that cropped every roadwork object away


@dataclass
class Sample:
    index: int
    file: str             # relative to the dataset root, e.g. "roadwork/000012.jpg"
    label: int            # 1 roadwork, 0 none
    level: int            # augmentation level actually applied
    jpeg: bytes
    boxes: np.ndarray     # (M, 4) float32 x0, y0, x1, y1 in the 224x224 frame
    classes: list[str]
    params: AugmentParams


def _shows_roadwork(boxes: np.ndarray, classes: list[str]) -> bool:
    side = MIN_ROADWORK_SIDE * SIZE
    return any(c in ROADWORK_CLASSES and max(b[2] - b[0], b[3] - b[1]) >= side for b, c in zip(boxes, classes))


def make_sample(seed: int, index: int, size: int = SIZE, levels: Sequence[int] = LEVELS) -> Sample:
    """Image `index` of the dataset with this seed: a scene rendered at `size`, then augmented to 224.

    A positive whose augmentation cropped away every roadwork object is re-augmented (up to
    AUGMENT_TRIES times, then shown whole at level 0), so label 1 always shows roadwork."""
    rng = np.random.default_rng([seed, index])
    label = 1 if index % 2 == 0 else 0
    level = int(levels[int(rng.integers(len(levels)))])
    scene = render_scene(rng, roadwork=bool(label), size=size)
    aug = augment_with_boxes(scene.image, scene.boxes, level, rng)
    if label:
        for _ in range(AUGMENT_TRIES):
            if _shows_roadwork(aug.boxes, [scene.classes[k] for k in aug.kept]):
                break
            aug = augment_with_boxes(scene.image, scene.boxes, level, rng)
        if not _shows_roadwork(aug.boxes, [scene.classes[k] for k in aug.kept]):
            level = 0
            aug = augment_with_boxes(scene.image, scene.boxes, level, rng)
            assert _shows_roadwork(aug.boxes, [scene.classes[k] for k in aug.kept]), "render_scene promised roadwork"
    classes = [scene.classes[k] for k in aug.kept]
    return Sample(index, f"{LABEL_DIRS[label]}/{index:06d}.jpg", label, level, aug.jpeg, aug.boxes, classes, aug.params)


def iter_samples(seed: int, n: int, size: int = SIZE, levels: Sequence[int] = LEVELS,
                 workers: int = 1) -> Iterator[Sample]:
    """Samples 0..n-1 in order; with workers > 1 they are made in parallel processes (same bytes)."""
    make = functools.partial(make_sample, seed, size=size, levels=tuple(levels))
    if workers <= 1:
        yield from map(make, range(n))
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(make, range(n), chunksize=8)


def _round(v: float) -> float:
    return round(float(v), 2)


class DatasetWriter:
    """Writes each sample's JPEG as it comes; annotations.json and meta.jsonl on finish()."""

    def __init__(self, out: Path, seed: int, size: int, levels: Sequence[int]):
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty; give a new or empty directory")
        for name in LABEL_DIRS:
            (out / name).mkdir(parents=True, exist_ok=True)
        self.out, self.seed, self.size, self.levels = out, seed, size, list(levels)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.meta: list[str] = []

    def add(self, s: Sample) -> None:
        (self.out / s.file).write_bytes(s.jpeg)
        self.images.append({"id": s.index, "file_name": s.file, "width": SIZE, "height": SIZE, "label": s.label,
                            "level": s.level})
        for box, cls in zip(s.boxes, s.classes):
            x0, y0, x1, y1 = (_round(v) for v in box)
            w, h = _round(x1 - x0), _round(y1 - y0)
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": s.index,
                                     "category_id": CLASSES.index(cls) + 1, "bbox": [x0, y0, w, h],
                                     "area": _round(w * h), "iscrowd": 0})
        params = asdict(s.params)
        params["angle"] = round(params["angle"], 4)
        self.meta.append(json.dumps({"file": s.file, "label": s.label, "level": s.level, "seed": self.seed,
                                     "index": s.index, "size": self.size, "augment": params}))

    def finish(self) -> None:
        coco = {
            "info": {"description": "roadwork-cascade synthetic street scenes", "seed": self.seed,
                     "render_size": self.size, "levels": self.levels},
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "roadwork" if c in ROADWORK_CLASSES else "other"}
                           for i, c in enumerate(CLASSES)],
        }
        (self.out / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
        (self.out / "meta.jsonl").write_text("".join(line + "\n" for line in self.meta))


def write_dataset(out: Path, seed: int, n: int, size: int = SIZE, levels: Sequence[int] = LEVELS, workers: int = 1,
                  progress: Callable[[Iterator[Sample]], Iterable[Sample]] = iter) -> DatasetWriter:
    """Images 0..n-1 of the dataset with this seed, written to `out` (new or empty); `progress` wraps the samples
    (a progress bar)."""
    writer = DatasetWriter(out, seed, size, levels)
    for sample in progress(iter_samples(seed, n, size, levels, workers)):
        writer.add(sample)
    writer.finish()
    return writer


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels must be comma-separated integers, got {text!r}") from None
    if not levels or any(v not in LEVELS for v in levels):
        raise argparse.ArgumentTypeError(f"--levels must be drawn from {LEVELS}, got {text!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="new or empty directory")
    ap.add_argument("--n", type=int, required=True, help="number of images")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=int, default=SIZE, help="render size before augmentation (default 224)")
    ap.add_argument("--levels", type=_levels, default=LEVELS, help="augmentation levels to draw from, e.g. 0,1,2,3")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1, got {args.n}")
    if args.size < 32:
        ap.error(f"--size must be at least 32, got {args.size}")
    if args.seed < 0:
        ap.error(f"--seed must be non-negative, got {args.seed}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        writer = write_dataset(args.out, args.seed, args.n, args.size, args.levels, args.workers,
                               lambda samples: tqdm(samples, total=args.n, unit="img", file=sys.stderr))
    except ValueError as e:
        ap.error(str(e))
    log.info("wrote %d images, %d boxes to %s", len(writer.images), len(writer.annotations), args.out)


if __name__ == "__main__":
    main()
