"""Issue 26: a detectors stage whose members are of different families (DEIMv2, RT-DETR, D-FINE) served by
`python -m server`, its answers equal to a plain-Python vote over the members' transformers outputs on the same
weights and transformers' own preprocessing."""
from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import RTDetrImageProcessorPil

from fixtures.checkpoints import make_vit
from fixtures.dfine_checkpoints import make_dfine
from fixtures.deimv2_checkpoints import make_deimv2
from fixtures.images import jpeg
from fixtures.rtdetr_checkpoints import make_rtdetr
from fixtures.serving import ServerProcess
from fixtures.vote_formula import vote_formula

SIZE = 64
ROADWORK = [1, 3]
MEMBERS = {  # name: (weight, box threshold)
    "deimv2": (1.0, 0.6),  # inside its scores' range on IMAGES, so its vote (and with it the majority) flips
    "rtdetr": (1.5, 0.45),
    "dfine": (1.0, 0.55),
}


# Random-weight members score these plain images far enough from their thresholds (by >= 0.01) for the vote not to
# hinge on rounding; random JPEG noise all scores alike after the resize to 64x64.
IMAGES = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "yellow": (255, 200, 0)}


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=95)
    return out.getvalue()


def processor() -> RTDetrImageProcessorPil:
    return RTDetrImageProcessorPil(size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ensemble")
    make_vit(root / "classifier", seed=2)
    models = {"deimv2": make_deimv2(root / "deimv2", seed=11), "rtdetr": make_rtdetr(root / "rtdetr", seed=12),
              "dfine": make_dfine(root / "dfine", seed=13)}
    for name in models:  # one preprocessing for all three: transformers' RT-DETR processor at 64x64
        processor().save_pretrained(root / name)
    text = ('[[stage]]\nkind = "classifier"\nmodel = "classifier"\nexit_below = 0.0\nexit_above = 1.0\n\n'
            '[[stage]]\nkind = "detectors"\nclassifier_weight = 0.0\n')
    for name, (weight, threshold) in MEMBERS.items():
        text += (f'\n[[stage.detector]]\nname = "{name}"\nmodel = "{name}"\nroadwork_classes = {ROADWORK}\n'
                 f'weight = {weight}\nbox_threshold = {threshold}\n')
    (root / "cascade.toml").write_text(text)
    return root, models


def transformers_vote(models: dict, image: bytes) -> tuple[float, dict[str, float]]:
    pixels = processor()(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt")["pixel_values"]
    logits = []
    with torch.inference_mode():
        for name in MEMBERS:
            out = models[name](pixel_values=pixels).logits[0][:, ROADWORK]
            logits.append([out.max().item()])
    confs, _, p = vote_formula(logits, [t for _, t in MEMBERS.values()], [w for w, _ in MEMBERS.values()], 0.5, 0.0,
                               2 / 3)
    return p, dict(zip(MEMBERS, confs))


def post(url: str, data: bytes) -> dict:
    request = urllib.request.Request(url + "/v1/predict?detail=1", data=data, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_three_families_serve_and_vote_as_transformers(bundle):
    root, models = bundle
    images = [solid_jpeg(colour) for colour in IMAGES.values()] + [jpeg(seed) for seed in range(2)]
    expected = [transformers_vote(models, image) for image in images]
    with ServerProcess(root) as server:
        answers = [post(server.url, image) for image in images]
        with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
            described = json.loads(r.read())
    for answer, (p, confs) in zip(answers, expected):
        assert answer["stage"] == "detectors"
        assert answer["prediction"] == pytest.approx(p, abs=1e-4)
        assert answer["detector_scores"] == pytest.approx(confs, abs=1e-4)
        assert set(answer["detector_ms"]) == set(MEMBERS)
    assert {p > 0.5 for p, _ in expected} == {True, False}, "the vote should go both ways on these images"
    families = json.dumps(described)
    assert all(f'"model_type": "{t}"' in families for t in ("deimv2", "rt_detr", "d_fine"))
