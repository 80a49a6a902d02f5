"""`python -m deploy up` as a user runs it: starts everything, prints the URLs, serves, and Ctrl-C stops it all;
`python -m bench.stack` at a tiny size."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deploy.load import post_image
from deploy.stack import StackSpec, free_ports, missing_programs, port_free
from fixtures.deploy import REPO, SAMPLES

pytestmark = pytest.mark.slow


def test_up_serves_through_nginx_and_ctrl_c_stops_everything(tmp_path):
    if missing_programs(StackSpec(run_dir=tmp_path)):
        pytest.skip("nginx, redis-server or prometheus not installed (.ci/deploy.sh installs them)")
    public, replica, redis, prometheus = free_ports(4)
    argv = [sys.executable, "-m", "deploy", "up", "--replicas", "1", "--port", str(public), "--replica-port",
            str(replica), "--redis-port", str(redis), "--prometheus-port", str(prometheus),
            "--run-dir", str(tmp_path / "run"), "--server-arg=--max-batch", "--server-arg=2"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    up = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        printed = "".join(lines)
        for url in (f"http://127.0.0.1:{public}/v1/predict", f"http://127.0.0.1:{replica}",
                    f"redis://127.0.0.1:{redis}/0", f"http://127.0.0.1:{prometheus}"):
            assert url in printed, printed
        status, answer = post_image(f"http://127.0.0.1:{public}/v1/predict", SAMPLES[0].read_bytes())
        assert status == 200 and 0 <= answer["prediction"] <= 1
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert all(port_free(port) for port in (public, replica, redis, prometheus))


def test_bench_stack_runs_at_a_tiny_size(tmp_path):
    if missing_programs(StackSpec(run_dir=tmp_path, prometheus_port=0)):
        pytest.skip("nginx or redis-server not installed (.ci/deploy.sh installs them)")
    out = tmp_path / "stack.json"
    done = subprocess.run([sys.executable, "-m", "bench.stack", "--replicas", "1", "--seconds", "2", "--warmup-s", "1",
                           "--clients", "2", "--cache-images", "2", "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    [row] = result["throughput"]
    assert row["replicas"] == 1 and row["ok"] > 0 and row["failed"] == 0
    assert sum(kind["n"] for kind in result["cache"].values()) == 3 * 2
    assert result["cpu"]["torch_cpu_capability"]
