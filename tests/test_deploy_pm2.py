"""deploy/ecosystem.config.js under the real PM2: a replica killed with kill -9 is started again and gets ready."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deploy.stack import free_ports, http_ok
from fixtures.deploy import DEPLOY, REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("pm2") is None, reason="pm2 not installed (.ci/deploy.sh installs it)")]


@pytest.fixture
def pm2(tmp_path):
    """pm2 with its own home (its own daemon) in tmp_path; the daemon is killed in teardown, whatever happened."""
    env = {**os.environ, "PM2_HOME": str(tmp_path / "pm2"), "ROADWORK_LOG_DIR": str(tmp_path / "logs"),
           "ROADWORK_PYTHON": sys.executable, "ROADWORK_REPLICAS": "1", "ROADWORK_MAX_BATCH": "2",
           "ROADWORK_HOST": "127.0.0.1", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        done = subprocess.run(["pm2", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run.env = env
    yield run
    subprocess.run(["pm2", "kill"], env=env, capture_output=True, timeout=60)


def process_info(pm2) -> dict:
    [app] = json.loads(pm2("jlist"))
    return {"pid": app["pid"], "restarts": app["pm2_env"]["restart_time"], "status": app["pm2_env"]["status"]}


def wait_ready(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not http_ok(f"{url}/readyz"):
        assert time.monotonic() < deadline, f"{url} not ready within {timeout_s} s"
        time.sleep(0.2)


def test_pm2_restarts_a_replica_killed_with_kill_9(pm2):
    [port] = free_ports(1)
    pm2.env["ROADWORK_BASE_PORT"] = str(port)
    pm2("start", str(DEPLOY / "ecosystem.config.js"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    before = process_info(pm2)
    assert before["status"] == "online" and before["pid"] > 0
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        after = process_info(pm2)
        if after["pid"] not in (0, before["pid"]) and after["status"] == "online":
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    wait_ready(url)
    assert after["restarts"] == before["restarts"] + 1
