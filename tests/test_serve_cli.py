"""`serve run serve.app` and `serve run serve/config.yaml` from a fresh shell (empty environment)
answer /healthz and /generate on loopback."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from serve_helpers import TINY_SIZE, free_port, port_free, tiny_model_dir, wait_http

REPO = Path(__file__).resolve().parents[1]


def serve_target(kind: str, tmp_path: Path) -> tuple[int, str]:
    """(port, argument of `serve run`). Port 8000 is Serve's default; when another process
    holds it, the same import path / config runs through a Serve config on a free port."""
    if kind == "import_path" and port_free(8000):
        return 8000, "serve.app"
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = 8000 if port_free(8000) else free_port()
    if kind == "import_path":
        config["applications"] = [{"name": "default", "route_prefix": "/", "import_path": "serve.app"}]
    elif port == 8000:
        return 8000, "serve/config.yaml"
    config["http_options"]["port"] = port
    target = tmp_path / "serve.yaml"
    target.write_text(yaml.safe_dump(config))
    return port, str(target)


@pytest.mark.parametrize("kind", ["import_path", pytest.param("config_file", marks=pytest.mark.slow)])
def test_serve_run_from_fresh_shell(tmp_path, kind):
    port, target = serve_target(kind, tmp_path)
    serve_cli = Path(sys.executable).parent / "serve"
    # A private Ray temp dir (short: Ray's socket paths must stay < 108 chars): `serve run` then
    # starts its own local cluster instead of joining one that `ray start` left on this machine.
    ray_tmp = tempfile.mkdtemp(prefix="dmmsr", dir="/tmp")
    # ... where a cluster stopped without `ray stop` left its address file: Ray's bare init() would
    # wait for that GCS forever; the app starts a local Ray instead and says so. (An import path
    # only: with a config file, `serve run` starts Ray before it imports the app.)
    stale = kind == "import_path" and not target.endswith(".yaml")
    if stale:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env = {  # a fresh shell: nothing inherited but the basics
        "PATH": f"{serve_cli.parent}:/usr/bin:/bin",
        "RAY_TMPDIR": ray_tmp,
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(REPO),
        "DMM_MODEL": str(tiny_model_dir()),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        ["bash", "-c", f"cd {REPO} && exec serve run {target}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/healthz", timeout=150)
        except TimeoutError:
            raise AssertionError("serve run never became healthy:\n" + (tmp_path / "serve.log").read_text()[-4000:])
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        assert not stale or "where no Ray cluster answers" in (tmp_path / "serve.log").read_text()
        r = httpx.post(
            url + "/generate",
            json={"prompt": "a red circle", "style": "neon", "steps": 2, "width": TINY_SIZE, "height": TINY_SIZE, "seed": 1},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert np.asarray(Image.open(io.BytesIO(r.content))).shape[:2] == (TINY_SIZE, TINY_SIZE)
        r = httpx.post(url + "/generate", json={"prompt": "a red circle", "style": "oil"}, timeout=30)
        assert r.status_code == 422 and "neon" in r.json()["error"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its local Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
