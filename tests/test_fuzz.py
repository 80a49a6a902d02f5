"""CI smoke of bench.fuzz: a short run over the request surface (atheris when installed, else hypothesis) must find
no crash, and report the slowest input and peak memory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fuzz_smoke_finds_no_crash(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "bench.fuzz", "--runs", "2000", "--work", str(tmp_path / "work"),
                           "--json", str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["crashes"] == [] and report["runs"] >= 2000
    assert report["slowest_s"] < 5.0 and report["peak_rss_mb"] > 0


def test_seed_corpus_has_every_accepted_format_and_the_hostile_files():
    from bench.fuzz import seed_corpus
    from runtime.image_decode import ImageDecodeError, decode_image

    seeds = seed_corpus()
    decoded = {name for name, data in seeds.items() if not name.endswith(".json") and _decodes(data)}
    assert {"baseline.jpg", "progressive.jpg", "cmyk.jpg", "rgb.png", "grey16.png", "lossy.webp",
            "lossless.webp", "rotated.jpg"} <= decoded
    for hostile in ("strip.png", "header_only.png"):
        try:
            decode_image(seeds[hostile])
        except ImageDecodeError:
            continue
        raise AssertionError(f"{hostile} decoded")


def _decodes(data: bytes) -> bool:
    from runtime.image_decode import ImageDecodeError, decode_image
    try:
        decode_image(data)
        return True
    except ImageDecodeError:
        return False
