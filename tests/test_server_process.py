"""`python -m server` as users run it: a subprocess, its command line, its exit codes, SIGTERM draining."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from runtime.image_decode import decode_image
from runtime.cascade.engine import Engine
from fixtures.checkpoints import make_vit
from fixtures.images import jpeg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vit")
    make_vit(path, seed=5)
    return path


def run_server_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_help_documents_every_option_and_its_environment_variable():
    done = run_server_cli("--help", timeout=30)
    assert done.returncode == 0
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-batch", "--max-delay-ms",
                 "--queue-size", "--timeout-s", "--max-body-mb", "--max-pixels", "--cache-entries", "--cache-ttl-s",
                 "--access-log", "--log-level", "--precision-cache"):
        assert flag in done.stdout, flag
        env = "ROADWORK_" + flag[2:].replace("-", "_").upper()
        assert env in done.stdout, env


def test_version():
    import importlib.metadata
    done = run_server_cli("--version", timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == (
        f"roadwork-cascade {importlib.metadata.version('roadwork-cascade')}")


def test_a_busy_port_fails_before_the_model_loads(tmp_path):
    """The port is taken first: with it busy, the start fails in one line naming it, and the model (here one that
    does not exist) is never read."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_server_cli("--model", str(tmp_path / "no-model"), "--port", str(port), timeout=30)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "cannot load model" not in done.stderr


def test_bad_settings_exit_with_usage_error():
    done = run_server_cli("--max-batch", "0", timeout=30)
    assert done.returncode == 2 and "--max-batch must be > 0, got 0" in done.stderr


def test_bad_models_exit_nonzero_with_one_clear_line(tmp_path, model_dir):
    """Missing directory, a file, a folder of images, unsupported model_type, truncated weights: each refuses to
    start, in one line."""
    cases = {}
    cases[tmp_path / "missing"] = "does not exist"
    cases[REPO / "README.md"] = "is a file; --model takes a directory"
    cases[REPO / "samples"] = "has neither cascade.toml (a bundle) nor config.json"
    unsupported = tmp_path / "unsupported"
    shutil.copytree(model_dir, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    cases[unsupported] = "bert"
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases[truncated] = "model.safetensors"

    # All at once: each pays the interpreter and torch start-up, in parallel.
    procs = {path: subprocess.Popen([sys.executable, "-m", "server", "--model", str(path), "--port", "0"],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for path in cases}
    for path, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 1, stderr
        assert len(lines) == 1, stderr
        assert "cannot load model" in lines[0] and cases[path] in lines[0], lines[0]


def test_sigterm_finishes_in_flight_requests_then_exits_zero(model_dir):
    images = [jpeg(200 + i) for i in range(6)]
    engine = Engine.load(model_dir, dtype="float32", max_batch=8)
    expected = [r.prediction for r in engine.predict([decode_image(im) for im in images])]

    async def scenario():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0", "--dtype", "float32",
            "--quantize", "none", "--max-batch", "8", "--max-delay-ms", "10000", "--log-level", "info", cwd=REPO,
            stderr=asyncio.subprocess.PIPE)
        log_lines: list[str] = []
        try:
            url = None
            while url is None:
                line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
                assert line, "server exited before listening:\n" + "".join(log_lines)
                log_lines.append(line)
                found = re.search(r"listening on (http://\S+)", line)
                url = found.group(1) if found else None
            assert "precision float32, quantize none (as set)" in log_lines[-1]  # explicit: no "library default"

            async def drain_log():
                while line := await proc.stderr.readline():
                    log_lines.append(line.decode())

            log_task = asyncio.create_task(drain_log())
            async with aiohttp.ClientSession() as client:
                give_up = time.monotonic() + 60
                while True:
                    async with client.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() < give_up, "server never became ready:\n" + "".join(log_lines)
                    await asyncio.sleep(0.02)

                async def predict(image: bytes):
                    async with client.post(url + "/v1/predict", json={"image": base64.b64encode(image).decode()}) as r:
                        return r.status, await r.json()

                in_flight = [asyncio.create_task(predict(im)) for im in images]
                give_up = time.monotonic() + 10
                while True:  # all six queued, waiting for a batch that the delay would hold back for 10 s
                    async with client.get(url + "/metrics") as r:
                        if re.search(r"^roadwork_queue_depth 6\.0$", await r.text(), re.M):
                            break
                    assert time.monotonic() < give_up, "the six requests never all queued"
                    await asyncio.sleep(0.01)
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*in_flight)
                answered_after = time.monotonic() - signalled
            code = await asyncio.wait_for(proc.wait(), 30)
            await log_task
            return answers, answered_after, code, "".join(log_lines)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    answers, answered_after, code, log = asyncio.run(scenario())
    assert code == 0, log
    assert [a[0] for a in answers] == [200] * 6, answers
    assert [a[1]["prediction"] for a in answers] == pytest.approx(expected, abs=1e-5)
    assert answered_after < 8.0, "draining must run the queued batch at once, not after the 10 s batch delay"
    assert "shutting down" in log and "stopped" in log


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def test_json_logs_carry_the_request_id_on_every_request_line(tmp_path, model_dir):
    """--log-format json: every stderr line is one JSON object; the access line and the per-request debug line of a
    request carry the client's X-Request-ID, and a request without one gets the id echoed to it."""
    log_file = tmp_path / "server.log"
    with log_file.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0",
                                 "--dtype", "float32", "--quantize", "none", "--log-format", "json",
                                 "--log-level", "debug", "--access-log"], cwd=REPO, stderr=stderr)
    try:
        give_up, url = time.monotonic() + 60, None
        while url is None:
            assert proc.poll() is None and time.monotonic() < give_up, log_file.read_text()
            found = re.search(r"listening on (http://[\d.]+:\d+)", log_file.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        while not ready(url):  # 503 while the model loads: the port is taken first
            assert time.monotonic() < give_up, log_file.read_text()
            time.sleep(0.05)
        asked = urllib.request.Request(url + "/v1/predict", data=jpeg(9), method="POST",
                                       headers={"Content-Type": "image/jpeg", "X-Request-ID": "client-42"})
        with urllib.request.urlopen(asked, timeout=30) as r:
            assert r.status == 200 and r.headers["X-Request-ID"] == "client-42"
        bare = urllib.request.Request(url + "/v1/predict", data=jpeg(10), method="POST",
                                      headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(bare, timeout=30) as r:
            generated = r.headers["X-Request-ID"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    for request_id in ("client-42", generated):
        about = [line for line in lines if line.get("request_id") == request_id]
        assert {line["logger"] for line in about} == {"aiohttp.access", "server.requests"}, lines
        access = next(line for line in about if line["logger"] == "aiohttp.access")
        assert '"POST /v1/predict HTTP/1.1" 200' in access["message"]
