"""Serve entry points.

    serve run serve.app                      # model from $DMM_MODEL, default $DMM_HOME/outputs/dmm-toy/merged
    serve run serve:build_app model=/path    # builder with key=value overrides of ServeConfig
    serve run serve/config.yaml              # replicas / autoscaling / resources from a Serve config

Importing this module only binds the deployments; models load inside the replicas.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from dmm_ray.ray_session import avoid_stale_cluster
from serve.config import ServeConfig
from serve.deployments import build_deployments


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Serve application builder: ServeConfig from env + `args` (Serve config `args:` or CLI key=value)."""
    avoid_stale_cluster()  # `serve run` starts Ray after this; a stale `ray start` address would make it wait forever
    return build_deployments(ServeConfig.from_env(overrides=dict(args or {})))


app = build_app({})
