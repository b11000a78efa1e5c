"""The cluster launcher configs validate against the schema shipped in the installed `ray` package."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["launcher-local.yaml", "launcher-aws.yaml"])
def test_launcher_config_matches_rays_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, SCHEMA)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])  # loopback by default
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
               if " start " in c)
    image = config.get("docker", {}).get("image")
    if image:
        assert image.split(":")[1].startswith(ray.__version__ + "-")


def test_local_launcher_config_survives_rays_own_preparation():
    config = prepare_config(yaml.safe_load((CLUSTER / "launcher-local.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["worker_ips"] and config["head_node_type"] in config["available_node_types"]
