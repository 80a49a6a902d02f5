"""Each Triton kernel against its plain-torch reference, per image.

    python -m bench.kernels [--device cuda] [--min-time 0.5]

On CUDA both run on the GPU and are timed with triton.testing.do_bench; the table shows the speedup. On CPU
the runtime calls the references (the Triton kernels need a GPU; the interpreter is a test tool, not a
runtime), so only the reference is timed: its CPU cost per image is what each kernel's work costs on CPU.

Kernels: kernels/preprocess.py (resize + rescale + normalize into a batch slot), and, when present,
kernels/route.py (early-exit routing of a batch), kernels/vote.py (weighted detector vote) and kernels/nms.py
(class-aware NMS of YOLO-style raw heads). A kernel
module that is missing, or whose functions no longer take the arguments below, is skipped with a note."""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bench.common import print_table, time_call, write_json


@dataclass
class Case:
    kernel: str
    name: str
    images: int  # images handled by one call
    reference: Callable[[], object]
    triton: Callable[[], object] | None  # None on CPU


def street_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random (H, W, 3) uint8 image (JPEG-like content; resampling cost does not depend on it)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, max(2, height // 16), max(2, width // 16))).astype(np.float32))
    image = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bilinear")[0]
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def preprocess_cases(device: torch.device) -> list[Case]:
    from kernels.preprocess import preprocess_reference
    from kernels.preprocess_triton import preprocess_triton
    from runtime.models.preprocessor import preprocess_spec

    specs = {
        "dinov3 (float resize)": {"image_processor_type": "DINOv3ViTImageProcessorFast",
                                  "size": {"height": 224, "width": 224}},
        "vit (Pillow uint8 resize)": {"image_processor_type": "ViTImageProcessor",
                                      "size": {"height": 224, "width": 224}},
    }
    cases = []
    for label, cfg in specs.items():
        spec = preprocess_spec(cfg)
        for h, w in [(224, 224), (480, 640), (1080, 1920)]:
            image = street_image(h, w).to(device)
            out = torch.empty(3, 224, 224, device=device)
            cases.append(Case("preprocess", f"{label} {h}x{w}->224", 1,
                              lambda image=image, spec=spec, out=out: preprocess_reference(image, spec, out),
                              (lambda image=image, spec=spec, out=out: preprocess_triton(image, spec, out))
                              if device.type == "cuda" else None))
    return cases


def route_cases(device: torch.device) -> list[Case]:
    from kernels.route import route_reference
    from kernels.route_triton import route_triton

    cases = []
    for batch in (32, 256):
        prob = torch.rand(batch, generator=torch.Generator().manual_seed(0)).to(device)
        rows = torch.tensor([batch], dtype=torch.int32, device=device)
        exits = torch.empty(batch, dtype=torch.int8, device=device)
        index = torch.empty(batch, dtype=torch.int32, device=device)
        count = torch.empty(1, dtype=torch.int32, device=device)
        args = (prob, rows, 0.1, 0.9, exits, index, count)
        cases.append(Case("route", f"batch {batch}", batch, lambda args=args: route_reference(*args),
                          (lambda args=args: route_triton(*args)) if device.type == "cuda" else None))
    return cases


def vote_cases(device: torch.device) -> list[Case]:
    from kernels.vote import vote_reference
    from kernels.vote_triton import vote_triton

    cases = []
    queries, detectors = 300, 3  # DETR-style detectors: 300 queries, one roadwork class each
    for rows in (16, 128):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(rows, queries * detectors, generator=g).to(device)
        offsets = torch.arange(0, queries * (detectors + 1), queries, dtype=torch.int32, device=device)
        thresholds = torch.full((detectors,), 0.5, device=device)
        weights = torch.ones(detectors, device=device)
        cls_prob = torch.rand(rows, generator=g).to(device)
        conf = torch.empty(rows, detectors, device=device)
        fraction, prob = torch.empty(rows, device=device), torch.empty(rows, device=device)
        args = (scores, offsets, thresholds, weights, cls_prob, 1.0, 2 / 3, conf, fraction, prob)
        cases.append(Case("vote", f"{rows} images x {detectors} detectors x {queries} queries", rows,
                          lambda args=args: vote_reference(*args),
                          (lambda args=args: vote_triton(*args)) if device.type == "cuda" else None))
    return cases


def nms_cases(device: torch.device) -> list[Case]:
    from kernels.nms import nms_reference
    from kernels.nms_triton import nms_triton

    cases = []
    anchors, classes = 8400, 80  # a YOLO raw head at 640 x 640
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        corner = torch.rand(batch, anchors, 2, generator=g) * 600
        boxes = torch.cat([corner, corner + torch.rand(batch, anchors, 2, generator=g) * 120], dim=-1).to(device)
        scores = (torch.rand(batch, anchors, generator=g) ** 8).to(device)  # ~1300 above the 0.25 floor per image
        labels = torch.randint(0, classes, (batch, anchors), generator=g).to(device)
        args = (boxes, scores, labels, 0.7, 0.25, 300)
        cases.append(Case("nms", f"batch {batch} x {anchors} boxes x {classes} classes, max_det 300", batch,
                          lambda args=args: nms_reference(*args),
                          (lambda args=args: nms_triton(*args)) if device.type == "cuda" else None))
    return cases


CASES = {"preprocess": preprocess_cases, "route": route_cases, "vote": vote_cases, "nms": nms_cases}


def collect(device: torch.device, kernels: list[str]) -> tuple[list[Case], list[str]]:
    """(cases, notes on skipped kernels)."""
    cases, notes = [], []
    for kernel in kernels:
        try:
            importlib.import_module(f"kernels.{kernel}")
        except ImportError as e:
            notes.append(f"kernels/{kernel}.py: skipped, not importable ({e})")
            continue
        try:
            made = CASES[kernel](device)
            for case in made:  # one call each: a changed signature shows up here, not mid-table
                case.reference()
                if case.triton is not None:
                    case.triton()
        except (ImportError, TypeError, AssertionError, RuntimeError) as e:
            notes.append(f"kernels/{kernel}.py: skipped, its functions no longer match this benchmark "
                         f"({type(e).__name__}: {e})")
            continue
        cases += made
    return cases, notes


def measure(case: Case, device: torch.device, min_time: float) -> dict:
    row = {"kernel": case.kernel, "case": case.name, "device": device.type}
    if device.type == "cuda":
        from triton.testing import do_bench

        ref_ms, triton_ms = do_bench(case.reference), do_bench(case.triton)
        row.update(ref_us_per_image=ref_ms * 1e3 / case.images, triton_us_per_image=triton_ms * 1e3 / case.images,
                   speedup=ref_ms / triton_ms)
    else:
        seconds = time_call(case.reference, min_time)
        row.update(ref_us_per_image=seconds * 1e6 / case.images, images_per_s=case.images / seconds)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per CPU measurement")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    unknown = set(args.kernels.split(",")) - set(CASES)
    if unknown:
        ap.error(f"--kernels: unknown {sorted(unknown)}; choose from {','.join(CASES)}")
    cases, notes = collect(device, args.kernels.split(","))
    rows = [measure(case, device, args.min_time) for case in cases]
    for note in notes:
        print(f"note: {note}")
    if rows:
        extra = ["triton_us_per_image", "speedup"] if device.type == "cuda" else ["images_per_s"]
        print_table(rows, ["kernel", "case", "device", "ref_us_per_image"] + extra)
    if device.type == "cpu":
        print("CPU: the runtime runs the references above; Triton kernels are timed on CUDA only.")
    write_json(args.json, {"benchmark": "kernels", "device": device.type, "rows": rows, "notes": notes})
    return rows


if __name__ == "__main__":
    main()
