"""One bad request must never hurt another (issue 15): finite weight sums, strict types, the API key and
the body size checked before parsing, a batch where one sample's failure fails only its own request,
liveness that never waits behind generation, overload shed as 503 + Retry-After, a bounded retry of
replica deaths. In process (no Ray) except the two `ray` tests at the end, which run the real app."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import STYLE_NAMES, TINY_SIZE, TINY_STEPS, dying_style_model, serve_on_cluster, tiny_model_dir

from serve.config import ServeConfig
from serve.model import StyleModelBackend
from serve.router import LocalService, ModelInfo, SampleFailed, create_api
from serve.schemas import RequestError, Sample, StyleInfo

GOOD = {"prompt": "a red circle", "steps": TINY_STEPS, "width": TINY_SIZE, "height": TINY_SIZE, "seed": 1}


@pytest.fixture(scope="module")
def backend():
    return StyleModelBackend(str(tiny_model_dir()), device="cpu")


def make_client(service, **cfg) -> TestClient:
    config = ServeConfig(model=str(tiny_model_dir()), default_steps=TINY_STEPS, **cfg)
    return TestClient(create_api(service, config), raise_server_exceptions=False)


# ---- request validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"weights": [1e308, 1e308, 0]},
        {"weights": {"watercolor": 1e308, "neon": 1e308}},
        {"regions": [{"box": [0, 0, 1, 1], "weights": [1e308, 1e308, 0]}]},
        {"regions": [{"box": [0, 0, 1, 1], "style": 0}], "weights": [1.5e308, 1.5e308, 1e308]},
    ],
    ids=["list", "dict", "region", "background"],
)
def test_weights_whose_sum_overflows_are_422_not_a_batch_failure(backend, body):
    with make_client(LocalService(backend)) as c:
        r = c.post("/generate", json=GOOD | body)
        assert r.status_code == 422, r.text
        assert "sum" in r.json()["error"] and "inf" in r.json()["error"]


def test_tiny_weights_still_normalise(backend):
    with make_client(LocalService(backend)) as c:
        r = c.post("/generate", json=GOOD | {"weights": [1e-300, 3e-300, 0], "response_format": "json"})
        assert r.status_code == 200, r.text
        assert r.json()["mixture"] == {"watercolor": 0.25, "neon": 0.75}


@pytest.mark.parametrize(
    "body",
    [
        {"style": True},
        {"style": False},
        {"weights": [True, False, False]},
        {"weights": {"neon": True}},
        {"steps": True},
        {"seed": True},
        {"num_images": True},
        {"guidance": True},
        {"regions": [{"box": [0, 0, 1, 1], "style": True}]},
    ],
    ids=lambda b: str(b)[:40],
)
def test_booleans_are_rejected_not_coerced(backend, body):
    with make_client(LocalService(backend)) as c:
        r = c.post("/generate", json=GOOD | body)
        assert r.status_code == 422, r.text
        assert "True" in r.json()["error"] or "False" in r.json()["error"]


# ---- API key and body size, before the body is parsed -------------------------------------------


class NoCallService:
    """Fails the test if a rejected request reaches the model."""

    async def info(self, refresh=False):
        return ModelInfo([StyleInfo(index=i, name=n) for i, n in enumerate(STYLE_NAMES)], (TINY_SIZE, TINY_SIZE))

    async def generate(self, samples):
        raise AssertionError("a rejected request reached the model")


def test_api_key_is_checked_before_the_body_is_parsed():
    with make_client(NoCallService(), api_key="s3cret") as c:
        for raw in (b"{not json", b"x" * 200_000):  # broken JSON and an oversized body: the key decides first
            r = c.post("/generate", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 401, (raw[:10], r.status_code, r.text)
            r = c.post("/generate", content=raw, headers={"Content-Type": "application/json", "X-API-Key": "nope"})
            assert r.status_code == 403, r.text
        r = c.post("/generate", content=b"{not json", headers={"Content-Type": "application/json", "X-API-Key": "s3cret"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_body_over_the_limit_is_413_before_parsing():
    with make_client(NoCallService()) as c:
        big = b'{"prompt": "' + b"a" * 70_000 + b'"}'  # valid JSON, 64 KiB+ : 413, not a 422 about the prompt
        r = c.post("/generate", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "65536 bytes" in r.json()["error"], r.text

        def chunks():  # no Content-Length (chunked): counted while reading, stopped at the limit
            for _ in range(100):
                yield b"a" * 1024

        r = c.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.get("/healthz").status_code == 200
    with make_client(NoCallService(), max_body_bytes=2048) as c:
        r = c.post("/generate", json={"prompt": "a" * 3000})
        assert r.status_code == 413


def test_empty_api_key_is_a_config_error():
    from pydantic import ValidationError

    for key in ("", "   "):
        with pytest.raises(ValidationError, match="api_key is empty"):
            ServeConfig(api_key=key)
    with pytest.raises(ValueError, match="api_key: Value error, api_key is empty"):  # from_env: the config error, key first
        ServeConfig.from_env(environ={"DMM_API_KEY": ""})
    assert ServeConfig.from_env(environ={}).api_key is None
    for key in ("clé-s3cret", "tab\tkey"):  # a header carries ASCII: such a key could never match any request
        with pytest.raises(ValidationError, match="api_key must be printable ASCII"):
            ServeConfig(api_key=key)
    # HTTP strips the spaces around a header value: a key "s3cret " arrived as "s3cret", a 403 for every client
    for key in ("s3cret ", " s3cret"):
        with pytest.raises(ValidationError, match="api_key starts or ends with a space"):
            ServeConfig(api_key=key)
    assert ServeConfig(api_key="s3 cret").api_key == "s3 cret"  # inside the value a space travels


# ---- liveness, readiness, overload, retries: the router over a fake model handle ----------------


class Method:
    def __init__(self, fn):
        self.calls = 0
        self.fn = fn

    def remote(self, *args):
        self.calls += 1
        return self.fn(*args)


def fake_handle(generate, info=None):
    async def default_info():
        return {
            "styles": [{"name": n, "index": i, "description": ""} for i, n in enumerate(STYLE_NAMES)],
            "native_size": [TINY_SIZE, TINY_SIZE],
            "vae_scale_factor": 2,
        }

    return types.SimpleNamespace(info=Method(info or default_info), generate=Method(generate))


def test_healthz_answers_while_the_model_is_busy():
    """The model's every slot is taken by a generation that takes 30 s: /healthz still answers at once
    (it never calls the model), and /readyz says 503 within its timeout instead of hanging."""
    from serve.deployments import HandleService

    release = threading.Event()

    async def slow_generate(sample):
        while not release.is_set():
            await asyncio.sleep(0.05)
        return np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)

    busy = {"on": False}

    async def info():  # like a saturated replica: info queues behind generation
        if busy["on"]:
            while not release.is_set():
                await asyncio.sleep(0.05)
        return {
            "styles": [{"name": n, "index": i, "description": ""} for i, n in enumerate(STYLE_NAMES)],
            "native_size": [TINY_SIZE, TINY_SIZE],
            "vae_scale_factor": 2,
        }

    handle = fake_handle(slow_generate, info)
    with make_client(HandleService(handle), readyz_timeout_s=0.5) as c:
        assert c.get("/readyz").status_code == 200  # caches the style list
        busy["on"] = True
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/generate", json=GOOD)
            try:  # a failed check below must still release the generation, or the pool's exit waits forever
                deadline = time.time() + 30
                while handle.generate.calls == 0:
                    assert time.time() < deadline, "the /generate request never reached the model"
                    time.sleep(0.01)
                t0 = time.perf_counter()
                r = c.get("/healthz")
                assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
                t0 = time.perf_counter()
                r = c.get("/readyz")
                assert r.status_code == 503 and time.perf_counter() - t0 < 2.0
            finally:
                release.set()
            assert pending.result(timeout=30).status_code == 200


class _HeldCall:
    """Wraps a blocking function so a test holds it (as a slow import would block) until it releases it.
    `done` tells whether the call ended before the release: a route that waited for it instead of
    answering at once sees `done` set (after the 30 s stop-gap), so no wall-clock limit is needed."""

    def __init__(self, real):
        self.real, self.started, self.release, self.done = real, threading.Event(), threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        self.release.wait(30)  # blocking, as an import is
        self.done.set()
        return self.real(*args, **kwargs)

    def check_healthz_answers_meanwhile(self, client, send):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(send)
            assert self.started.wait(30), "the request never reached the held call"
            try:
                assert client.get("/healthz").status_code == 200
                assert not self.done.is_set(), "/healthz waited for the held call instead of answering at once"
            finally:
                self.release.set()
            return pending.result(timeout=60)


def test_healthz_answers_while_a_request_is_being_resolved(monkeypatch):
    """Resolving a request runs off the router's event loop: a router's first regions request imports
    dmm_ray.regions (torch, diffusers) inside it, seconds during which /healthz and every other request
    waited (6 s measured on a loaded machine). A held resolution stands in for that import."""
    import serve.router
    from serve.deployments import HandleService

    held = _HeldCall(serve.router.resolve_request)

    async def generate(sample):
        return np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)

    monkeypatch.setattr(serve.router, "resolve_request", held)
    with make_client(HandleService(fake_handle(generate))) as c:
        assert held.check_healthz_answers_meanwhile(c, lambda: c.post("/generate", json=GOOD)).status_code == 200


def test_healthz_answers_while_an_export_command_is_being_built(monkeypatch):
    """/export_command builds its command off the event loop: the router's first one (the playground
    sends it as it loads) imports dmm_ray.export (torch, diffusers), 14 s on a loaded machine during which
    /healthz waited. A held build stands in for that import."""
    import dmm_ray.export
    from serve.deployments import HandleService

    held = _HeldCall(dmm_ray.export.export_command)
    monkeypatch.setattr(dmm_ray.export, "export_command", held)
    body = {"weights": {STYLE_NAMES[0]: 1, STYLE_NAMES[1]: 1}}
    with make_client(HandleService(fake_handle(None))) as c:
        r = held.check_healthz_answers_meanwhile(c, lambda: c.post("/export_command", json=body))
        assert "jobs/export.py" in r.json()["command"]


def test_full_model_queue_is_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    from serve.deployments import HandleService

    async def full(sample):
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    with make_client(HandleService(fake_handle(full), retry_after_s=3)) as c:
        r = c.post("/generate", json=GOOD)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert "capacity" in r.json()["error"]


def stuck_status(reason, ttl_s=0.2):
    """A ModelStatus whose read of Serve's status says `reason` (None: replicas run); counts its reads."""
    from serve.deployments import ModelStatus

    class Stuck(ModelStatus):
        reads = 0

        def _read(self):
            Stuck.reads += 1
            return reason

    return Stuck("app", "StyleModel", ttl_s=ttl_s)


def test_a_model_that_cannot_start_a_replica_is_503_at_once_not_a_408():
    """No replica can start (its model folder deleted after a first start): a handle call waits for one
    forever, so /generate waited for the proxy's timeout (a 408) while /readyz said 503. The router reads
    the deployment's status while the call waits, and answers 503 + Retry-After within about a second."""
    from serve.deployments import HandleService

    cancelled = threading.Event()

    async def never(sample):  # a call no replica ever takes
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with make_client(HandleService(fake_handle(never), retry_after_s=3, status=stuck_status("failed to start 3 times in a row"))) as c:
        t0 = time.perf_counter()
        r = c.post("/generate", json=GOOD)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert time.perf_counter() - t0 < 5 and "cannot start a replica" in r.json()["error"]
        assert "3 times" not in r.json()["error"]  # Serve's message (paths, tracebacks) stays in the log
        assert cancelled.wait(5)  # the waiting handle call was cancelled, not left queued


def test_a_slow_generation_on_a_running_replica_is_never_cut_off_by_the_status_check():
    from serve.deployments import HandleService

    async def slow(sample):  # 2 s of generation: ten status periods
        await asyncio.sleep(2.0)
        return np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)

    status = stuck_status(None)
    with make_client(HandleService(fake_handle(slow), status=status)) as c:
        assert c.post("/generate", json=GOOD).status_code == 200
    assert 3 <= type(status).reads <= 12  # read while waiting, once per period (not once per request and loop turn)


def test_an_answer_never_waits_for_a_slow_status_read():
    """Finding: a call that waited past one status period awaited the read of Serve's status before it
    looked at its own answer again, and serve.status() waits on the Serve controller with no timeout (a
    busy or restarting one: seconds): an image made in 0.6 s went out only when a 3 s read ended. The
    read now races the call, and an answer goes out as it comes."""
    from serve.deployments import HandleService, ModelStatus

    class SlowStatus(ModelStatus):
        def _read(self):
            time.sleep(3.0)  # the controller slow to answer
            return None

    async def generate(sample):  # answered after 3 status periods, while the first read still runs
        await asyncio.sleep(0.6)
        return np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)

    with make_client(HandleService(fake_handle(generate), status=SlowStatus("app", "StyleModel", ttl_s=0.2))) as c:
        t0 = time.perf_counter()
        assert c.post("/generate", json=GOOD).status_code == 200
        took = time.perf_counter() - t0
    assert took < 2.5, took


@pytest.mark.parametrize(
    "status, trigger, replicas, stuck",
    [
        ("UNHEALTHY", "REPLICA_STARTUP_FAILED", {"STARTING": 1}, True),  # had run; its restarts fail
        ("DEPLOY_FAILED", "REPLICA_STARTUP_FAILED", {}, True),
        ("UNHEALTHY", "REPLICA_STARTUP_FAILED", {"RUNNING": 1, "STARTING": 1}, False),  # one replica still serves
        ("DEPLOY_FAILED", "REPLICA_STARTUP_FAILED", {"RUNNING": 2}, False),  # a failed rollout: the old replicas serve
        ("UNHEALTHY", "HEALTH_CHECK_FAILED", {"STARTING": 1}, False),  # a replica died and restarts: calls wait for it
        ("UPDATING", "CONFIG_UPDATE_STARTED", {"STARTING": 1}, False),  # a first start or a redeploy
    ],
)
def test_model_status_reads_serve_status(monkeypatch, status, trigger, replicas, stuck):
    from ray import serve
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState

    from serve.deployments import ModelStatus

    deployment = types.SimpleNamespace(
        status=DeploymentStatus(status),
        status_trigger=DeploymentStatusTrigger(trigger),
        replica_states={ReplicaState(k): v for k, v in replicas.items()},
        message="The deployment failed to start 3 times in a row.",
    )
    app = types.SimpleNamespace(deployments={"StyleModel": deployment})
    monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications={"app": app}))
    assert ModelStatus("app", "StyleModel")._read() == ("The deployment failed to start 3 times in a row." if stuck else None)
    assert ModelStatus("other-app", "StyleModel")._read() is None

    def down():
        raise ConnectionError("controller unreachable")

    monkeypatch.setattr(serve, "status", down)
    assert ModelStatus("app", "StyleModel")._read() is None  # no verdict: the call waits on


def test_a_full_model_queue_is_503_also_before_the_router_cached_the_style_list():
    """A router replica that has not read the model's info yet (a fresh or an added one) asks the model
    for it first: a full model queue there is the same 503 + Retry-After, not a 500 "internal error"."""
    from ray.serve.exceptions import BackPressureError

    from serve.deployments import HandleService

    async def full(*args):
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    with make_client(HandleService(fake_handle(full, info=full), retry_after_s=3)) as c:
        for r in (c.post("/generate", json=GOOD), c.get("/styles")):
            assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
            assert "capacity" in r.json()["error"]
        assert c.get("/readyz").status_code == 503


def test_a_replica_lost_during_the_first_info_call_is_retried_then_503_never_500():
    """A router replica reads the model's info (styles, sampler) on its first /generate or /styles; a model
    replica that dies during that call (Serve restarts it) was a 500 "internal error". The call is asked
    again (at most max_retries times), then it is a 503 + Retry-After; the router serves on afterwards."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from serve.deployments import HandleService

    async def image(sample):
        return np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)

    deaths = {"left": 1}

    async def dies_once():
        if deaths["left"]:
            deaths["left"] -= 1
            raise ActorDiedError()
        return {
            "styles": [{"name": n, "index": i, "description": ""} for i, n in enumerate(STYLE_NAMES)],
            "native_size": [TINY_SIZE, TINY_SIZE],
            "vae_scale_factor": 2,
        }

    handle = fake_handle(image, info=dies_once)
    with make_client(HandleService(handle)) as c:
        r = c.get("/styles")
        assert r.status_code == 200 and [s["name"] for s in r.json()["styles"]] == STYLE_NAMES, r.text
        assert handle.info.calls == 2 and c.post("/generate", json=GOOD).status_code == 200

    async def always_lost():
        raise ActorUnavailableError("replica unreachable", None)

    for retries in (0, 1):
        handle = fake_handle(image, info=always_lost)
        with make_client(HandleService(handle, retries=retries, retry_after_s=3)) as c:
            for r in (c.post("/generate", json=GOOD), c.get("/styles")):
                assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
                assert r.json() == {"error": "the model's replica was lost and is restarting; retry later"}
            assert handle.info.calls == 2 * (1 + retries) and handle.generate.calls == 0  # bounded, per request
            handle.info.fn = dies_once  # (its one death spent above) the replica is back: the same router serves
            assert c.post("/generate", json=GOOD).status_code == 200


def test_a_model_reloaded_with_other_styles_is_read_again_not_served_with_the_old_list():
    """The router caches the model's style list; the model folder is re-merged with the styles in another
    order and a replica restarts. style "neon" was resolved against the old list, so the replica made the
    image of the style now at neon's old index (silently another style). The replica refuses weights
    resolved against another style list; the router reads the list again and resolves the request once
    more. While replicas of both models serve (a rollout), the second mismatch is a 503 + Retry-After."""
    from serve.deployments import HandleService, check_sample

    model = {"styles": list(STYLE_NAMES)}  # what the replica loaded
    router_sees = model  # what info() answers (a replica of the same model)

    async def info():
        return {
            "styles": [{"name": n, "index": i, "description": ""} for i, n in enumerate(router_sees["styles"])],
            "native_size": [TINY_SIZE, TINY_SIZE],
            "vae_scale_factor": 2,
        }

    async def generate(sample):  # the image says which of the replica's styles it drew: 10 x its index
        check_sample(sample, model["styles"])
        return np.full((TINY_SIZE, TINY_SIZE, 3), 10 * int(np.argmax(sample.weights)), np.uint8)

    def drawn(response) -> str:
        import io

        from PIL import Image

        value = int(np.asarray(Image.open(io.BytesIO(response.content)))[0, 0, 0])
        return model["styles"][value // 10]

    handle = fake_handle(generate, info)
    with make_client(HandleService(handle, retry_after_s=3)) as c:
        r = c.post("/generate", json=GOOD | {"style": "neon"})
        assert r.status_code == 200 and drawn(r) == "neon"
        model["styles"] = ["neon", "watercolor", "sketch"]  # re-merged, replica restarted
        r = c.post("/generate", json=GOOD | {"style": "neon"})
        assert r.status_code == 200 and drawn(r) == "neon", drawn(r)
        assert handle.info.calls == 2 and [s["name"] for s in c.get("/styles").json()["styles"]] == model["styles"]
        router_sees = {"styles": model["styles"]}  # mid-rollout: info is answered by a replica of the other model
        model["styles"] = list(STYLE_NAMES)
        r = c.post("/generate", json=GOOD | {"style": "neon"})
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert "reloaded with other styles" in r.json()["error"]


def test_a_request_that_crashes_replicas_is_retried_at_most_max_retries_times():
    from ray.exceptions import ActorDiedError

    from serve.deployments import HandleService

    async def crash(sample):
        raise ActorDiedError()

    for retries in (0, 1):
        handle = fake_handle(crash)
        with make_client(HandleService(handle, retries=retries)) as c:
            r = c.post("/generate", json=GOOD)
        assert r.status_code == 500 and r.json() == {"error": "the model replica failed while generating this image"}
        assert handle.generate.calls == 1 + retries  # not 4 replicas taken down by one request


def test_replica_errors_map_to_the_right_status_without_internals():
    from serve.deployments import HandleService

    async def client_fault(sample):
        raise RequestError(422, "weights must be finite, >= 0 and sum to 1")

    async def server_fault(sample):
        raise SampleFailed("the model failed to generate this image")

    async def unexpected(sample):
        raise KeyError("/secret/path/unet.safetensors")

    with make_client(HandleService(fake_handle(client_fault))) as c:
        r = c.post("/generate", json=GOOD)
        assert r.status_code == 422 and "finite" in r.json()["error"]
    with make_client(HandleService(fake_handle(server_fault))) as c:
        r = c.post("/generate", json=GOOD)
        assert r.status_code == 500 and r.json() == {"error": "the model failed to generate this image"}
    with make_client(HandleService(fake_handle(unexpected))) as c:
        r = c.post("/generate", json=GOOD)
        assert r.status_code == 500 and "secret" not in r.text


# ---- the batch: one sample's failure is its own ------------------------------------------------


def sample(prompt, weights, seed) -> Sample:
    return Sample(prompt, None, tuple(weights), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, seed)


def test_a_poisoned_sample_fails_only_its_own_request_in_a_shared_batch(backend, monkeypatch):
    """StyleModel's @serve.batch method outside Serve: one batch holds two good samples, one whose
    weights overflow (client error: 422) and one that breaks the forward (server error: 500). The good
    two get the images they get alone; the bad two fail with their own error."""
    from ray import serve

    from serve.deployments import StyleModel

    # @serve.batch reads the replica's max_ongoing_requests (a warning check); outside Serve, give it one.
    context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=32))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    cls = StyleModel.func_or_class
    model = cls.__new__(cls)
    cls.__init__(model, str(backend.path), "cpu", 8, 0.5)
    real = model.backend.forward

    def forward(samples, stop=None):
        if any(s.prompt == "poison" for s in samples):
            raise RuntimeError("forward blew up")
        return real(samples, stop)

    monkeypatch.setattr(model.backend, "forward", forward)
    batch = [
        sample("a red circle", (1, 0, 0), 1),
        sample("overflow", (1e308, 1e308, 0), 2),
        sample("poison", (0, 1, 0), 3),
        sample("a blue square", (0, 0, 1), 4),
    ]

    async def run():
        return await asyncio.gather(*(model.generate(s) for s in batch), return_exceptions=True)

    try:
        out = asyncio.run(run())
    finally:  # the batch queue lives on the class (bound to this test's loop): drop it, keep the class picklable
        cls.generate_batch.set_max_batch_size.__self__._queue = None
    assert model.batch_sizes == {4: 1}  # one shared batch
    assert isinstance(out[0], np.ndarray) and isinstance(out[3], np.ndarray)
    assert np.abs(out[0].astype(int) - real([batch[0]])[0].astype(int)).max() <= 1
    assert np.abs(out[3].astype(int) - real([batch[3]])[0].astype(int)).max() <= 1
    assert isinstance(out[1], RequestError) and out[1].status == 422
    assert isinstance(out[2], SampleFailed) and "forward blew up" not in out[2].message
    assert model.sample_failures == {"client": 1, "server": 1}


# ---- config: Serve's own overload settings ------------------------------------------------------


def test_serve_config_sets_serve_overload_limits():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` validates
    assert config["http_options"]["request_timeout_s"] > 0
    args = config["applications"][0]["args"]
    cfg = ServeConfig.model_validate(args)
    assert cfg.max_body_bytes == 65536 and cfg.max_retries == 1
    max_model_replicas = config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"]
    # /healthz never queues behind generation: the router has room beyond every image it can hold
    assert cfg.router_max_ongoing_requests > cfg.max_ongoing_requests * max_model_replicas + cfg.max_queued_requests
    router = build_app(args | {"model": "/tmp/m"})._bound_deployment
    model = router.init_args[0]._bound_deployment
    assert (model.max_ongoing_requests, model.max_queued_requests) == (32, 64)
    assert (router.max_ongoing_requests, router.max_queued_requests) == (256, 128)
    for d in (router, model):
        assert d.backpressure_config.status_code == 503 and d.backpressure_config.retry_after_s == 2


def test_the_router_names_the_model_folder_the_model_replica_loads(tmp_path, monkeypatch):
    """A relative `model` was resolved in the builder for the model replica but again in the router replica (another
    working directory: another node, a cluster started elsewhere): /export_command named <repo root>/merged."""
    from pathlib import Path

    from serve.app import build_app

    (tmp_path / "merged").mkdir()
    monkeypatch.chdir(tmp_path)
    router = build_app({"model": "merged"})._bound_deployment
    model = router.init_args[0]._bound_deployment
    monkeypatch.chdir(Path(__file__).parent)  # the router replica's working directory
    assert ServeConfig.model_validate(router.init_args[1]).model_location() == model.init_args[0] == str(tmp_path / "merged")


# ---- on the shared Ray cluster: the real app --------------------------------------------------


@pytest.mark.slow  # ~70 s on 2 busy cores (the app's deploy dominates); in-process twin above
@pytest.mark.ray
def test_serve_batch_with_poisoned_samples_keeps_the_others(ray_cluster, backend):
    """Through Serve: valid requests, overflowing-weight requests and (straight to the model handle)
    samples that poison the batch, all at once. Valid ones: 200 and the image one-by-one gives;
    the overflow requests: 422; the poisoned samples: their own error, nobody else's."""
    import httpx
    from ray import serve

    name = "dmm-test-robust"
    good = [sample("a red circle", (1, 0, 0), 11), sample("a blue square", (0, 1, 0), 12), sample("a star", (0, 0, 1), 13)]
    with serve_on_cluster(name, batch_wait_timeout_s=0.5, max_batch_size=8) as url:
        model = serve.get_deployment_handle("StyleModel", app_name=name)
        # Straight to the model: weights that overflow, and a prompt that breaks the tokenizer.
        poisoned = [sample("overflow", (1e308, 1e308, 0), 1), Sample(None, None, (1, 0, 0), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, 2)]
        direct = [model.generate.remote(s) for s in poisoned + good]
        bodies = [
            {"prompt": s.prompt, "weights": list(s.weights), "seed": s.seed, "steps": TINY_STEPS, "width": TINY_SIZE, "height": TINY_SIZE}
            for s in good
        ]
        bodies += [dict(bodies[0], weights=[1e308, 1e308, 0])] * 2
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(url + "/generate", json=b, timeout=120), bodies))
        results = []
        for d in direct:
            try:
                results.append(d.result(timeout_s=120))
            except Exception as exc:  # noqa: BLE001 - the per-sample error is what is tested
                results.append(exc)
        info = model.info.remote().result()
    assert [r.status_code for r in responses] == [200, 200, 200, 422, 422], [r.text[:200] for r in responses]
    assert isinstance(results[0], RequestError) and results[0].status == 422, results[0]
    assert isinstance(results[1], SampleFailed), results[1]
    for s, img in zip(good, results[2:]):
        assert isinstance(img, np.ndarray), img
        assert np.abs(img.astype(int) - backend.generate([s])[0].astype(int)).max() <= 1
    assert max(int(k) for k in info["batch_sizes"]) >= 3, info  # the poisoned samples shared a batch with good ones
    assert info["sample_failures"] == {"client": 1, "server": 1}, info


@pytest.mark.ray  # ~25 s (the deploy and the replica's restart); in-process twin above
def test_serve_a_model_replica_dying_during_the_first_info_call_is_retried(ray_cluster, tmp_path):
    """Through Serve: the model replica's process exits while the router's first info call (here from
    /styles) runs on it. The router asks again, Serve routes that to the restarted replica: 200, not a 500."""
    import httpx
    from ray import serve

    name, marker = "dmm-test-info-death", tmp_path / "die-on-info"
    # /healthz, not /readyz: a readiness check would read (and cache) the model's info before the test does
    with serve_on_cluster(name, model_class=dying_style_model(marker), ready="/healthz") as url:
        model = serve.get_deployment_handle("StyleModel", app_name=name)
        first_pid = model.info.remote().result(timeout_s=60)["pid"]
        marker.touch()
        styles = httpx.get(url + "/styles", timeout=120)
        generated = httpx.post(url + "/generate", json=GOOD, timeout=120)
        second_pid = model.info.remote().result(timeout_s=60)["pid"]
    assert not marker.exists() and second_pid != first_pid  # the replica did die in the call, and was replaced
    assert styles.status_code == 200 and [s["name"] for s in styles.json()["styles"]] == STYLE_NAMES, styles.text
    assert generated.status_code == 200, generated.text


@pytest.mark.ray  # ~60 s (the deploy, then Serve's three failed starts); in-process twins above
def test_serve_model_that_cannot_start_a_replica_is_503_at_once(ray_cluster, tmp_path):
    """Through Serve: the model folder is deleted after a first start and the replica killed, so every
    restart fails. /generate answers 503 + Retry-After within seconds (it waited for the proxy's
    request timeout, a 408), read from Serve's own status of the model deployment."""
    import shutil

    import httpx
    import ray
    from ray import serve

    name, model = "dmm-test-no-replica", tmp_path / "merged"
    shutil.copytree(tiny_model_dir(), model)
    with serve_on_cluster(name, model=str(model)) as url:
        assert httpx.post(url + "/generate", json=GOOD, timeout=120).status_code == 200
        shutil.rmtree(model)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"SERVE_REPLICA::{name}#StyleModel#"):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        deadline = time.time() + 120
        while serve.status().applications[name].deployments["StyleModel"].status_trigger != "REPLICA_STARTUP_FAILED":
            assert time.time() < deadline, serve.status().applications[name].deployments["StyleModel"]
            time.sleep(1)
        t0 = time.perf_counter()
        r = httpx.post(url + "/generate", json=GOOD, timeout=60)
        waited = time.perf_counter() - t0
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and "cannot start a replica" in r.json()["error"], r.text
    assert waited < 10, waited


@pytest.mark.slow  # ~85 s on 2 busy cores; in-process twins: test_full_model_queue_is_503..., test_healthz_answers...
@pytest.mark.ray
def test_serve_overload_sheds_503_with_retry_after_and_healthz_stays_fast(ray_cluster):
    """A model that holds 2 images and queues 2 more, hit by 24 concurrent requests: the excess gets
    503 + Retry-After at once (never a 500, never an unbounded queue); /healthz answers meanwhile."""
    import httpx

    name = "dmm-test-overload"
    body = {"prompt": "a red circle", "steps": 20, "width": TINY_SIZE, "height": TINY_SIZE, "seed": 1}
    with serve_on_cluster(name, max_ongoing_requests=2, max_queued_requests=2, max_batch_size=1, retry_after_s=3) as url:
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(httpx.post, url + "/generate", json=body, timeout=120) for _ in range(24)]
            time.sleep(0.5)
            t0 = time.perf_counter()
            health = httpx.get(url + "/healthz", timeout=30)
            health_s = time.perf_counter() - t0
            responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 10 and statuses.count(200) >= 4, statuses
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "3" for r in shed), [dict(r.headers) for r in shed[:2]]
    assert health.status_code == 200 and health_s < 5, health_s
