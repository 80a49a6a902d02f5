"""Labeled image folders, the layout train.generate writes and tools.eval, tools.tune and train read:

    DIR/none/*, DIR/roadwork/*   the images (JPEG, PNG or WebP); the folder is the label
    DIR/meta.jsonl               optional: one JSON object per image, {"file": "roadwork/000012.jpg", "level": 3},
                                 the augmentation level it was generated at"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABEL_DIRS = ("none", "roadwork")   # index = label
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class LabeledSet:
    root: Path
    files: list[str]        # relative to root, e.g. "roadwork/000012.jpg"
    labels: np.ndarray      # (N,) int64: 1 roadwork, 0 none
    levels: np.ndarray      # (N,) int64 augmentation level, -1 where meta.jsonl says nothing

    def __len__(self) -> int:
        return len(self.files)

    def spread(self, n: int) -> LabeledSet:
        """n images evenly spaced over the sorted list, so both labels stay represented."""
        pick = np.unique(np.linspace(0, len(self) - 1, min(n, len(self))).round().astype(np.int64))
        return LabeledSet(self.root, [self.files[i] for i in pick], self.labels[pick], self.levels[pick])


def read_levels(root: Path) -> dict[str, int]:
    """file -> augmentation level from root/meta.jsonl (empty when there is none)."""
    path = root / "meta.jsonl"
    if not path.is_file():
        return {}
    levels = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            levels[str(row["file"])] = int(row["level"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'file' and integer 'level' ({e})") from e
    return levels


def list_labeled(root: str | Path) -> LabeledSet:
    """Every image under root/none and root/roadwork, sorted by path, with levels when meta.jsonl has them."""
    root = Path(root)
    files, labels = [], []
    for label, name in enumerate(LABEL_DIRS):
        sub = root / name
        if not sub.is_dir():
            raise ValueError(f"{root}: missing folder '{name}/' (expected {root}/none/ and {root}/roadwork/)")
        found = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in none/ or roadwork/")
    levels = read_levels(root)
    return LabeledSet(root, files, np.array(labels, np.int64), np.array([levels.get(f, -1) for f in files], np.int64))
