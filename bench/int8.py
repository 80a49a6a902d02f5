"""The int8 path's cost in accuracy and its gain in speed, against fp32 and bf16 on the same weights.

    python -m bench.int8 [--case parity-dinov3 --case dinov3-vits16 ...] [--images 64] [--batch 32]
    python -m bench.int8 --model DIR        # a trained classifier: MCC against the labels means something

Accuracy: JPEG bytes -> Engine.predict with the model loaded in fp32, in bf16, and in bf16 with its encoder
Linear layers converted by runtime.models.int8_dynamic.quantize_int8 (Engine.load(quantize="int8")), on the
synthetic eval set (train.generate: street scenes with and without roadwork, the validator's augmentations).
Per dtype: max and mean |P - P_fp32|, decisions (P > 0.5) that differ from fp32's, and MCC of the decisions
against fp32's and against the scene labels. Random-weight checkpoints ("parity-*" are fixtures/checkpoints.py's
tiny ones, the rest real sizes) know nothing of roadwork, so their MCC against labels is noise around 0; their
drift and flips are the numerical cost. A trained --model gives the accuracy cost itself.

Speed (real sizes only): model-only images/s of bf16 and int8 at --batch, timed round-robin."""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import PRESETS, make_checkpoint, print_table, time_interleaved, write_json
from bench.mfu import model_call
from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine

PARITY = ("parity-dinov3", "parity-vit")
DEFAULT_CASES = ("parity-dinov3", "parity-vit", "dinov3-vits16", "vit-b16")


def mcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Matthews correlation of two 0/1 vectors (0 when either is constant, as the subnet's sklearn call gives)."""
    tp = float(np.sum(pred & truth))
    tn = float(np.sum(~pred & ~truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def eval_set(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """(JPEGs, labels): the synthetic roadwork eval set, half positives."""
    from train.generate import make_sample

    samples = [make_sample(seed, i) for i in range(n)]
    return [s.jpeg for s in samples], np.array([s.label == 1 for s in samples])


def write_case(case: str, path: Path) -> None:
    if case in PARITY:
        from fixtures.checkpoints import make_dinov3, make_vit

        (make_dinov3 if case == "parity-dinov3" else make_vit)(path)
    else:
        make_checkpoint(case, path)


def load_engine(path: Path, dtype_name: str, max_batch: int) -> Engine:
    return Engine.load(path, "cpu", "float32" if dtype_name == "fp32" else "bfloat16", max_batch=max_batch,
                       quantize="int8" if dtype_name == "int8" else "none")


def accuracy(case: str, path: Path, jpegs: list[bytes], labels: np.ndarray, batch: int) -> list[dict]:
    images = [decode_image(j) for j in jpegs]
    probs = {}
    for name in ("fp32", "bf16", "int8"):
        engine = load_engine(path, name, batch)
        with torch.inference_mode():
            probs[name] = np.array([r.prediction for r in engine.predict(images)])
    ref = probs["fp32"] > 0.5
    rows = []
    for name, p in probs.items():
        drift = np.abs(p - probs["fp32"])
        decided = p > 0.5
        rows.append({"case": case, "dtype": name, "images": len(p), "max_drift": float(drift.max()),
                     "mean_drift": float(drift.mean()), "flips_vs_fp32": int(np.sum(decided != ref)),
                     "mcc_vs_fp32": mcc(decided, ref), "mcc_vs_labels": mcc(decided, labels)})
    return rows


def speed(case: str, path: Path, batch: int, rounds: int) -> dict:
    calls = {}
    for name in ("bf16", "int8"):
        engine = load_engine(path, name, 1)
        calls[name] = model_call(engine.classifier, batch, engine.spec.height, "cpu")
    seconds = time_interleaved(calls, rounds)
    return {"case": case, "batch": batch, "bf16_img_s": batch / seconds["bf16"], "int8_img_s": batch / seconds["int8"],
            "int8_speedup": seconds["bf16"] / seconds["int8"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=sorted(PARITY + tuple(p for p in PRESETS if p != "tiny")),
                    help=f"repeatable (default: {', '.join(DEFAULT_CASES)})")
    ap.add_argument("--model", type=Path, help="a trained classifier directory, instead of the cases")
    ap.add_argument("--images", type=int, default=64, help="synthetic eval images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per dtype for the speed table")
    ap.add_argument("--no-speed", action="store_true", help="accuracy only")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    jpegs, labels = eval_set(args.images)
    acc_rows, speed_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("model", args.model)] if args.model else []
        for case in ([] if args.model else args.case or list(DEFAULT_CASES)):
            path = Path(tmp) / case
            path.mkdir()
            write_case(case, path)
            cases.append((case, path))
        for case, path in cases:
            acc_rows += accuracy(case, path, jpegs, labels, args.batch)
            if not args.no_speed and case not in PARITY:
                speed_rows.append(speed(case, path, args.batch, args.rounds))
    print(f"accuracy on {args.images} synthetic eval images (P = P(roadwork), drift = |P - P_fp32|)")
    print_table(acc_rows, ["case", "dtype", "images", "max_drift", "mean_drift", "flips_vs_fp32", "mcc_vs_fp32",
                           "mcc_vs_labels"])
    if speed_rows:
        print(f"\nmodel-only speed at batch {args.batch}")
        print_table(speed_rows, ["case", "batch", "bf16_img_s", "int8_img_s", "int8_speedup"])
    write_json(args.json, {"benchmark": "int8", "accuracy": acc_rows, "speed": speed_rows})
    return {"accuracy": acc_rows, "speed": speed_rows}


if __name__ == "__main__":
    main()
