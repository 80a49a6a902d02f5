"""Each hand-built detector family against transformers eager on the same random weights, and the ensemble's
stage time against the sum of its members'.

  python -m bench.detectors --size real --batches 1,8
  python -m bench.detectors --size tiny --families deimv2 --batches 1 --rounds 1   (what the tests run)

Per family: a checkpoint written by transformers (random weights, the family's real or tiny configuration at its
input size), loaded by our loader; ms per image of ours (model only: a preprocessed batch) and of transformers'
model on the same pixels, timed round-robin so both see the same machine load, and the ratio. Then one cascade
whose detectors stage holds every family as a member (a tiny ViT classifier routes every image there): the
stage's time per batch against the sum of its members' (on CPU the members run in turn, so the stage costs the
sum plus the vote; on CUDA members overlap on their streams)."""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bench.common import jpeg_images, machine, print_table, time_interleaved, write_json
from fixtures.checkpoints import make_vit, write_preprocessor
from fixtures.deimv2_checkpoints import DEIMV2_S, DEIMV2_S_BACKBONE, make_deimv2
from fixtures.dfine_checkpoints import DFINE_S, make_dfine
from fixtures.rfdetr_checkpoints import BASE, BASE_BACKBONE, BASE_SIZE, make_rfdetr
from fixtures.rtdetr_checkpoints import R18VD, make_rtdetr
from runtime.cascade.detector_members import HAND_BUILT
from runtime.cascade.engine import Engine
from runtime.image_decode import decode_image


@dataclass(frozen=True)
class Family:
    model_type: str
    make: Callable[[Path, bool], torch.nn.Module]  # (path, real size?) -> transformers' model, checkpoint written
    roadwork_classes: tuple[int, ...] = (0, 1)


def make_deimv2_member(path: Path, real: bool) -> torch.nn.Module:
    model = make_deimv2(path, backbone=DEIMV2_S_BACKBONE, **DEIMV2_S) if real else make_deimv2(path)
    write_preprocessor(path, "dinov3", (640, 640) if real else (64, 64))
    return model


def make_dfine_member(path: Path, real: bool) -> torch.nn.Module:
    backbone, detector = DFINE_S
    return make_dfine(path, backbone=backbone, **detector) if real else make_dfine(path)


def make_rtdetr_member(path: Path, real: bool) -> torch.nn.Module:
    backbone, detector = R18VD
    return make_rtdetr(path, backbone=backbone, **detector) if real else make_rtdetr(path)


def make_rfdetr_member(path: Path, real: bool) -> torch.nn.Module:
    return make_rfdetr(path, backbone=BASE_BACKBONE, size=BASE_SIZE, **BASE) if real else make_rfdetr(path)


FAMILIES = {
    "deimv2": Family("deimv2", make_deimv2_member),
    "dfine": Family("d_fine", make_dfine_member),
    "rfdetr": Family("rf_detr", make_rfdetr_member),
    "rtdetr": Family("rt_detr", make_rtdetr_member),
}


def input_size(path: Path) -> tuple[int, int]:
    size = json.loads((path / "preprocessor_config.json").read_text())["size"]
    return size["height"], size["width"]


def family_rows(name: str, root: Path, real: bool, batches: list[int], rounds: int) -> list[dict]:
    family = FAMILIES[name]
    path = root / name
    theirs = family.make(path, real).eval()
    ours = HAND_BUILT[family.model_type].from_pretrained(path)
    h, w = input_size(path)
    rows = []
    for batch in batches:
        pixels = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            times = time_interleaved({"ours": lambda: ours(pixels), "transformers": lambda: theirs(pixel_values=pixels)},
                                     rounds=rounds)
        rows.append({"family": name, "input": f"{h}x{w}", "batch": batch,
                     "ours_ms_per_image": times["ours"] * 1e3 / batch,
                     "transformers_ms_per_image": times["transformers"] * 1e3 / batch,
                     "speedup": times["transformers"] / times["ours"]})
    return rows


def ensemble_bundle(root: Path, names: list[str]) -> Path:
    """A tiny ViT classifier that sends every image on (exit_below 0, exit_above 1) to all the families."""
    make_vit(root / "classifier", seed=1)
    text = '[[stage]]\nkind = "classifier"\nmodel = "classifier"\nexit_below = 0.0\nexit_above = 1.0\n\n' \
           '[[stage]]\nkind = "detectors"\n'
    for name in names:
        text += (f'\n[[stage.detector]]\nname = "{name}"\nmodel = "{name}"\n'
                 f'roadwork_classes = {list(FAMILIES[name].roadwork_classes)}\n')
    (root / "cascade.toml").write_text(text)
    return root


def ensemble_rows(root: Path, names: list[str], batches: list[int], rounds: int) -> list[dict]:
    rows = []
    for batch in batches:
        engine = Engine.load(ensemble_bundle(root, names), "cpu", "float32", max_batch=batch)
        engine.warmup()
        images = [decode_image(j) for j in jpeg_images(batch, seed=batch)]
        before = engine.stage_timings()["detectors"], engine.member_timings()["detectors"]
        for _ in range(rounds):
            engine.predict(images)
        stage, members = engine.stage_timings()["detectors"], engine.member_timings()["detectors"]
        calls = stage.calls - before[0].calls
        assert calls == rounds, (calls, rounds)
        member_ms = {n: (members[n].seconds - before[1][n].seconds) * 1e3 / calls for n in names}
        stage_ms = (stage.seconds - before[0].seconds) * 1e3 / calls
        rows.append({"batch": batch, "members": "+".join(names), "stage_ms": stage_ms,
                     "sum_of_members_ms": sum(member_ms.values()),
                     "stage_over_sum": stage_ms / sum(member_ms.values()),
                     **{f"{n}_ms": v for n, v in member_ms.items()}})
        engine.close()
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "real"), default="real", help="each family's real configuration "
                   "at its native input size, or a tiny one (seconds; what the tests run)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each side per batch size")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown} (known: {', '.join(FAMILIES)})")
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    np.random.seed(0)
    print(json.dumps(machine()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        families = [row for n in names for row in family_rows(n, root, args.size == "real", batches, args.rounds)]
        print_table(families, ["family", "input", "batch", "ours_ms_per_image", "transformers_ms_per_image",
                               "speedup"])
        ensemble = ensemble_rows(root, names, batches, args.rounds)
        print_table(ensemble, ["batch", "members", "stage_ms", "sum_of_members_ms", "stage_over_sum"])
    result = {"benchmark": "detectors", "size": args.size, "families": families, "ensemble": ensemble}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
