"""deploy/k8s/: every manifest validated offline against the Kubernetes schemas of one pinned version
(kubernetes-validate bundles them), the CRDs against a structural schema of the fields used, and the manifests kept
in step with the server (routes, flags, drain), deploy/alerts.yml, deploy/redis.conf and the bundle's cascade.toml."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fixtures.deploy import DEPLOY, REPO

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31"  # the schemas every core manifest must pass (strict: unknown fields are errors)
VARIANTS = ("overlays/cpu", "overlays/gpu", "kserve")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "InferenceService"}

# No package on PyPI ships the Prometheus Operator's or KServe's CRD schemas as JSON schema, so these check the
# structure of what the manifests use: apiVersion, kind, the required fields, their types, and no field outside
# the ones listed (a misspelt key fails). A field the manifests start using is added here, as the CRD names it.
# The InferenceService's containers and volumes are a PodSpec's, so they also pass the core Pod schema below.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?"
                                          r"([0-9]+ms)?)$", "minLength": 1}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "labels": _STR_MAP, "annotations": _STR_MAP}, "additionalProperties": False}
_LABEL_SELECTOR = {"type": "object", "properties": {"matchLabels": _STR_MAP}, "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


CRD_SCHEMAS = {
    "PrometheusRule": _resource("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False, "properties": {"groups": {
            "type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION, "rules": {
                    "type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                        "properties": {"alert": {"type": "string", "minLength": 1}, "expr": {"type": "string"},
                                       "for": _DURATION, "labels": _STR_MAP, "annotations": _STR_MAP}}}}}}}}),
    "ServiceMonitor": _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {"selector": _LABEL_SELECTOR, "jobLabel": {"type": "string"}, "endpoints": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                               "interval": _DURATION, "scrapeTimeout": _DURATION}}}}}),
    "InferenceService": _resource("serving.kserve.io/v1beta1", "InferenceService", {
        "type": "object", "required": ["predictor"], "additionalProperties": False, "properties": {"predictor": {
            "type": "object", "required": ["containers"], "additionalProperties": False,
            "properties": {"minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1},
                           "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                           "scaleTarget": {"type": "integer", "minimum": 1},
                           "timeout": {"type": "integer", "minimum": 1},
                           "containers": {"type": "array", "minItems": 1, "maxItems": 1},
                           "volumes": {"type": "array"}}}}}),
}


def load_kustomization(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` applies. Every kustomization here only lists resources (no patches,
    generators or transformers), so reading the files is what kustomize does."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) == {"resources"}, f"{directory}: only `resources`, or this loader is not kustomize"
    objects = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        assert path.is_relative_to(K8S), f"{directory}: {entry} is outside deploy/k8s"
        objects += load_kustomization(path) if path.is_dir() else \
            [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return objects


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects with one kind and name"
    return keyed


def server_container(variant: str) -> tuple[dict, dict]:
    """The server's container in one variant, and its pod spec (a predictor's is one)."""
    objects = by_kind(load_kustomization(K8S / variant))
    if variant == "kserve":
        predictor = objects["InferenceService", "roadwork-kserve"]["spec"]["predictor"]
        return predictor["containers"][0], predictor
    pod = objects["Deployment", "roadwork"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server"), pod


def server_config(container: dict):
    """The container's arguments and ROADWORK_* environment, parsed by `python -m server`'s own parser."""
    from dataclasses import fields

    from runtime.cascade.settings import env_name
    from server.config import ServerConfig, parse_config

    environ = {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("ROADWORK_")}
    known = {env_name(f.name) for f in fields(ServerConfig)}
    assert set(environ) <= known, f"{container['name']}: not server settings: {sorted(set(environ) - known)}"
    return parse_config(container["args"], environ)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_core_manifest_passes_the_pinned_kubernetes_schema(variant):
    objects = load_kustomization(K8S / variant)
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "Deployment", "Service", "PrometheusRule"} <= kinds
    for o in objects:
        if o["kind"] not in CRD_KINDS:
            validated = kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            assert validated == KUBERNETES_VERSION, (o["kind"], validated)
    if variant != "kserve":
        assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
        hpa = by_kind(objects)["HorizontalPodAutoscaler", "roadwork"]
        assert hpa["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_custom_resource_passes_its_structural_schema(variant):
    crds = [o for o in load_kustomization(K8S / variant) if o["kind"] in CRD_KINDS]
    assert crds
    for o in crds:
        jsonschema.validate(o, CRD_SCHEMAS[o["kind"]])
        if o["kind"] == "InferenceService":  # a predictor's containers and volumes are a PodSpec's
            predictor = o["spec"]["predictor"]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": o["metadata"]["name"]},
                   "spec": {"containers": predictor["containers"], "volumes": predictor.get("volumes", [])}}
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_the_structural_schemas_reject_what_the_crds_would():
    rule = by_kind(load_kustomization(K8S / "base"))["PrometheusRule", "roadwork"]
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["fro"] = broken["spec"]["groups"][0]["rules"][0].pop("for")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SCHEMAS["PrometheusRule"])
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SCHEMAS["PrometheusRule"])
    isvc = by_kind(load_kustomization(K8S / "kserve"))["InferenceService", "roadwork-kserve"]
    broken = copy.deepcopy(isvc)
    del broken["spec"]["predictor"]["containers"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SCHEMAS["InferenceService"])


def test_prometheus_rule_is_deploy_alerts_yml():
    rule = by_kind(load_kustomization(K8S / "base"))["PrometheusRule", "roadwork"]
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]


def test_configmaps_carry_the_bundles_cascade_toml_and_deploy_redis_conf():
    objects = by_kind(load_kustomization(K8S / "base"))
    cascade = objects["ConfigMap", "roadwork-cascade"]["data"]
    assert cascade == {"cascade.toml": (REPO / "bundles" / "default" / "cascade.toml").read_text()}
    assert objects["ConfigMap", "roadwork-redis"]["data"] == {"redis.conf": (DEPLOY / "redis.conf").read_text()}
    redis = objects["Deployment", "roadwork-redis"]["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())["services"]["redis"]
    assert redis["args"] == compose["command"] and redis["image"] == compose["image"]


def test_probe_and_scrape_paths_are_server_routes():
    from aiohttp import web

    from server.kserve import add_kserve_routes
    from server.routes import add_routes

    app = web.Application()
    add_routes(app)
    add_kserve_routes(app, SimpleNamespace(engine=SimpleNamespace(model_dir="/app/bundles/default")))
    gets = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    paths = set()
    for variant in VARIANTS:
        container, _ = server_container(variant)
        probes = [container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe") if p in container]
        paths |= {probe["httpGet"]["path"] for probe in probes}
    assert paths == {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    monitor = by_kind(load_kustomization(K8S / "serving"))["ServiceMonitor", "roadwork"]
    paths |= {endpoint["path"] for endpoint in monitor["spec"]["endpoints"]}
    assert paths <= gets, sorted(paths - gets)
    for variant in ("overlays/cpu", "overlays/gpu"):
        container, _ = server_container(variant)
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_args_are_server_flags_and_match_ports_mounts_and_services(variant):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY bundles bundles" in dockerfile  # the image has /app/bundles
    container, pod = server_container(variant)
    config = server_config(container)
    assert config.host == "0.0.0.0"
    [port] = container["ports"]
    assert port["containerPort"] == config.port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in (port.get("name"), port["containerPort"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    cascade = mounts[str(config.model / "cascade.toml")]
    [volume] = [v for v in pod["volumes"] if v["name"] == cascade["name"]]
    assert volume["configMap"]["name"] == "roadwork-cascade" and cascade["subPath"] == "cascade.toml"
    redis = urlsplit(config.redis_url)
    redis_service = by_kind(load_kustomization(K8S / "base"))["Service", redis.hostname]
    assert redis.port in [p["port"] for p in redis_service["spec"]["ports"]]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert config.device == ("cuda" if "gpu" in variant else "cpu")
    assert (gpus == "1") == (config.device == "cuda")
    assert container["resources"]["requests"].get("nvidia.com/gpu") == gpus


@pytest.mark.parametrize("variant", ["overlays/cpu", "overlays/gpu"])
def test_the_drain_fits_in_the_grace_period_and_the_service_reaches_the_pods(variant):
    objects = by_kind(load_kustomization(K8S / variant))
    deployment = objects["Deployment", "roadwork"]
    container, pod = server_container(variant)
    config = server_config(container)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + config.shutdown_timeout_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service", "roadwork"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [container["ports"][0]["name"]]
    assert objects["PodDisruptionBudget", "roadwork"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler", "roadwork"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "roadwork"}
    assert hpa["minReplicas"] >= 2 and deployment["spec"]["replicas"] == hpa["minReplicas"]
    monitor = objects["ServiceMonitor", "roadwork"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # The ServiceMonitor's job label is the Service's name; the alert rules select job="roadwork".
    assert 'up{job="roadwork"}' in (DEPLOY / "alerts.yml").read_text() and service["metadata"]["name"] == "roadwork"


def test_cpu_and_gpu_deployments_differ_only_in_the_device():
    def without_device(variant: str) -> dict:
        deployment = copy.deepcopy(by_kind(load_kustomization(K8S / variant))["Deployment", "roadwork"])
        pod = deployment["spec"]["template"]["spec"]
        pod.pop("tolerations", None)
        for container in pod["containers"]:
            container.pop("image")
            container.pop("resources")
            container["env"] = [e for e in container["env"] if e["name"] != "ROADWORK_DEVICE"]
        return deployment

    assert without_device("overlays/cpu") == without_device("overlays/gpu")
    gpu, gpu_pod = server_container("overlays/gpu")
    assert gpu["image"].endswith(":cuda") and gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (its kustomize is optional here)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_kubectl_kustomize_builds_what_the_loader_reads(variant):
    done = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert by_kind(list(yaml.safe_load_all(done.stdout))) == by_kind(load_kustomization(K8S / variant))
