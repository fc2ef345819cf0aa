"""deploy/kubernetes/: the plain Deployment validated against the Kubernetes schema (offline, from
kubernetes-validate), and both manifests cross-checked against what the code answers: probe paths are
our routes, ports and flags are what `emoserve serve` takes, every EMOSERVE_* value is a valid setting,
threads fit the CPU limit, the grace period covers preStop + drain, the image is the one
scripts/build-image.sh makes (its entrypoint, user and model volume as deploy/container/Dockerfile says),
and the RayService runs the applications of deploy/ray/serve.yaml with the proxy callback that
emoserve.ray_serve names."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from typing import Any

import pytest
import yaml

from emoserve.api.app import create_app
from emoserve.cli import parser
from emoserve.serving.settings import Settings, load_settings
from tests.support.paths import ROOT

DEPLOY = ROOT / "deploy"
VERSION = importlib.metadata.version("emoserve")
K8S_VERSION = "1.33.0"  # PodLifecycleSleepAction (preStop sleep) is GA from 1.34; beta and on since 1.30


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def image_config(image: str) -> dict[str, Any]:
    """The config of `image` (emoserve:VERSION-TARGET) as scripts/build-image.sh writes it: read from the
    Dockerfile's stage TARGET by deploy/container/oci.py, which packs it."""
    spec = importlib.util.spec_from_file_location("oci", DEPLOY / "container" / "oci.py")
    assert spec is not None and spec.loader is not None
    oci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oci)
    name, _, tag = image.partition(":")
    version, _, target = tag.partition("-")
    assert (name, version) == ("emoserve", VERSION), image
    return oci.image_config(DEPLOY / "container" / "Dockerfile", target)


@pytest.mark.parametrize("name", ["emoserve.yaml"])
def test_manifests_are_valid_kubernetes(name: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in documents(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_deployment_runs_emoserve_serve_with_valid_settings_and_probes_on_our_routes() -> None:
    docs = documents("emoserve.yaml")
    deployment = by_kind(docs, "Deployment")["spec"]
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    image = image_config(container["image"])
    command = container.get("command", image["Entrypoint"]) + container["args"]
    assert command[:2] == ["emoserve", "serve"]
    flags = vars(parser().parse_args(command[1:]))  # argparse exits on an unknown flag
    environ = env_of(container)
    assert all(key.startswith("EMOSERVE_") for key in environ)
    settings = load_settings(flags, environ)  # a bad value fails naming its key
    known = {"EMOSERVE_HOME"} | {f"EMOSERVE_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert set(environ) <= known, set(environ) - known
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port and settings.host == "0.0.0.0"
    routes = set(create_app(settings).openapi()["paths"])
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    probes = {kind: container[kind]["httpGet"] for kind in kinds}
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == "http"
    # threads: not more than the CPUs the pod may use (load_model would take every core it sees)
    limit = cpus(container["resources"]["limits"]["cpu"])
    assert settings.threads is not None and settings.threads <= math.floor(limit)
    # shutdown: preStop, then SIGTERM and the drain, all within the grace period
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.drain_timeout_s
    # the image's user, on a read-only root, writing the model volume (at the image's EMOSERVE_HOME) and /tmp
    uid, gid = (int(part) for part in image["User"].split(":"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (uid, gid)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    image_env = dict(item.split("=", 1) for item in image["Env"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {environ.get("EMOSERVE_HOME", image_env["EMOSERVE_HOME"]), "/tmp"} <= mounts
    assert set(image["Volumes"]) <= mounts
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"] == deployment["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.ray
def test_the_rayservice_runs_the_serve_config_with_the_proxy_callback() -> None:
    from emoserve.ray_serve import PROXY_CALLBACK, split_args

    (service,) = documents("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    checked_in = yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())
    assert serve_config["applications"] == checked_in["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            assert env_of(container)["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
            assert container["image"] == f"emoserve:{VERSION}-ray"  # scripts/build-image.sh ray
            uid, _ = (int(part) for part in image_config(container["image"])["User"].split(":"))
            assert pod["securityContext"]["runAsUser"] == uid
    (api,) = [app for app in serve_config["applications"] if app["route_prefix"] == "/"]
    _, options = split_args(api["args"])
    (worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    worker_cpus = cpus(worker["resources"]["limits"]["cpu"])
    assert worker_cpus >= options.num_cpus  # a replica fits on a worker
    max_cpus = worker_cpus * cluster["workerGroupSpecs"][0]["maxReplicas"]
    assert options.replicas * options.num_cpus <= max_cpus


def test_the_cuda_image_asks_the_nvidia_runtime_for_cuda() -> None:
    """Unset, NVIDIA_DRIVER_CAPABILITIES means utility only: no libcuda in the container, torch sees no GPU
    and `auto` serves on the CPU (review cuda-2026-12 A2). The CPU images leave the variables alone."""
    env = dict(item.split("=", 1) for item in image_config(f"emoserve:{VERSION}-cuda")["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    cpu_env = dict(item.split("=", 1) for item in image_config(f"emoserve:{VERSION}-cpu")["Env"])
    assert "NVIDIA_DRIVER_CAPABILITIES" not in cpu_env
