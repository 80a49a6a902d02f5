"""Pick the repository's sample images: generated scenes the bundled model scores clearly right.

    python -m train.samples --bundle bundles/default --out samples --seed 2024

Draws images seed/0, seed/1, ... with train.generate.make_sample (all augmentation levels), scores them with the
bundle, and keeps `--per-label` of each label whose P(roadwork) is on the right side of 0.5 by at least --margin
under float32 and bfloat16 alike (so the shipped examples hold on any CPU): for every stage of the cascade, the
first such image that stage decides (under both dtypes), so the samples exercise the whole cascade; then the
first others. Writes OUT/roadwork_K.jpg, OUT/none_K.jpg and OUT/samples.json (file, label, seed, index, level,
P and deciding stage per dtype).
They are picked, not random: they show the pipeline working, not how accurate it is (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine
from train.generate import make_sample

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")


def covered(candidates: list[dict]) -> set[str]:
    """Stages that decide some candidate under every dtype."""
    return {c["stage"][DTYPES[0]] for c in candidates if len(set(c["stage"].values())) == 1}


def enough(candidates: list[dict], per_label: int, stages: list[str]) -> bool:
    return all(sum(c["label"] == label for c in candidates) >= per_label for label in (0, 1)) and \
        covered(candidates) >= set(stages)


def pick(candidates: list[dict], per_label: int, stages: list[str]) -> list[dict]:
    """per_label of each label, first one deciding at each stage (so the samples exercise the whole cascade),
    then the rest in drawing order."""
    kept: list[dict] = []
    room = {0: per_label, 1: per_label}
    for stage in stages:
        if any(set(c["stage"].values()) == {stage} for c in kept):
            continue
        c = next((c for c in candidates if set(c["stage"].values()) == {stage} and room[c["label"]] > 0), None)
        assert c is not None, f"no candidate left decided at stage '{stage}' with room in its label"
        kept.append(c)
        room[c["label"]] -= 1
    for c in candidates:
        if room[c["label"]] > 0 and c not in kept:
            kept.append(c)
            room[c["label"]] -= 1
    return kept


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.samples", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--per-label", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--max-tries", type=int, default=400)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engines = {d: Engine.load(args.bundle, "cpu", d, max_batch=1) for d in DTYPES}
    stages = [stage["name"] for stage in engines[DTYPES[0]].describe()["stages"]]
    candidates: list[dict] = []
    for index in range(args.max_tries):
        if enough(candidates, args.per_label, stages):
            break
        sample = make_sample(args.seed, index)
        image = decode_image(sample.jpeg)
        results = {d: e.predict([image])[0] for d, e in engines.items()}
        side = 1 if sample.label else -1
        if all(side * (r.prediction - 0.5) >= args.margin for r in results.values()):
            candidates.append({"label": sample.label, "seed": args.seed, "index": index, "level": sample.level,
                               "p": {d: round(r.prediction, 4) for d, r in results.items()},
                               "stage": {d: r.stage for d, r in results.items()}, "jpeg": sample.jpeg})
    for e in engines.values():
        e.close()
    if not enough(candidates, args.per_label, stages):
        found = {label: sum(c["label"] == label for c in candidates) for label in (0, 1)}
        raise SystemExit(f"found only {found[1]} roadwork and {found[0]} none images scored clearly right, deciding "
                         f"at stages {sorted(covered(candidates))} of {stages}, in {args.max_tries} tries; lower "
                         f"--margin or raise --max-tries")
    kept = pick(candidates, args.per_label, stages)
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for label in (1, 0):
        for k, e in enumerate(sorted((e for e in kept if e["label"] == label), key=lambda e: e["index"])):
            e = {"file": f"{'roadwork' if label else 'none'}_{k + 1}.jpg", **e}
            (args.out / e["file"]).write_bytes(e.pop("jpeg"))
            entries.append(e)
    (args.out / "samples.json").write_text(json.dumps(entries, indent=2) + "\n")
    log.info("wrote %d samples to %s", len(entries), args.out)


if __name__ == "__main__":
    main()
