"""Synthetic street scenes and the dataset CLI: determinism, labels, boxes, layout."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.augment import SIZE
from train.generate import main as generate_main, make_sample
from train.scenes import CLASSES, MIN_BOX_SIDE, MIN_ROADWORK_SIDE, ROADWORK_CLASSES, render_scene

REPO = Path(__file__).resolve().parents[1]


def _scene(seed: int, roadwork: bool, size: int = 224):
    return render_scene(np.random.default_rng(seed), roadwork, size)


@pytest.mark.parametrize("seed,roadwork", [(0, True), (1, False), (2, True), (3, False)])
def test_same_seed_same_scene(seed, roadwork):
    a, b = _scene(seed, roadwork), _scene(seed, roadwork)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.classes == b.classes and a.label == b.label == int(roadwork)


def test_different_seeds_differ():
    assert _scene(10, True).image.tobytes() != _scene(11, True).image.tobytes()


def test_global_random_state_is_not_used():
    np.random.seed(1)
    random.seed(1)
    a = _scene(5, True)
    np.random.seed(2)
    random.seed(2)
    b = _scene(5, True)
    assert a.image.tobytes() == b.image.tobytes()


@pytest.mark.parametrize("size", [224, 448])
def test_boxes_inside_and_labels_honest(size):
    for seed in range(24 if size == 224 else 6):
        roadwork = seed % 2 == 0
        scene = _scene(100 + seed, roadwork, size)
        assert scene.image.size == (size, size) and scene.image.mode == "RGB"
        assert scene.boxes.dtype == np.float32 and scene.boxes.shape == (len(scene.classes), 4)
        b = scene.boxes
        assert (b >= 0).all() and (b <= size).all()
        assert (b[:, 2] - b[:, 0] >= MIN_BOX_SIDE).all() and (b[:, 3] - b[:, 1] >= MIN_BOX_SIDE).all()
        assert set(scene.classes) <= set(CLASSES)
        sides = [max(x1 - x0, y1 - y0) for (x0, y0, x1, y1), c in zip(b, scene.classes) if c in ROADWORK_CLASSES]
        if roadwork:
            assert max(sides, default=0) >= MIN_ROADWORK_SIDE * size, f"seed {seed}: no visible roadwork"
        else:
            assert sides == [], f"seed {seed}: roadwork object in a negative"


def test_boxes_sit_on_drawn_objects():
    """A labelled box's pixels differ from the scene around it: boxes are not placed on empty road or sky."""
    scene = _scene(7, True)
    a = np.asarray(scene.image, dtype=np.float32)
    for (x0, y0, x1, y1), cls in zip(scene.boxes, scene.classes):
        inner = a[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        assert inner.reshape(-1, 3).std(0).max() > 3.0, f"{cls} box {x0, y0, x1, y1} covers a flat area"


def test_colour_alone_does_not_separate_labels():
    """Orange pixels are as common in negatives (cars, awnings, dusk, hydrants) as in positives."""
    fractions, labels = [], []
    for i in range(60):
        scene = _scene(1000 + i, i % 2 == 0)
        hsv = np.asarray(scene.image.convert("HSV"), dtype=np.float32) / 255
        h, s, v = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
        fractions.append((((h < 45) | (h > 340)) & (s > 0.5) & (v > 0.35)).mean())
        labels.append(scene.label)
    f, y = np.array(fractions), np.array(labels)
    best = max(max(((f > t) == y).mean(), ((f <= t) == y).mean()) for t in np.unique(f))
    assert best < 0.75, f"a threshold on orange pixels alone reaches {best:.2f} accuracy"


def test_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="size"):
        render_scene(np.random.default_rng(0), True, size=16)


def test_positive_samples_keep_roadwork_after_augmentation():
    for index in range(0, 24, 2):
        s = make_sample(3, index, levels=(1,))
        assert s.label == 1
        sides = [max(b[2] - b[0], b[3] - b[1]) for b, c in zip(s.boxes, s.classes) if c in ROADWORK_CLASSES]
        assert max(sides, default=0) >= MIN_ROADWORK_SIDE * SIZE, f"sample {index} lost its roadwork"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_layout_and_reproducibility(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_main(["--out", str(a), "--n", "7", "--seed", "11"])
    generate_main(["--out", str(b), "--n", "7", "--seed", "11"])
    files = _tree(a)
    assert files == _tree(b)
    assert sorted(p for p in files if p.startswith("roadwork/")) == [f"roadwork/{i:06d}.jpg" for i in (0, 2, 4, 6)]
    assert sorted(p for p in files if p.startswith("none/")) == [f"none/{i:06d}.jpg" for i in (1, 3, 5)]
    for name, data in files.items():
        if name.endswith(".jpg"):
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG" and img.size == (SIZE, SIZE)

    coco = json.loads(files["annotations.json"])
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(p for p in files if p.endswith(".jpg"))
    ids = {i["id"]: i for i in coco["images"]}
    roadwork_ids = {i + 1 for i, c in enumerate(CLASSES) if c in ROADWORK_CLASSES}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["image_id"] in ids and 1 <= ann["category_id"] <= len(CLASSES)
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE + 0.01 and y + h <= SIZE + 0.01
        if ids[ann["image_id"]]["label"] == 0:
            assert ann["category_id"] not in roadwork_ids
    for image in coco["images"]:
        if image["label"] == 1:
            assert any(a["image_id"] == image["id"] and a["category_id"] in roadwork_ids for a in coco["annotations"])

    meta = [json.loads(line) for line in files["meta.jsonl"].decode().splitlines()]
    assert [m["index"] for m in meta] == list(range(7))
    for m in meta:
        assert m["seed"] == 11 and m["size"] == SIZE and m["level"] in (0, 1, 2, 3)
        assert m["label"] == (1 if m["file"].startswith("roadwork/") else 0)
        assert m["augment"]["level"] == m["level"]
    # a single image regenerates alone from (seed, index)
    assert make_sample(11, 4).jpeg == files["roadwork/000004.jpg"]


def test_cli_levels_size_and_workers(tmp_path):
    generate_main(["--out", str(tmp_path / "a"), "--n", "4", "--seed", "2", "--levels", "0", "--size", "448"])
    meta = [json.loads(line) for line in (tmp_path / "a" / "meta.jsonl").read_text().splitlines()]
    assert {m["level"] for m in meta} == {0} and {m["size"] for m in meta} == {448}
    generate_main(["--out", str(tmp_path / "b"), "--n", "4", "--seed", "2", "--levels", "0", "--size", "448",
                   "--workers", "2"])
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, needle in ((["--out", str(tmp_path / "full"), "--n", "2", "--seed", "0"], "not empty"),
                         (["--out", str(tmp_path / "o"), "--n", "2", "--seed", "0", "--levels", "1,5"], "--levels"),
                         (["--out", str(tmp_path / "o"), "--n", "0", "--seed", "0"], "--n")):
        with pytest.raises(SystemExit) as exc:
            generate_main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "train.generate", "--out", str(out), "--n", "2", "--seed", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "roadwork" / "000000.jpg").exists() and (out / "none" / "000001.jpg").exists()
    assert len((out / "meta.jsonl").read_text().splitlines()) == 2
