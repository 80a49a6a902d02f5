"""bench/load.py in its --tiny mode: it starts the server, loads it both ways and reports sane numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures.checkpoints import make_vit

REPO = Path(__file__).resolve().parents[1]


def test_tiny_load_run_reports_throughput_latency_and_overhead(tmp_path):
    make_vit(tmp_path / "model", seed=7)
    report_path = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "bench.load", "--tiny", "--model", str(tmp_path / "model"),
                           "--dtype", "float32", "--quantize", "none", "--json", str(report_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert json.loads(done.stdout) == report
    assert report["offline"]["images_per_s"] > 0
    closed, open_ = report["phases"]
    assert closed["phase"].startswith("closed") and open_["phase"].startswith("open")
    for phase in (closed, open_):
        assert phase["errors"] == 0 and phase["ok"] == phase["sent"] > 0
        assert 0 < phase["p50_ms"] <= phase["p90_ms"] <= phase["p99_ms"]
        assert phase["throughput_per_s"] > 0
    assert closed["sent"] <= 48 and open_["sent"] <= 48  # bounded by the request count (and by time)
    assert report["server_vs_offline_throughput"] == round(closed["throughput_per_s"]
                                                           / report["offline"]["images_per_s"], 3)
    assert report["server_exit_code"] == 0


def test_load_refuses_non_loopback_targets():
    done = subprocess.run([sys.executable, "-m", "bench.load", "--url", "http://10.0.0.1:8080"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
