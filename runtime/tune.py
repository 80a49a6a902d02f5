"""Pick a cascade's thresholds for the best MCC under a compute budget, and write them into cascade.toml.

    python -m runtime.tune BUNDLE DATA [--max-routed 0.5] [--budget-ms X] [--write]

One pass sends every image of DATA through every stage (exit_below 0, exit_above 1) and records the classifier's
P(roadwork), each detector's roadwork confidence and each stage's time per image. Then every candidate setting
is scored offline with the vote's own reference code (kernels/vote.py), exactly as the cascade would decide:

  exit_below / exit_above   the classifier's undecided band (images inside it go on to the detectors)
  box_threshold             one value for every detector
  classifier_weight, majority   how the vote counts the classifier: 0 (detectors only); or weight 1 with
                            majority 1/2 (with one detector: roadwork if either says so) or 1 (both must)

Budget: the share of images routed to the detectors (--max-routed) and/or the expected milliseconds per image,
stage 1 time + routed share x stage 2 time as measured in the pass (--budget-ms). The best MCC wins; ties go
to the cheaper setting. Tune on a different labeled set than the one you report numbers on."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels.vote import vote_reference
from runtime.bundle import BUNDLE_FILE, Bundle, ClassifierStageSpec, DetectorStageSpec, read_bundle
from runtime.eval import Confusion, LabeledSet, list_labeled, run_engine

log = logging.getLogger(__name__)

BOX_THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05))
VOTE_RULES = ((0.0, 2 / 3), (1.0, 0.5), (1.0, 1.0))   # (classifier_weight, majority)
BAND_STEPS = 40    # candidate exit thresholds per side, at quantiles of the classifier's scores


@dataclass(frozen=True)
class Observed:
    """Everything the tuner needs from the all-routed pass."""
    labels: np.ndarray          # (N,)
    p: np.ndarray               # (N,) classifier P(roadwork)
    c: np.ndarray               # (N, K) detector roadwork confidences
    stage1_ms: float            # per image
    stage2_ms: float            # per routed image


@dataclass(frozen=True)
class Setting:
    exit_below: float
    exit_above: float
    box_threshold: float
    classifier_weight: float
    majority: float
    mcc: float
    accuracy: float
    routed: float               # share of images sent to the detectors
    ms_per_image: float         # expected

    def as_dict(self) -> dict:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


def stage_specs(bundle: Bundle) -> tuple[ClassifierStageSpec, DetectorStageSpec]:
    if len(bundle.stages) != 2 or not isinstance(bundle.stages[1], DetectorStageSpec):
        raise ValueError(f"{bundle.root / BUNDLE_FILE}: the tuner needs a classifier stage followed by a detectors "
                         f"stage, got {len(bundle.stages)} stage(s)")
    first, second = bundle.stages
    assert isinstance(first, ClassifierStageSpec)
    return first, second


def observe(bundle: Bundle, data: LabeledSet, device: str, dtype: str | None, max_batch: int) -> Observed:
    """Run every image through both stages and collect the scores and stage times."""
    from runtime.engine import Engine, resolve_device, resolve_dtype

    first, second = stage_specs(bundle)
    everything = dataclasses.replace(bundle, stages=(dataclasses.replace(first, exit_below=0.0, exit_above=1.0),
                                                     second))
    dev = resolve_device(device)
    engine = Engine(everything, dev, resolve_dtype(dtype, dev), max_batch)
    engine.warmup()
    scored = run_engine(engine, data)
    names = [d.name for d in second.detectors]
    missing = [i for i, s in enumerate(scored.stages) if s != second.name]
    if missing:
        raise RuntimeError(f"{len(missing)} image(s) did not reach stage '{second.name}' (degraded: "
                           f"{int(scored.degraded.sum())}); cannot tune on a failing detector stage")
    return Observed(labels=scored.labels, p=np.array([s[first.name] for s in scored.scores], np.float64),
                    c=np.array([[d[name] for name in names] for d in scored.detector_scores], np.float64),
                    stage1_ms=scored.stage_ms[first.name], stage2_ms=scored.stage_ms[second.name])


def vote_decisions(p: np.ndarray, c: np.ndarray, weights: Sequence[float], threshold: float,
                   classifier_weight: float, majority: float) -> np.ndarray:
    """(N,) bool: the vote's answer for every image, from kernels/vote.py's reference (as the CPU runs it)."""
    n, k = c.shape
    conf = np.clip(c, 1e-7, 1 - 1e-7)
    logits = torch.from_numpy(np.log(conf) - np.log1p(-conf)).float()   # sigmoid(logit(c)) = c
    offsets = torch.arange(k + 1, dtype=torch.int32)
    prob = torch.empty(n)
    vote_reference(logits, offsets, torch.full((k,), threshold), torch.tensor(weights, dtype=torch.float32),
                   torch.from_numpy(p).float(), classifier_weight, majority, torch.empty(n, k), torch.empty(n), prob)
    return prob.numpy() > 0.5


def band_candidates(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exit_below values in [0, 0.5] and exit_above values in [0.5, 1]: quantiles of the scores on each side,
    so each step moves a similar number of images; 0.5 on both sides routes (almost) nothing. The quantiles
    are observed scores (fp32 values), so the route kernel's fp32 comparisons agree with this search's."""
    below, above = p[p <= 0.5], p[p > 0.5]
    qs = np.linspace(0, 1, BAND_STEPS + 1)
    lo = np.unique(np.concatenate([[0.0, 0.5], np.quantile(below, qs, method="lower") if len(below) else []]))
    hi = np.unique(np.concatenate([[0.5, 1.0], np.quantile(above, qs, method="higher") if len(above) else []]))
    return np.clip(lo, 0, 0.5), np.clip(hi, 0.5, 1)


def search(obs: Observed, weights: Sequence[float], max_routed: float = 1.0,
           budget_ms: float | None = None) -> tuple[Setting, Setting]:
    """(best setting within the budget, the classifier alone) on the observed scores."""
    y = obs.labels.astype(bool)
    clf = obs.p > 0.5
    rules = [(t, w0, m) for t in BOX_THRESHOLDS for w0, m in VOTE_RULES]
    decisions = np.stack([vote_decisions(obs.p, obs.c, weights, t, w0, m) for t, w0, m in rules])   # [R, N]
    lows, highs = band_candidates(obs.p)

    def setting(lo, hi, rule, conf, routed) -> Setting:
        t, w0, m = rule
        return Setting(float(lo), float(hi), t, w0, m, conf.mcc, conf.accuracy, routed,
                       obs.stage1_ms + routed * obs.stage2_ms)

    n = len(y)
    alone = Confusion.of(y, clf)
    best = setting(0.5, 0.5, rules[0], alone, float(np.mean(obs.p == 0.5)))
    for lo in lows:
        for hi in highs[highs >= lo]:
            go = ~((obs.p < lo) | (obs.p > hi))
            routed = float(go.mean())
            if routed > max_routed or (budget_ms is not None and obs.stage1_ms + routed * obs.stage2_ms > budget_ms):
                continue
            # exits keep the classifier's answer; routed images take each rule's answer
            keep = ~go
            tp0, fp0 = int(np.sum(clf & keep & y)), int(np.sum(clf & keep & ~y))
            fn0 = int(np.sum(~clf & keep & y))
            d = decisions[:, go]
            yg = y[go]
            tp = tp0 + (d & yg).sum(1)
            fp = fp0 + (d & ~yg).sum(1)
            fn = fn0 + (~d & yg).sum(1)
            tn = n - tp - fp - fn
            denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).astype(np.float64)
            mcc = np.where(denom > 0, (tp * tn - fp * fn) / np.maximum(denom, 1), 0.0)
            r = int(np.argmax(mcc))
            if mcc[r] > best.mcc + 1e-12 or (abs(mcc[r] - best.mcc) <= 1e-12 and routed < best.routed):
                best = setting(lo, hi, rules[r], Confusion(int(tp[r]), int(fp[r]), int(tn[r]), int(fn[r])), routed)
    return best, setting(0.5, 0.5, rules[0], alone, 0.0)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)   # the shortest text that reads back as the same double
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def _model_path(root: Path, model: Path) -> str:
    rel = os.path.relpath(model, root.resolve())
    return str(model) if rel.startswith("..") else rel


def bundle_toml(bundle: Bundle, header: str = "") -> str:
    """cascade.toml for a two-stage bundle, every key written out (docs/bundle.md)."""
    first, second = stage_specs(bundle)
    root = bundle.root
    lines = [f"# {line}" for line in header.splitlines()] + ["", "[[stage]]", 'kind = "classifier"']
    stage1 = {"name": first.name, "model": _model_path(root, first.model), "device": first.device,
              "exit_below": first.exit_below, "exit_above": first.exit_above}
    lines += [f"{k} = {_toml_value(v)}" for k, v in stage1.items() if v is not None]
    lines += ["", "[[stage]]", 'kind = "detectors"']
    stage2 = {"name": second.name, "device": second.device, "majority": second.majority,
              "classifier_weight": second.classifier_weight, "time_budget_ms": second.time_budget_ms,
              "failure_threshold": second.failure_threshold, "cooldown_s": second.cooldown_s}
    lines += [f"{k} = {_toml_value(v)}" for k, v in stage2.items() if v is not None]
    for d in second.detectors:
        lines += ["", "[[stage.detector]]"]
        det = {"name": d.name, "model": _model_path(root, d.model), "roadwork_classes": list(d.roadwork_classes),
               "weight": d.weight, "box_threshold": d.box_threshold}
        lines += [f"{k} = {_toml_value(v)}" for k, v in det.items()]
    return "\n".join(lines) + "\n"


def apply(bundle: Bundle, best: Setting) -> Bundle:
    first, second = stage_specs(bundle)
    first = dataclasses.replace(first, exit_below=best.exit_below, exit_above=best.exit_above)
    second = dataclasses.replace(second, majority=best.majority, classifier_weight=best.classifier_weight,
                                 detectors=tuple(dataclasses.replace(d, box_threshold=best.box_threshold)
                                                 for d in second.detectors))
    return dataclasses.replace(bundle, stages=(first, second))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m runtime.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory with cascade.toml (classifier + detectors)")
    ap.add_argument("data", type=Path, help="labeled folder to tune on (not the one you report on)")
    ap.add_argument("--max-routed", type=float, default=0.5, help="largest share of images sent to the detectors")
    ap.add_argument("--budget-ms", type=float, help="largest expected milliseconds per image (measured here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit", type=int, help="tune on N images evenly spread over the folder")
    ap.add_argument("--write", action="store_true", help="write the chosen thresholds into BUNDLE/cascade.toml")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 <= args.max_routed <= 1:
        ap.error(f"--max-routed must be in [0, 1], got {args.max_routed}")
    bundle = read_bundle(args.bundle)
    data = list_labeled(args.data)
    if args.limit:
        data = data.spread(args.limit)
    obs = observe(bundle, data, args.device, args.dtype, args.max_batch)
    weights = [d.weight for d in stage_specs(bundle)[1].detectors]
    best, alone = search(obs, weights, args.max_routed, args.budget_ms)
    result = {"data": str(args.data), "images": len(data), "stage1_ms": round(obs.stage1_ms, 3),
              "stage2_ms_per_routed": round(obs.stage2_ms, 3), "classifier_alone": alone.as_dict(),
              "chosen": best.as_dict()}
    print(json.dumps(result, indent=2))
    if args.write:
        header = (f"Thresholds chosen by: python -m runtime.tune {args.bundle} {args.data} --max-routed "
                  f"{args.max_routed}" + (f" --budget-ms {args.budget_ms}" if args.budget_ms is not None else "")
                  + f"\nOn that set: MCC {best.mcc:.4f} (classifier alone {alone.mcc:.4f}), "
                  f"{100 * best.routed:.1f}% of images go to the detectors.")
        (args.bundle / BUNDLE_FILE).write_text(bundle_toml(apply(bundle, best), header))
        log.warning("wrote %s", args.bundle / BUNDLE_FILE)


if __name__ == "__main__":
    main()
