"""Shared fixtures: tiny seeded components, one local Ray cluster for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test cluster listens on loopback only. Ray's token auth keeps one token file per user, which
# concurrently started clusters overwrite; tests opt out rather than flake on a stale token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Test-only helpers live in tests/ (eval_helpers, merge_fixtures, ...); Ray workers of the shared cluster
# and of the jobs tests start import them too, so tests/ goes on PYTHONPATH before anything starts.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join([_TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _TESTS])
# Default locations (zoo presets, outputs, MLflow store, FID cache; dmm_ray/paths.py) go to a private
# folder, never the user's ~/.dmm-ray. Set before the shared cluster starts, so its workers see it too.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["DMM_HOME"] = tempfile.mkdtemp(prefix="dmm-home-tests-")
atexit.register(shutil.rmtree, os.environ["DMM_HOME"], True)

import pytest  # noqa: E402  (after DMM_HOME is set)
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more in sync than they win (and CI has 2 cores)


class _Cluster:
    """The `ray` module plus the test cluster's addresses (`address`, `dashboard_url`)."""

    def __init__(self, address: str, dashboard_url: str):
        self.address, self.dashboard_url = address, dashboard_url

    def __getattr__(self, name):
        import ray

        return getattr(ray, name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray head (with the job server, for `ray job submit` tests) shared by every test marked
    `ray`. Started with `ray start --block` in its own process group so teardown stops only this cluster."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray

    port, dashboard_port = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
            # own ports for every agent: another Ray on the machine must not make the job agent fail to bind
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                head.kill()
                raise
            time.sleep(2)
    os.environ["RAY_ADDRESS"] = address  # jobs started by tests join this cluster instead of starting one
    from dmm_ray.ray_session import NO_PREEMPTION_WATCHER  # as on a private local Ray

    for key, value in NO_PREEMPTION_WATCHER.items():
        os.environ.setdefault(key, value)
    try:
        yield _Cluster(address, f"127.0.0.1:{dashboard_port}")
    finally:
        import signal

        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        # the whole process group at once (head, raylet, GCS, workers): `ray start --block`'s own
        # graceful stop takes ~30 s, and nothing of a test cluster needs to outlive the session
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:  # the group is gone
                break
            try:
                head.wait(grace)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def tiny_components():
    from dmm_ray.tiny import tiny_sd_components

    return tiny_sd_components(seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny SD base pipeline saved as a diffusers folder (session-scoped, built once)."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.tiny import tiny_sd_components

    path = tmp_path_factory.mktemp("base") / "base"
    StableDiffusionPipeline(**tiny_sd_components(seed=0)).save_pretrained(path)
    return path
