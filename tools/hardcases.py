"""Work with hard-case directories written by `python -m server --hardcases DIR` or `python -m tools.score
--hardcases DIR`.

    python -m tools.hardcases list DIR [--rule R] [--since DAY] [--until DAY] [--min-p P] [--max-p P] [--json]
    python -m tools.hardcases summary DIR [--json]                  counts per rule, stage, label and day
    python -m tools.hardcases export DIR OUT [--format fiftyone|coco] [filters as for list]
    python -m tools.hardcases merge OUT DIR [DIR ...]               replicas into one, deduplicated by image hash
    python -m tools.hardcases compact DIR                           bring labels.json up to date after a crash

Reading never blocks a server writing the same directory (the index is append-only). DAY is YYYY-MM-DD (UTC)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from imagesets.hardcase_capture import RULES
from imagesets.hardcase_store import HardCaseStore, Sample, export, merge, read_index


def parse_day(text: str) -> str:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day as YYYY-MM-DD") from None
    return text


def select(samples: list[Sample], args: argparse.Namespace) -> list[Sample]:
    """Samples matching every filter given: any of --rule, day in [since, until], P in [min_p, max_p], --stage."""
    rules = set(args.rule or ())
    return [s for s in samples
            if (not rules or rules & set(s.rules))
            and (args.since is None or s.day >= args.since) and (args.until is None or s.day <= args.until)
            and (args.min_p is None or s.prediction >= args.min_p)
            and (args.max_p is None or s.prediction <= args.max_p)
            and (args.stage is None or s.stage == args.stage)]


def summarize(samples: list[Sample]) -> dict:
    return {"samples": len(samples),
            "rules": dict(Counter(rule for s in samples for rule in s.rules)),
            "captured_by": dict(Counter(s.captured_by for s in samples)),
            "stages": dict(Counter(s.stage for s in samples)),
            "labels": dict(Counter(s.label for s in samples)),
            "days": dict(sorted(Counter(s.day for s in samples).items())),
            "with_boxes": sum(s.boxes is not None for s in samples),
            "degraded": sum(s.degraded for s in samples),
            "model_digests": dict(Counter(s.model_digest for s in samples))}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['samples']} hard cases ({summary['with_boxes']} seen by the detectors, "
             f"{summary['degraded']} degraded)"]
    for key in ("rules", "captured_by", "stages", "labels", "days", "model_digests"):
        counts = summary[key]
        lines.append(f"  {key}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "-"))
    return "\n".join(lines)


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rule", action="append", choices=RULES, help="captured under this rule (repeatable: any)")
    parser.add_argument("--since", type=parse_day, help="captured on or after this day (UTC)")
    parser.add_argument("--until", type=parse_day, help="captured on or before this day (UTC)")
    parser.add_argument("--min-p", type=float, help="final P(roadwork) at least this")
    parser.add_argument("--max-p", type=float, help="final P(roadwork) at most this")
    parser.add_argument("--stage", help="decided by this stage")


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.hardcases", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="one line per hard case")
    listing.add_argument("dir", type=existing_dir)
    add_filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead")
    summary = sub.add_parser("summary", help="counts per rule, stage, label and day")
    summary.add_argument("dir", type=existing_dir)
    add_filters(summary)
    summary.add_argument("--json", action="store_true")
    out = sub.add_parser("export", help="a subset, as a FiftyOne classification or a COCO detection dataset")
    out.add_argument("dir", type=existing_dir)
    out.add_argument("out", type=Path)
    out.add_argument("--format", choices=("fiftyone", "coco"), default="fiftyone")
    add_filters(out)
    merging = sub.add_parser("merge", help="several replicas' directories into one, deduplicated by image hash")
    merging.add_argument("out", type=Path)
    merging.add_argument("dirs", type=existing_dir, nargs="+")
    compact = sub.add_parser("compact", help="rewrite labels.json and detections.json from the index")
    compact.add_argument("dir", type=existing_dir)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        added, duplicates = merge(args.dirs, args.out)
        print(f"merged {len(args.dirs)} directories into {args.out}: {added} added, {duplicates} duplicates skipped")
        return 0
    if args.command == "compact":
        try:
            with HardCaseStore(args.dir) as store:
                store.compact()
                count = len(store.samples)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.dir}: labels.json and detections.json list {count} samples")
        return 0
    every = read_index(args.dir)
    samples = select(every, args)
    if args.command == "list":
        if not samples:  # on stderr: stdout stays a (here empty) listing for pipes
            print(f"no hard case in {args.dir} matches these filters ({len(every)} in all)", file=sys.stderr)
        for s in samples:
            if args.json:
                print(json.dumps(s.__dict__))
            else:
                print(f"{s.id}  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(s.captured_at))}  "
                      f"p={s.prediction:.4f} {s.label:8s} stage={s.stage:10s} rules={','.join(s.rules)}  {s.file}")
    elif args.command == "summary":
        summary = summarize(samples)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    else:
        written = export(samples, args.dir, args.out, args.format)
        print(f"exported {written} images to {args.out} as {args.format} ({args.out / 'labels.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
