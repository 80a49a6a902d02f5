"""Pick the repository's sample images: generated scenes the bundled model scores clearly right.

    python -m train.samples --bundle bundles/default --out samples --seed 2024

Draws images seed/0, seed/1, ... with train.generate.make_sample (all augmentation levels), scores them with the
bundle, and keeps the first `--per-label` of each label whose P(roadwork) is on the right side of 0.5 by at
least --margin under float32 and bfloat16 alike (so the shipped examples hold on any CPU). Writes
OUT/roadwork_K.jpg, OUT/none_K.jpg and OUT/samples.json (file, label, seed, index, level, P per dtype).
They are picked, not random: they show the pipeline working, not how accurate it is (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from runtime.decode import decode_image
from runtime.engine import Engine
from train.generate import make_sample

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")


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
    kept: dict[int, list[dict]] = {0: [], 1: []}
    for index in range(args.max_tries):
        sample = make_sample(args.seed, index)
        if len(kept[sample.label]) >= args.per_label:
            if all(len(v) >= args.per_label for v in kept.values()):
                break
            continue
        image = decode_image(sample.jpeg)
        probs = {d: e.predict([image])[0].prediction for d, e in engines.items()}
        side = 1 if sample.label else -1
        if all(side * (p - 0.5) >= args.margin for p in probs.values()):
            name = f"{'roadwork' if sample.label else 'none'}_{len(kept[sample.label]) + 1}.jpg"
            kept[sample.label].append({"file": name, "label": sample.label, "seed": args.seed, "index": index,
                                       "level": sample.level, "p": {d: round(p, 4) for d, p in probs.items()},
                                       "jpeg": sample.jpeg})
    if any(len(v) < args.per_label for v in kept.values()):
        raise SystemExit(f"found only {len(kept[1])} roadwork and {len(kept[0])} none images scored clearly right "
                         f"in {args.max_tries} tries; lower --margin or raise --max-tries")
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for label in (1, 0):
        for e in kept[label]:
            (args.out / e["file"]).write_bytes(e.pop("jpeg"))
            entries.append(e)
    (args.out / "samples.json").write_text(json.dumps(entries, indent=2) + "\n")
    log.info("wrote %d samples to %s", len(entries), args.out)


if __name__ == "__main__":
    main()
