"""The whole stack on one machine with the real programs: Redis, N server replicas, nginx and Prometheus, each a
child process with its own log, started in order and stopped in reverse (replicas drain on SIGTERM)."""
from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from deploy.render import DEFAULT_PUBLIC_PORT, DEFAULT_REPLICA_PORT, DEPLOY_DIR, Layout, local_user, render

log = logging.getLogger(__name__)

REPO_DIR = DEPLOY_DIR.parent


class StackError(RuntimeError):
    pass


PROXIED_CONNECTIONS_PER_IP = "1024"  # the server's --max-connections default: no tighter cap per proxy


@dataclass(frozen=True)
class StackSpec:
    run_dir: Path                              # configs, logs, pid files, Prometheus data
    replicas: int = 3
    model: Path = REPO_DIR / "bundles" / "default"
    host: str = "127.0.0.1"
    public_port: int = DEFAULT_PUBLIC_PORT
    replica_port: int = DEFAULT_REPLICA_PORT   # replica i listens on replica_port + i
    redis_port: int = 6379
    prometheus_port: int = 9090                # 0: no Prometheus
    scrape_interval: str = "15s"
    server_args: tuple[str, ...] = ()          # more `python -m server` options for every replica
    redis: bool = True
    rate_per_s: int = 200
    burst: int = 400
    fail_timeout_s: int = 5
    ready_timeout_s: float = 120.0
    torch_threads: int | None = None           # per replica; None: $OMP_NUM_THREADS, else the cores shared out
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.replicas >= 1, "at least one replica"

    def replica_address(self, i: int) -> str:
        return f"{self.host}:{self.replica_port + i}"


@dataclass
class Child:
    """One program of the stack: argv, its log file, its process while running."""
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        with self.log_path.open("ab") as out:
            # Own session: a Ctrl-C in the terminal reaches `python -m deploy up` only, which stops us in order.
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=REPO_DIR, env=self.env, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send(self, sig: int) -> None:
        if self.running:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal, wait up to timeout_s, then SIGKILL; the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s of signal %d; killing it", self.name, timeout_s, sig)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def missing_programs(spec: StackSpec) -> list[str]:
    wanted = ["nginx"] + (["redis-server"] if spec.redis else []) + (["prometheus"] if spec.prometheus_port else [])
    return [p for p in wanted if shutil.which(p) is None]


class Stack:
    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.run_dir = spec.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(replicas=tuple(spec.replica_address(i) for i in range(spec.replicas)),
                             listen=f"{spec.host}:{spec.public_port}", run_dir=str(self.run_dir),
                             error_log=str(self.run_dir / "nginx-error.log"),
                             access_log=str(self.run_dir / "nginx-access.log"), rate_per_s=spec.rate_per_s,
                             burst=spec.burst, fail_timeout_s=spec.fail_timeout_s,
                             scrape_interval=spec.scrape_interval, user=local_user())
        self.paths = render(self.layout, self.run_dir)
        self.redis = Child("redis", [shutil.which("redis-server") or "redis-server", str(DEPLOY_DIR / "redis.conf"),
                                     "--port", str(spec.redis_port), "--bind", spec.host, "--dir", str(self.run_dir),
                                     "--daemonize", "no"], self.run_dir / "redis.log")
        self.replicas = [self._replica(i) for i in range(spec.replicas)]
        self.nginx = Child("nginx", [shutil.which("nginx") or "nginx", "-p", str(self.run_dir),
                                     "-c", str(self.paths["nginx"]), "-e", str(self.run_dir / "nginx-error.log"),
                                     "-g", "daemon off;"], self.run_dir / "nginx.log")
        self.prometheus = Child("prometheus", [
            shutil.which("prometheus") or "prometheus", f"--config.file={self.paths['prometheus']}",
            f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
            f"--web.listen-address={spec.host}:{spec.prometheus_port}", "--log.level=warn"],
            self.run_dir / "prometheus.log")

    # --- addresses -----------------------------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.public_port}"

    def replica_url(self, i: int) -> str:
        return f"http://{self.spec.replica_address(i)}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.spec.host}:{self.spec.redis_port}/0"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.prometheus_port}"

    # --- lifecycle -----------------------------------------------------------------------------------------

    def _replica(self, i: int) -> Child:
        spec = self.spec
        # Behind nginx every connection comes from the proxy's address: the per-address cap is nginx's limit_req.
        argv = [sys.executable, "-m", "server", "--model", str(spec.model), "--host", spec.host,
                "--port", str(spec.replica_port + i), "--max-connections-per-ip", PROXIED_CONNECTIONS_PER_IP,
                *spec.server_args]
        if spec.redis:
            argv += ["--redis-url", self.redis_url]
        threads = spec.torch_threads or os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) //
                                                                                 spec.replicas)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **spec.env}
        return Child(f"replica-{i + 1}", argv, self.run_dir / f"replica-{i + 1}.log", env)

    def start(self) -> None:
        """Every part, each waited for; on any failure everything started is stopped and StackError raised."""
        missing = missing_programs(self.spec)
        if missing:
            raise StackError(f"not installed: {', '.join(missing)} (see .ci/deploy.sh for how to install them)")
        try:
            if self.spec.redis:
                self.start_redis()
            for child in self.replicas:
                child.start()
            for i in range(len(self.replicas)):
                self.wait_replica_ready(i)
            self.nginx.start()
            self.wait_until(self.nginx, f"{self.public_url}/nginx-healthz")
            if self.spec.prometheus_port:
                self.prometheus.start()
                self.wait_until(self.prometheus, f"{self.prometheus_url}/-/ready")
        except BaseException:
            self.stop()
            raise

    def start_redis(self) -> None:
        self.redis.start()
        self.wait_until(self.redis, None, ping_port=self.spec.redis_port)

    def start_replica(self, i: int) -> None:
        self.replicas[i].start()
        self.wait_replica_ready(i)

    def wait_replica_ready(self, i: int) -> None:
        self.wait_until(self.replicas[i], f"{self.replica_url(i)}/readyz")

    def wait_until(self, child: Child, url: str | None, ping_port: int | None = None) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout_s
        while time.monotonic() < deadline:
            if not child.running:
                raise StackError(f"{child.name} exited with {child.process.returncode}; its log ends:\n"
                                 f"{child.log_tail()}")
            if (url is not None and http_ok(url)) or (ping_port is not None and redis_ping(self.spec.host, ping_port)):
                return
            time.sleep(0.1)
        raise StackError(f"{child.name} not ready within {self.spec.ready_timeout_s:.0f} s; its log ends:\n"
                         f"{child.log_tail()}")

    def stop(self) -> None:
        """Reverse order: nginx stops taking requests, replicas drain, then Prometheus and Redis. Idempotent."""
        self.nginx.stop(signal.SIGQUIT, timeout_s=10)  # graceful: finishes requests in flight
        for child in self.replicas:
            child.send(signal.SIGTERM)               # all drain at once
        for child in self.replicas:
            child.stop(signal.SIGTERM, timeout_s=40)
        self.prometheus.stop(signal.SIGTERM, timeout_s=15)
        self.redis.stop(signal.SIGTERM, timeout_s=10)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_ping(host: str, port: int) -> bool:
    """PING over a raw socket: no client library needed to know Redis is up."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on it (connections of an earlier listener may linger in TIME_WAIT: servers bind with
    SO_REUSEADDR, and so does this check)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` consecutive free loopback ports (replica i listens on base + i), for tests and benchmarks."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        if all(port_free(base + i) for i in range(count)):
            return list(range(base, base + count))
    raise StackError(f"no {count} consecutive free ports found")
