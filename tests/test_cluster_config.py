"""cluster.yaml must be a valid Ray cluster-launcher config (Ray's own schema and checks)."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before launching anything
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] * workers["min_workers"] == 16  # the paper's 16 GPUs


def test_schema_rejects_a_typo():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(config))


def test_dashboard_binds_to_the_heads_loopback_only():
    """The dashboard's job-submission API runs arbitrary code: on the head it listens on 127.0.0.1
    (reached through `ray dashboard cluster.yaml` / an SSH tunnel), never on every interface."""
    config = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, head
    commands = " ".join(str(c) for key in config if key.endswith("commands") for c in config[key])
    assert "0.0.0.0" not in commands
    text = CLUSTER.read_text()
    assert "ray dashboard cluster.yaml" in text and "http://127.0.0.1:8265" in text
    readme = (CLUSTER.parent / "README.md").read_text()
    assert "ray dashboard cluster.yaml" in readme
