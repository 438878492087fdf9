"""One forward serves a batch that mixes styles, and gives the images one-by-one generation gives."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serve_helpers import STYLE_NAMES, TINY_SIZE, TINY_STEPS, serve_on_cluster, style_model_outside_serve, tiny_model_dir

from serve.model import StyleModelBackend
from serve.schemas import Sample

# uint8 images: batched vs single convolutions may differ in the last float bit, which can
# flip a rounding; anything beyond one level would be a real difference.
MAX_LEVEL_DIFF = 1


def sample(prompt, weights, seed, negative=None) -> Sample:
    return Sample(prompt, negative, tuple(weights), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, seed)


MIXED = [
    sample("a red circle", (1, 0, 0), 11),
    sample("a blue square", (0, 1, 0), 12),
    sample("a green triangle", (0, 0, 1), 13, negative="lowres"),
    sample("a red circle", (0.5, 0.25, 0.25), 14),
    sample("a red circle", (0, 1, 0), 11),  # same prompt + seed as [0], other style
]


@pytest.fixture(scope="module")
def backend():
    return StyleModelBackend(str(tiny_model_dir()), device="cpu")


def test_mixed_style_batch_equals_one_by_one(backend):
    batched = backend.generate(MIXED)
    for s, img in zip(MIXED, batched):
        alone = backend.generate([s])[0]
        assert img.shape == (TINY_SIZE, TINY_SIZE, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - alone.astype(int)).max() <= MAX_LEVEL_DIFF
    # The style really is per sample: same prompt and seed, other style -> other image.
    assert np.abs(batched[0].astype(int) - batched[4].astype(int)).mean() > 0.5


def test_groups_by_steps_and_size_keep_order(backend):
    other = Sample("a red circle", None, (1, 0, 0), 1, 7.0, 16, 16, 11)
    out = backend.generate([MIXED[0], other, MIXED[1]])
    assert [o.shape for o in out] == [(32, 32, 3), (16, 16, 3), (32, 32, 3)]
    assert np.abs(out[2].astype(int) - backend.generate([MIXED[1]])[0].astype(int)).max() <= MAX_LEVEL_DIFF


def test_forward_takes_one_group_only(backend):
    """`forward` is one pipeline call: samples of two groups (here two step counts) are refused, not run
    with the first sample's steps; `generate` splits them."""
    other = Sample("a red circle", None, (1, 0, 0), 1, 7.0, TINY_SIZE, TINY_SIZE, 11)
    with pytest.raises(ValueError, match="one group.*got 2 groups"):
        backend.forward([MIXED[0], other])
    assert len(backend.forward(MIXED[:2])) == 2


def test_the_replica_runs_each_group_of_a_batch_as_one_backend_forward(monkeypatch):
    """The replica groups a batch (a stop per group) and hands each group to the backend's `forward`
    (one pipeline call) as is: the backend does not group it again."""
    import asyncio

    with style_model_outside_serve(monkeypatch, str(tiny_model_dir()), "cpu", 8, 0.5) as model:
        calls = []
        real = model.backend.forward

        def forward(samples, stop=None):
            calls.append(sorted(s.seed for s in samples))
            return real(samples, stop)

        monkeypatch.setattr(model.backend, "forward", forward)
        monkeypatch.setattr(model.backend, "generate", lambda *a, **k: pytest.fail("the replica grouped the batch twice"))
        batch = MIXED[:2] + [Sample("a red circle", None, (1, 0, 0), 1, 7.0, TINY_SIZE, TINY_SIZE, 21)]

        async def run():
            return await asyncio.gather(*(model.generate(s) for s in batch))

        out = asyncio.run(run())
    assert model.batch_sizes == {3: 1} and sorted(calls) == [[11, 12], [21]], calls
    assert all(o.shape == (TINY_SIZE, TINY_SIZE, 3) for o in out)


def test_a_cancelled_forward_keeps_the_422_of_a_sample_refused_before_it(monkeypatch):
    """A batch whose forward stopped (every request in it cancelled) answers "cancelled" to the samples
    that were in the forward only: a sample the replica refused before it (its request still waits) keeps
    its 422 (it got GenerationCancelled, a 500 "internal error" through the router)."""
    import asyncio

    from serve.model import GenerationCancelled
    from serve.schemas import RequestError

    with style_model_outside_serve(monkeypatch, str(tiny_model_dir()), "cpu", 8, 0.5) as model:

        def stopped(samples, stop=None):  # the forward of a batch whose every request was cancelled
            raise GenerationCancelled("every request of this batch was cancelled")

        monkeypatch.setattr(model.backend, "forward", stopped)
        batch = [sample("a red circle", (1, 0, 0), 1), sample("overflow", (1e308, 1e308, 0), 2)]

        async def run():
            return await asyncio.gather(*(model.generate(s) for s in batch), return_exceptions=True)

        out = asyncio.run(run())
    assert model.batch_sizes == {2: 1} and model.cancelled_forwards == 1
    assert isinstance(out[0], GenerationCancelled)
    assert isinstance(out[1], RequestError) and out[1].status == 422, out[1]


def test_a_cancelled_request_stops_its_own_forward_while_the_batch_has_others(monkeypatch):
    """A batch holds a long request (50 steps) and a short one (2 steps): two forwards. The long request is
    cancelled (its client left): its forward stops at its next step and the short one gets its image at
    once. (One stop for the whole batch waited for every request of the batch, so the cancelled forward
    ran all its steps and the short request waited behind it.)"""
    import asyncio
    import dataclasses
    import time

    from serve.model import GenerationCancelled

    with style_model_outside_serve(monkeypatch, str(tiny_model_dir()), "cpu", 8, 0.5) as model:
        forwards = []

        def generate(samples, stop=None):  # a forward of `steps` denoising steps, 0.1 s each, asking `stop` after each
            steps = max(s.steps for s in samples)
            for step in range(steps):
                if stop is not None and stop():
                    forwards.append((steps, step))
                    raise GenerationCancelled("every request of this batch was cancelled")
                time.sleep(0.1 if steps > TINY_STEPS else 0)
            forwards.append((steps, steps))
            return [np.zeros((s.height, s.width, 3), np.uint8) for s in samples]

        monkeypatch.setattr(model.backend, "forward", generate)
        long, short = dataclasses.replace(sample("a red circle", (1, 0, 0), 1), steps=50), sample("a blue square", (0, 1, 0), 2)

        async def run():
            a, b = asyncio.ensure_future(model.generate(long)), asyncio.ensure_future(model.generate(short))
            while not model.batch_sizes:  # both in one batch, its first forward running
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            a.cancel()
            t0 = time.perf_counter()
            image = await b
            return image, time.perf_counter() - t0

        image, waited = asyncio.run(run())
    assert model.batch_sizes == {2: 1} and model.cancelled_forwards == 1, (model.batch_sizes, model.cancelled_forwards)
    assert image.shape == (TINY_SIZE, TINY_SIZE, 3) and waited < 2.0, waited  # not the long forward's 5 s
    assert forwards[0][0] == 50 and forwards[0][1] < 20, forwards  # the cancelled forward stopped early


@pytest.mark.ray
def test_serve_batches_concurrent_requests_across_styles(ray_cluster, backend):
    import httpx
    from ray import serve

    bodies = [
        {
            "prompt": s.prompt,
            "weights": list(s.weights),
            "seed": s.seed,
            "negative_prompt": s.negative_prompt,
            "steps": TINY_STEPS,
            "width": TINY_SIZE,
            "height": TINY_SIZE,
        }
        for s in MIXED
    ]
    # One regional-style request among them: its Sample (with regions) travels through Serve's batch too.
    regions = (((0.0, 0.0, 0.5, 1.0), (0.0, 1.0, 0.0), None), ((0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0), "a blue star"))
    regional = Sample("a red circle", None, (1.0, 0.0, 0.0), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, 21, regions=regions)
    bodies.append(
        {
            "prompt": "a red circle",
            "seed": 21,
            "steps": TINY_STEPS,
            "width": TINY_SIZE,
            "height": TINY_SIZE,
            "regions": [{"box": [0, 0, 0.5, 1], "style": "neon"}, {"box": [0.5, 0, 1, 1], "style": "sketch", "prompt": "a blue star"}],
        }
    )
    name = "dmm-test-batch"
    # A long batch window so the concurrent requests land in one batch.
    with serve_on_cluster(name, batch_wait_timeout_s=0.5, max_batch_size=8) as url:
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(url + "/generate", json=b, timeout=60), bodies))
        info = serve.get_deployment_handle("StyleModel", app_name=name).info.remote().result()
        page, schema = httpx.get(url + "/"), httpx.get(url + "/openapi.json")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "/generate" in schema.json()["paths"]
    for s, r in zip(MIXED + [regional], responses):
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        want = backend.generate([s])[0]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= MAX_LEVEL_DIFF
    assert info["mixed_style_batches"] >= 1, info
    assert max(int(k) for k in info["batch_sizes"]) >= 2, info
    assert [s["name"] for s in info["styles"]] == STYLE_NAMES


@pytest.mark.ray
def test_a_cancelled_request_stops_its_forward(ray_cluster):
    """A request that times out at the proxy (or whose client leaves) is cancelled; its forward stops
    at the next denoising step instead of holding the replica for the rest of its steps."""
    import time

    from ray import serve

    name = "dmm-test-cancel"
    long = Sample("a red circle", None, (1.0, 0.0, 0.0), 900, 7.0, 128, 128, 3)  # minutes of work on 2 cores
    with serve_on_cluster(name):
        handle = serve.get_deployment_handle("StyleModel", app_name=name)
        response = handle.generate.remote(long)
        time.sleep(2.0)  # in the forward by now
        response.cancel()
        t0 = time.time()
        while handle.info.remote().result()["cancelled_forwards"] == 0 and time.time() - t0 < 20:
            time.sleep(0.2)
        stopped_after = time.time() - t0
        info = handle.info.remote().result()
        quick = handle.generate.remote(sample("a blue square", (0, 1, 0), 12)).result(timeout_s=60)
    assert info["cancelled_forwards"] == 1 and stopped_after < 20, info
    assert quick.shape == (TINY_SIZE, TINY_SIZE, 3)
