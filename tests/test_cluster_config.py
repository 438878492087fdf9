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
