"""Joining or starting Ray the same way in every entry point.

`address` (a config key or `--address`), else `$RAY_ADDRESS` (set by `ray job submit`, or
`RAY_ADDRESS=auto` to join a `ray start --head` on this machine), else a *private* local Ray.
Never the bare `ray.init()`: it would join whatever `/tmp/ray/ray_current_cluster` names, and a
stale file left by a stopped cluster makes it wait for that cluster's GCS forever.
"""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Initialise Ray unless it already is; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # Logical headroom over the cores: Train workers, Ray Data tasks and actors share them.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=log_to_driver)
    return True
