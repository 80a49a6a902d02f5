"""Pick a cascade's thresholds for the best MCC under a compute budget, and write them into cascade.toml.

    python -m tools.tune BUNDLE DATA [--max-routed 0.5] [--max-vlm 0.2] [--budget-ms X] [--write]

One pass sends every image of DATA through every stage (exit_below 0, exit_above 1) and records the classifier's
P(roadwork), each detector's roadwork confidence, the VLM's P(roadwork) when a vlm stage follows, and each
stage's time per image. Then every candidate setting is scored offline with the vote's own reference code
(kernels/vote.py), exactly as the cascade would decide:

  exit_below / exit_above   the classifier's undecided band (images inside it go on to the detectors)
  box_threshold             one value for every detector
  classifier_weight, majority   how the vote counts the classifier: 0 (detectors only); or weight 1 with
                            majority 1/2 (with one detector: roadwork if either says so) or 1 (both must)

With a vlm stage, a second search keeps the best classifier/detector setting and picks the detectors stage's
own exit band over the voted P(roadwork): images inside it take the VLM's answer. Its budget is the share of
all images sent to the VLM (--max-vlm).

Budget: the share of images routed to the detectors (--max-routed) and/or the expected milliseconds per image,
stage 1 time + routed share x stage 2 time (+ VLM share x stage 3 time) as measured in the pass (--budget-ms).
The best MCC wins; ties go to the cheaper setting. Tune on a different labeled set than the one you report
numbers on."""
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

from imagesets.confusion import Confusion
from imagesets.labeled import LabeledSet, list_labeled
from kernels.vote import vote_reference
from runtime.cascade.bundle import (BUNDLE_FILE, Bundle, ClassifierStageSpec, DetectorStageSpec, VLMStageSpec,
                                    read_bundle)
from runtime.cascade.settings import EngineSettings, add_engine_flags, engine_settings
from tools.eval import run_engine

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
    v: np.ndarray | None = None  # (N,) the VLM's P(roadwork), when a vlm stage follows
    stage3_ms: float = 0.0      # per image that reaches the VLM


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
    vlm_exit_below: float | None = None  # the detectors stage's exit band (a vlm stage follows)
    vlm_exit_above: float | None = None
    to_vlm: float = 0.0         # share of all images sent to the VLM

    def as_dict(self) -> dict:
        return {k: v if v is None else round(v, 4) for k, v in dataclasses.asdict(self).items()}


def stage_specs(bundle: Bundle) -> tuple[ClassifierStageSpec, DetectorStageSpec, VLMStageSpec | None]:
    kinds = tuple(type(s) for s in bundle.stages)
    if kinds not in ((ClassifierStageSpec, DetectorStageSpec), (ClassifierStageSpec, DetectorStageSpec, VLMStageSpec)):
        raise ValueError(f"{bundle.root / BUNDLE_FILE}: the tuner needs a classifier stage followed by a detectors "
                         f"stage (and optionally a vlm stage), got {len(bundle.stages)} stage(s): "
                         f"{', '.join(s.name for s in bundle.stages)}")
    first, second, *vlm = bundle.stages
    return first, second, (vlm[0] if vlm else None)


def observe(bundle: Bundle, data: LabeledSet, settings: EngineSettings, progress: bool = True) -> Observed:
    """Run every image through every stage, at the precision `settings` give the engine (as Engine.load settles
    it), and collect the scores and stage times."""
    from runtime.cascade import precision
    from runtime.cascade.engine import Engine, resolve_device, stage_devices
    from runtime.models.precision_cache import PrecisionCache

    first, second, vlm = stage_specs(bundle)
    stages = [dataclasses.replace(first, exit_below=0.0, exit_above=1.0), second]
    if vlm is not None:
        stages = [stages[0], dataclasses.replace(second, exit_below=0.0, exit_above=1.0), vlm]
    device = resolve_device(settings.device)
    cache = None if settings.precision_cache_path is None else PrecisionCache(settings.precision_cache_path)
    routed = dataclasses.replace(bundle, stages=tuple(stages))
    resolved = precision.resolve(routed, stage_devices(routed, device), settings.dtype, settings.quantize,
                                 settings.batch_size, cache)
    engine = Engine(resolved, device, settings.batch_size)
    try:
        engine.warmup()
        scored = run_engine(engine, data, progress)
    finally:
        engine.close()
    last = stages[-1].name
    names = [d.name for d in second.detectors]
    missing = [i for i, s in enumerate(scored.stages) if s != last]
    if missing:
        raise RuntimeError(f"{len(missing)} image(s) did not reach stage '{last}' (degraded: "
                           f"{int(scored.degraded.sum())}); cannot tune on a failing stage")
    return Observed(labels=scored.labels, p=np.array([s[first.name] for s in scored.scores], np.float64),
                    c=np.array([[d[name] for name in names] for d in scored.detector_scores], np.float64),
                    stage1_ms=scored.stage_ms[first.name], stage2_ms=scored.stage_ms[second.name],
                    v=None if vlm is None else np.array([s[vlm.name] for s in scored.scores], np.float64),
                    stage3_ms=0.0 if vlm is None else scored.stage_ms[vlm.name])


def vote_decisions(p: np.ndarray, c: np.ndarray, weights: Sequence[float], threshold: float,
                   classifier_weight: float, majority: float) -> np.ndarray:
    """(N,) bool: the vote's answer for every image."""
    return vote_probs(p, c, weights, threshold, classifier_weight, majority) > 0.5


def vote_probs(p: np.ndarray, c: np.ndarray, weights: Sequence[float], threshold: float,
               classifier_weight: float, majority: float) -> np.ndarray:
    """(N,) the voted P(roadwork) of every image, from kernels/vote.py's reference (as the CPU runs it)."""
    n, k = c.shape
    conf = np.clip(c, 1e-7, 1 - 1e-7)
    logits = torch.from_numpy(np.log(conf) - np.log1p(-conf)).float()   # sigmoid(logit(c)) = c
    offsets = torch.arange(k + 1, dtype=torch.int32)
    prob = torch.empty(n)
    vote_reference(logits, offsets, torch.full((k,), threshold), torch.tensor(weights, dtype=torch.float32),
                   torch.from_numpy(p).float(), classifier_weight, majority, torch.empty(n, k), torch.empty(n), prob)
    return prob.numpy().astype(np.float64)


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
           budget_ms: float | None = None, max_vlm: float = 1.0) -> tuple[Setting, Setting]:
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
    if obs.v is not None:
        best = search_vlm_band(obs, weights, best, max_vlm, budget_ms)
    return best, setting(0.5, 0.5, rules[0], alone, 0.0)


def search_vlm_band(obs: Observed, weights: Sequence[float], chosen: Setting, max_vlm: float,
                    budget_ms: float | None) -> Setting:
    """The detectors stage's exit band for the chosen classifier/detector setting: routed images whose voted
    P(roadwork) falls inside it take the VLM's answer instead. (0.5, 0.5) sends (almost) none on."""
    assert obs.v is not None
    y = obs.labels.astype(bool)
    routed = ~((obs.p < chosen.exit_below) | (obs.p > chosen.exit_above))
    q = vote_probs(obs.p, obs.c, weights, chosen.box_threshold, chosen.classifier_weight, chosen.majority)
    two_stage = np.where(routed, q > 0.5, obs.p > 0.5)
    vlm_says = obs.v > 0.5
    best, best_mcc, best_share = (0.5, 0.5), -2.0, 2.0   # (0.5, 0.5) when nothing fits the budget
    lows, highs = band_candidates(q[routed]) if routed.any() else (np.array([0.5]), np.array([0.5]))
    for lo in lows:
        for hi in highs[highs >= lo]:
            to_vlm = routed & ~((q < lo) | (q > hi))
            share = float(to_vlm.mean())
            ms = obs.stage1_ms + chosen.routed * obs.stage2_ms + share * obs.stage3_ms
            if share > max_vlm or (budget_ms is not None and ms > budget_ms):
                continue
            mcc = Confusion.of(y, np.where(to_vlm, vlm_says, two_stage)).mcc
            if mcc > best_mcc + 1e-12 or (abs(mcc - best_mcc) <= 1e-12 and share < best_share):
                best, best_mcc, best_share = (float(lo), float(hi)), mcc, share
    to_vlm = routed & ~((q < best[0]) | (q > best[1]))
    conf = Confusion.of(y, np.where(to_vlm, vlm_says, two_stage))
    share = float(to_vlm.mean())
    return dataclasses.replace(chosen, mcc=conf.mcc, accuracy=conf.accuracy, vlm_exit_below=best[0],
                               vlm_exit_above=best[1], to_vlm=share,
                               ms_per_image=chosen.ms_per_image + share * obs.stage3_ms)


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
    """cascade.toml for a classifier + detectors (+ vlm) bundle, every key that is set written out (docs/bundle.md)."""
    first, second, vlm = stage_specs(bundle)
    root = bundle.root

    def table(header: str, kind: str | None, keys: dict) -> list[str]:
        return ["", header] + ([f'kind = "{kind}"'] if kind else []) + \
            [f"{k} = {_toml_value(v)}" for k, v in keys.items() if v is not None]

    lines = [f"# {line}" for line in header.splitlines()]
    lines += table("[[stage]]", "classifier", {
        "name": first.name, "model": _model_path(root, first.model), "device": first.device,
        "exit_below": first.exit_below, "exit_above": first.exit_above, "quantize": first.quantize,
        "backend": None if first.backend == "torch" else first.backend,
        "onnx": None if first.onnx is None else _model_path(root, first.onnx)})
    lines += table("[[stage]]", "detectors", {
        "name": second.name, "device": second.device, "majority": second.majority,
        "classifier_weight": second.classifier_weight, "time_budget_ms": second.time_budget_ms,
        "failure_threshold": second.failure_threshold, "cooldown_s": second.cooldown_s,
        "exit_below": second.exit_below, "exit_above": second.exit_above})
    for d in second.detectors:
        lines += table("[[stage.detector]]", None, {
            "name": d.name, "model": _model_path(root, d.model), "roadwork_classes": list(d.roadwork_classes),
            "weight": d.weight, "box_threshold": d.box_threshold, "quantize": d.quantize})
    if vlm is not None:
        keys = {f.name: getattr(vlm, f.name) for f in dataclasses.fields(vlm)}
        lines += table("[[stage]]", "vlm", {**keys, "model": _model_path(root, vlm.model)})
    return "\n".join(lines) + "\n"


def apply(bundle: Bundle, best: Setting) -> Bundle:
    first, second, vlm = stage_specs(bundle)
    first = dataclasses.replace(first, exit_below=best.exit_below, exit_above=best.exit_above)
    second = dataclasses.replace(second, majority=best.majority, classifier_weight=best.classifier_weight,
                                 detectors=tuple(dataclasses.replace(d, box_threshold=best.box_threshold)
                                                 for d in second.detectors))
    if vlm is None:
        return dataclasses.replace(bundle, stages=(first, second))
    assert best.vlm_exit_below is not None and best.vlm_exit_above is not None, "a vlm stage needs the VLM band"
    second = dataclasses.replace(second, exit_below=best.vlm_exit_below, exit_above=best.vlm_exit_above)
    return dataclasses.replace(bundle, stages=(first, second, vlm))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, metavar="bundle",
                    help="bundle directory with cascade.toml (classifier + detectors [+ vlm])")
    ap.add_argument("data", type=Path, help="labeled folder to tune on (not the one you report on)")
    ap.add_argument("--max-routed", type=float, default=0.5, help="largest share of images sent to the detectors")
    ap.add_argument("--max-vlm", type=float, default=0.2, help="largest share of all images sent to the VLM "
                                                               "(bundles with a vlm stage)")
    ap.add_argument("--budget-ms", type=float, help="largest expected milliseconds per image (measured here)")
    add_engine_flags(ap, model=False)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit", type=int, help="tune on N images evenly spread over the folder")
    ap.add_argument("--write", action="store_true", help="write the chosen thresholds into BUNDLE/cascade.toml")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    settings = engine_settings(ap, args)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("max_routed", "max_vlm"):
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    bundle = read_bundle(args.model)
    try:
        _, detectors_stage, _ = stage_specs(bundle)
    except ValueError as e:
        ap.error(str(e))
    data = list_labeled(args.data)
    if args.limit:
        data = data.spread(args.limit)
    obs = observe(bundle, data, settings, progress=not args.no_progress)
    weights = [d.weight for d in detectors_stage.detectors]
    best, alone = search(obs, weights, args.max_routed, args.budget_ms, args.max_vlm)
    result = {"data": str(args.data), "images": len(data), "stage1_ms": round(obs.stage1_ms, 3),
              "stage2_ms_per_routed": round(obs.stage2_ms, 3), "classifier_alone": alone.as_dict(),
              "chosen": best.as_dict()}
    if obs.v is not None:
        result["stage3_ms_per_routed"] = round(obs.stage3_ms, 3)
        result["vlm_alone"] = Confusion.of(obs.labels, obs.v).as_dict()
    print(json.dumps(result, indent=2))
    if args.write:
        vlm = obs.v is not None
        header = (f"Thresholds chosen by: python -m tools.tune {args.model} {args.data} --max-routed "
                  f"{args.max_routed}" + (f" --max-vlm {args.max_vlm}" if vlm else "")
                  + (f" --budget-ms {args.budget_ms}" if args.budget_ms is not None else "")
                  + f"\nOn that set: MCC {best.mcc:.4f} (classifier alone {alone.mcc:.4f}), "
                  f"{100 * best.routed:.1f}% of images go to the detectors"
                  + (f", {100 * best.to_vlm:.1f}% to the VLM." if vlm else "."))
        (args.model / BUNDLE_FILE).write_text(bundle_toml(apply(bundle, best), header))
        log.warning("wrote %s", args.model / BUNDLE_FILE)
    else:
        log.warning("nothing written: --write puts these thresholds into %s", args.model / BUNDLE_FILE)


if __name__ == "__main__":
    main()
