"""deploy/'s files checked by their own programs: nginx -t, promtool (config, rules and the rules' unit tests),
amtool, hadolint, node (the PM2 file); the renderings deploy/compose.yml mounts are up to date."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import yaml

from deploy.load import post_image
from deploy.render import Layout, compose_files, local_user, render
from deploy.stack import free_ports, http_ok
from fixtures.deploy import DEPLOY, REPO


def needs(program: str):
    return pytest.mark.skipif(shutil.which(program) is None,
                              reason=f"{program} not installed (.ci/deploy.sh installs it)")


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def rendered(tmp_path):
    layout = Layout(replicas=("127.0.0.1:28101", "127.0.0.1:28102"), listen="127.0.0.1:28080", run_dir=str(tmp_path),
                    error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"), user=local_user())
    return render(layout, tmp_path)


@needs("nginx")
def test_nginx_accepts_the_rendered_config_with_every_required_setting(rendered, tmp_path):
    done = run("nginx", "-t", "-p", str(tmp_path), "-c", str(rendered["nginx"]), "-e", str(tmp_path / "error.log"))
    assert done.returncode == 0, done.stderr
    conf = rendered["nginx"].read_text()
    for line in ("server 127.0.0.1:28101 max_fails=1 fail_timeout=5s;", "server 127.0.0.1:28102 max_fails=1",
                 "keepalive 64;", "client_max_body_size 32m;", "limit_req zone=per_client burst=400 nodelay;",
                 "proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;",
                 "proxy_next_upstream_timeout 9s;", 'proxy_set_header Connection "";', "listen 127.0.0.1:28080;",
                 "location = /metrics {", "#     listen 443 ssl;"):
        assert line in conf, line
    assert "{{" not in conf


def test_nginx_body_limit_is_the_servers():
    from server.config import ServerConfig
    assert Layout().max_body_mb == ServerConfig().max_body_mb


@needs("promtool")
def test_promtool_accepts_the_prometheus_config_and_rules(rendered, tmp_path):
    done = run("promtool", "check", "config", str(rendered["prometheus"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 10 rules found" in done.stdout
    compose = tmp_path / "compose"
    compose.mkdir()
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", compose)
    shutil.copy(DEPLOY / "alerts.yml", compose)  # compose mounts both into /etc/prometheus
    done = run("promtool", "check", "config", str(compose / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs("promtool")
def test_every_alert_rule_has_a_passing_unit_test():
    done = run("promtool", "test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert firing == rules and quiet == rules  # each rule both fires and, before its `for`, does not


@needs("amtool")
def test_amtool_accepts_the_alertmanager_config():
    done = run("amtool", "check-config", str(DEPLOY / "alertmanager.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 receivers" in done.stdout


@needs("hadolint")
def test_hadolint_passes_on_the_dockerfile():
    done = run("hadolint", str(DEPLOY / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/readyz" in text and "ARG DEVICE=cpu" in text


@needs("node")
def test_pm2_ecosystem_describes_n_replicas_on_consecutive_ports():
    script = ("const c = require(process.argv[1]); console.log(JSON.stringify(c.apps.map(a => "
              "[a.name, a.env.ROADWORK_PORT, a.env.ROADWORK_DEVICE, a.autorestart, a.kill_timeout])))")
    done = subprocess.run(["node", "-e", script, str(DEPLOY / "ecosystem.config.js")], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "ROADWORK_REPLICAS": "2",
                                           "ROADWORK_BASE_PORT": "9001", "ROADWORK_DEVICES": "cuda:0,cuda:1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["roadwork-1", "9001", "cuda:0", True, 35000],
                                       ["roadwork-2", "9002", "cuda:1", True, 35000]]


def test_compose_renderings_are_up_to_date_and_files_it_mounts_exist():
    for path, text in compose_files().items():
        assert path.read_text() == text, f"{path} is stale: run python -m deploy render --compose"
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    services = compose["services"]
    assert {"replica-1", "replica-2", "replica-3", "nginx", "redis", "prometheus", "alertmanager",
            "grafana"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())["services"]
    assert [gpu[f"replica-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for i in (1, 2, 3)] == [["0"], ["1"], ["2"]]


def test_grafana_dashboard_uses_the_provisioned_datasource():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "roadwork.json").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"roadwork_|up\{", target["expr"]), target["expr"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "roadwork.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@needs("nginx")
def test_nginx_limits_each_address_and_answers_its_refusals_in_json(tmp_path):
    """The real nginx with no replica up (rate 1/s, burst 2): requests within the burst find no replica (503), the
    ones past it are refused (429); both as the server's JSON errors."""
    public, dead = free_ports(2)
    layout = Layout(replicas=(f"127.0.0.1:{dead}",), listen=f"127.0.0.1:{public}", run_dir=str(tmp_path),
                    error_log=str(tmp_path / "error.log"), access_log=str(tmp_path / "access.log"),
                    rate_per_s=1, burst=2, user=local_user())
    paths = render(layout, tmp_path)
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(paths["nginx"]), "-e",
                              str(tmp_path / "error.log"), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not http_ok(f"http://127.0.0.1:{public}/nginx-healthz"):
            assert nginx.poll() is None and time.monotonic() < deadline, (tmp_path / "error.log").read_text()
            time.sleep(0.05)
        answers = [post_image(f"http://127.0.0.1:{public}/v1/predict", b"jpeg") for _ in range(6)]
    finally:
        nginx.terminate()
        nginx.wait(10)
    codes = [(status, body["error"]["code"]) for status, body in answers]
    assert codes[0] == (503, "no_replica")
    assert codes[-1] == (429, "rate_limited")
    assert set(codes) == {(503, "no_replica"), (429, "rate_limited")}
