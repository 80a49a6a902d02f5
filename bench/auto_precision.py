"""Is precision `auto` stable and honest? Its choice over several uncached starts, a cached start's time, and the
chosen setting's drift on held-out images it was not calibrated on.

    python -m bench.auto_precision [--preset vit-b16 | --model DIR] [--starts 5] [--max-batch 8] [--held-out 64]

Each start is runtime.models.auto_precision.choose_cached as the server calls it (the classifier read from disk, every
candidate timed and checked) with no cache; then one start writes a fresh cache and one more reads it. Held-out
drift: max |P - P_fp32| and flipped decisions on `--held-out` synthetic street images of another seed than the
calibration set's, of the chosen candidate and of every one the calibration checked, beside what the calibration
measured: the bound the choice promises (auto_precision.MAX_DRIFT) must hold there."""
from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PRESETS, make_checkpoint, machine, print_table, write_json
from runtime.models import auto_precision
from runtime.models.precision_cache import PrecisionCache
from runtime.models.preprocessor import read_preprocess
from runtime.options import default_max_batch

HELD_OUT_SEED = 27


def held_out_drifts(model_dir: Path, candidates: list[auto_precision.Candidate], n: int) -> list[tuple[float, int]]:
    load = auto_precision.load_in(model_dir, torch.device("cpu"))
    preprocess = read_preprocess(model_dir)
    images = auto_precision.calibration_images(n, seed=HELD_OUT_SEED)
    reference = auto_precision.probabilities(load(auto_precision.FP32), preprocess, images, torch.float32)
    return [auto_precision.drift(reference, auto_precision.probabilities(load(c), preprocess, images, c.dtype))
            for c in candidates]


def run(model_dir: Path, starts: int, max_batch: int, held_out: int) -> dict:
    device, preprocess = torch.device("cpu"), read_preprocess(model_dir)
    rows = []
    for i in range(starts):
        choice = auto_precision.choose_cached(model_dir, device, preprocess, max_batch, None, None, None)
        rows.append({"start": f"uncached {i + 1}", "chosen": choice.candidate.name, "seconds": choice.seconds})
    with tempfile.TemporaryDirectory() as tmp:
        cache = PrecisionCache(Path(tmp) / "precision.json")
        for what in ("writes the cache", "cached"):
            t0 = time.perf_counter()
            choice = auto_precision.choose_cached(model_dir, device, preprocess, max_batch, None, None, cache)
            rows.append({"start": what, "chosen": choice.candidate.name, "seconds": time.perf_counter() - t0})
    chosen = collections.Counter(r["chosen"] for r in rows[:starts]).most_common()
    checked = [choice.trial(choice.candidate)] + [t for t in choice.trials
                                                 if t.max_drift is not None and t.candidate != choice.candidate]
    drifts = [{"candidate": t.candidate.name, "chosen": t.candidate == choice.candidate,
               "calibration_max_drift": t.max_drift, "held_out_max_drift": drift, "held_out_flips": flips}
              for t, (drift, flips) in zip(checked, held_out_drifts(model_dir, [t.candidate for t in checked],
                                                                    held_out))]
    return {"starts": rows, "choices": dict(chosen), "held_out_images": held_out, "bound": auto_precision.MAX_DRIFT,
            "drifts": drifts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16",
                        help="a random-weight checkpoint built here (default vit-b16)")
    source.add_argument("--model", type=Path, help="a classifier directory (a trained model's drift decides)")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=default_max_batch("cpu"), help="the server's CPU default")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp)
            make_checkpoint(args.preset, model_dir)
        result = run(model_dir, args.starts, args.max_batch, args.held_out)
    print_table(result["starts"], ["start", "chosen", "seconds"])
    print(f"choices over {args.starts} uncached starts: {result['choices']}")
    print(f"drift on the calibration images (as far as each got) and on {args.held_out} held-out images "
          f"(the bound the choice promises: {auto_precision.MAX_DRIFT}):")
    print_table(result["drifts"], ["candidate", "chosen", "calibration_max_drift", "held_out_max_drift",
                                   "held_out_flips"])
    write_json(args.json, {"model": str(args.model or args.preset), **result})
    return result


if __name__ == "__main__":
    main()
