"""Score a classifier or cascade bundle on a labeled folder, as the subnet scores miners.

    python -m tools.eval MODEL_DIR DATA_DIR [--device cpu] [--dtype auto] [--json report.json] [--no-progress]

DATA_DIR holds DIR/roadwork/* and DIR/none/* images (what train.generate writes) and optionally DIR/meta.jsonl
with each image's augmentation level. Predictions are rounded like the validator's: roadwork only when
P > 0.5. Reported: accuracy, MCC and the confusion matrix, overall and per augmentation level; per stage, the
share of images it decided and their accuracy; and the cost: milliseconds per image spent in each stage."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imagesets.confusion import Confusion
from imagesets.labeled import LabeledSet, list_labeled
from runtime.image_decode import decode_image
from runtime.cascade.settings import ENGINE_HELP, add_engine_flags, engine_settings

log = logging.getLogger(__name__)


class StageClock:
    """Wall time per stage over a run, from the cascade's cumulative stage timings: stage 1 is preprocessing plus
    the classifier segment; a later stage is its call (preprocessing of its own, detectors, vote)."""

    def __init__(self, engine):
        self.engine = engine
        self.before = engine.stage_timings()

    def totals(self) -> dict[str, tuple[float, int]]:
        """(seconds, images) per stage since the clock started, every stage included, also one no image reached."""
        now = self.engine.stage_timings()
        return {name: (t.seconds - self.before[name].seconds, t.images - self.before[name].images)
                for name, t in now.items()}


@dataclass
class Scored:
    """Per-image outputs of a run over a labeled set."""
    labels: np.ndarray
    levels: np.ndarray
    predictions: np.ndarray                   # P(roadwork)
    stages: list[str]                         # the stage that decided
    scores: list[dict[str, float]]            # each stage's P(roadwork)
    detector_scores: list[dict[str, float]]
    degraded: np.ndarray
    seconds: float                            # wall time inside Engine.predict
    stage_ms: dict[str, float] = field(default_factory=dict)   # ms per image that reached the stage
    stage_images: dict[str, int] = field(default_factory=dict)


def run_engine(engine, data: LabeledSet, progress: bool = True) -> Scored:
    """Decode and predict chunk by chunk (max_batch images at a time: real photos can be large)."""
    from tqdm import tqdm

    n = len(data)
    clock = StageClock(engine)
    results, seconds = [], 0.0
    bar = tqdm(total=n, desc=f"eval {data.root.name}", unit="img", file=sys.stderr, disable=not progress)
    for start in range(0, n, engine.max_batch):
        images = [decode_image((data.root / f).read_bytes()) for f in data.files[start:start + engine.max_batch]]
        began = time.perf_counter()
        results += engine.predict(images)
        seconds += time.perf_counter() - began
        bar.update(len(images))
    bar.close()
    totals = clock.totals()
    return Scored(data.labels, data.levels, np.array([r.prediction for r in results], np.float64),
                  [r.stage for r in results], [r.scores for r in results], [r.detector_scores for r in results],
                  np.array([r.degraded for r in results], bool), seconds,
                  {s: 1e3 * sec / n if n else 0.0 for s, (sec, n) in totals.items()},
                  {s: n for s, (_, n) in totals.items()})


def report(scored: Scored, model: str, data: str, device: str, dtype: str) -> dict:
    n = len(scored.labels)
    out = {"model": model, "data": data, "device": device, "dtype": dtype,
           **Confusion.of(scored.labels, scored.predictions).as_dict(),
           "ms_per_image": round(1e3 * scored.seconds / max(n, 1), 3), "degraded": int(scored.degraded.sum())}
    out["levels"] = {}
    for level in sorted(set(scored.levels.tolist())):
        pick = scored.levels == level
        out["levels"]["unknown" if level < 0 else str(level)] = Confusion.of(
            scored.labels[pick], scored.predictions[pick]).as_dict()
    stages = np.array(scored.stages)
    out["stages"] = {}
    for name, reached in scored.stage_images.items():
        decided = stages == name
        out["stages"][name] = {
            "reached": round(reached / max(n, 1), 4), "decided": round(float(decided.mean()), 4),
            "accuracy_of_decided": round(Confusion.of(scored.labels[decided], scored.predictions[decided]).accuracy, 4),
            "ms_per_image_reached": round(scored.stage_ms[name], 3)}
    return out


def format_report(r: dict) -> str:
    c = r["confusion"]
    lines = [f"{r['model']} on {r['data']} ({r['n']} images, {r['device']} {r['dtype']})",
             f"  accuracy {r['accuracy']:.4f}   MCC {r['mcc']:.4f}   "
             f"confusion tp {c['tp']} fp {c['fp']} tn {c['tn']} fn {c['fn']}   {r['ms_per_image']:.2f} ms/image"
             + (f"   degraded {r['degraded']}" if r["degraded"] else ""),
             "  per augmentation level:"]
    for level, m in r["levels"].items():
        lines.append(f"    level {level:>7}: n {m['n']:5d}  accuracy {m['accuracy']:.4f}  MCC {m['mcc']:.4f}")
    lines.append("  per stage:")
    for name, s in r["stages"].items():
        lines.append(f"    {name:>12}: reached {100 * s['reached']:5.1f}%  decided {100 * s['decided']:5.1f}%  "
                     f"accuracy of decided {s['accuracy_of_decided']:.4f}  "
                     f"{s['ms_per_image_reached']:.2f} ms per image reached")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help=ENGINE_HELP["model"])
    ap.add_argument("data", type=Path, help="labeled folder: DATA/roadwork/*, DATA/none/*, optional meta.jsonl")
    add_engine_flags(ap, model=False)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit", type=int, help="score only N images, evenly spread over the folder")
    ap.add_argument("--json", type=Path, help="also write the report here as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    settings = engine_settings(ap, args)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = list_labeled(args.data)
    except ValueError as e:
        ap.error(str(e))
    if args.limit:
        data = data.spread(args.limit)
    engine = settings.load()
    engine.warmup()
    scored = run_engine(engine, data, progress=not args.no_progress)
    result = report(scored, str(args.model), str(args.data), str(engine.device),
                    str(engine.dtype).removeprefix("torch."))
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
