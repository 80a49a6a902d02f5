"""Fill the {{name}} placeholders of deploy/nginx.conf and deploy/prometheus.yml for one deployment's addresses."""
from __future__ import annotations

import getpass
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
DEFAULT_REPLICA_PORT = 8101    # replicas listen on 8101, 8102, ...: the miner's axon owns 8091 (subnet default)
DEFAULT_PUBLIC_PORT = 8080     # nginx: the port a single `python -m server` would use, so clients need no change
DEFAULT_MAX_BODY_MB = 32       # server/config.py max_body_mb


@dataclass(frozen=True)
class Layout:
    """Where things listen and write, for one rendering."""
    replicas: tuple[str, ...] = tuple(f"127.0.0.1:{DEFAULT_REPLICA_PORT + i}" for i in range(3))  # host:port
    listen: str = f"127.0.0.1:{DEFAULT_PUBLIC_PORT}"
    run_dir: str = "/var/lib/nginx"     # pid file and request-body/proxy temp directories
    error_log: str = "/var/log/nginx/roadwork-error.log"
    access_log: str = "/var/log/nginx/roadwork-access.log"
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    rate_per_s: int = 200
    burst: int = 400
    max_fails: int = 1
    fail_timeout_s: int = 5
    scrape_interval: str = "15s"
    alertmanager: str = "127.0.0.1:9093"
    user: str | None = field(default=None)  # nginx workers' user; None: nginx's default

    def __post_init__(self) -> None:
        assert self.replicas, "at least one replica"
        for address in self.replicas:
            assert re.fullmatch(r"[\w.\-]+:\d+", address), f"replica address must be host:port, got {address!r}"


def fill(name: str, values: dict[str, str]) -> str:
    """deploy/<name> with every {{placeholder}} replaced; an unknown or unused one is an error (templates and callers
    stay in step)."""
    template = (DEPLOY_DIR / name).read_text()
    used = set(PLACEHOLDER.findall(template))
    assert used == set(values), f"{name}: placeholders {sorted(used)} vs values {sorted(values)}"
    return f"# Rendered by `python -m deploy render` from deploy/{name}: edit that, not this.\n" + \
        PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def nginx_conf(layout: Layout) -> str:
    servers = "\n".join(f"        server {address} max_fails={layout.max_fails} fail_timeout={layout.fail_timeout_s}s;"
                        for address in layout.replicas)
    return fill("nginx.conf", {
        "run_dir": layout.run_dir, "error_log": layout.error_log, "access_log": layout.access_log,
        "user_line": f"user {layout.user};" if layout.user else "",
        "max_body_mb": str(layout.max_body_mb), "rate_per_s": str(layout.rate_per_s), "burst": str(layout.burst),
        "upstream_servers": servers, "listen": layout.listen,
        "next_upstream_tries": str(max(2, len(layout.replicas))),
    })


def prometheus_yml(layout: Layout) -> str:
    return fill("prometheus.yml", {
        "scrape_interval": layout.scrape_interval, "alertmanager": f"'{layout.alertmanager}'",
        "replica_targets": ", ".join(f"'{address}'" for address in layout.replicas),
    })


def local_user() -> str | None:
    """nginx started by root switches its workers to `nobody`, who cannot write our temp dirs: keep root's."""
    return getpass.getuser() if os.geteuid() == 0 else None


def render(layout: Layout, out: Path) -> dict[str, Path]:
    """nginx.conf, prometheus.yml and the alert rules it loads, written to `out`; their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"nginx": out / "nginx.conf", "prometheus": out / "prometheus.yml", "alerts": out / "alerts.yml"}
    paths["nginx"].write_text(nginx_conf(layout))
    paths["prometheus"].write_text(prometheus_yml(layout))
    shutil.copyfile(DEPLOY_DIR / "alerts.yml", paths["alerts"])
    return paths


COMPOSE_REPLICAS = 3


def compose_layout() -> Layout:
    """deploy/compose.yml's network: one replica per service on its own port, nginx and Prometheus beside them."""
    return Layout(replicas=tuple(f"replica-{i + 1}:{DEFAULT_REPLICA_PORT}" for i in range(COMPOSE_REPLICAS)),
                  listen=str(DEFAULT_PUBLIC_PORT), run_dir="/tmp", error_log="/dev/stderr", access_log="/dev/stdout",
                  alertmanager="alertmanager:9093")


def compose_files() -> dict[Path, str]:
    """The renderings deploy/compose.yml mounts (kept in git; tests check they match the templates)."""
    layout = compose_layout()
    return {DEPLOY_DIR / "compose" / "nginx.conf": nginx_conf(layout),
            DEPLOY_DIR / "compose" / "prometheus.yml": prometheus_yml(layout)}
