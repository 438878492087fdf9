"""Serve: preloaded LoRA adapters picked per request, never batched across adapter sets; the
playground's export command (issue 16, section 3)."""

from __future__ import annotations

import io
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import STYLE_NAMES, TINY_SIZE, TINY_STEPS, serve_on_cluster, style_model_outside_serve, tiny_model_dir

from serve.config import ServeConfig
from serve.model import ModelLoadError, StyleModelBackend
from serve.router import LocalService, create_api
from serve.schemas import Sample

MAX_LEVEL_DIFF = 1  # uint8: batched vs single convolutions may flip one rounding


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.tiny_plugins import make_lora

    unet = StyleUNet.from_pretrained(tiny_model_dir() / "unet")
    root = tmp_path_factory.mktemp("serve-lora")
    return {
        "subject": make_lora(unet, root / "subject", seed=1, scale=0.4),
        "detail": make_lora(unet, root / "detail", seed=2, scale=0.4).parent,
    }  # a file and a folder


@pytest.fixture(scope="module")
def backend(lora_files):
    return StyleModelBackend(str(tiny_model_dir()), device="cpu", lora_adapters={k: str(v) for k, v in lora_files.items()})


@pytest.fixture(scope="module")
def client(backend, lora_files):
    cfg = ServeConfig(model=str(tiny_model_dir()), default_steps=TINY_STEPS, lora_adapters={k: str(v) for k, v in lora_files.items()})
    with TestClient(create_api(LocalService(backend), cfg)) as c:
        yield c


def sample(weights, seed, lora=()) -> Sample:
    return Sample("a red circle", None, tuple(weights), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, seed, lora=tuple(lora))


def png(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)


def post(client, **body):
    body = {"prompt": "a red circle", "steps": TINY_STEPS, "width": TINY_SIZE, "height": TINY_SIZE, "seed": 3} | body
    return client.post("/generate", json=body)


def test_lora_in_a_request_applies_the_preloaded_adapter(client, lora_files):
    import torch

    from dmm_ray.pipeline import load_dmm_pipeline

    plain = png(post(client, style="neon"))
    r = post(client, style="neon", lora={"subject": 1.0})
    with_lora = png(r)
    assert np.abs(with_lora - plain).mean() > 0.5
    assert r.headers["X-LoRA"] == '{"subject": 1.0}'
    # the same image diffusers gives with the LoRA loaded by hand
    pipe = load_dmm_pipeline(tiny_model_dir())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_files["subject"].parent), weight_name=lora_files["subject"].name, adapter_name="x")
    want = pipe(
        ["a red circle"],
        style="neon",
        num_inference_steps=TINY_STEPS,
        guidance_scale=7.0,
        width=TINY_SIZE,
        height=TINY_SIZE,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    assert np.abs(with_lora - (np.clip(want, 0, 1) * 255).round()).max() <= MAX_LEVEL_DIFF
    # weights are honoured; zero weight is no LoRA; the style still switches under a LoRA
    assert np.abs(png(post(client, style="neon", lora={"subject": 0.5})) - with_lora).mean() > 0.2
    assert np.abs(png(post(client, style="neon", lora={"subject": 0})) - plain).max() <= MAX_LEVEL_DIFF
    assert np.abs(png(post(client, style="sketch", lora={"subject": 1.0})) - with_lora).mean() > 0.5
    both = png(post(client, style="neon", lora={"subject": 1.0, "detail": 1.0}))
    assert np.abs(both - with_lora).mean() > 0.2
    # after LoRA requests, a request without one is the plain image again
    assert np.abs(png(post(client, style="neon")) - plain).max() <= MAX_LEVEL_DIFF
    assert client.get("/styles").json()["lora"] == ["subject", "detail"]


def test_unknown_or_bad_lora_is_422_naming_the_preloaded_ones(client, backend):
    r = post(client, lora={"watercolour": 1.0})
    assert r.status_code == 422 and "watercolour" in r.json()["error"] and "'subject'" in r.json()["error"]
    r = post(client, lora={"subject": "much"})
    assert r.status_code == 422
    r = post(client, lora={"subject": 1e6})
    assert r.status_code == 422 and "finite" in r.json()["error"]
    r = post(client, lora="subject")
    assert r.status_code == 422
    bare = StyleModelBackend(str(tiny_model_dir()), device="cpu")
    with TestClient(create_api(LocalService(bare), ServeConfig(model=str(tiny_model_dir()), default_steps=TINY_STEPS))) as c:
        r = post(c, lora={"subject": 1.0})
        assert r.status_code == 422 and "preloads no LoRA" in r.json()["error"]
        assert c.get("/styles").json()["lora"] == []


def test_different_adapter_sets_never_share_a_forward(backend):
    samples = [
        sample((1, 0, 0), 11),
        sample((0, 1, 0), 12, lora=[("subject", 1.0)]),
        sample((0, 0, 1), 13, lora=[("subject", 0.5)]),
        sample((0.5, 0.5, 0), 14),
        sample((1, 0, 0), 11, lora=[("detail", 1.0), ("subject", 1.0)]),
        sample((0, 1, 0), 15, lora=[("subject", 1.0)]),
    ]
    backend.forward_groups = []
    batched = backend.generate(samples)
    groups = [(key[-1], n) for key, n in backend.forward_groups]
    assert sorted(groups) == sorted([((), 2), ((("subject", 1.0),), 2), ((("subject", 0.5),), 1), ((("detail", 1.0), ("subject", 1.0)), 1)])
    for s, img in zip(samples, batched):
        alone = backend.generate([s])[0]
        assert np.abs(img.astype(int) - alone.astype(int)).max() <= MAX_LEVEL_DIFF
    assert np.abs(batched[0].astype(int) - batched[4].astype(int)).mean() > 0.5  # same seed + style, LoRA on
    # adapters are switched only when the set changes
    backend.generate([samples[1]])
    switches = backend.lora_switches
    backend.generate([samples[1], samples[5]])
    assert backend.lora_switches == switches
    backend.generate([samples[0]])
    assert backend.lora_switches == switches + 1


def test_a_failed_adapter_switch_leaves_no_adapter_on(backend):
    """A switch set_adapters refuses (an adapter this replica never loaded, from a direct handle caller)
    fails that forward only: it must not leave the LoRA layers enabled while the backend records none
    (every later plain request got the last adapter: 140 levels off)."""
    plain = backend.generate([sample((1, 0, 0), 3)])[0]
    with_lora = backend.generate([sample((1, 0, 0), 3, lora=[("subject", 1.0)])])[0]
    backend.generate([sample((1, 0, 0), 3)])  # adapters off again
    with pytest.raises(ValueError, match="ghost"):
        backend.generate([sample((1, 0, 0), 3, lora=[("ghost", 1.0)])])
    assert np.abs(backend.generate([sample((1, 0, 0), 3)])[0].astype(int) - plain.astype(int)).max() <= MAX_LEVEL_DIFF
    again = backend.generate([sample((1, 0, 0), 3, lora=[("subject", 1.0)])])[0]
    assert np.abs(again.astype(int) - with_lora.astype(int)).max() <= MAX_LEVEL_DIFF


def test_the_replica_refuses_unknown_adapters_and_bad_weights_per_sample(backend, lora_files, monkeypatch):
    """StyleModel's own guard covers `lora` like the style weights: a sample naming an adapter the replica
    did not preload, or a NaN / out-of-range weight (a direct handle caller), is its own 422, not a 500 or an
    image made with NaN weights; the batch's other samples get the images they get alone."""
    import asyncio

    from serve.schemas import RequestError

    adapters = {k: str(v) for k, v in lora_files.items()}
    batch = [
        sample((1, 0, 0), 1),
        sample((0, 1, 0), 2, lora=[("ghost", 1.0)]),
        sample((0, 1, 0), 3, lora=[("subject", float("nan"))]),
        sample((0, 1, 0), 4, lora=[("subject", 50.0)]),
        sample((0, 0, 1), 5, lora=[("subject", 1.0)]),
    ]
    with style_model_outside_serve(monkeypatch, str(tiny_model_dir()), "cpu", 8, 0.5, adapters) as model:

        async def run():
            return await asyncio.gather(*(model.generate(s) for s in batch), return_exceptions=True)

        out = asyncio.run(run())
    assert model.batch_sizes == {5: 1}  # one shared batch
    for i in (1, 2, 3):
        assert isinstance(out[i], RequestError) and out[i].status == 422, out[i]
    assert "ghost" in out[1].message and "'subject'" in out[1].message and "finite" in out[2].message
    for i in (0, 4):
        assert np.abs(out[i].astype(int) - backend.generate([batch[i]])[0].astype(int)).max() <= MAX_LEVEL_DIFF
    assert model.sample_failures == {"client": 3}


def test_lora_config_is_validated_and_paths_come_from_config_only(tmp_path):
    with pytest.raises(ValueError, match="adapter name"):
        ServeConfig(lora_adapters={"bad name": "x"})
    with pytest.raises(ValueError, match="lora_adapters"):
        ServeConfig(lora_adapters={"a": " "})
    with pytest.raises(ModelLoadError, match="'ghost'.*does not exist"):
        StyleModelBackend(str(tiny_model_dir()), device="cpu", lora_adapters={"ghost": str(tmp_path / "nope.safetensors")})
    cfg = ServeConfig(lora_adapters={"a": "$DMM_HOME/loras/a.safetensors"})
    assert Path(cfg.lora_locations()["a"]).is_absolute() and "$DMM_HOME" not in cfg.lora_locations()["a"]
    from serve.schemas import GenerateRequest

    assert GenerateRequest.model_fields["lora"].annotation is not None  # names only: {name: weight}


def test_export_command_for_a_style_and_a_mixture(client):
    from dmm_ray.styles import parse_weights
    from jobs import export as job

    r = client.post("/export_command", json={"weights": {"watercolor": 0, "neon": 3}})
    assert r.status_code == 200, r.text
    cmd = shlex.split(r.json()["command"])
    args = job.build_parser().parse_args(cmd[2:])
    assert cmd[:2] == ["python", "jobs/export.py"] and args.model == str(tiny_model_dir()) and args.style == "neon"
    r = client.post("/export_command", json={"weights": {"watercolor": 1, "neon": 3}, "format": "diffusers"})
    args = job.build_parser().parse_args(shlex.split(r.json()["command"])[2:])
    assert parse_weights(args.weights) == {"watercolor": 0.25, "neon": 0.75} and args.format == "diffusers"
    r = client.post("/export_command", json={"style": "oil"})
    assert r.status_code == 422 and "known styles" in r.json()["error"]
    for body in ({"style": True}, {"weights": [True, False, False]}, {"weights": {"neon": "1"}}):  # never coerced to 1/0
        assert client.post("/export_command", json=body).status_code == 422, body
    r = client.post("/export_command", json={"style": "neon", "colour": 1})
    assert r.status_code == 422 and "allowed fields: style, weights, format" in r.json()["error"]
    page = client.get("/").text
    assert 'id="exportcmd"' in page and "export_command" in page


@pytest.mark.ray
def test_serve_keeps_adapter_sets_apart_in_shared_batches(ray_cluster, backend, lora_files):
    import httpx
    from ray import serve

    bodies = [
        {
            "prompt": "a red circle",
            "style": STYLE_NAMES[i % 3],
            "seed": 20 + i,
            "steps": TINY_STEPS,
            "width": TINY_SIZE,
            "height": TINY_SIZE,
            **({"lora": {"subject": 1.0}} if i % 2 else {}),
        }
        for i in range(6)
    ]
    name = "dmm-test-lora"
    with serve_on_cluster(name, batch_wait_timeout_s=0.5, max_batch_size=8, lora_adapters={k: str(v) for k, v in lora_files.items()}) as url:
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(url + "/generate", json=b, timeout=60), bodies))
        info = serve.get_deployment_handle("StyleModel", app_name=name).info.remote().result()
        bad = httpx.post(url + "/generate", json={"prompt": "a star", "lora": {"nope": 1}}, timeout=60)
    assert bad.status_code == 422 and "subject" in bad.json()["error"]
    for i, (b, r) in enumerate(zip(bodies, responses)):
        weights = [1.0 if n == b["style"] else 0.0 for n in STYLE_NAMES]
        want = backend.generate([sample(weights, b["seed"], lora=[("subject", 1.0)] if i % 2 else [])])[0]
        assert np.abs(png(r) - want.astype(int)).max() <= MAX_LEVEL_DIFF, i
    assert info["lora"] == ["subject", "detail"]
    assert info["lora_split_batches"] >= 1, info  # a shared batch held both sets, and ran them apart
