"""Labeled image folders -> label lists, boxes, and preprocessed pixel tensors held in memory.

Layout (what train.generate writes; real data can use the same): DIR/roadwork/* and DIR/none/* images (JPEG,
PNG or WebP); optional DIR/meta.jsonl (one JSON line per image with "file" and "level": the augmentation level)
and DIR/annotations.json (COCO boxes: the detector's targets and the classifier's auxiliary patch targets).
Pixels go through the same decode and preprocessing code as serving, so training sees what the server sees."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch as st
import torch

from imagesets.labeled import LabeledSet, list_labeled
from kernels.preprocess import PreprocessSpec, preprocess_reference
from runtime.image_decode import decode_image
from runtime.cascade.engine import image_tensor

log = logging.getLogger(__name__)


@dataclass
class LabeledFolder(LabeledSet):
    """A labeled folder (imagesets/labeled.py) with its annotations.json boxes, when it has them."""
    boxes: list[np.ndarray] | None         # per image (M, 4) float32 x0, y0, x1, y1 as fractions of width/height
    box_classes: list[list[str]] | None    # per image M category names

    def subset(self, index: np.ndarray) -> LabeledFolder:
        pick = [int(i) for i in index]
        return LabeledFolder(self.root, [self.files[i] for i in pick], self.labels[pick], self.levels[pick],
                             None if self.boxes is None else [self.boxes[i] for i in pick],
                             None if self.box_classes is None else [self.box_classes[i] for i in pick])


def _read_boxes(root: Path, files: list[str]) -> tuple[list[np.ndarray], list[list[str]]] | None:
    path = root / "annotations.json"
    if not path.is_file():
        return None
    coco = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    by_file: dict[str, tuple[list, list]] = {im["file_name"]: ([], []) for im in coco["images"]}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        boxes, classes = by_file[im["file_name"]]
        boxes.append((x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"]))
        classes.append(names[ann["category_id"]])
    missing = [f for f in files if f not in by_file]
    if missing:
        raise ValueError(f"{path}: no image entry for {len(missing)} file(s), e.g. {missing[0]}")
    return ([np.array(by_file[f][0], np.float32).reshape(-1, 4) for f in files],
            [by_file[f][1] for f in files])


def list_folder(root: str | Path) -> LabeledFolder:
    """Every image under root/none and root/roadwork, sorted by path, with levels and boxes when present."""
    found = list_labeled(root)
    boxes = _read_boxes(found.root, found.files)
    return LabeledFolder(found.root, found.files, found.labels, found.levels,
                         None if boxes is None else boxes[0], None if boxes is None else boxes[1])


def decode_file(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes())


def cache_path(folder: LabeledFolder, spec: PreprocessSpec, dtype: torch.dtype) -> Path:
    """Where load_pixels keeps its result: named by a hash of the file list, the preprocessing and the dtype."""
    key = hashlib.sha256(json.dumps([folder.files, repr(spec), str(dtype)]).encode()).hexdigest()[:16]
    return folder.root / f".pixels-{spec.height}x{spec.width}-{key}.safetensors"


def load_pixels(folder: LabeledFolder, spec: PreprocessSpec, dtype: torch.dtype = torch.bfloat16,
                progress: bool = True, cache: bool = False) -> torch.Tensor:
    """[N, 3, spec.height, spec.width] model inputs, made by the serving path's decode + reference preprocess.
    With `cache`, the tensor is saved next to the images (safetensors) and read back on the next call."""
    from tqdm import tqdm

    path = cache_path(folder, spec, dtype)
    if cache and path.is_file():
        log.info("pixels of %s from %s", folder.root, path)
        return st.load_file(path)["pixels"]
    out = torch.empty(len(folder), 3, spec.height, spec.width, dtype=dtype)
    slot = torch.empty(3, spec.height, spec.width)
    for i, f in enumerate(tqdm(folder.files, desc=f"decode {folder.root.name}", unit="img", file=sys.stderr,
                               disable=not progress, leave=False)):
        preprocess_reference(image_tensor(decode_file(folder.root / f)), spec, slot)
        out[i] = slot
    if cache:
        st.save_file({"pixels": out}, path)
    return out
