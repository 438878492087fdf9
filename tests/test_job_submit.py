"""The first command the project promises (issue 13), as a user types it on this machine:

    RAY_AUTH_MODE=token ray start --head --num-cpus 2
    ray job submit --working-dir . -- python jobs/merge.py [--set ...]     # from a fresh clone
    serve run serve.app                                                   # from the clone, no DMM_MODEL

A real head in its own --temp-dir and process group (own ports, Ray 2.60 token auth with a
private token), `DMM_HOME` pointed at a temporary folder for the head, the client and Serve. The
head is stopped (its process group) even when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from serve_helpers import free_port, port_free, wait_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MICRO_STYLES = ["warm", "noir", "sketch"]  # dmm_ray.zoo.config PRESETS["micro"]
# A few steps of everything on the micro zoo (3 teachers -> 3 workers); the rest is the embedded default.
# one teacher per worker (the GPU layout; the toy preset packs them): 3 workers share the head's CPUs
SMALL = [
    "zoo=micro",
    "scaling.teachers_per_worker=1",
    "distill.steps=2",
    "distill.log_every=1",
    "data.stream.batch_size=4",
    "synthesis.images_per_teacher=4",
    "synthesis.finetune_steps=2",
    "synthesis.finetune_batch_size=2",
    "evaluation.num_prompts=4",
    "evaluation.images_per_prompt=4",
]


def _user_env(**extra) -> dict:
    """The user's shell: the venv first on PATH, none of the test session's Ray/DMM settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DMM_")) and k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(proc.pid):
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("job_submit")
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    home = root / "dmm-home"
    token = secrets.token_hex(32)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp_dir = tempfile.mkdtemp(prefix="dmmjs", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dashboard = free_port(), free_port()
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--temp-dir",
            temp_dir,
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            # own ports for every agent: another Ray on the machine must not make ours fail to bind
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=_user_env(DMM_HOME=str(home), **auth),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
    )
    client = _user_env(DMM_HOME=str(home), RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}", **auth)
    try:
        deadline = time.time() + 180
        while subprocess.run([str(BIN / "ray"), "job", "list"], env=client, capture_output=True, timeout=60).returncode != 0:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the head never answered `ray job list`:\n" + (root / "head.log").read_text()[-3000:])
            time.sleep(3)
        yield SimpleNamespace(clone=clone, home=home, client=client, auth=auth, root=root)
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head, *overrides: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python jobs/merge.py --set ...` from the clone."""
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/merge.py"]
    for override in overrides:
        command += ["--set", override]
    for _ in range(30):  # the head's job agent registers a little after the head answers
        proc = subprocess.run(command, cwd=head.clone, env=head.client, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_job_submit_merges_into_dmm_home_and_serve_finds_the_model(head):
    t0 = time.time()
    proc = submit(head, *SMALL)
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "succeeded" in out and took < 1500
    home, merged = head.home, head.home / "outputs" / "dmm-toy" / "merged"
    # the embedded default ran (no --config), the zoo was built on first use into $DMM_HOME
    assert "(the embedded default" in out and f"building the toy zoo preset 'micro' in {home / 'zoo' / 'micro'}" in out
    assert (home / "zoo" / "micro" / "zoo.yaml").is_file()
    # the plan left Ray Data a CPU on the 2-CPU head: 3 workers share the other one
    assert "resources: 3 Train workers x 0.333 CPU = 0.999 CPUs; 1 CPUs left for Ray Data" in out
    # locations printed at the start and at the end, all under DMM_HOME, none in Ray's temporary copy
    for title in ("locations:", "results:"):
        assert title in out
    assert f"merged model:  {merged}" in out and f"MLflow store:  sqlite:///{home}/mlflow.db" in out
    assert "WARNING:" not in out.split("results:")[-1]
    # the merged model, its latents and evaluation are in the stable location
    import json

    assert json.loads((merged / "unet" / "config.json").read_text())["style_names"] == MICRO_STYLES
    assert list((home / "outputs" / "dmm-toy" / "latents").glob("*.parquet"))
    assert (home / "outputs" / "dmm-toy" / "evaluation" / "fid_matrix.json").is_file()
    # the MLflow run: parent project run + finished stage run with per-step losses; the registered model
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{home}/mlflow.db"
    # the registry named too: a tracker that ran earlier in this process (another test's) left MLflow's
    # process-wide registry URI (and $MLFLOW_REGISTRY_URI) at its own store, which a client would read
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name("dmm-ray")
    runs = client.search_runs([experiment.experiment_id])
    stage = [r for r in runs if r.data.tags.get("dmm.stage") == "merge"]
    assert len(stage) == 1 and stage[0].info.status == "FINISHED" and stage[0].data.tags["dmm.project"] == "dmm-toy"
    assert "FIDt" in stage[0].data.metrics
    assert sorted({m.step for m in client.get_metric_history(stage[0].info.run_id, "distill/loss_score")} - {0}) == [1, 2]
    assert [v.version for v in client.search_model_versions("name='dmm-toy'")] in (["1"], [1])
    assert (home / "mlartifacts").is_dir()
    # nothing landed in the clone the job was submitted from
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=head.clone, capture_output=True, text=True).stdout
    assert status == "", status
    _serve_finds(head, merged)


def _serve_finds(head, merged: Path) -> None:
    """`serve run serve.app` from the clone, no DMM_MODEL: Serve's default is the job's merged model."""
    from serve.config import ServeConfig

    os.environ["DMM_HOME"], saved = str(head.home), os.environ["DMM_HOME"]
    try:
        assert ServeConfig.from_env(environ={}).model_location() == str(merged)
    finally:
        os.environ["DMM_HOME"] = saved
    port = 8000 if port_free(8000) else free_port()
    target = "serve.app"
    if port != 8000:  # the same import path through a Serve config, on a free port
        import yaml

        config = yaml.safe_load((head.clone / "serve" / "config.yaml").read_text())
        config["http_options"]["port"] = port
        config["applications"] = [{"name": "default", "route_prefix": "/", "import_path": "serve.app"}]
        target = str(head.root / "serve.yaml")
        Path(target).write_text(yaml.safe_dump(config))
    ray_tmp = tempfile.mkdtemp(prefix="dmmjsv", dir="/tmp")  # serve run starts its own local Ray here
    env = _user_env(DMM_HOME=str(head.home), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(head.clone), **head.auth)
    log = open(head.root / "serve.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", target], cwd=head.clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/healthz", timeout=240)
        except TimeoutError:
            raise AssertionError("serve run never became healthy:\n" + (head.root / "serve.log").read_text()[-4000:])
        import httpx

        styles = httpx.get(url + "/styles", timeout=30).json()["styles"]
        assert [s["name"] for s in styles] == MICRO_STYLES
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its local Ray down on Ctrl-C
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        _stop_group(proc, grace=5)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_impossible_layout_is_refused_at_once_naming_the_numbers(head):
    """3 workers x 0.5 CPU + 1 CPU for Ray Data do not fit 2 CPUs: the job stops before Ray Train starts."""
    t0 = time.time()
    # its own name, so its own output_dir: the merge above left its state in the default one, and a re-run
    # with other settings is refused for that (before the resource check) whatever the layout
    proc = submit(head, "zoo=micro", "name=dmm-impossible", "scaling.teachers_per_worker=1", "scaling.cpus_per_worker=0.5", timeout=600)
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in out, out[-4000:]
    assert "error: the cluster cannot hold this merge" in out
    assert "CPUs: needed 2.5 = 3 workers x scaling.cpus_per_worker=0.5 + scaling.data_cpus=1 (Ray Data's shard reads), available 2" in out
    for knob in ("scaling.workers_per_teacher", "scaling.teachers_per_worker", "scaling.cpus_per_worker", "--set scaling.num_workers"):
        assert knob in out
    assert "stage distill" not in out and "TrainController" not in out
    assert took < 300, f"the refusal took {took:.0f} s"
