"""Helpers shared by tests/test_serve*.py: a tiny merged model on disk, free ports, a Serve app on the test cluster."""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STYLE_NAMES = ["watercolor", "neon", "sketch"]
STYLE_DESCRIPTIONS = {"watercolor": "soft washes", "neon": "glowing edges", "sketch": "pencil lines"}
# Small enough that one request costs a few ms on CPU; 32 px is a multiple of 8 and within limits.
TINY_STEPS = 2
TINY_SIZE = 32

_TINY_DIR: Path | None = None


def tiny_model_dir() -> Path:
    """A merged-model folder built once per process from the foundation's tiny components; removed
    when the process exits (each test process built one, 6 MB, and left it in the temp folder)."""
    global _TINY_DIR
    if _TINY_DIR is None or not (_TINY_DIR / "model_index.json").is_file():
        from dmm_ray.models.style_unet import StyleUNet
        from dmm_ray.pipeline import DMMPipeline
        from dmm_ray.tiny import tiny_sd_components

        c = tiny_sd_components(seed=0)
        student = StyleUNet.from_unet(c["unet"], STYLE_NAMES)
        pipe = DMMPipeline.from_components(
            student=student, vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], scheduler=c["scheduler"]
        )
        root = tempfile.mkdtemp(prefix="dmm-serve-tiny-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        out = Path(root) / "merged"
        pipe.save_pretrained(str(out))
        (out / "styles.json").write_text(json.dumps([{"name": n, "description": STYLE_DESCRIPTIONS[n]} for n in STYLE_NAMES]))
        _TINY_DIR = out
    return _TINY_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a loopback port can be bound now (Serve's default 8000 may be taken by another Serve)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> None:
    import httpx

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == status:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not answering {status} after {timeout}s (last: {last})")


def serve_http_port() -> int:
    """Port of the Serve HTTP proxy on the current cluster, starting Serve on a free loopback port if needed."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    return int(client.http_config.port)


@contextmanager
def serve_on_cluster(name: str = "dmm-test", model_class=None, ready: str = "/readyz", **overrides):
    """Run the real app (router -> batched model) on the session Ray cluster under /<name>; delete it after.

    Yields the app's base URL (loopback) once `ready` answers 200. A route prefix per app keeps tests
    from colliding with other apps on the shared cluster. `model_class`: a StyleModel subclass run by
    the model deployment instead (its options and arguments unchanged), e.g. `dying_style_model(...)`.
    """
    from ray import serve

    from serve.app import build_app

    port = serve_http_port()
    args = dict(model=str(tiny_model_dir()), num_cpus=0.5, default_steps=TINY_STEPS) | overrides
    app = build_app(args)
    if model_class is not None:
        router = app._bound_deployment
        model = router.init_args[0]._bound_deployment
        app = router.bind(model.options(func_or_class=model_class).bind(*model.init_args), *router.init_args[1:])
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}/{name}"
    try:
        wait_http(url + ready, timeout=90)
        yield url
    finally:
        serve.delete(name)


def dying_style_model(marker: Path):
    """A StyleModel class whose replica process exits in the middle of an `info()` call while `marker`
    exists (removed first, so the restarted replica lives): a replica lost mid-call, as on an OOM kill.
    Built in a function so Ray pickles the class by value (replicas do not import the tests)."""
    import os

    from serve.deployments import StyleModel

    class DyingStyleModel(StyleModel.func_or_class):
        def info(self) -> dict:
            if marker.exists():
                marker.unlink()
                os._exit(1)
            return super().info()

    return DyingStyleModel


@contextmanager
def style_model_outside_serve(monkeypatch, *args, **kwargs):
    """The StyleModel deployment class (its @serve.batch method included) built in this process, without
    Ray Serve: `asyncio.run(model.generate(sample))` calls join one shared batch as on a replica."""
    import types

    from ray import serve

    from serve.deployments import StyleModel

    # @serve.batch reads the replica's max_ongoing_requests (a warning check); outside Serve, give it one.
    context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=32))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    cls = StyleModel.func_or_class
    model = cls.__new__(cls)
    cls.__init__(model, *args, **kwargs)
    try:
        yield model
    finally:  # the batch queue lives on the class (bound to the test's loop): drop it, keep the class picklable
        cls.generate_batch.set_max_batch_size.__self__._queue = None
