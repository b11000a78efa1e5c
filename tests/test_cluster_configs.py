"""The cluster launcher configs validate against the schema shipped in the installed `ray` package; the images and
manifests name the lock's Ray, and the environment is the lock."""

import importlib.metadata
import json
import sysconfig
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
LOCK = {canonicalize_name(name): version for name, version in (
    line.split("==") for line in (CLUSTER.parent / "constraints.txt").read_text().splitlines() if "==" in line)}
RAY = LOCK["ray"]
"""The Ray version of the lock, which every image and manifest of cluster/ must name."""


def test_the_environment_is_the_lock():
    # the venv's own packages (Ray puts copies it vendors on sys.path too)
    site = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    assert {"ray", "torch", "mlflow", "transformers", "pytest-xdist", "stable-baselines3", "ale-py"} <= set(LOCK)
    drifted = {name: (version, LOCK[name]) for name, version in installed.items()
               if name in LOCK and version.split("+")[0] != LOCK[name]}
    assert drifted == {}, f"installed versions differ from constraints.txt (run make install, or make lock): {drifted}"
    assert set(installed) - set(LOCK) <= {"mlplatform"}, "a package installed without a pin in constraints.txt"


@pytest.mark.parametrize("name", ["launcher-local.yaml", "launcher-aws.yaml"])
def test_launcher_config_matches_rays_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, SCHEMA)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])  # loopback by default
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
               if " start " in c)
    image = config.get("docker", {}).get("image")
    if image:
        assert image.split(":")[1].startswith(RAY + "-")


def test_local_launcher_config_survives_rays_own_preparation():
    config = prepare_config(yaml.safe_load((CLUSTER / "launcher-local.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["worker_ips"] and config["head_node_type"] in config["available_node_types"]


REPO = CLUSTER.parent
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def images(node) -> list[str]:
    """Every container image named anywhere in a manifest."""
    if isinstance(node, dict):
        own = [node["image"]] if isinstance(node.get("image"), str) else []
        return own + [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_the_image_is_built_on_the_locked_ray():
    base = next(line.split()[1] for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{RAY}-")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_parses_and_points_at_what_exists(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in {"RayCluster", "RayJob", "RayService"}
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    assert cluster["rayVersion"] == RAY
    named = images(manifest)
    assert named and all(i in (f"mlplatform:ray{RAY}", f"mlplatform:ray{RAY}-gpu") for i in named)
    text = path.read_text()
    assert "RAY_AUTH_MODE" in text and "secretKeyRef" in text  # token auth on, the token itself kept in a Secret
    if manifest["kind"] == "RayJob":
        _, script, flag, config = spec["entrypoint"].split()
        assert flag == "--config" and (REPO / script).is_file() and (REPO / config).is_file()


def containers(node) -> list[dict]:
    """Every container spec anywhere in a manifest (head, workers, submitter)."""
    if isinstance(node, dict):
        own = [node] if "image" in node and "name" in node else []
        return own + [c for v in node.values() for c in containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in containers(v)]
    return []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_reaches_the_same_stores_and_nothing_points_at_a_local_disk(path):
    manifest = yaml.safe_load(path.read_text())
    for container in containers(manifest):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["key"] == "mlflow_tracking_uri", container["name"]
        assert env["MLPLATFORM_STORAGE"]["valueFrom"]["configMapKeyRef"]["key"] == "storage", container["name"]
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True  # a pod identity needs none
    if manifest["kind"] == "RayJob":  # its folders are relative, so they land under MLPLATFORM_STORAGE, not in a pod
        config = yaml.safe_load((REPO / manifest["spec"]["entrypoint"].split()[3]).read_text())
        assert all(not str(value).startswith(("/", "~")) for key, value in config.items() if key.endswith("_dir"))


def test_one_rayjob_per_workload():
    entrypoints = {yaml.safe_load(p.read_text())["spec"]["entrypoint"].split()[1] for p in MANIFESTS if p.name.startswith("rayjob-")}
    assert entrypoints == {f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py")}


@pytest.mark.parametrize("source", ["serve/config.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_configs_are_what_serve_deploy_accepts(source):
    from ray.serve.schema import ServeDeploySchema

    loaded = yaml.safe_load((REPO / source).read_text())
    config = yaml.safe_load(loaded["spec"]["serveConfigV2"]) if loaded.get("kind") == "RayService" else loaded
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "mlplatform.serving.app:build_app"
    assert {d["name"] for d in config["applications"][0]["deployments"]} <= {"Ingress", "Emotion-emotion", "Policy-cartpole"}
